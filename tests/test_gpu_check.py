"""benchmarks/gpu_check.py on a CPU: its time plan, its rehearsal against the fake GPU, and the rules
that live in the check itself: the validation suite's cases and order, a fixed timeout per step, the
files that come back, a C compiler found first, no pip, no CUDA context in the checker, other GPU
processes named. The rules that live elsewhere are tested there: graph replays, host-bound rows and
paged flex on CUDA in tests/test_gpu_paths.py, the energy loop in tests/test_telemetry.py, the
Triton autotuner's key in tests/test_variant_triton.py.

The rehearsal (``--rehearse``) runs once per session (a module fixture, about a minute on the 2-core CI
VM): every step in its own process with its real timeout, against the fake CUDA of tests/fake_cuda.py
and the fake NVML of tests/test_telemetry.py. No test here judges how fast anything ran.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks")]

import gpu_check  # noqa: E402
import gpu_plan  # noqa: E402
import gpu_summary  # noqa: E402


def checker(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One rehearsal: (the process, its work directory, its $OUT)."""
    work = tmp_path_factory.mktemp("rehearsal")
    out = work / "out"
    proc = checker("--rehearse", "--work", str(work), "--out", str(out))
    return proc, work, out


# -- the rehearsal: every step runs, the plan fits, the files come back ------------------------------


def test_rehearsal_runs_every_step_and_predicts_under_seven_minutes(rehearsal):
    proc, work, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    plan = data["plan"]
    assert [s["key"] for s in plan["steps"]] == [s.key for s in gpu_plan.STEPS]
    for step in plan["steps"]:  # every step has a hard timeout and a prediction that fits inside it
        assert step["timeout_s"] > 0 and 0 < step["predicted_s"] <= 0.9 * step["timeout_s"], step
    assert sum(s["timeout_s"] for s in plan["steps"]) <= gpu_plan.BUDGET_S == 420
    assert plan["predicted_s"] <= 420
    assert [s["status"] for s in data["steps"]] == ["pass"] * (len(gpu_plan.STEPS) - 1)  # the summary wrote this
    assert "GPU check plan" in proc.stdout and "predicted" in proc.stdout and "files that come back" in proc.stdout
    for name in ("triton_compile", "cuda_init", "torch_import_cold", "flex_compile_fwd"):
        assert name in plan["costs"] and plan["costs"][name]["source"]


def test_rehearsal_brings_back_at_most_8_small_files(rehearsal):
    """The run's tables, run.json, the calibration and the log come back, not only the summary."""
    _, work, out = rehearsal
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_plan.FILES) and len(files) <= gpu_plan.MAX_FILES
    assert all((out / f).stat().st_size < gpu_plan.MAX_FILE_BYTES for f in files)
    rows = pd.read_parquet(out / "results.parquet")
    assert len(rows) == len(gpu_plan.suite_cases()[0]) and set(rows["status"]) == {"skipped"}
    assert json.loads((out / "run.json").read_text())["suite"]["name"] == "gpu-check"
    assert "bfloat16" in json.loads((out / "calibration.json").read_text())["entries"]["cuda"]["matmul"]
    log = (out / "gpu_check.log").read_text()
    assert "== validation suite" in log and "skipped" in log


def test_the_summary_is_labelled_and_ends_with_the_comparison(rehearsal):
    _, _, out = rehearsal
    md = (out / "gpu_check.md").read_text()
    assert "REHEARSAL" in md.splitlines()[0] + md.splitlines()[2] and "none is a measurement" in md
    assert [ln for ln in md.splitlines() if ln.startswith("## ")][-1] == "## The comparison"
    comparison = md[md.index("## The comparison"):]
    for figure in ("sdpa-flash fwd bf16 TFLOP/s", "335 (FA2, published)", "% of the measured bf16 matmul peak",
                   "flex ÷ sdpa-flash", "~90% (published, forward)", "~85% (published, backward)",
                   "our Triton kernel ÷ sdpa-flash", "harness ÷ triton do_bench", "check: crash drill"):
        assert figure in comparison, figure
    assert comparison.count("harness ÷ triton do_bench:") == 3  # three cases


def test_the_checker_never_imports_torch_and_excludes_itself(rehearsal):
    """The checker holds no CUDA context (it never imports torch), and the environment step does
    not count the checker (which the fake NVML lists on the GPU) as another process."""
    _, work, out = rehearsal
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["parent_imported_torch"] is False
    env = next(s for s in data["steps"] if s["step"] == "env")
    assert env["other_processes"] == [] and env["status"] == "pass"
    assert "fake CUDA" in env["gpu"] and "smoke_tflops" in env["figures"]


