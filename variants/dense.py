"""Dense exact attention: the textbook formula and PyTorch's fused SDPA kernels.

Attention features (:mod:`variants.features`): ``naive`` takes all of them (the readable reference:
scores, softcap, ALiBi, the mask, a softmax whose denominator holds the sink, P·V); ``sdpa`` takes
what ``scaled_dot_product_attention`` can be given, a boolean mask (window, prefix-LM, documents) or a
float one (ALiBi as an additive bias, -inf where masked), built once per shape and reused as a model
builds it once for all its layers; softcap and sinks act between QKᵀ and the softmax's sum, where
SDPA has no hook. A float mask can move SDPA to another backend: ``sdpa_backend_used`` says which ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness import Param, Supports, register_variant
from variants import features as feat
from variants.common import causal_sdpa_kwargs, group_queries, scale_of, ungroup


def _dense_working_set(case) -> float:
    """Score and probability matrices plus the causal mask: the naive variant's peak."""
    scores = case.batch * case.heads * case.query_len * case.seq_len * case.element_bytes
    mask = case.query_len * case.seq_len if case.causal else 0
    return 2 * scores + mask


def _naive_features(q, k, v, causal, softcap=None, alibi_slopes=None, sinks=None, **masks):
    """``naive`` with attention features, step by step (harness.core.features gives the order)."""
    L, Hkv, Lk = q.shape[2], k.shape[1], k.shape[2]
    G = q.shape[1] // Hkv
    scores = group_queries(q * scale_of(q), Hkv) @ k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, L, Lk)
    pos, j = feat.positions(L, Lk, q.device), torch.arange(Lk, device=q.device).view(1, -1)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.view(1, Hkv, G, 1, 1).to(scores.dtype) * (pos - j).abs().to(scores.dtype)
    keep = feat.visible(pos, j, causal, **masks)  # (L, Lk) or None
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # the sink's logit joins each row's softmax, its column then dropped
        sink = sinks.view(1, Hkv, G, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :Lk]
    if keep is not None:  # a row that sees no key (a window over more queries than keys) gives 0
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return ungroup(probs @ v.unsqueeze(2))


@register_variant(
    "naive",
    family="dense",
    exact=True,
    supports=Supports(non_square=True, **feat.ALL),
    working_set=_dense_working_set,
    description="QKᵀ → softmax → ·V, materialising the full L×L score matrix",
)
def naive(q, k, v, *, causal, **features):
    if features:
        return _naive_features(q, k, v, causal, **features)
    B, H, L, D = q.shape
    Lk = k.shape[2]
    qg = group_queries(q * scale_of(q), k.shape[1])  # (B, Hkv, G, L, D)
    scores = qg @ k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, L, Lk)
    if causal:  # bottom-right aligned: query i sees keys j <= Lk - L + i
        future = torch.ones(L, Lk, dtype=torch.bool, device=q.device).triu_(1 + Lk - L)
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
    if backend == "efficient" and case.kv_heads != case.heads:
        # torch's memory-efficient kernel takes no enable_gqa: forced alone, SDPA finds no kernel
        return ["sdpa backend 'efficient' does not support grouped-query inputs (kv_heads < heads): "
                "'No available kernel'"]
    if backend == "flash" and case.value_dim != case.head_dim:
        return ["sdpa backend 'flash' needs v of q's head size (PyTorch's flash kernels), not v_head_dim "
                f"{case.value_dim} with head_dim {case.head_dim}"]
    if case.softcap or case.sinks:
        return ["scaled_dot_product_attention has no hook between QKᵀ and the softmax's sum, where a softcap "
                "(tanh of each score) and sinks (a logit in each denominator) act; naive, tiled and flex take them"]
    if case.device == "cuda":
        if backend in ("flash", "cudnn") and case.dtype == "float32":
            return [f"sdpa backend {backend!r} on CUDA needs float16 or bfloat16, not float32"]
        if backend == "flash" and case.head_dim > 256:
            return ["sdpa flash on CUDA supports head_dim <= 256"]
        if backend == "cudnn" and case.head_dim > 128:
            return ["sdpa cudnn supports head_dim <= 128"]
    return []


def _sdpa_math_working_set(case) -> float:
    """The math backend's peak beyond its inputs: it computes in float32 for half-precision inputs
    (q, k, v are upcast), so the score and probability matrices are float32 L×L per head; causal
    adds a boolean and a float L×L mask (shared by batch and heads), grouped-query the repeated
    K and V. (On the CPU the profiler measures 2.50 L×L float32 matrices per head for bfloat16 at
    L=512, D=32, B=1, H=4, inputs and output included; this gives 2.56.)"""
    acc = 4 if case.dtype in ("float16", "bfloat16") else case.element_bytes
    rows = case.batch * case.heads * case.query_len
    scores = 2 * rows * case.seq_len * acc
    mask = case.query_len * case.seq_len * (1 + acc) if case.causal else 0
    vectors = (7 if acc != case.element_bytes else 2) * rows * case.head_dim * acc  # upcasts, scaled q, output
    repeated = 2 * rows * case.head_dim * acc if case.kv_heads != case.heads else 0
    return scores + mask + vectors + repeated


