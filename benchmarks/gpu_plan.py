"""The GPU check's time plan: its steps in order, each one's hard timeout, what each is predicted to
take on an H100 (a cost model with its figures and their sources), and the files that come back.

Torch-free on purpose: the checker's own process (``benchmarks/gpu_check.py``) imports only this, so it
never holds a CUDA context and never pays for importing torch outside a step's
timeout. The validation cases are read from ``suites/gpu-check.toml`` directly (one ``[[variant]]``
table per case), and ``tests/test_gpu_check.py`` checks that ``bench run --dry-run`` lists the same.

The plan cannot overrun: every step runs in its own process group with a hard timeout (SIGKILL), the
timeouts add up to at most :data:`BUDGET_S` (7 minutes), and nothing outside a step takes more than a
second or two, so the whole check ends within 8 minutes whatever happens inside a step.
"""

from __future__ import annotations

import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Sum of the steps' timeouts: 7 minutes, leaving a minute of the 8 for the checker itself.
BUDGET_S = 420.0
#: What comes back from the lent machine: at most this many files under $OUT, each below this size.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
#: The log is cut (its middle) to stay well inside MAX_FILE_BYTES.
LOG_LIMIT_BYTES = 8 * 2**20
SUITE = ROOT / "suites" / "gpu-check.toml"

#: The files under $OUT, in the order the summary lists them.
FILES = ("gpu_check.md", "gpu_check.json", "results.parquet", "samples.parquet", "run.json", "calibration.json",
         "gpu_check.log")


@dataclass(frozen=True)
class Figure:
    value: float
    source: str


#: The cost model. Seconds unless the name says otherwise. "measured" figures were measured on this
#: project's CI VM; "published" ones cite their source; "estimate" ones are judgement, stated as such.
COST = {
    "python_start": Figure(0.1, "estimate: interpreter start, without torch"),
    "torch_import_cold": Figure(20.0, "measured: the first `import torch` on the CI VM took 21.6 s (CPU build, "
                                      "cold page cache), later ones 1.6 s; a fresh GPU machine pays this once"),
    "torch_import": Figure(3.0, "measured: torch + pandas + harness import in 2.25 s on the CI VM (warm); "
                                "the CUDA build maps more libraries: 3 s"),
    "cuda_init": Figure(2.5, "estimate: CUDA context creation on an H100 (lazy module loading, CUDA >= 11.7)"),
    "env_capture": Figure(1.0, "estimate: NVML queries, git, CPU caches (environment.capture)"),
    "bench_overhead": Figure(1.5, "estimate: suite load, run.json, tables written at the end"),
    "case_fixed": Figure(1.0, "estimate: per case besides timing: inputs, the memory call, the FLOP count, "
                              "the accuracy check against float64 (2048 query rows)"),
    "energy_loop": Figure(0.35, "telemetry.ENERGY_MIN_TIME_S (0.2 s) plus on average 1.5 counter periods of "
                                "100 ms (Yang et al., arXiv:2312.02741: A100/H100 update power every 100 ms)"),
    "cudnn_plan": Figure(1.0, "estimate: cuDNN's SDPA builds an execution plan on a shape's first call"),
    "triton_compile": Figure(1.2, "per Triton config of the attention kernel: the issue's own arithmetic "
                                  "(440 compiles took 4-11 min: 0.55-1.5 s each); Triton PR #9612 reports 18 "
                                  "matmul configs compiled in 7.26 s (0.4 s each, a smaller kernel)"),
    "triton_bench": Figure(0.1, "per config: the autotuner's do_bench (10 ms warm-up, 40 ms of reps, an "
                                "estimate of 5 calls: TUNE_WARMUP_MS, TUNE_REP_MS)"),
    "triton_cache_load": Figure(0.05, "estimate: a config compiled earlier, loaded from ~/.triton/cache"),
    "triton_launcher": Figure(1.5, "estimate: Triton builds its C launcher with cc on a process's first launch"),
    "flex_probe": Figure(10.0, "estimate: flex.unavailable() compiles a tiny causal case once per process"),
    "flex_compile_fwd": Figure(15.0, "estimate: torch.compile of flex_attention (one Triton template, cold "
                                     "inductor cache) per shape"),
    "flex_compile_fwd_bwd": Figure(35.0, "estimate: forward and backward templates, cold cache"),
    "attn_fwd_tflops": Figure(300.0, "published: FlashAttention-2 reaches up to 335 TFLOP/s forward on H100 "
                                     "(Dao 2023); 300 assumed for every forward kernel (it only sizes sampling)"),
    "attn_fwd_bwd_tflops": Figure(250.0, "estimate: forward+backward runs below the forward's rate"),
    "hbm_gb_per_s": Figure(3350.0, "published: H100 SXM HBM3 bandwidth 3.35 TB/s (NVIDIA datasheet)"),
    "matmul_tflops": Figure(700.0, "estimate: a 16K bf16 GEMM on H100 SXM (989 TFLOP/s dense peak, datasheet)"),
    "randn_per_s": Figure(2e8, "estimate: CPU torch.randn draws per second (calibration builds its inputs "
                               "on the CPU)"),
    "idle_sleep": Figure(5.0, "the check's own figure: the GPU idles 5 s before the warm-up check"),
    "pandas_import": Figure(1.5, "measured: pandas + pyarrow import on the CI VM (warm)"),
}

