"""Measuring a distributed variant (``level = "distributed"``): a process group of ranks per case.

:func:`measure_distributed` has :func:`harness.engine.runner._measure`'s signature and contract.
For one case it starts ``world_size`` ranks on this node (:func:`run_ranks`:
``multiprocessing`` spawn processes, a process group initialised through a file store in a
fresh temporary directory, so no port can clash; gloo for CPU cases, NCCL with one GPU per rank
for CUDA cases), each with ``max(1, threads // world_size)`` torch threads (``threads``: this
process's). Each rank (:func:`_measure_rank`) builds the case's full inputs from the seed
(identical everywhere), lets the variant shard them (its ``Prepared``, see :mod:`variants.distributed`
for the protocol), and then:

* times the first call alone (the slowest rank's; spawn, imports and the process group's start
  are before it and in no column), runs the warm-up (rank 0 decides by the harness's rule and
  tells the others), then samples: a barrier, ``run()`` timed on each rank (``perf_counter``; CUDA
  events), the per-rank times max-reduced (outside the timed region): a sample is the slowest
  rank's. Rank 0 applies :func:`harness.measure.timing.stop_reason` and broadcasts its decision,
  so every rank takes the same samples;
* ``comm()`` timed the same way (``comm_ms``: the median);
* the peak memory of one more ``run()`` on every rank (``peak_mem_bytes``: the largest rank's,
  ``peak_mem_bytes_rank_min``: the smallest's); ``comm_bytes``: what the ranks send per call, summed;
* every rank's output rows gathered to rank 0, which assembles the full output.

Results come back to this process through files in the temporary directory. The accuracy check
is here, against float64 on the full inputs (:mod:`harness.measure.reference`); a wrong answer is
``incorrect``. A rank that raises gives an ``error`` row naming it (``rank 1: ValueError: ...``);
a rank that dies, or any rank still running at the deadline (:func:`deadline_s`), gives ``rank N
did not finish``; the ranks are killed and joined in every case. ``--profile`` is not applied to
distributed cases.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from harness.core.cases import Case
from harness.core.config import RunSettings
from harness.core.registry import Variant, get_variant
from harness.engine.steps import accuracy_columns, add_note, after_timing, error_text
from harness.measure.memory import peak_memory_bytes
from harness.measure.reference import check_rows, correctness_problems, errors, reference_attention
from harness.measure.timing import STOP_REASONS, Timing, TimingConfig, stop_reason, synchronizer

#: Seconds a rank's start (spawn, imports, process group) may take, on top of the timing budget.
STARTUP_S = 120.0
#: Seconds the other ranks get to finish once one has raised (they are usually blocked on it).
ERROR_GRACE_S = 3.0


class RankError(RuntimeError):
    """A rank raised, died or missed the deadline (one line naming the rank)."""


def deadline_s(timing: TimingConfig) -> float:
    """How long a case's ranks may run: generous, from the timing budget (two timed loops, each
    with at most ``max_time_s`` of sampling) plus :data:`STARTUP_S`."""
    return STARTUP_S + 20 * max(timing.max_time_s, timing.min_time_s)


# ---------------------------------------------------------------------------------------------
# Launching


def run_ranks(target: Callable[[int, int, Any], Any], world_size: int, payload: Any, *, device: str = "cpu",
              threads: int | None = None, deadline: float = STARTUP_S) -> list[Any]:
    """Run ``target(rank, world_size, payload)`` (a top-level, importable function) on ``world_size``
    spawned processes joined in one process group (gloo; NCCL for ``device = "cuda"``, rank r on GPU r);
    returns each rank's return value, in rank order. Raises :class:`RankError`."""
    ctx = multiprocessing.get_context("spawn")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        procs = [ctx.Process(target=_rank_main, name=f"bench-rank-{rank}",
                             args=(target, rank, world_size, tmp, backend, threads, payload))
                 for rank in range(world_size)]
        try:
            for p in procs:
                p.start()
            return _collect(procs, Path(tmp), deadline)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=30)


