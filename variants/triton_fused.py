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

Launch configuration (tile sizes ``BLOCK_M``/``BLOCK_N``, warps, pipeline stages)
is autotuned by ``triton.autotune`` per (tuning length, head_dim, causal, dtype), the
tuning length being ``seq_len`` rounded up to a power of two (:func:`tune_length`):
every length of a bucket gets the same candidates from :func:`feasible_configs`, so one
tuning serves them all, where the exact length in the key re-tuned for every length
(each tuning compiles every candidate, about a second each). The first call with a new
key compiles and times every candidate that survives :func:`feasible_configs` (tile
divisibility, tiles no longer than the bucket needs, a shared-memory and register
estimate for this GPU, and on Hopper the Triton tutorial's rule that 8 warps only pay
for 128×128 tiles) and keeps the fastest; later calls reuse it. That tuning is part of
the harness's ``first_call_ms``, never of the timed calls.

Without tuning, :func:`fixed_config` gives one config that fits the shape and the GPU
(the first of :data:`FIXED_CONFIGS` that :func:`feasible_configs` keeps): ``launch(...,
config="fixed")``, and the ``triton`` variant itself when ``ATTENTION_BENCH_TRITON_TUNE=fixed``
is set (correctness sweeps: one compile per shape instead of one per candidate). Under
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported) there is
one small config, and :func:`launch` accepts CPU tensors: that is how the tests check the
kernel without a GPU.

Attention features (:mod:`harness.core.features`), each a ``tl.constexpr`` switch, so a kernel
without them compiles exactly as before: ``SOFTCAP`` (``c·tanh(s/c)`` on the base-2 scores, tanh
from ``exp2``), ``ALIBI`` (``−m_h·|i − j|``, the head's slope loaded once), ``WINDOW`` (only the key
blocks of the band ``|i − j| ≤ w`` are visited, all of them masked, and a row's running maximum may
stay −inf until its first visible key, so a finite stand-in is subtracted), ``SINKS`` (the head's
``2^(σ·log2 e − m)`` joins the denominator at the end). Equal query and key lengths only.

Capabilities: CUDA only, float16 / bfloat16 (float32 accumulation), head_dim a
power of two in 16..256, forward only (no backward kernel), causal or not, any
length (the last blocks are masked), grouped-query attention. The module imports
without Triton; the kernel is defined only when ``import triton`` succeeds.
"""

from __future__ import annotations

import math
import os

import torch

from harness import Supports, register_variant

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the module must import (and register) without Triton
    triton = tl = None
    HAS_TRITON = False

#: True when Triton's CPU interpreter runs the kernel (decided, as by ``triton.jit``, at import).
INTERPRETED = HAS_TRITON and bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634
#: CUDA grid limit of axis 1 (we put batch·heads there).
MAX_GRID_Y = 65535


if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        """tanh from exp2 (saturates to ±1 where exp2 overflows or underflows)."""
        return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)

    @triton.jit
    def _attend(
        acc, m_i, l_i, q,  # running state of this query block, and its query tile (BLOCK_M, D)
        k_ptrs, v_ptrs,  # pointers to key block 0: (D, BLOCK_N) transposed view, and (BLOCK_N, D)
        stride_kn, stride_vn,
        offs_m, offs_n,
        lo, hi, seq_len, qk_scale,
        softcap, slope, window,  # features: cap and slope in base-2 units, window in keys (when switched on)
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
        SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, WINDOW: tl.constexpr = False,
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
            if SOFTCAP:
                s = softcap * _tanh(s / softcap)
            if ALIBI:
                s = s - slope * tl.abs(offs_m[:, None] - cols[None, :]).to(tl.float32)
            if MASKED:
                keep = cols[None, :] < seq_len
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= cols[None, :])
                if WINDOW:
                    keep = (keep & (offs_m[:, None] - cols[None, :] <= window)
                            & (cols[None, :] - offs_m[:, None] <= window))
                s = tl.where(keep, s, float("-inf"))
            # without a window every row has seen at least one visible key by now (key 0 is in the
            # first block and visible to every row), so m_new is finite and no 2^(-inf - -inf) NaN can
            # occur; with one a row's first visible key may come later: subtract 0 until then
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if WINDOW:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
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
        Slopes, Sinks,  # features' (H,) float32 tensors (read only when switched on below)
        qk_scale, softcap, window,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        heads, group, seq_len,
        tune_len,  # the autotuner's key (seq_len rounded up to a power of two); unused by the kernel
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, WINDOW: tl.constexpr = False,
        SINKS: tl.constexpr = False,
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

        slope = 0.0
        if ALIBI:
            slope = tl.load(Slopes + h) * 1.4426950408889634  # base-2 units
        # keys this block can see: [0, hi); of those, [0, lo) need no mask at all
        if CAUSAL:
            hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)
            lo = tl.minimum(start_m * BLOCK_M, (seq_len // BLOCK_N) * BLOCK_N)  # BLOCK_M % BLOCK_N == 0
        else:
            hi = seq_len
            lo = (seq_len // BLOCK_N) * BLOCK_N
        start = 0
        if WINDOW:  # the band only, every block masked
            start = (tl.maximum(start_m * BLOCK_M - window, 0) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(hi, (start_m + 1) * BLOCK_M + window)
            lo = start
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
            start, lo, seq_len, qk_scale, softcap, slope, window, MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N,
            SOFTCAP=SOFTCAP, ALIBI=ALIBI,
        )
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
            lo, hi, seq_len, qk_scale, softcap, slope, window, MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N,
            SOFTCAP=SOFTCAP, ALIBI=ALIBI, WINDOW=WINDOW,
        )

        if SINKS:  # the head's sink joins the denominator: 2^(σ·log2 e − m)
            l_i = l_i + tl.math.exp2(tl.load(Sinks + h) * 1.4426950408889634 - m_i)
        out = acc / l_i[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < seq_len)


#: Candidate launch configs (Triton fused-attention tutorial's space); pruned per call by feasible_configs.
CONFIG_SPACE = tuple(
    dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
)
#: The one config under the interpreter: small tiles, so short test sequences still span several blocks.
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
#: Registers per thread one config may spend on its float32 accumulator (of 255).
MAX_ACC_REGISTERS = 128
#: The autotuner's timing of each candidate: ms of warm-up and of repetitions.
TUNE_WARMUP_MS, TUNE_REP_MS = 10, 40
#: Configs used without tuning, by preference (:func:`fixed_config` takes the first one the shape and GPU
#: keep): the Triton tutorial's usual winners on Hopper/Ampere first, then smaller tiles for small GPUs.
FIXED_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
)
#: The environment variable that makes the ``triton`` variant launch :func:`fixed_config` instead of tuning.
TUNE_ENV = "ATTENTION_BENCH_TRITON_TUNE"


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tune_length(seq_len: int) -> int:
    """The autotuner's key for a sequence length: the next power of two (at least 16)."""
    return max(16, _next_power_of_two(seq_len))