def test_the_steps_run_from_the_checkout_without_installing(rehearsal):
    """No step runs pip; every step gets the checkout on PYTHONPATH; the versions found are reported."""
    _, work, out = rehearsal
    check = gpu_check.Check(work / "commands", work / "commands" / "out", rehearse=False,
                            args=type("A", (), {"refuse_shared": False})())
    for step in gpu_plan.STEPS:
        cmd, env = check.command(step)
        assert "pip" not in " ".join(cmd) and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
        assert cmd[0] == sys.executable
    pre = json.loads((out / "gpu_check.json").read_text())["preflight"]
    assert pre["versions"]["torch"] and pre["versions"]["pandas"] and set(pre["absent_expected"]) >= {"flash-attn",
                                                                                                     "xformers"}
    source = "".join((ROOT / "benchmarks" / f).read_text() for f in ("gpu_check.py", "gpu_check_steps.py"))
    assert '"pip"' not in source and "'pip'" not in source


def test_import_turns_the_files_into_a_reference_directory_with_a_report(rehearsal, tmp_path):
    """The README's import command; a rehearsal is refused unless asked for (it is no measurement)."""
    _, _, out = rehearsal
    proc = checker("--import", str(out), "--to", str(tmp_path / "refused"))
    assert proc.returncode == 2 and "rehearsal" in proc.stdout and "Traceback" not in proc.stderr
    assert gpu_summary.import_files(out, tmp_path, allow_rehearsal=True) == 0
    (gpu_dir,) = tmp_path.iterdir()
    assert "REHEARSAL" in gpu_dir.name
    assert (gpu_dir / "run" / "results.parquet").is_file() and (gpu_dir / "run" / "report.html").is_file()
    assert (gpu_dir / "gpu_check.md").is_file() and (gpu_dir / "calibration.json").is_file()


def test_reference_runs_are_not_ignored_by_git():
    """results/reference/ is committed (the rest of results/ stays ignored)."""
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert not ignored("results/reference/NVIDIA-H100/run/results.parquet")
    assert ignored("results/gpu-check/20990101-000000/check.json") and ignored("results/runs/x/results.parquet")


# -- the plan: the validation suite, the order, the timeouts ----------------------------------------


def test_the_validation_suite_is_about_20_cases_one_process_fa2_shape_first():
    """The validation suite: processes = 1 (a row is final after its one round), the most valuable cases first,
    no peer library the GPU image lacks; the planner's reading of the suite matches the harness's."""
    from harness.engine.suite import load_suite

    suite = load_suite(gpu_plan.SUITE)
    assert suite.timing.processes == 1 and suite.timing.max_time_s <= 0.5
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(gpu_plan.SUITE), "--dry-run"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.strip().splitlines()
    cases, _ = gpu_plan.suite_cases()
    assert 15 <= len(cases) <= 24 and len(listed) == len(cases)
    for line, c in zip(listed, cases):
        assert line.split("(")[0].split()[0] == c["variant"]
        assert f" {c['dtype']} {c['mode']} B{c['batch']} H{c['heads']}" in line
        assert (" causal" in line) == bool(c["causal"]) and f"D{c['head_dim']}" in line
    assert listed[0] == "sdpa(backend=flash) cuda bfloat16 fwd B1 H16 L16384 D128"
    variants = {c["variant"] for c in cases}
    assert {"sdpa", "flex", "triton", "decode_split_k", "paged"} <= variants
    assert not variants & {"flash_attn", "flash_attn3", "flash_attn4", "flashinfer", "xformers"}
    assert {c["params"].get("backend") for c in cases if c["variant"] == "sdpa"} >= {"flash", "efficient", "cudnn"}
    fwd_bwd = {(c["variant"], c["params"].get("backend")) for c in cases if c["mode"] == "fwd_bwd"}
    assert fwd_bwd == {("sdpa", "flash"), ("flex", None)}
    compiling = [i for i, c in enumerate(cases) if c["variant"] in ("flex", "triton")]
    assert compiling == list(range(len(cases) - len(compiling), len(cases)))  # the cheap cases first


