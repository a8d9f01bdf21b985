"""Linear (kernelised) attention: softmax(QKᵀ) replaced by φ(Q)φ(K)ᵀ, O(L) time and memory.

``linear`` is Katharopoulos et al. 2020 ("Transformers are RNNs") with the
feature map φ(x) = elu(x) + 1, applied to q and k as given (the kernel takes the
place of the scaled softmax, so no 1/sqrt(D) appears). It is not an approximation
of softmax attention in the Performer sense: its ``rel_err`` against softmax
attention measures how different a function it computes on the same inputs.

The causal form is a prefix sum over the sequence, computed chunk by chunk:
within a chunk of C rows, a masked C×C product; across chunks, an exclusive
cumulative sum of the per-chunk φ(K)ᵀV states. Memory is O(L·D + (L/C)·D²).

``performer`` is FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with
Performers"): positive orthogonal random features φ(x) = exp(Wx - |x|²/2) with
x = q·D^(-1/4) (resp. k), so that E[φ(q)·φ(k)] = exp(q·k/sqrt(D)) (W's rows are
N(0, I)-distributed); φ(Q)φ(K)ᵀ[V, 1] estimates the softmax numerator and
normaliser without bias, and their ratio estimates softmax attention (the usual
1/sqrt(m) factor of φ cancels in the ratio and is left out).
Its causal form uses the same chunked prefix sums as ``linear``; see
:func:`performer` for the numerical stabilisers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from harness import Param, register_variant
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


# --------------------------------------------------------------------------- performer (FAVOR+)

#: Half-precision inputs have their feature maps (projection, stabiliser, exp) computed in float32.
_HALF = (torch.float16, torch.bfloat16)


def favor_projection(features: int, head_dim: int, seed: int) -> torch.Tensor:
    """The (features, head_dim) float64 FAVOR+ projection W for ``seed``.

    Blocks of ``head_dim`` rows are orthonormal (QR of a Gaussian matrix, sign-fixed
    so that it is a Haar-random rotation); the last block is truncated to give
    ``features`` rows. Each row is then rescaled by the norm of an independent
    Gaussian vector, so rows have the length distribution of N(0, I_D) vectors
    (the paper's ``scaling=0``). Drawn on the CPU from ``torch.Generator(seed)``: the
    same seed gives the same W on every device.
    """
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-features // head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64)
        qmat, r = torch.linalg.qr(gauss)
        qmat = qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(qmat.T)  # rows orthonormal
    w = torch.cat(blocks, dim=0)[:features]
    lengths = torch.linalg.vector_norm(torch.randn(features, head_dim, generator=g, dtype=torch.float64), dim=1)
    return w * lengths.unsqueeze(1)


@functools.lru_cache(maxsize=16)
def _cached_projection(features: int, head_dim: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # a fixed buffer, as in a Performer layer without feature redrawing
    return favor_projection(features, head_dim, seed).to(device=device, dtype=dtype)


def _carry_states(chunk_state: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """prior[c] = Σ_{c' < c} (decay products) chunk_state[c']: prior[0] = 0, prior[1] = state[0],
    prior[c] = prior[c-1]·decay[c-2] + state[c-1]. One fused op per chunk (a sequential recurrence over
    the L/C chunk states: the decays are data-dependent, so no single cumulative sum can do it stably)."""
    n = chunk_state.shape[2]
    if torch.is_grad_enabled() and chunk_state.requires_grad:  # out-of-place, autograd-friendly
        states = [torch.zeros_like(chunk_state[:, :, 0])]
        if n > 1:
            states.append(chunk_state[:, :, 0])
        for c in range(2, n):
            states.append(torch.addcmul(chunk_state[:, :, c - 1], states[-1], decay[:, :, c - 2]))
        return torch.stack(states, dim=2)
    prior = torch.empty_like(chunk_state)
    prior[:, :, 0] = 0
    if n > 1:
        prior[:, :, 1] = chunk_state[:, :, 0]
    for c in range(2, n):
        torch.addcmul(chunk_state[:, :, c - 1], prior[:, :, c - 1], decay[:, :, c - 2], out=prior[:, :, c])
    return prior


def _performer_flops(case) -> float:
    """Matmuls really done: the two feature projections, then φ(K)ᵀ[V,1] and φ(Q)·state
    (plus, causal, the C×C intra-chunk products over the padded length and the chunk recurrence)."""
    B, H, Hkv, D, m = case.batch, case.heads, case.kv_heads, case.head_dim, case.params["features"]
    L = case.seq_len
    if case.causal:
        C = min(case.params["chunk"], L)
        L = -(-L // C) * C
    flops = 2.0 * B * (H + Hkv) * L * D * m  # x·Wᵀ for queries and keys
    flops += 2.0 * B * (Hkv + H) * L * m * (D + 1)  # φ(K)ᵀ[V,1] (per chunk when causal) and φ(Q)·state
    if case.causal:
        flops += 2.0 * B * H * L * C * (m + D + 1)  # intra-chunk φ(Q)φ(K)ᵀ and its product with [V,1]
        flops += 2.0 * B * Hkv * (L // C) * m * (D + 1)  # decayed prefix recurrence
    return flops


def _performer_working_set(case) -> float:
    """Peak intermediates beyond q, k, v and the output, phase by phase as :func:`performer` runs.

    Feature maps are computed in float32 for half inputs (``fe`` bytes) and kept in the input dtype.
    """
    B, H, Hkv, D, m = case.batch, case.heads, case.kv_heads, case.head_dim, case.params["features"]
    L, e = case.seq_len, case.element_bytes
    fe = max(e, 4)
    half = e < fe
    casts = 2 * B * H * L * D * fe if half else 0  # float32 copies of q (or k) while projecting
    rows = B * Hkv * L * (D + 1) * e  # [V, 1]
    if not case.causal:
        feats = B * H * L * m * e + B * Hkv * L * m * (fe + (e if half else 0))
        return feats + rows + B * H * L * (D + 1) * e + casts
    C = min(case.params["chunk"], L)
    n = -(-L // C)
    Lp = n * C
    qf, kf, state = B * H * Lp * m * e, B * Hkv * Lp * m * e, B * Hkv * n * m * (D + 1) * e
    features = qf + B * Hkv * Lp * m * (2 * fe) + (kf if half else 0)  # u, its shifted copy, ψ
    states = qf + kf + 2 * state + B * Hkv * Lp * (D + 1) * e  # chunk states, their prefix, scaled values
    outputs = qf + kf + state + B * H * Lp * (2 * (D + 1) + 2 * C) * e + B * Hkv * Lp * C * fe
    return max(features, states, outputs) + rows + casts


@register_variant(
    "performer",
    family="linear",
    exact=False,
    flops=_performer_flops,
    working_set=_performer_working_set,
    params={
        "features": Param(256, min=1, help="random features m (orthogonal blocks of head_dim rows)"),
        "seed": Param(0, help="seed of the fixed random projection"),
        "chunk": Param(64, min=1, help="rows per chunk of the causal prefix sum"),
    },
    description="Performer FAVOR+ positive orthogonal random features (Choromanski et al. 2021), O(L·m·D)",
)
def performer(q, k, v, *, causal, features=256, seed=0, chunk=64):
    """FAVOR+ estimate of softmax(QKᵀ/sqrt(D))V.

    Stabilisers (all detached; each is a positive factor that cancels exactly
    between numerator and denominator, so the estimator is unchanged):

    * queries: each query row's features are divided by their own maximum
      (a per-query constant);
    * keys, non-causal: one maximum over all keys and features per (batch, head);
    * keys, causal: a per-key maximum would re-weight keys (biasing the estimate)
      and a global one would let future keys move earlier outputs (through
      underflow), so query i uses M_i, the running maximum over keys j <= i only.
      Within a chunk, φ(q_i)·φ(k_j) = (φ̂(q_i)·exp(u_j - M_j))·exp(M_j - M_i), every
      factor <= 1; across chunks, the state of chunks < c is kept relative to the
      running maximum at the end of chunk c-1 and carried forward with decay
      exp(μ_{c-1} - μ_c) <= 1 (a short recurrence over the L/C chunk states).
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    cdt = torch.float32 if q.dtype in _HALF else q.dtype
    w = _cached_projection(features, D, seed, str(q.device), cdt)  # (m, D)
    m = w.shape[0]
    s = D**-0.25

    # query features; the -|q|²/2 term is a per-query constant and cancels with the row maximum
    a = (q.to(cdt) * s) @ w.T  # (B, H, L, m)
    qf = a.sub_(a.amax(dim=-1, keepdim=True).detach()).exp_().to(q.dtype)  # in place: a is not needed again
    qf = group_queries(qf, Hkv)  # (B, Hkv, G, L, m)
    kx = k.to(cdt) * s
    u = (kx @ w.T).sub_(0.5 * (kx * kx).sum(dim=-1, keepdim=True))  # (B, Hkv, L, m): log φ(k)
    del a, kx
    vx = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [V, 1]: numerator and normaliser together

    if not causal:
        kf = u.sub_(u.amax(dim=(-2, -1), keepdim=True).detach()).exp_().to(v.dtype)
        state = (kf.transpose(-1, -2) @ vx).unsqueeze(2)  # (B, Hkv, 1, m, D+1)
        y = qf @ state  # (B, Hkv, G, L, D+1)
        return ungroup(y[..., :D] / y[..., D:].clamp_min(torch.finfo(y.dtype).tiny))

    C = min(chunk, L)
    n = -(-L // C)
    pad = n * C - L  # zero-padded rows come after every real row, so no real query sees them
    G = H // Hkv
    u = pad_seq(u, 0, pad)
    run_max = torch.cummax(u.amax(dim=-1).detach(), dim=-1).values  # (B, Hkv, Lp): M_i = max over keys j <= i
    uc = u.reshape(B, Hkv, n, C, m)
    mc = run_max.reshape(B, Hkv, n, C)
    mu = mc[..., -1]  # (B, Hkv, n): running maximum at the end of each chunk
    psi = (uc - mc.unsqueeze(-1)).exp_().to(v.dtype)  # key j relative to M_j, every entry <= 1
    del u, uc
    vc = pad_seq(vx, 0, pad).reshape(B, Hkv, n, C, D + 1)

    # state of chunk c relative to μ_c: Σ_j ψ_j exp(M_j - μ_c) [v_j, 1] (the rescaling folded into the values)
    to_end = torch.exp(mc - mu.unsqueeze(-1)).to(v.dtype).unsqueeze(-1)  # (B, Hkv, n, C, 1), <= 1
    chunk_state = psi.transpose(-1, -2) @ (vc * to_end)  # (B, Hkv, n, m, D+1)
    decay = torch.exp(mu[..., :-1] - mu[..., 1:]).to(v.dtype)[..., None, None]  # (B, Hkv, n-1, 1, 1), <= 1
    prior = _carry_states(chunk_state, decay)  # (B, Hkv, n, m, D+1)
    del chunk_state

    mu_prev = F.pad(mu[..., :-1], (1, 0), value=float("-inf"))  # μ_{c-1}; -inf for the first chunk
    cross_scale = torch.exp(mu_prev.unsqueeze(-1) - mc).to(v.dtype)  # (B, Hkv, n, C), <= 1
    qc = pad_seq(qf, 0, pad).reshape(B, Hkv, G, n, C, m)
    y = (qc @ prior.unsqueeze(2)) * cross_scale.unsqueeze(2).unsqueeze(-1)  # (B, Hkv, G, n, C, D+1)

    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1)
    key_decay = (mc.unsqueeze(-2) - mc.unsqueeze(-1)).masked_fill(future, float("-inf"))  # M_j - M_i
    within = (qc @ psi.unsqueeze(2).transpose(-1, -2)) * torch.exp(key_decay).to(v.dtype).unsqueeze(2)
    y = y + within @ vc.unsqueeze(2)
    y = y.reshape(B, Hkv, G, n * C, D + 1)[:, :, :, :L]
    return ungroup(y[..., :D] / y[..., D:].clamp_min(torch.finfo(y.dtype).tiny))
