"""Calibration cache keyed by machine fingerprint, roofline columns (pure), and the `bench calibrate` command."""

import argparse
import json
import math

import pytest
import torch

from harness.core.cases import Case
from harness.core.flops import attention_flops
from harness.measure import calibrate, roofline
from harness.measure.derive import derive


def fake_measure(calls):
    def measure(device, dtypes, quick=False, log=None):
        calls.append((device, tuple(dtypes)))
        return {
            "device": device, "threads": torch.get_num_threads(), "quick": quick,
            "matmul": {d: {"n": 64, "tflops_per_s": 2.0, "tflops_per_s_best": 2.5, "time_ms": 1.0,
                           "time_ci_rel": 0.01, "reps": 10} for d in dtypes},
            "bandwidth": {"bytes": 1 << 20, "gb_per_s": 100.0, "gb_per_s_best": 120.0, "time_ms": 1.0,
                          "time_ci_rel": 0.01, "reps": 10},
        }

    return measure


def test_cache_is_keyed_by_fingerprint(tmp_path):
    calls = []
    measure = fake_measure(calls)
    cal, measured = calibrate.calibrate(["cpu"], ["float32"], root=tmp_path, fingerprint="aaa", measure=measure)
    assert measured == [calibrate.entry_key("cpu")] and len(calls) == 1
    assert (tmp_path / "aaa.json").is_file()
    # same machine: read from the cache, nothing measured
    cal2, measured2 = calibrate.calibrate(["cpu"], ["float32"], root=tmp_path, fingerprint="aaa", measure=measure)
    assert measured2 == [] and len(calls) == 1 and cal2 == cal
    # another machine: its own file, measured again
    calibrate.calibrate(["cpu"], ["float32"], root=tmp_path, fingerprint="bbb", measure=measure)
    assert len(calls) == 2 and (tmp_path / "bbb.json").is_file()
    # a dtype the cache lacks, or --force: measured again
    calibrate.calibrate(["cpu"], ["float32", "bfloat16"], root=tmp_path, fingerprint="aaa", measure=measure)
    calibrate.calibrate(["cpu"], ["float32"], root=tmp_path, fingerprint="aaa", measure=measure, force=True)
    assert len(calls) == 4
    assert calibrate.load("aaa", tmp_path)["fingerprint"] == "aaa"


def test_damaged_cache_is_treated_as_missing(tmp_path):
    (tmp_path / "ccc.json").write_text("{not json")
    assert calibrate.load("ccc", tmp_path) is None
    (tmp_path / "ddd.json").write_text(json.dumps({"schema_version": 999, "entries": {}}))
    assert calibrate.load("ddd", tmp_path) is None


def test_cpu_entries_are_per_thread_count():
    assert calibrate.entry_key("cpu", 2) == "cpu/threads=2"
    cal = {"entries": {"cpu/threads=2": {"matmul": {}}}}
    assert roofline.lookup(cal, "cpu", 2)[0] is not None
    entry, note = roofline.lookup(cal, "cpu", 4)
    assert entry is None and "cpu/threads=2" in note
    assert "bench calibrate" in roofline.lookup(None, "cpu", 2)[1]


@pytest.mark.parametrize("mode,elements", [("fwd", 2 * 1 * 8 * 64 * 32 + 2 * 1 * 2 * 64 * 32),
                                           ("bwd", 4 * 1 * 8 * 64 * 32 + 4 * 1 * 2 * 64 * 32),
                                           ("fwd_bwd", 4 * 1 * 8 * 64 * 32 + 4 * 1 * 2 * 64 * 32)])
def test_min_bytes_counts_inputs_once_and_outputs_once(mode, elements):
    case = Case("naive", {}, heads=8, kv_heads=2, seq_len=64, head_dim=32, dtype="bfloat16", mode=mode)
    assert roofline.min_bytes(case) == elements * 2
    row = {"batch": 1, "heads": 8, "kv_heads": 2, "seq_len": 64, "head_dim": 32, "dtype": "bfloat16", "mode": mode}
    assert roofline.min_bytes(row) == elements * 2

    # the bytes any call of the case touches (the runner's memory-budget and cache estimate): the fwd count
    assert roofline.min_bytes(case, mode="fwd") == (2 * 1 * 8 * 64 * 32 + 2 * 1 * 2 * 64 * 32) * 2


