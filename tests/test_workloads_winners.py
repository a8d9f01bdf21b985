"""Best per workload from planted rows: the winner (unstable, wrong, emulated, over-tolerance approximate and
pattern rows excluded; equal times broken by label; overlapping intervals reported as ties), the speed-up
over the declared baseline, fast_p; the dispatch table and harness.dispatch's pick; bench winners and the
report's section."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import dispatch
from harness.core import schema
from harness.core.cases import Case
from reports import winners
from tests.runs import bench

DECODE = dict(heads=8, kv_heads=2, head_dim=64, q_len=1, causal=True)


def _row(variant: str, params: dict, time_ms: float | None, *, family="dense", exact=True, baseline=False,
         status="ok", stable=True, emulated=None, rel_err=1e-7, ci=None, **axes) -> dict:
    case = Case(variant, params, **{**DECODE, **axes})
    row = schema.base_row(case, family, exact, 2, baseline=baseline)
    lo, hi = ci or (time_ms, time_ms)
    row.update(status=status, time_ms=time_ms, time_ms_ci_low=lo, time_ms_ci_high=hi, stable=stable,
               rel_err=rel_err, reason="" if status == "ok" else "planted", run_id="r", suite="s")
    if emulated is not None:
        row["emulated"] = emulated
    return row


def _planted() -> pd.DataFrame:
    flash, math_ = {"backend": "flash"}, {"backend": "math"}
    rows = [
        # kv 1024: the baseline, an unstable faster one, a wrong faster one, an emulated faster one, a pattern
        # variant, an approximate one beyond tolerance; naive wins, tiled within its interval
        _row("sdpa", flash, 10.0, baseline=True, seq_len=1024),
        _row("sdpa", math_, 4.0, baseline=True, stable=False, seq_len=1024),
        _row("decode_split_k", {}, 3.0, family="inference", status="incorrect", seq_len=1024),
        _row("fp8", {}, 2.0, family="quantised", exact=False, emulated=True, rel_err=1e-3, seq_len=1024),
        _row("sliding_window", {"window": 8}, 1.0, family="local", seq_len=1024),
        _row("linear", {}, 1.5, family="linear", exact=False, rel_err=0.3, seq_len=1024),
        _row("naive", {}, 6.0, ci=(5.8, 6.2), seq_len=1024),
        _row("tiled", {}, 6.1, family="memory_efficient", ci=(5.9, 6.3), seq_len=1024),
        _row("paged", {"path": "pages"}, None, family="inference", status="skipped", seq_len=1024),
        # kv 4096: equal times, the first label wins; an approximate one within tolerance may win too
        _row("sdpa", flash, 20.0, baseline=True, seq_len=4096),
        _row("naive", {}, 10.0, seq_len=4096),
        _row("decode_split_k", {}, 10.0, family="inference", seq_len=4096),
        _row("linear", {}, 12.0, family="linear", exact=False, rel_err=1e-6, seq_len=4096),
        # kv 16384: only the baseline is stable: it wins, speed-up 1
        _row("sdpa", flash, 40.0, baseline=True, seq_len=16384),
        _row("naive", {}, 30.0, stable=False, seq_len=16384),
        # kv 65536: nothing may win
        _row("sdpa", flash, None, baseline=True, status="oom", seq_len=65536),
        _row("naive", {}, 50.0, stable=False, seq_len=65536),
        # layers at kv 1024: the baseline is the layer attending with sdpa
        _row("gqa", {"kernel": "sdpa"}, 30.0, family="layer", seq_len=1024),
        _row("gqa", {"kernel": "decode_split_k"}, 20.0, family="layer", seq_len=1024),
    ]
    return pd.DataFrame(rows)


def _by_length(table, level="kernel"):
    return {r["workload"]["seq_len"]: r for r in table if r["workload"]["level"] == level}


def test_the_winner_is_the_fastest_correct_stable_candidate():
    w = _by_length(winners.winners(_planted()))
    a = w[1024]
    assert a["label"] == "naive" and a["time_ms"] == 6.0
    assert a["baseline"] == "sdpa(backend=flash)" and a["speedup"] == pytest.approx(10 / 6)
    assert a["ties"] == ["tiled"]  # its interval overlaps naive's
    assert a["candidates"] == 3 and a["rows"] == 9  # sdpa flash, naive, tiled
    assert (a["ci_low"], a["ci_high"], a["stable"], a["rel_err"]) == (5.8, 6.2, True, 1e-7)
    assert a["workload_label"] == "cpu float32 fwd B1 H8/2 Lq1 Lkv1024 D64 causal"


def test_equal_times_go_to_the_first_label_and_an_approximate_variant_within_tolerance_competes():
    b = _by_length(winners.winners(_planted()))[4096]
    assert b["label"] == "decode_split_k" and b["ties"] == ["naive"] and b["speedup"] == pytest.approx(2.0)
    assert b["candidates"] == 4  # linear at rel_err 1e-6 is within float32's 2e-5


def test_the_baseline_wins_where_nothing_else_is_stable_and_no_candidate_says_why():
    w = _by_length(winners.winners(_planted()))
    assert w[16384]["label"] == "sdpa(backend=flash)" and w[16384]["speedup"] == 1.0
    assert w[65536]["label"] is None and "no candidate" in w[65536]["why"] and "1 oom" in w[65536]["why"]
    # the declared baseline did not run: the name rules name naive (its time unstable) for fast_p's sake
    assert w[65536]["baseline"] == "naive" and w[65536]["baseline_stable"] is False


def test_a_layer_workload_is_apart_and_its_baseline_is_the_sdpa_layer():
    layer = _by_length(winners.winners(_planted()), "layer")[1024]
    assert layer["label"] == "gqa(kernel=decode_split_k)" and layer["speedup"] == pytest.approx(1.5)
    assert layer["workload_label"].startswith("layer · ")


def test_fast_p_counts_correct_stable_runs_at_least_p_times_faster():
    fp = {f["label"]: (f["n"], f["fast"]) for f in winners.fast_p(_planted())}
    # judged where a baseline ran (kv 1024, 4096, 16384 sdpa flash; 65536 naive; layers at 1024), skipped rows
    # not counted, an oom row counted as not fast
    assert fp["sdpa(backend=flash)"] == (4, {1.0: 0.75, 1.5: 0.0, 2.0: 0.0})
    assert fp["naive"] == (4, {1.0: 0.5, 1.5: 0.5, 2.0: 0.25})  # 10/6, 20/10; unstable at 16384 and 65536
    assert fp["decode_split_k"] == (2, {1.0: 0.5, 1.5: 0.5, 2.0: 0.5})  # wrong at 1024, 2x at 4096
    assert fp["sdpa(backend=math)"][1][1.0] == 0.0  # unstable: never fast
    assert fp["linear"] == (2, {1.0: 0.5, 1.5: 0.5, 2.0: 0.0})  # 20/12 = 1.67 at 4096, beyond tolerance at 1024
    assert "paged(path=pages)" not in fp and "fp8" in fp and fp["fp8"][1][1.0] == 0.0
    assert fp["gqa(kernel=decode_split_k)"] == (1, {1.0: 1.0, 1.5: 1.0, 2.0: 0.0})


def test_the_dispatch_table_picks_exact_then_nearest():
    doc = json.loads(winners.to_json(_planted(), {"run_id": "r", "suite": {"name": "s"}}))
    assert doc["format"] == "attention-bench-dispatch" and doc["run_id"] == "r"
    assert len(doc["entries"]) == 4  # every workload with a winner
    e = doc["entries"][0]
    assert set(e["evidence"]) >= {"time_ms", "interval_ms", "stable", "rel_err", "speedup", "baseline"}
    table = dispatch.DispatchTable.from_dict(doc)
    exact = table.pick(q_len=1, kv_len=4096, heads=8, kv_heads=2, head_dim=64, dtype="float32")
    assert exact.exact and exact.variant == "decode_split_k" and exact.distance == 0
    near = table.pick(q_len=1, kv_len=3000, heads=8, kv_heads=2, head_dim=64, level="kernel")
    assert not near.exact and near.workload["seq_len"] == 4096  # log2(4096/3000) < log2(3000/1024)
    far = table.pick(q_len=1, kv_len=100000, level="kernel")
    assert far.workload["seq_len"] == 16384 and far.variant == "sdpa" and far.params == {"backend": "flash"}
    assert table.pick(kv_len=2048, heads=16) is None  # no entry with 16 heads
    assert table.pick(q_len=1, kv_len=3000, level="kernel", max_distance=0.1) is None
    case = Case("anything", q_len=1, seq_len=1024, **{k: v for k, v in DECODE.items() if k != "q_len"})
    assert table.pick(case).variant == "naive"  # a Case gives every field
    layer = table.pick(q_len=1, kv_len=1024, level="layer")
    assert layer.params == {"kernel": "decode_split_k"}
    with pytest.raises(dispatch.DispatchError, match="layer factory"):
        layer.attention()
    with pytest.raises(dispatch.DispatchError, match="unknown workload field"):
        table.pick(heds=8)
    with pytest.raises(dispatch.DispatchError, match="not a dispatch table"):
        dispatch.DispatchTable.from_dict({"entries": []})


def test_a_picked_kernel_is_the_registered_variant_with_its_parameters():
    import torch

    table = dispatch.DispatchTable.from_dict(json.loads(winners.to_json(_planted())))
    fn = table.pick(q_len=1, kv_len=20000, level="kernel").attention()
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
    assert fn(q, k, v, causal=True).shape == q.shape


def test_the_scripts_bench_winners_and_the_report_on_a_real_run(tmp_path, capsys):
    """A smoke run of the cascade crossover sweep (tiny settings: it runs bench run), then bench winners as
    JSON, harness.dispatch on it, the text table, the docs table script, and the report's section."""
    from benchmarks import cascade_crossover, winners_table
    from harness.engine import store
    from reports.render import render_report

    run, crossover, table_json = tmp_path / "run", tmp_path / "crossover.json", tmp_path / "winners.json"
    assert cascade_crossover.main(["--model", "gpt2", "--batch", "3", "--suffix", "8", "--prefixes", "16,64",
                                   "--quick", "-o", str(run), "--json", str(crossover)]) == 0
    doc = json.loads(crossover.read_text())
    assert doc["name"] == "cascade-crossover" and doc["machine"]["cores"] and len(doc["rows"]) <= 2
    assert doc["columns"][0] == "shared prefix (tokens)" and doc["notes"]
    text = winners.table_text(store.read_results(run))
    lines = [line for line in text.splitlines() if "shared_prefix=" in line]
    assert len(lines) == 2 and "shared_prefix=16" in lines[0] and "shared_prefix=64" in lines[1]
    assert "fast_1.5" in text
    out = tmp_path / "dispatch.json"
    assert bench("winners", run, "--format", "json", "-o", out).returncode == 0
    table = dispatch.load(out)
    assert {e.workload["shared_prefix"] for e in table.entries} <= {16, 64}
    assert not table.entries or table.pick(q_len=1, kv_len=24, shared_prefix=16).exact
    assert winners_table.main([str(run), "--json", str(table_json), "--name", "winners-smoke"]) == 0
    assert json.loads(table_json.read_text())["name"] == "winners-smoke"
    html = render_report(run).read_text()
    assert 'id="winners"' in html and "Best per workload" in html and 'id="fast-p-table"' in html
