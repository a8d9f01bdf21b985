"""Timing one call: warm-up, then adaptive repetition until the median is known well enough.

The rule (``TimingConfig``):

1. The first call is timed on its own (``first_call_s``: it includes compilation,
   autotuning and lazy initialisation, and is kept out of the samples).
2. Up to ``warmup - 1`` more warm-up calls, stopping early once warm-up has taken
   ``min_time_s`` (CUDA: and at least 25 ms of GPU time, see below).
3. Samples, one call each, until one of these holds (checked after every sample,
   on CUDA after every batch of samples):

   * ``max_reps`` samples were taken (``stop = "max_reps"``);
   * at least ``min_reps`` were taken and the sampling has used the per-case time
     budget ``max_time_s`` (``"time_budget"``; the budget never cuts below
     ``min_reps``, and is never shorter than ``min_time_s``);
   * at least ``min_reps`` were taken, they add up to ``min_time_s``, and the
     ``confidence`` (default 95%) confidence interval of the median lies within
     ``± target_precision`` (default 1%) of the median (``"precision"``).
     ``target_precision = 0`` switches the precision test off: sampling then stops
     as soon as ``min_reps`` and ``min_time_s`` are met (``"min_time"``), which is
     the rule of the first version of the harness.

The confidence interval is distribution-free: for n samples the interval between
the order statistics x₍ⱼ₎ and x₍ₙ₊₁₋ⱼ₎, with j the largest index such that a
Binomial(n, ½) variable falls below j with probability at most (1 − confidence)/2,
covers the true median with probability at least ``confidence`` whatever the
distribution of the samples (timings are skewed and heavy-tailed, so a normal
approximation would be wrong). At 95% it exists from n = 6 on. The achieved
precision, ``max(median − lo, hi − median) / median``, is recorded per case
(``time_ci_rel``), whether the target was met or not.

**Input rotation.** ``time_call`` takes one callable or a list of them; with a list,
successive calls (warm-up and samples) cycle through it. The runner builds the list
from several copies of the inputs when one input set would fit in the last-level
cache (:func:`input_set_count`), so each sample reads its inputs from memory, not
from a cache that the previous sample warmed: that is what a model running the
kernel among other work sees.

**CPU** samples are ``clock`` (``perf_counter``) intervals around one call (CPU
kernels are synchronous). ``clock`` is injectable so the rule can be tested on a
fake clock.

**CUDA** (:mod:`harness.measure.cudatime`): the warm-up runs until the calls have used at
least 25 ms of GPU time (``triton.testing.do_bench``'s rule; an idle GPU clocks down) and the
warm-up count is met; samples are CUDA events recorded around each call on the current stream
and read after synchronising, in batches sized from the warm-up's GPU time (so slow cases do not
overshoot the budget), the stopping rule checked after each batch. Before every sample (outside
the events) a buffer larger than the L2 cache is overwritten (``flush_l2``, as do_bench does), so
that no sample finds its inputs in L2. With ``cuda_graph = true`` each callable is captured into a
CUDA graph after warm-up and the samples replay it, which removes the CPU launch overhead that
dominates small cases: without the L2 flush one graph holds several calls (about 2 ms of GPU time,
at most 100) and a sample is the replay's time over its calls, as ``do_bench_cudagraph`` does; with
the flush a graph holds one call. A callable that cannot be captured is timed eagerly, the row says
why (``timing_note``), and the worker process is replaced after the case (``Timing.restart``). The
CPU time spent issuing the calls is compared with the events' time plus the flush's: a case whose
GPU waited for the host is ``host_bound`` (:mod:`harness.measure.cudatime`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.core.config import TIMING, TimingConfig  # noqa: F401  (TimingConfig: re-exported)
from harness.core.stats import median_ci

#: Stop reasons recorded in ``Timing.stop`` (and the ``timing_stop`` column).
STOP_REASONS = ("precision", "min_time", "max_reps", "time_budget")


# ---------------------------------------------------------------------------------------------
# Statistics


def relative_precision(samples: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the median's CI relative to the median (the larger side); inf when unknown."""
    lo, hi = median_ci(samples, confidence)
    if math.isnan(lo):
        return math.inf
    med = float(np.median(samples))
    if med <= 0:
        return math.inf
    return max(med - lo, hi - med) / med


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, mean, min and max of the samples."""
    a = np.asarray(samples, dtype=float)
    if a.size == 0:
        return {k: float("nan") for k in ("median", "p10", "p90", "mean", "min", "max")}
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return {"median": median, "p10": p10, "p90": p90, "mean": a.mean(), "min": a.min(), "max": a.max()}


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class Timing:
    samples_s: list[float]
    first_call_s: float
    warmup_calls: int = 0
    #: why sampling stopped: one of STOP_REASONS
    stop: str = ""
    #: confidence level of ci_s
    confidence: float = 0.95
    #: how many input sets the calls rotated through
    input_sets: int = 1
    #: how the samples were taken: "perf_counter", "cuda_events" or "cuda_graph"
    method: str = "perf_counter"
    #: whether an L2 flush preceded every sample (CUDA)
    l2_flush: bool = False
    #: anything the reader of the row should know (e.g. a CUDA graph that could not be captured)
    note: str = ""
    #: CUDA: CPU seconds spent issuing one call, and whether that covered the GPU time (None on CPU)
    host_s: float = math.nan
    host_bound: bool | None = None
    #: why the process's CUDA state should not be trusted for the next case ("": it can)
    restart: str = ""
    stats: dict[str, float] = field(init=False)
    ci_s: tuple[float, float] = field(init=False)
    precision: float = field(init=False)

    def __post_init__(self):
        self.stats = summarize(self.samples_s)
        self.ci_s = median_ci(self.samples_s, self.confidence)
        self.precision = relative_precision(self.samples_s, self.confidence)

    @property
    def median_s(self) -> float:
        return self.stats["median"]

    def row_columns(self) -> dict[str, Any]:
        """The ``time`` columns of a result row (:mod:`harness.core.schema`), all of them."""
        return {
            "time_ms": self.stats["median"] * 1e3,
            "time_ms_p10": self.stats["p10"] * 1e3,
            "time_ms_p90": self.stats["p90"] * 1e3,
            "reps": len(self.samples_s),
            "first_call_ms": self.first_call_s * 1e3,
            "time_ms_ci_low": self.ci_s[0] * 1e3,
            "time_ms_ci_high": self.ci_s[1] * 1e3,
            "time_ci_rel": self.precision if math.isfinite(self.precision) else math.nan,
            "timing_stop": self.stop,
            "input_sets": self.input_sets,
            "timing_method": self.method,
            "timing_note": self.note,
            "host_ms": self.host_s * 1e3,
            "host_bound": self.host_bound,
        }


# ---------------------------------------------------------------------------------------------
# Stopping rule


def stop_reason(samples: Sequence[float], elapsed_s: float, config: TimingConfig) -> str | None:
    """Why sampling should stop now (one of STOP_REASONS), or None to take more samples."""
    n = len(samples)
    if n >= config.max_reps:
        return "max_reps"
    if n < config.min_reps:
        return None
    if elapsed_s >= max(config.max_time_s, config.min_time_s):
        return "time_budget"
    if math.fsum(samples) < config.min_time_s:
        return None
    if config.target_precision <= 0:
        return "min_time"
    if relative_precision(samples, config.confidence) <= config.target_precision:
        return "precision"
    return None


# ---------------------------------------------------------------------------------------------
# Input rotation


def input_set_count(
    bytes_per_set: int, device: str, config: TimingConfig, cache_bytes: int | None = None, max_sets: int = 64
) -> int:
    """How many copies of a case's inputs the timed calls should rotate through.

    ``bytes_per_set`` is what one call touches: its inputs and output plus its own
    temporaries (the variant's working set). One set, unless ``rotate_inputs`` is on
    and that is smaller than the cache the device would otherwise keep the inputs in
    (CPU: the last-level cache; CUDA: L2, but only when ``flush_l2`` is off, since the
    flush already evicts it): a call that streams more than the cache evicts its
    predecessor's inputs by itself. Otherwise enough sets that the other sets' calls
    (at least twice the cache) pass between two uses of one, capped at ``max_sets``.
    The extra memory is therefore about three times the cache at most.
    """
    if not config.rotate_inputs or bytes_per_set <= 0:
        return 1
    if cache_bytes is None:
        cache_bytes = _cache_bytes(device, config)
    if not cache_bytes or bytes_per_set >= cache_bytes:
        return 1
    return int(min(max_sets, math.ceil(2 * cache_bytes / bytes_per_set) + 1))


def _cache_bytes(device: str, config: TimingConfig) -> int | None:
    if device.startswith("cuda"):
        if config.flush_l2:
            return None
        from harness.measure.cudatime import l2_bytes

        return l2_bytes(device)
    from harness.measure.environment import llc_bytes

    return llc_bytes()


# ---------------------------------------------------------------------------------------------
# time_call


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work: ``torch.cuda.synchronize``, or nothing on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_call(
    fn: Callable[[], Any] | list[Callable[[], Any]] | tuple[Callable[[], Any], ...],
    config: TimingConfig,
    device: str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    on_phase: Callable[[str], None] | None = None,
) -> Timing:
    """Time ``fn`` (one callable, or a list to rotate through) by the rule in the module docstring.

    ``on_phase(name)`` (optional) is told when the first call, the warm-up and the sampling start
    (``"first call"``, ``"warm-up"``, ``"timing"``), so progress can show a long compilation as such.

    ``clock`` is injectable so the rule can be tested; on CUDA it only measures the
    first call, the warm-up and the budget (samples come from CUDA events).
    """
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    if not fns:
        raise ValueError("time_call needs at least one callable")
    phase = on_phase or (lambda name: None)
    sync = synchronizer(device)
    sync()
    phase("first call")
    t0 = clock()
    fns[0]()
    sync()
    first = clock() - t0

    phase("warm-up")
    if device.startswith("cuda"):
        return _cuda_timing(fns, config, device, clock, first, phase)
    warm_start = clock()
    warm = 0
    for i in range(max(config.warmup - 1, 0)):
        if clock() - warm_start >= config.min_time_s:
            break
        fns[(i + 1) % len(fns)]()
        warm += 1
    phase("timing")

    samples: list[float] = []
    start = clock()
    i = 1 + warm  # the rotation continues where the warm-up left it
    while True:
        f = fns[i % len(fns)]
        i += 1
        t = clock()
        f()
        samples.append(clock() - t)
        reason = stop_reason(samples, clock() - start, config)
        if reason:
            break
    return Timing(
        samples_s=samples, first_call_s=first, warmup_calls=warm, stop=reason,
        confidence=config.confidence, input_sets=len(fns), method="perf_counter",
    )


# ---------------------------------------------------------------------------------------------
# CUDA


def _cuda_timing(fns, config: TimingConfig, device: str, clock, first: float, phase) -> Timing:
    """Warm-up by GPU time, then CUDA-event samples (:mod:`harness.measure.cudatime`)."""
    from harness.measure import cudatime

    warm, per_call_s = cudatime.warm_up(fns, 1, max(config.warmup - 1, 0), config.min_time_s,
                                        max(config.max_time_s, config.min_time_s), clock)
    phase("timing")
    got = cudatime.sample(fns, config, device, clock, lambda samples, elapsed: stop_reason(samples, elapsed, config),
                          1 + warm, per_call_s if warm else first)
    return Timing(
        samples_s=got.samples_s, first_call_s=first, warmup_calls=warm, stop=got.stop, confidence=config.confidence,
        input_sets=len(fns), method=got.method, l2_flush=got.l2_flush, note="; ".join(got.notes),
        host_s=got.host_s, host_bound=got.host_bound, restart=got.restart,
    )