def _sdpa_working_set(case) -> float:
    if case.params.get("backend") == "math":
        return _sdpa_math_working_set(case)
    return 4 * case.batch * case.heads * case.seq_len * case.head_dim * case.element_bytes


#: SDPA's backend numbers (``torch.nn.attention.SDPBackend``) and the names ``backend`` uses.
_BACKEND_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def sdpa_backend_used(q, k, v, causal: bool, attn_mask=None) -> str | None:
    """The backend ``scaled_dot_product_attention`` dispatches these inputs to with no backend
    forced (``torch._fused_sdp_choice``: the dispatcher's own decision); None when unknown."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    try:
        return _BACKEND_NAMES.get(int(choose(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                             enable_gqa=k.shape[1] != q.shape[1])))
    except Exception:
        return None


def _sdpa_columns(case) -> dict:
    """``sdpa_backend_used``: the forced backend, or for ``auto`` the one SDPA picks for the case's
    shapes, dtype, device and mode (probed on uninitialised tensors of the case's shapes)."""
    backend = case.params.get("backend", "auto")
    if backend != "auto":
        return {"sdpa_backend_used": backend}
    if case.device == "cuda" and not torch.cuda.is_available():
        return {"sdpa_backend_used": None}
    try:
        dtype = getattr(torch, case.dtype)
        grad = case.mode != "fwd"
        q = torch.empty(case.batch, case.heads, case.query_len, case.head_dim, dtype=dtype, device=case.device,
                        requires_grad=grad)
        k, v = (torch.empty(case.batch, case.kv_heads, case.seq_len, d, dtype=dtype, device=case.device,
                            requires_grad=grad) for d in (case.head_dim, case.value_dim))
        mask = _probe_mask(case, dtype)
    except Exception:
        return {"sdpa_backend_used": None}
    return {"sdpa_backend_used": sdpa_backend_used(q, k, v, case.causal, mask)}


def _probe_mask(case, dtype):
    """An uninitialised mask of the kind the case's features give SDPA (None: the plain causal flag)."""
    from harness.core import features as core_features

    Lq, Lk = case.query_len, case.seq_len
    if case.alibi:
        return torch.empty(1, case.heads, Lq, Lk, dtype=dtype, device=case.device)
    if core_features.masked(case) or (case.causal and Lq not in (1, Lk)):
        return torch.empty(Lq, Lk, dtype=torch.bool, device=case.device)
    return None


_MASKS: dict = {}


def _feature_mask(q, k, causal, alibi_slopes=None, **masks) -> dict:
    """``attn_mask`` of the case's features: boolean (Lq, Lk) for masks alone, float (1, H, Lq, Lk) with
    ALiBi (the bias, -inf where masked); built once per shape and features and kept (two at most)."""
    Lq, Lk = q.shape[2], k.shape[2]
    held = tuple(masks.get(n) for n in feat.MASK_KWARGS[:2]), masks.get("document_ids"), alibi_slopes
    key = (Lq, Lk, bool(causal), q.dtype, str(q.device), held[0], id(held[1]), id(held[2]))
    hit = _MASKS.get(key)
    if hit is not None:
        return {"attn_mask": hit[0]}
    pos, j = feat.positions(Lq, Lk, q.device), torch.arange(Lk, device=q.device).view(1, -1)
    keep = feat.visible(pos, j, causal, **masks)
    if alibi_slopes is None:
        if keep is None:
            return causal_sdpa_kwargs(q, k, causal)
        mask = keep
    else:
        mask = -(alibi_slopes.view(-1, 1, 1).float() * (pos - j).abs())
        mask = (mask if keep is None else mask.masked_fill(~keep, float("-inf"))).to(q.dtype).unsqueeze(0)
    if len(_MASKS) >= 2:
        _MASKS.clear()
    _MASKS[key] = (mask, held)  # the tensors named by id stay alive with it
    return {"attn_mask": mask}


@register_variant(
    "sdpa",
    family="dense",
    exact=True,
    baseline=True,
    supports=Supports(non_square=True, alibi=True, v_head_dim=True, sliding_window=True, prefix_lm=True,
                      document=True),
    params={"backend": Param("auto", choices=SDPA_BACKENDS, help="kernel forced through sdpa_kernel")},
    check=_sdpa_check,
    working_set=_sdpa_working_set,
    columns=_sdpa_columns,
    description="torch.nn.functional.scaled_dot_product_attention, backend forced by sdpa_kernel",
)
def sdpa(q, k, v, *, causal, backend="auto", **features):
    gqa = k.shape[1] != q.shape[1]
    # bottom-right causal when q_len != kv_len; the features' boolean or float mask
    mask = _feature_mask(q, k, causal, **features) if features else causal_sdpa_kwargs(q, k, causal)
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **mask)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **mask)
