"""Verdicts: what counts as a change between two runs of a case, and the thresholds that decide it.

The one rule, used by :mod:`harness.regression.compare` (stored samples) and
:mod:`harness.regression.confirm` (interleaved re-runs):

* time: ``regressed`` (``improved``) needs both a significant adjusted p-value
  (q < alpha) and a change beyond the threshold: ratio >= 1 + t (ratio <= 1 / (1 + t);
  thresholds are symmetric in log space). ``unchanged`` is a claim too, and needs its own
  evidence: the confidence interval of the ratio must lie inside the band
  [1 / (1 + t), 1 + t] (an equivalence test, as TOST). Anything else — an interval that straddles
  the threshold, or no interval at all (too few samples) — is ``inconclusive``, with the interval
  ("×0.97–×1.21"): the measurement could not decide, and says so. A case contended on either side
  (other processes took its cores: harness.measure.contention) is ``inconclusive (contended)``
  whatever its figures; an unstable one (its processes disagreed) needs its whole interval beyond
  the threshold to be ``regressed``/``improved``, else (outside the band) it is
  ``inconclusive (unstable)``;
* memory: peak memory is one deterministic measurement per case, so it has no samples to
  test: a change beyond the memory threshold, and of at least ``MEMORY_FLOOR_BYTES``, decides;
* accuracy: an exact variant whose error against the float64 reference (``rel_err``,
  ``grad_rel_err``) grows by more than its dtype's tolerance is ``regressed`` whatever its speed;
* overall: ``regressed`` if any part regressed, else ``inconclusive`` if the time was, else
  ``improved`` if any improved, else ``unchanged``;
* status: a case that errors now and did not before is ``now failing``, the reverse ``now
  passing``; measured in one run only and skipped (or absent) in the other, ``missing`` or
  ``new``; measured in neither, ``not compared``.

Thresholds come from, in order: the command line; the ``[compare]`` table of NEW's suite
(stored in run.json); that of BASE's suite; the defaults. The table's keys, defaults and
checks are declared once in :data:`harness.core.config.COMPARE`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.core import units
from harness.core.config import COMPARE
from harness.core.units import finite
from harness.engine.store import StoreError

#: Verdicts, most severe first (the order of the terminal table).
VERDICTS = ("now failing", "regressed", "missing", "new", "now passing", "inconclusive", "improved", "unchanged",
            "not compared")
#: Why a time verdict is inconclusive: the interval straddles the threshold (or there is none), a side
#: was contended, a side was unstable.
DOUBTS = ("interval", "contended", "unstable")
SEVERITY = {v: i for i, v in enumerate(VERDICTS)}
#: Statuses that mean the case was attempted and failed (``incorrect``: it ran, and gave a wrong answer).
FAILED = ("error", "crash", "cuda_error", "timeout", "oom", "incorrect")

DEFAULT_TIME_THRESHOLD: float = COMPARE["time_threshold"].default
DEFAULT_MEMORY_THRESHOLD: float = COMPARE["memory_threshold"].default
DEFAULT_ALPHA: float = COMPARE["alpha"].default
#: Largest growth of an exact variant's relative error that is not a regression, by dtype.
ACCURACY_TOLERANCE: dict[str, float] = dict(COMPARE["accuracy_tolerance"].default)
#: A memory change smaller than this is never a regression, whatever the ratio (tiny cases).
MEMORY_FLOOR_BYTES = 4096
#: The result columns whose growth is an accuracy regression of an exact variant.
ACCURACY_COLUMNS = ("rel_err", "grad_rel_err")


class CompareError(StoreError):
    """Bad comparison input (one line; the CLI exits 2)."""


# --------------------------------------------------------------------------------------------
# thresholds


@dataclass
class Thresholds:
    time: float = DEFAULT_TIME_THRESHOLD
    memory: float = DEFAULT_MEMORY_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    accuracy: dict[str, float] = field(default_factory=lambda: dict(ACCURACY_TOLERANCE))
    #: where each value came from ("default", "command line", "suite nightly-cpu (NEW)", ...)
    sources: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "time_threshold": self.time,
            "memory_threshold": self.memory,
            "alpha": self.alpha,
            "accuracy_tolerance": dict(self.accuracy),
            "sources": dict(self.sources),
        }


def validate_compare_table(table: Any) -> list[tuple[str | None, str]]:
    """Problems of a ``[compare]`` table, as ``(key, message)`` pairs (empty: fine); the checks of
    :data:`harness.core.config.COMPARE`, which a suite file passed when it was loaded."""
    return COMPARE.check(table)[1]


def _suite_compare_table(meta: dict[str, Any]) -> dict[str, Any]:
    definition = ((meta.get("suite") or {}).get("definition")) or {}
    table = definition.get("compare")
    return table if isinstance(table, dict) else {}


def resolve_thresholds(
    base_meta: dict[str, Any],
    new_meta: dict[str, Any],
    time: float | None = None,
    memory: float | None = None,
    alpha: float | None = None,
) -> Thresholds:
    """Thresholds for a comparison: command line, then NEW's suite, then BASE's, then defaults."""
    t = Thresholds(sources={"time_threshold": "default", "memory_threshold": "default", "alpha": "default"})
    for side, meta in (("BASE", base_meta), ("NEW", new_meta)):  # NEW applied last: it wins
        table = _suite_compare_table(meta)
        if not table:
            continue
        name = (meta.get("suite") or {}).get("name", "?")
        problems = validate_compare_table(table)
        if problems:
            key, message = problems[0]
            raise CompareError(f"suite {name} ({side}) [compare] {key or ''}: {message}")
        where = f"suite {name} ({side})"
        if "time_threshold" in table:
            t.time, t.sources["time_threshold"] = float(table["time_threshold"]), where
        if "memory_threshold" in table:
            t.memory, t.sources["memory_threshold"] = float(table["memory_threshold"]), where
        if "alpha" in table:
            t.alpha, t.sources["alpha"] = float(table["alpha"]), where
        for dtype, tol in (table.get("accuracy_tolerance") or {}).items():
            t.accuracy[dtype] = float(tol)
            t.sources[f"accuracy_tolerance.{dtype}"] = where
    given = (("time_threshold", time, "time"), ("memory_threshold", memory, "memory"), ("alpha", alpha, "alpha"))
    for key, value, attr in given:
        if value is not None:
            if not 0 < value < 1:
                raise CompareError(f"--{key.replace('_', '-')}: expected a fraction between 0 and 1, got {value}")
            setattr(t, attr, float(value))
            t.sources[key] = "command line"
    return t


# --------------------------------------------------------------------------------------------
# the rule


def time_verdict(ratio: float, q: float, th: Thresholds, ci_low: float = math.nan, ci_high: float = math.nan,
                 contended: bool = False, unstable: bool = False) -> tuple[str, str]:
    """(verdict, doubt): ``regressed``/``improved`` when q < alpha and the ratio is beyond the threshold
    (an unstable case: its whole interval beyond it); ``unchanged`` when the interval of the ratio lies
    inside the threshold band; else ``inconclusive`` with why (:data:`DOUBTS`). Contended: inconclusive."""
    up, down = 1 + th.time, 1 / (1 + th.time)
    if contended:
        return "inconclusive", "contended"
    significant = finite(q) and q < th.alpha
    interval = finite(ci_low) and finite(ci_high)
    if finite(ratio) and significant and ratio >= up and (not unstable or (interval and ci_low >= up)):
        return "regressed", ""
    if finite(ratio) and significant and ratio <= down and (not unstable or (interval and ci_high <= down)):
        return "improved", ""
    if interval and down <= ci_low and ci_high <= up:
        return "unchanged", ""
    return "inconclusive", "unstable" if unstable else "interval"


def interval_text(lo: float, hi: float) -> str:
    """``×0.97–×1.21`` (or ``no interval``: too few samples)."""
    return f"×{lo:.3g}–×{hi:.3g}" if finite(lo) and finite(hi) else "no interval (too few samples)"


def _flag(row: dict[str, Any] | None, column: str, value: bool) -> bool:
    """Whether ``row`` holds exactly ``value`` in the boolean ``column`` (empty or absent: no)."""
    v = (row or {}).get(column)
    return v is not None and v == v and bool(v) is value


def verdict_text(verdict: str, doubt: str = "") -> str:
    """A verdict as people read it: ``inconclusive (contended)``, ``inconclusive (unstable)``, else as is."""
    return f"{verdict} ({doubt})" if verdict == "inconclusive" and doubt in ("contended", "unstable") else verdict


def memory_verdict(ratio: float, base_bytes: float, new_bytes: float, th: Thresholds) -> str:
    """``regressed``/``improved`` beyond the memory threshold and ``MEMORY_FLOOR_BYTES``; ``""`` unmeasured."""
    big = finite(base_bytes) and finite(new_bytes) and abs(float(new_bytes) - float(base_bytes)) >= MEMORY_FLOOR_BYTES
    if finite(ratio) and big and ratio >= 1 + th.memory:
        return "regressed"
    if finite(ratio) and big and ratio <= 1 / (1 + th.memory):
        return "improved"
    return "unchanged" if finite(ratio) else ""


def accuracy_problems(base: dict[str, Any], new: dict[str, Any], tolerance: dict[str, float]) -> list[str]:
    """How an exact variant's errors grew beyond its dtype's tolerance (empty: they did not)."""
    tol = tolerance.get(str(new.get("dtype")), ACCURACY_TOLERANCE["float32"])
    problems = []
    for col in ACCURACY_COLUMNS:
        b: Any = base.get(col)  # a number, NaN or None: finite() tells
        x: Any = new.get(col)
        if finite(b) and not finite(x) and x is not None:
            problems.append(f"{col} is now {x} (was {units.error(b)})")
        elif finite(b) and finite(x) and float(x) - float(b) > tol:
            problems.append(f"{col} {units.error(b)} → {units.error(x)} (tolerance +{tol:g} for {new.get('dtype')})")
    return problems


def overall_verdict(parts: Iterable[str]) -> str:
    """A measured case's verdict from its time, memory and accuracy verdicts."""
    parts = tuple(parts)
    for verdict in ("regressed", "inconclusive", "improved"):
        if verdict in parts:
            return verdict
    return "unchanged"


