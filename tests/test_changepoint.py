"""Change-point detection: planted steps are found where they are, pure noise gives none."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from harness.regression.changepoint import case_trends, detect_steps, l1_cost_matrix, pelt


def series(n, sigma, seed, steps=(), heavy=False, level=10.0):
    """Log-normal-ish noise around ``level``; ``steps`` = [(index, ratio)] multiply from index on."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_t(3, n) * sigma if heavy else rng.normal(0, sigma, n)
    y = level * np.exp(noise)
    for index, ratio in steps:
        y[index:] *= ratio
    return y


@pytest.mark.parametrize("ratio", [1.15, 0.85, 1.5])
def test_finds_a_planted_step_where_it_is(ratio):
    y = series(40, 0.02, seed=1, steps=[(25, ratio)])
    steps = detect_steps(y)
    assert len(steps) == 1
    assert abs(steps[0].index - 25) <= 1
    assert steps[0].ratio == pytest.approx(ratio, rel=0.03)
    assert steps[0].after / steps[0].before == pytest.approx(steps[0].ratio)


def test_finds_two_steps():
    y = series(60, 0.02, seed=2, steps=[(20, 1.2), (45, 0.8)])
    steps = detect_steps(y)
    assert [s.index for s in steps] == pytest.approx([20, 45], abs=1)
    assert steps[0].ratio > 1.1 and steps[1].ratio < 0.9


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "heavy-tailed"])
@pytest.mark.parametrize("n", [12, 30, 100])
def test_pure_noise_has_no_step(n, heavy):
    found = [detect_steps(series(n, 0.03, seed, heavy=heavy)) for seed in range(8)]
    assert all(s == [] for s in found), [s for s in found if s]


def test_noise_with_no_size_filter_still_rarely_splits():
    # the penalty alone (min_step=0) keeps pure Gaussian noise in one segment nearly always
    hits = sum(bool(detect_steps(series(50, 0.03, seed), min_step=0.0)) for seed in range(40))
    assert hits <= 1


def test_a_single_outlier_is_not_a_step():
    y = series(30, 0.01, seed=3)
    y[14] *= 2.5
    assert detect_steps(y) == []


def test_steps_below_min_step_are_merged_away():
    y = series(40, 0.002, seed=4, steps=[(20, 1.03)])  # real, but only 3%
    assert detect_steps(y) == []
    small = detect_steps(y, min_step=0.01)
    assert len(small) == 1 and abs(small[0].index - 20) <= 1


def test_short_and_invalid_series():
    assert detect_steps([1.0, 2.0, 3.0]) == []
    assert detect_steps([]) == []
    with pytest.raises(ValueError):
        detect_steps([1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        detect_steps([1.0, float("nan"), 1.0, 1.0])


def test_cost_matrix_is_the_l1_deviation_from_the_median():
    y = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    c = l1_cost_matrix(y)
    for s, t in itertools.combinations(range(len(y) + 1), 2):
        seg = y[s:t]
        assert c[s, t] == pytest.approx(np.abs(seg - np.median(seg)).sum())


def test_pelt_finds_the_optimal_segmentation():
    """PELT's answer has the smallest penalised cost of all segmentations (brute force, n=10)."""
    rng = np.random.default_rng(5)
    y = np.concatenate([rng.normal(0, 1, 4), rng.normal(4, 1, 3), rng.normal(-2, 1, 3)])
    penalty, min_size = 2.0, 2
    cost = l1_cost_matrix(y)

    def total(cps):
        b = [0, *cps, len(y)]
        return sum(cost[s, t] for s, t in zip(b, b[1:])) + penalty * len(cps)

    best = math.inf
    for k in range(0, 5):
        for cps in itertools.combinations(range(min_size, len(y) - min_size + 1), k):
            b = [0, *cps, len(y)]
            if all(t - s >= min_size for s, t in zip(b, b[1:])):
                best = min(best, total(cps))
    assert total(pelt(y, penalty, min_size)) == pytest.approx(best)


def test_case_trends_over_a_history_table():
    rows = []
    t = series(12, 0.01, seed=6, steps=[(7, 1.3)])
    for i in range(12):
        common = {"variant": "naive", "params": "{}", "device": "cpu", "dtype": "float32", "mode": "fwd", "batch": 1,
                  "heads": 2, "kv_heads": 2, "seq_len": 64, "head_dim": 16, "causal": False, "inputs": "gaussian"}
        rows.append({**common, "case_id": "a", "status": "ok", "time_ms": t[i], "time_ms_p10": t[i] * 0.9,
                     "time_ms_p90": t[i] * 1.1, "run_index": i, "run_id": f"r{i}", "commit": f"c{i:02d}" * 5,
                     "started": f"2026-01-{i + 1:02d}"})
        rows.append({**common, "seq_len": 32, "case_id": "b", "status": "ok" if i != 3 else "error",
                     "time_ms": 5.0 * (1 + 0.001 * (i % 2)), "time_ms_p10": 4.9, "time_ms_p90": 5.1,
                     "run_index": i, "run_id": f"r{i}", "commit": None, "started": ""})
    trends = case_trends(pd.DataFrame(rows), runs=list(range(12)))
    assert [tr["case_id"] for tr in trends] == ["a", "b"]  # the case with a step comes first
    a, b = trends
    assert len(a["steps"]) == 1 and a["steps"][0]["run_id"] == "r7" and a["steps"][0]["commit"] == "c07c07c07c"
    assert a["steps"][0]["ratio"] == pytest.approx(1.3, rel=0.03)
    assert b["steps"] == [] and len(b["points"]) == 11  # the failed run is not a point
    assert a["label"].startswith("naive cpu float32 fwd")