def shared_memory_bytes(cfg: dict, head_dim: int, element_bytes: int) -> int:
    """Estimate of a config's shared memory: the query tile plus ``num_stages`` buffered K and V tiles."""
    return element_bytes * head_dim * (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"])


def feasible_configs(
    configs, *, seq_len: int, head_dim: int, causal: bool, element_bytes: int, shared_memory: int,
    compute_capability: int | None = None,
) -> list[dict]:
    """The configs worth timing for this shape on a GPU with ``shared_memory`` bytes per block.

    Kept: BLOCK_M a multiple of BLOCK_N when causal (the kernel's diagonal split needs it); tiles
    no longer than the sequence needs (the smallest tile size always stays); K/V pipeline and query
    tile within shared memory; the float32 accumulator within MAX_ACC_REGISTERS per thread; on
    Hopper (``compute_capability`` 9) 8 warps only for tiles of at least 128×128 (the rule of
    Triton's fused-attention tutorial, ``keep``). Never empty: the smallest config (which fits
    every supported head_dim on any sm80+ GPU) stays.
    """
    configs = [dict(c) for c in configs]
    min_m = min(c["BLOCK_M"] for c in configs)
    min_n = min(c["BLOCK_N"] for c in configs)
    span = _next_power_of_two(seq_len)

    def keep(c):
        return (
            (not causal or c["BLOCK_M"] % c["BLOCK_N"] == 0)
            and c["BLOCK_M"] <= max(min_m, span)
            and c["BLOCK_N"] <= max(min_n, span)
            and shared_memory_bytes(c, head_dim, element_bytes) <= shared_memory
            and c["BLOCK_M"] * head_dim <= MAX_ACC_REGISTERS * 32 * c["num_warps"]
            and not (compute_capability == 9 and c["num_warps"] == 8 and c["BLOCK_M"] * c["BLOCK_N"] < 128 * 128)
        )

    kept = [c for c in configs if keep(c)]
    if kept:
        return kept
    return [min(configs, key=lambda c: (c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], c["num_warps"]))]