def _collect(procs, tmp: Path, deadline: float) -> list[Any]:
    """Every rank's result file; RankError for the first rank that raised, died or is late."""
    results: dict[int, Any] = {}
    failed: tuple[float, str] | None = None
    start = time.monotonic()
    while len(results) < len(procs):
        for rank, p in enumerate(procs):
            if rank in results:
                continue
            exitcode = p.exitcode  # read before looking for the file: a rank writes it, then exits
            path = tmp / f"rank{rank}.pt"
            if path.exists():
                got = torch.load(path, weights_only=False)
                results[rank] = got.get("value")
                if "error" in got and failed is None:
                    failed = (time.monotonic(), f"rank {rank}: {got['error']}")
            elif exitcode is not None:
                raise RankError(failed[1] if failed else f"rank {rank} did not finish: it exited with code {exitcode}")
        now = time.monotonic()
        if failed is not None and (len(results) == len(procs) or now - failed[0] > ERROR_GRACE_S):
            raise RankError(failed[1])
        if now - start > deadline:
            late = min(set(range(len(procs))) - set(results))
            raise RankError(f"rank {late} did not finish within {deadline:.0f} s")
        time.sleep(0.02)
    return [results[rank] for rank in range(len(procs))]


def _rank_main(target, rank: int, world_size: int, tmp: str, backend: str, threads: int | None, payload) -> None:
    """One rank: join the process group, run ``target``, write ``{"value": ...}`` or ``{"error": ...}``."""
    if sys.platform.startswith("linux"):  # no orphan rank if the process that started it dies
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        if threads:
            torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=STARTUP_S))
        result = {"value": target(rank, world_size, payload)}
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which names the rank)
        result = {"error": error_text(exc)}
    part = Path(tmp) / f"rank{rank}.part"
    torch.save(result, part)
    os.replace(part, Path(tmp) / f"rank{rank}.pt")
    if "error" not in result:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# One rank's measurement


def _comm_device(case: Case) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if case.device.startswith("cuda") else torch.device("cpu")


def _agree(value: float, op: str, dev: torch.device) -> float:
    """``value`` max-reduced over the ranks (``op = "max"``) or rank 0's (``op = "rank0"``)."""
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    if op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        dist.broadcast(t, src=0)
    return float(t.item())


