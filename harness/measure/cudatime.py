"""CUDA timing: warm-up by GPU time, CUDA-graph capture that cannot strand the worker, event samples.

:func:`harness.measure.timing.time_call` hands CUDA cases here after the first call. The
rules (every function takes ``torch.cuda`` through ``torch`` at call time, so the tests
replace its pieces — events, streams, graphs, synchronize — with fakes on a machine
without a GPU):

* **Warm-up** (:func:`warm_up`) runs until the calls have used at least
  :data:`WARMUP_GPU_S` (25 ms, ``triton.testing.do_bench``'s rule) of GPU time, measured
  with CUDA events around batches of calls, and at least ``warmup - 1`` calls (that
  count, as on the CPU, is cut short once warm-up has taken ``min_time_s`` of wall
  time). A GPU idle for a while clocks down; 25 ms of work brings it back before a
  sample is taken, whatever the call count says.
* **Capture** (:func:`capture_graph`) warms the callable up and captures it on an
  explicit side stream with Python's garbage collector off (a collection during capture
  can free a tensor the graph uses), and always restores the caller's stream, even when
  capture fails half-way (``torch.cuda.graph`` leaves its stream context open when
  ``capture_end`` raises). A failed capture still leaves the graph's private memory pool
  and possibly an invalidated capture state in the CUDA context, so the result asks for
  the worker process to be replaced (``restart``).
* **Samples** (:func:`sample`): CUDA events around each call, in batches sized from the
  warm-up's GPU time, an L2 flush before each sample (outside the events), and the
  stopping rule checked after each batch. The CPU time spent *issuing* the calls is
  measured too. The GPU waited for the host inside the events only when issuing a call took
  longer than the GPU had queued ahead of it: the call itself and, with ``flush_l2``, the flush
  before its start event, during which the host is already issuing (a 256 MiB flush takes about
  80 µs on an H100, longer than many short kernels). So a row is ``host_bound`` (launch
  overhead, per-call Python guards, a synchronising call) when ``host_issue >=
  HOST_BOUND_RATIO · (events + flush)``, the flush's GPU time measured once per case
  (``flush_s``), and its note says so.
* **Graphs** (``cuda_graph``): without the L2 flush, one graph holds several calls, enough
  for about :data:`GRAPH_REPLAY_S` of GPU time (at most :data:`MAX_GRAPH_CALLS`), and a
  sample is one replay's event time divided by its calls, as ``triton.testing.do_bench_cudagraph``
  measures: a replay's own launch gap (a few µs, 2-8% of a 35-60 µs kernel) is spread over the
  calls rather than added to each sample. With the flush, every call must start from a cold L2,
  so a graph holds one call, flushed before it.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: GPU time the warm-up must use before samples are taken (do_bench's 25 ms).
WARMUP_GPU_S = 0.025
#: Host issue time over event time from which a case counts as host-bound.
HOST_BOUND_RATIO = 0.9
#: Most warm-up calls, whatever the GPU time says (a callable that queues no GPU work).
MAX_WARMUP_CALLS = 100_000
#: GPU time one CUDA-graph replay should take (calls per graph = this / one call's time), and the most calls.
GRAPH_REPLAY_S = 2e-3
MAX_GRAPH_CALLS = 100


def _event_pair():
    import torch

    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def l2_bytes(device: str = "cuda") -> int | None:
    """The GPU's L2 cache size (None when unknown)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(props, "L2_cache_size", 0)) or None
    except Exception:
        return None


