"""The in-process steps of ``benchmarks/gpu_check.py`` (3, 5–8) and the validation summary (9).

Each step takes (check, args) and returns {"status": pass | warn | fail, "summary": one line,
"lines": details}. They import torch and the harness when called (the script installs first).
"""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Published figures the validation summary quotes beside ours (forward unless said otherwise).
ANCHORS = [
    "FlashAttention-2 on H100: up to 335 TFLOP/s forward (FA2 paper / Dao-AILab benchmarks, hdim 128, 16K tokens)",
    "FlashAttention-3 on H100: 740 TFLOP/s forward in FP16 (75% of peak; FA3 paper)",
    "FlexAttention: about 90% of FlashAttention-2's forward and 85% of its backward (PyTorch blog)",
]
CROSSCHECK_GOAL = 0.03


def _case(variant, params=None, **axes):
    from harness.core.cases import Case

    full = dict(device="cuda", batch=2, heads=8, kv_heads=8, seq_len=1024, head_dim=64, dtype="bfloat16", causal=False)
    full.update(axes)
    return Case(variant, params or {}, **full)


def step_triton(check, args) -> dict:
    import torch

    from harness import get_variant, masks
    from harness.measure.inputs import make_qkv
    from harness.measure.reference import TOLERANCE, errors, reference_attention

    triton_v = get_variant("triton")
    lines, bad, n = [], 0, 0
    for dtype in ("float16", "bfloat16"):
        for causal in (False, True):
            for head_dim in (16, 64, 128, 256):
                for heads, kv_heads in ((8, 8), (8, 2)):
                    case = _case("triton", dtype=dtype, causal=causal, head_dim=head_dim, heads=heads,
                                 kv_heads=kv_heads, seq_len=777)  # odd: the last block is masked
                    reasons = triton_v.not_supported_reasons(case)
                    if reasons:
                        return {"status": "fail", "summary": f"triton cannot run here: {'; '.join(reasons)}"}
                    q, k, v = make_qkv(case)
                    with torch.no_grad():
                        out = triton_v(q, k, v, causal=causal)
                    max_abs, rel = errors(out, reference_attention(q, k, v, masks.causal if causal else None))
                    tol_abs, tol_rel = TOLERANCE[dtype]
                    n += 1
                    if not (max_abs <= tol_abs and rel <= tol_rel):
                        bad += 1
                        lines.append(f"OUT OF TOLERANCE {case.label()}: max_abs {max_abs:.3g} rel {rel:.3g}")
    lines.append(f"{n - bad} of {n} shapes within the float64 reference's tolerance")
    sanitizer = _sanitizer(check)
    lines.append(sanitizer[1])
    status = "pass" if bad == 0 and sanitizer[0] in ("pass", "skip") else "fail"
    return {"status": status, "summary": f"{n - bad}/{n} within tolerance; compute-sanitizer: {sanitizer[0]}",
            "lines": lines}


SANITIZED = """
import torch
from harness import get_variant
from harness.core.cases import Case
from harness.measure.inputs import make_qkv
q, k, v = make_qkv(Case("triton", {}, device="cuda", batch=1, heads=2, kv_heads=1, seq_len=129, head_dim=64,
                        dtype="float16", causal=True))
get_variant("triton")(q, k, v, causal=True)
torch.cuda.synchronize()
print("ran")
"""


def _sanitizer(check) -> tuple[str, str]:
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return "skip", "compute-sanitizer: not installed (skipped)"
    if check.left() < 90:
        return "skip", "compute-sanitizer: no time left (skipped)"
    try:
        proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-c", SANITIZED],
                              cwd=ROOT, capture_output=True, text=True, timeout=min(240.0, check.left() - 60))
    except subprocess.TimeoutExpired:
        return "skip", "compute-sanitizer: timed out (skipped)"
    text = proc.stdout + proc.stderr
    summary = [ln for ln in text.splitlines() if "ERROR SUMMARY" in ln][-1:] or [f"exit {proc.returncode}"]
    ok = proc.returncode == 0 and "ran" in proc.stdout
    return ("pass" if ok else "fail"), f"compute-sanitizer memcheck (L=129, causal, GQA): {summary[0].strip()}"