def status_verdict(base_status: str | None, new_status: str | None) -> tuple[str, str] | None:
    """(verdict, note) of a case that was not measured ok on both sides (None status: not in
    that run); None when it was, and the measurements decide."""
    bs, ns = base_status, new_status
    if bs is None:
        return "new", "only in NEW" + ("" if ns == "ok" else f" ({ns})")
    if ns is None:
        return "missing", "only in BASE" + ("" if bs == "ok" else f" ({bs})")
    if ns in FAILED and bs not in FAILED:
        return "now failing", f"{bs} → {ns}"
    if bs in FAILED and ns == "ok":
        return "now passing", f"{bs} → ok"
    if bs == "ok" and ns != "ok":
        return "missing", f"{ns} in NEW"
    if bs != "ok" and ns == "ok":
        return "new", f"{bs} in BASE"
    if bs != "ok" or ns != "ok":
        return "not compared", f"{bs} in BASE, {ns} in NEW"
    return None


def decide(rec: dict[str, Any], th: Thresholds, accuracy: list[str] | None = None) -> dict[str, str]:
    """The verdicts of one comparison row (time, memory, accuracy, overall) and a one-line note.

    ``rec`` holds ``base_status``, ``new_status``, ``time_ratio``, ``q_value``, ``ci_low``,
    ``ci_high``, ``mem_ratio``, ``base_mem_bytes``, ``new_mem_bytes`` and ``exact``;
    ``accuracy`` is :func:`accuracy_problems` of the case's two rows."""
    out = {"time_verdict": "", "memory_verdict": "", "accuracy_verdict": "", "verdict": "", "note": "", "doubt": ""}
    by_status = status_verdict(rec["base_status"], rec["new_status"])
    if by_status is not None:
        out["verdict"], out["note"] = by_status
        return out

    notes = []
    ratio, q = rec["time_ratio"], rec["q_value"]
    lo, hi = rec["ci_low"], rec["ci_high"]
    contended = [side for side in ("base", "new") if rec.get(f"{side}_contended")]
    unstable = [side for side in ("base", "new") if rec.get(f"{side}_unstable")]
    out["time_verdict"], out["doubt"] = time_verdict(ratio, q, th, lo, hi, bool(contended), bool(unstable))
    if out["time_verdict"] in ("regressed", "improved"):
        notes.append(f"time {units.change(ratio)}")
    elif out["time_verdict"] == "inconclusive":
        sides = " and ".join(s.upper() for s in (contended or unstable))
        why = {"contended": f"{sides} contended by other processes", "unstable": f"{sides} unstable",
               "interval": "the interval straddles the threshold" if finite(lo) else "too few samples to test"}
        notes.append(f"time {units.change(ratio)} {interval_text(lo, hi)}: {why[out['doubt']]}")
    if finite(ratio) and finite(lo) and finite(hi) and not lo <= ratio <= hi:
        # the interval is for a uniform shift of the whole distribution; medians moving
        # differently means the shape changed (e.g. a second mode): worth a look either way
        notes.append("distribution changed shape (median ratio outside the shift interval)")
    mr = rec["mem_ratio"]
    out["memory_verdict"] = memory_verdict(mr, rec["base_mem_bytes"], rec["new_mem_bytes"], th)
    if out["memory_verdict"] in ("regressed", "improved"):
        notes.append(f"memory {units.change(mr)}")
    if rec.get("exact"):  # accuracy: exact variants only
        problems = accuracy or []
        out["accuracy_verdict"] = "regressed" if problems else "unchanged"
        notes.extend(f"accuracy: {p}" for p in problems)
    out["verdict"] = overall_verdict((out["time_verdict"], out["memory_verdict"], out["accuracy_verdict"]))
    out["note"] = "; ".join(notes)
    return out