#: H100's shared memory per block (sm90), for the autotuner's candidate count (feasible_configs).
H100_SHARED_MEMORY, H100_CAPABILITY = 232448, 9


def cost(name: str) -> float:
    return COST[name].value


@dataclass
class Step:
    key: str
    title: str
    timeout_s: float
    #: "python": benchmarks/gpu_check_steps.py STEP; "bench": a `python -m harness` command (SIGINT first)
    kind: str
    #: bench steps: SIGINT this long before the timeout (the run finishes its case in flight and writes
    #: its tables), a second SIGINT at half of it (abandon the case), SIGKILL at the timeout
    grace_s: float = 2.0
    needs_compiler: bool = False
    what: str = ""
    predicted_s: float = 0.0
    parts: list[tuple[str, float]] = field(default_factory=list)


#: The steps, most valuable first. Their timeouts add up to BUDGET_S.
STEPS = (
    Step("env", "environment + smoke (sdpa-flash bf16, FA2 shape)", 45, "python",
         what="versions, GPU record, other processes; then one sdpa-flash bf16 timing at B1 H16 L16384 D128"),
    Step("calibrate", "calibration (bf16 and fp16 matmul peak, copy bandwidth)", 30, "bench",
         what="bench calibrate --device cuda: the peaks that rows' pct_of_peak divide by"),
    Step("validate", "validation suite (suites/gpu-check.toml, processes = 1)", 205, "bench", grace_s=25,
         needs_compiler=True, what="18 cases, most valuable first; rows are final one by one (rows.jsonl)"),
    Step("drill", "crash drill (ok, out-of-bounds, ok, OOM, ok)", 35, "bench", grace_s=8, needs_compiler=True,
         what="the worker pool replaces a worker after a sticky CUDA error; expects ok, cuda_error, ok, oom, ok"),
    Step("crosscheck", "timing cross-check (do_bench, do_bench_cudagraph)", 30, "python", needs_compiler=True,
         what="harness / do_bench (L2 flushed) and harness graph / do_bench_cudagraph, 3 cases, goal ±3%"),
    Step("sweep", "Triton kernel vs float64 (fixed configs, one autotuned shape)", 40, "python",
         needs_compiler=True, what="10 shapes with fixed configs at L=777, then the FA2 shape autotuned"),
    Step("devices", "telemetry, warm-up after idle, memory estimates", 25, "python",
         what="power and energy counter; first samples after 5 s idle; peaks vs estimates"),
    Step("summary", "summary and the files to bring back", 10, "python",
         what="the comparison with published figures; results.parquet rebuilt from rows.jsonl if cut"),
)

#: The crash drill: (variant, seq_len, expected status), in the order they run.
DRILL = (("fault_cuda_ok", 64, "ok"), ("fault_cuda_oob", 80, "cuda_error"), ("fault_cuda_ok", 96, "ok"),
         ("fault_cuda_oom", 112, "oom"), ("fault_cuda_ok", 128, "ok"))

