"""Numbers a user can trust: several fresh processes per case, their agreement, wrong answers as a
status, and the user's own environment (nothing set by ``bench`` unless asked).

No test here asserts a wall-clock speed: schedules run on a fake executor, stability on planted samples.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core import schema
from harness.core.cases import Case
from harness.core.schema import CaseResult
from harness.engine import lifecycle, store
from harness.measure.derive import final_row
from harness.measure.stability import FLOOR, combine, process_time, stability
from tests.runs import bench, measured

PLUGINS = Path(__file__).parent / "plugins"
WRONG = PLUGINS / "wrong.py"


# ----------------------------------------------------------------------------------------------
# stability, from planted per-process samples


def _planted(medians, n=12, jitter=0.002, seed=0):
    """Per-process samples (ms) around each median, a little noise, no two equal."""
    rng = np.random.default_rng(seed)
    return [list(m * (1 + jitter * rng.standard_normal(n))) for m in medians]


def _rows(samples):
    return [{"time_ms_ci_low": math.nan, "time_ms_ci_high": math.nan, "flops": 1e9} for _ in samples]


def test_processes_that_agree_are_stable():
    samples = _planted([10.0, 10.1, 9.95])
    cols = combine(_rows(samples), samples)
    assert cols["stable"] is True and cols["stability_note"] == ""
    assert cols["processes"] == 3 and cols["reps"] == 36
    medians = sorted(float(np.median(s)) for s in samples)
    assert cols["time_ms"] == pytest.approx(medians[1])  # the median of the per-process medians
    assert cols["time_ms_process_min"] == pytest.approx(medians[0])
    assert cols["time_ms_process_max"] == pytest.approx(medians[2])
    assert cols["time_process_spread"] == pytest.approx((medians[2] - medians[0]) / medians[1])
    pooled = np.concatenate(samples)
    assert cols["time_ms_p10"] == pytest.approx(np.percentile(pooled, 10))
    assert cols["time_ms_ci_low"] <= cols["time_ms"] <= cols["time_ms_ci_high"]
    row = final_row(_rows(samples), samples)  # the row a run records: the rates from the combined time
    assert row["tflops_per_s"] == pytest.approx(1e9 / (row["time_ms"] * 1e-3) / 1e12)
    assert schema.row_problems({**schema.empty_row(), **cols}) == []


def test_two_modes_are_unstable_and_the_note_names_both():
    """A case seen in practice: naive L=1024 at 8.4 ms in some processes and 41.4 ms in another."""
    samples = _planted([8.4, 41.4, 8.4], seed=1)
    cols = combine(_rows(samples), samples)
    assert cols["stable"] is False
    assert cols["stability_note"] == "two modes: 8.4 ms (2 processes) and 41.4 ms (1 process)"
    assert cols["time_ms"] == pytest.approx(8.4, rel=0.01)
    assert cols["time_ms_process_max"] == pytest.approx(41.4, rel=0.01)
    assert cols["time_process_spread"] == pytest.approx(33.0 / 8.4, rel=0.02)


def test_three_modes_and_the_floor_of_the_intervals():
    samples = _planted([5.0, 10.0, 20.0, 10.05], seed=2)
    stable, note = stability([process_time(i, s) for i, s in enumerate(samples)])
    assert not stable and note == "three modes: 5 ms (1 process), 10 ms (2 processes) and 20 ms (1 process)"
    # tight samples 2% apart: within the ±2.5% floor, so no one is told they differ
    tight = [[10.0] * 8, [10.2] * 8]
    assert stability([process_time(i, s) for i, s in enumerate(tight)]) == (True, "")
    apart = [[10.0] * 8, [10.0 * (1 + 2.4 * FLOOR)] * 8]
    stable, note = stability([process_time(i, s) for i, s in enumerate(apart)])
    assert stable is False and note.startswith("two modes: 10 ms (1 process) and 10.6 ms (1 process)")
    near_1ms = [[0.9996] * 8, [5.0] * 8]  # times are rounded before their unit is chosen
    assert stability([process_time(i, s) for i, s in enumerate(near_1ms)])[1] == \
        "two modes: 1 ms (1 process) and 5 ms (1 process)"


def test_a_drift_without_separate_modes_is_unstable_too():
    """Each process overlaps its neighbour, the first and last do not: one mode, drifting."""
    samples = [[10.0] * 8, [10.45] * 8, [10.9] * 8]
    stable, note = stability([process_time(i, s) for i, s in enumerate(samples)])
    assert stable is False and note.startswith("the medians drift from 10 ms to 10.9 ms across 3 processes")


def test_the_interval_is_the_timing_modules_when_it_has_one():
    t = process_time(0, [10.0] * 20, ci_low=9.0, ci_high=11.5)
    assert (t.low, t.high) == (9.0, 11.5)
    narrow = process_time(0, [9.9, 10.0, 10.1], ci_low=math.nan, ci_high=math.nan)  # too few for a CI: the range
    assert narrow.low == pytest.approx(10.0 * (1 - FLOOR)) and narrow.high == pytest.approx(10.0 * (1 + FLOOR))


def test_one_process_has_no_verdict():
    cols = combine(_rows([[1.0, 1.1, 0.9]]), [[1.0, 1.1, 0.9]])
    assert cols["processes"] == 1 and cols["stable"] is None and cols["stability_note"] == ""
    assert math.isnan(cols["time_process_spread"]) and cols["time_ms"] == cols["time_ms_process_min"] == 1.0


# ----------------------------------------------------------------------------------------------
# the round-robin schedule, on a fake executor


class FakeExecutor:
    """Records which process ran which case, in what order and how; ``outcome(case, process)``
    gives (status, samples in s). Processes are counted by ``new_process``."""

    def __init__(self, outcome):
        self.outcome, self.process, self.calls = outcome, 0, []

    def new_process(self):
        self.process += 1

    def run_cases(self, cases, rounds, progress=None, stop=lambda: False):
        from harness.engine.rounds import run_sequential

        return run_sequential(self, cases, rounds, progress=progress, stop=stop)

    def run(self, case, on_phase=None, time_only=False):
        self.calls.append((self.process, case.seq_len, time_only))
        status, samples = self.outcome(case, self.process)
        row = schema.base_row(case, "dense", True, 1)
        row.update(status=status, reason="" if status == "ok" else f"{status} in process {self.process}",
                   flops=1e6)
        if samples:
            row.update(time_ms=float(np.median(samples)) * 1e3, reps=len(samples))
        return CaseResult(row, list(samples))


def _cases(*lengths):
    return [Case("naive", {}, heads=2, kv_heads=2, seq_len=n, head_dim=8) for n in lengths]


def _writer(path: Path, cases) -> store.RunWriter:
    return store.RunWriter(path, {"run_id": "r1", "suite": {"name": "fake"}, "case_ids": [c.case_id for c in cases]})


def _by_length(frame):
    return {int(r["seq_len"]): r for r in frame.to_dict("records")}


def test_rounds_are_the_outer_loop_each_in_a_fresh_process(tmp_path):
    cases = _cases(16, 24, 32)

    def outcome(case, process):
        if case.seq_len == 24:
            return "skipped", []
        return "ok", [1e-3 * (1 + process) * (1 + 0.01 * i) for i in range(4)]

    executor, writer = FakeExecutor(outcome), _writer(tmp_path, cases)
    assert lifecycle.run_cases(cases, writer, executor, processes=3) == 3
    assert executor.calls == [(0, 16, False), (0, 24, False), (0, 32, False),  # round 0: every case, fully
                              (1, 16, True), (1, 32, True),                      # then only the ok ones, timed
                              (2, 16, True), (2, 32, True)]
    rows = _by_length(writer.finalize(status="complete"))
    assert rows[24]["status"] == "skipped"
    for n in (16, 32):
        assert rows[n]["processes"] == 3 and rows[n]["reps"] == 12 and rows[n]["status"] == "ok"
        assert rows[n]["time_ms"] == pytest.approx(2.03) and rows[n]["time_ms_process_max"] == pytest.approx(3.045)
        assert rows[n]["stable"] == False  # noqa: E712  (numpy bool) 1, 2 and 3 ms: three modes
        assert rows[n]["stability_note"].startswith("three modes")
    samples = pd.read_parquet(tmp_path / store.SAMPLES)
    per = samples.groupby(["case_id", "process"]).size()
    assert sorted(set(samples["process"])) == [0, 1, 2] and (per == 4).all() and len(per) == 6
    rounds = [json.loads(line) for line in (tmp_path / store.ROUNDS_LOG).read_text().splitlines()]
    assert [(r["seq_len"], r["process"]) for r in rounds] == [(16, 0), (24, 0), (32, 0), (16, 1), (32, 1),
                                                              (16, 2), (32, 2)]
    attempt = {r["case_id"]: r["attempt_id"] for r in rounds if r["process"] == 0}
    assert all(r["attempt_id"] == attempt[r["case_id"]] for r in rounds)  # one attempt across its rounds


def test_a_crash_in_a_later_round_is_the_cases_status(tmp_path):
    cases = _cases(16, 32)

    def outcome(case, process):
        if case.seq_len == 32 and process == 1:
            return "crash", []
        return "ok", [1e-3, 1.01e-3, 0.99e-3]

    executor, writer = FakeExecutor(outcome), _writer(tmp_path, cases)
    lifecycle.run_cases(cases, writer, executor, processes=3)
    assert (2, 32, True) not in executor.calls  # not run again after its crash
    rows = _by_length(writer.finalize(status="complete"))
    assert rows[32]["status"] == "crash" and rows[32]["reason"] == "process 2 of 3: crash in process 1"
    assert rows[32]["processes"] == 1 and rows[32]["time_ms"] == pytest.approx(1.0)  # what process 1 measured
    assert rows[16]["status"] == "ok" and rows[16]["processes"] == 3 and rows[16]["stable"] == True  # noqa: E712


def test_resume_after_an_interruption_mid_rounds_completes_every_case_once(tmp_path):
    cases = _cases(16, 24, 32, 40)
    calls = []

    def outcome(case, process):
        calls.append(case.seq_len)
        return ("error", []) if case.seq_len == 40 else ("ok", [1e-3, 1.02e-3, 0.98e-3])

    # stopped in round 1, after its first case: only the error (final after round 0) and one case are done
    writer = _writer(tmp_path, cases)
    executor = FakeExecutor(outcome)
    done = lifecycle.run_cases(cases, writer, executor, processes=2, stop=lambda: len(executor.calls) >= 5)
    assert done == 2 and executor.calls[-1] == (1, 16, True)
    writer.finalize(status="interrupted (SIGINT)")
    assert sorted(store.read_rows_log(tmp_path)["seq_len"]) == [16, 40]
    todo = lifecycle.remaining_cases(tmp_path, cases)
    assert [c.seq_len for c in todo] == [24, 32]
    again = store.RunWriter.reopen(tmp_path, store.read_meta(tmp_path))
    assert lifecycle.run_cases(todo, again, FakeExecutor(outcome), processes=2) == 2
    rows = again.finalize(status="complete")
    assert sorted(rows["seq_len"]) == [16, 24, 32, 40] and rows["case_id"].is_unique
    ok = rows[rows["status"] == "ok"]
    assert (ok["processes"] == 2).all() and (ok["reps"] == 6).all()
    samples = pd.read_parquet(tmp_path / store.SAMPLES)  # only the final attempts' samples, both processes each
    assert set(samples["case_id"]) == set(ok["case_id"])
    assert (samples.groupby(["case_id", "process"]).size() == 3).all() and len(samples) == 18


# ----------------------------------------------------------------------------------------------
# wrong answers are a status


@pytest.fixture(scope="module")
def wrong_variants():
    from harness.engine.plugins import load_plugin

    load_plugin(str(WRONG))


def _run(variant, mode="fwd", dtype="float32", **axes):
    from harness.measure.timing import TimingConfig

    axes = {"heads": 2, "kv_heads": 2, "seq_len": 16, "head_dim": 8, **axes}
    case = Case(variant, {}, mode=mode, dtype=dtype, **axes)
    return measured(case, TimingConfig(warmup=1, min_time_s=0.0, min_reps=2, max_reps=2))


def test_a_nan_in_the_output_is_incorrect_and_says_where(wrong_variants):
    row = _run("wrong_nan")
    assert row["status"] == "incorrect"
    assert row["reason"] == "output has 1 non-finite value; first at (b=0, h=1, q=5, d=3): nan"
    assert row["time_ms"] > 0 and row["reps"] == 2  # the time of the wrong answer is kept


@pytest.mark.parametrize("variant, where", [("wrong_scaled", "output differs from the float64 reference: "
                                                             "max abs error "),
                                            ("wrong_row", "at (b=0, h=1, q=5, ")])
def test_a_wrong_exact_output_is_incorrect(wrong_variants, variant, where):
    row = _run(variant)
    assert row["status"] == "incorrect" and where in row["reason"], row["reason"]
    assert "> tolerance 0.0002" in row["reason"] and "(rel " in row["reason"]
    assert row["max_abs_err"] > 2e-4


def test_one_wrong_row_of_a_long_sequence_is_found_among_the_checked_rows(wrong_variants):
    row = _run("wrong_row", seq_len=2100)  # longer than MAX_CHECK_ROWS: rows are sampled, 5 among them
    assert row["status"] == "incorrect" and "q=5," in row["reason"], row["reason"]


def test_an_inf_gradient_is_incorrect_in_backward_modes(wrong_variants):
    assert _run("wrong_inf_grad")["status"] == "ok"  # the forward output is right
    row = _run("wrong_inf_grad", mode="bwd")
    assert row["status"] == "incorrect"
    assert row["reason"] == "gradient dk has 1 non-finite value; first at (b=0, h=1, k=5, d=3): inf"


def test_tolerances_are_per_dtype_and_a_variant_may_declare_its_own(wrong_variants):
    off = _run("slightly_off")
    assert off["status"] == "incorrect" and "rel " in off["reason"]
    assert _run("slightly_off_tolerated")["status"] == "ok"
    assert _run("naive", dtype="bfloat16")["status"] == "ok"
    assert _run("naive", mode="fwd_bwd")["status"] == "ok"


def test_half_precision_is_judged_against_dense_attention_in_the_same_precision(wrong_variants):
    """Peaked (structured) attention in bfloat16 at L=1024: plain dense attention's own rounding goes
    beyond the dtype's fixed tolerance, so that alone never makes a right answer incorrect, while a
    wrong row or a wrong scale is still found (FlashAttention's rule: at most 2x that rounding)."""
    shape = dict(dtype="bfloat16", seq_len=1024, causal=True, inputs="structured", heads=4, kv_heads=2, head_dim=64)
    right = _run("naive", **shape)
    assert right["status"] == "ok" and right["max_abs_err"] > 3e-2  # beyond bfloat16's fixed 0.03
    assert _run("sdpa", **shape)["status"] == "ok"
    row = _run("wrong_row", **shape)
    assert row["status"] == "incorrect" and "q=5," in row["reason"] and "dense attention's in bfloat16" in row["reason"]
    assert _run("wrong_scaled", **shape)["status"] == "incorrect"


def test_approximate_variants_are_incorrect_only_when_not_finite(wrong_variants):
    close = _run("approx_close")
    assert close["status"] == "ok" and close["rel_err"] == pytest.approx(0.01, rel=1e-3)
    nan = _run("approx_nan")
    assert nan["status"] == "incorrect" and nan["reason"].startswith("output has 1 non-finite value")


def test_a_malformed_tolerance_is_refused_at_registration():
    from harness import register_variant
    from harness.core.registry import RegistryError

    for tolerance, words in (({"float8": (1, 1)}, "unknown dtype 'float8'"), ({"float32": (1e-3,)}, "two numbers"),
                             ({"float32": (-1, 0.1)}, "two numbers >= 0"), ([1, 2], "must be a dict")):
        with pytest.raises(RegistryError, match="tolerance") as info:
            register_variant("never_registered", family="dense", exact=True, tolerance=tolerance)
        assert words in str(info.value)


def _tiny_suite(name: str, plugin: Path, *variants: str) -> str:
    """A one-shape suite of ``variants`` from ``plugin``, timed briefly in one process."""
    return (f'name = "{name}"\nplugins = ["{plugin}"]\n[defaults]\nheads = 2\nhead_dim = 8\nseq_len = 16\n'
            "[timing]\nwarmup = 1\nmin_time_s = 0.0\nmin_reps = 2\nmax_reps = 2\nprocesses = 1\n"
            + "".join(f'[[variant]]\nname = "{v}"\n' for v in variants))


WRONG_SUITE = _tiny_suite("wrong", WRONG, "naive", "wrong_scaled")


def test_fail_on_incorrect_exit_status(tmp_path, capsys, wrong_variants):
    from harness.cli.main import main

    suite = tmp_path / "wrong.toml"
    suite.write_text(WRONG_SUITE)
    run = ["run", str(suite), "--quiet", "--no-report", "--isolation", "none"]
    assert main(run + ["-o", str(tmp_path / "a"), "--fail-on-incorrect"]) == 3
    err = capsys.readouterr().err
    assert "1 incorrect" in err and "incorrect: wrong_scaled" in err and "output differs" in err
    rows = store.read_results(tmp_path / "a")
    assert dict(zip(rows["variant"], rows["status"])) == {"naive": "ok", "wrong_scaled": "incorrect"}
    assert main(run + ["-o", str(tmp_path / "b")]) == 0  # without the flag an incorrect row is a result
    right = tmp_path / "right.toml"
    right.write_text(_tiny_suite("right", WRONG, "naive", "slightly_off_tolerated"))
    assert main(["run", str(right), "-o", str(tmp_path / "c"), "--quiet", "--no-report", "--isolation", "none",
                 "--fail-on-incorrect"]) == 0


# ----------------------------------------------------------------------------------------------
# the user's environment


ENV_SUITE = _tiny_suite("env", PLUGINS / "envprobe.py", "env_probe")

_WATCHED = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "OMP_PROC_BIND", "MALLOC_ARENA_MAX")


