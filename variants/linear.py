"""Linear (kernelised) attention: softmax(QKᵀ) replaced by φ(Q)φ(K)ᵀ, O(L) time and memory.

``linear`` is Katharopoulos et al. 2020 ("Transformers are RNNs") with the
feature map φ(x) = elu(x) + 1, applied to q and k as given (the kernel takes the
place of the scaled softmax, so no 1/sqrt(D) appears). It is not an approximation
of softmax attention in the Performer sense: its ``rel_err`` against softmax
attention measures how different a function it computes on the same inputs.

The causal form is a prefix sum over the sequence, computed chunk by chunk:
within a chunk of C rows, a masked C×C product; across chunks, an exclusive
cumulative sum of the per-chunk φ(K)ᵀV states. Memory is O(L·D + (L/C)·D²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.registry import Param, register_variant
from variants.common import group_queries, pad_seq, ungroup

EPS = 1e-6


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def _flops(case) -> float:
    """φ(K)ᵀV and φ(Q)·state: 4·B·H·L·D² (+ the C×C intra-chunk products when causal)."""
    B, H, L, D = case.batch, case.heads, case.seq_len, case.head_dim
    flops = 4.0 * B * H * L * D * D
    if case.causal:
        flops += 4.0 * B * H * L * case.params["chunk"] * D / 2
    return flops


def _working_set(case) -> float:
    B, H, L, D, C = case.batch, case.heads, case.seq_len, case.head_dim, case.params["chunk"]
    states = B * H * (L / C + 1) * D * D * 2 if case.causal else B * H * D * D
    return (4 * B * H * L * D + states + B * H * L * C) * case.element_bytes


@register_variant(
    "linear",
    family="linear",
    exact=False,
    flops=_flops,
    working_set=_working_set,
    params={"chunk": Param(64, min=1, help="rows per chunk of the causal prefix sum")},
    description="kernelised linear attention, φ(x)=elu(x)+1 (Katharopoulos et al. 2020), O(L)",
)
def linear(q, k, v, *, causal, chunk=64):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    qf = group_queries(feature_map(q), Hkv)  # (B, Hkv, G, L, D)
    kf = feature_map(k)  # (B, Hkv, L, D)
    if not causal:
        state = (kf.transpose(-1, -2) @ v).unsqueeze(2)  # (B, Hkv, 1, D, D)
        norm = kf.sum(dim=-2).unsqueeze(2).unsqueeze(-1)  # (B, Hkv, 1, D, 1)
        return ungroup((qf @ state) / (qf @ norm + EPS))

    C = min(chunk, L)
    n = -(-L // C)
    pad = n * C - L
    qc = pad_seq(qf, 0, pad).reshape(B, Hkv, -1, n, C, D)
    kc = pad_seq(kf, 0, pad).reshape(B, Hkv, n, C, D)
    vc = pad_seq(v, 0, pad).reshape(B, Hkv, n, C, D)

    chunk_state = kc.transpose(-1, -2) @ vc  # (B, Hkv, n, D, D)
    prior_state = torch.cumsum(chunk_state, dim=2) - chunk_state  # exclusive prefix sum
    chunk_norm = kc.sum(dim=-2)  # (B, Hkv, n, D)
    prior_norm = torch.cumsum(chunk_norm, dim=2) - chunk_norm

    within = qc @ kc.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, n, C, C)
    within = within * torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    num = qc @ prior_state.unsqueeze(2) + within @ vc.unsqueeze(2)
    den = (qc @ prior_norm.unsqueeze(2).unsqueeze(-1)) + within.sum(dim=-1, keepdim=True)
    out = (num / (den + EPS)).reshape(B, Hkv, -1, n * C, D)[:, :, :, :L]
    return ungroup(out)
