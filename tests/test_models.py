"""The catalogue of real model geometries (harness.core.models): each entry against its cited published
config.json values (held here, typed independently), the layers built from an entry against closed forms,
and how a case and a suite use an entry."""

from __future__ import annotations

import pytest
import torch

from harness import get_variant, models
from harness.core.cases import AXES, Case
from harness.engine.suite import SuiteError, expand_cases, parse_suite
from tests.runs import measured

#: The published config.json values (https://huggingface.co/<hf_id>/blob/main/config.json), and the
#: geometry they give: heads, kv_heads, head_dim, v_head_dim, d_model, layers, max_context.
PUBLISHED = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", {"hidden_size": 4096, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 32, "max_position_embeddings": 131072},
                     (32, 8, 128, 128, 4096, 32, 131072)),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", {"hidden_size": 8192, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "num_hidden_layers": 80, "max_position_embeddings": 131072},
                      (64, 8, 128, 128, 8192, 80, 131072)),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", {"hidden_size": 4096, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "num_hidden_layers": 32, "max_position_embeddings": 32768,
                   "sliding_window": 4096}, (32, 8, 128, 128, 4096, 32, 32768)),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "num_hidden_layers": 28, "max_position_embeddings": 131072, "use_sliding_window": False},
                   (28, 4, 128, 128, 3584, 28, 131072)),
    "gemma-2-9b": ("google/gemma-2-9b", {"hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 256, "num_hidden_layers": 42, "max_position_embeddings": 8192, "sliding_window": 4096,
                   "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 256},
                   (16, 8, 256, 256, 3584, 42, 8192)),
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3", {"hidden_size": 7168, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "num_hidden_layers": 61, "max_position_embeddings": 163840,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128}, (128, 128, 192, 128, 7168, 61, 163840)),
    "gpt-oss-20b": ("openai/gpt-oss-20b", {"hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "head_dim": 64, "num_hidden_layers": 24, "max_position_embeddings": 131072, "sliding_window": 128,
                    "attention_bias": True}, (64, 8, 64, 64, 2880, 24, 131072)),
    "gpt2": ("openai-community/gpt2", {"n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024},
             (12, 12, 64, 64, 768, 12, 1024)),
}

#: Features: softcap, window, window_layers, sinks.
FEATURES = {
    "mistral-7b": (None, 4096, "all", False), "gemma-2-9b": (50.0, 4096, "even", False),
    "gpt-oss-20b": (None, 128, "even", True), "qwen2.5-7b": (None, None, "", False),
    "llama-3.1-8b": (None, None, "", False), "deepseek-v3": (None, None, "", False),
}

#: Attention parameters of one layer (projections, biases left out) and KV-cache bytes per token of the
#: whole model in bfloat16, worked out by hand from the published values.
CLOSED = {
    "llama-3.1-8b": (2 * 4096 * 4096 + 2 * 4096 * 8 * 128, 2 * 8 * 128 * 2 * 32),  # 41,943,040; 128 KiB
    "llama-3.1-70b": (2 * 8192 * 8192 + 2 * 8192 * 8 * 128, 2 * 8 * 128 * 2 * 80),
    "mistral-7b": (2 * 4096 * 4096 + 2 * 4096 * 8 * 128, 2 * 8 * 128 * 2 * 32),
    "qwen2.5-7b": (2 * 3584 * 3584 + 2 * 3584 * 4 * 128, 2 * 4 * 128 * 2 * 28),
    "gemma-2-9b": (2 * 3584 * 16 * 256 + 2 * 3584 * 8 * 256, 2 * 8 * 256 * 2 * 42),
    "gpt-oss-20b": (2 * 2880 * 64 * 64 + 2 * 2880 * 8 * 64, 2 * 8 * 64 * 2 * 24),
    "gpt2": (4 * 768 * 768, 2 * 768 * 2 * 12),
    # MLA: q 7168·1536 + 1536 + 1536·128·192; kv_a 7168·576 + 512; kv_b 512·128·256; o 128·128·7168
    "deepseek-v3": (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168,
                    576 * 2 * 61),
}


def test_the_catalogue_holds_every_model_the_issue_names():
    assert set(models.NAMES) == set(PUBLISHED)
    for m in models.CATALOGUE:
        assert m.source == f"https://huggingface.co/{m.hf_id}/blob/main/config.json"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_entry_cites_its_published_values_and_derives_its_geometry_from_them(name):
    hf_id, cited, (heads, kv, hd, vd, d, layers, ctx) = PUBLISHED[name]
    m = models.get(name)
    assert m.hf_id == hf_id
    assert {k: m.config[k] for k in cited} == cited  # the config.json field names and values, as published
    g = m.geometry
    assert (g.heads, g.kv_heads, g.head_dim, g.v_head_dim, g.d_model, g.layers, g.max_context) == \
        (heads, kv, hd, vd, d, layers, ctx)
    if name in FEATURES:
        assert (g.softcap, g.window, g.window_layers, g.sinks) == FEATURES[name]


def test_mla_dimensions_come_from_the_config():
    mla = models.get("deepseek-v3").geometry.mla
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim, mla.v_head_dim, mla.q_lora_rank) == \
        (512, 64, 128, 128, 1536)
    assert models.get("deepseek-v3").family == "mla" and models.get("gpt2").family == "mha"


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_closed_forms_of_an_entry(name):
    params, kv_bytes = CLOSED[name]
    assert models.attention_params(name) == params
    assert models.kv_bytes_per_token(name, element_bytes=2) == kv_bytes
    assert models.attention_params("gpt2", biases=True) == 4 * 768 * 768 + 4 * 768
    assert models.attention_params("qwen2.5-7b", biases=True) == CLOSED["qwen2.5-7b"][0] + (28 + 2 * 4) * 128


