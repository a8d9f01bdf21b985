"""FlashAttention written in PyTorch: tiled exact attention with an online softmax.

Forward (Dao et al. 2022; FlashAttention-2 loop order): queries are cut into
blocks of ``block_q`` rows; for each query block the keys and values are
streamed in blocks of ``block_k``, keeping for every row a running maximum
``m``, a running denominator ``l`` and an unnormalised output accumulator::

    S = Q_i K_jᵀ · scale                  (block_q × block_k per head)
    m' = max(m, rowmax S);  P = exp(S - m')
    l  = l · exp(m - m') + rowsum P
    acc = acc · exp(m - m') + P V_j
    out_i = acc / l;  lse_i = m + log l

Only a ``block_q × block_k`` score tile per head ever exists, never L×L. All
batch × kv-head pairs go through one batched matmul per tile; the ``G`` query
heads sharing a key/value head are stacked as extra rows of the query tile, so
grouped-query attention never repeats K or V. Causal: key blocks entirely above
the diagonal are skipped, and only tiles straddling the diagonal are masked. With fewer
queries than keys (decode, chunked prefill) the diagonal is aligned to the bottom right:
query i sits at position ``Lk - L + i``.

Backward (FlashAttention-2): the forward saves q, k, v, out and the per-row
log-sum-exp; the backward recomputes each probability tile as
``P = exp(S - lse)``, with ``D_i = rowsum(dO ∘ O)`` and ``dS = P ∘ (dP - D_i)``,
so no score matrix is stored. bfloat16/float16 inputs: with ``compute = "input"`` (the
default) QKᵀ and P·V take input-dtype operands with float32 accumulation while the softmax
statistics and the output accumulator stay float32; with ``compute = "float32"`` everything
(tiles, accumulators and statistics) is float32 and the output is rounded once. The backward is
float32 in both.

Attention features (softcap, ALiBi, sinks, v_head_dim, window, prefix-LM, documents): the same
loops with each feature in its tile, :mod:`variants.tiled_features`; a call without features runs
the loops below, untouched.

CPU performance notes: scores are kept in base 2 (q is pre-scaled by
scale·log2 e) because ``exp2`` is about 3× cheaper than ``exp`` in PyTorch's CPU
kernels; tiles live in buffers reused across the loop (no allocation or page
faults per tile); P·V goes through ``bmm`` into a buffer and an ``addcmul``
rescale rather than an in-place ``baddbmm_`` (which PyTorch runs as one
``addmm_`` per batch). At block 256×256 the forward is bound by the two batched
matmuls (~80% of its time), the rest being the exp2 and row reductions.
"""

from __future__ import annotations

import math

import torch

from harness import Param, Supports, attention_flops, register_variant
from harness.core.cases import DTYPE_BYTES
from variants import tiled_features
from variants.features import ALL as ALL_FEATURES

_F32 = torch.float32
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _blocks(length: int, block: int):
    return [(s, min(s + block, length)) for s in range(0, length, block)]


def _diagonal_mask(i0: int, i1: int, j0: int, j1: int, device, offset: int = 0) -> torch.Tensor | None:
    """Boolean (rows, cols) mask of keys after their query in tile [i0,i1)×[j0,j1), or None if none are
    (query i sits at key position i + offset: bottom-right alignment)."""
    if j1 - 1 <= i0 + offset:
        return None
    rows = torch.arange(i0, i1, device=device).unsqueeze(1)
    cols = torch.arange(j0, j1, device=device).unsqueeze(0)
    return cols > rows + offset


def _key_blocks(i0: int, i1: int, kblocks, causal: bool, offset: int = 0):
    """The key blocks query rows [i0, i1) attend: all of them, or those starting at or before i1 - 1 + offset."""
    if not causal:
        return kblocks
    return [(j0, j1) for j0, j1 in kblocks if j0 < i1 + offset]


