"""Peak memory of one call, beyond what existed before it.

* CPU: PyTorch's profiler with ``profile_memory=True`` records every allocation
  and free of the CPU allocator as an event with its size; their running sum
  in time order gives the exact peak of bytes held during the call. (The
  profiler's ``key_averages()`` reports net allocation per op and misses
  intra-call peaks, so it is not used.)
* CUDA: the caching allocator's ``max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the call.

The output of the call is part of the peak (it is allocated during the call).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch


def allocation_events(prof, device_type: str = "cpu") -> list[tuple[int, int]]:
    """(time_ns, bytes) of every allocation (+) and free (-) on ``device_type`` the profiler saw."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == device_type:
                events.append((node.start_time_ns, fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    return events


def peak_from_events(events: list[tuple[int, int]]) -> int:
    """Highest running total of an allocation/free sequence (never below zero)."""
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


@contextmanager
def quiet_stderr():
    """Silence fd 2 (the profiler's C++ side logs 'profiler_start/stop' lines there)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs (result kept alive until the end)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
    return peak_from_events(allocation_events(prof))


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cuda") -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)


def peak_memory_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated during ``fn()`` on ``device`` ('cpu' or 'cuda'), beyond those before it."""
    if device.startswith("cuda"):
        return cuda_peak_bytes(fn, device)
    return cpu_peak_bytes(fn)
