"""The roofline's pure arithmetic: a case's bytes, and the machine's ceilings from its calibration.

* ``min_bytes``: the least memory traffic of the call: inputs read once and outputs
  written once (fwd: q, k, v read, o written; bwd and fwd_bwd: q, k, v, o, dO and
  dq, dk, dv, o counted once each — 4·|q| + 4·|k|). Variable-length and non-square cases
  count real tokens.
* ``kv_bytes``: the K/V cache a call must read (the real tokens of every sequence; a shared prefix once).
* the machine's figures a worker records beside what it measured (:func:`machine_columns`):
  ``peak_tflops_per_s``, the measured matmul peak (best sample) of the row's dtype and device,
  ``peak_gb_per_s``, the copy bandwidth, and ``roofline_note`` when the calibration does not
  cover the row.

The columns computed from these and the time (``arith_intensity``, ``pct_of_peak``,
``attainable_tflops_per_s``, ``achieved_bandwidth``, ``pct_of_bandwidth``, ``tokens_per_s``)
are derived in one place, :mod:`harness.measure.derive`, with the formulas here. The calibration
comes from :mod:`harness.measure.calibrate`; this module needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.core.cases import DTYPE_BYTES, Case, is_missing
from harness.core.lengths import case_lengths
from harness.core.units import finite

#: The ceilings rows are compared with: the best sample of each calibration measurement. Load from
#: other processes only ever slows a GEMM or a copy down, so the fastest sample is the better
#: estimate of what the hardware can do (the medians are kept in the cache too).
PEAK_KEY, BANDWIDTH_KEY = "tflops_per_s_best", "gb_per_s_best"


def _get(x: Any, name: str) -> Any:
    return x[name] if isinstance(x, Mapping) else getattr(x, name)


def min_bytes(x: Case | Mapping[str, Any], mode: str | None = None) -> float:
    """Least bytes a call must move: inputs read once, outputs written once (see module doc).

    ``mode`` overrides the case's own (``"fwd"``: the bytes of q, k, v and the output, what any
    call of the case touches at least)."""
    h, hkv, d, dv = _get(x, "heads"), _get(x, "kv_heads"), _get(x, "head_dim"), _value_dim(x)
    e = DTYPE_BYTES[_get(x, "dtype")]
    q_tokens, kv_tokens = _tokens(x)
    q, o = q_tokens * h * d, q_tokens * h * dv
    kv = kv_tokens * hkv * (d + dv)
    if (mode or _get(x, "mode")) == "fwd":
        elements = q + kv + o  # q, k, v read; o written
    else:
        elements = 2 * (q + kv + o)  # q, k, v, o, dO read (o written, fwd_bwd); dq, dk, dv written
    return float(elements * e)


def _tokens(x: Case | Mapping[str, Any]) -> tuple[int, int]:
    """(query tokens, key/value tokens) of all the batch's sequences; a prefix the sequences share
    (``shared_prefix``) counts once."""
    q_lens, kv_lens = case_lengths(x)
    prefix = x.get("shared_prefix") if isinstance(x, Mapping) else getattr(x, "shared_prefix", None)
    shared = 0 if is_missing(prefix) or not prefix else int(prefix) * (len(kv_lens) - 1)
    return sum(q_lens), sum(kv_lens) - shared


def _value_dim(x: Case | Mapping[str, Any]) -> int:
    """Head size of v (``v_head_dim``; empty, absent or at its default: ``head_dim``)."""
    dv = x.get("v_head_dim") if isinstance(x, Mapping) else getattr(x, "v_head_dim", None)
    return _get(x, "head_dim") if dv is None or dv != dv else int(dv)


def kv_bytes(x: Case | Mapping[str, Any]) -> float:
    """Bytes of the K and V cache one forward call must read: every sequence's real tokens."""
    return float(_tokens(x)[1] * _get(x, "kv_heads") * (_get(x, "head_dim") + _value_dim(x))
                 * DTYPE_BYTES[_get(x, "dtype")])


