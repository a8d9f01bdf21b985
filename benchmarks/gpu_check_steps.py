"""The GPU check's Python steps, each run in its own process by ``benchmarks/gpu_check.py``::

    python benchmarks/gpu_check_steps.py STEP --work DIR [--rehearse] [--parent-pid PID] [--refuse-shared]

STEP is ``env`` (environment, then a smoke timing of sdpa-flash bf16 at FlashAttention-2's shape),
``calibrate`` (rehearsal only: on a GPU the check runs ``bench calibrate``), ``crosscheck`` (harness /
``do_bench`` and harness graph / ``do_bench_cudagraph``), ``sweep`` (the Triton kernel against float64
with fixed configs, then one autotuned shape) or ``devices`` (telemetry, warm-up after idle, memory
estimates). Each writes ``DIR/steps/STEP.json`` after every result it gets (``status``: pass, warn,
fail; ``summary``; ``lines``; ``figures``), so a step its timeout kills leaves what it had found.

``--rehearse`` runs the step on a CPU machine against the fake GPU of :mod:`gpu_fake` (the sweep: under
Triton's interpreter, which the checker sets): its figures are the cost model's, not measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gpu_plan  # noqa: E402  (torch-free)

#: The published figures the check compares with (forward unless said otherwise).
FA2_H100_FWD_TFLOPS = 335.0
CROSSCHECK_GOAL = 0.03
SMOKE = gpu_plan.SMOKE


class Result:
    """A step's result file, rewritten (atomically) after every change."""

    def __init__(self, work: Path, key: str):
        self.path = work / "steps" / f"{key}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"status": "running", "summary": "", "lines": [], "figures": {}}
        self.save()

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.data["lines"].append(text)
        self.save()

    def set(self, **values) -> None:
        figures = values.pop("figures", None)
        if figures:
            self.data["figures"].update(figures)
        self.data.update(values)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def _call(case, variant_name: str | None = None):
    """The forward call of a planned case on real CUDA tensors (no grad)."""
    import torch

    from harness import get_variant
    from harness.measure.inputs import make_qkv

    c = gpu_plan.to_case(case)
    q, k, v = make_qkv(c)
    variant = get_variant(variant_name or c.variant)

    def call():
        with torch.no_grad():
            return variant(q, k, v, causal=c.causal, **c.params)

    return call


# -- env: environment, other processes, the plan's predictions, a smoke timing ---------------------------