def test_if_compiles_take_twice_the_estimate_the_cut_still_keeps_the_comparison(monkeypatch):
    """The order's point: with every compile figure of the cost model doubled, the cases the validation
    step still finishes within its timeout include every sdpa and decode case and the first flex and
    Triton cases at the FA2 shape."""
    for name in ("triton_compile", "flex_probe", "flex_compile_fwd", "flex_compile_fwd_bwd"):
        monkeypatch.setitem(gpu_plan.COST, name, gpu_plan.Figure(2 * gpu_plan.cost(name), "doubled"))
    p = gpu_plan.plan()
    validate = next(s for s in p["steps"] if s.key == "validate")
    assert validate.predicted_s > validate.timeout_s  # the step is cut ...
    elapsed, done = 0.0, []
    for name, seconds in validate.parts:
        elapsed += seconds
        if elapsed <= validate.timeout_s - validate.grace_s:
            done.append(name)
    cases = [n for n in done if " B" in n]
    assert sum(n.startswith(("sdpa", "decode_split_k", "paged")) for n in cases) == 13
    assert "flex fwd B1 L16384 D128 bfloat16" in cases and "triton fwd B1 L16384 D128 bfloat16" in cases


def test_every_step_has_a_fixed_timeout_and_they_add_up_to_7_minutes():
    """No budget arithmetic can leave a step a second: each step has its own fixed timeout, the
    validation suite's covers its prediction (Triton autotuning and FlexAttention compiles included)."""
    p = gpu_plan.plan()
    assert sum(s.timeout_s for s in p["steps"]) <= 420
    validate = next(s for s in p["steps"] if s.key == "validate")
    assert validate.predicted_s <= 0.9 * validate.timeout_s
    seen: dict = {}
    parts = [name for c in p["cases"] for name, _ in gpu_plan.case_cost(c, p["timing"], seen)]
    assert "flex probe compile" in parts and "flex compile (fwd_bwd)" in parts and "cuDNN plan" in parts
    assert parts.count("autotune 18 configs") == 1  # H100's candidates for the FA2 key, tuned once
    assert gpu_plan.triton_configs(16384, 128, False) == 18 and len(seen["triton_keys"]) == 2
    assert all(s.kind in ("python", "bench") and s.timeout_s > s.grace_s >= 0 for s in p["steps"])