class _Tiles:
    """Reusable flat buffers: a tile of ``shape`` is a contiguous view of the first elements."""

    def __init__(self, device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype = _F32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self.buffers[name] = buf
        return buf[:n].view(shape)


def _query_tile(x: torch.Tensor, i0: int, i1: int, out: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Rows [i0, i1) of x (N, G, L, D) as a float32 (N, G·rows, D) tile, optionally scaled, written into ``out``."""
    N, G, _, D = x.shape
    view = out.view(N, G, i1 - i0, D)
    if scale is None:
        view.copy_(x[:, :, i0:i1])
    else:
        torch.mul(x[:, :, i0:i1], scale, out=view)
    return out


def _pv(p, vb, out, p_low):
    """P·V into ``out``: P as it is (float32), or first rounded into ``p_low`` (the input dtype)."""
    if p_low is not None:
        p = p_low.copy_(p)
    return torch.bmm(p, vb, out=out)


def flash_forward(q, k, v, causal: bool, block_q: int, block_k: int, scale: float, compute: str = "float32"):
    """Tiled forward. q (N, G, L, D); k, v (N, L, D), N = batch·kv_heads.

    Returns out (q's dtype, q's shape) and the natural-log log-sum-exp of every row, (N, G, L) float32.
    Scores are kept in base 2 (q is scaled by scale·log2 e) because ``exp2`` is several times cheaper
    than ``exp`` on CPU; the result is the same softmax.

    ``compute = "input"`` with bfloat16/float16 inputs, FlashAttention's scheme: P is rounded to the
    input dtype and P·V is an input-dtype GEMM (float32 accumulation inside it), V is never copied
    to float32; the scores, the softmax statistics (m, l, lse) and the output accumulator are
    float32. QKᵀ takes the input-dtype values of Q and K with a float32 result: 16-bit products
    are exact in float32, so a float32 GEMM of the upcast operands is what a 16-bit GEMM with a
    float32 output computes (torch's CPU 16-bit GEMM rounds its result to 16 bits, which on peaked
    attention costs 2x the bfloat16 tolerance). ``"float32"``, or a float32 input: everything in
    float32, V included.
    """
    N, G, L, D = q.shape
    Lk = k.shape[1]
    offset = Lk - L  # causal: bottom-right aligned
    block_q, block_k = min(block_q, L), min(block_k, Lk)
    low = compute == "input" and q.dtype != _F32
    lo = q.dtype if low else _F32
    kf, vf = k.to(_F32), (v if low else v.to(_F32))  # no copy for float32
    out = torch.empty_like(q)
    lse = torch.empty(N, G, L, dtype=_F32, device=q.device)
    direct = q.dtype == _F32 and G == 1  # accumulate straight into the output rows
    tiles = _Tiles(q.device)
    kblocks = _blocks(Lk, block_k)
    for i0, i1 in _blocks(L, block_q):
        rows = G * (i1 - i0)
        qs = _query_tile(q, i0, i1, tiles.get("q", (N, rows, D)), scale * _LOG2E)
        acc = out[:, 0, i0:i1] if direct else tiles.get("acc", (N, rows, D))
        pv = tiles.get("pv", (N, rows, D), lo)
        m, m_new = tiles.get("m", (N, rows, 1)), tiles.get("m_new", (N, rows, 1))
        l, rowsum = tiles.get("l", (N, rows, 1)), tiles.get("rowsum", (N, rows, 1))
        for n, (j0, j1) in enumerate(_key_blocks(i0, i1, kblocks, causal, offset)):
            s = tiles.get("s", (N, rows, j1 - j0))
            p_low = tiles.get("p_low", (N, rows, j1 - j0), lo) if low else None  # P in the input dtype
            torch.bmm(qs, kf[:, j0:j1].transpose(1, 2), out=s)  # base-2 scores
            mask = _diagonal_mask(i0, i1, j0, j1, q.device, offset) if causal else None
            if mask is not None:
                s.view(N, G, i1 - i0, j1 - j0).masked_fill_(mask, float("-inf"))
            if n == 0:
                torch.amax(s, dim=-1, keepdim=True, out=m)
                s.sub_(m).exp2_()
                torch.sum(s, dim=-1, keepdim=True, out=l)
                if low:
                    acc.copy_(_pv(s, vf[:, j0:j1], pv, p_low))
                else:
                    torch.bmm(s, vf[:, j0:j1], out=acc)
                continue
            torch.amax(s, dim=-1, keepdim=True, out=m_new)
            torch.maximum(m_new, m, out=m_new)
            s.sub_(m_new).exp2_()  # P = 2^(S - m')
            alpha = m.sub_(m_new).exp2_()  # rescale factor 2^(m - m'), in m's buffer
            torch.sum(s, dim=-1, keepdim=True, out=rowsum)
            torch.addcmul(rowsum, l, alpha, out=l)  # l = l·alpha + rowsum P
            torch.addcmul(_pv(s, vf[:, j0:j1], pv, p_low), acc, alpha, out=acc)  # acc = acc·alpha + P V
            m, m_new = m_new, m
        if direct:
            acc.div_(l)
        else:
            torch.div(acc.view(N, G, i1 - i0, D), l.view(N, G, i1 - i0, 1), out=out[:, :, i0:i1])
        # lse = ln 2 · (m + log2 l)
        lse[:, :, i0:i1].copy_(l.log2_().add_(m).mul_(_LN2).view(N, G, i1 - i0))
    return out, lse


def flash_backward(q, k, v, out, lse, dout, causal: bool, block_q: int, block_k: int, scale: float):
    """FlashAttention-2 backward from the saved log-sum-exp; returns float32 (dq, dk, dv) in the input layouts."""
    N, G, L, D = q.shape
    Lk = k.shape[1]
    offset = Lk - L
    block_q, block_k = min(block_q, L), min(block_k, Lk)
    kf, vf = k.to(_F32), v.to(_F32)
    dq = torch.empty(N, G, L, D, dtype=_F32, device=q.device)
    dk = torch.zeros(N, Lk, D, dtype=_F32, device=q.device)
    dv = torch.zeros(N, Lk, D, dtype=_F32, device=q.device)
    tiles = _Tiles(q.device)
    kblocks = _blocks(Lk, block_k)
    for i0, i1 in _blocks(L, block_q):
        rows = G * (i1 - i0)
        qs = _query_tile(q, i0, i1, tiles.get("q", (N, rows, D)), scale * _LOG2E)
        do = _query_tile(dout, i0, i1, tiles.get("do", (N, rows, D)))
        o = _query_tile(out, i0, i1, tiles.get("o", (N, rows, D)))
        delta = torch.sum(o.mul_(do), dim=-1, keepdim=True)  # D_i = rowsum(dO ∘ O)
        lse2 = (lse[:, :, i0:i1] * _LOG2E).view(N, rows, 1)  # base-2 log-sum-exp
        dq_acc = tiles.get("dq", (N, rows, D))
        tmp_q = tiles.get("tmp_q", (N, rows, D))
        for n, (j0, j1) in enumerate(_key_blocks(i0, i1, kblocks, causal, offset)):
            kb, vb = kf[:, j0:j1], vf[:, j0:j1]
            tmp_k = tiles.get("tmp_k", (N, j1 - j0, D))
            p = tiles.get("p", (N, rows, j1 - j0))
            torch.bmm(qs, kb.transpose(1, 2), out=p)
            mask = _diagonal_mask(i0, i1, j0, j1, q.device, offset) if causal else None
            if mask is not None:
                p.view(N, G, i1 - i0, j1 - j0).masked_fill_(mask, float("-inf"))
            p.sub_(lse2).exp2_()  # P recomputed from the log-sum-exp
            dv[:, j0:j1].add_(torch.bmm(p.transpose(1, 2), do, out=tmp_k))  # dV_j += Pᵀ dO_i
            dp = tiles.get("dp", (N, rows, j1 - j0))
            torch.bmm(do, vb.transpose(1, 2), out=dp)  # dP = dO_i V_jᵀ
            ds = dp.sub_(delta).mul_(p)  # dS = P ∘ (dP - D_i)
            if n == 0:
                torch.bmm(ds, kb, out=dq_acc)
            else:
                dq_acc.add_(torch.bmm(ds, kb, out=tmp_q))  # dQ_i += dS K_j
            dk[:, j0:j1].add_(torch.bmm(ds.transpose(1, 2), qs, out=tmp_k))  # dK_j += dSᵀ Q_i (·scale·log2 e)
        torch.mul(dq_acc.view(N, G, i1 - i0, D), scale, out=dq[:, :, i0:i1])
    dk.mul_(1.0 / _LOG2E)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k, scale, compute, features=None):
        if features is None:
            out, lse = flash_forward(q, k, v, causal, block_q, block_k, scale, compute)
        else:
            out, lse = tiled_features.forward(q, k, v, block_q, block_k, scale, compute, features)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (causal, block_q, block_k, scale)
        ctx.features = features
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.features is None:
            dq, dk, dv = flash_backward(q, k, v, out, lse, dout, *ctx.config)
        else:
            dq, dk, dv = tiled_features.backward(q, k, v, out, lse, dout, *ctx.config[1:], ctx.features)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _working_set(case) -> float:
    """Peak bytes: output, log-sum-exp and the tiles; with a backward, float32 gradients and backward tiles.

    Forward: out + lse + one score tile (B·H·block_q × block_k float32) + the query/accumulator
    row tiles (+ float32 copies of K and V for 16-bit inputs under ``compute = "float32"``; under
    ``"input"`` a float32 copy of K only, plus an input-dtype P tile and P·V row tile).
    Backward (the upstream gradient is the caller's): saved out + lse, float32 dQ, dK, dV, and
    either the loop's two score tiles (P, dP), five query-row tiles (Q, dO, O, dQ, a product) and
    one key-row tile, or (16-bit inputs) the final casts of the gradients.
    """
    B, H, Hkv, L, D = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    Lq = case.query_len
    bq, bk = min(case.params["block_q"], Lq), min(case.params["block_k"], L)
    eb, f4 = case.element_bytes, DTYPE_BYTES["float32"]
    rows = B * H * bq  # query rows of one tile, all heads
    half = case.dtype != "float32"
    out_lse = B * H * Lq * (D * eb + f4)
    kv32 = 2 * B * Hkv * L * D * f4 if half else 0
    direct = not half and H == Hkv
    if half and case.params.get("compute", "input") == "input":  # float32 K only; a 16-bit P and P·V tile
        fwd = out_lse + kv32 / 2 + rows * bk * (f4 + eb) + rows * D * (eb + 2 * f4)
    else:
        fwd = out_lse + kv32 + rows * bk * f4 + rows * D * f4 * (2 if direct else 3)
    if case.mode == "fwd":
        return fwd
    grad_elems = B * H * Lq * D + 2 * B * Hkv * L * D
    tiles = 2 * rows * bk * f4 + 5 * rows * D * f4 + B * Hkv * bk * D * f4
    casts = grad_elems * eb if half else 0  # after the loop, when K/V copies and tiles are gone
    bwd = out_lse + grad_elems * f4 + max(kv32 + tiles, casts)
    return max(fwd, bwd)


@register_variant(
    "tiled",
    family="memory_efficient",
    exact=True,
    flops=attention_flops,
    supports=Supports(devices={"cpu", "cuda"}, non_square=True, **ALL_FEATURES),
    working_set=_working_set,
    # which loop ran: the tuned one, or the one that applies features (the report's Cost of features reads it)
    columns=lambda case: {"tiled_loop": "features" if case.features else "tuned"},
    params={
        "block_q": Param(256, min=1, help="query rows per tile"),
        "block_k": Param(256, min=1, help="keys per tile (one online-softmax step)"),
        "compute": Param(
            "input",
            choices=("input", "float32"),
            help="16-bit inputs: matmuls in the input dtype (float32 softmax statistics and accumulator), "
            "or everything in float32; the same for float32 inputs; the backward is float32 either way",
        ),
    },
    description="FlashAttention in PyTorch: tiled online softmax, O(L·D) memory, LSE-recomputing backward",
)
def tiled(q, k, v, *, causal, block_q=256, block_k=256, compute="input", **features):
    B, H, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(D)
    qg = q.reshape(B * Hkv, H // Hkv, L, D)
    kg, vg = k.reshape(B * Hkv, k.shape[2], D), v.reshape(B * Hkv, v.shape[2], Dv)
    feats = tiled_features.TileFeatures(Hkv, H // Hkv, L, k.shape[2], causal, **features) \
        if features or Dv != D else None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out = _FlashAttention.apply(qg, kg, vg, causal, block_q, block_k, scale, compute, feats)
    elif feats is not None:
        out, _ = tiled_features.forward(qg, kg, vg, block_q, block_k, scale, compute, feats)
    else:
        out, _ = flash_forward(qg, kg, vg, causal, block_q, block_k, scale, compute)
    return out.reshape(B, H, L, Dv)
