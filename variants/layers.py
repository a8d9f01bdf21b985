"""Attention LAYERS (family "layer", level "layer"): whole attention modules, projections included,
measured on hidden states (B, L, d_model) by harness.engine.layerrun.

Each registered function is a factory ``fn(*, d_model, heads, kv_heads, head_dim, causal, **params)
-> nn.Module`` (and ``model=NAME`` when the case names a catalogue model, harness.models; float32, CPU,
PyTorch's default init; the harness seeds torch before calling it and moves the module to the case's
device and dtype). Every module has ``forward(x, *, causal,
cache=None) -> (B, Lq, d_model)``, ``make_cache(batch, past_len, *, generator, dtype, device, room=0)``
(``past_len`` earlier tokens' cache; ``room``: preallocated for as many new ones, :mod:`variants.kvcache`) and
``kv_cache_bytes_per_token(element_bytes)``; ``dense = True`` replaces its attention kernel by plain
softmax math (the harness's float64 reference and its same-dtype baseline). Causal masking with a
cache is aligned to the bottom right, as everywhere in this repository.

Closed forms (d = d_model = H·D, or the hidden size of the catalogue model a case names with ``model``
(harness.models: Gemma 2 and gpt-oss have d ≠ H·D, and then q and o are d·H·D each); H heads of width D,
g key/value heads, e bytes per element of the cache dtype = the case's dtype):

* ``mha`` / ``gqa`` / ``mqa`` (one class; Llama-style, no biases, **no RoPE**: position-free):
  params = 2·d² + 2·d·D·g (MHA, g = H: 4·d²; MQA, g = 1: 2·d² + 2·d·D);
  KV cache = 2·g·D·e bytes per token per layer. Attention by the ``kernel`` param (a registered
  exact kernel-level variant, default ``sdpa``).
* ``mla`` (DeepSeek-V2 multi-head latent attention; nope dim dn = v dim dv = D, decoupled RoPE dim
  dr = ``rope_dim``, latent r = ``kv_lora_rank``, rq = ``q_lora_rank``): params =
  [rq = 0] d·H(dn+dr)  or  [rq > 0] d·rq + rq + rq·H(dn+dr)  (q, with its RMSNorm)
  + d·(r+dr) + r (joint KV down-projection incl. the shared RoPE key, latent RMSNorm)
  + r·H(dn+dv) + H·dv·d (KV up-projection, output); KV cache = (r + dr)·e bytes per token per layer.
  ``absorb``: false attends with per-head keys and values expanded from the latent; true attends in
  the latent space (W_uk absorbed into the query, W_uv applied after P·c_kv: one latent key/value
  "head" of width r + dr shared by all heads); "auto" takes the path with fewer FLOPs (absorbed for
  decoding, expanded for prefill).
* ``textbook``: 3·d² + 3·d in both forms (query, key, value with biases; no output projection);
  KV cache 2·d·e bytes per token per layer.

FLOPs (``flops=``, forward only: these layers declare no backward): 2·tokens·in·out per projection
matrix (tokens = B·Lq; keys and values of cached tokens are already projected, except MLA's
expanded path, which up-projects the whole latent cache), plus B·H·pairs·(2·d_qk + 2·d_v) for the
attended (query, key) pairs (square causal counts L²/2, as harness.core.flops does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness import Param, RegistryError, Supports, attention_flops, get_variant, models, pair_count, register_variant
from variants import kvcache


def _attend(q, k, v, *, causal: bool, scale: float, dense: bool, fold: int = 1):
    """softmax(q·kᵀ·scale)·v, bottom-right causal; k and v may have fewer heads than q (grouped).
    ``fold``: q's rows are ``fold`` blocks of the same positions (heads folded into rows).
    ``dense``: plain math in the inputs' dtype, else PyTorch's fused SDPA."""
    lq, lk, keep = q.shape[2] // fold, k.shape[2], None
    if causal and not (lq == lk and fold == 1 and not dense):
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq).repeat(fold, 1)
    if not dense:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal and keep is None,
                                              scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _split(t, heads: int):
    """(B, L, heads·w) -> (B, heads, L, w)."""
    B, L, _ = t.shape
    return t.view(B, L, heads, -1).transpose(1, 2)


def _merge(t):
    """(B, heads, L, w) -> (B, L, heads·w)."""
    B, H, L, w = t.shape
    return t.transpose(1, 2).reshape(B, L, H * w)


def _past_states(batch, past_len, d_model, *, generator, dtype, device):
    """Hidden states of ``past_len`` earlier tokens (unit Gaussian, drawn on the CPU from ``generator``)."""
    return torch.randn(batch, past_len, d_model, generator=generator).to(device=device, dtype=dtype)


def _rope(x, start: int):
    """Rotary embedding (rotate-half, base 10000, no parameters) of ``x`` (..., L, dr) at positions start…"""
    dr, L = x.shape[-1], x.shape[-2]
    inv = 1.0 / 10000 ** (torch.arange(0, dr, 2, dtype=torch.float64, device=x.device) / dr)
    angles = torch.arange(start, start + L, dtype=torch.float64, device=x.device)[:, None] * inv
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(x.dtype) for f in (torch.cos, torch.sin))
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], -1) * sin


def _kernel_defaults(kernel) -> dict:
    return {name: p.default for name, p in kernel.params.items()}


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with ``kv_heads`` key/value heads (mha: all, mqa: 1), no biases, no RoPE."""

    dense = False

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, kernel: str = "sdpa"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.kernel = heads, kv_heads, head_dim, kernel
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)

    def _kv(self, x):
        return _split(self.k_proj(x), self.kv_heads), _split(self.v_proj(x), self.kv_heads)

    def forward(self, x, *, causal: bool, cache=None):
        q = _split(self.q_proj(x), self.heads)
        k, v = self._kv(x)
        if cache is not None:
            k, v = kvcache.append(cache, 0, k, 2), kvcache.append(cache, 1, v, 2)
        if self.dense:
            o = _attend(q, k, v, causal=causal, scale=self.head_dim ** -0.5, dense=True)
        else:
            kernel = get_variant(self.kernel)
            o = kernel(q, k, v, causal=causal, **_kernel_defaults(kernel))
        return self.o_proj(_merge(o))

    def make_cache(self, batch, past_len, *, generator, dtype, device, room=0):
        """(K, V), each (B, kv_heads, past_len, D), projected from random past hidden states; with
        ``room``, preallocated for that many more tokens (variants.kvcache.StaticKV)."""
        x = _past_states(batch, past_len, self.q_proj.in_features, generator=generator, dtype=dtype, device=device)
        with torch.no_grad():
            return kvcache.with_room(self._kv(x), room, 2)

    def kv_cache_bytes_per_token(self, element_bytes: int) -> int:
        return 2 * self.kv_heads * self.head_dim * element_bytes


