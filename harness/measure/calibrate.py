"""This machine's ceilings, the roofline columns of a row, and the timing cross-check.

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
(:data:`PEAK_KEY`), since load from other processes only ever slows a GEMM down.

CPU figures depend on the thread count, so CPU entries are kept per thread count
(``cpu/threads=N``); a row is only compared with an entry of its own thread count.
Float32 CUDA GEMMs run with PyTorch's current TF32 setting, which is recorded.

Per row (:func:`analytic_columns`, :func:`row_roofline`):

* ``min_bytes``: the least memory traffic of the call: inputs read once and outputs
  written once (fwd: q, k, v read, o written; bwd and fwd_bwd: q, k, v, o, dO and
  dq, dk, dv, o counted once each — 4·|q| + 4·|k|).
* ``arith_intensity = flops / min_bytes`` (analytic FLOPs per byte).
* ``pct_of_peak = 100 · achieved FLOP/s / measured matmul peak`` (best sample) of the
  row's dtype and device, and ``attainable_tflops_per_s = min(peak, arith_intensity ·
  bandwidth)``, the roofline at the row's intensity.

``bench calibrate --check`` is the cross-check benchmark: the same SDPA cases timed
in one process, interleaved, by the harness's :func:`harness.measure.timing.time_call`, by
``torch.utils.benchmark.Timer.blocked_autorange`` and (CUDA) by
``triton.testing.do_bench``, several runs each (rounds interleave the methods, each
round starting with the next one); it prints the medians, their ratios and each
method's within-run spread (IQR / median) and run-to-run spread ((max − min) /
median of the runs' medians).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from harness.core.cases import DTYPE_BYTES, DTYPES, Case
from harness.measure.timing import TimingConfig, time_call

CALIBRATION_DIR = Path("results") / "calibration"
SCHEMA_VERSION = 1

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CalibrationError(Exception):
    """A calibration cannot be measured or read (one line)."""


# ---------------------------------------------------------------------------------------------
# Analytic bytes and intensity


def _get(x: Any, name: str) -> Any:
    return x[name] if isinstance(x, dict) else getattr(x, name)


def min_bytes(x: Case | dict[str, Any]) -> float:
    """Least bytes a call must move: inputs read once, outputs written once (see module doc)."""
    b, h, hkv, length, d = (_get(x, n) for n in ("batch", "heads", "kv_heads", "seq_len", "head_dim"))
    e = DTYPE_BYTES[_get(x, "dtype")]
    q = b * h * length * d
    kv = b * hkv * length * d
    if _get(x, "mode") == "fwd":
        elements = q + 2 * kv + q  # q, k, v read; o written
    else:
        elements = 4 * q + 4 * kv  # q, k, v, o, dO read (o written, fwd_bwd); dq, dk, dv written
    return float(elements * e)


def arith_intensity(flops: float, nbytes: float) -> float:
    """FLOPs per byte (NaN when either is unknown or the bytes are zero)."""
    if not (nbytes and math.isfinite(nbytes) and flops is not None and math.isfinite(flops)):
        return math.nan
    return flops / nbytes


def analytic_columns(row: dict[str, Any]) -> dict[str, float]:
    """``min_bytes`` and ``arith_intensity`` of a row that has its shape, mode and ``flops``."""
    nbytes = min_bytes(row)
    return {"min_bytes": nbytes, "arith_intensity": arith_intensity(row.get("flops", math.nan), nbytes)}


# ---------------------------------------------------------------------------------------------
# Cache


def entry_key(device: str, threads: int | None = None) -> str:
    if device.startswith("cuda"):
        return "cuda"
    return f"cpu/threads={threads if threads is not None else torch.get_num_threads()}"


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


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


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
    tdtype = _TORCH_DTYPES[dtype]
    if max_n is None:
        max_n = 16384 if device.startswith("cuda") else 4096
    sync = _sync(device)
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
        mm = dict(max_n=512, min_time_s=0.05, max_time_s=0.3)
        bw = dict(nbytes=16 * 2**20, min_time_s=0.05, max_time_s=0.3)
    else:
        mm, bw = {}, {}
    entry: dict[str, Any] = {
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


# ---------------------------------------------------------------------------------------------
# Roofline columns of a row


#: The ceilings rows are compared with: the best sample of each calibration measurement. Load from
#: other processes only ever slows a GEMM or a copy down, so the fastest sample is the better
#: estimate of what the hardware can do (the medians are kept in the cache too).
PEAK_KEY, BANDWIDTH_KEY = "tflops_per_s_best", "gb_per_s_best"

ROOFLINE_COLUMNS = ("peak_tflops_per_s", "peak_gb_per_s", "pct_of_peak", "attainable_tflops_per_s", "roofline_note")


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


def row_roofline(row: dict[str, Any], calibration: dict[str, Any] | None) -> dict[str, Any]:
    """Roofline columns of a finished row (needs ``device, dtype, threads, flops, tflops_per_s``
    and the shape). NaN with ``roofline_note`` where the calibration does not cover the row."""
    out: dict[str, Any] = {c: math.nan for c in ROOFLINE_COLUMNS}
    out["roofline_note"] = ""
    entry, note = lookup(calibration, row["device"], row.get("threads"))
    if entry is None:
        out["roofline_note"] = note
        return out
    peak = (entry.get("matmul", {}).get(row["dtype"]) or {}).get(PEAK_KEY, math.nan)
    bandwidth = (entry.get("bandwidth") or {}).get(BANDWIDTH_KEY, math.nan)
    out["peak_tflops_per_s"] = peak
    out["peak_gb_per_s"] = bandwidth
    achieved = row.get("tflops_per_s", math.nan)
    if achieved is not None and math.isfinite(achieved) and peak and math.isfinite(peak):
        out["pct_of_peak"] = 100.0 * achieved / peak
    intensity = row.get("arith_intensity")
    if intensity is None or not math.isfinite(intensity):
        intensity = arith_intensity(row.get("flops", math.nan), min_bytes(row))
    if math.isfinite(intensity) and math.isfinite(bandwidth) and math.isfinite(peak):
        out["attainable_tflops_per_s"] = min(peak, intensity * bandwidth / 1e3)
    if not math.isfinite(peak):
        out["roofline_note"] = f"no matmul peak measured for {row['dtype']}"
    elif entry.get("quick"):
        out["roofline_note"] = "calibrated with --quick (small sizes): peaks are underestimated"
    return out


# ---------------------------------------------------------------------------------------------
# Cross-check


def _sdpa_call(q, k, v, causal: bool):
    import torch.nn.functional as F

    gqa = k.shape[1] != q.shape[1]

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return call


def _rel_iqr(times: list[float]) -> float:
    q25, q50, q75 = np.percentile(np.asarray(times, dtype=float), [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else math.nan


def cross_check(
    cases: list[Case], runs: int = 3, min_time_s: float = 1.0, max_time_s: float | None = None, seed: int = 0,
    log=None,
) -> list[dict[str, Any]]:
    """Time each SDPA case with every available method, ``runs`` times, interleaved; one record per
    (case, method): median of the run medians, within-run relative IQR, run-to-run spread.

    The harness runs with its default TimingConfig except ``min_time_s`` (the same
    minimum time ``blocked_autorange`` and ``do_bench`` get) and, if given, ``max_time_s``."""
    from harness.measure.inputs import make_qkv
    from harness.measure.timing import input_set_count

    records = []
    for case in cases:
        q, k, v = make_qkv(case, seed=seed)
        fn = _sdpa_call(q, k, v, case.causal)
        sets = input_set_count(int(min_bytes(case)), case.device, TimingConfig())
        rotated = [fn] + [_sdpa_call(q.clone(), k.clone(), v.clone(), case.causal) for _ in range(sets - 1)]
        methods: dict[str, Callable[[], tuple[float, list[float]]]] = {}

        def harness(calls, config):
            def go():
                t = time_call(calls, config, device=case.device)
                return t.median_s, t.samples_s

            return go

        budget = {"max_time_s": max(max_time_s, min_time_s)} if max_time_s else {}
        methods["harness"] = harness(rotated, TimingConfig(min_time_s=min_time_s, **budget))
        if sets > 1:
            methods["harness (1 input set)"] = harness(
                [fn], TimingConfig(min_time_s=min_time_s, rotate_inputs=False, **budget)
            )

        def timer():
            from torch.utils.benchmark import Timer

            m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
                min_run_time=min_time_s
            )
            return m.median, list(m.times)

        methods["torch Timer.blocked_autorange"] = timer
        if case.device.startswith("cuda"):
            try:
                import triton.testing

                def do_bench():
                    times_ms = triton.testing.do_bench(fn, rep=int(min_time_s * 1000), return_mode="all")
                    return statistics.median(times_ms) / 1e3, [t / 1e3 for t in times_ms]

                methods["triton do_bench"] = do_bench
            except Exception as exc:  # Triton missing: say so in the output
                records.append({"case": case.label(), "method": "triton do_bench", "skipped": f"{exc}"})
        results: dict[str, list[tuple[float, list[float]]]] = {m: [] for m in methods}
        names = list(methods)
        for r in range(runs):
            # interleaved, and each round starts with another method, so that no method always
            # runs first (or right after the same neighbour) while the machine's load drifts
            for name in names[r % len(names):] + names[:r % len(names)]:
                go = methods[name]
                if log:
                    log(f"  {case.label()}: run {r + 1}/{runs}: {name}")
                results[name].append(go())
        ref = statistics.median(m for m, _ in results["torch Timer.blocked_autorange"])
        for name, runs_ in results.items():
            medians = [m for m, _ in runs_]
            med = statistics.median(medians)
            records.append({
                "case": case.label(),
                "method": name,
                "median_ms": med * 1e3,
                "ratio_to_timer": med / ref,
                "within_run_iqr_rel": statistics.median(_rel_iqr(s) for _, s in runs_),
                "run_to_run_rel": (max(medians) - min(medians)) / med,
                "samples_per_run": statistics.median(len(s) for _, s in runs_),
                "input_sets": sets if name == "harness" else 1,
                "run_medians_ms": [m * 1e3 for m in medians],
            })
    return records


def format_cross_check(records: list[dict[str, Any]]) -> str:
    lines = []
    header = (f"{'method':32} {'median ms':>10} {'÷ Timer':>8} {'IQR/med':>8} {'run-to-run':>10} "
              f"{'samples':>8} {'sets':>5}  run medians ms")
    case = None
    for r in records:
        if r["case"] != case:
            case = r["case"]
            lines += ["", case, header]
        if "skipped" in r:
            lines.append(f"{r['method']:32} skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['method']:32} {r['median_ms']:10.3f} {r['ratio_to_timer']:8.3f} {100 * r['within_run_iqr_rel']:7.2f}% "
            f"{100 * r['run_to_run_rel']:9.2f}% {r['samples_per_run']:8.0f} {r['input_sets']:5d}  "
            + " ".join(f"{m:.4g}" for m in r["run_medians_ms"])
        )
    verdicts = []
    by_case: dict[str, dict[str, dict]] = {}
    for r in records:
        if "skipped" not in r:
            by_case.setdefault(r["case"], {})[r["method"]] = r
    for case, methods in by_case.items():
        h = methods.get("harness (1 input set)") or methods["harness"]
        t = methods["torch Timer.blocked_autorange"]
        agree = abs(h["ratio_to_timer"] - 1) <= 0.05
        tighter = h["run_to_run_rel"] <= t["run_to_run_rel"]
        verdicts.append(
            f"{case}: same-inputs harness/Timer median ratio {h['ratio_to_timer']:.3f} "
            f"({'within' if agree else 'OUTSIDE'} 5%); run-to-run spread harness {100 * h['run_to_run_rel']:.2f}% "
            f"vs Timer {100 * t['run_to_run_rel']:.2f}% ({'no larger' if tighter else 'LARGER'})"
        )
    return "\n".join(lines + [""] + verdicts)


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