def _layer_case(name: str, variant: str, params: dict) -> Case:
    """The layer case of an entry's geometry (its features left out: the closed forms do not depend on them,
    and the layers take none)."""
    full = {n: p.default for n, p in get_variant(variant).params.items()}
    return Case(variant, {**full, **params}, model=name, causal=True, **models.case_geometry(name))


@pytest.mark.parametrize("name,variant,params", [(m.name, v, dict(p)) for m in models.CATALOGUE for v, p in m.layers])
def test_layers_built_from_an_entry_match_the_closed_forms(name, variant, params):
    """Parameters counted from the module (built on the meta device: no memory) and its KV bytes per token
    against the closed forms of the entry, and what the layer's row will say."""
    case = _layer_case(name, variant, params)
    v = get_variant(variant)
    assert v.not_supported_reasons(case) == []
    with torch.device("meta"):
        module = v.fn(d_model=models.d_model(case), heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
                      causal=True, **case.params, model=name)
    count = sum(p.numel() for p in module.parameters())
    cols = v.columns(case)
    assert cols["d_model"] == models.get(name).geometry.d_model
    if variant == "textbook":
        d = models.get(name).geometry.d_model
        assert count == 3 * d * d + 3 * d
        return
    assert count == CLOSED[name][0]
    per_layer = CLOSED[name][1] // models.get(name).geometry.layers
    assert module.kv_cache_bytes_per_token(2) == per_layer
    assert cols["kv_cache_bytes_per_token"] == per_layer * case.element_bytes / 2


def test_a_layer_of_a_model_whose_width_is_not_heads_times_head_dim_runs_correctly():
    """gpt-oss-20b: d_model 2880, 64 heads of 64 (4096): its gqa layer decodes correctly, and its row says
    the model's width and parameters."""
    from harness.core.config import TimingConfig

    case = Case("gqa", {"kernel": "sdpa"}, model="gpt-oss-20b", q_len=1, seq_len=24, causal=True,
                **models.case_geometry("gpt-oss-20b"))  # its sinks left out: the layers take no features
    row = measured(case, TimingConfig(warmup=0, min_time_s=0, min_reps=1, max_reps=1, processes=1))
    assert row["status"] == "ok", row["reason"]
    assert row["d_model"] == 2880 and row["param_count"] == CLOSED["gpt-oss-20b"][0]
    assert row["rel_err"] < 1e-5


def test_a_model_fills_the_geometry_and_names_the_case():
    suite = parse_suite('[defaults]\nq_len = 1\n[sweep]\nkv_len = [64]\nmodel = ["llama-3.1-8b", "gpt2"]\n'
                        '[[variant]]\nname = "sdpa"\n')
    a, b = expand_cases(suite)
    assert (a.heads, a.kv_heads, a.head_dim, a.model) == (32, 8, 128, "llama-3.1-8b")
    assert (b.heads, b.kv_heads, b.head_dim) == (12, 12, 64)
    assert a.label().endswith("llama-3.1-8b") and "H32/8" in a.label() and "D128" in a.label()
    assert Case.from_row({**a.values(), "params": a.params_json, "case_id": a.case_id}) == a
    assert Case("sdpa").case_id == Case.from_point("sdpa", {}, {}).case_id  # no model: ids unchanged


@pytest.mark.parametrize("text,words", [
    ('model = "llama-3.1-8b"\nheads = 4', "model fills heads, kv_heads and head_dim"),
    ('model = "llama3"', "unknown model 'llama3'"),
])
def test_a_model_beside_the_keys_it_fills_is_one_line(text, words):
    with pytest.raises(SuiteError) as info:
        parse_suite(f"[defaults]\n{text}\n[[variant]]\nname = \"sdpa\"\n")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_features_a_case_field_carries_are_filled_and_the_rest_reported():
    """A feature whose case field exists is filled where every layer has it (and the field holds its default);
    a window on alternate layers, and biases, are reported as left out, never applied."""
    assert models.case_features("gemma-2-9b") == {"softcap": 50.0}  # its window slides on even layers only
    assert models.case_features("mistral-7b") == {"sliding_window": 4095}  # HF's 4096 counts the query itself
    assert models.case_features("gpt-oss-20b") == {"sinks": True}
    assert models.case_features("deepseek-v3") == {"v_head_dim": 128}
    assert models.unapplied_features("gemma-2-9b", frozenset(AXES)) == {"sliding_window": 4095, "window_layers": "even"}
    assert models.unapplied_features("mistral-7b", frozenset(AXES)) == {}
    assert models.unapplied_features("gpt-oss-20b", frozenset(AXES)) == {
        "sliding_window": 127, "window_layers": "even", "attention_bias": "qkvo"}

    def fill(name, **point):
        return Case.from_point("naive", {}, {"model": name, "q_len": 1, "kv_len": 64, "causal": True, **point})

    assert fill("gemma-2-9b").softcap == 50.0 and fill("gemma-2-9b").sliding_window is None
    assert fill("gemma-2-9b", softcap=30.0).softcap == 30.0  # a value the suite sets wins
    assert fill("mistral-7b").sliding_window == 4095 and fill("gpt-oss-20b").sinks is True
    deepseek = fill("deepseek-v3")
    assert (deepseek.head_dim, deepseek.v_head_dim) == (192, 128) and "Dv128" in deepseek.label()
    assert fill("llama-3.1-8b").features == {}
    with pytest.raises(models.ModelError, match="did you mean"):
        models.get("gemma-2-9")
