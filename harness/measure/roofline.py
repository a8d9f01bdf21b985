"""The roofline columns of a row: pure arithmetic on its shape, FLOPs and this machine's calibration.

* ``min_bytes``: the least memory traffic of the call: inputs read once and outputs
  written once (fwd: q, k, v read, o written; bwd and fwd_bwd: q, k, v, o, dO and
  dq, dk, dv, o counted once each — 4·|q| + 4·|k|).
* ``arith_intensity = flops / min_bytes`` (analytic FLOPs per byte).
* ``kv_bytes``: the K/V cache a call must read (the real tokens of every sequence), and with the
  median time ``achieved_bandwidth`` (bytes/s) and ``pct_of_bandwidth`` against the measured copy
  bandwidth; ``tokens_per_s`` (query tokens per second) for inference-shaped cases.
  Variable-length and non-square cases count real tokens in ``min_bytes`` too.
* ``pct_of_peak = 100 · achieved FLOP/s / measured matmul peak`` (best sample) of the
  row's dtype and device, and ``attainable_tflops_per_s = min(peak, arith_intensity ·
  bandwidth)``, the roofline at the row's intensity.

The calibration (the measured peaks) comes from :mod:`harness.measure.calibrate`; this module
needs no torch, so it runs on every row cheaply and on rows read back from a results file.
"""

from __future__ import annotations

import math
from typing import Any

from harness.core import schema
from harness.core.cases import DTYPE_BYTES, Case
from harness.core.lengths import case_lengths
from harness.core.units import finite

#: The ceilings rows are compared with: the best sample of each calibration measurement. Load from
#: other processes only ever slows a GEMM or a copy down, so the fastest sample is the better
#: estimate of what the hardware can do (the medians are kept in the cache too).
PEAK_KEY, BANDWIDTH_KEY = "tflops_per_s_best", "gb_per_s_best"

#: The columns :func:`row_roofline` fills (the schema's ``roofline`` group, less the analytic ones).
ANALYTIC_COLUMNS = ("min_bytes", "arith_intensity", "kv_bytes")
ROOFLINE_COLUMNS = tuple(c for c in schema.names("roofline") if c not in ANALYTIC_COLUMNS)


def _get(x: Any, name: str) -> Any:
    return x[name] if isinstance(x, dict) else getattr(x, name)


def min_bytes(x: Case | dict[str, Any], mode: str | None = None) -> float:
    """Least bytes a call must move: inputs read once, outputs written once (see module doc).

    ``mode`` overrides the case's own (``"fwd"``: the bytes of q, k, v and the output, what any
    call of the case touches at least)."""
    h, hkv, d = (_get(x, n) for n in ("heads", "kv_heads", "head_dim"))
    e = DTYPE_BYTES[_get(x, "dtype")]
    q_tokens, kv_tokens = _tokens(x)
    q = q_tokens * h * d
    kv = kv_tokens * hkv * d
    if (mode or _get(x, "mode")) == "fwd":
        elements = q + 2 * kv + q  # q, k, v read; o written
    else:
        elements = 4 * q + 4 * kv  # q, k, v, o, dO read (o written, fwd_bwd); dq, dk, dv written
    return float(elements * e)


def _tokens(x: Case | dict[str, Any]) -> tuple[int, int]:
    """(query tokens, key/value tokens) of all the batch's sequences."""
    q_lens, kv_lens = case_lengths(x)
    return sum(q_lens), sum(kv_lens)


def kv_bytes(x: Case | dict[str, Any]) -> float:
    """Bytes of the K and V cache one forward call must read: every sequence's real tokens."""
    return float(2 * _tokens(x)[1] * _get(x, "kv_heads") * _get(x, "head_dim") * DTYPE_BYTES[_get(x, "dtype")])


def _inference_shaped(row: dict[str, Any]) -> bool:
    q_len = row.get("q_len")
    return (q_len is not None and q_len == q_len) or row.get("kv_layout", "contiguous") not in (None, "contiguous") \
        or row.get("lengths", "fixed") not in (None, "fixed")


def rate_columns(row: dict[str, Any], bandwidth_gb_per_s: float = math.nan) -> dict[str, float]:
    """``achieved_bandwidth`` (kv_bytes over the median time), ``pct_of_bandwidth`` against the copy
    bandwidth, and ``tokens_per_s`` (inference-shaped rows), from a timed row."""
    seconds = row.get("time_ms", math.nan) / 1e3
    if not (finite(seconds) and seconds > 0):
        return {"achieved_bandwidth": math.nan, "pct_of_bandwidth": math.nan, "tokens_per_s": math.nan}
    nbytes = row.get("kv_bytes", math.nan)
    achieved = (nbytes if finite(nbytes) else kv_bytes(row)) / seconds
    tokens = _tokens(row)[0] / seconds if _inference_shaped(row) else math.nan
    pct = 100.0 * achieved / (bandwidth_gb_per_s * 1e9) if finite(bandwidth_gb_per_s) and bandwidth_gb_per_s else math.nan
    return {"achieved_bandwidth": achieved, "pct_of_bandwidth": pct, "tokens_per_s": tokens}


def arith_intensity(flops: float, nbytes: float) -> float:
    """FLOPs per byte (NaN when either is unknown or the bytes are zero)."""
    if not (nbytes and finite(nbytes) and finite(flops)):
        return math.nan
    return flops / nbytes


def analytic_columns(row: dict[str, Any]) -> dict[str, float]:
    """``min_bytes`` and ``arith_intensity`` of a row that has its shape, mode and ``flops``."""
    nbytes = min_bytes(row)
    return {"min_bytes": nbytes, "arith_intensity": arith_intensity(row.get("flops", math.nan), nbytes),
            "kv_bytes": kv_bytes(row)}


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


def row_roofline(row: dict[str, Any], calibration: dict[str, Any] | None) -> dict[str, Any]:
    """Roofline columns of a finished row (needs ``device, dtype, threads, flops, tflops_per_s``
    and the shape). NaN with ``roofline_note`` where the calibration does not cover the row."""
    out: dict[str, Any] = schema.missing("roofline")
    for name in ANALYTIC_COLUMNS:
        del out[name]
    out["roofline_note"] = ""
    out.update(rate_columns(row))
    entry, note = lookup(calibration, row["device"], row.get("threads"))
    if entry is None:
        out["roofline_note"] = note
        return out
    peak = (entry.get("matmul", {}).get(row["dtype"]) or {}).get(PEAK_KEY, math.nan)
    bandwidth = (entry.get("bandwidth") or {}).get(BANDWIDTH_KEY, math.nan)
    out["peak_tflops_per_s"] = peak
    out["peak_gb_per_s"] = bandwidth
    out.update(rate_columns(row, bandwidth))
    out["pct_of_peak"] = pct_of_peak(row.get("tflops_per_s", math.nan), peak)
    intensity = row.get("arith_intensity")
    if not finite(intensity):
        intensity = arith_intensity(row.get("flops", math.nan), min_bytes(row))
    out["attainable_tflops_per_s"] = attainable_tflops(intensity, peak, bandwidth)
    if not finite(peak):
        out["roofline_note"] = f"no matmul peak measured for {row['dtype']}"
    elif entry.get("quick"):
        out["roofline_note"] = "calibrated with --quick (small sizes): peaks are underestimated"
    return out