def step_env(ctx, res: Result) -> None:
    import torch

    if not torch.cuda.is_available():
        res.set(status="fail", fatal=True,
                summary=f"torch {torch.__version__} sees no CUDA GPU here (torch.version.cuda "
                        f"= {torch.version.cuda}): nothing to check")
        return
    from harness.measure.environment import capture

    env = capture()
    (ctx.work / "environment.json").write_text(json.dumps(env, indent=2, default=str))
    gpu = env["machine"].get("gpu") or {}
    record = gpu.get("record") or {}
    ours = {os.getpid(), ctx.parent_pid}
    others = [p for p in record.get("other_processes") or [] if p.get("pid") not in ours]
    res.set(gpu=gpu.get("name") or torch.cuda.get_device_name(0), fingerprint=env["machine"]["fingerprint"],
            versions=env["versions"], other_processes=others,
            summary=f"{gpu.get('name')}, driver {gpu.get('driver')}, torch {env['versions']['torch']}, "
                    f"CUDA {env['versions']['cuda']}, triton {env['versions']['triton']}")
    res.line(f"GPU: {gpu.get('name')} (compute capability {gpu.get('compute_capability')}, "
             f"{(gpu.get('memory_bytes') or 0) / 2**30:.0f} GiB, {gpu.get('sm_count')} SMs), "
             f"driver {gpu.get('driver')}")
    res.line("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    for key in ("power_limit_w", "persistence_mode", "ecc_mode", "mig_mode", "applications_clocks_mhz"):
        res.line(f"{key}: {record.get(key)}")
    if others:
        res.line(f"other processes on the GPU (the checker's own and this one excluded): {others}")
        if ctx.refuse_shared:
            res.set(status="fail", fatal=True, summary=f"{len(others)} other process(es) use this GPU: refusing to "
                                                       "measure (--refuse-shared)")
            return
        res.set(shared=True, summary=res.data["summary"] + f"; {len(others)} OTHER PROCESS(ES) ON THE GPU: "
                                                           "their load is in every timing")
    # the plan's predictions: made here, since the checker's own process never imports torch
    plan = gpu_plan.plan()
    (ctx.work / "plan.json").write_text(json.dumps(gpu_plan.plan_json(plan), indent=2, default=str))
    smoke(ctx, res)


def smoke(ctx, res: Result) -> None:
    """One sdpa-flash bf16 forward timing at FlashAttention-2's H100 shape: the first figure of the check."""
    from harness.core.flops import attention_flops
    from harness.measure.timing import TimingConfig, time_call

    if ctx.rehearse:
        import gpu_fake

        fn, clock = gpu_fake.kernel(SMOKE), gpu_fake.install().clock
    else:
        fn, clock = _call(SMOKE), time.perf_counter
    config = TimingConfig(warmup=3, min_time_s=0.1, min_reps=10, max_reps=100, max_time_s=1.0, target_precision=0.02)
    t = time_call(fn, config, device="cuda", clock=clock)
    tflops = attention_flops(gpu_plan.to_case(SMOKE)) / t.median_s / 1e12
    label = gpu_plan.case_label(SMOKE)
    res.line(f"smoke {label}: {1e3 * t.median_s:.3f} ms median of {len(t.samples_s)}, {tflops:.1f} TFLOP/s "
             f"(FlashAttention-2 published: up to {FA2_H100_FWD_TFLOPS:.0f} on H100)"
             f"{' [REHEARSAL: cost model]' if ctx.rehearse else ''}")
    res.set(status=("warn" if res.data.get("shared") else "pass") if tflops > 0 else "fail",
            figures={"smoke_tflops": tflops, "smoke_ms": 1e3 * t.median_s},
            summary=res.data["summary"] + f"; smoke {tflops:.0f} TFLOP/s")


# -- calibrate (rehearsal only) -----------------------------------------------------------------------


def step_calibrate(ctx, res: Result) -> None:
    """Rehearsal of ``bench calibrate --device cuda``: the cache file, measured by the fake GPU."""
    import gpu_fake

    from harness.measure import calibrate
    from harness.measure.timing import TimingConfig, time_call

    fake = gpu_fake.install()

    def measure(device, dtypes, quick=False, log=None):
        entry = {"device": "cuda", "gpu": gpu_fake.GPU_NAME, "rehearsal": True, "matmul": {}, "quick": False,
                 "measured_at": "rehearsal", "torch": "fake CUDA"}
        for dtype in dtypes:
            t = time_call(fake.kernel(gpu_s=2 * 16384**3 / (gpu_plan.cost("matmul_tflops") * 1e12)),
                          TimingConfig(warmup=3, min_time_s=0.2, max_reps=50, flush_l2=False), device="cuda",
                          clock=fake.clock)
            tflops = 2 * 16384**3 / t.median_s / 1e12
            entry["matmul"][dtype] = {"n": 16384, "tflops_per_s": tflops, "tflops_per_s_best": tflops,
                                      "time_ms": 1e3 * t.median_s, "reps": len(t.samples_s)}
        entry["bandwidth"] = {"bytes": 2**30, "gb_per_s": gpu_plan.cost("hbm_gb_per_s"),
                              "gb_per_s_best": gpu_plan.cost("hbm_gb_per_s"), "reps": 1}
        return entry

    root = ctx.work / "calibration"
    cal, measured = calibrate.calibrate(["cuda"], ["bfloat16", "float16"], root=root, fingerprint="rehearsal",
                                        measure=measure)
    res.line(calibrate.format_calibration(cal) + "  [REHEARSAL: cost model]")
    res.set(status="pass", path=str(calibrate.cache_path("rehearsal", root)),
            summary=f"calibration written ({', '.join(measured)}) [REHEARSAL]")


# -- crosscheck: the harness against triton.testing ---------------------------------------------------


def step_crosscheck(ctx, res: Result) -> None:
    from harness.measure import crosscheck

    cases = [dict(variant="sdpa", params={}, device="cuda", kv_heads=c["heads"], dtype="bfloat16", mode="fwd", **c)
             for c in gpu_plan.CROSSCHECK]
    if ctx.rehearse:
        import gpu_fake

        gpu_fake.install()
        by_label = {gpu_plan.to_case(c).label(): c for c in cases}
        crosscheck._sdpa_call = lambda q, k, v, causal: gpu_fake.kernel(by_label[q])
        make_inputs = lambda case, seed=0: (case.label(), None, None)  # noqa: E731
    else:
        from harness.measure.inputs import make_qkv as make_inputs
    records, verdicts = [], []
    for c in cases:
        case = gpu_plan.to_case(c)  # sdpa, forward (the cases above)
        got = crosscheck.cross_check([case], runs=gpu_plan.CROSSCHECK_RUNS, min_time_s=gpu_plan.CROSSCHECK_MIN_TIME_S,
                                     max_time_s=gpu_plan.CROSSCHECK_MAX_TIME_S, make_inputs=make_inputs)
        records += got
        for r in got:
            if r.get("judged"):
                verdicts.append({"case": r["case"], "method": r["method"], "reference": r["reference"],
                                 "ratio": r["ratio_to_ref"],
                                 "within_goal": abs(r["ratio_to_ref"] - 1) <= CROSSCHECK_GOAL})
                res.line(f"{r['case']}: {r['method']} / {r['reference']} = {r['ratio_to_ref']:.3f}")
            elif r.get("skipped"):
                res.line(f"{r['case']}: {r['method']} skipped: {r['skipped']}")
        res.set(records=records, figures={"crosscheck": verdicts})
    bad = [v for v in verdicts if not v["within_goal"]]
    judged_do_bench = [v for v in verdicts if "do_bench" in v["reference"]]
    status = "pass" if judged_do_bench and not bad else "fail"
    res.set(status=status, summary=f"{len(verdicts) - len(bad)}/{len(verdicts)} ratios within ±{CROSSCHECK_GOAL:.0%}"
            + (" [REHEARSAL: fake timers]" if ctx.rehearse else "")
            + ("" if judged_do_bench else "; no do_bench (Triton?)"))


# -- sweep: the Triton kernel against float64 ---------------------------------------------------------


def step_sweep(ctx, res: Result) -> None:
    import torch

    from harness.core import masks
    from harness.core.cases import Case
    from harness.measure.inputs import make_qkv
    from harness.measure.reference import TOLERANCE, check_rows, errors, reference_attention
    from variants import triton_fused as tf

    if not tf.HAS_TRITON:
        res.set(status="fail", summary="Triton is not installed")
        return
    if ctx.rehearse and not tf.INTERPRETED:
        res.set(status="fail", summary="the sweep's rehearsal runs under TRITON_INTERPRET=1 (gpu_check.py sets it)")
        return
    interpreted = tf.INTERPRETED
    device = "cpu" if interpreted else "cuda"
    length = 67 if interpreted else gpu_plan.SWEEP_LEN
    sync = (lambda: None) if interpreted else _sync
    bad, done = 0, []
    for dtype, causal, head_dim, heads, kv_heads in gpu_plan.SWEEP:
        batch = 2
        if interpreted:  # the interpreter's bfloat16 dot is wrong (Triton 3.7); fewer programs to interpret
            dtype, batch, heads, kv_heads = "float16", 1, heads // 2, max(1, kv_heads // 2)
        case = Case("triton", {}, device=device, batch=batch, heads=heads, kv_heads=kv_heads, seq_len=length,
                    head_dim=head_dim, dtype=dtype, causal=causal)
        q, k, v = make_qkv(case)
        t0 = time.perf_counter()
        out = tf.launch(q, k, v, causal=causal, config="fixed")
        sync()
        first_s = time.perf_counter() - t0
        max_abs, rel = errors(out, reference_attention(q, k, v, masks.causal if causal else None))
        tol_abs, tol_rel = TOLERANCE[dtype]
        ok = max_abs <= tol_abs and rel <= tol_rel and bool(torch.isfinite(out).all())
        bad += not ok
        done.append({"case": case.label(), "max_abs": max_abs, "rel": rel, "ok": ok, "first_call_s": first_s})
        res.line(f"{'ok ' if ok else 'OUT OF TOLERANCE'} {case.label()}: max_abs {max_abs:.3g}, rel {rel:.3g} "
                 f"(first call {first_s:.2f} s: compile)")
        res.set(figures={"sweep": done}, status="running",
                summary=f"{len(done) - bad}/{len(done)} fixed-config shapes within tolerance")
    # one autotuned shape: the FA2 key (L rounded up to 16384), compiled already by the validation run
    shape = dict(gpu_plan.SWEEP_TUNED)
    if interpreted:
        shape.update(heads=2, kv_heads=2, seq_len=70, head_dim=64, dtype="float16")
    case = Case("triton", {}, device=device, **shape)
    q, k, v = make_qkv(case)
    tuner = tf._attention_fwd_tuned
    before = len(getattr(tuner, "cache", {}) or {})
    t0 = time.perf_counter()
    out = tf.launch(q, k, v, causal=case.causal)
    sync()
    tune_s = time.perf_counter() - t0
    keys_after_first = len(getattr(tuner, "cache", {}) or {})
    q2 = torch.cat([q, q[:, :, : tf.tune_length(case.seq_len) - case.seq_len]], dim=2)  # same bucket, full length
    tf.launch(q2, q2, q2, causal=case.causal)
    sync()
    retuned = len(getattr(tuner, "cache", {}) or {}) != keys_after_first
    rows = check_rows(case.seq_len)
    max_abs, rel = errors(out[:, :, rows.to(out.device)], reference_attention(q, k, v, None, rows))
    tol_abs, tol_rel = TOLERANCE[case.dtype]
    tuned_ok = max_abs <= tol_abs and rel <= tol_rel and not retuned
    timed = len(getattr(tuner, "configs_timings", None) or {}) or len(tuner.configs)
    best = getattr(tuner, "best_config", None)
    res.line(f"{'ok ' if tuned_ok else 'FAILED'} autotuned {case.label()}: {timed} configs timed in {tune_s:.1f} s, "
             f"best {best}; max_abs {max_abs:.3g}, rel {rel:.3g}; L={q2.shape[2]} (same bucket) "
             f"{'tuned AGAIN' if retuned else 'reused the tuning'} (tuned keys {before} -> {keys_after_first})")
    res.set(figures={"autotune": {"case": case.label(), "configs": timed, "seconds": tune_s, "best": str(best),
                                  "retuned_same_bucket": retuned, "ok": tuned_ok}})
    res.set(status="pass" if not bad and tuned_ok else "fail",
            summary=f"{len(done) - bad}/{len(done)} fixed-config shapes within tolerance; autotuned FA2 shape "
                    f"{'ok' if tuned_ok else 'FAILED'} ({timed} configs, {tune_s:.1f} s)"
            + (" [REHEARSAL: interpreter, float16, B1, half the heads, L=67]" if interpreted else ""))


# -- devices: telemetry, warm-up after idle, memory ---------------------------------------------------


def step_devices(ctx, res: Result) -> None:
    import torch

    from harness.measure import telemetry
    from harness.measure.timing import TimingConfig, time_call

    if ctx.rehearse:
        import gpu_fake

        fake = gpu_fake.install()
        run = fake.kernel(gpu_s=2 * 8192**3 / (gpu_plan.cost("matmul_tflops") * 1e12), host_s=1e-5)
        nv = gpu_fake._STATE["nvml"]
        fn, clock = (lambda: (run(), nv.call())), fake.clock
    else:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(a)
        fn, clock = (lambda: torch.matmul(a, a, out=out)), time.perf_counter
    with telemetry.Sampler("cuda", interval_s=0.02) as tel:
        with tel.window("timing"):
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                fn()
        tel.measure_energy(fn, tokens=8192)
    c = tel.columns
    checks = {"power_w > 0": (c.get("power_w") or 0) > 0, "energy_j > 0": (c.get("energy_j") or 0) > 0,
              "energy from the counter": c.get("energy_source") == "counter",
              "SM clock > 0": (c.get("sm_clock_mhz") or 0) > 0,
              "violation counters read": c.get("throttle_time_ms") is not None}
    res.line("telemetry: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    res.set(figures={"telemetry": {k: c.get(k) for k in ("power_w", "energy_j", "energy_power_w", "sm_clock_mhz",
                                                         "throttle_time_ms", "throttled", "telemetry_note")}})
    bad = [k for k, v in checks.items() if not v]
    # warm-up after idle: the first samples against the median
    time.sleep(0.0 if ctx.rehearse else gpu_plan.cost("idle_sleep"))
    t = time_call(fn, TimingConfig(warmup=1, min_reps=40, max_reps=200, min_time_s=0.2, target_precision=0.0,
                                   flush_l2=False), device="cuda", clock=clock)
    first, median = statistics.median(t.samples_s[:5]), statistics.median(t.samples_s)
    res.line(f"after {gpu_plan.cost('idle_sleep'):.0f} s idle: warm-up {t.warmup_calls} calls; first 5 samples at "
             f"{first / median:.3f}x the median of {len(t.samples_s)} (goal <= 1.05)")
    warm_ok = first / median <= 1.05
    res.set(figures={"idle_first_over_median": first / median})
    worst = memory(ctx, res)
    status = "fail" if bad else ("pass" if warm_ok and worst <= 1.0 else "warn")
    res.set(status=status, summary=("telemetry sane" if not bad else "telemetry failed: " + ", ".join(bad))
            + f"; first samples after idle {first / median:.3f}x; largest peak/estimate {worst:.2f}"
            + (" [REHEARSAL]" if ctx.rehearse else ""))


