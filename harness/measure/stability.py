"""A case timed in several fresh worker processes: its combined time, and whether the processes agree.

A run times each case in ``processes`` = N fresh worker processes, one round each
(:func:`harness.engine.lifecycle.run_cases`), so that what changes from one process to the next
(where the allocator puts the large temporaries, where the threads land, the machine's drift)
shows as a difference between processes instead of hiding inside one process's samples.
:func:`combine` turns the N per-process results into the case's row:

* ``time_ms``: the median of the per-process medians (each process one vote, as asv does);
  ``time_ms_p10``/``p90``, ``time_ms_ci_low``/``high`` and ``time_ci_rel`` over the pooled samples
  of all processes; ``reps``: all samples (the rate columns follow from that ``time_ms``:
  :mod:`harness.measure.derive`);
* ``processes``, ``time_ms_process_min``/``max`` (smallest and largest per-process median) and
  ``time_process_spread`` ((max − min) / ``time_ms``; empty with one process, which cannot show it);
* ``stable``: with two processes or more, false when the processes' intervals of the median
  do not all overlap (:func:`stability`); empty with one process. ``stability_note`` says why.

A process's interval is its 95% confidence interval of the median (distribution-free, computed
by :mod:`harness.measure.timing` from its own samples), widened to at least ±``FLOOR`` (2.5%) of
its median, so that differences too small to matter to anyone are never called unstable; when
the process took too few samples for that interval (fewer than 6) the range of its samples is
used instead (for n samples it covers the median with probability 1 − 2^(1−n)).

Pure: numbers in, numbers out (numpy and :mod:`harness.core.stats`; no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.core.stats import median_ci
from harness.core.units import duration_ms

#: A process's interval of the median is widened to at least ± this fraction of its median.
FLOOR = 0.025
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class ProcessTime:
    """One process's timing of a case (ms): its index, median, and widened interval of the median."""

    process: int
    median: float
    low: float
    high: float


def process_time(process: int, samples_ms: Sequence[float], ci_low: float | None = None,
                 ci_high: float | None = None) -> ProcessTime:
    """The :class:`ProcessTime` of one process's samples (ms); ``ci_low``/``ci_high``: its interval of
    the median when the timing module computed one (NaN or None: the samples' range is used)."""
    a = np.asarray(samples_ms, dtype=float)
    med = float(np.median(a))
    lo, hi = ci_low, ci_high
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = float(a.min()), float(a.max())
    return ProcessTime(process, med, min(lo, med * (1 - FLOOR)), max(hi, med * (1 + FLOOR)))


def modes(times: Sequence[ProcessTime]) -> list[list[ProcessTime]]:
    """The processes grouped into modes: sorted by median, split wherever two consecutive
    processes' intervals do not overlap."""
    ordered = sorted(times, key=lambda t: t.median)
    groups: list[list[ProcessTime]] = []
    for t in ordered:
        if groups and t.low <= max(g.high for g in groups[-1]):
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _ms(ms: float) -> str:
    """A time at 3 significant digits (rounded first: 0.9996 ms is "1 ms", not "1e+03 µs")."""
    return duration_ms(float(f"{ms:.3g}"))


def _processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


def stability(times: Sequence[ProcessTime]) -> tuple[bool | None, str]:
    """(stable, note): None with fewer than two processes; False when the processes' intervals do
    not all overlap (max of the lower ends above min of the upper ends), with a note naming the
    modes, e.g. "two modes: 8.4 ms (2 processes) and 41.4 ms (1 process)"."""
    if len(times) < 2:
        return None, ""
    if max(t.low for t in times) <= min(t.high for t in times):
        return True, ""
    groups = modes(times)
    if len(groups) == 1:  # a chain of overlapping intervals whose ends do not overlap: a drift
        meds = [t.median for t in times]
        return False, (f"the medians drift from {_ms(min(meds))} to {_ms(max(meds))} "
                       f"across {_processes(len(times))}; their intervals do not all overlap")
    parts = [f"{_ms(float(np.median([t.median for t in g])))} ({_processes(len(g))})" for g in groups]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    return False, f"{_COUNT_WORDS.get(len(groups), len(groups))} modes: {listed}"


def combine(rows: Sequence[Mapping[str, Any]], samples_ms: Sequence[Sequence[float]],
            confidence: float = 0.95) -> dict[str, Any]:
    """The ``time`` and ``stability`` columns of a case timed by ``len(rows)`` processes: ``rows[i]``
    is process i's row (its ``time_ms_ci_low``/``high`` are used), ``samples_ms[i]`` its samples in ms.
    Every process must have samples."""
    times = [process_time(i, s, row.get("time_ms_ci_low"), row.get("time_ms_ci_high"))
             for i, (row, s) in enumerate(zip(rows, samples_ms))]
    medians = [t.median for t in times]
    time_ms = float(np.median(medians))
    pooled = np.concatenate([np.asarray(s, dtype=float) for s in samples_ms])
    lo, hi = median_ci(pooled, confidence)
    p10, p90 = np.percentile(pooled, [10, 90])
    stable, note = stability(times)
    out: dict[str, Any] = {
        "time_ms": time_ms,
        "time_ms_p10": float(p10),
        "time_ms_p90": float(p90),
        "reps": int(pooled.size),
        "time_ms_ci_low": lo,
        "time_ms_ci_high": hi,
        "time_ci_rel": max(time_ms - lo, hi - time_ms) / time_ms if math.isfinite(lo) and time_ms > 0 else math.nan,
        "processes": len(times),
        "time_ms_process_min": min(medians),
        "time_ms_process_max": max(medians),
        "time_process_spread": (max(medians) - min(medians)) / time_ms if len(times) > 1 and time_ms > 0 else math.nan,
        "stable": stable,
        "stability_note": note,
    }
    return out
