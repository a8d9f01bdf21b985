"""A catalogue of real attention geometries: the models people run, as data, each citing its source.

Every entry holds the fields of the model's published ``config.json`` that shape its attention, under
the names and with the values the file gives (``config``), the address of that file (``source``), and
what the file does not say but the model's code does (``notes``: gpt-oss's per-head attention sinks,
for instance). The geometry a case uses is *derived* from those cited fields by one function
(:func:`geometry`), so the catalogue's numbers are the published ones and nothing else; a test holds
the same numbers typed independently.

Geometry (:class:`Geometry`): query heads, key/value heads, the query/key head width ``head_dim`` and
the value head width ``v_head_dim``, ``d_model`` (hidden size), layers, the longest context
(``max_position_embeddings``), and the attention features: a logit soft-cap, a sliding window and
which layers use it, attention sinks, biases of the projections, and MLA's latent dimensions.

How a case uses an entry (``model = "llama-3.1-8b"`` in a suite, :mod:`harness.core.cases`): the
model fills ``heads``, ``kv_heads`` and ``head_dim`` (:func:`case_geometry`); an attention layer
(``variants/layers.py``) takes its ``d_model`` from the entry (:func:`d_model`) and an MLA layer its
latent dimensions (:func:`mla_dims`). Features are recorded here even where no case field carries
them yet (:func:`unapplied_features` says which a case leaves out).

Pure Python, no torch: the suite validator and the command line read it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from harness.core.errors import UserError


class ModelError(UserError):
    """An unknown model name (one line, with the closest names)."""


@dataclass(frozen=True)
class MLA:
    """DeepSeek multi-head latent attention: the cached latent (``kv_lora_rank``) and shared RoPE key
    (``qk_rope_head_dim``), the per-head non-RoPE query/key width and the value width, the query rank."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int


@dataclass(frozen=True)
class Geometry:
    """What a model's attention looks like, derived from its cited config (see :func:`geometry`)."""

    heads: int
    kv_heads: int
    head_dim: int  # query/key width per head (MLA: nope + rope)
    v_head_dim: int
    d_model: int
    layers: int
    max_context: int
    softcap: float | None = None  # tanh soft-cap of the attention logits
    window: int | None = None  # sliding window (keys before the query, itself included)
    window_layers: str = ""  # "all", or which layers use the window ("even": 0, 2, 4 …)
    sinks: bool = False  # a learned per-head sink logit in the softmax's denominator
    attention_bias: str = ""  # which projections carry biases ("" none, "qkv", "qkvo")
    mla: MLA | None = None


@dataclass(frozen=True)
class Model:
    """One catalogue entry: its name here, its Hugging Face id, the published config.json it cites,
    the fields of that file that shape its attention, and what the file does not say."""

    name: str
    hf_id: str
    source: str
    config: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    #: facts the config does not state, each explained in ``notes``: ``window_layers`` ("even": layers
    #: 0, 2, … slide), ``sinks`` (True), ``attention_bias`` ("qkv", "qkvo") where the config has no field
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: how attention layers of this model are built here: (layer variant, its parameters)
    layers: tuple[tuple[str, Mapping[str, Any]], ...] = field(default=())

    @property
    def geometry(self) -> Geometry:
        return geometry(self.config, self.extra)

    @property
    def family(self) -> str:
        """mla, mqa, mha or gqa."""
        g = self.geometry
        return "mla" if g.mla else "mqa" if g.kv_heads == 1 else "mha" if g.kv_heads == g.heads else "gqa"


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


def _frozen(d: dict) -> Mapping[str, Any]:
    return MappingProxyType(d)


_GQA = (("gqa", _frozen({"kernel": "sdpa"})),)

