"""Timing one call: warm-up, then repetitions until enough time or enough samples.

The rule (``TimingConfig``): the first call is timed on its own (``first_call_s``:
it includes compilation, autotuning and lazy initialisation, and is kept out of
the samples); then up to ``warmup - 1`` more warm-up calls, stopping early once
warm-up has taken ``min_time_s``; then samples until at least ``min_reps`` were
taken and they add up to ``min_time_s``, or ``max_reps`` were taken.

On CPU each sample is a ``perf_counter`` interval around one call (CPU kernels
are synchronous). On CUDA each sample is a pair of CUDA events around the call,
read after one synchronisation at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 3
    min_time_s: float = 0.2
    max_reps: int = 100
    min_reps: int = 3
    threads: int | None = None  # torch intra-op threads; None: PyTorch's default (all cores)


@dataclass
class Timing:
    samples_s: list[float]
    first_call_s: float
    warmup_calls: int = 0
    stats: dict[str, float] = field(init=False)

    def __post_init__(self):
        self.stats = summarize(self.samples_s)

    @property
    def median_s(self) -> float:
        return self.stats["median"]


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, mean, min and max of the samples."""
    a = np.asarray(samples, dtype=float)
    if a.size == 0:
        return {k: float("nan") for k in ("median", "p10", "p90", "mean", "min", "max")}
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return {"median": median, "p10": p10, "p90": p90, "mean": a.mean(), "min": a.min(), "max": a.max()}


def _synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_call(
    fn: Callable[[], Any],
    config: TimingConfig,
    device: str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``fn`` by the rule above; ``clock`` is injectable so the rule can be tested."""
    sync = _synchronizer(device)
    sync()
    t0 = clock()
    fn()
    sync()
    first = clock() - t0

    warm_start = clock()
    warm = 0
    for _ in range(max(config.warmup - 1, 0)):
        if clock() - warm_start >= config.min_time_s:
            break
        fn()
        warm += 1
    sync()

    if device.startswith("cuda"):
        samples = _cuda_samples(fn, config)
    else:
        samples = []
        total = 0.0
        while len(samples) < config.max_reps and (len(samples) < config.min_reps or total < config.min_time_s):
            t = clock()
            fn()
            dt = clock() - t
            samples.append(dt)
            total += dt
    return Timing(samples_s=samples, first_call_s=first, warmup_calls=warm)


def _cuda_samples(fn: Callable[[], Any], config: TimingConfig) -> list[float]:
    import torch

    samples: list[float] = []
    total = 0.0
    while len(samples) < config.max_reps and (len(samples) < config.min_reps or total < config.min_time_s):
        batch = max(1, min(config.max_reps - len(samples), 10))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        for start, end in events:
            dt = start.elapsed_time(end) / 1e3
            samples.append(dt)
            total += dt
    return samples
