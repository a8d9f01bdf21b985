"""Which numbers of a run can be trusted as speed results, as the report reads them.

* ``incorrect`` rows (a wrong answer; their time is still recorded) are not ``ok``, and every speed
  view (scaling charts and fits, crossovers, throughput, roofline, Pareto fronts) starts from the
  ``ok`` rows, so they are in none of them; the page lists them at its top.
* Unstable cases (``stable`` false: the worker processes that timed the case disagreed, the
  ``stability_note`` says how) are drawn with their own marker and kept out of time fits and time
  crossovers (their memory, measured once, is not affected).
* Emulated rows (``emulated`` true, e.g. FP8 emulated on a CPU) have a time that is not a speed
  result: kept out of every speed view, still in the accuracy views and the table.
* The measurement environment of ``run.json`` (``environment.measurement``) and the worker
  processes per case, for the header.

Both columns may be absent (older runs, variants that do not write ``emulated``): nothing is then
unstable or emulated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pandas as pd

from harness.core.cases import is_missing
from harness.core.config import ALLOCATOR_ENV

#: PyTorch's switch for page-aligned (transparent-huge-page) CPU allocations.
THP_VARIABLE = ALLOCATOR_ENV
_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*$")
#: Header entries, in order, and the words in a ``measurement`` key that put a value under each.
_KINDS = (("allocator", ("alloc",)), ("threads", ("thread",)), ("CPU affinity", ("affinity",)),
          ("CPU governor", ("governor",)))


def flag(rows: pd.DataFrame, column: str, value: bool) -> pd.Series:
    """Which rows hold ``value`` in the boolean ``column`` (missing values and an absent column: none)."""
    if column not in rows.columns:
        return pd.Series(False, index=rows.index, dtype=bool)
    return rows[column].map(lambda v: not is_missing(v) and bool(v) is value).astype(bool)


def unstable(rows: pd.DataFrame) -> pd.Series:
    """Rows whose timing the run flagged unstable (``stable`` false)."""
    return flag(rows, "stable", False)


def emulated(rows: pd.DataFrame) -> pd.Series:
    """Rows whose time is not a speed result (``emulated`` true)."""
    return flag(rows, "emulated", True)


def speed_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """The ``ok`` rows whose time is a speed result: all but the emulated ones."""
    return ok[~emulated(ok)]


def stability_note(row: dict) -> str:
    note = row.get("stability_note")
    return note if isinstance(note, str) and note else "the worker processes that timed this case disagree"


# -- the measurement environment -----------------------------------------------------------------

def cpu_list(cpus) -> str:
    """``[0, 1, 2, 3, 6]`` → ``0–3, 6 (5 CPUs)``."""
    cpus = sorted({int(c) for c in cpus})
    spans: list[list[int]] = []
    for c in cpus:
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    text = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans)
    return f"{text} ({len(cpus)} CPU{'s' if len(cpus) != 1 else ''})"


def _text(value: Any) -> str:
    if value is None:
        return "not readable"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return cpu_list(value)
        return ", ".join(sorted({_text(x) for x in value}))
    return str(value)


def _leaves(d: dict, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _leaves(value, path + (str(key),))
        else:
            yield path + (str(key),), value


def processes_text(meta: dict, rows: pd.DataFrame) -> str:
    """How many worker processes timed each case: the run's setting, and the rows' own counts."""
    asked = (meta.get("timing") or {}).get("processes")
    counts = []
    if "processes" in rows.columns:
        counts = sorted({int(n) for n in pd.to_numeric(rows["processes"], errors="coerce").dropna()})
    if asked is None and not counts:
        return ""
    main = int(asked) if asked is not None else counts[-1]
    text = (f"{main} fresh worker processes per case, one round each; the time is the median of their medians"
            if main > 1 else "1 worker process per case")
    others = [n for n in counts if n != main]
    if others:
        text += f" (some cases by {', '.join(map(str, others))})"
    return text


def measurement_items(env: dict, meta: dict, rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(name, text) pairs for the header: processes, allocator and the effective THP variable,
    threads, CPU affinity, governor, every allocator/threading variable that was set, anything else
    ``environment.measurement`` records. Runs from before that record show their allocator variable."""
    items = []
    procs = processes_text(meta, rows)
    if procs:
        items.append(("processes", procs))
    record = env.get("measurement")
    if not isinstance(record, dict):
        old = env.get("allocator")
        if isinstance(old, dict) and old:
            items.append(("allocator", ", ".join(f"{k}={v}" if v is not None else f"{k} unset"
                                                 for k, v in old.items())))
        return items
    kinds: dict[str, list[str]] = {name: [] for name, _ in _KINDS}
    variables, other, thp = [], [], None
    for path, value in _leaves(record):
        name, where = path[-1], ".".join(path).lower()
        if name.upper() == THP_VARIABLE:
            thp = value
        elif _VARIABLE.match(name):
            if value is not None:
                variables.append(f"{name}={value}")
        elif value in ([], (), {}, ""):
            continue
        else:
            kind = next((k for k, words in _KINDS if any(w in where for w in words)), None)
            (kinds[kind] if kind else other).append(_text(value) if kind else f"{'.'.join(path)}: {_text(value)}")
    kinds["allocator"].append(f"{THP_VARIABLE}={thp}" if thp is not None else f"{THP_VARIABLE} unset")
    for name, _ in _KINDS:
        if kinds[name]:
            items.append((name, " · ".join(dict.fromkeys(kinds[name]))))
    items.append(("variables", ", ".join(sorted(variables)) if variables
                  else "no allocator or threading variable set (OMP_*, MKL_*, KMP_*, MALLOC_*, LD_PRELOAD …)"))
    items.extend(("recorded", text) for text in other)
    return items