@dataclasses.dataclass(frozen=True)
class MLADims:
    """The dimensions of an MLA layer, and its closed forms."""

    d_model: int
    heads: int
    nope: int
    v: int
    rope: int
    kv_rank: int
    q_rank: int = 0

    @classmethod
    def of(cls, case) -> MLADims:
        """A case's MLA layer: nope = v = head_dim, or the widths of the MLA model the case names."""
        p, mla = case.params, models.mla_dims(case)
        nope, v = (mla.qk_nope_head_dim, mla.v_head_dim) if mla else (case.head_dim, case.head_dim)
        return cls(models.d_model(case), case.heads, nope, v, p["rope_dim"], p["kv_lora_rank"], p["q_lora_rank"])

    def param_count(self) -> int:
        d, H, qk, r = self.d_model, self.heads, self.nope + self.rope, self.kv_rank
        q = d * H * qk if not self.q_rank else d * self.q_rank + self.q_rank + self.q_rank * H * qk
        return q + d * (r + self.rope) + r + r * H * (self.nope + self.v) + H * self.v * d

    def flops(self, batch: int, q_len: int, kv_len: int, causal: bool, absorbed: bool) -> tuple[float, float]:
        """(projection FLOPs, attention FLOPs) of one forward call on one path."""
        d, H, r, dr, T = self.d_model, self.heads, self.kv_rank, self.rope, batch * q_len
        qk = self.nope + dr
        q = 2 * T * d * H * qk if not self.q_rank else 2 * T * self.q_rank * (d + H * qk)
        proj = q + 2 * T * d * (r + dr) + 2 * T * H * self.v * d  # q, KV down-projection, output
        pairs = batch * H * pair_count(q_len, kv_len, causal)
        if absorbed:  # q_nope·W_uk and o_latent·W_uv per new token; scores and P·c_kv in the latent space
            return proj + 2 * T * H * r * (self.nope + self.v), pairs * (2 * (r + dr) + 2 * r)
        return proj + 2 * batch * kv_len * r * H * (self.nope + self.v), pairs * (2 * qk + 2 * self.v)

    def absorbed(self, absorb, batch: int, q_len: int, kv_len: int, causal: bool) -> bool:
        if absorb != "auto":
            return bool(absorb)
        cost = [sum(self.flops(batch, q_len, kv_len, causal, path)) for path in (True, False)]
        return cost[0] < cost[1]


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA: a low-rank joint KV latent (cached) plus a decoupled RoPE key shared by the heads."""

    dense = False

    def __init__(self, dims: MLADims, absorb="auto"):
        super().__init__()
        self.dims, self.absorb = dims, absorb
        d, H, qk, r = dims.d_model, dims.heads, dims.nope + dims.rope, dims.kv_rank
        if dims.q_rank:
            self.q_down = nn.Linear(d, dims.q_rank, bias=False)
            self.q_norm = nn.RMSNorm(dims.q_rank, eps=1e-6)
            self.q_up = nn.Linear(dims.q_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * qk, bias=False)
        self.kv_down = nn.Linear(d, r + dims.rope, bias=False)
        self.kv_norm = nn.RMSNorm(r, eps=1e-6)
        self.kv_up = nn.Linear(r, H * (dims.nope + dims.v), bias=False)
        self.o_proj = nn.Linear(H * dims.v, d, bias=False)
        self.last_absorbed: bool | None = None

    def _latent(self, x, start: int):
        """The cached part of new tokens: normalised latent (B, L, r) and roped shared key (B, L, dr)."""
        c, k_rope = self.kv_down(x).split([self.dims.kv_rank, self.dims.rope], -1)
        return self.kv_norm(c), _rope(k_rope, start)

    def forward(self, x, *, causal: bool, cache=None):
        dims = self.dims
        B, Lq, _ = x.shape
        past = kvcache.past_len(cache, 1)
        q = self.q_up(self.q_norm(self.q_down(x))) if dims.q_rank else self.q_proj(x)
        q_nope, q_rope = _split(q, dims.heads).split([dims.nope, dims.rope], -1)
        q_rope = _rope(q_rope, past)
        c, k_rope = self._latent(x, past)
        if cache is not None:
            c, k_rope = kvcache.append(cache, 0, c, 1), kvcache.append(cache, 1, k_rope, 1)
        scale = (dims.nope + dims.rope) ** -0.5
        self.last_absorbed = dims.absorbed(self.absorb, B, Lq, c.shape[1], causal)
        w_uk, w_uv = self.kv_up.weight.view(dims.heads, dims.nope + dims.v, dims.kv_rank).split([dims.nope, dims.v], 1)
        if self.last_absorbed:  # attend in the latent space: heads folded into query rows, one latent K/V head
            q_lat = torch.einsum("bhld,hdr->bhlr", q_nope, w_uk)
            ql = torch.cat([q_lat, q_rope], -1).reshape(B, 1, dims.heads * Lq, -1)
            kl = torch.cat([c, k_rope], -1).unsqueeze(1)
            o_lat = _attend(ql, kl, c.unsqueeze(1), causal=causal, scale=scale, dense=self.dense, fold=dims.heads)
            o = torch.einsum("bhlr,hdr->bhld", o_lat.view(B, dims.heads, Lq, dims.kv_rank), w_uv)
        else:  # expand the latent into per-head keys and values
            k_nope, v = _split(self.kv_up(c), dims.heads).split([dims.nope, dims.v], -1)
            k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, dims.heads, -1, -1)], -1)
            o = _attend(torch.cat([q_nope, q_rope], -1), k, v, causal=causal, scale=scale, dense=self.dense)
        return self.o_proj(_merge(o))

    def make_cache(self, batch, past_len, *, generator, dtype, device, room=0):
        """(c_kv (B, past_len, kv_lora_rank), k_rope (B, past_len, rope_dim)) of random past hidden states."""
        x = _past_states(batch, past_len, self.dims.d_model, generator=generator, dtype=dtype, device=device)
        with torch.no_grad():
            return kvcache.with_room(self._latent(x, 0), room, 1)

    def kv_cache_bytes_per_token(self, element_bytes: int) -> int:
        return (self.dims.kv_rank + self.dims.rope) * element_bytes


class TextbookSelfAttention(nn.Module):
    """The single-class self-attention of countless tutorials, copied as usually written::

        class SelfAttention(nn.Module):
            def __init__(self, embed_dim):
                super().__init__()
                self.query = nn.Linear(embed_dim, embed_dim)
                self.key = nn.Linear(embed_dim, embed_dim)
                self.value = nn.Linear(embed_dim, embed_dim)

            def forward(self, x):
                Q, K, V = self.query(x), self.key(x), self.value(x)
                scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(x.size(-1))
                return torch.matmul(torch.softmax(scores, dim=-1), V)

    ONE head of width d_model whatever n_heads says (no output projection, biases on). Added here:
    the causal mask when asked, and a cache. ``fixed = True``: the corrected form, the same weights
    split into ``heads`` heads scaled by 1/sqrt(head_dim) (still no output projection, so the two
    differ only in the head split)."""

    dense = False  # already plain math

    def __init__(self, d_model: int, heads: int, fixed: bool = False):
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.heads = heads if fixed else 1

    def forward(self, x, *, causal: bool, cache=None):
        Q, K, V = self.query(x), self.key(x), self.value(x)
        if cache is not None:
            K, V = kvcache.append(cache, 0, K, 1), kvcache.append(cache, 1, V, 1)
        Q, K, V = (_split(t, self.heads) for t in (Q, K, V))
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(Q.size(-1))
        if causal:
            lq, lk = scores.shape[-2:]
            future = torch.ones(lq, lk, dtype=torch.bool, device=x.device).triu(1 + lk - lq)
            scores = scores.masked_fill(future, float("-inf"))
        return _merge(torch.matmul(torch.softmax(scores, dim=-1), V))

    def make_cache(self, batch, past_len, *, generator, dtype, device, room=0):
        """(K, V), each (B, past_len, d_model)."""
        x = _past_states(batch, past_len, self.query.in_features, generator=generator, dtype=dtype, device=device)
        with torch.no_grad():
            return kvcache.with_room((self.key(x), self.value(x)), room, 1)

    def kv_cache_bytes_per_token(self, element_bytes: int) -> int:
        return 2 * self.query.in_features * element_bytes


# ---------------------------------------------------------------------------------------------
# What each layer says of a case without running it: closed forms, FLOPs, checks


def _d(case) -> int:
    """d_model: heads · head_dim, or the hidden size of the model the case names (harness.models)."""
    return models.d_model(case)


def gqa_param_count(case) -> int:
    """q and o: d·H·D each; k and v: d·g·D each (d = H·D: 2·d² + 2·d·D·g)."""
    return 2 * _d(case) * case.heads * case.head_dim + 2 * _d(case) * case.head_dim * case.kv_heads


def textbook_param_count(case) -> int:
    return 3 * _d(case) ** 2 + 3 * _d(case)


def _gqa_parts(case) -> tuple[float, float]:
    T, d = case.batch * case.query_len, _d(case)
    return 4 * T * d * case.heads * case.head_dim + 4 * T * d * case.head_dim * case.kv_heads, attention_flops(case)


def _textbook_parts(case) -> tuple[float, float]:
    T, d = case.batch * case.query_len, _d(case)
    return 6 * T * d * d, 4 * case.batch * d * pair_count(case.query_len, case.seq_len, case.causal)


def _mla_parts(case) -> tuple[float, float]:
    dims = MLADims.of(case)
    absorbed = dims.absorbed(case.params["absorb"], case.batch, case.query_len, case.seq_len, case.causal)
    return dims.flops(case.batch, case.query_len, case.seq_len, case.causal, absorbed)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer's analytic side: (projection, attention) FLOPs, closed-form params, KV elements per token."""

    parts: Callable[..., tuple[float, float]]
    params: Callable[..., int]
    kv_elements: Callable[..., int]

    def flops(self, case) -> float:
        return float(sum(self.parts(case)))

    def columns(self, case) -> dict:
        """The layer columns, and the roofline's bytes of a layer: weights, x, output, and the KV cache read."""
        e = case.element_bytes
        kv = float(case.batch * case.seq_len * self.kv_elements(case) * e)
        nbytes = float(self.params(case) * e + 2 * case.batch * case.query_len * _d(case) * e) + kv
        return {"d_model": _d(case), "kv_cache_bytes_per_token": float(self.kv_elements(case) * e),
                "projection_flops": float(self.parts(case)[0]), "kv_bytes": kv, "min_bytes": nbytes}

    def working_set(self, case) -> float:
        """Weights, the cache (twice: a plain tuple cache is copied on append), activations, a score matrix."""
        e, B, lq, lk = case.element_bytes, case.batch, case.query_len, case.seq_len
        expanded = B * lk * 2 * _d(case)  # keys and values of the whole context (MLA's expanded path)
        return float(e * (self.params(case) + 2 * B * lk * self.kv_elements(case) + 8 * B * lq * _d(case)
                          + expanded + B * case.heads * lq * lk))


