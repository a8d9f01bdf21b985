"""Local attention: each query sees a band of keys around it, at O(L·window) cost.

Banded computation: queries are cut into blocks of ``block`` rows; block b sees
the keys from ``b·block - window`` to ``b·block + block - 1 + window`` (or to its
own last row when causal). The key and value bands are gathered from strided
views of the padded sequence (``Tensor.unfold``), and all blocks go through one
call of PyTorch's fused SDPA kernel as a batch of small dense attentions, each
under its band mask. Work and memory are ``L × (block + 2·window)``: linear in
L, never L²; the score matrix is never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import and_masks

from harness import Param, masks, pair_flops, register_variant
from variants.common import pad_seq


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
    return and_masks(masks.causal, window) if case.causal else window


def _span(case) -> tuple[int, int]:
    w = min(case.params["window"], case.seq_len - 1)
    block = min(case.params["block"], case.seq_len)
    return block, block + w + (0 if case.causal else w)


def _working_set(case) -> float:
    """Gathered key/value bands, blocked queries and output, band mask."""
    block, span = _span(case)
    blocks = -(-case.seq_len // block)
    bands = 2 * case.batch * case.kv_heads * blocks * span * case.head_dim * case.element_bytes
    rows = 2 * case.batch * case.heads * blocks * block * case.head_dim * case.element_bytes
    return bands + rows + case.batch * blocks * block * span


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

    # queries by block: (B·nblocks, H, block, D)
    qb = pad_seq(q, 0, Lp - L).reshape(B, H, nblocks, block, D).transpose(1, 2).reshape(B * nblocks, H, block, D)

    # each block's key/value band, gathered from strided views of the padded sequence: (B·nblocks, Hkv, span, D)
    def bands(x):
        x = pad_seq(x, left, Lp - L + right).unfold(2, span, block)  # (B, Hkv, nblocks, D, span)
        return x.permute(0, 2, 1, 4, 3).reshape(B * nblocks, Hkv, span, D)

    kb, vb = bands(k), bands(v)

    # visibility of key slot j for row i of block b: key position b·block - left + j
    row = torch.arange(block, device=q.device).view(1, block, 1)
    slot = torch.arange(span, device=q.device).view(1, 1, span)
    start = (torch.arange(nblocks, device=q.device) * block).view(nblocks, 1, 1)
    offset = slot - left - row  # key - query
    key_pos = start - left + slot
    in_band = (offset >= -w) & (offset <= right)
    real_query = (start + row) < L
    # real queries see real keys only; padding rows (discarded) see their band, so no row is empty
    visible = in_band & (((key_pos >= 0) & (key_pos < L)) | ~real_query)
    visible = visible.unsqueeze(1).expand(nblocks, 1, block, span)
    if B > 1:
        visible = visible.unsqueeze(0).expand(B, *visible.shape).reshape(B * nblocks, 1, block, span)

    # each block is a small dense attention under its band mask: PyTorch's fused SDPA kernel
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible, enable_gqa=Hkv != H)
    return out.reshape(B, nblocks, H, block, D).transpose(1, 2).reshape(B, H, Lp, D)[:, :, :L]


def _dilated_mask(case):
    d, w = case.params["dilation"], case.params["window"]

    def dilated(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff % d == 0) & (diff.abs() <= w * d) & ((diff >= 0) if case.causal else True)

    dilated.__name__ = f"dilated_{w}x{d}"
    return dilated


def _dilated_pairs(case) -> int:
    """Each residue class mod ``dilation`` is a sliding window of ``window`` over its own positions."""
    L, d = case.seq_len, case.params["dilation"]
    return sum(window_pairs(len(range(r, L, d)), case.params["window"], case.causal) for r in range(min(d, L)))


@register_variant(
    "dilated_window",
    family="local",
    exact=True,
    flops=lambda case: pair_flops(case, _dilated_pairs(case)),
    mask=_dilated_mask,
    working_set=lambda case: _working_set(case),
    params={
        "window": Param(128, min=0, help="keys on each side, counted in steps of `dilation`"),
        "dilation": Param(2, min=1, help="query i sees keys i ± t·dilation, t = 0..window"),
        "block": Param(64, min=1, help="query rows per block of the banded computation"),
    },
    description="dilated sliding window (Longformer): keys i ± t·dilation, t <= window; O(L·window)",
)
def dilated_window(q, k, v, *, causal, window=128, dilation=2, block=64):
    """The sequence split into ``dilation`` interleaved subsequences, each a sliding window."""
    B, H, L, D = q.shape
    d = min(dilation, L)
    n = -(-L // d)
    pad = n * d - L

    def fold(x):  # (B, h, L, D) -> (B·d, h, n, D): position r + t·d goes to subsequence r, slot t
        x = pad_seq(x, 0, pad).reshape(B, x.shape[1], n, d, D).permute(0, 3, 1, 2, 4)
        return x.reshape(B * d, x.shape[2], n, D)

    qf, kf, vf = fold(q), fold(k), fold(v)
    if pad:
        # padding sits at the end of the last subsequences; run each residue class at its own length
        outs = []
        for r in range(d):
            m = len(range(r, L, d))
            sel = slice(r, None, d)
            outs.append((m, sliding_window(qf[sel, :, :m], kf[sel, :, :m], vf[sel, :, :m],
                                           causal=causal, window=window, block=block)))
        out = qf.new_zeros(qf.shape)
        for r, (m, o) in enumerate(outs):
            out[r::d, :, :m] = o
    else:
        out = sliding_window(qf, kf, vf, causal=causal, window=window, block=block)
    out = out.reshape(B, d, H, n, D).permute(0, 2, 3, 1, 4).reshape(B, H, n * d, D)
    return out[:, :, :L]
