"""Change-point detection on a benchmark's history: where did the time step up or down?

The method is PELT (Killick, Fearnhead & Eckley 2012, "Optimal detection of
changepoints with a linear computational cost"): it finds the segmentation of a
series that minimises the sum of the segments' costs plus a penalty per change
point, exactly, pruning candidate segment starts that can never be optimal.

Choices, as in asv's step detection (which also minimises a penalised L1 cost):

* The series is taken in log space, so a step is a ratio (``+12%``) whatever the
  case's scale, and noise that is proportional to the time is homoscedastic.
* The cost of a segment is the sum of absolute deviations from its median (L1),
  so one disturbed run (an outlier) costs little and does not open a segment.
  This cost is superadditive (splitting a segment never raises its cost), which
  is what PELT's pruning needs.
* The cost is measured in units of the series' noise ``sigma``, estimated robustly
  from successive differences (a step changes only one difference, so steps do
  not inflate the estimate): ``sigma = 1.4826 * MAD(diff) / sqrt(2)``. The penalty
  per change point is then ``penalty * log(n)`` (default ``penalty = 3``, a
  BIC-like growth with n), calibrated so that pure noise, Gaussian or heavy-tailed,
  almost never yields a step (the tests check both).
* A step smaller than ``min_step`` (relative, default 5%) is of no interest even
  when real: such change points are removed (the segments around them merged)
  until every remaining step is at least that large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.core.cases import label as case_label

#: Relative noise floor: with quantised or constant series sigma is at least this (0.1%).
SIGMA_FLOOR = 1e-3


@dataclass(frozen=True)
class Step:
    """A change point: the series moves from ``before`` to ``after`` at position ``index``."""

    index: int  # first position of the new level
    before: float  # median of the segment before (original units)
    after: float  # median of the segment after
    #: after / before (> 1: slower)
    ratio: float

    @property
    def change(self) -> float:
        """Relative change, e.g. 0.12 for 12% higher."""
        return self.ratio - 1.0


def robust_sigma(y: np.ndarray) -> float:
    """Noise level of ``y`` from its successive differences (insensitive to a few steps)."""
    if len(y) < 3:
        return SIGMA_FLOOR
    d = np.diff(y)
    mad = np.median(np.abs(d - np.median(d)))
    return max(1.4826 * mad / math.sqrt(2), SIGMA_FLOOR)


def l1_cost_matrix(y: np.ndarray, min_size: int = 1) -> np.ndarray:
    """``C[s, t]``: sum of absolute deviations of ``y[s:t]`` from its median (NaN when t - s < min_size).

    Computed one segment length at a time over sliding windows, O(n^3) element
    operations in O(n) vectorised steps: well under a second for a few hundred runs.
    """
    n = len(y)
    cost = np.full((n + 1, n + 1), np.nan)
    for length in range(max(min_size, 1), n + 1):
        windows = np.lib.stride_tricks.sliding_window_view(y, length)
        med = np.median(windows, axis=1)
        starts = np.arange(n - length + 1)
        cost[starts, starts + length] = np.abs(windows - med[:, None]).sum(axis=1)
    return cost


def pelt(y: np.ndarray, penalty: float, min_size: int = 2) -> list[int]:
    """Optimal change points of ``y`` under the L1 cost plus ``penalty`` per change (PELT).

    Returns the first index of each new segment, in increasing order. Segments are
    at least ``min_size`` long.
    """
    y = np.asarray(y, dtype=float)
    n = len(y)
    if n < 2 * min_size:
        return []
    best = np.full(n + 1, np.inf)  # best[t]: optimal cost of y[:t]
    best[0] = -penalty
    last = np.zeros(n + 1, dtype=int)  # last[t]: start of the final segment in that optimum
    cost = l1_cost_matrix(y, min_size)
    candidates = [0]
    for t in range(min_size, n + 1):
        usable = np.array([s for s in candidates if t - s >= min_size], dtype=int)
        if len(usable):
            costs = best[usable] + cost[usable, t] + penalty
            i = int(np.argmin(costs))
            best[t], last[t] = costs[i], usable[i]
            # prune: a start whose cost already exceeds the optimum can never win later
            keep = set(usable[costs - penalty <= best[t]].tolist())
            candidates = [s for s in candidates if s in keep or t - s < min_size]
        candidates.append(t - min_size + 1)
    cps = []
    t = n
    while t > 0:
        s = last[t]
        if s > 0:
            cps.append(s)
        t = s
    return sorted(cps)


def _steps(values: np.ndarray, cps: list[int]) -> list[Step]:
    bounds = [0, *cps, len(values)]
    medians = [float(np.median(values[a:b])) for a, b in zip(bounds, bounds[1:])]
    return [
        Step(index=cp, before=medians[i], after=medians[i + 1], ratio=medians[i + 1] / medians[i])
        for i, cp in enumerate(cps)
    ]


def detect_steps(
    values,
    *,
    penalty: float = 3.0,
    min_size: int = 2,
    min_step: float = 0.05,
    sigma: float | None = None,
) -> list[Step]:
    """Steps in a series of positive values (e.g. median times of successive runs), in order.

    ``penalty`` scales the per-change-point penalty ``penalty * log(n)`` (in units of
    the noise); ``min_size`` is the shortest segment; steps below ``min_step``
    (relative) are merged away. ``sigma`` (noise of log values) is estimated when
    not given. Non-finite or non-positive values must be removed by the caller.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError("detect_steps takes a one-dimensional series")
    if len(values) and (not np.all(np.isfinite(values)) or np.any(values <= 0)):
        raise ValueError("detect_steps needs positive, finite values")
    n = len(values)
    if n < 2 * min_size:
        return []
    logs = np.log(values)
    s = sigma if sigma is not None else robust_sigma(logs)
    cps = pelt(logs / s, penalty * math.log(n), min_size)
    # merge away steps below min_step, the smallest first, until all remaining are large enough
    while cps:
        steps = _steps(values, cps)
        sizes = [abs(math.log(st.ratio)) for st in steps]
        i = int(np.argmin(sizes))
        if sizes[i] >= math.log1p(min_step):
            return steps
        cps.pop(i)
    return []


