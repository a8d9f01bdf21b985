"""What a run directory may hold, checked before anything reads it: ``run.json``'s declared shape
and the result tables' columns.

Run directories travel: a colleague's results, a CI artifact downloaded as a baseline, a committed
``results/baseline/``, a checkout of a history branch. They are data, and every reader treats them
so: :mod:`harness.engine.store`'s reading functions parse them and check them here — every field
``run.json`` is known to hold against its type, range and size (:data:`META`), every declared
result column against :mod:`harness.core.schema` (:func:`table_problems`) — so that what the
readers get is what they expect, and anything else is one line naming the file and the field
(the command line exits 2). Fields this harness does not know (a newer one's) pass unchecked,
bounded only by the file's size and nesting depth. Nothing here imports or runs anything a run
directory names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.core import names, schema
from harness.core.cases import AXES, axis_names, is_missing
from harness.core.config import ALLOCATOR_ENV, COMPARE, TIMING, Table

#: Largest ``run.json`` read (a suite of a million cases lists their ids in about 25 MB).
MAX_META_BYTES = 64 * 2**20
#: Largest table file read (``results.parquet``, ``samples.parquet``, the ``.jsonl`` logs).
MAX_TABLE_BYTES = 2 * 2**30
#: Deepest nesting of lists and objects in ``run.json``.
MAX_DEPTH = 32
#: Longest string field of ``run.json`` (the suite's text is one).
MAX_TEXT = 2**20
#: Largest integer a field may hold (int64).
MAX_INT = 2**63 - 1

#: The most shards a sweep is split into (``--shard i/n``; a run.json recording more is refused).
MAX_SHARDS = 10_000
#: The largest numbers ``bench`` takes from a run directory to do work with: ``bench resume`` of the
#: suite recorded in ``run.json`` (:func:`harness.engine.trust.received_suite`, one line naming the
#: field and the way around it beyond these); ``--confirm`` caps its rounds lower still
#: (:func:`harness.regression.confirm.round_timing`).
RECEIVED_LIMITS: dict[str, float] = {
    "warmup": 1000, "min_reps": 100_000, "max_reps": 100_000, "min_time_s": 600.0, "max_time_s": 600.0,
    "processes": 16, "threads": 4096, "case_timeout_s": 86_400.0, "cases": 1_000_000,
}

#: A check: ``(value, where)``; raises :class:`Misfit` naming ``where`` when the value does not fit.
Check = Callable[[Any, str], None]


class Misfit(ValueError):
    """A value of ``run.json`` that does not fit its declaration: ``where`` (dotted path) and why."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}" if where else why)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _shown(value: Any) -> str:
    return "a huge one" if isinstance(value, int) and abs(value) > 10**30 else repr(value)[:60]


def text(max_len: int = MAX_TEXT, pattern: str | None = None, what: str = "a string") -> Check:
    rx = re.compile(pattern) if pattern else None

    def check(v, where):
        if not isinstance(v, str):
            raise Misfit(where, f"expected {what}, got {_kind(v)}")
        if len(v) > max_len:
            raise Misfit(where, f"expected {what} of at most {max_len} characters, got {len(v)}")
        if "\0" in v or (rx is not None and not rx.fullmatch(v)):
            raise Misfit(where, f"expected {what}, got {_shown(v)}")
    return check


