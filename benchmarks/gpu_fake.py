"""The rehearsal's fake GPU: the fakes the tests use, put in place for a whole step process.

``python benchmarks/gpu_check.py --rehearse`` runs every step of the GPU check on a CPU machine. A
step started with ``--rehearse`` calls :func:`install` first, which replaces:

* ``torch.cuda``'s events, streams, graphs and ``synchronize`` by :class:`tests.fake_cuda.FakeCuda`
  (a fake GPU clock that fake kernels advance), and its device queries (``is_available``, the device's
  name and properties, ``mem_get_info``...) by an H100-like device named ``... (REHEARSAL: fake CUDA)``;
* ``pynvml`` by the tests' fake NVML (:func:`tests.test_telemetry.fake_nvml`), which lists the checker's
  own process and this one on the GPU (the check must not count either as "another process");
* the L2 flush and ``triton.testing.do_bench`` / ``do_bench_cudagraph`` by fakes on the fake GPU clock.

Kernels are :meth:`FakeCuda.kernel` callables whose GPU time is the cost model's
(:func:`gpu_plan.kernel_s`). Every figure a rehearsal prints is therefore the cost model's, never a
measurement, and every file it writes names the device ``(REHEARSAL: fake CUDA)``.
"""

from __future__ import annotations

import os
import statistics
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(ROOT / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

GPU_NAME = "NVIDIA H100 80GB HBM3 (REHEARSAL: fake CUDA)"
PROPS = types.SimpleNamespace(name=GPU_NAME, major=9, minor=0, total_memory=80 * 2**30, multi_processor_count=132,
                              L2_cache_size=50 * 2**20)
#: host time of issuing one fake kernel (a Python-level attention call)
HOST_S = 30e-6

_STATE: dict = {}


def rehearsing() -> bool:
    return bool(_STATE)


def install(parent_pid: int | None = None):
    """Put the fake GPU in place for this process (see the module docstring); returns the FakeCuda."""
    if _STATE:
        return _STATE["fake"]
    import pytest
    import torch

    from tests.fake_cuda import FakeCuda
    from tests.test_telemetry import fake_nvml

    patch = pytest.MonkeyPatch()
    fake = FakeCuda().install(patch)
    free = [79 * 2**30]
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1), ("current_device", lambda: 0),
                        ("get_device_name", lambda *a: GPU_NAME), ("get_device_properties", lambda *a: PROPS),
                        ("get_device_capability", lambda *a: (9, 0)),
                        ("mem_get_info", lambda *a: (free[0], 80 * 2**30)),
                        ("memory_reserved", lambda *a: 0), ("memory_allocated", lambda *a: 0),
                        ("max_memory_allocated", lambda *a: 0), ("reset_peak_memory_stats", lambda *a: None),
                        ("empty_cache", lambda: None)):
        patch.setattr(torch.cuda, name, value)
    nv = fake_nvml()
    procs = [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**30)]
    if parent_pid:
        procs.append(types.SimpleNamespace(pid=parent_pid, usedGpuMemory=0))
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: list(procs)
    nv.nvmlSystemGetDriverVersion = lambda: "570.00 (fake)"
    nv.nvmlSystemGetNVMLVersion = lambda: "12.570.00 (fake)"
    nv.nvmlSystemGetCudaDriverVersion = lambda: 12080
    # the fake counter steps every call of nv.call(); let every fake kernel spend energy too
    patch.setitem(sys.modules, "pynvml", nv)

    from harness.measure import cudatime

    patch.setattr(cudatime, "L2Flusher", lambda device="cuda": fake.kernel(gpu_s=256 * 2**20 / 3.35e12, host_s=2e-6))
    _STATE.update(fake=fake, patch=patch, nvml=nv)
    _patch_do_bench(patch, fake)
    return fake


def kernel(case: dict):
    """A fake kernel costing the cost model's GPU time for ``case`` (a :mod:`gpu_plan` case dict)."""
    import gpu_plan

    fake, nv = _STATE["fake"], _STATE["nvml"]
    run = fake.kernel(gpu_s=gpu_plan.kernel_s(case), host_s=HOST_S)

    def call():
        run()
        nv.call()  # the fake energy counter moves

    return call


def _patch_do_bench(patch, fake) -> None:
    """triton.testing's timers, on the fake GPU clock: do_bench (L2 flushed) and do_bench_cudagraph
    (amortised over many calls): both give the fake kernel's own GPU time."""
    try:
        import triton.testing as tt
    except Exception:  # no Triton: the cross-check says so, as it would on a GPU machine
        return

    def timed(fn, calls: int) -> float:
        t0 = fake.gpu_t
        for _ in range(calls):
            fn()
        return (fake.gpu_t - t0) / calls * 1e3

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        times = [timed(fn, 1) for _ in range(max(5, min(100, rep)))]
        return times if return_mode == "all" else statistics.median(times)

    def do_bench_cudagraph(fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        times = [timed(fn, 20) for _ in range(10)]
        return times if return_mode == "all" else statistics.median(times)

    patch.setattr(tt, "do_bench", do_bench)
    patch.setattr(tt, "do_bench_cudagraph", do_bench_cudagraph)
