"""``bench calibrate --check``: the harness's timings cross-checked against other timers.

The same SDPA cases timed in one process, interleaved, by the harness's
:func:`harness.measure.timing.time_call` and by independent timers, several runs each (rounds
interleave the methods, each round starting with the next one); it prints the medians, their
ratio to the method each is judged against, and each method's within-run spread (IQR / median)
and run-to-run spread ((max − min) / median of the runs' medians).

What the harness is judged against depends on the device, because the two must measure the same
thing:

* **CPU**: ``torch.utils.benchmark.Timer.blocked_autorange`` (the harness with one input set,
  the same inputs the Timer reuses), goal ±5%.
* **CUDA**: the harness flushes L2 before every sample, so it is judged against
  ``triton.testing.do_bench``, which does too (``Timer`` runs back to back with a warm L2 and is
  shown only for information); the harness replaying a CUDA graph without the flush is judged
  against ``triton.testing.do_bench_cudagraph``, which does the same. Goal ±3%. Without Triton the
  CUDA harness falls back to the Timer, and the output says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import torch

from harness.core.cases import Case
from harness.measure.inputs import make_qkv
from harness.measure.roofline import min_bytes
from harness.measure.timing import TimingConfig, input_set_count, time_call

TIMER = "torch Timer.blocked_autorange"
DO_BENCH = "triton do_bench"
DO_BENCH_GRAPH = "triton do_bench_cudagraph"
#: How far the judged median ratio may be from 1, per device.
GOALS = {"cpu": 0.05, "cuda": 0.03}


class Budget(TypedDict, total=False):
    """The TimingConfig keywords that bound the harness's sampling in a cross-check (none: its defaults)."""

    max_time_s: float


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


def _harness(calls, config: TimingConfig, device: str):
    def go():
        t = time_call(calls, config, device=device)
        return t.median_s, t.samples_s

    return go


def _timer(fn):
    def go():
        from torch.utils.benchmark import Timer

        m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=go.min_time_s
        )
        return m.median, list(m.times)

    return go


def _triton(bench, fn, min_time_s: float):
    def go():
        times_ms = bench(fn, rep=max(1, int(min_time_s * 1000)), return_mode="all")
        return statistics.median(times_ms) / 1e3, [t / 1e3 for t in times_ms]

    return go


def timing_methods(case: Case, fn, rotated: list, min_time_s: float, budget: Budget):
    """(methods, judged, skipped) for one case: name -> callable giving (median s, samples s);
    judged: harness method name -> the method it is judged against; skipped: (name, why)."""
    methods: dict[str, Callable[[], tuple[float, list[float]]]] = {}
    judged: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    cuda = case.device.startswith("cuda")
    methods["harness"] = _harness(rotated, TimingConfig(min_time_s=min_time_s, **budget), case.device)
    if len(rotated) > 1:
        methods["harness (1 input set)"] = _harness(
            [fn], TimingConfig(min_time_s=min_time_s, rotate_inputs=False, **budget), case.device)
    timer = _timer(fn)
    timer.min_time_s = min_time_s
    methods[TIMER] = timer
    same_inputs = "harness (1 input set)" if "harness (1 input set)" in methods else "harness"
    if not cuda:
        judged[same_inputs] = TIMER
        return methods, judged, skipped
    try:
        import triton.testing as tt
    except Exception as exc:  # Triton missing: the Timer judges, and the output says why
        skipped.append((DO_BENCH, f"{type(exc).__name__}: {exc}"))
        judged[same_inputs] = TIMER
        return methods, judged, skipped
    methods["harness (cuda_graph)"] = _harness(
        [fn], TimingConfig(min_time_s=min_time_s, cuda_graph=True, flush_l2=False, rotate_inputs=False, **budget),
        case.device)
    methods[DO_BENCH] = _triton(tt.do_bench, fn, min_time_s)
    methods[DO_BENCH_GRAPH] = _triton(tt.do_bench_cudagraph, fn, min_time_s)
    judged.update({same_inputs: DO_BENCH, "harness (cuda_graph)": DO_BENCH_GRAPH})
    return methods, judged, skipped