GQA = LayerSpec(_gqa_parts, gqa_param_count, lambda c: 2 * c.kv_heads * c.head_dim)
MLA = LayerSpec(_mla_parts, lambda c: MLADims.of(c).param_count(),
                lambda c: c.params["kv_lora_rank"] + c.params["rope_dim"])
TEXTBOOK = LayerSpec(_textbook_parts, textbook_param_count, lambda c: 2 * _d(c))


def _common_reasons(case) -> list[str]:
    return [f"layers draw their hidden states from a unit Gaussian; inputs = {case.inputs} does not apply"
            ] if case.inputs != "gaussian" else []


def kernel_reasons(case) -> list[str]:
    """Why the ``kernel`` param cannot serve this layer case: unknown, not an exact dense kernel-level
    variant, or that kernel's own reasons for the inner attention case (same shape, dtype, device)."""
    name = case.params.get("kernel", "sdpa")
    try:
        kernel = get_variant(name)
    except RegistryError as exc:
        return [f"kernel: {exc}"]
    if kernel.level != "kernel":
        return [f"kernel {name!r} is a {kernel.level}-level variant; a layer calls a kernel-level one"]
    if not kernel.exact or kernel.mask is not None:
        what = "approximate" if not kernel.exact else "exact only on its own sparsity pattern"
        return [f"kernel {name!r} is {what}; a layer's kernel must compute exact dense attention"]
    inner = dataclasses.replace(case, variant=name, params=_kernel_defaults(kernel), mode="fwd")
    return [f"kernel {name}: {r}" for r in kernel.not_supported_reasons(inner)]


