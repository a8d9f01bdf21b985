"""Low-rank attention: the L×L attention matrix replaced by products through r << L rows, O(L·r).

``linformer`` (Wang et al. 2020, "Linformer: Self-Attention with Linear
Complexity") projects keys and values along the sequence with fixed matrices
E, F of shape (r, L), entries N(0, 1/r) (the paper's JL projection), and takes
softmax(Q (EK)ᵀ / sqrt(D)) (FV). In the paper E and F are trained; here they are
fixed and seeded (``seed``), one pair shared by every head and batch element
(the paper's "headwise sharing"). Untrained, it computes a different function
than softmax attention: its ``rel_err`` measures how different, and it shrinks
with r only towards ~1, not 0. Its parameter is ``proj_len`` (the paper's k; a
parameter named ``k`` would collide with the key tensor argument).

``nystrom`` (Xiong et al. 2021, "Nyströmformer") uses m landmarks, the segment
means of the queries and keys: softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V
with the pseudo-inverse from the paper's iterative (Razavi et al. 2014) scheme.
When L is not a multiple of m the segments are uneven (the first L mod m
segments have one row more), never zero-padded, so every landmark is a true
mean. m is capped at L (m = L gives landmarks = tokens). The paper's depthwise
convolution skip connection on V is a learned add-on, not part of the
approximation, and is left out.

Neither has a causal form (both mix every key into every query's landmarks or
projections), so causal cases are skipped.
"""

from __future__ import annotations

import functools
import math

import torch

from harness import Param, Supports, register_variant
from variants.common import group_queries, scale_of, ungroup

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- linformer


def linformer_projections(proj_len: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, F), each (proj_len, seq_len) float32 with N(0, 1/proj_len) entries, from ``seed`` (CPU)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(proj_len, seq_len, generator=g) / math.sqrt(proj_len)
    f = torch.randn(proj_len, seq_len, generator=g) / math.sqrt(proj_len)
    return e, f


@functools.lru_cache(maxsize=8)
def _cached_linformer_projections(proj_len, seq_len, seed, device, dtype):
    # fixed buffers, as the trained E, F parameters of a Linformer layer would be
    return tuple(x.to(device=device, dtype=dtype) for x in linformer_projections(proj_len, seq_len, seed))


def _linformer_flops(case) -> float:
    """E·K and F·V per key/value head (2·r·L·D each), then Q·(EK)ᵀ and P·(FV) per query head."""
    B, L, D, r = case.batch, case.seq_len, case.head_dim, case.params["proj_len"]
    return 4.0 * B * case.kv_heads * r * L * D + 4.0 * B * case.heads * L * r * D


def _linformer_working_set(case) -> float:
    """E and F, the projected keys/values, and the L×r scores and probabilities."""
    B, L, D, r, e = case.batch, case.seq_len, case.head_dim, case.params["proj_len"], case.element_bytes
    return (2 * r * L + 2 * B * case.kv_heads * r * D + 2 * B * case.heads * L * r) * e


@register_variant(
    "linformer",
    family="low_rank",
    exact=False,
    flops=_linformer_flops,
    working_set=_linformer_working_set,
    supports=Supports(causal=False),
    params={
        "proj_len": Param(256, min=1, help="projected sequence length r (the paper's k)"),
        "seed": Param(0, help="seed of the fixed Gaussian projections E, F"),
    },
    description="Linformer: K, V projected along the sequence to r rows by fixed seeded E, F; O(L·r)",
)
def linformer(q, k, v, *, causal, proj_len=256, seed=0):
    if causal:
        raise ValueError("linformer has no causal form")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    e, f = _cached_linformer_projections(proj_len, L, seed, str(q.device), q.dtype)
    k_proj = (e @ k).unsqueeze(2)  # (B, Hkv, 1, r, D)
    v_proj = (f @ v).unsqueeze(2)
    scores = group_queries(q * scale_of(q), Hkv) @ k_proj.transpose(-1, -2)  # (B, Hkv, G, L, r)
    return ungroup(torch.softmax(scores, dim=-1) @ v_proj)


# --------------------------------------------------------------------------- nystrom