#: The Triton sweep with fixed configs: (dtype, causal, head_dim, heads, kv_heads) at L=SWEEP_LEN.
SWEEP = (("bfloat16", False, 64, 8, 8), ("bfloat16", True, 64, 8, 2), ("bfloat16", False, 128, 8, 8),
         ("bfloat16", True, 128, 8, 8), ("float16", False, 16, 8, 1), ("float16", True, 16, 8, 8),
         ("float16", False, 256, 8, 8), ("float16", True, 256, 8, 2), ("float16", True, 32, 8, 8),
         ("float16", False, 128, 8, 2))
SWEEP_LEN = 777  # odd: the last block of keys and queries is masked
#: The one autotuned shape: FA2's (its key, L rounded up to 16384, is the validation run's, whose
#: compiled candidates are then in Triton's cache).
SWEEP_TUNED = dict(batch=1, heads=16, kv_heads=16, seq_len=16000, head_dim=128, dtype="bfloat16", causal=False)

#: The timing cross-check's cases (sdpa, default backend): two short kernels and the FA2 shape.
CROSSCHECK = (dict(batch=4, heads=16, seq_len=1024, head_dim=64, causal=False),
              dict(batch=4, heads=16, seq_len=1024, head_dim=64, causal=True),
              dict(batch=1, heads=16, seq_len=16384, head_dim=128, causal=False))
CROSSCHECK_RUNS, CROSSCHECK_MIN_TIME_S, CROSSCHECK_MAX_TIME_S = 3, 0.2, 0.5
#: the cross-check's methods on CUDA: harness, Timer, harness (cuda_graph), do_bench, do_bench_cudagraph
CROSSCHECK_METHODS = 5

#: The memory check's cases: (variant, params, mode, seq_len) at B2 H16 D64 bf16.
MEMORY_CASES = (("sdpa", {"backend": "math"}, "fwd", 4096), ("sdpa", {"backend": "flash"}, "fwd", 16384),
                ("sdpa", {"backend": "flash"}, "fwd_bwd", 16384))


# -- the validation cases, from the suite file without the harness ------------------------------------


def suite_cases(path: Path = SUITE) -> tuple[list[dict], dict]:
    """(cases, timing) of a suite whose every ``[[variant]]`` table is one case (scalars only)."""
    from harness.core.cases import DEFAULTS
    from harness.core.config import SWEEP  # torch-free: the suite keys' one declaration

    data = tomllib.loads(Path(path).read_text())
    defaults = data.get("defaults", {})
    axes = SWEEP.names
    cases = []
    for entry in data.get("variant", []):
        case = {"variant": entry["name"], "params": {},
                **{k: DEFAULTS[k] for k in SWEEP.names if k in DEFAULTS and DEFAULTS[k] is not None}}
        del case["kv_heads"]  # a suite's default: heads
        case.update({k: v for k, v in defaults.items() if k in axes})
        for key, value in entry.items():
            if isinstance(value, list):
                raise ValueError(f"{path}: [[variant]] {entry['name']}: {key} is a list; the check's suite names one "
                                 "case per table")
            if key in axes:
                case[key] = value
            elif key != "name":
                case["params"][key] = value
        if "kv_len" in case:
            case["seq_len"] = case.pop("kv_len")
        case.setdefault("kv_heads", case["heads"])
        cases.append(case)
    return cases, data.get("timing", {})


#: The smoke case: sdpa-flash bf16 forward at FlashAttention-2's H100 shape (head_dim 128, L = 16K).
SMOKE = dict(variant="sdpa", params={"backend": "flash"}, device="cuda", batch=1, heads=16, kv_heads=16, seq_len=16384,
             head_dim=128, dtype="bfloat16", mode="fwd", causal=False)


def smoke_case() -> dict:
    return dict(SMOKE, params=dict(SMOKE["params"]))


