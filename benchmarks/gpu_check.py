#!/usr/bin/env python3
"""Validate the harness on one NVIDIA GPU (an H100 or H200), from a bare checkout, in under 8 minutes.

    python benchmarks/gpu_check.py [--budget-s 480] [--out DIR] [--allow-shared] [--skip STEP ...]

Steps, in order (each prints its result as soon as it ends; a step that does not fit in the time
left is skipped, and the summary says so):

1. environment: record the GPU, driver, clocks, power limit, precision flags (run.json's record);
   refuse to go on when another process uses the GPU (timings would be someone else's);
2. the CUDA tests that never ran on the CPU machines (pytest ``-k "cuda or gpu or triton"``);
3. the Triton kernel against float64: float16 and bfloat16, causal and not, head_dim 16/64/128/256,
   an odd length, grouped-query; one small shape under ``compute-sanitizer`` when it is installed;
4. a crash drill through the worker pool: ok → out-of-bounds kernel → ok → OOM → ok
   (``tests/plugins/cuda_faults.py``), expecting ok, cuda_error, ok, oom, ok;
5. ``bench calibrate --check``'s cross-check against ``triton.testing.do_bench`` and
   ``do_bench_cudagraph`` at L=1024 (goal: within ±3%);
6. warm-up and clocks after the GPU idled; 7. telemetry sanity (power, energy counter);
8. the memory budget and measured peaks against the variants' estimates;
9. ``bench calibrate`` and ``bench run suites/gpu-validate.toml`` (FlashAttention's benchmark grid)
   until the budget runs out, then a one-screen summary beside the published figures.

Results go to ``results/reference/<gpu>/`` (``gpu_check.json``, ``gpu_check.md``, the validation
run in ``validate/``) and, when ``$OUT`` is set (or ``--out``), the summary files are copied there
after every step, so a run cut short still leaves what it found. Exit status: 0 every step that ran
passed, 1 a step failed, 2 nothing could be checked (no GPU, a shared GPU, a broken install).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

#: modules the harness imports besides torch (pyproject's dependencies) and the tests need
NEEDED = ("numpy", "pandas", "pyarrow", "jinja2", "rich", "scipy", "matplotlib", "pynvml", "pytest")


def say(text: str = "") -> None:
    print(text, flush=True)


def ensure_installed() -> str | None:
    """Install the project (``pip install -e .``, keeping the installed torch) when the harness or
    one of its dependencies cannot be imported; None when ready, else why not (one line)."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed: install the CUDA build of torch you want first"
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing and importlib.util.find_spec("harness") is not None:
        return None
    say(f"installing the project (missing: {', '.join(missing) or 'the harness'}) with pip install -e . ...")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    steps = [pip + ["--no-deps", "-e", str(ROOT)]]
    packages = {"pynvml": "nvidia-ml-py"}
    if missing:  # the dependencies alone: never let pip swap the CUDA torch for another build
        steps.append(pip + [packages.get(m, m) for m in missing])
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return f"pip failed ({' '.join(cmd[3:])}): {tail[0]}"
    importlib.invalidate_caches()
    return None


class Check:
    """The time budget, the step results, and the summary files rewritten after every step."""

    def __init__(self, budget_s: float, out_dirs: list[Path]):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.out_dirs = out_dirs
        self.results: list[dict] = []
        self.environment: dict = {}
        self.gpu = "unknown-gpu"
        self.ref_dir: Path | None = None  # results/reference/<gpu>/, once the GPU is known

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def set_gpu(self, name: str) -> None:
        self.gpu = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unknown-gpu"
        self.ref_dir = ROOT / "results" / "reference" / self.gpu

    def run(self, number: int, name: str, fn, min_s: float, args) -> dict:
        left = self.left()
        if left < min_s:
            result = {"status": "skip", "summary": f"{left:.0f} s left, needs about {min_s:.0f} s"}
            elapsed = 0.0
        else:
            say(f"\n== step {number}: {name} ({left:.0f} s left)")
            start = time.monotonic()
            try:
                result = fn(self, args)
            except Exception as exc:  # a step's own failure is its result, and the next step runs
                result = {"status": "fail", "summary": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "traceback": traceback.format_exc()[-3000:]}
            elapsed = time.monotonic() - start
        result = {"step": number, "name": name, "seconds": round(elapsed, 1), **result}
        self.results.append(result)
        say(f"[step {number}] {name}: {result['status'].upper()} — {result.get('summary', '')} ({elapsed:.0f} s)")
        for line in result.get("lines", []):
            say("    " + line)
        self.write()
        return result

    def markdown(self) -> str:
        lines = [f"# GPU check: {self.gpu}", "", f"budget {self.budget_s:.0f} s, used {self.budget_s - self.left():.0f} s", "",
                 "| step | result | seconds | summary |", "|---|---|---|---|"]
        for r in self.results:
            lines.append(f"| {r['step']}. {r['name']} | {r['status']} | {r['seconds']} | {r.get('summary', '')} |")
        for r in self.results:
            if r.get("lines"):
                lines += ["", f"## {r['step']}. {r['name']}", "", "```", *r["lines"], "```"]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        data = {"gpu": self.gpu, "budget_s": self.budget_s, "environment": self.environment, "steps": self.results}
        for d in ([self.ref_dir] if self.ref_dir else []) + self.out_dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
                (d / "gpu_check.md").write_text(self.markdown())
            except OSError as exc:
                say(f"could not write the summary into {d}: {exc}")


