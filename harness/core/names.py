"""Names that become file names: suite names, run ids, baselines — one rule, and staying inside a root.

A suite's name is part of its run ids (``<stamp>-<suite>-<hex>``) and of ``results/baseline/<suite>/``;
a run id names ``results/runs/<run_id>/`` and the site's ``runs/<run_id>/``. Those names are read
back from ``run.json`` files that may come from anyone (a colleague's results, a CI artifact), so
they must never be able to point outside the directory they are meant for: letters, digits,
``-``, ``_`` and ``.``, not starting with a dot (no ``..``, no hidden files), and not too long for
a file name. :func:`inside` is the second guard: the path it builds must resolve under its root.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The longest suite name (a run id adds a timestamp and a suffix: :data:`MAX_RUN_ID`).
MAX_NAME = 128
#: The longest run id: ``YYYYmmdd-HHMMSS-`` + the suite name + ``-`` + six hex digits.
MAX_RUN_ID = MAX_NAME + 32

_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def name_problem(name: object, max_len: int = MAX_NAME) -> str | None:
    """Why ``name`` cannot be a suite name, run id or baseline name (None: it can)."""
    if not isinstance(name, str):
        return f"expected a name (a string), got {type(name).__name__}"
    shown = repr(name if len(name) <= 60 else name[:60] + "...")
    if len(name) > max_len:
        return f"a name of at most {max_len} characters, got {len(name)}: {shown}"
    if not _NAME.fullmatch(name):
        return f"expected a name of letters, digits, '-', '_' or '.', not starting with '.', got {shown}"
    return None


def check_name(name: object, what: str = "name", max_len: int = MAX_NAME) -> str:
    """``name`` if it is a valid name, else ValueError ``"<what>: <why>"``."""
    problem = name_problem(name, max_len)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    return name  # type: ignore[return-value]


def inside(root: str | Path, *names: str) -> Path:
    """``root / names...`` after checking each name (:func:`check_name`) and that the path, symlinks
    resolved, stays under ``root``; ValueError naming it otherwise."""
    path = Path(root)
    for name in names:
        path = path / check_name(name, max_len=MAX_RUN_ID)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise ValueError(f"{path} resolves to {path.resolve()}, outside {base}")
    return path