def test_bench_sets_no_environment_variable_unless_asked(tmp_path):
    from harness.measure.environment import is_measurement_variable

    suite = tmp_path / "env.toml"
    suite.write_text(ENV_SUITE)
    env = {k: v for k, v in os.environ.items() if not is_measurement_variable(k)}

    def probe(name, *extra):
        proc = bench("run", suite, "-o", tmp_path / name, "--quiet", "--no-report", *extra, env=env)
        assert proc.returncode == 0, proc.stderr
        row = store.read_results(tmp_path / name).iloc[0]
        meta = json.loads((tmp_path / name / "run.json").read_text())
        return {k: row[f"env_{k}"] for k in _WATCHED}, meta["environment"]["measurement"]

    seen, measurement = probe("default")
    assert seen == {k: "<unset>" for k in _WATCHED}  # the worker ran in the user's environment
    assert measurement["allocator"] == "default" and measurement["THP_MEM_ALLOC_ENABLE"] is None
    assert measurement["threads"] >= 1 and measurement["cpu_affinity"] == sorted(os.sched_getaffinity(0))
    assert measurement["variables"] == {} and "cpu_governor" in measurement

    env["OMP_PROC_BIND"] = "close"  # the user's own setting reaches the workers, and is recorded
    seen, measurement = probe("thp", "--allocator", "thp", "--processes", "2")
    assert seen == {**{k: "<unset>" for k in _WATCHED}, "THP_MEM_ALLOC_ENABLE": "1", "OMP_PROC_BIND": "close"}
    assert measurement["allocator"] == "thp" and measurement["THP_MEM_ALLOC_ENABLE"] == "1"
    assert measurement["variables"] == {"OMP_PROC_BIND": "close"}