def integer(lo: int = -MAX_INT, hi: int = MAX_INT) -> Check:
    def check(v, where):
        if not isinstance(v, int) or isinstance(v, bool):
            raise Misfit(where, f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            raise Misfit(where, f"expected an integer from {lo} to {hi}, got {_shown(v)}")
    return check


def number(lo: float = -math.inf, hi: float = math.inf) -> Check:
    def check(v, where):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise Misfit(where, f"expected a number, got {_kind(v)}")
        if not (isinstance(v, float) and math.isfinite(v) or isinstance(v, int) and abs(v) <= MAX_INT) \
                or not lo <= v <= hi:
            raise Misfit(where, f"expected a finite number from {lo} to {hi}, got {_shown(v)}")
    return check


def boolean(v, where):
    if not isinstance(v, bool):
        raise Misfit(where, f"expected true or false, got {_kind(v)}")


def anything(v, where):
    """Any JSON value (the file's size and depth bound it), with finite floats and int64 integers."""
    if isinstance(v, dict):
        for key, x in v.items():
            anything(x, _join(where, key))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            anything(x, f"{where}[{i}]")
    elif isinstance(v, float) and not math.isfinite(v):
        raise Misfit(where, f"expected a finite number, got {v}")
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
        raise Misfit(where, "expected an integer within int64, got a huge one")


def scalar(v, where):
    if isinstance(v, (dict, list)):
        raise Misfit(where, f"expected a single value, got {_kind(v)}")
    anything(v, where)


def optional(check: Check) -> Check:
    def maybe(v, where):
        if v is not None:
            check(v, where)
    return maybe


def name(max_len: int = names.MAX_NAME) -> Check:
    def check(v, where):
        if (problem := names.name_problem(v, max_len)) is not None:
            raise Misfit(where, problem)
    return check


def array(item: Check, max_len: int = 10**7) -> Check:
    def check(v, where):
        if not isinstance(v, list):
            raise Misfit(where, f"expected an array, got {_kind(v)}")
        if len(v) > max_len:
            raise Misfit(where, f"expected at most {max_len} items, got {len(v)}")
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return check


def record(fields: dict[str, tuple[Check, bool]], other: Check = anything) -> Check:
    """An object: ``fields`` maps a key to (its check, whether it is required); other keys pass ``other``."""
    def check(v, where):
        if not isinstance(v, dict):
            raise Misfit(where, f"expected an object, got {_kind(v)}")
        for key, (field, required) in fields.items():
            if key in v:
                field(v[key], _join(where, key))
            elif required:
                raise Misfit(_join(where, key), "missing")
        for key, x in v.items():
            if key not in fields:
                other(x, _join(where, key))
    return check


def mapping(value: Check) -> Check:
    """An object whose every value passes ``value``."""
    return record({}, other=value)


def settings(table: Table) -> Check:
    """A suite table's settings as stored (``timing``, ``[compare]``): a key this harness declares
    passes its declaration's check (:mod:`harness.core.config`; null where it has no default),
    another one (a newer harness's) is a single value."""
    def check(v, where):
        if not isinstance(v, dict):
            raise Misfit(where, f"expected an object, got {_kind(v)}")
        for key, x in v.items():
            if key not in table:
                scalar(x, _join(where, key))
            elif x is not None and (problem := table[key].check(x)[1]) is not None:
                raise Misfit(_join(where, key), problem)
    return check


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


COMMIT = text(64, r"[0-9a-f]{7,64}", "a git commit (hexadecimal)")
SHORT = text(1000)
PATH = text(4096)

#: Everything this harness writes to ``run.json`` and reads back, with its type, range and size.
META: Check = record({
    "schema_version": (integer(), True),
    "run_id": (name(names.MAX_RUN_ID), True),
    "suite": (record({
        "name": (name(), True),
        "description": (optional(text()), False),
        "path": (optional(PATH), False),
        "resolved_path": (optional(PATH), False),
        "text": (optional(text()), False),
        "definition": (optional(record({
            "plugins": (array(PATH, 1000), False),
            "variant": (array(record({"name": (text(1000), False)}), 10**5), False),
            "compare": (settings(COMPARE), False),
        })), False),
    }), True),
    "timing": (optional(settings(TIMING)), False),
    "seed": (optional(integer()), False),
    "cases": (optional(integer(0, 10**8)), False),
    "case_ids": (optional(array(text(200), 10**8)), False),
    "started": (optional(SHORT), False),
    "finished": (optional(SHORT), False),
    "resumed": (optional(array(SHORT, 10**5)), False),
    "status": (optional(SHORT), False),
    "wall_s": (optional(number(0, 1e12)), False),
    # bench run --shard i/n (harness.engine.shard): which part of the suite this run holds
    "shard": (optional(record({"index": (integer(1, MAX_SHARDS), True), "count": (integer(1, MAX_SHARDS), True),
                               "cases": (optional(integer(0, 10**8)), False),
                               "suite_cases": (optional(integer(0, 10**8)), False)})), False),
    "environment": (optional(record({
        "machine": (optional(record({
            "hostname": (optional(SHORT), False),
            "platform": (optional(SHORT), False),
            "cpu_model": (optional(SHORT), False),
            "cpu_count": (optional(integer(0, 2**24)), False),
            "cpu_flags": (optional(array(SHORT, 10**4)), False),
            "cpu_caches": (optional(mapping(optional(integer(0)))), False),
            "memory_bytes": (optional(integer(0)), False),
            "gpu": (optional(record({"name": (optional(SHORT), False), "count": (optional(integer(0, 2**24)), False)})),
                    False),
            "fingerprint": (optional(SHORT), False),
        })), False),
        "versions": (optional(mapping(optional(scalar))), False),
        "threads": (optional(integer(0, 2**24)), False),
        # the allocator variable --confirm sets again in its workers (never any other variable)
        "measurement": (optional(record({"allocator": (optional(SHORT), False),
                                         ALLOCATOR_ENV: (optional(text(100)), False)})), False),
        "allocator": (optional(mapping(optional(text(100)))), False),
        "git": (optional(record({
            "commit": (optional(COMMIT), False),
            "dirty": (optional(boolean), False),
            "root": (optional(PATH), False),
        })), False),
    })), False),
})


def _depth(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects no deeper than ``limit`` (without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def regular_file(path: Path, max_bytes: int) -> str | None:
    """Why ``path`` is not a file that may be read (not a regular file: a FIFO or a device would
    block or never end; larger than ``max_bytes``); None when it may."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    import stat as st_mode

    if not st_mode.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > max_bytes:
        return f"{st.st_size} bytes, more than the {max_bytes} a run's file may have"
    return None


def parse_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(meta, None)`` from ``run.json`` at ``path``, or ``(None, problem)``: unreadable, not JSON,
    not an object, nested too deep, or a field that does not fit :data:`META`."""
    if (problem := regular_file(path, MAX_META_BYTES)) is not None:
        return None, problem
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"damaged ({type(exc).__name__}: {exc})"
    except RecursionError:
        return None, f"damaged (nested deeper than {MAX_DEPTH} levels)"
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        return None, f"damaged (not JSON: {exc})"
    if not isinstance(meta, dict):
        return None, f"damaged (expected a JSON object, got {_kind(meta)})"
    if not _depth(meta, MAX_DEPTH):
        return None, f"damaged (nested deeper than {MAX_DEPTH} levels)"
    return meta, None


def meta_problem(meta: dict[str, Any]) -> str | None:
    """The first field of ``meta`` that does not fit :data:`META` (``"field: why"``), or None."""
    try:
        META(meta, "")
    except Misfit as exc:
        return str(exc)
    return None


# -- the result tables ----------------------------------------------------------------------------

#: Columns every results table must have: the identity every run of this schema version has
#: (case fields declared ``later``, such as ``q_len``, are absent from older runs) and the status.
REQUIRED = ("case_id", "variant", "params", *axis_names(later=False), "status")
#: The largest magnitude a number of a result table may have: far beyond any time, size, count or
#: rate a run measures, and small enough that ratios, products and charts of them stay finite.
MAX_NUMBER = 1e30
#: Columns every samples table must have, with their dtypes.
SAMPLE_COLUMNS = {"case_id": "string", "rep": "int64", "time_ms": "float64"}
#: Identity columns that count something (at least 1 where not empty).
_COUNTS = tuple(n for n, ax in AXES.items() if ax.dtype == "int64" and ax.ge == 1)


def _value_problem(v: Any, dtype: str) -> str | None:
    """Why one (not missing) value is not of ``dtype``, or None."""
    import numpy as np

    if dtype == "string":
        ok = isinstance(v, str)
    elif dtype == "bool":
        ok = isinstance(v, (bool, np.bool_))
    else:
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if ok:
            if not math.isfinite(v) if isinstance(v, (float, np.floating)) else abs(int(v)) > MAX_INT:
                return f"{str(v)[:30]}, not a finite number"
            if abs(float(v)) > MAX_NUMBER:
                return f"{str(v)[:30]}, beyond ±{MAX_NUMBER:g}"
            if dtype == "int64" and isinstance(v, (float, np.floating)) and v != round(v):
                return f"{v}, not an integer"
    return None if ok else f"{type(v).__name__} {str(v)[:60]!r}, expected {dtype}"


def column_problem(series, dtype: str) -> str | None:
    """Why the values of ``series`` are not of the declared ``dtype`` (missing values are fine;
    numbers must be finite, integers integral), or None. Vectorised for typed columns."""
    import numpy as np
    import pandas as pd

    dt = series.dtype
    if isinstance(dt, pd.StringDtype) or getattr(dt, "kind", "O") == "O":
        if isinstance(dt, pd.StringDtype) and dtype == "string":
            return None
        for v in series.tolist():
            if not is_missing(v) and (problem := _value_problem(v, dtype)) is not None:
                return problem
        return None
    kind = dt.kind
    if kind == "f":
        values = series.to_numpy(dtype=float)
        values = values[~np.isnan(values)]
        if values.size == 0:
            return None
        if dtype in ("string", "bool"):
            return f"numbers, expected {dtype}"
        if not np.isfinite(values).all():
            return "a value that is not a finite number"
        if (np.abs(values) > MAX_NUMBER).any():
            return f"a value beyond ±{MAX_NUMBER:g}"
        if dtype == "int64" and not ((values == np.round(values)).all() and (np.abs(values) <= 2.0**63).all()):
            return "a value that is not an int64 integer"
        return None
    if len(series) == 0:
        return None
    if kind in "iu":
        if dtype not in ("int64", "float64"):
            return f"integers, expected {dtype}"
        return f"a value beyond ±{MAX_NUMBER:g}" if (np.abs(series.to_numpy(dtype=float)) > MAX_NUMBER).any() else None
    if kind == "b":
        return None if dtype == "bool" else f"booleans, expected {dtype}"
    return f"{dt} values, expected {dtype}"


def table_problems(frame, declared: dict[str, str] | None = None,
                   required: tuple[str, ...] = REQUIRED) -> list[str]:
    """Problems of a table read from a run directory, one line each (empty: fine): ``required``
    columns absent, values of a declared column not of its dtype (``declared``: name → dtype; by
    default every column of :mod:`harness.core.schema`), identity counts below 1, ``params`` not a
    JSON object."""
    declared = declared if declared is not None else {c.name: c.dtype for c in schema.COLUMNS}
    problems = [f"column {c}: missing" for c in required if c not in frame.columns]
    problems += [f"column {c}: a row without a value (required)"
                 for c in required if c in frame.columns and frame[c].isna().any()]
    for col in frame.columns:
        if not isinstance(col, str):
            problems.append(f"column {col!r}: not a name")
        elif col in declared and (p := column_problem(frame[col], declared[col])) is not None:
            problems.append(f"column {col}: {p}")
    if problems:
        return problems
    import numpy as np

    for col in (c for c in _COUNTS if c in frame.columns and c in declared):
        if (np.nan_to_num(frame[col].to_numpy(dtype=float, na_value=np.nan), nan=1.0) < 1).any():
            problems.append(f"column {col}: a value below 1")
    if "params" in frame.columns and declared.get("params") == "string":
        for p in set(frame["params"].tolist()):
            if is_missing(p):
                continue
            try:
                ok = isinstance(json.loads(p), dict) if p else True
            except (ValueError, RecursionError):
                ok = False
            if not ok:
                problems.append(f"column params: {str(p)[:60]!r} is not a JSON object")
                break
    return problems
