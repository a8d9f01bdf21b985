"""Distributed variants (variants/distributed.py) and their measurer (harness/engine/ranks.py).

Spawning ranks costs seconds each on a 2-core machine, so correctness is one launch per world size
that runs every configuration inside (:func:`check_configs`) and returns each one's problems; the
tests then report them one by one. World size 4 oversubscribes 2 cores (fine for correctness) and
is launched directly, past the skip check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harness.core.cases import Case
from harness.core.registry import get_variant
from harness.engine.ranks import run_ranks
from harness.measure.timing import TimingConfig
from tests.runs import measured

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugins" / "distributed_faults.py"
TIMING = TimingConfig(warmup=1, min_time_s=0.0, min_reps=3, max_reps=3, max_time_s=1.0)


def _case(variant, world, *, seq_len, causal, kv_heads=4, heads=4, dtype="float32", **params) -> Case:
    return Case(variant=variant, params={"world_size": world, **params}, heads=heads, kv_heads=kv_heads,
                seq_len=seq_len, head_dim=16, causal=causal, dtype=dtype)


def _configs(world: int) -> dict[str, Case]:
    """Ring contiguous/zig-zag × causal × even/odd length × GQA, Ulysses × causal × even/odd × GQA."""
    odd = 8 * world + 3  # divisible neither by world_size nor by 2·world_size
    heads, gqa = (4, 2) if world == 2 else (8, 4)
    cases = {}
    for causal in (False, True):
        for L in (16 * world, odd):
            for kv in (heads, gqa):
                for zigzag in (False, True):
                    cases[f"ring zigzag={zigzag} causal={causal} L={L} kv={kv}"] = _case(
                        "ring", world, seq_len=L, causal=causal, heads=heads, kv_heads=kv, zigzag=zigzag)
                cases[f"ulysses causal={causal} L={L} kv={kv}"] = _case(
                    "ulysses", world, seq_len=L, causal=causal, heads=heads, kv_heads=kv)
    cases["ring zigzag=True causal=True bfloat16"] = _case("ring", world, seq_len=odd, causal=True, heads=heads,
                                                           kv_heads=gqa, zigzag=True, dtype="bfloat16")
    return cases


def check_configs(rank: int, world: int, names: list[str]) -> dict[str, dict] | None:
    """On every rank: each configuration's output gathered to rank 0 and judged against float64 as the
    harness judges a row; rank 0 returns {name: {"problems", "rel_err", "comm_bytes" (per rank)}}."""
    from harness.measure.inputs import make_qkv
    from harness.measure.reference import check_rows, correctness_problems, errors, reference_attention

    results = {}
    for name, case in _configs(world).items():
        variant = get_variant(case.variant)
        q, k, v = make_qkv(case, seed=3)
        prepared = variant(q, k, v, causal=case.causal, group=dist.group.WORLD, rank=rank, **case.params)
        prepared.comm()  # the communication alone must pair up across ranks too
        gathered = [None] * world if rank == 0 else None
        dist.gather_object((prepared.run(), prepared.rows, prepared.comm_bytes), gathered, dst=0)
        if rank:
            continue
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)
        for local, rows, _ in gathered:
            out[:, :, rows] = local
        rows = check_rows(case.seq_len)
        ref = reference_attention(q, k, v, variant.reference_mask(case), rows)

        def baseline(q=q, k=k, v=v, variant=variant, case=case, rows=rows):  # called within this iteration
            return reference_attention(q, k, v, variant.reference_mask(case), rows, dtype=q.dtype)

        problems = correctness_problems(out, ref, rows, dtype=case.dtype, exact=True, baseline=baseline)
        results[name] = {"problems": problems, "rel_err": errors(out, ref)[1], "comm_bytes": [g[2] for g in gathered]}
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def launched():
    """One launch per world size (2, and 4 oversubscribing the cores): {world: {name: result}}."""
    return {world: run_ranks(check_configs, world, None, threads=1, deadline=300)[0] for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(_configs(2)))
def test_matches_float64(launched, world, name):
    name = name if world == 2 else dict(zip(_configs(2), _configs(4)))[name]
    got = launched[world][name]
    assert got["problems"] == [], got["problems"]
    assert got["rel_err"] < (1e-2 if "bfloat16" in name else 1e-5)


def _ring_bytes(world, L, kv_heads, D=16, elt=4, B=1) -> list[int]:
    """Closed form: rank r sends W−1 K/V blocks, those of ranks r, r−1, …, r−W+2 (tensor_split chunks)."""
    sizes = [len(c) for c in torch.tensor_split(torch.arange(L), world)]
    return [sum(2 * B * kv_heads * sizes[(r - s) % world] * D * elt for s in range(world - 1)) for r in range(world)]


def test_comm_bytes_closed_form(launched):
    for world in (2, 4):
        heads = 4 if world == 2 else 8
        for L in (16 * world, 8 * world + 3):
            got = launched[world][f"ring zigzag=False causal=True L={L} kv={heads}"]["comm_bytes"]
            assert got == _ring_bytes(world, L, heads)
        L = 16 * world  # Ulysses, even chunks: (W−1)/W of q, k, v, and the output's other rows, per rank
        n, elt, D = L // world, 4, 16
        want = ((world - 1) * (heads * n * D * 3) // world + (heads // world) * (L - n) * D) * elt
        assert launched[world][f"ulysses causal=False L={L} kv={heads}"]["comm_bytes"] == [want] * world


def test_run_case_ring_row():
    case = _case("ring", 2, seq_len=256, causal=True, kv_heads=2, zigzag=True)
    row = measured(case, TIMING)
    assert row["status"] == "ok", row["reason"]
    assert row["world_size"] == 2 and row["reps"] == 3 and row["time_ms"] > 0 and row["comm_ms"] > 0
    assert row["comm_bytes"] == sum(_ring_bytes(2, 256, 2))
    assert row["peak_mem_bytes"] >= row["peak_mem_bytes_rank_min"] > 0
    assert row["rel_err"] < 1e-5


def test_world_size_above_cores_skips():
    import os

    world = len(os.sched_getaffinity(0)) + 1
    row = measured(_case("ring", world, seq_len=256, causal=False), TIMING)
    assert row["status"] == "skipped" and f"world_size {world} exceeds" in row["reason"]
    row = measured(_case("ulysses", 2, seq_len=256, causal=False, heads=6, kv_heads=3), TIMING)
    assert row["status"] == "skipped" and "kv_heads = 3 is not divisible by world_size 2" in row["reason"]


@pytest.fixture(scope="module")
def faults():
    from harness.engine.plugins import load_plugin

    load_plugin(str(PLUGIN), ROOT)


def test_wrong_rank_is_incorrect(faults):
    row = measured(_case("ring_wrong_rank1", 2, seq_len=128, causal=False), TIMING)
    assert row["status"] == "incorrect" and "output differs from the float64 reference" in row["reason"]
    assert row["time_ms"] > 0


def test_raising_rank_is_an_error_naming_it(faults):
    row = measured(_case("ring_raises_rank1", 2, seq_len=128, causal=False), TIMING)
    assert row["status"] == "error"
    assert row["reason"] == "rank 1: ValueError: sabotaged on rank 1"