def segment_means(x: torch.Tensor, segments: int) -> torch.Tensor:
    """Means of ``segments`` contiguous row segments of x (..., L, D) -> (..., segments, D).

    The first L mod segments segments have ceil(L/segments) rows, the rest floor(L/segments).
    """
    L = x.shape[-2]
    size, longer = divmod(L, segments)
    if longer == 0:
        return x.unflatten(-2, (segments, size)).mean(dim=-2)
    cut = longer * (size + 1)
    head = x[..., :cut, :].unflatten(-2, (longer, size + 1)).mean(dim=-2)
    tail = x[..., cut:, :].unflatten(-2, (segments - longer, size)).mean(dim=-2)
    return torch.cat([head, tail], dim=-2)


def iterative_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of square matrices by the Nyströmformer iteration.

    Z₀ = Aᵀ / (‖A‖₁‖A‖∞) (per matrix), then Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(dim=-2).amax(dim=-1)  # largest column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1)  # largest row sum
    z = a.transpose(-1, -2) / (norm1 * norm_inf)[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _landmarks(case) -> int:
    return min(case.params["landmarks"], case.seq_len)


def _nystrom_flops(case) -> float:
    """Per query head: Q·K̃ᵀ, Q̃·Kᵀ, their products with Z·(B̃V) and V (2·L·m·D each),
    Q̃·K̃ᵀ and Z·(B̃V) (2·m²·D each), and 4 m×m×m products per pseudo-inverse iteration."""
    B, H, L, D, m = case.batch, case.heads, case.seq_len, case.head_dim, _landmarks(case)
    return B * H * (8.0 * L * m * D + 4.0 * m * m * D + 8.0 * case.params["pinv_iters"] * m**3)


def _nystrom_working_set(case) -> float:
    """The scaled queries and one L×m kernel (scores and softmax) at a time, plus the m×m pinv temporaries."""
    B, H, L, D, m, e = case.batch, case.heads, case.seq_len, case.head_dim, _landmarks(case), case.element_bytes
    kernel = 2 * B * H * L * m * e
    pinv = 6 * B * H * m * m * max(e, 4)
    return kernel + pinv + B * H * L * D * e + B * (H + case.kv_heads) * m * D * e


@register_variant(
    "nystrom",
    family="low_rank",
    exact=False,
    flops=_nystrom_flops,
    working_set=_nystrom_working_set,
    supports=Supports(causal=False),
    params={
        "landmarks": Param(64, min=1, help="segment-mean landmarks m (capped at L)"),
        "pinv_iters": Param(6, min=0, help="iterations of the Moore-Penrose pseudo-inverse"),
    },
    columns=lambda case: {"landmarks_used": _landmarks(case)},
    description="Nyströmformer: segment-mean landmarks, iterative pseudo-inverse (Xiong et al. 2021); O(L·m)",
)
def nystrom(q, k, v, *, causal, landmarks=64, pinv_iters=6):
    if causal:
        raise ValueError("nystrom has no causal form")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    m = min(landmarks, L)
    qg = group_queries(q * scale_of(q), Hkv)  # (B, Hkv, G, L, D)
    q_land = segment_means(qg, m)  # (B, Hkv, G, m, D)
    k_land = segment_means(k, m).unsqueeze(2)  # (B, Hkv, 1, m, D)
    # B̃V first, so that only one L×m (or m×L) kernel is alive at a time
    kernel_3 = torch.softmax(q_land @ k.unsqueeze(2).transpose(-1, -2), dim=-1)  # (B, Hkv, G, m, L)
    bv = kernel_3 @ v.unsqueeze(2)  # (B, Hkv, G, m, D)
    del kernel_3
    kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)  # (B, Hkv, G, m, m)
    # the m×m pseudo-inverse is tiny; for half inputs it runs in float32 (the iteration is not stable in bf16)
    pdt = torch.float32 if q.dtype in _HALF else q.dtype
    zbv = (iterative_pinv(kernel_2.to(pdt), pinv_iters) @ bv.to(pdt)).to(q.dtype)  # (B, Hkv, G, m, D)
    kernel_1 = torch.softmax(qg @ k_land.transpose(-1, -2), dim=-1)  # (B, Hkv, G, L, m)
    return ungroup(kernel_1 @ zbv)