def _config_dict(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _shared_memory(device) -> int:
    """Bytes of shared memory one block may use on ``device`` (Triton's driver query)."""
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return int(props["max_shared_mem"])


def _capability(device) -> int | None:
    """The major compute capability of a CUDA ``device`` (None for any other)."""
    if getattr(device, "type", None) != "cuda":
        return None
    return int(torch.cuda.get_device_capability(device)[0])


def _prune(configs, named_args, **kwargs):
    """``early_config_prune`` hook: :func:`feasible_configs` on this launch's tuning length and GPU."""
    q = named_args["Q"]
    by_key = {tuple(sorted(_config_dict(c).items())): c for c in configs}
    kept = feasible_configs(
        [_config_dict(c) for c in configs],
        seq_len=int(named_args.get("tune_len", named_args["seq_len"])),
        head_dim=int(kwargs["HEAD_DIM"]),
        causal=bool(kwargs["CAUSAL"]),
        element_bytes=q.element_size(),
        shared_memory=_shared_memory(q.device),
        compute_capability=_capability(q.device),
    )
    return [by_key[tuple(sorted(c.items()))] for c in kept]


def fixed_config(*, seq_len: int, head_dim: int, causal: bool, element_bytes: int, shared_memory: int,
                 compute_capability: int | None = None) -> dict:
    """One config for this shape and GPU, without tuning: the first of :data:`FIXED_CONFIGS` that
    :func:`feasible_configs` keeps of the whole space, else the first it keeps."""
    shape = dict(seq_len=tune_length(seq_len), head_dim=head_dim, causal=causal, element_bytes=element_bytes,
                 shared_memory=shared_memory, compute_capability=compute_capability)
    kept = feasible_configs(CONFIG_SPACE, **shape)
    return dict(next((c for c in FIXED_CONFIGS if c in kept), kept[0]))


def tune_mode() -> str:
    """How the ``triton`` variant launches: "autotune" (default), or "fixed" (:data:`TUNE_ENV`)."""
    return "fixed" if os.environ.get(TUNE_ENV, "").strip().lower() == "fixed" else "autotune"


def _triton_config(cfg: dict):
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _tune_bench(kernel_call, quantiles):
    """How the autotuner times one candidate: Triton's do_bench, shortened (the defaults are 25/100 ms)."""
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


if HAS_TRITON:
    #: The autotuned kernel: tuned once per (tune_len, HEAD_DIM, CAUSAL, dtypes) per process.
    _attention_fwd_tuned = triton.autotune(
        configs=[_triton_config(INTERPRETER_CONFIG)] if INTERPRETED else [_triton_config(c) for c in CONFIG_SPACE],
        key=["tune_len", "HEAD_DIM", "CAUSAL"],  # a kernel with features takes its shape's tuned config
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_tune_bench,
    )(_attention_fwd)


def launch(q, k, v, *, causal: bool, config: dict | str | None = None, softcap: float | None = None,
           alibi_slopes=None, sinks=None, window_size: int | None = None):
    """Run the kernel: q (B, H, L, D), k and v (B, H_kv, L, D) -> out (B, H, L, D).

    ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages) bypasses the autotuner; ``"fixed"`` takes
    :func:`fixed_config`'s. CUDA tensors, or CPU tensors under Triton's interpreter (the tests'
    path; the variant declares CUDA only). Features: ``softcap``, ``alibi_slopes`` and ``sinks``
    (float32 (H,)), ``window_size`` (keys on each side).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the triton kernel needs CUDA tensors, not {q.device.type} "
                         "(CPU only under TRITON_INTERPRET=1)")
    B, H, L, D = q.shape
    if config == "fixed":
        config = dict(INTERPRETER_CONFIG) if INTERPRETED else fixed_config(
            seq_len=L, head_dim=D, causal=bool(causal), element_bytes=q.element_size(),
            shared_memory=_shared_memory(q.device), compute_capability=_capability(q.device))
    out = torch.empty_like(q)
    dummy = out  # a pointer never read where its feature is off
    args = (
        q, k, v, out,
        dummy if alibi_slopes is None else alibi_slopes.float().contiguous(),
        dummy if sinks is None else sinks.float().contiguous(),
        LOG2E / math.sqrt(D), float(softcap or 1.0) * LOG2E, int(window_size or 0),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // k.shape[1], L, tune_length(L),
    )
    switches = {name: True for name, on in (("SOFTCAP", bool(softcap)), ("ALIBI", alibi_slopes is not None),
                                            ("WINDOW", window_size is not None), ("SINKS", sinks is not None)) if on}
    if config is None:
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attention_fwd_tuned[grid](*args, HEAD_DIM=D, CAUSAL=bool(causal), **switches)
    else:
        _attention_fwd[(triton.cdiv(L, config["BLOCK_M"]), B * H)](*args, HEAD_DIM=D, CAUSAL=bool(causal), **config,
                                                                   **switches)
    return out


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
    supports=Supports(
        devices={"cuda"}, dtypes={"float16", "bfloat16"}, backward=False, min_head_dim=16, max_head_dim=256,
        softcap=True, alibi=True, sinks=True, sliding_window=True,
    ),
    check=_check,
    working_set=_working_set,
    description="our FlashAttention-2-style fused forward kernel in Triton (online softmax, causal skipping, GQA)",
)
def triton_attention(q, k, v, *, causal, **features):
    return launch(q, k, v, causal=causal, config="fixed" if tune_mode() == "fixed" else None, **features)