def test_roofline_needs_no_torch_and_fills_the_schema_group():
    import subprocess
    import sys

    code = "import sys, harness.measure.roofline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from harness.core import schema

    cols = roofline.machine_columns("cpu", "float32", 2, None)
    # every roofline column: the machine's figures, the case's bytes, and the derived rates
    derived = {c for c in schema.DERIVED if schema.group_of(c) == "roofline"}
    assert set(cols) | set(roofline.fact_columns(Case("sdpa").key)) | derived == set(schema.names("roofline"))
    assert math.isnan(cols["peak_tflops_per_s"]) and "bench calibrate" in cols["roofline_note"]
    assert math.isnan(roofline.pct_of_peak(1.0, 0.0)) and math.isnan(roofline.pct_of_peak(None, 2.0))
    assert roofline.pct_of_peak(0.5, 2.0) == 25.0
    assert math.isnan(roofline.attainable_tflops(math.nan, 2.0, 100.0))
    assert roofline.attainable_tflops(1.0, 2.0, 100.0) == pytest.approx(0.1)  # 1 FLOP/byte · 100 GB/s
    assert calibrate.entry_key("cpu") == roofline.entry_key("cpu", torch.get_num_threads())


def test_roofline_columns():
    case = Case("sdpa", {}, heads=8, kv_heads=8, seq_len=1024, head_dim=64, dtype="float32")
    flops = attention_flops(case)
    row = {**case.key, "threads": 2, "flops": flops, "time_ms": flops / 0.5e12 * 1e3}  # 0.5 TFLOP/s
    row.update(roofline.fact_columns(row))
    cal = {"entries": {"cpu/threads=2": fake_measure([])("cpu", ["float32"])}}

    def rates(r):
        return derive({**r, **roofline.machine_columns(r["device"], r["dtype"], r["threads"], cal)})

    cols = {**roofline.machine_columns("cpu", "float32", 2, cal), **rates(row)}
    assert cols["arith_intensity"] == pytest.approx(row["flops"] / (4 * 8 * 1024 * 64 * 4))
    # the ceilings are the calibration's best samples: 2.5 TFLOP/s, 120 GB/s
    assert cols["pct_of_peak"] == pytest.approx(20.0)  # 0.5 of 2.5 TFLOP/s
    assert cols["peak_gb_per_s"] == 120.0 and cols["peak_tflops_per_s"] == 2.5
    assert cols["attainable_tflops_per_s"] == pytest.approx(min(2.5, cols["arith_intensity"] * 120.0 / 1e3))
    low = dict(row, seq_len=16, flops=attention_flops(Case("sdpa", {}, seq_len=16, heads=8, kv_heads=8)))
    low.update(roofline.fact_columns(low))
    assert rates(low)["attainable_tflops_per_s"] < 2.5  # memory-bound side of the roof
    missing = roofline.machine_columns("cpu", "bfloat16", 2, cal)
    assert math.isnan(rates(dict(row, dtype="bfloat16"))["pct_of_peak"]) and "bfloat16" in missing["roofline_note"]
    none = roofline.machine_columns("cpu", "float32", 2, None)
    assert math.isnan(derive({**row, **none})["pct_of_peak"]) and "bench calibrate" in none["roofline_note"]


def test_real_measurement_is_positive_and_consistent():
    mm = calibrate.measure_matmul("cpu", "float32", max_n=256, min_time_s=0.02, max_time_s=0.2)
    assert mm["n"] <= 256 and mm["tflops_per_s"] > 0 and mm["tflops_per_s_best"] >= mm["tflops_per_s"]
    bw = calibrate.measure_bandwidth("cpu", nbytes=4 << 20, min_time_s=0.02, max_time_s=0.2)
    assert bw["bytes"] == 4 << 20 and bw["gb_per_s"] > 0


def _parser():
    from harness.cli import measure as cli_measure

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    cli_measure.register(sub)
    return p