# -- steps that run other processes -----------------------------------------------------------------


def step_environment(check: Check, args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "fail", "fatal": True, "summary": "torch sees no CUDA GPU here: nothing to check"}
    from harness.measure.environment import capture

    env = capture()
    check.environment = env
    gpu = env["machine"].get("gpu") or {}
    check.set_gpu(gpu.get("name") or torch.cuda.get_device_name(0))
    record = gpu.get("record") or {}
    lines = [f"{k}: {v}" for k, v in sorted(record.items()) if k != "other_processes"]
    others = record.get("other_processes") or []
    summary = f"{gpu.get('name')}, driver {gpu.get('driver')}, torch {env['versions']['torch']}, CUDA {env['versions']['cuda']}"
    if others:
        lines.append(f"other processes on the GPU: {others}")
        if not args.allow_shared:
            return {"status": "fail", "fatal": True, "lines": lines,
                    "summary": f"{len(others)} other process(es) use this GPU: refusing to measure (--allow-shared to go on)"}
    return {"status": "pass", "summary": summary, "lines": lines}


def _pytest_counts(text: str) -> dict[str, int]:
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}


def step_tests(check: Check, args) -> dict:
    # the tests that need a GPU (they skip on the CPU machines); the fakes of tests/test_gpu_paths.py run in CI
    files = ["tests/test_timing_adaptive.py", "tests/test_telemetry.py", "tests/test_variant_flex.py",
             "tests/test_variant_triton.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "cuda or gpu or triton"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, min(150.0, check.left() - 60)))
    except subprocess.TimeoutExpired as exc:
        return {"status": "fail", "summary": "pytest did not finish in its share of the budget",
                "lines": (exc.stdout or b"").decode(errors="replace").splitlines()[-15:] if isinstance(exc.stdout, bytes) else []}
    out = proc.stdout.strip().splitlines()
    counts = _pytest_counts(out[-1] if out else "")
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    status = "pass" if proc.returncode == 0 and counts.get("passed", 0) else "fail"
    lines = [ln for ln in out if "FAILED" in ln or "ERROR" in ln][:20] + out[-1:]
    return {"status": status, "summary": f"{counts.get('passed', 0)} passed, {failed} failed, "
                                         f"{counts.get('skipped', 0)} skipped", "lines": lines, "counts": counts}


#: (variant, seq_len, expected status), in the order they run (the lengths tell the rows apart)
DRILL = [("fault_cuda_ok", 64, "ok"), ("fault_cuda_oob", 80, "cuda_error"), ("fault_cuda_ok", 96, "ok"),
         ("fault_cuda_oom", 112, "oom"), ("fault_cuda_ok", 128, "ok")]


def drill_suite() -> str:
    plugin = ROOT / "tests" / "plugins" / "cuda_faults.py"
    entries = "\n".join(f'[[variant]]\nname = "{name}"\nseq_len = [{n}]\n' for name, n, _ in DRILL)
    return (f'name = "gpu-crash-drill"\nplugins = ["{plugin}"]\n[defaults]\ndevice = "cuda"\ndtype = "float16"\n'
            f"heads = 2\nhead_dim = 64\n[timing]\nwarmup = 1\nmin_time_s = 0.0\nmax_reps = 5\nmax_time_s = 0.2\nprocesses = 1\n"
            f"[run]\ncase_timeout_s = 120\n\n{entries}")


def step_crash_drill(check: Check, args) -> dict:
    import pandas as pd

    work = check.ref_dir / "crash-drill"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "drill.toml").write_text(drill_suite())
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(work / "drill.toml"), "-o", str(work / "run"),
                           "--quiet", "--no-report"], cwd=ROOT, capture_output=True, text=True,
                          timeout=max(30.0, check.left() - 30))
    try:
        rows = pd.read_parquet(work / "run" / "results.parquet").sort_values("seq_len")
    except Exception as exc:
        return {"status": "fail", "summary": f"no results (exit {proc.returncode}): {exc}",
                "lines": proc.stderr.strip().splitlines()[-10:]}
    got = list(rows["status"])
    want = [status for _, _, status in DRILL]
    lines = [f"{v} L={n}: {s} {r[:150]}" for v, n, s, r in zip(rows["variant"], rows["seq_len"], rows["status"], rows["reason"])]
    ok = got == want and proc.returncode == 0
    return {"status": "pass" if ok else "fail", "summary": f"statuses {got} (want {want})", "lines": lines}