def _gqa_check(case) -> list[str]:
    reasons = _common_reasons(case)
    if case.variant == "mqa" and case.kv_heads != 1:
        reasons.append(f"mqa has one key/value head: needs kv_heads = 1, not {case.kv_heads} (use gqa)")
    if case.kv_heads < 1 or case.heads % case.kv_heads:
        reasons.append(f"kv_heads={case.kv_heads} must divide heads={case.heads}")
    return reasons + kernel_reasons(case)


def _mla_check(case) -> list[str]:
    reasons = _common_reasons(case)
    mla = models.mla_dims(case)
    want = {"kv_lora_rank": mla.kv_lora_rank, "rope_dim": mla.qk_rope_head_dim, "q_lora_rank": mla.q_lora_rank} \
        if mla else {}
    v_dim = getattr(case, "v_head_dim", None)
    if v_dim is not None and (mla is None or v_dim != mla.v_head_dim):
        reasons.append(f"mla's value width is head_dim, or the v_head_dim of the MLA model the case names "
                       f"(model = deepseek-v3: 128), not v_head_dim {v_dim}")
    if any(case.params[k] != v for k, v in want.items()):
        reasons.append(f"model {case.model} has {', '.join(f'{k} = {v}' for k, v in want.items())}; the case sets "
                       f"{', '.join(f'{k} = {case.params[k]}' for k in want)}")
    if case.params["kernel"] != "sdpa":
        reasons.append(f"mla attends with keys and values of different widths (and in latent space when absorbed) "
                       f"through torch's SDPA: kernel must be 'sdpa', not {case.params['kernel']!r}")
    if case.params["rope_dim"] % 2:
        reasons.append(f"mla rope_dim must be even (rotary pairs), not {case.params['rope_dim']}")
    return reasons


