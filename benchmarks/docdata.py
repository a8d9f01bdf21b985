"""Measured figures for the documentation: one JSON file per table, written by the script that measured it.

No figure in the docs is typed by hand. A benchmark script (or a short script over a committed run)
writes its table with :func:`write` to ``docs/data/<name>.json``; the docs build renders every such
file as a table that names the machine, the date and the command that produced it. The format::

    {"name": "feature-cost", "title": "Cost of features", "command": "python benchmarks/... --json ...",
     "machine": {"cpu": "...", "cores": 2, "memory_gib": 23.4, "gpu": null, "fingerprint": "...",
                 "torch": "2.13.0", "python": "3.11.7"},
     "date": "2026-12-07", "source": "results/docs/features (the run it was computed from; optional)",
     "columns": ["variant", "feature", "× time"], "rows": [["flex", "softcap", 1.21], ...],
     "notes": ["each line a sentence"]}

Torch is imported only to record its version, and only when it is already imported.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.core.cases import json_value  # noqa: E402

#: Where the docs build looks for measured tables.
DATA_DIR = ROOT / "docs" / "data"
FIELDS = ("name", "title", "command", "machine", "date", "columns", "rows")


def machine_info() -> dict[str, Any]:
    """This machine as a docs reader needs to know it (and its fingerprint, as run.json records it)."""
    from harness.measure import environment

    info = environment.machine()
    torch = sys.modules.get("torch")
    return {"cpu": info.get("cpu_model"), "cores": info.get("cpu_count"),
            "memory_gib": round((info.get("memory_bytes") or 0) / 2**30, 1),
            "gpu": (info.get("gpu") or {}).get("name"), "fingerprint": info.get("fingerprint"),
            "torch": getattr(torch, "__version__", None), "python": platform.python_version()}


def table(name: str, title: str, command: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
          notes: Sequence[str] = (), source: str | None = None, machine: dict[str, Any] | None = None) -> dict:
    """The document of one measured table (see the module docstring)."""
    bad = [i for i, r in enumerate(rows) if len(r) != len(columns)]
    if bad:
        raise ValueError(f"{name}: rows {bad[:5]} do not have {len(columns)} cells")
    doc = {"name": name, "title": title, "command": command, "machine": machine or machine_info(),
           "date": date.today().isoformat(), "columns": list(columns),
           "rows": [[json_value(c) for c in r] for r in rows], "notes": list(notes)}
    if source:
        doc["source"] = source
    return doc


def json_path(value: str, name: str) -> Path:
    """Where ``--json [FILE|DIR]`` writes table ``name``: FILE (a .json path), DIR/<name>.json, or
    docs/data/<name>.json when no value was given."""
    if not value:
        return ROOT / "docs" / "data" / f"{name}.json"
    path = Path(value)
    return path if path.suffix == ".json" else path / f"{name}.json"


def write(path: str | Path | None, name: str, title: str, command: str, columns: Sequence[str],
          rows: Sequence[Sequence[Any]], notes: Sequence[str] = (), source: str | None = None) -> Path:
    """Write one measured table to ``path`` (default ``docs/data/<name>.json``); returns the path."""
    out = Path(path) if path else DATA_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table(name, title, command, columns, rows, notes, source), indent=2) + "\n")
    return out


def read(path: str | Path) -> dict:
    """A measured table, checked (ValueError naming the file and the field when it does not fit)."""
    doc = json.loads(Path(path).read_text())
    missing = [f for f in FIELDS if f not in doc]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if any(len(r) != len(doc["columns"]) for r in doc["rows"]):
        raise ValueError(f"{path}: a row's cells do not match its {len(doc['columns'])} columns")
    return doc
