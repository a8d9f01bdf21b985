"""``bench calibrate --check``: the harness's timings cross-checked against other timers.

The same SDPA cases timed in one process, interleaved, by the harness's
:func:`harness.measure.timing.time_call`, by ``torch.utils.benchmark.Timer.blocked_autorange``
and (CUDA) by ``triton.testing.do_bench``, several runs each (rounds interleave the methods,
each round starting with the next one); it prints the medians, their ratios and each method's
within-run spread (IQR / median) and run-to-run spread ((max − min) / median of the runs' medians).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import numpy as np
import torch

from harness.core.cases import Case
from harness.measure.inputs import make_qkv
from harness.measure.roofline import min_bytes
from harness.measure.timing import TimingConfig, input_set_count, time_call


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
