"""The float64 reference every variant is checked against, and the error metrics.

The reference is dense softmax attention, computed in float64 from the very
same (already rounded) inputs the variant saw, under the variant's reference
mask: causal for causal cases, the window or sparse pattern for patterned
variants, and full (or causal) softmax attention for approximations, whose
error is then their approximation error.

For long sequences the forward check uses an evenly spaced subset of query rows
(every row's output is independent of the others, so a row subset is an exact
check of those rows) to bound the reference's O(rows·L) memory.
"""

from __future__ import annotations

import math

import torch

from harness.core.masks import MaskMod, batch_head_mask

#: At most this many query rows are checked in the forward pass.
MAX_CHECK_ROWS = 2048
#: Gradients are checked only up to this length (the reference stores L² float64 per head).
MAX_GRAD_CHECK_LEN = 2048


def check_rows(seq_len: int, max_rows: int = MAX_CHECK_ROWS) -> torch.Tensor:
    """The query rows the forward check looks at: all of them, or an even spread incl. first and last."""
    if seq_len <= max_rows:
        return torch.arange(seq_len)
    return torch.linspace(0, seq_len - 1, max_rows).round().long().unique()


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod | None,
    rows: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Float64 dense attention for query ``rows`` (all if None): shape (B, H, len(rows), D)."""
    B, H, L, D = q.shape
    q64, k64, v64 = q.double(), _expand_kv(k.double(), H), _expand_kv(v.double(), H)
    rows = torch.arange(L) if rows is None else rows
    rows = rows.to(q.device)
    outs = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        s = (q64[:, :, r] @ k64.transpose(-1, -2)) / math.sqrt(D)
        m = batch_head_mask(mask_mod, r, L, B, H)  # (B, H, rows, L): masks may depend on b and h
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ v64)
    return torch.cat(outs, dim=2)


def reference_grads(q, k, v, mask_mod: MaskMod | None, grad_out: torch.Tensor):
    """Float64 gradients (dq, dk, dv) of the reference for upstream gradient ``grad_out``."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = reference_attention(q64, k64, v64, mask_mod)
    return torch.autograd.grad(out, (q64, k64, v64), grad_out.double())


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max absolute error, relative Frobenius error) of ``out`` against float64 ``ref``."""
    diff = out.double() - ref
    max_abs = diff.abs().max().item()
    rel = (torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()
    return max_abs, rel


#: Tolerances for exact variants, by dtype: (max abs error, rel error), on unit-variance inputs.
TOLERANCE = {"float32": (2e-4, 2e-5), "bfloat16": (3e-2, 1.2e-2), "float16": (4e-3, 2e-3), "float64": (1e-10, 1e-12)}