#: The catalogue, in the order ``bench run --model`` lists it. ``config`` holds the published values.
CATALOGUE: tuple[Model, ...] = (
    Model("llama-3.1-8b", "meta-llama/Llama-3.1-8B", _hf("meta-llama/Llama-3.1-8B"), _frozen({
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "max_position_embeddings": 131072, "attention_bias": False, "rope_theta": 500000.0}),
        notes=("head_dim is hidden_size / num_attention_heads = 128 (the file gives no head_dim)",), layers=_GQA),
    Model("llama-3.1-70b", "meta-llama/Llama-3.1-70B", _hf("meta-llama/Llama-3.1-70B"), _frozen({
        "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
        "max_position_embeddings": 131072, "attention_bias": False, "rope_theta": 500000.0}),
        notes=("head_dim is hidden_size / num_attention_heads = 128",), layers=_GQA),
    Model("mistral-7b", "mistralai/Mistral-7B-v0.1", _hf("mistralai/Mistral-7B-v0.1"), _frozen({
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0}),
        notes=("v0.1: every layer attends a 4096-token sliding window (v0.2 and later set sliding_window null)",),
        layers=_GQA),
    Model("qwen2.5-7b", "Qwen/Qwen2.5-7B", _hf("Qwen/Qwen2.5-7B"), _frozen({
        "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
        "max_position_embeddings": 131072, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 28, "rope_theta": 1000000.0}),
        notes=("use_sliding_window is false: every layer attends the whole context",
               "q_proj, k_proj and v_proj carry biases (Qwen2Attention; the config has no attention_bias field)"),
        extra=_frozen({"attention_bias": "qkv"}), layers=_GQA),
    Model("gemma-2-9b", "google/gemma-2-9b", _hf("google/gemma-2-9b"), _frozen({
        "hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "num_hidden_layers": 42, "max_position_embeddings": 8192, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256,
        "attention_bias": False}),
        notes=("layers alternate: even layers (0, 2, ...) attend a 4096-token sliding window, odd ones the whole "
               "context (Gemma2DecoderLayer: is_sliding = not layer_idx % 2)",
               "the attention logits are soft-capped: 50 * tanh(s / 50)",
               "d_model (3584) differs from heads * head_dim (4096)"),
        extra=_frozen({"window_layers": "even"}), layers=_GQA),
    Model("deepseek-v3", "deepseek-ai/DeepSeek-V3", _hf("deepseek-ai/DeepSeek-V3"), _frozen({
        "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 61,
        "max_position_embeddings": 163840, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128}),
        notes=("multi-head latent attention: the cache holds kv_lora_rank + qk_rope_head_dim = 576 values per "
               "token and layer; prefill attends with 128 heads of 192 (query/key) and 128 (value), decoding "
               "absorbed into the latent space with one 576-wide key head and 512-wide values",),
        layers=(("mla", _frozen({"kv_lora_rank": 512, "rope_dim": 64, "q_lora_rank": 1536})),)),
    Model("gpt-oss-20b", "openai/gpt-oss-20b", _hf("openai/gpt-oss-20b"), _frozen({
        "hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_hidden_layers": 24, "max_position_embeddings": 131072, "sliding_window": 128,
        "layer_types": ("sliding_attention", "full_attention") * 12, "attention_bias": True}),
        notes=("layers alternate (layer_types): even layers attend a 128-token sliding window, odd ones the whole "
               "context",
               "every head has a learned sink logit added to the softmax's denominator (GptOssAttention.sinks, "
               "one per attention head; not a config field)",
               "d_model (2880) differs from heads * head_dim (4096)"),
        extra=_frozen({"sinks": True}), layers=_GQA),
    Model("gpt2", "openai-community/gpt2", _hf("openai-community/gpt2"), _frozen({
        "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024}),
        notes=("multi-head attention; c_attn and c_proj carry biases (3 * 768 + 768 parameters, not built here)",),
        extra=_frozen({"attention_bias": "qkvo"}),
        layers=(("mha", _frozen({"kernel": "sdpa"})), ("textbook", _frozen({"fixed": True})))),
)

BY_NAME: Mapping[str, Model] = MappingProxyType({m.name: m for m in CATALOGUE})
NAMES: tuple[str, ...] = tuple(BY_NAME)


def _first(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def geometry(config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Geometry:
    """The attention geometry a published config gives (Llama/Mistral/Qwen/Gemma/gpt-oss/DeepSeek names,
    or GPT-2's ``n_*`` names), with ``extra`` facts the config does not state (:attr:`Model.extra`);
    head_dim defaults to hidden_size / heads, as transformers does."""
    extra = extra or {}
    d = _first(config, "hidden_size", "n_embd")
    heads = _first(config, "num_attention_heads", "n_head")
    kv = _first(config, "num_key_value_heads", default=heads)
    mla = None
    if "kv_lora_rank" in config:
        mla = MLA(config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"],
                  config["v_head_dim"], config.get("q_lora_rank") or 0)
        head_dim, v_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
    else:
        head_dim = _first(config, "head_dim", default=d // heads)
        v_dim = head_dim
    window, window_layers = None, ""
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        window = int(config["sliding_window"])
        types = config.get("layer_types") or []
        alternating = list(types[:2]) == ["sliding_attention", "full_attention"]
        window_layers = "even" if alternating else extra.get("window_layers", "all")
    bias = "qkvo" if config.get("attention_bias") else extra.get("attention_bias", "")
    return Geometry(heads=heads, kv_heads=kv, head_dim=head_dim, v_head_dim=v_dim, d_model=d,
                    layers=_first(config, "num_hidden_layers", "n_layer"),
                    max_context=_first(config, "max_position_embeddings", "n_positions"),
                    softcap=config.get("attn_logit_softcapping"), window=window, window_layers=window_layers,
                    sinks=bool(extra.get("sinks")), attention_bias=bias, mla=mla)


def get(name: str) -> Model:
    """The catalogue entry ``name``; ModelError naming the closest ones otherwise."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), NAMES, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; the catalogue: {', '.join(NAMES)}") from None


def case_geometry(name: str) -> dict[str, int]:
    """The case fields a model fills: its query heads, key/value heads and query/key head width."""
    g = get(name).geometry
    return dict(heads=g.heads, kv_heads=g.kv_heads, head_dim=g.head_dim)


def _model_of(case) -> Model | None:
    name = case.get("model") if isinstance(case, Mapping) else getattr(case, "model", None)
    return BY_NAME.get(name) if isinstance(name, str) else None


def d_model(case) -> int:
    """The hidden size an attention layer of ``case`` works on: the model's when the case names one,
    else ``heads · head_dim``."""
    model = _model_of(case)
    if model is not None:
        return model.geometry.d_model
    if isinstance(case, Mapping):
        return int(case["heads"]) * int(case["head_dim"])
    return int(case.heads) * int(case.head_dim)


def mla_dims(case) -> MLA | None:
    """The latent dimensions of the MLA model ``case`` names (None: it names none, or not an MLA one)."""
    model = _model_of(case)
    return model.geometry.mla if model is not None else None


# -- closed forms ---------------------------------------------------------------------------------


def attention_params(model: Model | str, biases: bool = False) -> int:
    """Parameters of one attention layer of the model: its projections (with ``biases`` where the model
    has them). GQA: d·H·D (q) + 2·d·g·D (k, v) + H·D·d (o). MLA: the query path (d·r_q + r_q + r_q·H·(D_nope
    + D_rope), with its RMSNorm), the joint KV down-projection d·(r + D_rope) with its RMSNorm r, the
    up-projection r·H·(D_nope + D_v) and the output H·D_v·d."""
    g = (get(model) if isinstance(model, str) else model).geometry
    d, H, D, kv = g.d_model, g.heads, g.head_dim, g.kv_heads
    if g.mla:
        m = g.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = d * H * qk if not m.q_lora_rank else d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * qk
        return (q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
                + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * d)
    n = d * H * D + 2 * d * kv * D + H * g.v_head_dim * d
    if biases and g.attention_bias:
        n += H * D + 2 * kv * D + (d if "o" in g.attention_bias else 0)
    return n


def kv_bytes_per_token(model: Model | str, element_bytes: int = 2, layers: int | None = None) -> int:
    """KV-cache bytes one token adds over ``layers`` layers (default: all of the model's), in a dtype of
    ``element_bytes``: 2·g·D per layer, MLA (kv_lora_rank + qk_rope_head_dim) per layer. Sliding-window
    layers are counted in full (a cache that keeps only the window holds less past the window)."""
    g = (get(model) if isinstance(model, str) else model).geometry
    per = (g.mla.kv_lora_rank + g.mla.qk_rope_head_dim) if g.mla else g.kv_heads * (g.head_dim + g.v_head_dim)
    return per * element_bytes * (g.layers if layers is None else layers)


# -- features a case does not carry ---------------------------------------------------------------


def features(model: Model | str) -> dict[str, Any]:
    """The model's attention features beside its shape, named as the case fields that carry them:
    ``softcap``, ``sliding_window`` (with ``window_layers``; in the case's terms, the keys *before* the
    query: a config's ``sliding_window`` W counts the query itself, transformers' ``kv_idx > q_idx − W``,
    so W − 1),
    ``sinks``, ``v_head_dim`` where it differs from head_dim, ``attention_bias``."""
    g = (get(model) if isinstance(model, str) else model).geometry
    out: dict[str, Any] = {}
    if g.softcap is not None:
        out["softcap"] = g.softcap
    if g.window is not None:
        out["sliding_window"] = g.window - 1
        out["window_layers"] = g.window_layers
    if g.sinks:
        out["sinks"] = True
    if g.v_head_dim != g.head_dim:
        out["v_head_dim"] = g.v_head_dim
    if g.attention_bias:
        out["attention_bias"] = g.attention_bias
    return out


def case_features(model: Model | str) -> dict[str, Any]:
    """The features a case field of the same name can carry for every layer of the model: the soft-cap,
    sinks, the value width, and the window when *every* layer slides (alternating models slide on half
    their layers: a case names one layer's attention, so sweep ``sliding_window`` yourself for those)."""
    out = features(model)
    if out.get("window_layers") != "all":
        out.pop("sliding_window", None)
    out.pop("window_layers", None)
    out.pop("attention_bias", None)
    return out


def unapplied_features(model: Model | str, case_fields: tuple[str, ...] | frozenset = ()) -> dict[str, Any]:
    """The model's features its cases leave out: those no case field of ``case_fields`` carries, the
    window of an alternating model, which layers slide, and the projections' biases."""
    carried = {k for k in case_features(model) if k in case_fields}
    out = {k: v for k, v in features(model).items() if k not in carried}
    if "sliding_window" in carried:  # every layer slides: nothing left to say of which
        out.pop("window_layers", None)
    return out


def describe(model: Model | str) -> str:
    """One line: ``llama-3.1-8b: 32 heads / 8 KV heads × 128, d_model 4096, 32 layers, 131072 tokens``."""
    m = get(model) if isinstance(model, str) else model
    g = m.geometry
    width = f"{g.head_dim}" if g.v_head_dim == g.head_dim else f"{g.head_dim} (values {g.v_head_dim})"
    extra = ", ".join(f"{k} {v}" for k, v in features(m).items() if k not in ("v_head_dim", "sliding_window"))
    if g.window is not None:
        extra = f"window {g.window} tokens ({'every layer' if g.window_layers == 'all' else 'even layers'})" + \
            (f", {extra}" if extra else "")
    extra = extra.replace(", window_layers all", "").replace(", window_layers even", "")
    return (f"{m.name}: {g.heads} heads / {g.kv_heads} KV heads × {width}, d_model {g.d_model}, {g.layers} layers, "
            f"context {g.max_context}" + (f"; {extra}" if extra else "") + f" ({m.source})")
