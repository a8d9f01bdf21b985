"""Profiling (``--profile``, ``bench profile``): operator groups, the profile table and traces, that the
timed samples never run under the profiler, the report's section, and the command line."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from harness.core.cases import Case
from harness.core.patterns import matches, select_cases
from harness.engine import lifecycle, store
from harness.engine.suite import SuiteError, expand_cases, parse_suite
from harness.measure import profile as profiling
from reports.render import render_report
from tests.runs import bench, bench_run

TINY = """
name = "tiny-profile"
defaults = { heads = 2, head_dim = 16 }
sweep = { seq_len = [32, 64] }
timing = { warmup = 1, min_time_s = 0.0, min_reps = 2, max_reps = 3 }
[[variant]]
name = "naive"
[[variant]]
name = "sdpa"
backend = "math"
"""


def test_operator_groups_of_known_ops():
    known = {
        "aten::bmm": "matmul", "aten::mm": "matmul", "aten::matmul": "matmul", "aten::_int_mm": "matmul",
        "aten::_softmax": "softmax/exp", "aten::softmax": "softmax/exp", "aten::exp": "softmax/exp",
        "aten::masked_fill_": "masking/where", "aten::where": "masking/where", "aten::triu": "masking/where",
        "aten::copy_": "copies/gathers/cat", "aten::_to_copy": "copies/gathers/cat", "aten::cat": "copies/gathers/cat",
        "aten::index_select": "copies/gathers/cat", "aten::gather": "copies/gathers/cat",
        "aten::amax": "reductions", "aten::sum": "reductions", "aten::cumsum": "reductions",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "fused attention",
        "aten::scaled_dot_product_attention": "other", "aten::isneginf": "masking/where",
        "aten::mul": "other", "aten::add_": "other", "aten::maximum": "other", "aten::empty": "other",
        # kernels that are not ATen operators, by substring
        "ampere_sgemm_128x64_tn": "matmul", "void cunn_SoftMaxForward<4, float>": "softmax/exp",
        "flash_fwd_kernel": "fused attention", "void at::native::reduce_kernel<512, 1>": "reductions",
        "void at::native::elementwise_kernel<128, 2>": "other",
    }
    assert {op: profiling.classify(op) for op in known} == known
    assert set(known.values()) <= set(profiling.GROUPS)


def test_memory_timeline_keeps_the_peak_when_thinned():
    events = [(i, 100 if i % 2 == 0 else -60) for i in range(5000)]
    events[3001] = (3001, 10_000)
    events.append((5000, -10_000))
    t = profiling.memory_timeline(events, points=50)
    assert len(t["t_ms"]) <= 50 and len(t["t_ms"]) == len(t["bytes"])
    running = [sum(s for _, s in events[: i + 1]) for i in range(len(events))]
    assert t["peak_bytes"] == max(running) == max(t["bytes"])
    assert t["bytes"][-1] == running[-1]


def test_case_patterns():
    cases = expand_cases(parse_suite(TINY))
    labels = [c.label() for c in select_cases(cases, "naive")]
    assert len(labels) == 2 and all(lbl.startswith("naive ") for lbl in labels)
    assert [c.seq_len for c in select_cases(cases, "sdpa* L64")] == [64]
    assert select_cases(cases, cases[1].case_id[:8]) == [cases[1]]
    assert select_cases(cases, "nothing-like-this") == [] and not matches("", "naive", "abc")
    label = "sdpa(backend=flash) cpu bfloat16 fwd B1 H8 L4096 D64 causal"
    assert matches("sdpa backend=flash bfloat16 L4096", label, "abc") and matches("L4* sdpa(*", label, "abc")
    assert not matches("float16", label, "abc") and not matches("L409", label, "abc")


def test_profile_setting_is_validated_with_its_line():
    good = parse_suite(TINY + '[run]\nprofile = ["naive"]\n')
    assert good.run.profile == ["naive"]
    for value, message in (('["naiv"]', "did you mean 'naive'"), ("3", "expected true, false or an array")):
        with pytest.raises(SuiteError) as err:
            parse_suite(TINY + f"[run]\nprofile = {value}\n")
        line = TINY.count("\n") + 2
        assert any(f":{line}: run.profile: " in p and message in p for p in err.value.problems), err.value.problems


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """An in-process run profiling naive only, recording for every call of the variant whether the profiler
    was on and which phase the case was in."""
    from harness.core.registry import get_variant

    naive = get_variant("naive")
    calls: list[tuple[str, bool]] = []
    state = {"phase": None}
    original = naive.fn

    def spy(*args, **kwargs):
        calls.append((state["phase"], torch.autograd._profiler_enabled()))
        return original(*args, **kwargs)

    # contention = "flag": a round another process contended (a busy CI runner, steal) is not re-run, so
    # the count of profiled calls below is the profiler's doing, not the machine's
    suite = parse_suite(TINY + '[run]\nisolation = "none"\nprofile = ["naive"]\ncontention = "flag"\n')
    cases = expand_cases(suite)
    tmp = tmp_path_factory.mktemp("profile-in-process")
    writer = lifecycle.start_run(suite, tmp / "run", cases)

    class Progress:
        def start(self, case):
            state["phase"] = None

        def finish(self, case, row):
            pass

        def phase(self, case, name):
            state["phase"] = name

    mp = pytest.MonkeyPatch()
    mp.setattr(naive, "fn", spy)
    try:
        outcome = lifecycle.execute(suite, cases, writer, progress=Progress())
    finally:
        mp.undo()
    return writer.dir, outcome.rows, calls, cases


def test_timed_calls_never_run_under_the_profiler(in_process_run):
    run_dir, rows, calls, _ = in_process_run
    assert set(rows["status"]) == {"ok"}
    timed = [on for phase, on in calls if phase in ("first call", "warm-up", "timing")]
    assert timed and not any(timed)  # every timed call ran without the profiler
    profiled = [phase for phase, on in calls if on]
    # the profiler was on for the memory measurement and for one call per case in the profile phase, last
    assert profiled.count("profile") == 2 and set(profiled) <= {"memory", "profile"}
    assert [phase for phase, _ in calls if phase == "profile"] == ["profile"] * 2
    naive_rows = rows[rows["variant"] == "naive"]
    assert (naive_rows["reps"] >= 2).all() and (naive_rows["time_ms"] > 0).all()


def test_profile_table_columns_shares_and_traces(in_process_run):
    run_dir, rows, _, cases = in_process_run
    table = pd.read_parquet(run_dir / profiling.PROFILE)
    assert list(table.columns) == list(profiling.COLUMNS)
    naive_ids = {c.case_id for c in cases if c.variant == "naive"}
    assert set(table["case_id"]) == naive_ids  # [run] profile = ["naive"]: sdpa was not profiled
    for cid, ops in table.groupby("case_id"):
        assert ops["self_share"].sum() == pytest.approx(1.0, abs=1e-6)
        assert (ops["self_time_ms"] >= 0).all() and (ops["total_time_ms"] >= ops["self_time_ms"] - 1e-9).all()
        groups = ops.groupby("group")["self_share"].sum()
        assert groups.get("matmul", 0) > 0 and groups.get("softmax/exp", 0) > 0  # naive: QKᵀ, softmax, ·V
        assert ops.loc[ops["op"] == "aten::bmm", "flops"].sum() > 0
        trace = json.loads((run_dir / profiling.TRACES / f"{cid}.json").read_text())
        assert trace["traceEvents"] and any("aten::bmm" in str(e.get("name")) for e in trace["traceEvents"])
    profile = store.read_profile(run_dir)
    assert set(profile.cases) == naive_ids and len(profile.table) == len(table)
    for r in profile.cases.values():
        assert r["memory"]["peak_bytes"] > 0 and r["profile_s"] > 0 and "error" not in r
        assert r["trace"] == f"traces/{r['case_id']}.json"


def test_a_failing_profile_is_recorded_and_the_run_goes_on(tmp_path):
    case = Case("naive", seq_len=32, heads=2, kv_heads=2, head_dim=16)

    def broken():
        raise RuntimeError("no profiler today")

    record = profiling.profile_case(broken, case, tmp_path)
    assert record["error"] == "RuntimeError: no profiler today"
    lines = [json.loads(line) for line in (tmp_path / profiling.PROFILE_LOG).read_text().splitlines()]
    records = profiling.records(lines, tmp_path)
    assert records[case.case_id]["error"] == record["error"]
    assert profiling.write_table(tmp_path, records) is not None and pd.read_parquet(tmp_path / profiling.PROFILE).empty


def test_a_profile_log_from_elsewhere_is_checked(tmp_path):
    lines = [{"case_id": "../../etc", "ops": []}, "not a record", {"case_id": "abc", "ops": [{"op": 3}]},
             {"case_id": "def", "ops": [{"op": "aten::mm", "group": "matmul", "calls": 1, "self_time_ms": 1.0,
                                         "total_time_ms": 1.0, "self_share": 1.0, "flops": 8}],
              "memory": {"t_ms": [0, 1], "bytes": [5]}, "trace": "javascript:alert(1)"}]
    records = profiling.records(lines, tmp_path)
    assert set(records) == {"abc", "def"}
    assert "malformed" in records["abc"]["error"] and "ops" not in records["abc"]
    assert records["def"]["memory"] is None and records["def"]["trace"] is None  # no such trace file here


@pytest.fixture(scope="module")
def profiled_cli_run(tmp_path_factory):
    return bench_run(tmp_path_factory.mktemp("profile-cli"), TINY, "--profile")


def test_bench_run_profile_report_and_bench_profile_table(profiled_cli_run, tmp_path):
    run_dir = profiled_cli_run
    table = pd.read_parquet(run_dir / profiling.PROFILE)
    assert table["case_id"].nunique() == 4  # --profile: every case, through the worker process
    html = (run_dir / "report.html").read_text()
    assert 'id="profile"' in html and "Where the time goes" in html and 'href="#profile"' in html
    assert html.count('href="traces/') == 4 and '<figure class="profile-memory">' in html
    # the same run without its profile has no such section
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain)
    (plain / profiling.PROFILE).unlink()
    (plain / profiling.PROFILE_LOG).unlink()
    assert 'id="profile"' not in render_report(plain).read_text()
    proc = bench("profile", run_dir, "--case", "naive L64", "--top", "5")
    assert proc.returncode == 0, proc.stderr
    assert "naive cpu float32 fwd B1 H2 L64 D16" in proc.stdout and "sdpa" not in proc.stdout
    assert "aten::bmm" in proc.stdout and "matmul" in proc.stdout and "by group:" in proc.stdout
    missing = bench("profile", run_dir, "--case", "no-such-case")
    assert missing.returncode == 2 and "no profiled case" in missing.stderr and "Traceback" not in missing.stderr
    unprofiled = bench("profile", plain)
    assert unprofiled.returncode == 2 and "has no profile" in unprofiled.stderr


def test_bench_profile_suite_runs_only_the_matching_cases(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY)
    out = tmp_path / "run"
    proc = bench("profile", suite, "--case", "sdpa L32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(out / "results.parquet")
    assert list(rows["variant"]) == ["sdpa"] and list(rows["seq_len"]) == [32]
    assert "sdpa(backend=math) cpu float32 fwd B1 H2 L32 D16" in proc.stdout
    assert pd.read_parquet(out / profiling.PROFILE)["case_id"].unique().tolist() == rows["case_id"].tolist()
    no_case = bench("profile", suite)
    assert no_case.returncode == 2 and "needs --case" in no_case.stderr
    no_match = bench("profile", suite, "--case", "flex")
    assert no_match.returncode == 2 and "no case matches 'flex'" in no_match.stderr


def test_bench_run_only(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY)
    proc = bench("run", suite, "--dry-run", "--only", "naive L64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["naive cpu float32 fwd B1 H2 L64 D16"]
    none = bench("run", suite, "--only", "flex")
    assert none.returncode == 2 and "matches 'flex'" in none.stderr and "Traceback" not in none.stderr
