"""Isolation, interruption and resume: one bad case never costs the rest of the run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.engine import store
from tests.runs import bench

PLUGIN = Path(__file__).parent / "plugins" / "faults.py"

FAULT_SUITE = f"""
name = "faults"
plugins = ["{PLUGIN}"]
[defaults]
heads = 2
head_dim = 16
seq_len = 32
[timing]
warmup = 1
min_time_s = 0.0
max_reps = 3
processes = 2
[run]
case_timeout_s = 8
[[variant]]
name = "fault_ok"
[[variant]]
name = "fault_raise"
[[variant]]
name = "fault_segfault"
[[variant]]
name = "fault_abort"
[[variant]]
name = "fault_hang"
[[variant]]
name = "fault_huge"
[[variant]]
name = "fault_alloc"
[[variant]]
name = "naive"
seq_len = [32, 48]
"""


def test_fault_suite_runs_to_completion_with_the_right_status_for_each(tmp_path):
    suite = tmp_path / "faults.toml"
    suite.write_text(FAULT_SUITE)
    out = tmp_path / "out"
    proc = bench("run", str(suite), "-o", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(out / "results.parquet")
    status = dict(zip(rows["variant"], rows["status"]))
    reason = dict(zip(rows["variant"], rows["reason"]))
    assert status["fault_ok"] == "ok"
    assert status["fault_raise"] == "error" and reason["fault_raise"] == "ValueError: this kernel always fails"
    assert status["fault_segfault"] == "crash" and "SIGSEGV" in reason["fault_segfault"]
    assert "about to dereference a null pointer" in reason["fault_segfault"]  # the tail of the worker's stderr
    assert status["fault_abort"] == "crash" and "SIGABRT" in reason["fault_abort"]
    assert status["fault_hang"] == "timeout" and "8 s" in reason["fault_hang"]
    assert status["fault_huge"] == "skipped" and "exceeds the memory budget" in reason["fault_huge"]
    assert status["fault_alloc"] == "oom" and "allocate" in reason["fault_alloc"]
    naive = rows[rows["variant"] == "naive"]
    assert list(naive["status"]) == ["ok", "ok"] and (naive["rel_err"] < 1e-5).all()
    ok = rows[rows["status"] == "ok"]
    assert (ok["time_ms"] > 0).all() and (ok["peak_mem_bytes"] > 0).all()
    assert (out / "report.html").exists()


def test_in_process_isolation_gives_the_same_rows_for_healthy_cases(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(f'plugins = ["{PLUGIN}"]\n[sweep]\nseq_len = [16, 32]\n[timing]\nmin_time_s = 0.0\nmax_reps = 2\n'
                     '[[variant]]\nname = "fault_ok"\n[[variant]]\nname = "fault_raise"\n')
    proc = bench("run", str(suite), "-o", str(tmp_path / "o"), "--quiet", "--isolation", "none")
    assert proc.returncode == 0, proc.stderr
    rows = store.read_results(tmp_path / "o")
    assert sorted(rows["status"]) == ["error", "error", "ok", "ok"]


SLOW_SUITE = f"""
name = "slow"
plugins = ["{PLUGIN}"]
[defaults]
heads = 2
head_dim = 16
[sweep]
seq_len = [16, 24, 32, 40, 48, 56, 64, 72]
[timing]
warmup = 1
min_time_s = 0.0
min_reps = 2
max_reps = 2
processes = 1
[[variant]]
name = "fault_slow"
"""


def _start(tmp_path, name="slow.toml", text=SLOW_SUITE):
    suite = tmp_path / name
    suite.write_text(text)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(suite), "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return suite, out, proc


def _wait_for_rows(out: Path, n: int, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = out / store.ROWS_LOG
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("run made no progress")


def test_sigkill_midway_then_resume_gives_every_case_exactly_once(tmp_path):
    suite, out, proc = _start(tmp_path)
    _wait_for_rows(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store.read_rows_log(out)
    assert 3 <= len(before) < 8
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "running"  # it never got to say otherwise

    resumed = bench("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {8 - len(before)} of 8 cases" in resumed.stderr
    rows = pd.read_parquet(out / "results.parquet")
    assert sorted(rows["seq_len"]) == [16, 24, 32, 40, 48, 56, 64, 72]
    assert rows["case_id"].is_unique and (rows["status"] == "ok").all()
    samples = pd.read_parquet(out / "samples.parquet")
    assert set(samples["case_id"]) == set(rows["case_id"])
    assert (samples.groupby("case_id").size() == 2).all()  # samples of no abandoned attempt
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_sigkill_between_rounds_then_resume_gives_every_case_once_from_all_processes(tmp_path):
    """Two processes per case: killed while the second process times the cases, no case of the
    second round has its final row yet; resume times them again in two fresh processes."""
    suite, out, proc = _start(tmp_path, text=SLOW_SUITE.replace("processes = 1", "processes = 2"))
    deadline = time.monotonic() + 120
    while not any(json.loads(line).get("process") == 1 for line in _lines(out / store.ROUNDS_LOG)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store.read_rows_log(out)
    assert len(before) < 8
    resumed = bench("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    rows = pd.read_parquet(out / "results.parquet")
    assert sorted(rows["seq_len"]) == [16, 24, 32, 40, 48, 56, 64, 72] and rows["case_id"].is_unique
    assert (rows["status"] == "ok").all() and (rows["processes"] == 2).all() and (rows["reps"] == 4).all()
    samples = pd.read_parquet(out / "samples.parquet")
    assert (samples.groupby(["case_id", "process"]).size() == 2).all() and len(samples) == 8 * 4
    assert json.loads((out / "run.json").read_text())["timing"]["processes"] == 2


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def test_sigint_stops_writes_a_report_and_exits_nonzero(tmp_path):
    suite, out, proc = _start(tmp_path)
    _wait_for_rows(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "bench resume" in stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted (SIGINT)"
    rows = pd.read_parquet(out / "results.parquet")
    assert 2 <= len(rows) < 8
    assert (out / "report.html").exists()

    resumed = bench("run", str(suite), "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert len(pd.read_parquet(out / "results.parquet")) == 8


def test_resume_refuses_a_changed_suite(tmp_path):
    suite, out, proc = _start(tmp_path)
    _wait_for_rows(out, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    changed = tmp_path / "changed.toml"
    changed.write_text(SLOW_SUITE.replace("72]", "80]"))
    result = bench("run", str(changed), "--resume", str(out))
    assert result.returncode == 2
    assert "1 new, 1 gone" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_worker_is_reused_while_healthy(tmp_path):
    from harness.core.cases import Case
    from harness.engine.executors import WorkerPool
    from harness.engine.plugins import load_plugin
    from harness.measure.timing import TimingConfig

    load_plugin(str(PLUGIN))
    timing = TimingConfig(warmup=1, min_time_s=0.0, max_reps=2, min_reps=1)
    from harness.core.config import RunSettings

    settings = RunSettings(timing, plugins=(str(PLUGIN),), case_timeout_s=30)
    with WorkerPool(settings, log_dir=tmp_path) as pool:
        a = pool.run(Case("naive", {}, heads=2, kv_heads=2, seq_len=16, head_dim=8))
        b = pool.run(Case("naive", {}, heads=2, kv_heads=2, seq_len=32, head_dim=8))
        assert pool.started == 1 and a.row["status"] == b.row["status"] == "ok"
        crash = pool.run(Case("fault_abort", {}, heads=2, kv_heads=2, seq_len=16, head_dim=8))
        assert crash.row["status"] == "crash"
        c = pool.run(Case("naive", {}, heads=2, kv_heads=2, seq_len=16, head_dim=8))
        assert pool.started == 2 and c.row["status"] == "ok"


def test_damaged_results_give_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"schema_version": 999}))
    proc = bench("report", str(run))
    assert proc.returncode == 2 and "schema version 999" in proc.stderr and "Traceback" not in proc.stderr
    (run / "run.json").write_text(json.dumps({"schema_version": store.SCHEMA_VERSION, "run_id": "r",
                                              "suite": {"name": "s"}}))  # what every run.json has
    (run / "results.parquet").write_bytes(b"not parquet")
    proc = bench("report", str(run))
    assert proc.returncode == 2 and "damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_a_crash_row_is_written_without_torch_in_the_parent(tmp_path):
    """The parent of the workers makes crash and timeout rows from the schema alone: no torch."""
    code = f"""
