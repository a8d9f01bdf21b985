"""Measurements in, row out: the one place a result row's derived columns are computed.

A worker process measures a case and returns what it measured for its process (a *round*: its
samples and its own statistics of them, peak memory, counted FLOPs, errors, raw telemetry, the
other processes' use of the machine while it sampled, the variant's declared facts such as its
analytic ``flops`` and ``min_bytes``, and the machine's ceilings from its calibration). The parent
turns all of a case's rounds into its final row with :func:`final_row`: the processes' times
combined (:func:`harness.measure.stability.combine`), their contention combined and judged
(:func:`harness.measure.contention.combine`: a contended case is not stable), then every derived
column computed once from that combined time by :func:`derive`. Reading a stored
run (report, compare, history, site, export) applies :func:`derive` again (:func:`rederive`), so
every run, old or new, reads consistent: a rate column always agrees with its row's own time.

The derived columns, each a small named formula (:data:`FORMULAS`; the schema marks them
``derived``, :data:`harness.core.schema.DERIVED`):

* ``arith_intensity = flops / min_bytes``
* ``tflops_per_s = flops / time_ms``
* ``flops_counted_ratio = flops_counted / flops``; ``useful_fraction = useful_flops / flops``
* ``tokens_per_s = query tokens / time_ms`` (inference-shaped rows; decode: batch · q_len)
* ``achieved_bandwidth = kv_bytes / time_ms``; ``pct_of_bandwidth = 100 · achieved / peak_gb_per_s``
* ``pct_of_peak = 100 · tflops_per_s / peak_tflops_per_s``
* ``attainable_tflops_per_s = min(peak_tflops_per_s, arith_intensity · peak_gb_per_s)``
* ``tokens_per_joule = batch · query length / energy_j``

Pure: numbers in, numbers out (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from harness.core import schema
from harness.core.cases import is_missing
from harness.measure import contention, roofline
from harness.measure.stability import combine


def _num(row: Mapping[str, Any], name: str) -> float:
    """A column as a float; NaN when absent, empty or not a number."""
    value = row.get(name)
    if value is None or is_missing(value) or isinstance(value, (str, bool)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def _seconds(row: Mapping[str, Any]) -> float:
    s = _num(row, "time_ms") / 1e3
    return s if s > 0 else math.nan


def _fact(row: Mapping[str, Any], name: str, formula: Callable[[Mapping[str, Any]], float]) -> float:
    """A declared fact of the row (``min_bytes``, ``kv_bytes``), or its formula when an older row lacks it."""
    value = _num(row, name)
    if math.isfinite(value):
        return value
    try:
        return formula(row)
    except Exception:  # a row too damaged to have a shape (a received run): no figure
        return math.nan


def arith_intensity(r):
    return roofline.arith_intensity(_num(r, "flops"), _fact(r, "min_bytes", roofline.min_bytes))


def tflops_per_s(r):
    return _ratio(_num(r, "flops"), _seconds(r)) / 1e12


def flops_counted_ratio(r):
    return _ratio(_num(r, "flops_counted"), _num(r, "flops"))


def useful_fraction(r):
    return _ratio(_num(r, "useful_flops"), _num(r, "flops"))


def tokens_per_s(r):
    if not roofline.inference_shaped(r):
        return math.nan
    try:
        tokens = roofline.query_tokens(r)
    except Exception:
        return math.nan
    return _ratio(tokens, _seconds(r))


def achieved_bandwidth(r):
    return _ratio(_fact(r, "kv_bytes", roofline.kv_bytes), _seconds(r))


def pct_of_bandwidth(r):
    return 100.0 * _ratio(achieved_bandwidth(r), _num(r, "peak_gb_per_s") * 1e9)


def pct_of_peak(r):
    return roofline.pct_of_peak(tflops_per_s(r), _num(r, "peak_tflops_per_s"))


def attainable_tflops_per_s(r):
    return roofline.attainable_tflops(arith_intensity(r), _num(r, "peak_tflops_per_s"), _num(r, "peak_gb_per_s"))


def tokens_per_joule(r):
    try:  # the real query tokens (a variable-length or serving batch: per sequence)
        tokens = roofline.query_tokens(r)
    except Exception:
        q_len = _num(r, "q_len")
        tokens = _num(r, "batch") * (q_len if math.isfinite(q_len) else _num(r, "seq_len"))
    energy = _num(r, "energy_j")
    return _ratio(tokens, energy) if energy > 0 else math.nan


#: Every derived column and its formula (a function of the row), in the schema's order.
FORMULAS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    name: globals()[name] for name in schema.DERIVED
}


def derive(row: Mapping[str, Any]) -> dict[str, float]:
    """Every derived column of ``row`` from its measured ones (NaN where an input is missing)."""
    return {name: float(formula(row)) for name, formula in FORMULAS.items()}


def final_row(rounds: Sequence[Mapping[str, Any]], samples_ms: Sequence[Sequence[float]],
              confidence: float = 0.95) -> dict[str, Any]:
    """A case's final row from its processes' rounds (``rounds[0]`` ran it fully; later ones only
    timed it) and their samples in ms: round 0's measurements, the processes' times combined, and
    every derived column from the combined time. Rounds without samples (a case that never timed)
    give round 0 as it is, derived columns empty."""
    row = dict(rounds[0])
    timed = [(r, s) for r, s in zip(rounds, samples_ms) if len(s)]
    if timed:
        row.update(combine([r for r, _ in timed], [s for _, s in timed], confidence))
        row.update(contention.combine([r for r, _ in timed]))
        if row.get("contended"):  # another process's time is in the samples: not the machine's time
            row["stable"] = False
            row["stability_note"] = "; ".join(x for x in (f"contended: {row['contention_note']}",
                                                          row.get("stability_note")) if x)
    row.update(derive(row))
    return row


def rederive(frame):
    """A stored run's table with its derived columns recomputed from its measured ones (pandas frame
    in, new frame out), so that an old run (or one whose columns disagree) reads consistent."""
    if frame.empty:
        return frame
    records = frame.to_dict("records")
    out = frame.copy()
    values = [derive(r) for r in records]
    for name in FORMULAS:
        out[name] = [v[name] for v in values]
    return out