def to_case(c: dict):
    """The harness Case of a planned case (torch-free: harness.core.cases)."""
    from harness.core.cases import Case, axis_names

    return Case(c["variant"], dict(c["params"]), **{k: c[k] for k in axis_names() if k in c})


def case_flops(c: dict) -> float:
    from harness.core.flops import attention_flops, total_flops

    return total_flops(attention_flops(to_case(c)), c.get("mode", "fwd"))


def kernel_s(c: dict) -> float:
    """Predicted GPU time of one call: FLOPs at the assumed attention rate, or the K/V bytes at HBM speed."""
    rate = cost("attn_fwd_bwd_tflops" if c.get("mode") == "fwd_bwd" else "attn_fwd_tflops") * 1e12
    kv_bytes = 2 * c["batch"] * c["kv_heads"] * c["seq_len"] * c["head_dim"] * 2
    return max(case_flops(c) / rate, kv_bytes / (cost("hbm_gb_per_s") * 1e9), 5e-6)


def triton_configs(seq_len: int, head_dim: int, causal: bool, dtype_bytes: int = 2) -> int:
    """Candidates the autotuner compiles for one key on an H100 (the kernel's own pruning). Imports the
    variants, hence torch: predictions are made in a step's process or by this module's command line,
    never in the checker's own process."""
    from variants.triton_fused import CONFIG_SPACE, feasible_configs, tune_length

    return len(feasible_configs(CONFIG_SPACE, seq_len=tune_length(seq_len), head_dim=head_dim, causal=causal,
                                element_bytes=dtype_bytes, shared_memory=H100_SHARED_MEMORY,
                                compute_capability=H100_CAPABILITY))


def triton_key(c: dict) -> tuple:
    from variants.triton_fused import tune_length

    return tune_length(c["seq_len"]), c["head_dim"], bool(c.get("causal")), c.get("dtype")


def timing_s(kernel: float, timing: dict) -> float:
    """Warm-up (at least 25 ms of GPU time) and sampling (min_reps, min_time_s, max_time_s) of one case,
    with the 256 MiB L2 flush before each sample."""
    flush = 256 * 2**20 / (cost("hbm_gb_per_s") * 1e9)
    warm = max(0.025, (timing.get("warmup", 3) - 1) * kernel)
    reps = max(timing.get("min_reps", 3), math.ceil(timing.get("min_time_s", 0.2) / kernel))
    reps = min(reps, timing.get("max_reps", 100))
    sampling = min(reps * (kernel + flush), max(timing.get("max_time_s", 5.0), timing.get("min_time_s", 0.2)))
    return warm + sampling + kernel


def case_cost(c: dict, timing: dict, seen: dict) -> list[tuple[str, float]]:
    """The parts of one validation case's predicted time; ``seen`` carries what a worker compiled already."""
    k = kernel_s(c)
    parts = [("measure", cost("case_fixed") + cost("energy_loop") + timing_s(k, timing) + 3 * k)]
    if c["variant"] == "sdpa" and c["params"].get("backend") == "cudnn":
        parts.append(("cuDNN plan", cost("cudnn_plan")))
    if c["variant"] == "flex":
        if not seen.get("flex_probe"):
            seen["flex_probe"] = True
            parts.append(("flex probe compile", cost("flex_probe")))
        compile_key = "flex_compile_fwd_bwd" if c.get("mode") == "fwd_bwd" else "flex_compile_fwd"
        parts.append((f"flex compile ({c.get('mode')})", cost(compile_key)))
    if c["variant"] == "triton":
        if not seen.get("triton_launcher"):
            seen["triton_launcher"] = True
            parts.append(("Triton launcher build (cc)", cost("triton_launcher")))
        key = triton_key(c)
        if key not in seen.setdefault("triton_keys", set()):
            seen["triton_keys"].add(key)
            n = triton_configs(c["seq_len"], c["head_dim"], bool(c.get("causal")))
            parts.append((f"autotune {n} configs", n * (cost("triton_compile") + cost("triton_bench"))))
    return parts


# -- per-step predictions ---------------------------------------------------------------------------