def test_bench_calibrate_quick_writes_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate, "current_fingerprint", lambda: "testmachine")
    args = _parser().parse_args(["calibrate", "--quick", "--dtype", "float32", "--device", "cpu",
                                 "--dir", str(tmp_path)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "matmul float32" in out and "GB/s" in out and "measured now: cpu/threads=" in out
    data = json.loads((tmp_path / "testmachine.json").read_text())
    assert data["fingerprint"] == "testmachine" and data["entries"][calibrate.entry_key("cpu")]["quick"] is True
    args = _parser().parse_args(["calibrate", "--quick", "--dtype", "float32", "--device", "cpu",
                                 "--dir", str(tmp_path)])
    assert args.handler(args) == 0 and "nothing (cached" in capsys.readouterr().out


def test_bench_calibrate_check_prints_ratios(capsys):
    args = _parser().parse_args(["calibrate", "--check", "--device", "cpu", "--seq-len", "64", "--heads", "2",
                                 "--head-dim", "16", "--runs", "2", "--min-time-s", "0.02", "--max-time-s", "0.1"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "harness" in out and "torch Timer.blocked_autorange" in out and "÷ ref" in out
    assert "/ torch Timer.blocked_autorange median ratio" in out and "run-to-run spread" in out and "5%" in out


def test_cuda_check_is_judged_against_do_bench_not_the_timer(monkeypatch):
    """On CUDA the harness (L2 flushed) is judged against do_bench (which flushes too), and its CUDA-graph
    replay against do_bench_cudagraph; the Timer (warm L2) is shown but judges nothing. Faked on a CPU:
    a fake triton.testing, CPU inputs, and a fake time_call that says which settings it timed with."""
    import sys
    import types

    from harness.measure import crosscheck
    from harness.measure.timing import Timing

    calls = []

    def fake_time_call(fns, config, device="cpu", **kw):
        calls.append((device, config.cuda_graph, config.flush_l2))
        ms = 1.0 if config.cuda_graph else 2.05  # harness: 2.5% over do_bench's 2.0 (graph: 1.0 vs 1.01)
        return Timing(samples_s=[ms / 1e3] * 9, first_call_s=0.01)

    def do_bench(fn, rep=100, return_mode="mean"):
        return [2.0] * 9

    def do_bench_cudagraph(fn, rep=20, return_mode="mean"):
        return [1.01] * 9

    fake = types.ModuleType("triton.testing")
    fake.do_bench, fake.do_bench_cudagraph = do_bench, do_bench_cudagraph
    monkeypatch.setitem(sys.modules, "triton.testing", fake)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(testing=fake))
    monkeypatch.setattr(crosscheck, "time_call", fake_time_call)
    case = Case("sdpa", {}, device="cuda", heads=2, kv_heads=2, seq_len=64, head_dim=16)
    records = crosscheck.cross_check([case], runs=1, min_time_s=0.01, make_inputs=lambda c, seed: __import__(
        "harness.measure.inputs", fromlist=["make_qkv"]).make_qkv(Case("sdpa", {}, heads=2, kv_heads=2, seq_len=64,
                                                                     head_dim=16), seed=seed))
    by = {r["method"]: r for r in records}
    assert by["harness"]["judged"] and by["harness"]["reference"] == crosscheck.DO_BENCH
    assert by["harness"]["ratio_to_ref"] == pytest.approx(1.025)
    assert by["harness (cuda_graph)"]["reference"] == crosscheck.DO_BENCH_GRAPH
    assert by["harness (cuda_graph)"]["ratio_to_ref"] == pytest.approx(1.0 / 1.01)
    assert not by[crosscheck.TIMER]["judged"]
    assert ("cuda", True, False) in calls and ("cuda", False, True) in calls  # graph without flush; eager with it
    verdict = crosscheck.verdicts(records)
    assert len(verdict) == 2 and all("3%" in line for line in verdict)
    assert "harness / triton do_bench median ratio 1.025 (within 3%)" in verdict[0]


def test_cuda_without_a_gpu_is_one_line_and_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = _parser().parse_args(["calibrate", "--device", "cuda"])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err
