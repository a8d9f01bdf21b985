"""Attention masks as tiny composable functions (the attention-gym / FlexAttention style).

A mask_mod is ``mask(b, h, q_idx, kv_idx) -> bool tensor``: True where query
``q_idx`` may attend key ``kv_idx`` in batch ``b``, head ``h``. The same functions
drive the float64 reference (called with zero-dimensional ``b``/``h`` index tensors
and broadcast ``q_idx``/``kv_idx`` index tensors, see :func:`dense_mask`) and
FlexAttention's block masks. Combine them with torch's own
``torch.nn.attention.flex_attention.and_masks`` / ``or_masks``.
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


def dense_mask(mask_mod: MaskMod | None, rows: torch.Tensor, seq_len: int, b: int = 0, h: int = 0) -> torch.Tensor | None:
    """The boolean (len(rows), seq_len) matrix of ``mask_mod`` for batch ``b``, head ``h`` (None: all visible).

    Called as FlexAttention calls it: ``b`` and ``h`` are zero-dimensional index tensors,
    ``q_idx`` a (rows, 1) and ``kv_idx`` a (1, seq_len) index tensor, broadcast together, so
    masks that index tensors with ``b``/``h`` (attention-gym's document masks) and torch's
    ``and_masks``/``or_masks`` work as they do in FlexAttention.
    """
    if mask_mod is None:
        return None
    device = rows.device
    q_idx = rows.view(-1, 1)
    kv_idx = torch.arange(seq_len, device=device).view(1, -1)
    bi, hi = torch.tensor(b, device=device), torch.tensor(h, device=device)
    return torch.as_tensor(mask_mod(bi, hi, q_idx, kv_idx), device=device).expand(len(rows), seq_len)


def batch_head_mask(
    mask_mod: MaskMod | None, rows: torch.Tensor, seq_len: int, batch: int, heads: int
) -> torch.Tensor | None:
    """The boolean (batch, heads, len(rows), seq_len) mask: :func:`dense_mask` for every (b, h)."""
    if mask_mod is None:
        return None
    out = torch.empty(batch, heads, len(rows), seq_len, dtype=torch.bool, device=rows.device)
    for b in range(batch):
        for h in range(heads):
            out[b, h] = dense_mask(mask_mod, rows, seq_len, b, h)
    return out


def pairs(mask_mod: MaskMod | None, seq_len: int, chunk: int = 1024) -> int:
    """Number of (query, key) pairs ``mask_mod`` keeps at this length for batch 0, head 0 (counted exactly)."""
    if mask_mod is None:
        return seq_len * seq_len
    total = 0
    for start in range(0, seq_len, chunk):
        rows = torch.arange(start, min(start + chunk, seq_len))
        total += int(dense_mask(mask_mod, rows, seq_len).sum())
    return total