import sys
from harness.core import schema
from harness.core.cases import Case
from harness.core.config import RunSettings, TimingConfig
from harness.engine.executors import WorkerPool
settings = RunSettings(TimingConfig(warmup=1, min_time_s=0.0, max_reps=2), plugins=({str(PLUGIN)!r},), threads=1,
                       case_timeout_s=60)
with WorkerPool(settings, log_dir={str(tmp_path)!r}) as pool:
    result = pool.run(Case("fault_segfault", {{}}, heads=2, kv_heads=2, seq_len=16, head_dim=8))
row = result.row
assert row["status"] == "crash" and "SIGSEGV" in row["reason"], row["reason"]
assert (row["variant"], row["seq_len"], row["threads"]) == ("fault_segfault", 16, 1)
assert schema.row_problems(row) == [], schema.row_problems(row)
print("torch" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_executor_and_memory_budget_come_from_the_suite_unless_overridden(tmp_path):
    from harness.engine import lifecycle
    from harness.engine.executors import InProcess, WorkerPool
    from harness.engine.suite import parse_suite

    suite = parse_suite('[run]\nisolation = "none"\nmemory_budget_gib = 2\n[[variant]]\nname = "naive"\n')
    executor = lifecycle.make_executor(suite, tmp_path)
    assert isinstance(executor, InProcess) and executor.settings.memory_budget == 2 * 2**30
    executor = lifecycle.make_executor(suite, tmp_path, isolation="process", case_timeout_s=7, memory_budget_gib=0.5)
    assert isinstance(executor, WorkerPool) and executor.proc is None  # no worker until a case runs
    assert executor.case_timeout_s == 7 and executor.config["memory_budget"] == 2**29
    default = parse_suite('[[variant]]\nname = "naive"\n')
    assert lifecycle.memory_budget(default, 1.5) == int(1.5 * 2**30) and lifecycle.memory_budget(default) > 0
    assert isinstance(lifecycle.make_executor(default, tmp_path), WorkerPool)