# --------------------------------------------------------------------------------------------
# trends over the run history


def case_trends(rows, runs, *, min_step: float = 0.05, penalty: float = 3.0, min_size: int = 2) -> list[dict]:
    """Per case of a history table (:func:`harness.regression.history.load_history`): its series and steps.

    Each entry: ``case_id``, ``label``, ``points`` (one per run where the case was measured:
    ``run_index, run_id, commit, started, time_ms, time_ms_p10, time_ms_p90``) and ``steps``
    (``index`` into points, ``run_id`` and ``commit`` of the first run at the new level,
    ``before``, ``after``, ``ratio``). Cases with steps come first, largest step first.
    """
    if rows is None or len(rows) == 0:
        return []
    ok = rows[(rows["status"] == "ok") & rows["time_ms"].notna() & (rows["time_ms"] > 0)]
    trends = []
    for case_id, group in ok.groupby("case_id", sort=False):
        group = group.sort_values("run_index")
        first = group.iloc[-1].to_dict()
        points = [
            {
                "run_index": int(r["run_index"]),
                "run_id": r["run_id"],
                "commit": r["commit"][:10] if isinstance(r.get("commit"), str) and r["commit"] else None,
                "started": r.get("started"),
                "time_ms": float(r["time_ms"]),
                "time_ms_p10": float(r.get("time_ms_p10", float("nan"))),
                "time_ms_p90": float(r.get("time_ms_p90", float("nan"))),
            }
            for r in group.to_dict("records")
        ]
        steps = detect_steps([p["time_ms"] for p in points], penalty=penalty, min_size=min_size, min_step=min_step)
        trends.append({
            "case_id": case_id,
            "label": case_label(first),
            "points": points,
            "steps": [
                {
                    "index": st.index,
                    "run_id": points[st.index]["run_id"],
                    "commit": points[st.index]["commit"],
                    "before": st.before,
                    "after": st.after,
                    "ratio": st.ratio,
                }
                for st in steps
            ],
        })
    trends.sort(key=lambda t: (-max((abs(math.log(s["ratio"])) for s in t["steps"]), default=0.0), t["label"]))
    return trends