def _time_one(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call of ``fn`` on this rank (CUDA: events on the current stream)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _sample(fn: Callable[[], Any], config: TimingConfig, device: str, dev: torch.device) -> tuple[list[float], str]:
    """Samples of the slowest rank until rank 0's stopping rule says stop; (samples, stop reason)."""
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        dist.barrier()
        samples.append(_agree(_time_one(fn, device), "max", dev))
        reason = stop_reason(samples, time.perf_counter() - start, config) if dist.get_rank() == 0 else None
        code = int(_agree(STOP_REASONS.index(reason) + 1 if reason else 0, "rank0", dev))
        if code:
            return samples, STOP_REASONS[code - 1]


def _measure_rank(rank: int, world_size: int, p: dict[str, Any]) -> dict[str, Any] | None:
    """Time, then (unless ``time_only``) communication, memory and the gathered output, on one rank;
    rank 0 returns the results, the others None."""
    from harness.engine.plugins import load_plugin
    from harness.measure.inputs import make_qkv

    for spec in p["plugins"]:
        load_plugin(spec)
    case, config = Case(**p["case"]), TimingConfig(**p["timing"])
    variant = get_variant(case.variant)
    dev, sync = _comm_device(case), synchronizer(case.device)
    q, k, v = make_qkv(case, seed=p["seed"])
    prepared = variant(q, k, v, causal=case.causal, group=dist.group.WORLD, rank=rank, **case.params)
    del q, k, v
    dist.barrier()
    first = _agree(_time_one(prepared.run, case.device), "max", dev)
    warm, warm_start = 0, time.perf_counter()
    while warm < config.warmup - 1 and _agree(time.perf_counter() - warm_start < config.min_time_s, "rank0", dev):
        prepared.run()
        warm += 1
    sync()
    samples, stop = _sample(prepared.run, config, case.device, dev)
    result = {"samples": samples, "first": first, "warm": warm, "stop": stop}
    if p["time_only"]:
        return result if rank == 0 else None
    comm_samples, _ = _sample(prepared.comm, config, case.device, dev)
    peak = peak_memory_bytes(prepared.run, case.device)
    out = prepared.run()
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None  # filled with the ranks' tuples
    dist.gather_object((out.cpu(), prepared.rows.cpu(), peak, prepared.comm_bytes), gathered, dst=0)
    if rank != 0:
        return None
    assert gathered is not None  # rank 0's list
    full = torch.full((case.batch, case.heads, case.query_len, case.head_dim), math.nan, dtype=out.dtype)
    for local, rows, _, _ in gathered:
        full[:, :, rows] = local
    peaks = [g[2] for g in gathered]
    return {**result, "comm_samples": comm_samples, "out": full, "peaks": peaks,
            "comm_bytes": sum(g[3] for g in gathered)}


# ---------------------------------------------------------------------------------------------
# The case's row


def measure_distributed(case: Case, variant: Variant, settings: RunSettings, row: dict[str, Any], phase,
                        time_only: bool) -> tuple[list[float], str]:
    """A distributed variant (harness.engine.runner.Measurer): measure ``case`` on ``world_size`` ranks
    into ``row``; returns (samples, '')."""
    timing, seed = settings.timing, settings.seed
    from harness.engine.plugins import loaded

    world = int(case.params["world_size"])
    threads = max(1, torch.get_num_threads() // world)
    payload = {"case": dataclasses.asdict(case), "timing": dataclasses.asdict(timing), "seed": seed,
               "plugins": loaded(), "time_only": time_only}
    phase("first call")  # the ranks' start, their first call, warm-up and samples: one wait here
    row["world_size"] = world
    try:
        got = run_ranks(_measure_rank, world, payload, device=case.device, threads=threads,
                        deadline=deadline_s(timing))[0]
    except RankError as exc:
        row.update(status="error", reason=str(exc))
        return [], ""
    measured = Timing(got["samples"], got["first"], warmup_calls=got["warm"], stop=got["stop"],
                      confidence=timing.confidence, method="cuda_events" if case.device == "cuda" else "perf_counter")
    row.update(measured.row_columns())
    add_note(row, "timing_note", f"each sample the slowest of {world} ranks ({threads} thread(s) each)")
    if time_only:
        return measured.samples_s, ""
    row.update(comm_ms=statistics.median(got["comm_samples"]) * 1e3,
               comm_bytes=float(got["comm_bytes"]), peak_mem_bytes=float(max(got["peaks"])),
               peak_mem_bytes_rank_min=float(min(got["peaks"])))
    phase("accuracy")
    after_timing(row, case, "accuracy", lambda: _accuracy(case, variant, seed, got["out"]))
    return measured.samples_s, ""


def _accuracy(case: Case, variant: Variant, seed: int, out: torch.Tensor) -> dict[str, Any]:
    """Error of the gathered output against float64 attention on the full inputs (on the CPU)."""
    from harness.measure.inputs import make_qkv

    q, k, v = (x.cpu() for x in make_qkv(case, seed=seed))
    mask, rows = variant.reference_mask(case), check_rows(case.query_len)
    ref = reference_attention(q, k, v, mask, rows)
    max_abs, rel = errors(out[:, :, rows], ref)
    problems = correctness_problems(out, ref, rows, dtype=case.dtype, exact=variant.exact, tolerance=variant.tolerance,
                                    baseline=lambda: reference_attention(q, k, v, mask, rows, dtype=q.dtype))
    return accuracy_columns(max_abs, rel, problems)
