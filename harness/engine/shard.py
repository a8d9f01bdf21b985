"""Shards: a deterministic partition of a suite's cases, so that machines that share nothing
(a Slurm array, a CI matrix) each run one part (``bench run SUITE --shard i/n``) and
``bench merge`` (:mod:`harness.engine.merge`) puts the parts back together as one run.

The partition depends only on the cases themselves, never on the order they were found in or on
the machine: each case has a cost estimate (:func:`case_cost`, a simple model of its time from
its shape), and the cases, sorted by (cost descending, ``case_id``), are dealt greedily to the
shard with the least cost so far, the lowest index on a tie (longest-processing-time list
scheduling). Every machine that expands the same suite gets the same shards; together they hold
every case exactly once; and the most loaded shard costs at most the mean plus the costliest
single case (the greedy bound), so shards finish at about the same time even when the suite mixes
L = 256 with L = 16384.

A shard is its own run: its ``run.json`` records ``shard = {index, count, cases, suite_cases,
cost_s, suite_cost_s}`` (:func:`record`), and ``bench resume`` of a shard resumes that shard's
cases (:func:`cases_of_run`). Shards are numbered from 1 (``--shard 1/4`` .. ``--shard 4/4``).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.core import flops
from harness.core.errors import UserError

if TYPE_CHECKING:
    from harness.core.cases import Case

#: The model's fixed seconds per case: first call, warm-up, the sampling floor, the memory call,
#: the FLOP count and the float64 accuracy check (measured: 0.5-2 s on a 2-core CPU for small cases).
CASE_OVERHEAD_S = 1.0
#: The model's FLOP rate per device (FLOP/s of dense attention; a guess, the same on every machine
#: so that every machine computes the same shards).
RATE = {"cpu": 5e10, "cuda": 5e13}


class ShardError(UserError, ValueError):
    """A ``--shard`` that cannot be used (one line)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with 1 <= i <= n, else ShardError naming what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ShardError(f"--shard: expected i/n (e.g. 2/8: the second of eight shards), got {text!r}")
    from harness.engine.runmeta import MAX_SHARDS

    if len(match.group(1)) > 9 or len(match.group(2)) > 9:
        raise ShardError(f"--shard {text.strip()[:40]}: at most {MAX_SHARDS} shards")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ShardError(f"--shard {text}: i must be from 1 to n (shards are numbered 1..n), and n >= 1")
    if count > MAX_SHARDS:
        raise ShardError(f"--shard {text}: at most {MAX_SHARDS} shards")
    return Shard(index, count)


def case_cost(case: Case) -> float:
    """Estimated seconds of ``case``: :data:`CASE_OVERHEAD_S` plus the FLOPs of exact attention over
    its shape (B·H·pairs·D, in its mode) at its device's :data:`RATE`. A model that ranks cases,
    not a prediction: it only has to be the same on every machine."""
    work = flops.total_flops(flops.attention_flops(case), case.mode)
    return CASE_OVERHEAD_S + work / RATE.get(case.device, RATE["cpu"])


def assign(cases: Sequence[Case], count: int,
           cost: Callable[[Case], float] = case_cost) -> list[list[Case]]:
    """The cases of each of ``count`` shards (index 0 is shard 1), each in the order ``cases`` has
    them. Deterministic in the set of cases (not their order): cases sorted by (cost descending,
    case_id) go one by one to the shard with the least cost so far (lowest index on a tie).
    A case id that appears twice goes, both times, to the shard of its first appearance."""
    if count < 1:
        raise ShardError(f"shard count must be >= 1, got {count}")
    costs = {c.case_id: float(cost(c)) for c in cases}
    heap = [(0.0, i) for i in range(count)]
    owner: dict[str, int] = {}
    for cid in sorted(costs, key=lambda k: (-costs[k], k)):
        load, index = heapq.heappop(heap)
        owner[cid] = index
        heapq.heappush(heap, (load + costs[cid], index))
    shards: list[list[Case]] = [[] for _ in range(count)]
    for case in cases:
        shards[owner[case.case_id]].append(case)
    return shards


def select(cases: Sequence[Case], shard: Shard,
           cost: Callable[[Case], float] = case_cost) -> list[Case]:
    """The cases of ``shard``, in the order ``cases`` has them."""
    return assign(cases, shard.count, cost)[shard.index - 1]


def record(shard: Shard, cases: Sequence[Case], chosen: Sequence[Case]) -> dict[str, Any]:
    """What run.json records of a shard (``shard``): its index and count, how many cases it and the
    whole suite have, and both estimated costs in seconds (:func:`case_cost`)."""
    return {"index": shard.index, "count": shard.count, "cases": len(chosen), "suite_cases": len(cases),
            "cost_s": round(sum(map(case_cost, chosen)), 3), "suite_cost_s": round(sum(map(case_cost, cases)), 3)}


def recorded_shard(meta: dict[str, Any]) -> Shard | None:
    """The shard a run's ``run.json`` records (None: not a shard); ShardError when it is not one."""
    recorded = meta.get("shard")
    if recorded is None:
        return None
    from harness.engine.runmeta import MAX_SHARDS

    index, count = (recorded.get(k) if isinstance(recorded, dict) else None for k in ("index", "count"))
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count <= MAX_SHARDS):
        raise ShardError(f"run.json: shard: expected {{index, count}} with 1 <= index <= count <= {MAX_SHARDS}, "
                         f"got {recorded!r:.80}")
    return Shard(index, count)


def cases_of_run(cases: list[Case], meta: dict[str, Any]) -> list[Case]:
    """The cases the run of ``meta`` was started with, from all of its suite's ``cases``: the shard's
    when run.json records one (so ``bench resume`` of a shard resumes that shard), else all. A merged
    run (:mod:`harness.engine.merge`) is not resumed: its parts are."""
    if meta.get("merged_from"):
        raise ShardError(f"run {meta.get('run_id')} was merged from other runs; resume those and merge again")
    shard = recorded_shard(meta)
    return cases if shard is None else select(cases, shard)