def step_crosscheck(check, args) -> dict:
    from harness.measure import crosscheck

    cases = [_case("sdpa", batch=4, heads=16, kv_heads=16, seq_len=1024, causal=c) for c in (False, True)]
    records = crosscheck.cross_check(cases, runs=3, min_time_s=0.3, max_time_s=1.0)
    check.crosscheck = records
    lines = crosscheck.format_cross_check(records).splitlines()
    ratios = [r["ratio_to_ref"] for r in records if r.get("judged")]
    worst = max((abs(x - 1) for x in ratios), default=math.nan)
    status = "pass" if ratios and worst <= CROSSCHECK_GOAL else "fail"
    return {"status": status, "lines": lines, "ratios": ratios,
            "summary": f"harness / do_bench ratios {', '.join(f'{x:.3f}' for x in ratios)} (goal ±{CROSSCHECK_GOAL:.0%})"}


def _matmul():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    return lambda: torch.matmul(a, a, out=out)


def step_idle(check, args) -> dict:
    import torch

    from harness.measure import telemetry
    from harness.measure.timing import TimingConfig, time_call

    fn = _matmul()
    torch.cuda.synchronize()
    idle = min(20.0, max(5.0, check.left() / 20))
    time.sleep(idle)  # the GPU clocks down
    with telemetry.Sampler("cuda", interval_s=0.01) as tel:
        with tel.window("timing"):
            t = time_call(fn, TimingConfig(warmup=1, min_reps=40, max_reps=200, min_time_s=0.2, target_precision=0.0),
                          device="cuda")
    s = t.samples_s
    first, rest = statistics.median(s[:5]), statistics.median(s)
    cols = tel.columns
    lines = [f"idle {idle:.0f} s, then warm-up {t.warmup_calls} calls; first call {1e3 * t.first_call_s:.2f} ms",
             f"median of the first 5 samples {1e3 * first:.3f} ms, of all {len(s)}: {1e3 * rest:.3f} ms "
             f"(ratio {first / rest:.3f})",
             f"SM clock during timing: mean {cols.get('sm_clock_mhz')}, min {cols.get('sm_clock_mhz_min')} MHz; "
             f"throttle reasons: {cols.get('throttle_reasons')!r}"]
    ok = first / rest <= 1.05
    return {"status": "pass" if ok else "warn", "lines": lines,
            "summary": f"first samples after idle at {first / rest:.3f}× the median (goal ≤ 1.05)"}


