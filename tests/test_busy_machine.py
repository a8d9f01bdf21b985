"""Numbers on a busy machine: contended rounds re-run then flagged, the warning before the first case,
a crashing plugin quarantined while the run goes on, the circuit breaker's health probe."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd

from harness.core import schema
from harness.core.cases import Case
from harness.core.schema import CaseResult
from harness.engine import lifecycle, store
from harness.engine import rounds as rounds_module
from harness.engine.executors import CircuitBreaker
from harness.engine.rounds import ContentionPolicy, Quarantine, Rounds, run_sequential
from harness.measure import contention
from tests.runs import bench

QUIET = {"other_cpu_cores": 0.04, "steal_pct": 0.0, "cpu_cores": 2, "threads": 2}
BUSY = {"other_cpu_cores": 0.98, "steal_pct": 0.0, "cpu_cores": 2, "threads": 2}


class FakeExecutor:
    """Runs nothing: ``figures(case, attempt)`` gives each attempt's contention figures; samples are
    1 ms, or 2 ms while contended (a neighbour's time)."""

    def __init__(self, figures):
        self.figures, self.calls, self.processes = figures, [], 0

    def new_process(self):
        self.processes += 1

    def run(self, case, on_phase=None, time_only=False):
        attempt = sum(1 for c in self.calls if c[0] == case.seq_len)
        self.calls.append((case.seq_len, attempt, time_only))
        figures = self.figures(case, attempt)
        row = dict(schema.base_row(case, "dense", True, 2), flops=1e6, **figures)
        busy = contention.judge(figures)[0]
        ms = [2.0 if busy else 1.0] * 5
        row.update(time_ms=float(np.median(ms)), reps=5)
        return CaseResult(row, [m / 1e3 for m in ms])


def _cases(*lengths):
    return [Case("naive", {}, heads=2, kv_heads=2, seq_len=n, head_dim=8) for n in lengths]


def _run(tmp_path, cases, executor, policy, processes=1):
    writer = store.RunWriter(tmp_path, {"run_id": "r", "suite": {"name": "s"}, "case_ids": [c.case_id for c in cases]})
    said = []
    rounds = Rounds(writer, processes, policy, log=said.append, sleep=lambda s: None)
    run_sequential(executor, cases, rounds)
    rows = {int(r["seq_len"]): r for r in writer.finalize(status="complete").to_dict("records")}
    return rows, said


def test_a_contended_round_is_rerun_in_a_fresh_process_and_kept_in_the_logs(tmp_path):
    executor = FakeExecutor(lambda case, attempt: BUSY if case.seq_len == 16 and attempt == 0 else QUIET)
    rows, said = _run(tmp_path, _cases(16, 32), executor, ContentionPolicy("retry", retries=2))
    assert [c[:2] for c in executor.calls] == [(16, 0), (16, 1), (32, 0)] and executor.processes == 1
    assert rows[16]["discarded_rounds"] == 1 and rows[16]["contended"] == False  # noqa: E712
    assert rows[16]["time_ms"] == 1.0 and rows[16]["stable"] is None  # the quiet retry's time, one process
    logged = [json.loads(x) for x in (tmp_path / store.ROUNDS_LOG).read_text().splitlines()]
    assert [bool(r.get("discarded")) for r in logged] == [True, False, False]
    assert "0.98 of 2 cores" in logged[0]["discarded"]
    samples = pd.read_parquet(tmp_path / store.SAMPLES)
    assert (samples["time_ms"] == 1.0).all() and len(samples) == 10  # the discarded round's samples stay out
    assert said == []


def test_a_busy_machine_is_flagged_and_retrying_stops_after_a_few_cases(tmp_path):
    executor = FakeExecutor(lambda case, attempt: BUSY)
    rows, said = _run(tmp_path, _cases(16, 32, 48, 64, 80), executor, ContentionPolicy("retry", retries=2,
                                                                                       give_up_after=3))
    attempts = [sum(1 for c in executor.calls if c[0] == n) for n in (16, 32, 48, 64, 80)]
    assert attempts == [3, 3, 3, 1, 1]  # three cases retried twice, then the run stopped re-running
    assert len(said) == 1 and "stays busy" in said[0] and "flagged from now on" in said[0]
    for row in rows.values():
        assert row["contended"] == True and row["stable"] == False  # noqa: E712
        assert row["contention_note"] == "other processes used 0.98 of 2 cores while this case ran on 2 threads"
        assert row["stability_note"].startswith("contended: other processes used 0.98 of 2 cores")
        assert row["other_cpu_cores"] == 0.98 and row["cpu_cores"] == 2
    assert [rows[n]["discarded_rounds"] for n in (16, 32, 48, 64, 80)] == [2, 2, 2, 0, 0]


def test_flag_only_never_reruns(tmp_path):
    executor = FakeExecutor(lambda case, attempt: BUSY if case.seq_len == 32 else QUIET)
    rows, _ = _run(tmp_path, _cases(16, 32), executor, ContentionPolicy("flag"), processes=2)
    assert len(executor.calls) == 4  # two rounds of two cases, nothing re-run
    assert rows[32]["contended"] == True and rows[16]["contended"] == False  # noqa: E712
    assert rows[16]["stable"] == True and rows[32]["stable"] == False  # noqa: E712


def test_wait_waits_for_a_quiet_machine_before_each_round(tmp_path, monkeypatch):
    seen = iter([(1.0, [(7, "yes", 100.0)]), (1.0, [(7, "yes", 100.0)]), (0.05, [])] + [(0.05, [])] * 10)
    monkeypatch.setattr(contention, "busiest", lambda **kw: next(seen))
    monkeypatch.setattr(contention, "cores_available", lambda: 2)
    clock = iter(range(100))
    waited = rounds_module.wait_for_quiet(ContentionPolicy("wait", wait_s=30, threads=2), clock=lambda: next(clock))
    assert waited == 3  # three samples: busy, busy, quiet
    executor = FakeExecutor(lambda case, attempt: QUIET)
    rows, _ = _run(tmp_path, _cases(16), executor, ContentionPolicy("wait", wait_s=30, threads=2))
    assert rows[16]["status"] == "ok" and len(executor.calls) == 1


def test_the_warning_before_the_first_case_names_the_busiest_process(monkeypatch):
    monkeypatch.setattr(contention, "busiest", lambda **kw: (0.97, [(4242, "yes", 97.0), (1, "init", 0.5)]))
    monkeypatch.setattr(contention, "cores_available", lambda: 2)
    said = []
    seen = lifecycle.check_machine(None, said.append)
    assert len(said) == 1 and "pid 4242 'yes' at 97% CPU" in said[0] and "2 threads" in said[0]
    assert seen["busiest"][0] == {"pid": 4242, "name": "yes", "cpu_pct": 97.0} and seen["threads"] == 2
    monkeypatch.setattr(contention, "busiest", lambda **kw: (0.05, [(1, "init", 5.0)]))
    said.clear()
    lifecycle.check_machine(None, said.append)
    assert said == []  # a quiet machine: nothing to say


def test_the_quarantine_counts_a_variants_own_consecutive_crashes():
    q = Quarantine(after=3)
    crash = {"status": "crash", "reason": "worker exited with status 0"}
    for n in (16, 32):
        q.record(Case("bad", seq_len=n), crash)
        q.record(Case("good", seq_len=n), {"status": "ok"})  # another variant's success does not reset it
    assert q.reason(Case("bad")) is None
    q.record(Case("bad", seq_len=48), crash)
    assert "crashed the worker on 3 consecutive cases" in q.reason(Case("bad", seq_len=64))
    assert q.reason(Case("good")) is None


def test_the_breaker_probes_the_gpu_before_ending_a_run_and_never_ends_a_cpu_run():
    cpu = CircuitBreaker(limit=3, probe=lambda: "must not be asked")
    for _ in range(9):
        assert cpu.record({"status": "crash", "device": "cpu", "reason": "exited with status 3"}) is None
    assert cpu.tripped is None and cpu.probes == 0
    said = []
    fine = CircuitBreaker(limit=3, probe=lambda: None, log=said.append)
    for _ in range(3):
        fine.record({"status": "cuda_error", "device": "cuda", "reason": "illegal memory access"})
    assert fine.tripped is None and fine.probes == 1 and "health probe" in said[0] and "goes on" in said[0]
    lost = CircuitBreaker(limit=3, probe=lambda: "cuda_error: CUDA error: no CUDA-capable device")
    for _ in range(3):
        message = lost.record({"status": "crash", "device": "cuda", "reason": "killed by SIGSEGV"})
    assert message and "health probe failed" in message and "no CUDA-capable device" in message


CRASHERS = '''
import os
import sys

from harness import attention_flops, get_variant, register_variant


@register_variant("exits_zero", family="dense", exact=True, flops=attention_flops)
def exits_zero(q, k, v, *, causal):
    os._exit(0)


@register_variant("exits_three", family="dense", exact=True, flops=attention_flops)
def exits_three(q, k, v, *, causal):
    sys.exit(3)


@register_variant("exits_later", family="dense", exact=True, flops=attention_flops)
def exits_later(q, k, v, *, causal):
    if q.shape[2] >= 32:
        os._exit(1)
    return get_variant("naive")(q, k, v, causal=causal)
'''


def test_crashing_plugins_do_not_end_a_cpu_run(tmp_path):
    """Three crashing plugin variants among healthy ones: every case gets a row, the healthy ones ok;
    each crasher is quarantined after three crashes of its own."""
    (tmp_path / "crashers.py").write_text(CRASHERS)
    (tmp_path / "s.toml").write_text(textwrap.dedent('''
        plugins = ["crashers.py"]
        [defaults]
        heads = 2
        head_dim = 16
        [sweep]
        seq_len = [16, 32, 48, 64, 80]
        [timing]
        warmup = 0
        min_time_s = 0.0
        min_reps = 1
        max_reps = 2
        processes = 1
        [run]
        contention = "flag"
        [[variant]]
        name = "sdpa"
        backend = "math"
        [[variant]]
        name = "exits_zero"
        [[variant]]
        name = "exits_three"
        [[variant]]
        name = "exits_later"
        [[variant]]
        name = "naive"
        '''))
    proc = bench("run", tmp_path / "s.toml", "-o", tmp_path / "out", "--quiet", "--no-report", timeout=600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["status"] == "complete"
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(rows) == 25 and rows["case_id"].is_unique
    status = rows.groupby("variant")["status"].apply(list).to_dict()
    assert status["sdpa"] == ["ok"] * 5 and status["naive"] == ["ok"] * 5
    for name in ("exits_zero", "exits_three"):
        assert status[name] == ["crash"] * 3 + ["skipped"] * 2
    assert status["exits_later"] == ["ok", "crash", "crash", "crash", "skipped"]
    skipped = rows[rows["status"] == "skipped"]
    assert skipped["reason"].str.startswith("quarantined:").all()
