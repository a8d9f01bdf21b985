"""Adaptive repetition on a fake clock: the stopping rule, the median's CI, input rotation, settings."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from harness.core.config import TIMING, RunSettings
from harness.core.stats import median_ci, median_ci_ranks
from harness.measure.timing import (
    TimingConfig,
    input_set_count,
    relative_precision,
    stop_reason,
    time_call,
)
from tests.fakes import FakeClock


def noisy(n, center=1e-3, rel=0.05, seed=0):
    """Seeded, strictly positive durations spread about ±rel around center."""
    rng = np.random.default_rng(seed)
    return list(center * (1 + rel * rng.uniform(-1, 1, size=n)))


# --------------------------------------------------------------------------------------------
# The confidence interval of the median


def test_ci_ranks_are_the_tightest_with_the_wanted_coverage():
    for n in range(1, 200):
        ranks = median_ci_ranks(n, 0.95)
        if ranks is None:
            assert 2 * 0.5**n > 0.05  # even (x_(1), x_(n)) covers with < 95%
            continue
        j, k = ranks
        assert k == n + 1 - j
        coverage = 1 - 2 * stats.binom.cdf(j - 1, n, 0.5)
        assert coverage >= 0.95
        if j + 1 <= k - 1:  # one rank tighter on each side would not cover
            assert 1 - 2 * stats.binom.cdf(j, n, 0.5) < 0.95
    assert median_ci_ranks(5) is None and median_ci_ranks(6) == (1, 6)


def test_ci_matches_scipy_quantile_test():
    rng = np.random.default_rng(1)
    for n in (6, 7, 10, 31, 64, 101):
        x = rng.lognormal(size=n)
        ci = stats.quantile_test(x, q=float(np.median(x)), p=0.5).confidence_interval(0.95)
        assert median_ci(x) == pytest.approx((ci.low, ci.high))


def test_ci_coverage_on_skewed_samples_is_at_least_nominal():
    # lognormal(0, 1) has median exactly 1; a seeded Monte Carlo of the interval's coverage
    rng = np.random.default_rng(2)
    hits = sum(lo <= 1.0 <= hi for lo, hi in (median_ci(rng.lognormal(size=25)) for _ in range(2000)))
    assert hits / 2000 >= 0.94


def test_precision_is_relative_half_width_of_the_larger_side():
    samples = [1.0] * 3 + [2.0] * 3 + [10.0] * 3 + [2.0] * 2  # median 2
    lo, hi = median_ci(samples)
    assert relative_precision(samples) == pytest.approx(max(2 - lo, hi - 2) / 2)
    assert relative_precision([1.0, 2.0]) == math.inf


# --------------------------------------------------------------------------------------------
# The stopping rule


def test_constant_samples_stop_on_precision_as_soon_as_a_ci_exists():
    clock = FakeClock([0.5] + [1e-3] * 1000)
    t = time_call(clock.fn, TimingConfig(warmup=1, min_time_s=0.0, min_reps=2, max_reps=100), clock=clock)
    assert t.stop == "precision"
    assert len(t.samples_s) == 6  # the first n with a 95% interval
    assert t.precision == 0.0 and t.first_call_s == 0.5


def test_noisy_samples_stop_at_the_first_n_that_meets_the_target():
    clock = FakeClock([1e-3] + noisy(5000, rel=0.05))
    config = TimingConfig(warmup=2, min_time_s=0.01, min_reps=3, max_reps=5000, max_time_s=100.0,
                          target_precision=0.01)
    t = time_call(clock.fn, config, clock=clock)
    assert t.stop == "precision"
    assert t.precision <= 0.01
    assert relative_precision(t.samples_s[:-1]) > 0.01 or sum(t.samples_s[:-1]) < 0.01
    assert 20 < len(t.samples_s) < 5000  # ±5% noise needs many samples for ±1%, but not all of them


def test_a_looser_target_stops_earlier():
    durations = [1e-3] + noisy(5000, rel=0.1, seed=3)
    counts = []
    for target in (0.05, 0.02, 0.01):
        clock = FakeClock(durations)
        config = TimingConfig(warmup=1, min_time_s=0.0, max_reps=5000, max_time_s=100.0, target_precision=target)
        counts.append(len(time_call(clock.fn, config, clock=clock).samples_s))
    assert counts[0] < counts[1] < counts[2]


def test_budget_stops_sampling_that_cannot_reach_the_target():
    clock = FakeClock([0.1] + noisy(1000, center=0.1, rel=0.5, seed=4))
    config = TimingConfig(warmup=1, min_time_s=0.0, min_reps=3, max_reps=1000, max_time_s=2.0)
    t = time_call(clock.fn, config, clock=clock)
    assert t.stop == "time_budget"
    assert sum(t.samples_s) >= 2.0 > sum(t.samples_s[:-1])
    assert t.precision > 0.01  # recorded, not hidden


def test_budget_never_cuts_below_min_reps():
    clock = FakeClock([3.0] * 20)
    t = time_call(clock.fn, TimingConfig(warmup=1, min_reps=4, max_time_s=1.0), clock=clock)
    assert len(t.samples_s) == 4 and t.stop == "time_budget"


def test_max_reps_caps_everything():
    clock = FakeClock([1e-3] + noisy(100, rel=0.3, seed=5))
    t = time_call(clock.fn, TimingConfig(warmup=1, min_time_s=0.0, max_reps=9, max_time_s=100.0), clock=clock)
    assert len(t.samples_s) == 9 and t.stop == "max_reps"


def test_zero_target_is_the_old_rule():
    clock = FakeClock([1e-3] + noisy(100, rel=0.3, seed=6))
    config = TimingConfig(warmup=1, min_time_s=0.0045, min_reps=3, max_reps=100, target_precision=0.0)
    t = time_call(clock.fn, config, clock=clock)
    assert t.stop == "min_time"
    assert sum(t.samples_s) >= 0.0045 > sum(t.samples_s[:-1]) or len(t.samples_s) == 3


def test_stop_reason_order():
    config = TimingConfig(min_reps=3, max_reps=10, min_time_s=1.0, max_time_s=2.0)
    assert stop_reason([1.0, 1.0], 5.0, config) is None  # below min_reps, even past the budget
    assert stop_reason([0.1] * 10, 0.5, config) == "max_reps"
    assert stop_reason([0.1] * 3, 2.0, config) == "time_budget"
    assert stop_reason([0.1] * 6, 0.6, config) is None  # min_time_s not reached
    assert stop_reason([0.2] * 6, 1.2, config) == "precision"


# --------------------------------------------------------------------------------------------
# Input rotation


def test_calls_rotate_through_the_input_sets():
    clock = FakeClock([1e-3] * 1000)
    calls = []

    def make(i):
        def f():
            calls.append(i)
            clock.fn()

        return f

    t = time_call([make(i) for i in range(3)], TimingConfig(warmup=3, min_time_s=1.0, max_reps=20), clock=clock)
    assert t.input_sets == 3 and t.warmup_calls == 2 and len(t.samples_s) == 20
    assert calls == [i % 3 for i in range(23)]  # first call, warm-up and samples continue one cycle


def test_input_set_count():
    mib = 2**20
    config = TimingConfig()
    assert input_set_count(8 * mib, "cpu", config, cache_bytes=32 * mib) == 9  # 2×LLC of other sets, + 1
    assert input_set_count(32 * mib, "cpu", config, cache_bytes=32 * mib) == 1
    assert input_set_count(1024, "cpu", config, cache_bytes=32 * mib) == 64  # capped
    assert input_set_count(8 * mib, "cpu", TimingConfig(rotate_inputs=False), cache_bytes=32 * mib) == 1
    assert input_set_count(8 * mib, "cpu", config, cache_bytes=None) >= 1  # this machine's own LLC
    # on CUDA the L2 flush already evicts inputs: no rotation unless the flush is off
    assert input_set_count(mib, "cuda", config) == 1


# --------------------------------------------------------------------------------------------
# Settings and results


def check_setting(key, value):
    return TIMING[key].check(value) if key in TIMING else (value, TIMING.unknown(key))


def test_settings_checks():
    assert check_setting("target_precision", 0) == (0.0, None)
    assert "expected int" in check_setting("max_reps", "many")[1]
    assert ">= 0" in check_setting("warmup", -1)[1]
    assert "< 1" in check_setting("confidence", 1.0)[1]
    assert "<= 1" in check_setting("target_precision", 2.0)[1]
    assert check_setting("cuda_graph", True) == (True, None)
    assert "expected bool" in check_setting("flush_l2", 1)[1]
    assert "expected int" in check_setting("threads", True)[1]
    assert "unknown key" in check_setting("warmups", 1)[1]
    assert set(TIMING.names) >= {"warmup", "min_time_s", "min_reps", "max_reps", "threads"}
    from dataclasses import asdict

    problems = dict(TIMING.order_problems(asdict(TimingConfig(min_reps=5, max_reps=3, min_time_s=2.0, max_time_s=1.0))))
    assert set(problems) == {"min_reps", "max_time_s"}


def test_config_round_trips_through_a_dict_with_old_or_unknown_keys():
    old = {"warmup": 2, "min_time_s": 0.1, "max_reps": 7, "min_reps": 2, "threads": None}
    settings = RunSettings.from_json({"timing": {**old, "something_new": 1}, "seed": 4, "unknown": True})
    config = settings.timing
    assert config.max_reps == 7 and config.target_precision == 0.01 and settings.seed == 4
    assert RunSettings.from_json(settings.to_json()) == settings


def test_row_columns():
    clock = FakeClock([1e-3] * 100)
    t = time_call(clock.fn, TimingConfig(warmup=1, min_time_s=0.0), clock=clock)
    cols = t.row_columns()
    assert cols["time_ms_ci_low"] == pytest.approx(1.0) and cols["time_ms_ci_high"] == pytest.approx(1.0)
    assert cols["time_ci_rel"] == 0.0 and cols["timing_stop"] == "precision"
    assert cols["input_sets"] == 1 and cols["timing_method"] == "perf_counter" and cols["timing_note"] == ""


# --------------------------------------------------------------------------------------------
# CUDA (needs a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device: CUDA events, L2 flush and graphs untested")


@cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_events_flush_and_graph(graph):
    a = torch.randn(1024, 1024, device="cuda")
    out = torch.empty_like(a)
    config = TimingConfig(warmup=2, min_time_s=0.01, max_time_s=0.5, cuda_graph=graph)
    t = time_call(lambda: torch.matmul(a, a, out=out), config, device="cuda")
    assert t.method == ("cuda_graph" if graph else "cuda_events")
    assert t.l2_flush and len(t.samples_s) >= config.min_reps and min(t.samples_s) > 0


@cuda
def test_cuda_graph_capture_failure_falls_back_to_eager():
    a = torch.randn(64, device="cuda")
    before = torch.cuda.current_stream()
    t = time_call(lambda: a.sum().item(), TimingConfig(warmup=1, min_time_s=0.0, cuda_graph=True), device="cuda")
    assert t.method == "cuda_events" and "capture failed" in t.note and t.restart
    assert torch.cuda.current_stream() == before  # not left on the capture's side stream


@cuda
def test_cuda_warm_up_uses_25_ms_of_gpu_time():
    a = torch.randn(256, 256, device="cuda")
    t = time_call(lambda: a @ a, TimingConfig(warmup=2, min_time_s=0.0, max_reps=10), device="cuda")
    assert t.warmup_calls * t.median_s >= 0.02  # tiny calls: many more than warmup - 1 of them


def test_cpu_cache_sizes_from_sysfs(tmp_path):
    from harness.measure.environment import cpu_caches

    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                             (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert cpu_caches(tmp_path) == {"L1d": 32 * 2**10, "L2": 2**20, "L3": 32 * 2**20}
    assert cpu_caches(tmp_path / "missing") == {}
