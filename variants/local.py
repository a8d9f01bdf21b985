"""Local attention: each query sees a band of keys around it, at O(L·window) cost.

Banded computation: queries are cut into blocks of ``block`` rows; block b sees
the keys from ``b·block - window`` to ``b·block + block - 1 + window`` (or to its
own last row when causal). The key bands are strided views of the padded keys
(``Tensor.unfold``), so all blocks are one batched matmul, and the score tensor
is ``L × (block + 2·window)``: linear in L, never L².
"""

from __future__ import annotations

import torch

from harness import masks
from harness.flops import pair_flops
from harness.registry import Param, register_variant
from variants.common import group_queries, masked_value, pad_seq, scale_of, ungroup


def window_pairs(seq_len: int, window: int, causal: bool) -> int:
    """Exact number of (query, key) pairs with |i-j| <= window (and j <= i when causal)."""
    L, w = seq_len, min(window, seq_len - 1)
    if causal:
        return L * (w + 1) - w * (w + 1) // 2
    return L * (2 * w + 1) - w * (w + 1)


def _flops(case) -> float:
    return pair_flops(case, window_pairs(case.seq_len, case.params["window"], case.causal))


def _mask(case):
    window = masks.sliding_window(case.params["window"])
    return masks.and_masks(masks.causal, window) if case.causal else window


def _span(case) -> tuple[int, int]:
    w = min(case.params["window"], case.seq_len - 1)
    block = min(case.params["block"], case.seq_len)
    return block, block + w + (0 if case.causal else w)


def _working_set(case) -> float:
    block, span = _span(case)
    blocks = -(-case.seq_len // block)
    scores = case.batch * case.heads * blocks * block * span * case.element_bytes
    bands = 2 * case.batch * case.kv_heads * blocks * span * case.head_dim * case.element_bytes
    return 2 * scores + bands


@register_variant(
    "sliding_window",
    family="local",
    exact=True,
    flops=_flops,
    mask=_mask,
    working_set=_working_set,
    params={
        "window": Param(256, min=0, help="keys on each side a query sees (FlashAttention window_size)"),
        "block": Param(64, min=1, help="query rows per block of the banded computation"),
    },
    description="banded local attention, |i-j| <= window, O(L·window) time and memory",
)
def sliding_window(q, k, v, *, causal, window=256, block=64):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    w = min(window, L - 1)
    block = min(block, L)
    nblocks = -(-L // block)
    Lp = nblocks * block
    left, right = w, (0 if causal else w)
    span = block + left + right

    qb = pad_seq(group_queries(q * scale_of(q), Hkv), 0, Lp - L)  # (B, Hkv, G, Lp, D)
    qb = qb.reshape(B, Hkv, H // Hkv, nblocks, block, D)
    # key/value bands: (B, Hkv, nblocks, span, D) as strided views of the padded sequence
    kb = pad_seq(k, left, Lp - L + right).unfold(2, span, block).transpose(-1, -2)
    vb = pad_seq(v, left, Lp - L + right).unfold(2, span, block).transpose(-1, -2)

    scores = qb @ kb.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, nblocks, block, span)

    # visibility of key slot j for row i of block b: key position b·block - left + j
    row = torch.arange(block, device=q.device).view(1, block, 1)
    slot = torch.arange(span, device=q.device).view(1, 1, span)
    start = (torch.arange(nblocks, device=q.device) * block).view(nblocks, 1, 1)
    offset = slot - left - row  # key - query
    key_pos = start - left + slot
    visible = (offset >= -w) & (offset <= right) & (key_pos >= 0) & (key_pos < L)
    scores.masked_fill_(~visible, masked_value(scores.dtype))

    probs = torch.softmax(scores, dim=-1)
    out = probs @ vb.unsqueeze(2)  # (B, Hkv, G, nblocks, block, D)
    return ungroup(out.reshape(B, Hkv, H // Hkv, Lp, D))[:, :, :L]