def _process(cold: bool = False) -> list[tuple[str, float]]:
    return [("start python + import torch" + (" (cold)" if cold else ""),
             cost("python_start") + cost("torch_import_cold" if cold else "torch_import")),
            ("CUDA init", cost("cuda_init"))]


def predict(step: Step, cases: list[dict], timing: dict) -> list[tuple[str, float]]:
    """The parts of a step's predicted wall time on an H100."""
    if step.key == "env":
        smoke = smoke_case()
        smoke_timing = dict(warmup=3, min_time_s=0.1, min_reps=10, max_reps=100, max_time_s=1.0)
        return _process(cold=True) + [("environment capture", cost("env_capture")),
                                      ("smoke timing", 0.5 + timing_s(kernel_s(smoke), smoke_timing))]
    if step.key == "calibrate":
        draws = sum(2 * n * n for n in (512, 1024, 2048, 4096, 8192, 16384))
        per_dtype = draws / cost("randn_per_s") + 3 * 2 * 16384**3 / (cost("matmul_tflops") * 1e12) + 1.5
        bandwidth = 2**28 / cost("randn_per_s") + 1.5
        return _process() + [("matmul bf16 + fp16", 2 * per_dtype), ("copy bandwidth", bandwidth)]
    if step.key == "validate":
        parts = _process() + [("environment capture", cost("env_capture")), ("suite, tables", cost("bench_overhead")),
                              ("worker start", cost("torch_import") + cost("cuda_init"))]
        seen: dict = {}
        for c in cases:
            label = f"{c['variant']}{'-' + c['params']['backend'] if 'backend' in c['params'] else ''} " \
                    f"{c.get('mode', 'fwd')} B{c['batch']} L{c['seq_len']} D{c['head_dim']} {c.get('dtype')}"
            parts.append((label, sum(s for _, s in case_cost(c, timing, seen))))
        return parts
    if step.key == "drill":
        return _process() + [("environment capture", cost("env_capture")), ("suite, tables", cost("bench_overhead")),
                             ("2 worker starts (one replaced after the CUDA error)",
                              2 * (cost("torch_import") + cost("cuda_init"))),
                             ("Triton launcher + tiny kernel", cost("triton_launcher") + cost("triton_compile")),
                             ("5 tiny cases", 5 * (cost("case_fixed") * 0.5 + cost("energy_loop")))]
    if step.key == "crosscheck":
        parts = _process()
        for c in CROSSCHECK:
            per_run = CROSSCHECK_METHODS * (CROSSCHECK_MIN_TIME_S + 0.1)
            parts.append((f"sdpa B{c['batch']} L{c['seq_len']} D{c['head_dim']}{' causal' if c['causal'] else ''}",
                          CROSSCHECK_RUNS * per_run + 0.5))
        return parts
    if step.key == "sweep":
        tuned = triton_configs(SWEEP_TUNED["seq_len"], SWEEP_TUNED["head_dim"], SWEEP_TUNED["causal"])
        warm = any(c["variant"] == "triton" and triton_key(c) == triton_key(SWEEP_TUNED) for c in cases)
        per = cost("triton_cache_load") if warm else cost("triton_compile")
        return _process() + [("Triton launcher build (cc)", cost("triton_launcher")),
                             (f"{len(SWEEP)} fixed-config compiles", len(SWEEP) * (cost("triton_compile") + 0.05)),
                             (f"autotune FA2 shape: {tuned} configs "
                              f"({'cached by the validation run' if warm else 'cold'})",
                              tuned * (per + cost("triton_bench")) + 1.0)]
    if step.key == "devices":
        memory = sum(cost("case_fixed") + cost("energy_loop") + 0.3 for _ in MEMORY_CASES)
        return _process() + [("telemetry", 0.5 + cost("energy_loop")), ("idle, then warm-up", cost("idle_sleep") + 0.5),
                             ("memory cases", memory)]
    if step.key == "summary":
        return [("start python + import pandas", cost("python_start") + cost("pandas_import")),
                ("read, compare, write", 1.0)]
    raise KeyError(step.key)


