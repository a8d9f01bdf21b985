"""Attention masks as tiny composable functions (the attention-gym / FlexAttention style).

A mask_mod is ``mask(b, h, q_idx, kv_idx) -> bool tensor``: True where query
``q_idx`` may attend key ``kv_idx``. The same functions drive the float64
reference (called on broadcast index tensors) and FlexAttention's block masks.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[..., torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    """Query i sees keys j <= i."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """Query i sees keys j with |i - j| <= window (FlashAttention window_size=(window, window))."""

    def within_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= window) & (kv_idx - q_idx <= window)

    within_window.__name__ = f"sliding_window_{window}"
    return within_window


def and_masks(*mods: MaskMod) -> MaskMod:
    """A key is visible where every mask allows it."""

    def all_of(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    all_of.__name__ = "_and_".join(m.__name__ for m in mods)
    return all_of


def or_masks(*mods: MaskMod) -> MaskMod:
    """A key is visible where any mask allows it."""

    def any_of(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    any_of.__name__ = "_or_".join(m.__name__ for m in mods)
    return any_of


def dense_mask(mask_mod: MaskMod | None, rows: torch.Tensor, seq_len: int) -> torch.Tensor | None:
    """The boolean (len(rows), seq_len) matrix of ``mask_mod`` for query ``rows`` (None: all visible)."""
    if mask_mod is None:
        return None
    q_idx = rows.view(-1, 1)
    kv_idx = torch.arange(seq_len, device=rows.device).view(1, -1)
    return mask_mod(None, None, q_idx, kv_idx).expand(len(rows), seq_len)


def pairs(mask_mod: MaskMod | None, seq_len: int, chunk: int = 1024) -> int:
    """Number of (query, key) pairs ``mask_mod`` keeps at this length (counted exactly)."""
    if mask_mod is None:
        return seq_len * seq_len
    total = 0
    for start in range(0, seq_len, chunk):
        rows = torch.arange(start, min(start + chunk, seq_len))
        total += int(dense_mask(mask_mod, rows, seq_len).sum())
    return total