def query_tokens(x: Case | Mapping[str, Any]) -> int:
    """Query tokens of all the batch's sequences (the real ones of a variable-length batch)."""
    return _tokens(x)[0]


def inference_shaped(row: Mapping[str, Any]) -> bool:
    """A result row with queries and keys of different lengths, a paged cache or variable lengths
    (an empty or absent column: its default)."""
    q_len = row.get("q_len")
    layout = row.get("kv_layout")
    lens = row.get("lengths")
    return not is_missing(q_len) or layout not in (None, "contiguous") or lens not in (None, "fixed")


def arith_intensity(flops: float, nbytes: float) -> float:
    """FLOPs per byte (NaN when either is unknown or the bytes are zero)."""
    if not (nbytes and finite(nbytes) and finite(flops)):
        return math.nan
    return flops / nbytes


def fact_columns(row: Mapping[str, Any]) -> dict[str, float]:
    """``min_bytes`` and ``kv_bytes`` of a row that has its shape and mode: what a call must move (a
    variant may declare its own, as attention layers do, through its ``columns``)."""
    return {"min_bytes": min_bytes(row), "kv_bytes": kv_bytes(row)}


def entry_key(device: str, threads: int | None) -> str:
    """The calibration entry of a device (CPU figures are kept per thread count)."""
    if device.startswith("cuda"):
        return "cuda"
    return f"cpu/threads={threads}"


def lookup(calibration: dict[str, Any] | None, device: str, threads: int | None) -> tuple[dict | None, str]:
    """(entry, "") for a row's device and thread count, or (None, why not)."""
    if not calibration:
        return None, "no calibration for this machine (run `bench calibrate`)"
    key = entry_key(device, threads)
    entry = calibration.get("entries", {}).get(key)
    if entry is not None:
        return entry, ""
    others = [k for k in calibration.get("entries", {}) if k.split("/")[0] == key.split("/")[0]]
    if others:
        return None, f"calibrated for {', '.join(others)}, not {key} (run `bench calibrate` with that thread count)"
    return None, f"no calibration of {key} on this machine (run `bench calibrate`)"


def pct_of_peak(achieved_tflops: float, peak_tflops: float) -> float:
    """Achieved FLOP/s as a percentage of the peak (NaN when either is unknown or the peak is 0)."""
    if finite(achieved_tflops) and finite(peak_tflops) and peak_tflops:
        return 100.0 * achieved_tflops / peak_tflops
    return math.nan


def attainable_tflops(intensity: float, peak_tflops: float, bandwidth_gb_per_s: float) -> float:
    """The roofline at ``intensity`` FLOP/byte: min(peak, intensity · bandwidth), in TFLOP/s."""
    if finite(intensity) and finite(bandwidth_gb_per_s) and finite(peak_tflops):
        return min(peak_tflops, intensity * bandwidth_gb_per_s / 1e3)
    return math.nan


def machine_columns(device: str, dtype: str, threads: int | None, calibration: dict[str, Any] | None) -> dict[str, Any]:
    """The machine's ceilings for a row of ``device``, ``dtype`` and ``threads``, as the process that
    measured it found them in its calibration: ``peak_tflops_per_s``, ``peak_gb_per_s`` (NaN where not
    calibrated) and ``roofline_note`` (why they are missing or approximate; "" when neither)."""
    out: dict[str, Any] = {"peak_tflops_per_s": math.nan, "peak_gb_per_s": math.nan, "roofline_note": ""}
    entry, note = lookup(calibration, device, threads)
    if entry is None:
        out["roofline_note"] = note
        return out
    out["peak_tflops_per_s"] = (entry.get("matmul", {}).get(dtype) or {}).get(PEAK_KEY, math.nan)
    out["peak_gb_per_s"] = (entry.get("bandwidth") or {}).get(BANDWIDTH_KEY, math.nan)
    if not finite(out["peak_tflops_per_s"]):
        out["roofline_note"] = f"no matmul peak measured for {dtype}"
    elif entry.get("quick"):
        out["roofline_note"] = "calibrated with --quick (small sizes): peaks are underestimated"
    return out