def test_the_bench_process_itself_sets_nothing(tmp_path, monkeypatch, capsys):
    """With isolation = "none" the cases run in the bench process: still the user's environment."""
    from harness.cli.main import main
    from harness.measure.environment import is_measurement_variable

    for name in [k for k in os.environ if is_measurement_variable(k)]:
        monkeypatch.delenv(name)
    suite = tmp_path / "env.toml"
    suite.write_text(ENV_SUITE)
    assert main(["run", str(suite), "-o", str(tmp_path / "o"), "--quiet", "--no-report", "--isolation", "none",
                 "--processes", "3"]) == 0
    assert "one process times each case" in capsys.readouterr().err
    row = store.read_results(tmp_path / "o").iloc[0]
    assert {k: row[f"env_{k}"] for k in _WATCHED} == {k: "<unset>" for k in _WATCHED}
    assert not [k for k in os.environ if is_measurement_variable(k)] and int(row["processes"]) == 1
    assert json.loads((tmp_path / "o" / "run.json").read_text())["timing"]["processes"] == 1


def test_the_thp_allocator_needs_worker_processes(tmp_path):
    suite = tmp_path / "env.toml"
    suite.write_text(ENV_SUITE)
    proc = bench("run", suite, "-o", tmp_path / "x", "--allocator", "thp", "--isolation", "none")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "isolation" in proc.stderr and "thp" in proc.stderr
    assert not (tmp_path / "x").exists()
    suite.write_text(ENV_SUITE.replace("[timing]", '[run]\nisolation = "none"\nallocator = "thp"\n[timing]'))
    proc = bench("run", suite, "-o", tmp_path / "y")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"{suite}:") and "run.allocator" in proc.stderr


def test_a_case_reaches_a_worker_of_an_older_commit_without_fields_it_never_knew():
    """Fields added to Case after the worker protocol began travel only when they are not at their
    default, so that --confirm can re-run a baseline's own (older) worker on the cases it could run."""
    import dataclasses

    from harness.core.cases import AXES, axis_names

    # the fields the protocol has carried from the start: exactly the worker of 0f41bb4's
    first = ("variant", "params", "device", "mode", "batch", "heads", "kv_heads", "seq_len", "head_dim", "dtype",
             "causal", "inputs")
    case = Case("naive", {"x": 1}, heads=2, kv_heads=1, seq_len=16, head_dim=8)
    message = case.message()
    assert set(message) == set(first) == {n for n, ax in AXES.items() if not ax.later} and Case(**message) == case
    for name in axis_names(later=True):  # a later field set to something else than its default is sent
        changed = dataclasses.replace(case, **{name: "x"})
        assert changed.message()[name] == "x" and name not in message
