"""Our own fused attention forward kernel in Triton (FlashAttention-2 style).

One Triton program computes one block of ``BLOCK_M`` query rows of one (batch,
head): it loads its query tile once, then streams the key/value tiles of its kv
head (``h // group``: grouped-query attention reads the shared K/V, never a copy)
in blocks of ``BLOCK_N`` keys, keeping in registers, per row, the running max
``m``, the running denominator ``l`` and an unnormalised float32 accumulator
(Dao 2023, FlashAttention-2, Algorithm 1)::

    S = Q_i K_jᵀ · scale·log2(e)        (tl.dot, float32 accumulate)
    m' = max(m, rowmax S);  P = 2^(S - m')
    l  = l · 2^(m - m') + rowsum P
    acc = acc · 2^(m - m') + P V_j      (P rounded to the input dtype for the tensor-core dot)
    out_i = acc / l

Exponentials are base 2 with the log2(e) factor folded into the scale (exp2 is
the native instruction). Nothing of size L×L is ever written to memory.

The key loop has two stages so that masking costs nothing where it is not needed:
blocks entirely visible (below the causal diagonal and inside the sequence) run
without any mask, then the few blocks that straddle the diagonal or the end of the
sequence run with the causal / bounds mask. Blocks above the diagonal are never
visited (causal skipping: half the work). Causal programs are launched heaviest
first (last query block first) so the long rows do not form a tail.

Capabilities: CUDA only, float16 / bfloat16 (float32 accumulation), head_dim a
power of two in 16..256, forward only (no backward kernel), causal or not, any
length (the last blocks are masked), grouped-query attention. The module imports
without Triton; the kernel is defined only when ``import triton`` succeeds.
"""

from __future__ import annotations

import math

import torch

from harness import attention_flops
from harness import Supports, register_variant

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the module must import (and register) without Triton
    triton = tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634
#: CUDA grid limit of axis 1 (we put batch·heads there).
MAX_GRID_Y = 65535


if HAS_TRITON:

    @triton.jit
    def _attend(
        acc, m_i, l_i, q,  # running state of this query block, and its query tile (BLOCK_M, D)
        k_ptrs, v_ptrs,  # pointers to key block 0: (D, BLOCK_N) transposed view, and (BLOCK_N, D)
        stride_kn, stride_vn,
        offs_m, offs_n,
        lo, hi, seq_len, qk_scale,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Online-softmax update of (acc, m, l) over key blocks [lo, hi) (lo a multiple of BLOCK_N)."""
        k_ptrs += lo * stride_kn
        v_ptrs += lo * stride_vn
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            if MASKED:  # the end of the sequence may cut this block: out-of-range keys read 0
                k = tl.load(k_ptrs, mask=cols[None, :] < seq_len, other=0.0)
            else:
                k = tl.load(k_ptrs)
            s = tl.dot(q, k) * qk_scale  # (BLOCK_M, BLOCK_N) float32, in log2 units
            if MASKED:
                keep = cols[None, :] < seq_len
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= cols[None, :])
                s = tl.where(keep, s, float("-inf"))
            # every row has seen at least one visible key by now (key 0 is in the first block
            # and visible to every row), so m_new is finite and no 2^(-inf - -inf) NaN can occur
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASKED:
                v = tl.load(v_ptrs, mask=cols[:, None] < seq_len, other=0.0)
            else:
                v = tl.load(v_ptrs)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        return acc, m_i, l_i

    @triton.jit
    def _attention_fwd(
        Q, K, V, Out,
        qk_scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        heads, group, seq_len,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        """One program: query rows [start_m·BLOCK_M, +BLOCK_M) of one (batch, head)."""
        if CAUSAL:  # heaviest query blocks (they see the most keys) first
            start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        else:
            start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // heads).to(tl.int64)  # int64 base offsets: tensors may exceed 2^31 elements
        h = (bh % heads).to(tl.int64)
        h_kv = h // group  # grouped-query attention: query head -> its key/value head

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        k_ptrs = K + b * stride_kb + h_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

        q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0)  # stays in registers
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # keys this block can see: [0, hi); of those, [0, lo) need no mask at all
        if CAUSAL:
            hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)
            lo = tl.minimum(start_m * BLOCK_M, (seq_len // BLOCK_N) * BLOCK_N)  # BLOCK_M % BLOCK_N == 0
        else:
            hi = seq_len
            lo = (seq_len // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
            0, lo, seq_len, qk_scale, MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N,
        )
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
            lo, hi, seq_len, qk_scale, MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N,
        )

        out = acc / l_i[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < seq_len)


def launch_config(head_dim: int) -> dict:
    """Tile sizes and launch parameters by head_dim (BLOCK_M a multiple of BLOCK_N; fits H100 shared memory)."""
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check(case) -> list[str]:
    reasons = []
    if not HAS_TRITON:
        reasons.append("Triton is not installed")
    if case.device == "cuda" and not torch.cuda.is_available():
        reasons.append("needs a CUDA GPU")
    if not _is_power_of_two(case.head_dim):
        reasons.append(f"triton kernel needs a power-of-two head_dim, not {case.head_dim}")
    if case.batch * case.heads > MAX_GRID_Y:
        reasons.append(f"triton kernel launches batch·heads <= {MAX_GRID_Y} programs per query block")
    if (
        not reasons
        and case.dtype == "bfloat16"
        and case.device == "cuda"
        and torch.cuda.get_device_capability()[0] < 8
    ):
        reasons.append("bfloat16 tensor-core dots need compute capability >= 8.0 (Ampere)")
    return reasons


def _working_set(case) -> float:
    """q, k, v and out: the kernel itself keeps its tiles on chip."""
    rows = 2 * case.batch * (case.heads + case.kv_heads) * case.seq_len
    return float(rows * case.head_dim * case.element_bytes)


@register_variant(
    "triton",
    family="fused",
    exact=True,
    flops=attention_flops,
    supports=Supports(
        devices={"cuda"}, dtypes={"float16", "bfloat16"}, backward=False, min_head_dim=16, max_head_dim=256
    ),
    check=_check,
    working_set=_working_set,
    description="our FlashAttention-2-style fused forward kernel in Triton (online softmax, causal skipping, GQA)",
)
def triton_attention(q, k, v, *, causal):
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    cfg = launch_config(D)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _attention_fwd[grid](
        q, k, v, out,
        LOG2E / math.sqrt(D),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // Hkv, L,
        HEAD_DIM=D, CAUSAL=bool(causal), **cfg,
    )
    return out
