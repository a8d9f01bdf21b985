"""Distribution-free statistics shared by measurement and regression tracking.

* :func:`median_ci`: the confidence interval of one sample's median from its order
  statistics (the timing rule's stopping test, :mod:`harness.measure.timing`).
* :func:`time_test`: two samples of times compared as a multiplicative shift: the ratio
  of medians, the Hodges–Lehmann/Moses interval for the shift and the two-sided
  Mann–Whitney p-value (:mod:`harness.regression.compare`, :mod:`harness.regression.confirm`).
* :func:`bh_adjust`: Benjamini–Hochberg adjusted p-values across many such tests.

Why rank methods: timings are skewed and heavy-tailed and benchmarks often have few
samples, so normal approximations and percentile bootstraps have unknown coverage; the
order-statistic intervals here hold whatever the distribution, need no resampling (no seed
to fix), and the Moses interval and the U test are one procedure, so a shift is
significant at ``alpha`` exactly when its interval excludes 1.

Pure functions of numbers (numpy; scipy.stats, which takes seconds to import, only when a
function needs it); nothing here knows about runs or cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Exact null distribution of U up to this many samples per side (and no ties).
EXACT_MAX = 50


# --------------------------------------------------------------------------------------------
# one sample: the median's confidence interval


@lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """1-based ranks (j, n+1-j) of the order statistics bounding a distribution-free CI of the
    median with coverage >= ``confidence``; None when n is too small for any such interval."""
    from scipy import stats

    if n < 1:
        return None
    alpha = 1.0 - confidence
    # coverage of [x_(j), x_(n+1-j)] is 1 - 2 * P(B <= j - 1), B ~ Binomial(n, 1/2)
    c = int(stats.binom.ppf(alpha / 2, n, 0.5))
    while c >= 0 and stats.binom.cdf(c, n, 0.5) > alpha / 2:
        c -= 1
    if c < 0:
        return None
    j = c + 1
    return j, n + 1 - j


def median_ci(samples: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median; (nan, nan) when too few samples."""
    ranks = median_ci_ranks(len(samples), confidence)
    if ranks is None:
        return math.nan, math.nan
    ordered = np.sort(np.asarray(samples, dtype=float))
    return float(ordered[ranks[0] - 1]), float(ordered[ranks[1] - 1])


# --------------------------------------------------------------------------------------------
# two samples: Mann–Whitney U and the Moses interval of a multiplicative shift


def u_null_cdf(n: int, m: int) -> np.ndarray:
    """Exact ``P(U <= u)``, u = 0..n*m, of the Mann–Whitney U statistic with no ties.

    The counts of U are the coefficients of the Gaussian binomial coefficient
    ``[n+m choose n]_q = prod_{i=1..n} (1 - q^(m+i)) / (1 - q^i)``, built one factor
    at a time (a division by ``1 - q^i`` is a cumulative sum with stride i).
    """
    if n > m:
        n, m = m, n
    size = n * m + 1
    c = np.zeros(size)
    c[0] = 1.0
    for i in range(1, n + 1):
        s = m + i
        if s < size:
            c[s:] -= c[:-s].copy()
        pad = (-size) % i
        c = np.concatenate([c, np.zeros(pad)]).reshape(-1, i).cumsum(axis=0).ravel()[:size]
    c = np.clip(c, 0, None)
    return np.cumsum(c) / c.sum()


def shift_interval_rank(n: int, m: int, alpha: float, ties: bool, tie_counts: np.ndarray | None = None) -> int:
    """k (1-based): the Moses interval at level 1 - alpha is ``[d_(k), d_(nm+1-k)]`` of the n*m
    sorted pairwise differences; 0 when the samples are too few for one.

    Exact (:func:`u_null_cdf`) with no ties and at most ``EXACT_MAX`` samples a side, else the
    normal approximation of U with tie correction (``tie_counts``: sizes of the tied groups)."""
    from scipy import stats

    if not ties and n <= EXACT_MAX and m <= EXACT_MAX:
        cdf = u_null_cdf(n, m)
        # largest k with P(U <= k-1) <= alpha/2
        ok = np.nonzero(cdf <= alpha / 2 + 1e-12)[0]
        return int(ok[-1]) + 1 if len(ok) else 0
    N = n + m
    correction = 0.0
    if tie_counts is not None and len(tie_counts):
        correction = float(((tie_counts**3) - tie_counts).sum()) / (N * (N - 1))
    sigma = math.sqrt(n * m / 12.0 * ((N + 1) - correction))
    z = stats.norm.ppf(1 - alpha / 2)
    # P(U <= k-1) ~ Phi((k - 1 + 0.5 - nm/2) / sigma) <= alpha/2, with continuity correction
    k = int(math.floor(n * m / 2.0 - z * sigma + 0.5))
    return max(k, 0)


@dataclass
class TimeTest:
    ratio: float  # median(new) / median(base)
    ci_low: float  # interval for the multiplicative shift (nan when samples are too few)
    ci_high: float
    shift: float  # Hodges–Lehmann estimate of the ratio
    p_value: float
    n_base: int
    n_new: int


def time_test(base_ms, new_ms, alpha: float = 0.05) -> TimeTest:
    """Ratio of medians, Moses interval at level 1 - alpha, and Mann–Whitney p-value (two-sided).

    Non-finite and non-positive samples are dropped. Exact null distribution when both sides
    have at most ``EXACT_MAX`` samples and no ties, the normal approximation otherwise."""
    from scipy import stats

    a = np.asarray(base_ms, dtype=float)
    b = np.asarray(new_ms, dtype=float)
    a = a[np.isfinite(a) & (a > 0)]
    b = b[np.isfinite(b) & (b > 0)]
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return TimeTest(math.nan, math.nan, math.nan, math.nan, math.nan, n, m)
    ratio = float(np.median(b) / np.median(a))
    la, lb = np.log(a), np.log(b)
    diffs = np.sort((lb[None, :] - la[:, None]).ravel())
    shift = float(math.exp(np.median(diffs)))
    if n < 2 or m < 2:
        return TimeTest(ratio, math.nan, math.nan, shift, math.nan, n, m)
    values, counts = np.unique(np.concatenate([la, lb]), return_counts=True)
    ties = len(values) < n + m
    method = "exact" if (not ties and n <= EXACT_MAX and m <= EXACT_MAX) else "asymptotic"
    p = float(stats.mannwhitneyu(lb, la, alternative="two-sided", method=method).pvalue)
    k = shift_interval_rank(n, m, alpha, ties, counts[counts > 1])
    if k < 1:
        lo = hi = math.nan  # too few samples for an interval at this level
    else:
        lo, hi = float(math.exp(diffs[k - 1])), float(math.exp(diffs[n * m - k]))
    return TimeTest(ratio, lo, hi, shift, p, n, m)


# --------------------------------------------------------------------------------------------
# many tests


def bh_adjust(p_values) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN stays NaN."""
    from scipy import stats

    p = np.asarray(p_values, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q
