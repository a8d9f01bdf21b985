"""Numbers with sensible units, for tables and legends."""

from __future__ import annotations

import math


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


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
