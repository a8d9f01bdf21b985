"""Small shape helpers shared by the variant families."""

from __future__ import annotations

import math

import torch


def scale_of(q: torch.Tensor) -> float:
    """The softmax scale 1/sqrt(D)."""
    return 1.0 / math.sqrt(q.shape[-1])


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H_kv, G, L, D): the G query heads that share each key/value head."""
    B, H, L, D = q.shape
    return q.reshape(B, kv_heads, H // kv_heads, L, D)


def ungroup(x: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, G, L, D) -> (B, H, L, D)."""
    B, Hkv, G, L, D = x.shape
    return x.reshape(B, Hkv * G, L, D)


def pad_seq(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Pad the sequence axis (-2) with zeros."""
    if before == 0 and after == 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, before, after))


def masked_value(dtype: torch.dtype) -> float:
    """A finite 'minus infinity' for masking: rows with every key masked give no NaN."""
    return torch.finfo(dtype).min


def causal_sdpa_kwargs(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    """Arguments of ``scaled_dot_product_attention`` for causal masking aligned to the bottom right
    (query i of Lq sees keys j <= Lk - Lq + i, as FlashAttention does): ``is_causal`` for equal
    lengths, no mask for one query (it sees every key), else an explicit boolean mask, because
    PyTorch's ``is_causal=True`` aligns non-square shapes to the top left."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    if not causal or Lq == Lk or Lq == 1:
        return {"is_causal": causal and Lq == Lk}
    return {"attn_mask": torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril_(Lk - Lq)}
