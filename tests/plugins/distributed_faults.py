"""Test-only distributed variants with a deliberate fault on rank 1: ``ring`` whose rank 1 returns
1.5x its rows (a wrong answer), and ``ring`` whose rank 1 raises on its first call."""

import dataclasses

from harness import get_variant, register_variant

_RING = get_variant("ring")


def _faulty(name, fault):
    @register_variant(name, family="distributed", exact=True, level="distributed", supports=_RING.supports,
                      check=_RING.check, params=dict(_RING.params))
    def variant(q, k, v, *, causal, group, world_size, rank, zigzag=False):
        prepared = _RING.fn(q, k, v, causal=causal, group=group, world_size=world_size, rank=rank, zigzag=zigzag)
        if rank != 1:
            return prepared
        return dataclasses.replace(prepared, run=lambda: fault(prepared.run))

    return variant


def _raise(run):
    raise ValueError("sabotaged on rank 1")


_faulty("ring_wrong_rank1", lambda run: 1.5 * run())
_faulty("ring_raises_rank1", _raise)