def memory(ctx, res: Result) -> float:
    """Measured peaks against the variants' estimates (real CUDA only); the largest peak/estimate."""
    import torch

    from harness import get_variant
    from harness.core.cases import Case
    from harness.core.config import RunSettings, TimingConfig
    from harness.engine.runner import cuda_memory_budget, estimated_bytes, run_case

    free, total = torch.cuda.mem_get_info()
    budget = cuda_memory_budget("cuda")
    res.line(f"memory: free {free / 2**30:.1f} of {total / 2**30:.1f} GiB; budget {budget / 2**30:.1f} GiB")
    if ctx.rehearse:
        res.line("memory cases not rehearsed: they need CUDA tensors")
        return 0.0
    worst = 0.0
    for variant, params, mode, n in gpu_plan.MEMORY_CASES:
        case = Case(variant, params, device="cuda", batch=2, heads=16, kv_heads=16, seq_len=n, head_dim=64,
                    dtype="bfloat16", mode=mode)
        timing = TimingConfig(warmup=1, min_time_s=0.02, max_time_s=0.2, max_reps=10)
        row = run_case(case, RunSettings(timing, memory_budget=int(budget))).row
        estimate = estimated_bytes(case, get_variant(variant)) or 0.0
        peak = row.get("peak_mem_bytes")
        ratio = peak / estimate if peak and estimate else math.nan
        worst = max(worst, ratio) if math.isfinite(ratio) else worst
        res.line(f"{case.label()}: {row['status']}; peak {(peak or 0) / 2**20:.0f} MiB, estimate "
                 f"{estimate / 2**20:.0f} MiB (peak/estimate {ratio:.2f})")
    return worst


STEPS = {"env": step_env, "calibrate": step_calibrate, "crosscheck": step_crosscheck, "sweep": step_sweep,
         "devices": step_devices}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--work", required=True, help="the check's work directory")
    parser.add_argument("--rehearse", action="store_true", help="on a CPU, against the fake GPU (gpu_fake)")
    parser.add_argument("--parent-pid", type=int, default=0, help="the checker's pid (not 'another process')")
    parser.add_argument("--refuse-shared", action="store_true", help="stop when another process uses the GPU")
    ctx = parser.parse_args(argv)
    ctx.work = Path(ctx.work)
    res = Result(ctx.work, ctx.step)
    try:
        if ctx.rehearse and ctx.step != "sweep":
            import gpu_fake

            gpu_fake.install(ctx.parent_pid)
        STEPS[ctx.step](ctx, res)
        if res.data["status"] == "running":
            res.set(status="fail", summary=res.data["summary"] or "the step ended without a verdict")
    except Exception as exc:  # the step's own failure is its result; the checker goes on with the next step
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        res.set(status="fail", summary=f"{type(exc).__name__}: {first}"[:300], traceback=traceback.format_exc()[-4000:])
        print(traceback.format_exc(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
