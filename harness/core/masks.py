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
    """Query i sees keys j <= i (equal query and key lengths; otherwise :func:`bottom_right_causal`)."""
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


def bottom_right_causal(q_len: int, kv_len: int) -> MaskMod:
    """Causal masking aligned to the bottom right: query i sits at position ``kv_len - q_len + i``
    and sees keys j <= that (FlashAttention's and FlexAttention's decode convention). Equal lengths:
    :func:`causal` itself. PyTorch's ``is_causal=True`` aligns to the top left instead."""
    offset = kv_len - q_len
    if offset == 0:
        return causal

    def bottom_right(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    bottom_right.__name__ = f"causal_bottom_right_{offset}"
    return bottom_right


def lengths_mask(q_lens, kv_lens, causal_: bool) -> MaskMod:
    """Variable-length batch: in sequence ``b`` query i < q_lens[b] sees key j < kv_lens[b] (and, when
    causal, j <= i + kv_lens[b] - q_lens[b]: bottom-right aligned per sequence). Padding queries see nothing."""
    q_lens, kv_lens = torch.as_tensor(q_lens), torch.as_tensor(kv_lens)

    def within_lengths(b, h, q_idx, kv_idx):
        ql, kl = q_lens.to(q_idx.device)[b], kv_lens.to(q_idx.device)[b]
        keep = (q_idx < ql) & (kv_idx < kl)
        return keep & (q_idx + (kl - ql) >= kv_idx) if causal_ else keep

    return within_lengths


def case_mask(case) -> MaskMod | None:
    """The mask of a case's own shape: none, causal (bottom-right when ``q_len < seq_len``), or, for
    a variable-length batch, :func:`lengths_mask` of its lengths (:mod:`harness.core.lengths`)."""
    from harness.core.lengths import case_lengths

    q_len = case.q_len if case.q_len is not None else case.seq_len
    if case.lengths == "fixed":
        return bottom_right_causal(q_len, case.seq_len) if case.causal else None
    q_lens, kv_lens = case_lengths(case)
    return lengths_mask(q_lens, kv_lens, case.causal)
