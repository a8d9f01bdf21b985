"""Quantised attention: int8 QKᵀ (SageAttention), FP8 Q/K/V, and KV-cache quantisation.

All three are approximations (``exact=False``): their ``rel_err`` against float64 softmax
attention on the same inputs is the measurement. Inference only (no backward: rounding has no
useful gradient).

* ``int8_qk`` (Zhang et al. 2024, SageAttention): K is *smoothed* by subtracting its mean over
  the sequence (``smooth``), which leaves softmax unchanged — q·(k − k̄) differs from q·k by q·k̄,
  one constant per query row, also under a causal mask — but removes the large shared component
  that would otherwise eat the int8 range. Q and K are quantised symmetrically per block of
  ``block`` rows of each head (scale = absmax / 127); QKᵀ is an int8 × int8 → int32 product;
  the scores are dequantised with the two scales, softmax runs in float32 and P·V in
  ``pv_dtype``. The int8 product is ``torch._int_mm`` (2-D only, so one call per key/value head
  and query chunk; on CPU it takes any shape, on CUDA it needs head_dim and L multiples of 8 and
  more than 16 rows) or, where it cannot run or ``int_matmul = "emulated"``, a float32 matmul of
  the int8 values: every partial sum is an integer of magnitude ≤ D·127² < 2²⁴ for D ≤ 1040, so
  the float32 product is bit-identical to the int32 one (float64 above that).
* ``fp8``: Q, K (and V if ``quantize_v``) scaled into ``float8_e4m3fn`` or ``float8_e5m2``
  (scale = absmax / the format's max, per tensor or per block of rows of each head) and cast.
  On CUDA GPUs with FP8 (compute capability ≥ 8.9), e4m3 with one scale per tensor, QKᵀ runs
  through ``torch._scaled_mm`` when head_dim and L are multiples of 16; everywhere else the
  FP8 values are dequantised to float32 and multiplied there (emulation: the rounding of FP8 is
  real, the speed is not). ``fp8_matmul = "scaled_mm"`` also runs on CPU, where torch 2.13 has
  a software ``_scaled_mm`` (same numbers as the emulation, several times slower, still emulated).
* ``kv_quant``: K and V stored as ``bits``-bit integers with one scale per ``group`` values
  (:func:`quantize_kv`, int4 packed two to a byte), dequantised on the fly, then PyTorch's SDPA.
  The helpers are pure functions so a decode path can keep a quantised cache and call
  :func:`dequantize_kv` per step. It takes decode shapes (``q_len < kv_len``, causal aligned to
  the bottom right).

Every row carries ``quant_matmul`` (which product ran) and ``emulated`` (True when the timing is
not that of a low-precision kernel: an emulated int8/FP8 product, or kv_quant's quantise +
dequantise + SDPA round trip), so a report can leave emulated rows out of speed rankings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from harness import Param, Supports, attention_flops, register_variant
from variants.common import causal_sdpa_kwargs

_F32 = torch.float32
_LOG2E = math.log2(math.e)
_SCORE_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 24}  # float32 scores of one chunk: CPU, to stay in L2 (1 MiB)
_PV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
INT_MM = "torch._int_mm"
SCALED_MM = "torch._scaled_mm"
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_INFERENCE = Supports(devices={"cpu", "cuda"}, backward=False)


# ---------------------------------------------------------------------------
# Shared: dense softmax attention over float32 score chunks
# ---------------------------------------------------------------------------


def _chunk_rows(heads: int, keys: int, device_type: str) -> int:
    return max(16, _SCORE_ELEMS.get(device_type, 1 << 24) // max(1, heads * keys) // 16 * 16)


def _chunked_attention(q, v, causal: bool, scores, pv_dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention whose float32 base-2 scores come from ``scores(n, i0, i1, j1)``.

    q (N, G, L, D) (only its shape, dtype and device are used), v (N, Lk, D); ``scores`` returns
    the (G, i1 - i0, j1) scores of the G query heads of key/value head n, query rows [i0, i1),
    against keys [0, j1), scaled by scale·log2 e (``exp2`` is several times cheaper than ``exp``
    on CPU). One key/value head and a chunk of query rows at a time, so that on CPU a chunk's
    scores stay in cache through the passes over them; a causal chunk looks only at keys before
    its last row. P = 2^(S - rowmax) in float32, P·V in ``pv_dtype``, normalised afterwards by
    the float32 row sums; output in q's dtype.
    """
    N, G, L, D = q.shape
    Lk = v.shape[1]
    out = torch.empty_like(q)
    vp = v.to(pv_dtype)
    chunk = _chunk_rows(G, Lk, q.device.type)
    for n in range(N):
        for i0 in range(0, L, chunk):
            i1 = min(i0 + chunk, L)
            j1 = min(i1, Lk) if causal else Lk
            s = scores(n, i0, i1, j1)
            if causal:
                cols = torch.arange(j1, device=s.device)
                s.masked_fill_(cols > torch.arange(i0, i1, device=s.device).unsqueeze(1), float("-inf"))
            p = s.sub_(s.amax(dim=-1, keepdim=True)).exp2_()
            l = p.sum(dim=-1, keepdim=True)
            out[n, :, i0:i1] = torch.matmul(p.to(pv_dtype), vp[n, :j1]).to(_F32).div_(l)
    return out