class L2Flusher:
    """Overwrites a buffer larger than the GPU's L2 cache (at least 256 MiB, as do_bench does)."""

    def __init__(self, device: str = "cuda"):
        import torch

        nbytes = max(256 * 2**20, 4 * (l2_bytes(device) or 0))
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def warm_up(fns: Sequence[Callable[[], Any]], start: int, count: int, min_wall_s: float, max_wall_s: float,
            clock: Callable[[], float]) -> tuple[int, float]:
    """Warm-up calls (rotating through ``fns`` from index ``start``) until they used
    :data:`WARMUP_GPU_S` of GPU time and ``count`` calls were made (the count is cut short once
    ``min_wall_s`` has passed; everything stops at ``max_wall_s``). Returns (calls, GPU seconds
    per call; NaN when no call was made)."""
    import torch

    calls, gpu_s, batch, t0 = 0, 0.0, 1, clock()
    while calls < MAX_WARMUP_CALLS:
        wall = clock() - t0
        count_met = calls >= count or (calls > 0 and wall >= min_wall_s)
        if (gpu_s >= WARMUP_GPU_S and count_met) or (calls > 0 and wall >= max_wall_s):
            break
        begin, end = _event_pair()
        begin.record()
        for j in range(batch):
            fns[(start + calls + j) % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        calls += batch
        gpu_s += begin.elapsed_time(end) / 1e3
        per_call = gpu_s / calls
        need = math.ceil((WARMUP_GPU_S - gpu_s) / per_call) if per_call > 0 else batch * 2
        batch = int(max(1, min(max(need, count - calls), 2 * batch, MAX_WARMUP_CALLS - calls)))
    return calls, (gpu_s / calls if calls else math.nan)


def capture_graph(fn: Callable[[], Any], warmup: int = 2):
    """A CUDA graph of ``fn``, captured on an explicit side stream with the garbage collector off;
    the caller's current stream is restored however capture ends."""
    import torch

    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    gc_was_enabled = gc.isenabled()
    try:
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        caller.wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        gc.disable()
        with torch.cuda.graph(graph, stream=side):
            fn()
        torch.cuda.synchronize()
        return graph
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.cuda.set_stream(caller)


def graph_calls(per_call_s: float, flush_l2: bool) -> int:
    """Calls captured in one graph (see the module docstring): 1 with the L2 flush (each call must
    find a cold L2), else enough for :data:`GRAPH_REPLAY_S` of GPU time, at most :data:`MAX_GRAPH_CALLS`."""
    if flush_l2 or not (per_call_s > 0 and math.isfinite(per_call_s)):
        return 1
    return int(max(1, min(MAX_GRAPH_CALLS, math.ceil(round(GRAPH_REPLAY_S / per_call_s, 6)))))


def flush_seconds(flush: Callable[[], Any], repeats: int = 3) -> float:
    """GPU time of one L2 flush, by events around ``repeats`` flushes."""
    import torch

    begin, end = _event_pair()
    begin.record()
    for _ in range(repeats):
        flush()
    end.record()
    torch.cuda.synchronize()
    return max(0.0, begin.elapsed_time(end) / 1e3 / repeats)


@dataclass
class CudaSamples:
    """What :func:`sample` measured."""

    samples_s: list[float]
    stop: str
    method: str = "cuda_events"
    l2_flush: bool = False
    notes: list[str] = field(default_factory=list)
    #: CPU seconds spent issuing one call (mean), and whether that covers its GPU time
    host_s: float = math.nan
    host_bound: bool | None = None
    #: why the worker process should be replaced after this case ("" when healthy)
    restart: str = ""
    #: calls per sample (CUDA graphs: the calls one replay runs; a sample is its time / this)
    calls_per_sample: int = 1
    #: GPU seconds of the L2 flush before each sample (0 without it)
    flush_s: float = 0.0


def _chain(fns: Sequence[Callable[[], Any]], calls: int) -> Callable[[], None]:
    """One callable making ``calls`` calls, cycling through ``fns``."""
    seq = [fns[j % len(fns)] for j in range(calls)]

    def run() -> None:
        for f in seq:
            f()

    return run


def _capture_all(fns, result: CudaSamples, calls: int = 1) -> list:
    """The graphs the samples replay: one per callable (``calls == 1``), or one graph of ``calls``
    calls cycling through all of them (rounded up to a multiple of their number)."""
    import torch

    try:
        if calls <= 1:
            return [capture_graph(f) for f in fns]
        calls = len(fns) * math.ceil(calls / len(fns))
        graphs = [capture_graph(_chain(fns, calls))]
        result.calls_per_sample = calls
        return graphs
    except Exception as exc:  # not capturable (host sync, dynamic shapes, CPU work...): time eagerly
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        text = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
        result.notes.append(f"cuda_graph: capture failed ({text}); timed eagerly")
        result.restart = f"CUDA graph capture failed ({text})"
        return []


def sample(fns: Sequence[Callable[[], Any]], config, device: str, clock: Callable[[], float],
           stop: Callable[[list[float], float], str | None], start: int, per_call_s: float) -> CudaSamples:
    """Samples by CUDA events (see the module docstring). ``stop(samples, elapsed_s)`` is the
    stopping rule; ``per_call_s`` (GPU time of one call, from the warm-up) sizes the batches."""
    import torch

    result = CudaSamples(samples_s=[], stop="")
    runners: list[Callable[[], Any]] = list(fns)
    per_call_s = per_call_s if per_call_s > 0 and math.isfinite(per_call_s) else 1e-3
    graphs = (_capture_all(fns, result, graph_calls(per_call_s, config.flush_l2)) if config.cuda_graph else [])
    if graphs:
        runners = [g.replay for g in graphs]
        result.method = "cuda_graph"
    k = result.calls_per_sample
    if k > 1:
        result.notes.append(f"cuda_graph: {k} calls per replay; a sample is the replay's time / {k} "
                            "(as do_bench_cudagraph)")
    flush = L2Flusher(device) if config.flush_l2 else None
    result.l2_flush = flush is not None
    if flush is not None:
        result.flush_s = flush_seconds(flush)
    per_sample_s = k * per_call_s
    host_s = event_s = 0.0
    i, reason, t0 = start, None, clock()
    while reason is None:
        budget_left = max(config.max_time_s, config.min_time_s) - (clock() - t0)
        # a batch takes about 20 ms (never more than the budget left), at most 50 samples
        batch = int(min(50, max(1, 0.02 / per_sample_s), max(1, budget_left / per_sample_s)))
        batch = max(1, min(batch, config.max_reps - len(result.samples_s)))
        if len(result.samples_s) < config.min_reps:
            batch = max(batch, min(config.min_reps, config.max_reps) - len(result.samples_s))
        events = [_event_pair() for _ in range(batch)]
        for begin, end in events:
            if flush is not None:
                flush()
            h = clock()
            begin.record()
            runners[i % len(runners)]()
            end.record()
            host_s += clock() - h
            i += 1
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        event_s += sum(times)
        result.samples_s.extend(t / k for t in times)
        reason = stop(result.samples_s, clock() - t0)
    result.stop = reason
    del graphs
    n = len(result.samples_s)
    result.host_s = host_s / n
    ahead_s = event_s + n * result.flush_s  # GPU work queued before and inside the events
    result.host_bound = bool(event_s <= 0 or host_s >= HOST_BOUND_RATIO * ahead_s)
    if result.host_bound:
        flushed = f" (+ {1e3 * result.flush_s:.4g} ms of L2 flush before them)" if result.flush_s else ""
        result.notes.append(
            f"host-bound: issuing a call took {1e3 * host_s / n:.4g} ms of CPU time against "
            f"{1e3 * event_s / n:.4g} ms between its events{flushed}, so the events include launch overhead"
            + ("" if result.method == "cuda_graph" else " (cuda_graph = true removes it)")
        )
    return result
