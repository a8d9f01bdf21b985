"""This machine's ceilings: matmul peak and copy bandwidth, measured once and cached.

``bench calibrate`` measures, once per machine (``environment.capture()["machine"]
["fingerprint"]``) and cached in ``results/calibration/<fingerprint>.json``:

* **matmul peak** per dtype and device: a large square GEMM ``C = A·B`` through
  ``torch.matmul`` (``out=`` preallocated), ``2·n³`` FLOPs per call; n doubles from
  512 until a call takes 20 ms (the fastest of three; or a size limit: 4096 on CPU,
  16384 on CUDA), so the figure is the plateau a large GEMM reaches, not a small
  one's overheads.
* **memory bandwidth** per device: ``dst.copy_(src)`` of a buffer far larger than
  the last-level cache (CPU: max(256 MiB, 8·LLC); CUDA: max(1 GiB, 8·L2)), counting
  bytes read + written (2·size, STREAM's "copy" convention; write-allocate traffic
  is not counted).

Both are timed by :func:`harness.measure.timing.time_call` (adaptive, ±1% target); the cache
keeps the median and the best sample of each, and rows are compared with the best
(:data:`harness.measure.roofline.PEAK_KEY`), since load from other processes only ever slows a
GEMM down.

CPU figures depend on the thread count, so CPU entries are kept per thread count
(``cpu/threads=N``); a row is only compared with an entry of its own thread count.
Float32 CUDA GEMMs run with PyTorch's current TF32 setting, which is recorded.

The roofline columns of a row are computed from the cache by :mod:`harness.measure.roofline`;
``bench calibrate --check`` (the timing cross-check) is :mod:`harness.measure.crosscheck`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from harness.core.cases import DTYPES
from harness.measure import roofline
from harness.measure.inputs import TORCH_DTYPES
from harness.measure.timing import TimingConfig, synchronizer, time_call

CALIBRATION_DIR = Path("results") / "calibration"
SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Cache


def entry_key(device: str, threads: int | None = None) -> str:
    """The cache entry of ``device`` (CPU: at ``threads``, default torch's current thread count)."""
    return roofline.entry_key(device, threads if threads is not None else torch.get_num_threads())


def cache_path(fingerprint: str, root: Path | None = None) -> Path:
    return Path(root if root is not None else CALIBRATION_DIR) / f"{fingerprint}.json"


@lru_cache(maxsize=1)
def current_fingerprint() -> str:
    """This machine's fingerprint (``environment.capture()["machine"]["fingerprint"]``)."""
    from harness.measure.environment import machine

    return machine()["fingerprint"]


def load(fingerprint: str | None = None, root: Path | None = None) -> dict[str, Any] | None:
    """The cached calibration of this machine (or of ``fingerprint``); None when there is none
    or it cannot be read (a damaged file is treated as missing, never raised)."""
    path = cache_path(fingerprint or current_fingerprint(), root)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or not isinstance(
        data.get("entries"), dict
    ):
        return None
    return data


@lru_cache(maxsize=8)
def cached(root: Path | None = None) -> dict[str, Any] | None:
    """This machine's calibration, read once per process (for the runner's rows)."""
    return load(None, root)


def save(calibration: dict[str, Any], root: Path | None = None) -> Path:
    path = cache_path(calibration["fingerprint"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(calibration, indent=2))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Measurements


def _measure_config(min_time_s: float, max_time_s: float) -> TimingConfig:
    return TimingConfig(
        warmup=3, min_time_s=min_time_s, max_time_s=max_time_s, min_reps=5, max_reps=500,
        target_precision=0.01, rotate_inputs=False, flush_l2=False,
    )


def measure_matmul(
    device: str, dtype: str, *, max_n: int | None = None, target_call_s: float = 0.02,
    min_time_s: float = 1.0, max_time_s: float = 3.0, seed: int = 0,
) -> dict[str, Any]:
    """Matmul throughput of a large square GEMM (see module doc)."""
    tdtype = TORCH_DTYPES[dtype]
    if max_n is None:
        max_n = 16384 if device.startswith("cuda") else 4096
    sync = synchronizer(device)
    g = torch.Generator().manual_seed(seed)
    n = min(512, max_n)
    while True:
        a = torch.randn(n, n, generator=g).to(device=device, dtype=tdtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=tdtype)
        c = torch.empty(n, n, device=device, dtype=tdtype)
        torch.matmul(a, b, out=c)  # first call: library initialisation
        sync()
        one = math.inf
        for _ in range(3):  # the fastest of three, so that one slow call on a busy machine does not stop the search
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            sync()
            one = min(one, time.perf_counter() - t0)
        if one >= target_call_s or n * 2 > max_n:
            break
        del a, b, c
        n *= 2
    timing = time_call(lambda: torch.matmul(a, b, out=c), _measure_config(min_time_s, max_time_s), device=device)
    flops = 2.0 * n**3
    result = {
        "n": n,
        "tflops_per_s": flops / timing.median_s / 1e12,
        "tflops_per_s_best": flops / timing.stats["min"] / 1e12,
        "time_ms": timing.median_s * 1e3,
        "time_ci_rel": timing.precision if math.isfinite(timing.precision) else None,
        "reps": len(timing.samples_s),
    }
    if device.startswith("cuda") and dtype == "float32":
        result["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return result


def measure_bandwidth(
    device: str, *, nbytes: int | None = None, min_time_s: float = 1.0, max_time_s: float = 3.0, seed: int = 0
) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) of a buffer far larger than the caches."""
    if nbytes is None:
        if device.startswith("cuda"):
            l2 = torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
            nbytes = max(2**30, 8 * l2)
        else:
            from harness.measure.environment import llc_bytes

            nbytes = max(256 * 2**20, 8 * (llc_bytes() or 0))
    numel = nbytes // 4
    src = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), _measure_config(min_time_s, max_time_s), device=device)
    moved = 2.0 * numel * 4
    return {
        "bytes": numel * 4,
        "gb_per_s": moved / timing.median_s / 1e9,
        "gb_per_s_best": moved / timing.stats["min"] / 1e9,
        "time_ms": timing.median_s * 1e3,
        "time_ci_rel": timing.precision if math.isfinite(timing.precision) else None,
        "reps": len(timing.samples_s),
    }


def measure_device(device: str, dtypes: Iterable[str] = DTYPES, quick: bool = False, log=None) -> dict[str, Any]:
    """One calibration entry: matmul peak per dtype and copy bandwidth of ``device``."""
    if quick:
        mm: dict[str, Any] = dict(max_n=512, min_time_s=0.05, max_time_s=0.3)
        bw: dict[str, Any] = dict(nbytes=16 * 2**20, min_time_s=0.05, max_time_s=0.3)
    else:
        mm, bw = {}, {}
    entry: dict[str, Any] = {
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "quick": quick,
        "matmul": {},
    }
    if device.startswith("cuda"):
        entry["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for dtype in dtypes:
        if log:
            log(f"  matmul {dtype} on {device} ...")
        entry["matmul"][dtype] = measure_matmul(device, dtype, **mm)
    if log:
        log(f"  copy bandwidth on {device} ...")
    entry["bandwidth"] = measure_bandwidth(device, **bw)
    return entry


def calibrate(
    devices: Iterable[str] = ("cpu",),
    dtypes: Iterable[str] = DTYPES,
    *,
    force: bool = False,
    quick: bool = False,
    root: Path | None = None,
    fingerprint: str | None = None,
    measure: Callable[..., dict[str, Any]] = measure_device,
    log=None,
) -> tuple[dict[str, Any], list[str]]:
    """Measure the entries this machine's cache lacks (all with ``force``); returns (calibration,
    keys measured now). ``measure(device, dtypes, quick=, log=)`` is injectable for tests."""
    dtypes = list(dtypes)
    fp = fingerprint or current_fingerprint()
    calibration = load(fp, root) or {"schema_version": SCHEMA_VERSION, "fingerprint": fp, "entries": {}}
    measured = []
    for device in devices:
        key = entry_key(device)
        have = calibration["entries"].get(key)
        if not force and have and all(d in have.get("matmul", {}) for d in dtypes) and "bandwidth" in have:
            continue
        calibration["entries"][key] = measure(device, dtypes, quick=quick, log=log)
        measured.append(key)
    if measured:
        save(calibration, root)
    return calibration, measured


def format_calibration(calibration: dict[str, Any], path: Path | None = None) -> str:
    lines = [f"machine fingerprint {calibration['fingerprint']}" + (f" ({path})" if path else "")]
    for key, entry in calibration["entries"].items():
        note = " [quick]" if entry.get("quick") else ""
        lines.append(f"{key}{note} measured {entry.get('measured_at', '?')} with torch {entry.get('torch', '?')}")
        for dtype, m in entry.get("matmul", {}).items():
            ci = m.get("time_ci_rel")
            lines.append(
                f"  matmul {dtype:9} n={m['n']:5d}: {m['tflops_per_s'] * 1e3:9.1f} GFLOP/s median "
                f"({m['tflops_per_s_best'] * 1e3:.1f} best; {m['reps']} reps, CI ±{100 * ci:.1f}%)"
                if ci is not None else
                f"  matmul {dtype:9} n={m['n']:5d}: {m['tflops_per_s'] * 1e3:9.1f} GFLOP/s median"
            )
        bw = entry.get("bandwidth")
        if bw:
            lines.append(
                f"  copy {bw['bytes'] / 2**20:.0f} MiB: {bw['gb_per_s']:.1f} GB/s read+written median "
                f"({bw['gb_per_s_best']:.1f} best; {bw['reps']} reps)"
            )
    return "\n".join(lines)
