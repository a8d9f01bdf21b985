"""Timing rule on a fake clock, memory against known allocations, FLOP conventions."""

import pytest
import torch

from harness.core.cases import Case
from harness.core.flops import attention_flops, dense_pairs, total_flops
from harness.measure.memory import peak_from_events, peak_memory_bytes
from harness.measure.timing import TimingConfig, summarize, time_call
from tests.fakes import FakeClock


def test_first_call_is_kept_out_of_the_samples():
    clock = FakeClock([4.0] + [1 / 64] * 1000)  # a slow first call (compilation), then 1/64 s
    t = time_call(clock.fn, TimingConfig(warmup=3, min_time_s=0.125, max_reps=100, min_reps=3), clock=clock)
    assert t.first_call_s == 4.0
    assert t.warmup_calls == 2
    assert all(s == 1 / 64 for s in t.samples_s)
    assert len(t.samples_s) == 8  # stops once the samples add up to min_time_s


def test_stops_at_max_reps():
    clock = FakeClock([0.001] * 1000)
    t = time_call(clock.fn, TimingConfig(warmup=1, min_time_s=10.0, max_reps=7), clock=clock)
    assert len(t.samples_s) == 7


def test_slow_calls_still_take_min_reps_and_cut_warmup_short():
    clock = FakeClock([2.0] * 100)
    t = time_call(clock.fn, TimingConfig(warmup=5, min_time_s=0.5, max_reps=100, min_reps=3), clock=clock)
    assert t.warmup_calls == 1  # warm-up stops once it has taken min_time_s
    assert len(t.samples_s) == 3


def test_summary_statistics():
    s = summarize([float(x) for x in range(1, 102)])
    assert s["median"] == 51 and s["p10"] == 11 and s["p90"] == 91 and s["min"] == 1 and s["max"] == 101


def test_peak_from_events_takes_running_maximum():
    assert peak_from_events([(0, 100), (1, 50), (2, -100), (3, 20), (4, -70)]) == 150
    assert peak_from_events([]) == 0


def test_cpu_peak_memory_sees_a_temporary_that_is_freed():
    n = 1 << 20

    def fn():
        tmp = torch.ones(n)  # 4 MiB, freed before return
        out = tmp.sum()
        del tmp
        return out

    peak = peak_memory_bytes(fn, "cpu")
    assert 4 * n <= peak < 4 * n + 4096


def test_naive_peak_memory_is_its_score_and_probability_matrices():
    from harness import get_variant
    from harness.measure.inputs import make_qkv

    case = Case("naive", {}, heads=4, kv_heads=4, seq_len=512, head_dim=32)
    q, k, v = make_qkv(case)
    with torch.no_grad():
        peak = peak_memory_bytes(lambda: get_variant("naive")(q, k, v, causal=False), "cpu")
    scores = case.batch * case.heads * case.seq_len**2 * 4
    scaled_q = q.numel() * 4  # q·scale, alive until the function returns
    out = q.numel() * 4
    # counted from the code: scaled q, scores and probabilities are alive when the output is allocated
    assert peak == scaled_q + 2 * scores + out


def test_flop_conventions():
    case = Case("naive", {}, batch=2, heads=4, kv_heads=4, seq_len=100, head_dim=16)
    assert attention_flops(case) == 4 * 2 * 4 * 16 * 100 * 100
    assert dense_pairs(100, True) == 5000
    assert total_flops(10.0, "bwd") == 25.0 and total_flops(10.0, "fwd_bwd") == 35.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_inputs_start_on_a_page_and_keep_their_values(dtype):
    """CPU BLAS speed depends on where in a page the operands start (2x for naive at L=1024 on
    the test machine), so every input is placed on a 4 KiB boundary, whatever the allocator gave."""
    from harness.measure.inputs import ALIGNMENT, aligned_copy, make_grad, make_qkv

    case = Case("naive", {}, heads=2, kv_heads=1, seq_len=33, head_dim=24, dtype=dtype)
    q, k, v = make_qkv(case, seed=3)
    for x in (q, k, v, make_grad(q)):
        assert x.data_ptr() % ALIGNMENT == 0 and x.is_contiguous()
    assert q.shape == (1, 2, 33, 24) and k.shape == v.shape == (1, 1, 33, 24)
    q2, _, _ = make_qkv(case, seed=3)
    assert torch.equal(q, q2) and q.std() > 0.5  # same seed, same values; random, not zeros
    for offset in range(1, 40, 7):  # misaligned sources, as the allocator may hand them out
        src = torch.randn(offset + 100)[offset:].view(4, 25)
        out = aligned_copy(src)
        assert out.data_ptr() % ALIGNMENT == 0 and torch.equal(out, src)


def test_the_thp_allocator_is_an_option_never_a_default(monkeypatch):
    """Where glibc puts a large temporary changes CPU BLAS speed by up to 2x, but a user's program
    gets glibc's choice: bench measures in the user's environment, and THP_MEM_ALLOC_ENABLE=1
    (page-aligned, huge-page allocations) is ``[run] allocator = "thp"``, recorded in run.json."""
    import os
    import subprocess
    import sys

    from harness.cli.main import main
    from harness.measure.environment import ALLOCATOR_ENV, allocator_env, capture

    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert main(["list", "--json"]) == 0 and ALLOCATOR_ENV not in os.environ  # the command line sets nothing
    assert allocator_env("default") == {} and allocator_env("thp") == {ALLOCATOR_ENV: "1"}
    assert capture()["measurement"][ALLOCATOR_ENV] is None
    assert capture("thp")["measurement"] == {**capture()["measurement"], "allocator": "thp", ALLOCATOR_ENV: "1"}
    monkeypatch.setenv(ALLOCATOR_ENV, "0")  # the user's own setting is what the workers get, and is recorded
    assert capture()["measurement"][ALLOCATOR_ENV] == "0"
    # and this torch honours the option: after frees, new 16 MiB tensors still start on a page
    code = ("import torch\nptrs = []\nfor i in range(8):\n    a = torch.empty(4 << 20); b = torch.empty(37000)\n"
            "    c = torch.empty(4 << 20); ptrs += [a.data_ptr(), c.data_ptr()]; del a\n"
            "print(all(p % 4096 == 0 for p in ptrs))")
    env = dict(os.environ, **allocator_env("thp"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_timing_fills_exactly_the_schemas_time_columns():
    from harness.core import schema

    clock = FakeClock([2e-3] + [1e-3] * 100)
    t = time_call(clock.fn, TimingConfig(warmup=1, min_time_s=0.0, max_reps=5), clock=clock)
    cols = t.row_columns()
    # every time column but comm_ms, which only a distributed case's measurer fills (harness.engine.ranks)
    assert set(cols) == set(schema.names("time")) - {"comm_ms"}
    assert cols["time_ms"] == pytest.approx(1.0) and cols["first_call_ms"] == pytest.approx(2.0)
    assert cols["reps"] == len(t.samples_s) == 5
    assert schema.row_problems({**schema.empty_row(), **cols}) == []
