"""Dense exact attention: the textbook formula and PyTorch's fused SDPA kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness import Param, register_variant
from variants.common import group_queries, scale_of, ungroup


def _dense_working_set(case) -> float:
    """Score and probability matrices plus the causal mask: the naive variant's peak."""
    scores = case.batch * case.heads * case.seq_len**2 * case.element_bytes
    mask = case.seq_len**2 if case.causal else 0
    return 2 * scores + mask


@register_variant(
    "naive",
    family="dense",
    exact=True,
    working_set=_dense_working_set,
    description="QKᵀ → softmax → ·V, materialising the full L×L score matrix",
)
def naive(q, k, v, *, causal):
    B, H, L, D = q.shape
    qg = group_queries(q * scale_of(q), k.shape[1])  # (B, Hkv, G, L, D)
    scores = qg @ k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, L, L)
    if causal:
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return ungroup(probs @ v.unsqueeze(2))


SDPA_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")
_CUDA_ONLY = {"efficient": "memory-efficient (xformers) kernel", "cudnn": "cuDNN kernel"}


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


def _sdpa_check(case) -> list[str]:
    backend = case.params.get("backend", "auto")
    if case.device == "cpu" and backend in _CUDA_ONLY:
        return [f"sdpa backend {backend!r} ({_CUDA_ONLY[backend]}) runs only on CUDA"]
    if case.device == "cuda":
        if backend in ("flash", "cudnn") and case.dtype == "float32":
            return [f"sdpa backend {backend!r} on CUDA needs float16 or bfloat16, not float32"]
        if backend == "flash" and case.head_dim > 256:
            return ["sdpa flash on CUDA supports head_dim <= 256"]
        if backend == "cudnn" and case.head_dim > 128:
            return ["sdpa cudnn supports head_dim <= 128"]
    return []


def _sdpa_working_set(case) -> float:
    if case.params.get("backend") in ("math",):
        return _dense_working_set(case)
    return 4 * case.batch * case.heads * case.seq_len * case.head_dim * case.element_bytes


@register_variant(
    "sdpa",
    family="dense",
    exact=True,
    baseline=True,
    params={"backend": Param("auto", choices=SDPA_BACKENDS, help="kernel forced through sdpa_kernel")},
    check=_sdpa_check,
    working_set=_sdpa_working_set,
    description="torch.nn.functional.scaled_dot_product_attention, backend forced by sdpa_kernel",
)
def sdpa(q, k, v, *, causal, backend="auto"):
    gqa = k.shape[1] != q.shape[1]
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
