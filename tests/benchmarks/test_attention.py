"""The variant registry under pytest-benchmark: one benchmark per case of a suite.

    pytest tests/benchmarks --benchmark-only                       # the cases of suites/quick.toml
    ATTENTION_BENCH_SUITE=suites/cpu-scaling.toml pytest tests/benchmarks --benchmark-only
    pytest tests/benchmarks --benchmark-only --benchmark-autosave   # then --benchmark-compare, as usual

Cases come from a suite file (``ATTENTION_BENCH_SUITE``, default ``suites/quick.toml``) through
the harness's own expansion, so they are the cases ``bench run`` measures, with the same names
as ``bench export --format pytest-benchmark`` gives them: an exported ``bench run`` and a
pytest-benchmark run compare case by case. The suite's plugins are loaded, its thread count is
applied, and a case the variant cannot run is skipped with the variant's own reason.

Timing is pytest-benchmark's own (its calibration, rounds and statistics); the first call
(compilation, autotuning) is made before it and recorded in ``extra_info['first_call_ms']``.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest
import torch

from harness.core.registry import get_variant
from harness.engine.lifecycle import default_memory_budget
from harness.engine.runner import _call_for_mode, skip_reasons
from harness.engine.suite import expand_cases, load_suite
from harness.measure.inputs import make_qkv
from harness.regression.export import benchmark_group, benchmark_id
from tests.benchmarks.conftest import SKIP_REASON, benchmarks_requested

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SUITE = ROOT / "suites" / "quick.toml"


@functools.cache
def _suite():
    path = Path(os.environ.get("ATTENTION_BENCH_SUITE") or DEFAULT_SUITE)
    return load_suite(path if path.is_absolute() else Path.cwd() / path)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    if not benchmarks_requested(metafunc.config):  # the normal test run: no suite is even read
        metafunc.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))],
                             ids=["not-requested"])
        return
    suite = _suite()
    cases = expand_cases(suite)  # loads the suite's plugins; raises SuiteError with located problems
    metafunc.parametrize("case", cases, ids=[benchmark_id(c) for c in cases])


def _synchronized(fn, device: str):
    if not device.startswith("cuda"):
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def test_attention(benchmark, case):
    suite = _suite()
    variant = get_variant(case.variant)
    reasons = skip_reasons(case, variant, default_memory_budget())
    if reasons:
        pytest.skip("; ".join(reasons))
    if suite.timing.threads:
        torch.set_num_threads(suite.timing.threads)
    q, k, v = make_qkv(case, seed=suite.seed)
    fn = _synchronized(_call_for_mode(variant, case, q, k, v), case.device)

    t0 = time.perf_counter()
    out = fn()  # the first call: compilation, autotuning, lazy initialisation; kept out of the timing
    first_call_ms = (time.perf_counter() - t0) * 1e3
    if torch.is_tensor(out):
        assert torch.isfinite(out).all(), f"{case.label()}: non-finite output"

    benchmark.group = benchmark_group(case)
    from harness.core import flops as flop_rules

    flops = flop_rules.total_flops(variant.flops(case), case.mode)
    benchmark.extra_info.update(
        variant=case.variant, params=case.params_json, family=variant.family, exact=variant.exact,
        device=case.device, dtype=case.dtype, mode=case.mode, batch=case.batch, heads=case.heads,
        kv_heads=case.kv_heads, seq_len=case.seq_len, head_dim=case.head_dim, causal=case.causal,
        inputs=case.inputs, case_id=case.case_id, flops=flops, first_call_ms=first_call_ms,
        threads=torch.get_num_threads(),
    )
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["tflops_per_s"] = flops / stats.stats.median / 1e12