def step_telemetry(check, args) -> dict:
    from harness.measure import telemetry

    fn = _matmul()
    with telemetry.Sampler("cuda", interval_s=0.02) as tel:
        with tel.window("timing"):
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                fn()
        tel.measure_energy(fn, tokens=8192, min_time_s=1.0)
    c = tel.columns
    checks = {
        "power_w > 0": (c.get("power_w") or 0) > 0,
        "energy_j > 0": (c.get("energy_j") or 0) > 0,
        "energy from the counter": c.get("energy_source") == "counter",
        "SM clock > 0": (c.get("sm_clock_mhz") or 0) > 0,
        "violation counters read": c.get("throttle_time_ms") is not None,
    }
    lines = [f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    lines.append(", ".join(f"{k}={c.get(k)}" for k in ("power_w", "energy_j", "energy_power_w", "sm_clock_mhz",
                                                      "throttle_time_ms", "throttled", "telemetry_note")))
    bad = [k for k, v in checks.items() if not v]
    return {"status": "pass" if not bad else "fail", "lines": lines,
            "summary": "all readings sane" if not bad else "failed: " + ", ".join(bad)}


def step_memory(check, args) -> dict:
    import torch

    from harness import get_variant
    from harness.core.config import RunSettings, TimingConfig
    from harness.engine.runner import cuda_memory_budget, estimated_bytes, run_case

    free, total = torch.cuda.mem_get_info()
    budget = cuda_memory_budget("cuda")
    lines = [f"free {free / 2**30:.1f} of {total / 2**30:.1f} GiB; budget {budget / 2**30:.1f} GiB"]
    timing = TimingConfig(warmup=1, min_time_s=0.02, max_time_s=0.2, max_reps=10)
    worst = 0.0
    shapes = [("naive", {}, "fwd", 4096), ("sdpa", {"backend": "math"}, "fwd", 4096),
              ("sdpa", {"backend": "math"}, "fwd_bwd", 2048), ("sdpa", {"backend": "flash"}, "fwd", 16384),
              ("sdpa", {"backend": "flash"}, "fwd_bwd", 16384)]
    for variant, params, mode, n in shapes:
        case = _case(variant, params, batch=2, heads=16, kv_heads=16, seq_len=n, mode=mode)
        row = run_case(case, RunSettings(timing, memory_budget=int(budget))).row
        estimate = estimated_bytes(case, get_variant(variant)) or 0.0
        peak = row.get("peak_mem_bytes")
        ratio = peak / estimate if peak and estimate else math.nan
        worst = max(worst, ratio) if math.isfinite(ratio) else worst
        lines.append(f"{case.label()}: {row['status']}; peak {(peak or 0) / 2**20:.0f} MiB, estimate "
                     f"{estimate / 2**20:.0f} MiB (peak/estimate {ratio:.2f}) {row.get('reason', '')[:80]}")
    status = "pass" if worst <= 1.0 and 0 < budget <= free + torch.cuda.memory_reserved() else "warn"
    return {"status": status, "lines": lines, "summary": f"largest peak/estimate {worst:.2f} (goal ≤ 1: estimates never low)"}


def _label(row) -> str:
    import json

    params = json.loads(row["params"]) if row["params"] else {}
    return row["variant"] + (f"-{params['backend']}" if "backend" in params else "")


def validation_summary(run_dir: Path, steps: list[dict]) -> tuple[str, list[str], str]:
    """(one line, the one-screen table, status) of the validation run in ``run_dir``."""
    from harness.core.cases import axis_names
    from harness.engine.store import read_results

    try:
        rows = read_results(run_dir)
    except Exception as exc:
        return f"no rows ({type(exc).__name__})", [], "fail"
    rows = rows.assign(label=[_label(r) for _, r in rows.iterrows()])
    ok = rows[rows["status"] == "ok"]
    failing = rows[~rows["status"].isin(["ok", "skipped"])]
    lines = [f"{len(rows)} cases: " + ", ".join(f"{n} {s}" for s, n in rows["status"].value_counts().items())]
    lines.append(f"{'variant':18} {'mode':7} {'dtype':8} {'D':>3} {'causal':6} {'L':>6} {'TFLOP/s':>8} "
                 f"{'%peak':>6} {'mJ/token':>8} {'throttled':>9} {'host-bound':>10}")
    for key, group in ok.groupby(["label", *axis_names(exclude=("seq_len", "batch"))], dropna=False):
        best = group.sort_values("seq_len").iloc[-1]
        pct = best.get("pct_of_peak")
        tpj = best.get("tokens_per_joule")
        lines.append(f"{key[0]:18} {key[1]:7} {key[2]:8} {key[3]:3d} {str(bool(key[4])):6} {best['seq_len']:6d} "
                     f"{best['tflops_per_s']:8.1f} {pct if pct == pct and pct is not None else float('nan'):6.1f} "
                     f"{(1e3 / tpj) if tpj else float('nan'):8.3f} {str(best.get('throttled')):>9} "
                     f"{str(best.get('host_bound')):>10}")
    cross = next((s for s in steps if s.get("step") == 5), {})
    if cross.get("ratios"):
        lines.append("harness / do_bench ratios (step 5): " + ", ".join(f"{x:.3f}" for x in cross["ratios"]))
    lines += ["published:"] + ["  " + a for a in ANCHORS]
    lines += [f"NOT OK {r['label']} {r['mode']} {r['dtype']} L={r['seq_len']}: {r['status']} {str(r['reason'])[:100]}"
              for _, r in failing.head(15).iterrows()]
    status = "pass" if len(ok) and failing.empty else ("warn" if len(ok) else "fail")
    return f"{len(ok)} ok, {len(failing)} failing of {len(rows)}", lines, status