def plan(steps=STEPS, suite: Path = SUITE, predictions: bool = True) -> dict:
    """Every step with its timeout and (``predictions``: imports torch, see :func:`triton_configs`) its
    predicted time, the validation cases, the totals and the files."""
    cases, timing = suite_cases(suite)
    out = []
    for step in steps:
        step = Step(**{k: getattr(step, k) for k in ("key", "title", "timeout_s", "kind", "grace_s",
                                                      "needs_compiler", "what")})
        if predictions:
            parts = predict(step, cases, timing)
            step.parts = [(name, round(s, 2)) for name, s in parts]
            step.predicted_s = round(sum(s for _, s in parts), 1)
        out.append(step)
    return {"steps": out, "cases": cases, "timing": timing,
            "timeouts_s": sum(s.timeout_s for s in out), "predicted_s": round(sum(s.predicted_s for s in out), 1),
            "budget_s": BUDGET_S, "files": list(FILES)}


def plan_json(p: dict) -> dict:
    """:func:`plan` as JSON-ready data."""
    return {**{k: v for k, v in p.items() if k != "steps"},
            "steps": [{"key": s.key, "title": s.title, "timeout_s": s.timeout_s, "kind": s.kind, "grace_s": s.grace_s,
                       "needs_compiler": s.needs_compiler, "what": s.what, "predicted_s": s.predicted_s,
                       "parts": s.parts} for s in p["steps"]],
            "costs": {name: {"value": f.value, "source": f.source} for name, f in COST.items()}}


def case_label(c: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(c["params"].items()))
    length = f"L{c['seq_len']}" if c.get("q_len") is None else f"Lq{c['q_len']} Lkv{c['seq_len']}"
    kv = f"/{c['kv_heads']}" if c["kv_heads"] != c["heads"] else ""
    return (f"{c['variant']}{'(' + params + ')' if params else ''} {c.get('dtype')} {c.get('mode', 'fwd')} "
            f"B{c['batch']} H{c['heads']}{kv} {length} D{c['head_dim']}{' causal' if c.get('causal') else ''}")


def format_plan(p: dict) -> str:
    """The plan as text (``p``: :func:`plan` or :func:`plan_json`)."""
    steps = [s if isinstance(s, dict) else plan_json({"steps": [s]})["steps"][0] for s in p["steps"]]
    lines = [f"GPU check plan: {len(steps)} steps, each in its own process with a hard timeout",
             f"{'#':>2} {'step':58} {'timeout':>8} {'predicted':>10}"]
    for i, s in enumerate(steps, 1):
        lines.append(f"{i:2d} {s['title'][:58]:58} {s['timeout_s']:7.0f}s {s['predicted_s']:9.1f}s")
    lines.append(f"   {'total':58} {p['timeouts_s']:7.0f}s {p['predicted_s']:9.1f}s   (budget {p['budget_s']:.0f} s)")
    lines += ["", f"validation cases ({len(p['cases'])}, in order; {p['timing'].get('processes', 2)} process each):"]
    lines += [f"  {i:2d}. {case_label(c)}" for i, c in enumerate(p["cases"], 1)]
    lines += ["", "where the time goes (predicted on an H100):"]
    for s in steps:
        lines.append(f"  {s['key']}: " + "; ".join(f"{n} {v:.1f}s" for n, v in s["parts"] if v >= 0.05))
    lines += ["", f"files that come back under $OUT (at most {MAX_FILES}, each < {MAX_FILE_BYTES // 2**20} MiB): "
              + ", ".join(p["files"])]
    return "\n".join(lines)


def format_costs() -> str:
    return "\n".join(f"  {name:22} {f.value:>9g}  {f.source}" for name, f in COST.items())


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print the GPU check's plan: steps, timeouts, predicted times "
                                                 "(cost model), validation cases, files.")
    parser.add_argument("--json", metavar="FILE", help="also write the plan as JSON to FILE")
    parser.add_argument("--costs", action="store_true", help="also list the cost model's figures and sources")
    args = parser.parse_args(argv)
    p = plan()
    print(format_plan(p))
    if args.costs:
        print("\ncost model:\n" + format_costs())
    if args.json:
        Path(args.json).write_text(json.dumps(plan_json(p), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