def _grouped(q, k, v):
    """(B, H, L, D), (B, Hkv, L, D) -> q (B·Hkv, G, L, D), k and v (B·Hkv, L, D)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    n = B * Hkv
    return q.reshape(n, H // Hkv, L, D), k.reshape(n, k.shape[2], D), v.reshape(n, v.shape[2], D)


def _block_scales(x: torch.Tensor, block: int, qmax: float) -> torch.Tensor:
    """Symmetric scale (absmax / qmax) of every block of ``block`` rows of x (..., L, D), one per row: (..., L)."""
    L = x.shape[-2]
    nb = -(-L // block)
    absmax = F.pad(x.abs().amax(-1), (0, nb * block - L)).unflatten(-1, (nb, block)).amax(-1)
    scale = (absmax.float() / qmax).clamp_min(torch.finfo(_F32).tiny)
    return scale.repeat_interleave(block, dim=-1)[..., :L]


# ---------------------------------------------------------------------------
# int8 QKᵀ (SageAttention)
# ---------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., L, D) -> (int8 values, float32 row scales (..., L)): x ≈ values · scale[..., None].

    Symmetric, one scale per block of ``block`` rows (all D columns): scale = absmax / 127, so
    each block's largest magnitude maps to ±127; rounding to nearest (error ≤ scale / 2).
    """
    scale = _block_scales(x, block, 127.0)
    values = torch.round(x.float() / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values, scale


def _int_mm_problem(device_type: str, head_dim: int, seq_len: int) -> str | None:
    """Why ``torch._int_mm`` cannot do this case's QKᵀ, or None (checked on torch 2.13: any 2-D shape on CPU)."""
    if device_type == "cuda" and (head_dim % 8 or seq_len % 8):
        return f"torch._int_mm on CUDA needs head_dim and seq_len multiples of 8, not {head_dim} and {seq_len}"
    if device_type not in ("cpu", "cuda"):
        return f"torch._int_mm is not available on {device_type}"
    return None


def int_matmul_path(device_type: str, head_dim: int, seq_len: int, choice: str = "auto") -> str:
    """The int8 product a case runs: ``torch._int_mm`` or the exact float emulation (its label)."""
    if choice == "int_mm" or (choice == "auto" and _int_mm_problem(device_type, head_dim, seq_len) is None):
        return INT_MM
    if head_dim * 127**2 < 2**24:  # every partial sum of the float32 product is an exact integer
        return "emulated (float32 matmul, exact for int8 products)"
    return "emulated (float64 matmul, exact)"


def _int8_scores(qi, sq, ki, sk, path: str):
    """scores(n, i0, i1, j1) from int8 q (N, G, L, D), k (N, Lk, D) and their (scaled) row scales."""
    N, G, _, D = qi.shape
    if path != INT_MM:
        dtype = _F32 if "float32" in path else torch.float64
        qf, kf = qi.to(dtype), ki.to(dtype)

    def scores(n, i0, i1, j1):
        rows = i1 - i0
        if path == INT_MM:
            a = qi[n, :, i0:i1].reshape(G * rows, D)
            if qi.is_cuda and a.shape[0] <= 16:  # CUDA wants more than 16 rows
                s = torch._int_mm(F.pad(a, (0, 0, 0, 17 - a.shape[0])), ki[n, :j1].t())[: G * rows]
            else:
                s = torch._int_mm(a, ki[n, :j1].t())
            s = s.view(G, rows, j1)
        else:
            s = torch.matmul(qf[n, :, i0:i1], kf[n, :j1].t())
        return s.to(_F32).mul_(sq[n, :, i0:i1, None]).mul_(sk[n, :j1])

    return scores


def _int8_columns(case) -> dict:
    path = int_matmul_path(case.device, case.head_dim, case.seq_len, case.params.get("int_matmul", "auto"))
    return {"quant_matmul": path, "emulated": path != INT_MM}


def _int8_check(case) -> list[str]:
    why = _int_mm_problem(case.device, case.head_dim, case.seq_len)
    return [why] if why and case.params.get("int_matmul") == "int_mm" else []


def _scores_working_set(case, extra_per_elem: int) -> float:
    """Bytes of one query chunk's scores (float32 + ``extra_per_elem``), plus quantised copies and the output."""
    B, H, Hkv, L, D = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    G = H // Hkv
    chunk = min(L, _chunk_rows(G, L, case.device))
    pv = {"input": case.element_bytes, "bfloat16": 2, "float16": 2}.get(case.params.get("pv_dtype"), 4)
    scores = G * chunk * L * (4 + extra_per_elem + pv)
    return scores + (B * H + 2 * B * Hkv) * L * D * (4 + 1) + B * H * L * D * case.element_bytes


@register_variant(
    "int8_qk",
    family="quantised",
    exact=False,
    flops=attention_flops,
    supports=_INFERENCE,
    params={
        "smooth": Param(True, help="subtract K's mean over the sequence before quantising (softmax-invariant)"),
        "block": Param(64, min=1, help="rows of Q and of K per int8 scale, per head"),
        "pv_dtype": Param("input", choices=("input", "bfloat16", "float16"), help="dtype of P and V in P·V"),
        "int_matmul": Param(
            "auto", choices=("auto", "int_mm", "emulated"), help="int8 QKᵀ: torch._int_mm, or its exact emulation"
        ),
    },
    check=_int8_check,
    columns=_int8_columns,
    working_set=lambda case: _scores_working_set(case, 4),
    description="SageAttention: K smoothed, Q/K int8 per block, int32 QKᵀ, float32 softmax, P·V in pv_dtype",
)
def int8_qk(q, k, v, *, causal, smooth=True, block=64, pv_dtype="input", int_matmul="auto"):
    qg, kg, vg = _grouped(q, k, v)
    if smooth:
        kg = kg.float() - kg.float().mean(dim=-2, keepdim=True)
    qi, sq = quantize_int8(qg, block)
    ki, sk = quantize_int8(kg, block)
    path = int_matmul_path(q.device.type, q.shape[-1], q.shape[-2], int_matmul)
    scores = _int8_scores(qi, sq * (_LOG2E / math.sqrt(q.shape[-1])), ki, sk, path)
    out = _chunked_attention(qg, vg, causal, scores, _PV_DTYPES.get(pv_dtype, q.dtype))
    return out.reshape(q.shape)


# ---------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", scaling: str = "tensor", block: int = 64):
    """x (..., L, D) -> (FP8 values, float32 scale): x ≈ values.float() · scale.

    ``scaling = "tensor"``: one scale (a 0-d tensor) for all of x; ``"block"``: one per block of
    ``block`` rows of each head, returned per row, shape (..., L, 1). scale = absmax / the format's
    largest finite value (448 for e4m3, 57344 for e5m2), so nothing overflows.
    """
    dtype = FP8_FORMATS[fmt]
    fmax = torch.finfo(dtype).max
    if scaling == "tensor":
        scale = (x.abs().amax().float() / fmax).clamp_min(torch.finfo(_F32).tiny)
    else:
        scale = _block_scales(x, block, fmax).unsqueeze(-1)
    return (x.float() / scale).clamp_(-fmax, fmax).to(dtype), scale


def _scaled_mm_problem(device_type: str, fmt: str, scaling: str, head_dim: int, seq_len: int) -> str | None:
    """Why ``torch._scaled_mm`` cannot do this case's QKᵀ, or None.

    CUDA: FP8 tensor cores (compute capability >= 8.9), e4m3 (no e5m2 × e5m2 GEMM), one scale per
    tensor (the row-wise recipe wants a bfloat16 output), head_dim and L multiples of 16. CPU
    (torch 2.13): any shape, both formats, tensor or per-row scales, results equal to the
    emulation's; no CPU has FP8 units, so it is software and is only run when asked for.
    """
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"torch._scaled_mm is not available on {device_type}"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return "torch._scaled_mm needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer)"
    if fmt != "e4m3":
        return "torch._scaled_mm on CUDA has no e5m2 × e5m2 GEMM"
    if scaling != "tensor":
        return "per-block FP8 scales run emulated on CUDA (torch._scaled_mm's row-wise recipe is not wired here)"
    if head_dim % 16 or seq_len % 16:
        return f"torch._scaled_mm needs head_dim and seq_len multiples of 16, not {head_dim} and {seq_len}"
    return None


def fp8_matmul_path(device_type: str, fmt: str, scaling: str, head_dim: int, seq_len: int, choice: str) -> str:
    """The FP8 QKᵀ a case runs: ``torch._scaled_mm`` (``auto``: on CUDA only) or the emulation (its label)."""
    why = _scaled_mm_problem(device_type, fmt, scaling, head_dim, seq_len)
    if choice == "scaled_mm" or (choice == "auto" and device_type == "cuda" and why is None):
        return SCALED_MM if device_type == "cuda" else SCALED_MM + " (CPU, software FP8)"
    return "emulated (FP8 values dequantised, float32 matmul)"


def _fp8_columns(case) -> dict:
    p = case.params
    path = fp8_matmul_path(case.device, p["format"], p["scaling"], case.head_dim, case.seq_len, p["fp8_matmul"])
    return {"quant_matmul": path, "emulated": path != SCALED_MM}


def _fp8_check(case) -> list[str]:
    p = case.params
    why = _scaled_mm_problem(case.device, p["format"], p["scaling"], case.head_dim, case.seq_len)
    return [why] if why and p.get("fp8_matmul") == "scaled_mm" else []


@register_variant(
    "fp8",
    family="quantised",
    exact=False,
    flops=attention_flops,
    supports=_INFERENCE,
    params={
        "format": Param("e4m3", choices=tuple(FP8_FORMATS), help="float8_e4m3fn or float8_e5m2"),
        "scaling": Param("tensor", choices=("tensor", "block"), help="one scale per tensor or per block of rows"),
        "block": Param(64, min=1, help="rows per scale when scaling = block"),
        "quantize_v": Param(True, help="quantise V too (else P·V uses V as given)"),
        "fp8_matmul": Param("auto", choices=("auto", "scaled_mm", "emulated"), help="QKᵀ through torch._scaled_mm"),
    },
    check=_fp8_check,
    columns=_fp8_columns,
    working_set=lambda case: _scores_working_set(case, 0),
    description="Q, K (V) cast to FP8 with per-tensor or per-block scales; torch._scaled_mm on FP8 GPUs, else emulated",
)
def fp8(q, k, v, *, causal, format="e4m3", scaling="tensor", block=64, quantize_v=True, fp8_matmul="auto"):
    qg, kg, vg = _grouped(q, k, v)
    N, G, L, D = qg.shape
    q8, sq = quantize_fp8(qg, format, scaling, block)
    k8, sk = quantize_fp8(kg, format, scaling, block)
    scale = _LOG2E / math.sqrt(D)  # base-2 scores
    if quantize_v:
        v8, sv = quantize_fp8(vg, format, scaling, block)
        vg = v8.float() * sv
    if fp8_matmul_path(q.device.type, format, scaling, D, L, fp8_matmul).startswith(SCALED_MM):
        rowwise = scaling == "block"  # per-row scales: (rows, 1) for Q, (1, keys) for K

        def scores(n, i0, i1, j1):
            rows = i1 - i0
            sa = sq[n, :, i0:i1].reshape(G * rows, 1) if rowwise else sq
            sb = sk[n, :j1].reshape(1, j1) if rowwise else sk
            a = q8[n, :, i0:i1].reshape(G * rows, D)
            s = torch._scaled_mm(a, k8[n, :j1].t(), scale_a=sa, scale_b=sb, out_dtype=_F32)
            return s.view(G, rows, j1).mul_(scale)

    else:
        qd, kd = q8.float() * sq, k8.float() * sk

        def scores(n, i0, i1, j1):
            return torch.matmul(qd[n, :, i0:i1], kd[n, :j1].t()).mul_(scale)

    return _chunked_attention(qg, vg, causal, scores, _F32).reshape(q.shape)


# ---------------------------------------------------------------------------
# KV-cache quantisation
# ---------------------------------------------------------------------------


class QuantizedKV(NamedTuple):
    """A quantised K or V: ``data`` int8 (..., D) for 8 bits or (..., D/2) for 4 bits (two values a
    byte, the even-indexed one in the low nibble); ``scale`` float32 (..., D/group)."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last axis even -> int8 (..., D/2): low nibble = even index, high = odd."""
    nib = values.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 (..., D/2) -> int8 values (..., D) in [-8, 7]."""
    b = packed.view(torch.uint8).to(torch.int16)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    return (nib - ((nib >= 8).to(torch.int16) << 4)).to(torch.int8)


def quantize_kv(x: torch.Tensor, bits: int = 8, group: int = 32) -> QuantizedKV:
    """Quantise x (..., D) symmetrically per ``group`` consecutive values of the last axis.

    scale = absmax of the group / qmax (127 for 8 bits, 7 for 4 bits); values = round(x / scale)
    in [-qmax, qmax], so |x - dequantize_kv(...)| ≤ scale / 2 elementwise. D must be a multiple
    of ``group`` (and ``group`` even for 4 bits). Per token and head: a decode step appends rows.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    D = x.shape[-1]
    if D % group or (bits == 4 and group % 2):
        raise ValueError(f"head_dim {D} must be a multiple of group {group} (an even group for 4 bits)")
    qmax = 127 if bits == 8 else 7
    groups = x.float().unflatten(-1, (D // group, group))
    scale = (groups.abs().amax(-1) / qmax).clamp_min(torch.finfo(_F32).tiny)
    values = torch.round(groups / scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8).flatten(-2)
    return QuantizedKV(values if bits == 8 else pack_int4(values), scale, bits, group)


def dequantize_kv(qkv: QuantizedKV, dtype: torch.dtype = _F32) -> torch.Tensor:
    """The (..., D) tensor a :class:`QuantizedKV` stands for, in ``dtype``."""
    values = qkv.data if qkv.bits == 8 else unpack_int4(qkv.data)
    groups = values.unflatten(-1, (-1, qkv.group)).float() * qkv.scale.unsqueeze(-1)
    return groups.flatten(-2).to(dtype)


def _kv_check(case) -> list[str]:
    g, D = case.params["group"], case.head_dim
    if D % g or (case.params["bits"] == 4 and g % 2):
        return [f"kv_quant needs head_dim ({D}) a multiple of group ({g}), and an even group for 4 bits"]
    return []


@register_variant(
    "kv_quant",
    family="quantised",
    exact=False,
    flops=attention_flops,
    supports=Supports(devices={"cpu", "cuda"}, backward=False, non_square=True),
    params={
        "bits": Param(8, choices=(8, 4), help="bits per K/V value (4: two values per byte)"),
        "group": Param(32, min=1, help="consecutive head-dim values per scale"),
    },
    check=_kv_check,
    columns=lambda case: {"quant_matmul": "K/V dequantised to the input dtype, then sdpa", "emulated": True},
    working_set=lambda case: 6 * case.batch * case.kv_heads * case.seq_len * case.head_dim * 4,
    description="K and V quantised to int8/int4 per group (KV cache), dequantised on the fly before SDPA",
)
def kv_quant(q, k, v, *, causal, bits=8, group=32):
    kd = dequantize_kv(quantize_kv(k, bits, group), q.dtype)
    vd = dequantize_kv(quantize_kv(v, bits, group), q.dtype)
    return F.scaled_dot_product_attention(q, kd, vd, enable_gqa=k.shape[1] != q.shape[1],
                                          **causal_sdpa_kwargs(q, kd, causal))