def _bench(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_until(cmd: list[str], deadline_s: float, log: Path) -> tuple[int, bool]:
    """Run ``cmd`` until it ends or ``deadline_s`` passes; then SIGINT (``bench run`` finishes the case
    in flight and writes what it has), SIGKILL 60 s later. Returns (exit status, cut short)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=max(1.0, deadline_s)), False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                return proc.wait(timeout=60), True
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(), True


def step_validate(check: Check, args) -> dict:
    from gpu_check_steps import validation_summary

    lines = []
    cal = _bench(["calibrate", "--device", "cuda"], timeout=max(30.0, min(240.0, check.left() / 3)))
    lines.append(f"bench calibrate: exit {cal.returncode}; " + " | ".join(cal.stdout.strip().splitlines()[-6:]))
    run_dir = check.ref_dir / "validate"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "harness", "run", str(ROOT / "suites" / "gpu-validate.toml"), "-o", str(run_dir), "--quiet"]
    check.ref_dir.mkdir(parents=True, exist_ok=True)
    rc, cut = run_until(cmd, check.left() - 75, check.ref_dir / "validate.log")
    summary, table, status = validation_summary(run_dir, check.results)
    lines += table
    note = f"bench run exit {rc}" + ("; cut short by the budget (resume with: bench resume " + str(run_dir) + ")" if cut else "")
    return {"status": status if cal.returncode == 0 else "fail", "summary": f"{summary}; {note}", "lines": lines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget in seconds (default 480)")
    parser.add_argument("--out", help="also copy the summary here (default: $OUT when set)")
    parser.add_argument("--allow-shared", action="store_true", help="measure even when another process uses the GPU")
    parser.add_argument("--skip", type=int, nargs="*", default=[], metavar="STEP", help="step numbers to skip")
    args = parser.parse_args(argv)
    out = args.out or os.environ.get("OUT")
    check = Check(args.budget_s, [Path(out)] if out else [])
    problem = ensure_installed()
    if problem:
        check.results.append({"step": 0, "name": "install", "status": "fail", "seconds": 0, "summary": problem})
        check.write()
        say(f"gpu_check: {problem}")
        return 2
    os.chdir(ROOT)
    import gpu_check_steps as s

    steps = [(1, "environment", step_environment, 5), (2, "CUDA tests", step_tests, 45),
             (3, "Triton kernel against float64", s.step_triton, 20), (4, "crash drill", step_crash_drill, 40),
             (5, "timing cross-check (do_bench)", s.step_crosscheck, 30),
             (6, "warm-up and clocks after idle", s.step_idle, 25), (7, "telemetry", s.step_telemetry, 8),
             (8, "memory budget and peaks", s.step_memory, 15), (9, "calibrate and validation suite", step_validate, 100)]
    failed = False
    for number, name, fn, min_s in steps:
        if number in args.skip:
            check.results.append({"step": number, "name": name, "status": "skip", "seconds": 0, "summary": "--skip"})
            continue
        result = check.run(number, name, fn, min_s, args)
        failed |= result["status"] == "fail"
        if result.get("fatal"):
            say(f"\ngpu_check: stopped at step {number}: {result['summary']}")
            return 2
    say("\n" + check.markdown())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
