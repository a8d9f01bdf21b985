#!/usr/bin/env python3
"""Validate the harness on one NVIDIA GPU (H100 or H200) in one shot: certain to end within 8 minutes.

    python benchmarks/gpu_check.py                 # on the lent GPU, from the checkout ($OUT: where files go)
    python benchmarks/gpu_check.py --rehearse      # on any CPU machine: every step against a fake GPU
    python benchmarks/gpu_check.py --import DIR    # here: DIR's files -> results/reference/<gpu>/ + report
    python benchmarks/gpu_plan.py [--costs]        # the plan: steps, timeouts, predicted times, cases, files

It runs straight from the checkout with the packages it finds (no ``pip install``: the GPU machine has
no network), says which versions it found, and first checks for a C compiler (Triton builds its
launcher with one): without one it stops at once with one line (``--without-compiler`` runs the
steps that need none). Then each step of :data:`gpu_plan.STEPS` runs in its own process group with a
hard timeout, most valuable first: environment and a smoke timing, calibration, the validation suite
(``suites/gpu-check.toml``), the crash drill, the timing cross-check, the Triton sweep, telemetry and
memory, the summary. The timeouts add up to 7 minutes. A step that times out is killed (a ``bench
run`` first gets SIGINT, so it writes its tables) and leaves what it wrote; the next step runs.

This process never imports torch (so it holds no CUDA context, and every second it spends is inside
a step's timeout or trivial). Everything that comes back is in at most 8 files under ``$OUT`` (or
``--out``): the summary (gpu_check.md, gpu_check.json) ending with the comparison a reader wants, the
validation run's results.parquet, samples.parquet and run.json, the calibration, the log. Exit status:
0 every step passed (or warned), 1 a step failed or timed out, 2 nothing could be checked.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gpu_plan  # noqa: E402  (torch-free)

#: The packages the check uses (distribution names) and those the GPU image is known to lack.
PACKAGES = ("torch", "triton", "numpy", "pandas", "pyarrow", "scipy", "jinja2", "matplotlib", "nvidia-ml-py", "rich",
            "pytest", "hypothesis")
ABSENT_EXPECTED = ("flash-attn", "flashinfer-python", "xformers", "ray")
NEEDED = ("torch", "numpy", "pandas", "pyarrow", "jinja2", "pytest")


def say(text: str = "") -> None:
    print(text, flush=True)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_compiler(environ=os.environ) -> tuple[str | None, str]:
    """(path, how found) of the C compiler Triton would use: $CC, else gcc, else clang (triton's build.py)."""
    cc = environ.get("CC")
    if cc:
        path = shutil.which(cc, path=environ.get("PATH"))
        return path, f"CC={cc}" + ("" if path else " (not found)")
    for name in ("gcc", "clang"):
        path = shutil.which(name, path=environ.get("PATH"))
        if path:
            return path, name
    return None, "neither gcc nor clang on PATH, and CC unset"


def preflight(environ=os.environ) -> tuple[dict, list[str], bool]:
    """(what was found, fatal problems, has a C compiler): versions, Python, the compiler. Torch-free."""
    found = {"python": sys.version.split()[0], "executable": sys.executable,
             "versions": {p: version(p) for p in PACKAGES},
             "absent_expected": {p: version(p) for p in ABSENT_EXPECTED}}
    cc, how = find_compiler(environ)
    found["compiler"] = {"path": cc, "how": how}
    problems = [f"{p} is not installed (the check runs with the machine's packages; it installs nothing)"
                for p in NEEDED if found["versions"].get(p) is None]
    if found["versions"].get("torch") and importlib.util.find_spec("harness") is None:
        problems.append(f"the harness is not importable from {ROOT}")
    return found, problems, cc is not None


class Check:
    """The work directory, the step results, the log and the summary files written after every step."""

    def __init__(self, work: Path, out: Path, rehearse: bool, args):
        self.work, self.out, self.rehearse, self.args = work, out, rehearse, args
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.started_epoch = time.time()
        self.t0 = time.monotonic()
        self.results: list[dict] = []
        self.preflight: dict = {}
        self.plan = gpu_plan.plan(predictions=False)
        for d in (work, out, work / "logs", work / "steps"):
            d.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "gpu_check.log"

    def log(self, text: str = "", echo: bool = True) -> None:
        if echo:
            say(text)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def step_env(self) -> dict:
        return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                        if os.environ.get("PYTHONPATH") else ""),
                    PYTHONUNBUFFERED="1")

    def command(self, step: gpu_plan.Step) -> tuple[list[str], dict]:
        env, py = self.step_env(), sys.executable
        flags = ["--work", str(self.work), "--parent-pid", str(os.getpid())]
        flags += ["--rehearse"] if self.rehearse else []
        flags += ["--refuse-shared"] if self.args.refuse_shared else []
        if step.key == "calibrate" and not self.rehearse:
            return [py, "-m", "harness", "calibrate", "--device", "cuda", "--dtype", "bfloat16",
                    "--dtype", "float16"], env
        if step.key == "validate":
            return [py, "-m", "harness", "run", str(gpu_plan.SUITE), "-o", str(self.work / "validate"), "--quiet",
                    "--no-report"], env
        if step.key == "drill":
            (self.work / "drill").mkdir(exist_ok=True)
            (self.work / "drill" / "drill.toml").write_text(drill_suite())
            return [py, "-m", "harness", "run", str(self.work / "drill" / "drill.toml"), "-o",
                    str(self.work / "drill" / "run"), "--quiet", "--no-report"], env
        if step.key == "summary":
            return [py, str(ROOT / "benchmarks" / "gpu_summary.py"), "--work", str(self.work), "--out", str(self.out),
                    *(["--rehearse"] if self.rehearse else [])], env
        if step.key == "sweep" and self.rehearse:
            env["TRITON_INTERPRET"] = "1"  # the kernel on the CPU: the sweep's real code, float16, short lengths
        return [py, str(ROOT / "benchmarks" / "gpu_check_steps.py"), step.key, *flags], env

    def run_step(self, step: gpu_plan.Step) -> dict:
        cmd, env = self.command(step)
        log = self.work / "logs" / f"{step.key}.log"
        self.log(f"\n== {step.title} (timeout {step.timeout_s:.0f} s): {' '.join(cmd[1:])}", echo=True)
        start = time.monotonic()
        rc, ended = run_with_timeout(cmd, env, log, step.timeout_s, step.grace_s if step.kind == "bench" else 0.0,
                                     echo=lambda line: say("    " + line))
        seconds = time.monotonic() - start
        result = judge(self, step, rc)
        if ended != "exited":
            note = f"timed out after {step.timeout_s:.0f} s ({ended}); partial output kept"
            result = {**result, "status": "timeout", "summary": f"{note}; {result.get('summary', '')}".rstrip("; ")}
        result = {"step": step.key, "title": step.title, "seconds": round(seconds, 1), "timeout_s": step.timeout_s,
                  **result}
        self.results.append(result)
        with open(self.log_path, "a") as f:
            f.write(capped(log.read_text(errors="replace") if log.exists() else "", 2 * 2**20))
        self.log(f"[{step.key}] {result['status'].upper()}: {result.get('summary', '')} ({seconds:.0f} s)")
        self.write(interim=step.key != "summary")  # the summary step wrote the full summary into $OUT
        return result

    def data(self) -> dict:
        return {"rehearsal": self.rehearse, "started": self.started, "started_epoch": self.started_epoch,
                "budget_s": gpu_plan.BUDGET_S,
                "elapsed_s": round(time.monotonic() - self.t0, 1), "preflight": self.preflight,
                "plan": gpu_plan.plan_json(self.plan), "steps": self.results,
                "parent_imported_torch": "torch" in sys.modules}

    def write(self, interim: bool = True) -> None:
        """The check so far (WORK/check.json, which the summary step reads) and, ``interim``, a short
        summary (json and md) in $OUT, which the summary step replaces with the full one."""
        data = self.data()
        (self.work / "check.json").write_text(json.dumps(data, indent=2, default=str))
        if not interim:
            return
        lines = [f"# GPU check{' REHEARSAL (fake CUDA: no figure here is a measurement)' if self.rehearse else ''}",
                 "", "| step | result | seconds | timeout | summary |", "|---|---|---|---|---|"]
        lines += [f"| {r['title']} | {r['status']} | {r['seconds']} | {r['timeout_s']:.0f} | {r.get('summary', '')} |"
                  for r in self.results]
        try:
            (self.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
            (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
        except OSError as exc:
            say(f"could not write the summary into {self.out}: {exc}")


def capped(text: str, limit: int) -> str:
    """``text`` with its middle cut out when longer than ``limit`` characters."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + f"\n[... {len(text) - limit} characters cut ...]\n" + text[-half:]


def run_with_timeout(cmd: list[str], env: dict, log: Path, timeout_s: float, grace_s: float = 0.0,
                     echo=None, poll_s: float = 0.25) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, output to ``log`` (echoed line by line), for at most
    ``timeout_s``: with ``grace_s``, SIGINT at ``timeout_s - grace_s`` and again at half of the grace
    left (``bench run`` finishes or abandons its case and writes its tables); SIGKILL to the whole
    group at ``timeout_s``. Returns (exit status or None, "exited" | "interrupted" | "killed")."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    start, shown, sent, ended = time.monotonic(), 0, 0, "exited"
    marks = [timeout_s - grace_s, timeout_s - grace_s / 2] if grace_s > 0 else []
    while True:
        try:
            rc = proc.wait(timeout=poll_s)
            break
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - start
        shown = _echo(log, shown, echo)
        if sent < len(marks) and elapsed >= marks[sent]:
            _signal(proc, signal.SIGINT, group=False)
            sent += 1
            ended = "interrupted"
        if elapsed >= timeout_s:
            _signal(proc, signal.SIGKILL, group=True)
            rc, ended = proc.wait(), "killed"
            break
    _signal(proc, signal.SIGKILL, group=True)  # whatever the step left behind in its group
    _echo(log, shown, echo)
    return rc, ended


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _echo(log: Path, shown: int, echo) -> int:
    if echo is None:
        return shown
    try:
        with open(log, "rb") as f:
            f.seek(shown)
            chunk = f.read()
    except OSError:
        return shown
    complete = chunk.rfind(b"\n") + 1
    for line in chunk[:complete].decode(errors="replace").splitlines():
        echo(line)
    return shown + complete


# -- judging a step (torch-free, pandas-free: the steps' JSON, the runs' rows logs) -----------------------


def drill_suite() -> str:
    plugin = ROOT / "tests" / "plugins" / "cuda_faults.py"
    entries = "\n".join(f'[[variant]]\nname = "{name}"\nseq_len = [{n}]\n' for name, n, _ in gpu_plan.DRILL)
    return (f'name = "gpu-crash-drill"\nplugins = ["{plugin}"]\n[defaults]\ndevice = "cuda"\ndtype = "float16"\n'
            f"heads = 2\nhead_dim = 64\n[timing]\nwarmup = 1\nmin_time_s = 0.0\nmax_reps = 5\nmax_time_s = 0.2\n"
            f"processes = 1\n[run]\ncase_timeout_s = 60\n\n{entries}")


def rows_log(run_dir: Path) -> list[dict]:
    """The final rows a run has written so far (rows.jsonl, one JSON object a line; a torn last line skipped)."""
    rows = []
    try:
        text = (run_dir / "rows.jsonl").read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _tail(log: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").strip().splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def judge(check: Check, step: gpu_plan.Step, rc: int | None) -> dict:
    log = check.work / "logs" / f"{step.key}.log"
    if step.key == "validate":
        return judge_validate(rows_log(check.work / "validate"), len(check.plan["cases"]), check.rehearse)
    if step.key == "drill":
        return judge_drill(rows_log(check.work / "drill" / "run"), check.rehearse)
    if step.key == "calibrate" and not check.rehearse:
        ok = rc == 0
        return {"status": "pass" if ok else "fail", "summary": _tail(log, 4 if ok else 2) or f"exit {rc}"}
    if step.key == "summary":
        return {"status": "pass" if rc == 0 else "fail", "summary": _tail(log, 1) or f"exit {rc}"}
    path = check.work / "steps" / f"{step.key}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "fail", "summary": f"no result (exit {rc}): {_tail(log)}"}
    if result.get("status") == "running":
        result["status"] = "fail"
    return result


def judge_validate(rows: list[dict], planned: int, rehearse: bool) -> dict:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    text = f"{len(rows)} of {planned} cases have rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if rehearse:
        no_cuda = all(r.get("status") == "skipped" and "cuda" in str(r.get("reason", "")).lower() for r in rows)
        return {"status": "pass" if rows and len(rows) == planned and no_cuda else "fail",
                "summary": text + " (REHEARSAL: every case is skipped on a CPU)", "counts": counts}
    ok = counts.get("ok", 0)
    status = "fail" if not ok else ("pass" if ok == planned else "warn")
    bad = [f"{r.get('variant')} {r.get('mode')} L{r.get('seq_len')}: {r.get('status')} {str(r.get('reason'))[:120]}"
           for r in rows if r.get("status") != "ok"]
    return {"status": status, "summary": text, "counts": counts, "lines": bad[:20]}


def judge_drill(rows: list[dict], rehearse: bool) -> dict:
    got = [r.get("status") for r in sorted(rows, key=lambda r: r.get("seq_len", 0))]
    want = [s for _, _, s in gpu_plan.DRILL]
    if rehearse:
        ok = got == ["skipped"] * len(want)
        return {"status": "pass" if ok else "fail",
                "summary": f"statuses {got} (REHEARSAL: the CUDA-only fault variants are skipped on a CPU)"}
    return {"status": "pass" if got == want else "fail", "summary": f"statuses {got} (want {want})",
            "lines": [f"{r.get('variant')} L={r.get('seq_len')}: {r.get('status')} {str(r.get('reason'))[:150]}"
                      for r in sorted(rows, key=lambda r: r.get("seq_len", 0))]}


# -- the run --------------------------------------------------------------------------------------------


def collect(check: Check) -> list[str]:
    """Copy what comes back into $OUT (the summary step wrote gpu_check.md/json and, for a run that was
    cut, results.parquet/samples.parquet from its logs); returns the files there."""
    run = check.work / "validate"
    sources = {"results.parquet": run / "results.parquet", "samples.parquet": run / "samples.parquet",
               "run.json": run / "run.json"}
    import gpu_summary  # torch-free, pandas-free at import

    env = next((r for r in check.results if r["step"] == "env"), {})
    sources["calibration.json"] = gpu_summary.calibration_path(check.work, check.rehearse, env.get("fingerprint"),
                                                               check.started_epoch)
    notes = []
    for name, src in sources.items():
        if src is None or not src.is_file():
            notes.append(f"{name}: not produced ({src})")
        elif src.stat().st_size >= gpu_plan.MAX_FILE_BYTES:
            notes.append(f"{name}: {src.stat().st_size} bytes, over the limit: left out")
        else:
            shutil.copyfile(src, check.out / name)
    for note in notes:
        check.log(f"  {note}")
    for worker_log in sorted(check.work.glob("validate/logs/*.log")) + sorted(check.work.glob("drill/run/logs/*.log")):
        text = worker_log.read_text(errors="replace").strip()
        if text:  # the workers' stderr: compiler warnings, tracebacks of error rows
            check.log(f"\n== {worker_log.relative_to(check.work)}\n" + capped(text, 256 * 2**10), echo=False)
    log = capped(check.log_path.read_text(errors="replace"), gpu_plan.LOG_LIMIT_BYTES)
    (check.out / "gpu_check.log").write_text(log)
    return sorted(p.name for p in check.out.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearse", action="store_true", help="run every step on this CPU against a fake GPU")
    parser.add_argument("--out", help="where the files that come back go (default: $OUT, else WORK/out)")
    parser.add_argument("--work", help="work directory (default: results/gpu-check/<time>, rehearsal: a temp dir)")
    parser.add_argument("--import", dest="import_dir", metavar="DIR",
                        help="turn DIR's files (from a GPU run) into results/reference/<gpu>/ and render its report")
    parser.add_argument("--to", default=str(ROOT / "results" / "reference"),
                        help="--import: where (default %(default)s)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (keys: "
                        + ", ".join(s.key for s in gpu_plan.STEPS) + "); the summary always runs")
    parser.add_argument("--refuse-shared", action="store_true",
                        help="stop when another process uses the GPU (default: go on, and say so in every summary)")
    parser.add_argument("--without-compiler", action="store_true",
                        help="without a C compiler, run the steps that need none instead of stopping")
    args = parser.parse_args(argv)
    if args.import_dir:
        import gpu_summary

        return gpu_summary.import_files(Path(args.import_dir), Path(args.to))
    keys = {s.key for s in gpu_plan.STEPS}
    unknown = sorted(set(args.only or []) - keys)
    if unknown:
        say(f"gpu_check: unknown step {', '.join(unknown)} (steps: {', '.join(s.key for s in gpu_plan.STEPS)})")
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    work = Path(args.work) if args.work else (Path(tempfile.mkdtemp(prefix="gpu-check-rehearsal-")) if args.rehearse
                                              else ROOT / "results" / "gpu-check" / stamp)
    out = Path(args.out or os.environ.get("OUT") or work / "out")
    try:
        check = Check(work, out, args.rehearse, args)
    except (OSError, ValueError, KeyError) as exc:  # an unwritable directory, a suite that is not one case a table
        say(f"gpu_check: {type(exc).__name__}: {exc}")
        return 2
    found, problems, has_cc = preflight()
    check.preflight = found
    check.log(f"gpu_check{' --rehearse (fake GPU: no figure is a measurement)' if args.rehearse else ''}: "
              f"work {work}, files to {out}")
    check.log(f"Python {found['python']} ({found['executable']}); found: "
              + ", ".join(f"{p} {v or 'MISSING'}" for p, v in found["versions"].items()))
    check.log("not installed (none is needed): "
              + ", ".join(f"{p} {v or 'no'}" for p, v in found["absent_expected"].items()))
    check.log(f"C compiler: {found['compiler']['path'] or 'NONE'} ({found['compiler']['how']})")
    if not has_cc and args.rehearse:
        check.log("no C compiler: on a GPU machine the check would stop here (the rehearsal needs none)")
        has_cc = True
    elif not has_cc and not args.without_compiler:
        problems.append("no C compiler (Triton builds its launcher with $CC, gcc or clang): Triton, FlexAttention and "
                        "do_bench cannot run; install one, or rerun with --without-compiler for the rest")
    if problems:
        for p in problems:
            check.log(f"gpu_check: {p}")
        check.write()
        return 2
    steps = [s for s in check.plan["steps"] if (not args.only or s.key in args.only or s.key == "summary")]
    check.log("steps: " + "; ".join(f"{s.key} ({s.timeout_s:.0f} s)" for s in steps)
              + f"; timeouts add up to {sum(s.timeout_s for s in steps):.0f} s")
    fatal = False
    for step in steps:
        why = ("not run: the environment step failed" if fatal and step.key != "summary" else
               "not run: no C compiler" if step.needs_compiler and not has_cc else "")
        if why:
            check.results.append({"step": step.key, "title": step.title, "status": "skip", "seconds": 0,
                                  "timeout_s": step.timeout_s, "summary": why})
            check.log(f"[{step.key}] SKIP: {why}")
            check.write()
            continue
        result = check.run_step(step)
        fatal |= bool(result.get("fatal"))
        if step.key == "env" and (work / "plan.json").exists():
            check.log(gpu_plan.format_plan(json.loads((work / "plan.json").read_text())))
    files = collect(check)
    check.log(f"\n{len(files)} files in {out}: {', '.join(files)}")
    summary = out / "gpu_check.md"
    if summary.exists():
        say("\n" + summary.read_text())
    if fatal:
        return 2
    return 1 if any(r["status"] in ("fail", "timeout") for r in check.results) else 0


if __name__ == "__main__":
    sys.exit(main())