def cross_check(
    cases: list[Case], runs: int = 3, min_time_s: float = 1.0, max_time_s: float | None = None, seed: int = 0,
    log=None, make_inputs=make_qkv,
) -> list[dict[str, Any]]:
    """Time each SDPA case with every available method, ``runs`` times, interleaved; one record per
    (case, method): median of the run medians, ratio to the method it is compared with
    (``reference``; ``judged`` marks the harness's ratios that are the verdict), within-run relative
    IQR, run-to-run spread.

    The harness runs with its default TimingConfig except ``min_time_s`` (the same minimum time
    the other timers get) and, if given, ``max_time_s``."""
    records = []
    for case in cases:
        q, k, v = make_inputs(case, seed=seed)
        fn = _sdpa_call(q, k, v, case.causal)
        sets = input_set_count(int(min_bytes(case)), case.device, TimingConfig())
        rotated = [fn] + [_sdpa_call(q.clone(), k.clone(), v.clone(), case.causal) for _ in range(sets - 1)]
        budget: Budget = {"max_time_s": max(max_time_s, min_time_s)} if max_time_s else {}
        methods, judged, skipped = timing_methods(case, fn, rotated, min_time_s, budget)
        records += [{"case": case.label(), "method": name, "skipped": why} for name, why in skipped]
        results: dict[str, list[tuple[float, list[float]]]] = {m: [] for m in methods}
        names = list(methods)
        for r in range(runs):
            # interleaved, and each round starts with another method, so that no method always
            # runs first (or right after the same neighbour) while the machine's load drifts
            for name in names[r % len(names):] + names[:r % len(names)]:
                if log:
                    log(f"  {case.label()}: run {r + 1}/{runs}: {name}")
                results[name].append(methods[name]())
        medians = {name: statistics.median(m for m, _ in runs_) for name, runs_ in results.items()}
        main_ref = DO_BENCH if DO_BENCH in methods else TIMER
        for name, runs_ in results.items():
            run_medians = [m for m, _ in runs_]
            reference = judged.get(name, DO_BENCH_GRAPH if name == DO_BENCH_GRAPH else main_ref)
            records.append({
                "case": case.label(),
                "device": "cuda" if case.device.startswith("cuda") else "cpu",
                "method": name,
                "median_ms": medians[name] * 1e3,
                "reference": reference,
                "ratio_to_ref": medians[name] / medians[reference],
                "judged": name in judged,
                "within_run_iqr_rel": statistics.median(_rel_iqr(s) for _, s in runs_),
                "run_to_run_rel": (max(run_medians) - min(run_medians)) / medians[name],
                "samples_per_run": statistics.median(len(s) for _, s in runs_),
                "input_sets": sets if name == "harness" else 1,
                "run_medians_ms": [m * 1e3 for m in run_medians],
            })
    return records


def verdicts(records: list[dict[str, Any]]) -> list[str]:
    """One line per judged harness method: its median ratio to its reference against the goal,
    and its run-to-run spread against the reference's."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in records:
        if "skipped" not in r:
            by_case.setdefault(r["case"], {})[r["method"]] = r
    lines = []
    for case, methods in by_case.items():
        for name, h in methods.items():
            if not h["judged"]:
                continue
            ref = methods[h["reference"]]
            goal = GOALS[h["device"]]
            agree = abs(h["ratio_to_ref"] - 1) <= goal
            tighter = h["run_to_run_rel"] <= ref["run_to_run_rel"]
            lines.append(
                f"{case}: {name} / {h['reference']} median ratio {h['ratio_to_ref']:.3f} "
                f"({'within' if agree else 'OUTSIDE'} {goal:.0%}); run-to-run spread {100 * h['run_to_run_rel']:.2f}% "
                f"vs {100 * ref['run_to_run_rel']:.2f}% ({'no larger' if tighter else 'LARGER'})"
            )
    return lines


def format_cross_check(records: list[dict[str, Any]]) -> str:
    lines = []
    header = (f"{'method':32} {'median ms':>10} {'÷ ref':>8} {'IQR/med':>8} {'run-to-run':>10} "
              f"{'samples':>8} {'sets':>5}  reference; run medians ms")
    case = None
    for r in records:
        if r["case"] != case:
            case = r["case"]
            lines += ["", case, header]
        if "skipped" in r:
            lines.append(f"{r['method']:32} skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['method']:32} {r['median_ms']:10.3f} {r['ratio_to_ref']:8.3f} {100 * r['within_run_iqr_rel']:7.2f}% "
            f"{100 * r['run_to_run_rel']:9.2f}% {r['samples_per_run']:8.0f} {r['input_sets']:5d}  "
            f"{'÷ ' + r['reference'] if r['reference'] != r['method'] else '(reference)'}; "
            + " ".join(f"{m:.4g}" for m in r["run_medians_ms"])
        )
    return "\n".join(lines + [""] + verdicts(records))