def test_a_step_that_overruns_is_killed_its_output_kept_and_the_next_step_runs(tmp_path):
    """A step past its timeout is killed (its whole process group), what it wrote stays, and the
    checker goes on with the next step."""
    args = type("A", (), {"refuse_shared": False})()
    check = gpu_check.Check(tmp_path / "work", tmp_path / "out", rehearse=True, args=args)
    short = gpu_plan.Step("crosscheck", "cross-check with a 2 s timeout", 2.0, "python")
    result = check.run_step(short)
    assert result["status"] == "timeout" and "partial output kept" in result["summary"]
    partial = json.loads((tmp_path / "work" / "steps" / "crosscheck.json").read_text())
    assert partial["status"] == "running"  # what the step had written when it was killed
    nxt = check.run_step(gpu_plan.Step("calibrate", "calibration", 60.0, "python"))
    assert nxt["status"] == "pass"
    assert [r["status"] for r in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]] == [
        "timeout", "pass"]


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (a zombie counts: it runs nothing), waiting up to ``wait_s``
    for the kernel to deliver the kill."""
    import time

    end = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True
        if "zombie" in state or "(dead)" in state:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


def test_timeouts_kill_the_whole_group_and_bench_gets_sigint_first(tmp_path):
    child = tmp_path / "child.py"
    child.write_text("import signal, subprocess, sys, time\n"
                     "p = subprocess.Popen(['sleep', '60'])\n"
                     "print('grandchild', p.pid, flush=True)\n"
                     "def stop(*a):\n    print('SIGINT: writing the tables', flush=True); sys.exit(0)\n"
                     "signal.signal(signal.SIGINT, stop) if 'grace' in sys.argv else None\n"
                     "time.sleep(60)\n")
    log = tmp_path / "a.log"
    rc, ended = gpu_check.run_with_timeout([sys.executable, str(child)], dict(os.environ), log, 2.0)
    assert ended == "killed"
    assert gone(int(log.read_text().split()[1]))
    rc, ended = gpu_check.run_with_timeout([sys.executable, str(child), "grace"], dict(os.environ), log, 5.0,
                                           grace_s=3.0)
    assert ended == "interrupted" and rc == 0 and "writing the tables" in log.read_text()
    assert gone(int(log.read_text().split()[1]))  # the group is killed after the step ends too


def test_a_run_cut_before_its_tables_is_rebuilt_from_its_logs(tmp_path):
    """A validation run killed before writing results.parquet still brings its rows back."""
    suite = tmp_path / "s.toml"
    suite.write_text('[defaults]\nheads = 2\nhead_dim = 16\nseq_len = 64\n[timing]\nwarmup = 1\nmin_time_s = 0.0\n'
                     'max_reps = 3\nprocesses = 1\n[[variant]]\nname = "naive"\n[[variant]]\nname = "sdpa"\n')
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "-o", str(run), "--isolation", "none",
                           "--no-report", "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    (run / "results.parquet").unlink()
    (run / "samples.parquet").unlink()
    assert len(gpu_check.rows_log(run)) == 2  # the checker reads rows.jsonl without pandas
    rows = gpu_summary.materialise(run)
    assert len(rows) == 2 and (run / "results.parquet").is_file() and (run / "samples.parquet").is_file()


# -- the compiler, bad input, no GPU ------------------------------------------------------------------


def test_without_a_c_compiler_the_check_stops_at_once_with_one_line(tmp_path):
    """Triton builds its launcher with $CC, gcc or clang; without one the check says so first."""
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env["PATH"] = str(tmp_path)  # no gcc, no clang
    proc = checker("--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "gpu_check: no C compiler" in proc.stdout and "--without-compiler" in proc.stdout
    assert "== " not in proc.stdout  # no step ran
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["preflight"]["compiler"]["path"] is None
    env["CC"] = "/nonexistent/cc"
    assert gpu_check.find_compiler(env) == (None, "CC=/nonexistent/cc (not found)")
    fake = tmp_path / "clang"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    del env["CC"]
    assert gpu_check.find_compiler(env) == (str(fake), "clang")


def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path):
    proc = checker("--only", "nonsense")
    assert proc.returncode == 2 and proc.stdout.startswith("gpu_check: unknown step nonsense") and not proc.stderr
    proc = checker("--import", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "holds no gpu_check.json" in proc.stdout and not proc.stderr
    (tmp_path / "file").write_text("")
    proc = checker("--work", str(tmp_path / "file" / "work"))  # a work directory that cannot be made
    assert proc.returncode == 2 and proc.stdout.startswith("gpu_check: ") and not proc.stderr


def test_without_a_gpu_the_check_stops_at_the_environment_step(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    proc = checker("--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--only", "env", "validate",
                   "--without-compiler")
    assert proc.returncode == 2, proc.stdout[-2000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in data["steps"]}
    assert steps["env"]["status"] == "fail" and "sees no CUDA GPU" in steps["env"]["summary"]
    assert (steps["validate"]["status"] == "skip"
            and "sees no CUDA GPU" in (tmp_path / "out" / "gpu_check.md").read_text())


def test_crash_drill_suite_lists_its_five_cases():
    path = Path(__import__("tempfile").mkdtemp()) / "drill.toml"
    path.write_text(gpu_check.drill_suite())
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(path), "--dry-run"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == [v for v, _, _ in gpu_plan.DRILL]
    rows = [{"variant": v, "seq_len": n, "status": s} for v, n, s in reversed(gpu_plan.DRILL)]
    assert gpu_check.judge_drill(rows, rehearse=False)["status"] == "pass"
    rows[0]["status"] = "error"  # a Triton kernel that could not even build: not the sticky CUDA error wanted
    assert gpu_check.judge_drill(rows, rehearse=False)["status"] == "fail"


# -- the comparison, from a results table ---------------------------------------------------------


def _row(variant, shape, ms, backend=None, mode="fwd", status="ok", tflops=True, pct=None):
    from harness.core.cases import Case
    from harness.core.flops import attention_flops, total_flops

    case = Case(variant, {"backend": backend} if backend else {}, device="cuda", mode=mode, dtype="bfloat16",
                kv_heads=shape["heads"], **shape)
    flops = total_flops(attention_flops(case), mode)
    return {"variant": variant, "params": json.dumps(case.params), "mode": mode, "dtype": "bfloat16", "causal": False,
            "batch": shape["batch"], "heads": shape["heads"], "seq_len": shape["seq_len"],
            "head_dim": shape["head_dim"], "q_len": None, "status": status, "reason": "", "flops": flops,
            "time_ms": ms, "tflops_per_s": flops / ms / 1e9 if tflops else math.nan, "pct_of_peak": pct}


def test_the_comparison_reads_the_results_table_whoever_derived_its_rates():
    """The rate columns may come from the worker or the parent: the comparison reads them, or derives them
    from flops and time_ms where a row lacks them."""
    fa2, s2 = gpu_summary.FA2, gpu_summary.S2
    rows = pd.DataFrame([
        _row("sdpa", fa2, 7.0, "flash", tflops=False), _row("flex", fa2, 7.0 / 0.9), _row("triton", fa2, 14.0),
        _row("sdpa", fa2, 25.0, "flash", mode="fwd_bwd"), _row("flex", fa2, 25.0 / 0.8, mode="fwd_bwd"),
        _row("sdpa", s2, 1.0, "flash"), _row("sdpa", fa2, 1.0, "cudnn", status="error"),
    ])
    calibration = {"entries": {"cuda": {"matmul": {"bfloat16": {"tflops_per_s_best": 700.0}}}}}
    steps = [{"step": "crosscheck", "status": "pass", "figures": {"crosscheck": [
        {"case": "c1", "method": "harness", "reference": "triton do_bench", "ratio": 1.01, "within_goal": True}]}},
        {"step": "drill", "title": "crash drill", "status": "fail", "summary": "statuses wrong"}]
    got = {c["figure"]: c for c in gpu_summary.comparison(rows, calibration, steps)}
    flash = got["sdpa-flash fwd bf16 TFLOP/s, B1 H16 L16384 D128"]
    assert float(flash["ours"]) == pytest.approx(314.2, abs=0.1) and flash["verdict"] == "94% of FA2's figure"
    assert got["sdpa-flash fwd bf16, % of the measured bf16 matmul peak"]["ours"] == "44.9%"
    assert got["flex ÷ sdpa-flash, FA2 shape fwd"]["ours"] == "90%"
    assert got["flex ÷ sdpa-flash, FA2 shape fwd+bwd"]["ours"] == "80%"
    assert "below" in got["flex ÷ sdpa-flash, FA2 shape fwd+bwd"]["verdict"]
    assert got["our Triton kernel ÷ sdpa-flash, FA2 shape fwd bf16"]["ours"] == "50%"
    assert got["flex ÷ sdpa-flash, B4 L4096 D64 fwd"]["ours"] == "not measured"
    assert got["sdpa-cudnn fwd bf16 TFLOP/s, FA2 shape"]["ours"].startswith("error")
    assert got["harness ÷ triton do_bench: c1 (harness)"]["verdict"] == "within"
    assert got["check: crash drill"]["ours"] == "FAIL"


def test_other_processes_on_the_gpu_are_named_and_the_checker_is_not_one(tmp_path, monkeypatch):
    """With a fake NVML: the environment step drops the checker's pid and its own from NVML's list; a
    real other process makes the step warn (a one-shot window is not thrown away), or stop with
    --refuse-shared."""
    import types

    import gpu_check_steps as steps
    import torch

    from harness.measure import environment

    me, parent = os.getpid(), 4000
    record = {"other_processes": [{"pid": me, "used_memory_bytes": 1}, {"pid": parent, "used_memory_bytes": 0},
                                  {"pid": 4242, "used_memory_bytes": 3 * 2**30}]}
    env = {"machine": {"gpu": {"name": "FAKE GPU", "record": record}, "fingerprint": "f"},
           "versions": {"torch": "x", "cuda": "y", "triton": "z"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(environment, "capture", lambda: env)
    monkeypatch.setattr(steps, "smoke", lambda ctx, res: res.set(status="warn" if res.data.get("shared") else "pass"))
    real_plan = gpu_plan.plan
    monkeypatch.setattr(gpu_plan, "plan", lambda: real_plan(predictions=False))  # the predictions import variants
    for refuse, status in ((False, "warn"), (True, "fail")):
        ctx = types.SimpleNamespace(work=tmp_path, parent_pid=parent, refuse_shared=refuse, rehearse=True)
        res = steps.Result(tmp_path, f"env-{refuse}")
        steps.step_env(ctx, res)
        assert res.data["other_processes"] == [{"pid": 4242, "used_memory_bytes": 3 * 2**30}]
        assert res.data["status"] == status and ("OTHER PROCESS" in res.data["summary"]) != refuse
        assert bool(res.data.get("fatal")) == refuse
