"""Numbers with sensible units, for tables and legends."""

from __future__ import annotations

import math

from harness.core.cases import is_missing as _missing


def duration_ms(ms) -> str:
    if _missing(ms):
        return ""
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1000:.3g} µs"


def size_bytes(b) -> str:
    if _missing(b):
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def rate_tflops(t) -> str:
    if _missing(t):
        return ""
    if t >= 1:
        return f"{t:.3g} TFLOP/s"
    return f"{t * 1e3:.3g} GFLOP/s"


def error(e) -> str:
    return "" if _missing(e) else f"{e:.2e}"


def count(n) -> str:
    if _missing(n):
        return ""
    return f"{n:.3g}" if isinstance(n, float) and n >= 1e4 else str(int(n)) if float(n).is_integer() else f"{n:.3g}"


def percent(p) -> str:
    """A percentage already in percent units (``pct_of_peak``): '42.3 %'."""
    if _missing(p):
        return ""
    return f"{p:.3g} %" if abs(p) < 100 else f"{p:.0f} %"


def ratio(r, better: str = "faster", worse: str = "slower") -> str:
    """A ratio where above 1 is good: '3.2× faster', '1.5× slower', 'same'."""
    if _missing(r) or r <= 0:
        return ""
    if abs(r - 1) < 0.005:
        return "same"
    return f"{r:.3g}× {better}" if r > 1 else f"{1 / r:.3g}× {worse}"


def change(r) -> str:
    """A ratio NEW/BASE as a signed relative change: 1.3 → '+30.0%', 0.75 → '-25.0%'; '' when not finite."""
    return f"{(float(r) - 1) * 100:+.1f}%" if finite(r) else ""


def flop_count(f) -> str:
    """FLOPs with an SI prefix: '1.07 GFLOP'."""
    if _missing(f):
        return ""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.0f} FLOP"


def ci_percent(rel) -> str:
    """A relative half-width (0.012) as '±1.2 %'; '±270 %' when wide."""
    if _missing(rel):
        return ""
    pct = rel * 100
    return f"±{pct:.2g} %" if pct < 100 else f"±{pct:.0f} %"


def finite(x) -> bool:
    """A real, finite number (not None, NaN or ±inf; numpy and torch scalars included)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
