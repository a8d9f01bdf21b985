"""Key/value caches of the layer variants (:mod:`variants.layers`): preallocated and written in place.

A decoding step in a serving engine does not copy its cache: the cache is allocated once for the
longest context (HF's ``StaticCache``, vLLM's pages) and each step writes the new tokens' keys and
values into the next free slots, then attends over the filled part. :class:`StaticKV` is that
cache: buffers holding ``past`` tokens plus room for the new ones; :func:`append` writes the new
tokens at ``[past, past + n)`` and returns the whole buffer. Repeating the same call writes the same
slots with the same values, so a timed loop measures one decoding step each call. A plain tuple of
tensors is appended to with ``torch.cat`` (a cache that grows by copying, like HF's DynamicCache).

A quantised cache (``variants.quantised.quantize_kv``) can take the same place: anything with
``past`` and ``map`` that :func:`append` knows how to write into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class StaticKV(tuple):
    """Cache buffers (one per cached tensor: K and V, or MLA's latent and RoPE key) holding ``past``
    tokens and room for the new ones after them."""

    past: int

    def __new__(cls, tensors: Sequence[torch.Tensor], past: int):
        obj = super().__new__(cls, tensors)
        obj.past = int(past)
        return obj

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StaticKV:
        """The same cache with ``fn`` applied to every buffer (a dtype cast, an aligned copy)."""
        return StaticKV([fn(t) for t in self], self.past)


def preallocate(tensors: Sequence[torch.Tensor], room: int, dim: int) -> StaticKV:
    """A :class:`StaticKV` holding ``tensors`` (the past tokens along ``dim``) and ``room`` free slots."""
    bufs = []
    for t in tensors:
        shape = list(t.shape)
        past = shape[dim]
        shape[dim] = past + room
        buf = torch.empty(shape, dtype=t.dtype, device=t.device)
        buf.narrow(dim, 0, past).copy_(t)
        bufs.append(buf)
    return StaticKV(bufs, tensors[0].shape[dim])


def with_room(tensors: Sequence[torch.Tensor], room: int, dim: int):
    """The cache tensors as a plain tuple (appended to by copying), or preallocated with ``room`` slots."""
    return preallocate(tensors, room, dim) if room else tuple(tensors)


def past_len(cache, dim: int) -> int:
    """Tokens already in ``cache`` (0 for None)."""
    if cache is None:
        return 0
    return cache.past if isinstance(cache, StaticKV) else cache[0].shape[dim]


def append(cache, i: int, new: torch.Tensor, dim: int) -> torch.Tensor:
    """Tensor ``i`` of ``cache`` with ``new`` appended along ``dim``: written in place into a
    :class:`StaticKV`'s free slots (which must fit it), else concatenated."""
    if isinstance(cache, StaticKV):
        buf, n = cache[i], new.shape[dim]
        if cache.past + n != buf.shape[dim]:
            raise ValueError(f"a static cache of {buf.shape[dim]} slots holding {cache.past} tokens "
                             f"cannot take {n} new ones")
        buf.narrow(dim, cache.past, n).copy_(new)
        return buf
    return torch.cat([cache[i], new], dim)