_LAYER = dict(family="layer", level="layer", exact=True)
_SUPPORTS = dict(non_square=True, backward=False)
_KERNEL = Param("sdpa", help="the registered exact kernel-level variant the layer attends with (bench list)")


def make_gqa(*, d_model, heads, kv_heads, head_dim, causal=False, kernel="sdpa", model=None):
    return GroupedQueryAttention(d_model, heads, kv_heads, head_dim, kernel=kernel)


for _name, _what, _gqa in (("mha", "multi-head attention layer (kv_heads = heads)", False),
                           ("gqa", "grouped-query attention layer (kv_heads divides heads)", True),
                           ("mqa", "multi-query attention layer (one key/value head)", True)):
    register_variant(_name, **_LAYER, flops=GQA.flops, columns=GQA.columns, working_set=GQA.working_set,
                     supports=Supports(gqa=_gqa, **_SUPPORTS), params={"kernel": _KERNEL}, check=_gqa_check,
                     description=f"{_what}: q, k, v, o projections, no biases or RoPE; attention by `kernel`")(make_gqa)


@register_variant(
    "mla", **_LAYER, flops=MLA.flops, columns=MLA.columns, working_set=MLA.working_set,
    supports=Supports(gqa=False, v_head_dim=True, **_SUPPORTS), check=_mla_check,
    params={"kv_lora_rank": Param(512, min=1, help="latent (cached) width r"),
            "rope_dim": Param(64, min=2, help="decoupled RoPE key/query width (shared key, cached)"),
            "q_lora_rank": Param(0, min=0, help="query down-projection rank (0: full-rank query projection)"),
            "absorb": Param("auto", choices=(True, False, "auto"),
                            help="attend in the latent space (W_uk/W_uv absorbed); auto: the path with fewer FLOPs"),
            "kernel": Param("sdpa", help="mla attends through torch's SDPA directly: only 'sdpa' runs")},
    description="DeepSeek-V2 multi-head latent attention: cached low-rank KV latent + decoupled RoPE key",
)
def make_mla(*, d_model, heads, kv_heads, head_dim, causal=False, kv_lora_rank=512, rope_dim=64, q_lora_rank=0,
             absorb="auto", kernel="sdpa", model=None):
    mla = models.mla_dims({"model": model})  # an MLA model of the catalogue: its own nope and value widths
    nope, v = (mla.qk_nope_head_dim, mla.v_head_dim) if mla else (head_dim, head_dim)
    return MultiHeadLatentAttention(MLADims(d_model, heads, nope, v, rope_dim, kv_lora_rank, q_lora_rank),
                                    absorb=absorb)


@register_variant(
    "textbook", **_LAYER, flops=TEXTBOOK.flops, columns=TEXTBOOK.columns, working_set=TEXTBOOK.working_set,
    supports=Supports(gqa=False, **_SUPPORTS), check=_common_reasons,
    params={"fixed": Param(False, help="false: the tutorial's one head of width d_model; true: split into heads")},
    description="the tutorial SelfAttention (one head of width d_model) beside its multi-head fix",
)
def make_textbook(*, d_model, heads, kv_heads, head_dim, causal=False, fixed=False, model=None):
    return TextbookSelfAttention(d_model, heads, fixed=fixed)
