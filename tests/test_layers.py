"""Attention layers (variants/layers.py, harness/engine/layerrun.py): closed-form parameter counts and
KV-cache bytes, MLA's absorbed decode against its expanded form, the textbook module against one head
of width d_model, and every layer through run_case against its own float64 copy."""

from __future__ import annotations

import math

import pytest
import torch

from harness import get_variant
from harness.core.cases import Case
from harness.core.flops import case_pairs
from harness.engine.layerrun import build_layer
from harness.measure.reference import reference_attention
from harness.measure.timing import TimingConfig
from tests.runs import measured
from variants import layers

FAST = TimingConfig(warmup=1, min_time_s=0.0, min_reps=2, max_reps=2)
H, D = 4, 16
d = H * D  # d_model 64
MLA_SMALL = {"kv_lora_rank": 32, "rope_dim": 8}


def case_of(name: str, params: dict | None = None, **axes) -> Case:
    variant = get_variant(name)
    full = {n: p.default for n, p in variant.params.items()} | (params or {})
    axes = {"batch": 2, "heads": H, "kv_heads": H, "head_dim": D, "seq_len": 37} | axes
    return Case(variant=name, params=full, **axes)


def module_of(case: Case, dtype=None):
    module = build_layer(case, get_variant(case.variant), seed=3)
    return module if dtype is None else module.to(dtype)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("name,kv_heads", [("mha", H), ("gqa", 2), ("gqa", 1), ("mqa", 1)])
def test_gqa_param_count_is_the_closed_form(name, kv_heads):
    case = case_of(name, kv_heads=kv_heads)
    want = 2 * d * d + 2 * d * (d // H) * kv_heads
    if name == "mha":
        assert want == 4 * d * d
    assert numel(module_of(case)) == want == layers.gqa_param_count(case)


@pytest.mark.parametrize("q_rank", [0, 24])
def test_mla_param_count_is_the_closed_form(q_rank):
    r, dr = MLA_SMALL["kv_lora_rank"], MLA_SMALL["rope_dim"]
    case = case_of("mla", MLA_SMALL | {"q_lora_rank": q_rank})
    q = d * H * (D + dr) if not q_rank else d * q_rank + q_rank + q_rank * H * (D + dr)
    want = q + d * (r + dr) + r + r * H * (D + D) + H * D * d
    assert numel(module_of(case)) == want == layers.MLA.params(case)


@pytest.mark.parametrize("fixed", [False, True])
def test_textbook_param_count_is_the_closed_form(fixed):
    case = case_of("textbook", {"fixed": fixed})
    assert numel(module_of(case)) == 3 * d * d + 3 * d == layers.textbook_param_count(case)


@pytest.mark.parametrize("dtype,e", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("name,params,kv_heads,elements", [
    ("mha", {}, H, 2 * H * D), ("gqa", {}, 2, 2 * 2 * D), ("mqa", {}, 1, 2 * D),
    ("mla", MLA_SMALL, H, 32 + 8), ("textbook", {}, H, 2 * d)])
def test_kv_cache_bytes_per_token_is_the_closed_form(name, params, kv_heads, elements, dtype, e):
    case = case_of(name, params, kv_heads=kv_heads, dtype=dtype)
    assert module_of(case).kv_cache_bytes_per_token(e) == elements * e
    row = measured(case, FAST, time_only=True)  # the column, from the variant's analytic side
    assert row["kv_cache_bytes_per_token"] == elements * e and row["d_model"] == d


def test_pairs_follow_the_harness_convention():
    # square causal counts L²/2 (the dense convention); non-square causal the real bottom-right pairs
    expected = {(None, False): 37 * 37, (None, True): 37 * 37 / 2, (5, True): 5 * 32 + 15, (1, True): 37,
                (5, False): 5 * 37}
    for (q_len, causal), want in expected.items():
        case = case_of("mha", q_len=q_len, seq_len=37, causal=causal)
        assert layers.pair_count(case.query_len, case.seq_len, causal) == case_pairs(case) == want


# ---------------------------------------------------------------------------------------------
# MLA: the absorbed form is the same function


@pytest.mark.parametrize("q_len,causal", [(1, True), (1, False), (6, True), (None, True), (None, False)])
@pytest.mark.parametrize("q_rank", [0, 24])
def test_mla_absorbed_equals_expanded_in_float64(q_len, causal, q_rank):
    case = case_of("mla", MLA_SMALL | {"q_lora_rank": q_rank}, q_len=q_len, causal=causal)
    module = module_of(case, torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, case.query_len, d, generator=gen, dtype=torch.float64)
    cache = None if q_len is None else module.make_cache(2, 37 - q_len, generator=gen, dtype=torch.float64,
                                                         device="cpu")
    outs = []
    for absorb in (True, False):
        module.absorb = absorb
        with torch.no_grad():
            outs.append(module(x, causal=causal, cache=cache))
        assert module.last_absorbed is absorb
    assert outs[0].shape == (2, case.query_len, d)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    assert outs[0].abs().mean() > 1e-3  # not a degenerate zero output


def test_mla_auto_absorbs_for_decoding_and_expands_for_prefill():
    dims = layers.MLADims(d_model=2048, heads=16, nope=128, v=128, rope=64, kv_rank=512)
    assert dims.absorbed("auto", 1, 1, 4096, True)
    assert not dims.absorbed("auto", 1, 2048, 2048, True)
    assert dims.absorbed(True, 1, 2048, 2048, True) and not dims.absorbed(False, 1, 1, 4096, True)


# ---------------------------------------------------------------------------------------------
# The textbook module is one head of width d_model; its fix is H heads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fixed", [False, True])
def test_textbook_is_single_head_attention_of_width_d_model(fixed, causal):
    case = case_of("textbook", {"fixed": fixed}, causal=causal)
    module = module_of(case, torch.float64)
    x = torch.randn(2, 37, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out = module(x, causal=causal)
        heads = H if fixed else 1
        projections = (module.query, module.key, module.value)
        q, k, v = (p(x).view(2, 37, heads, d // heads).transpose(1, 2) for p in projections)
        mask = (lambda b, h, i, j: j <= i) if causal else None
        want = reference_attention(q, k, v, mask).transpose(1, 2).reshape(2, 37, d)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    if fixed:  # the fix is a different function of the same weights, not the same one renamed
        with torch.no_grad():
            single = reference_attention(*(t.transpose(1, 2).reshape(2, 1, 37, d) for t in (q, k, v)), mask)
        assert (single.squeeze(1) - out).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Through the runner: each layer against its float64 copy


LAYERS = [("mha", {}, H), ("gqa", {}, 2), ("mqa", {}, 1), ("mla", MLA_SMALL, H),
          ("mla", MLA_SMALL | {"absorb": True, "q_lora_rank": 24}, H), ("textbook", {}, H),
          ("textbook", {"fixed": True}, H)]


@pytest.mark.parametrize("q_len", [None, 1, 7])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,params,kv_heads", LAYERS)
def test_layer_is_correct_through_run_case(name, params, kv_heads, causal, q_len):
    case = case_of(name, params, kv_heads=kv_heads, causal=causal, q_len=q_len)
    row = measured(case, FAST, seed=2)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 1e-5 and row["max_abs_err"] > 0  # float32 against float64: small, not zero
    assert row["param_count"] == numel(module_of(case))
    assert row["time_ms"] > 0 and row["peak_mem_bytes"] >= 0
    assert 0 < row["projection_flops"] < row["flops"]


def test_bfloat16_layer_is_checked_against_float64():
    row = measured(case_of("gqa", kv_heads=2, dtype="bfloat16", causal=True, q_len=3), FAST)
    assert row["status"] == "ok", row["reason"]
    assert 1e-5 < row["rel_err"] < 2e-2


def test_a_wrong_layer_is_incorrect(monkeypatch):
    forward = layers.GroupedQueryAttention.forward

    def wrong(self, x, **kw):  # the measured path is off by 1.5x; the dense reference path is not
        return forward(self, x, **kw) * (1.0 if self.dense else 1.5)

    monkeypatch.setattr(layers.GroupedQueryAttention, "forward", wrong)
    row = measured(case_of("gqa", kv_heads=2, causal=True, q_len=5), FAST)
    assert row["status"] == "incorrect"
    assert "output differs from the float64 reference" in row["reason"]
    assert row["rel_err"] == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("kernel,why", [
    ("nosuch", "unknown variant 'nosuch'"), ("linear", "is approximate"), ("sliding_window", "sparsity pattern"),
    ("gqa", "layer-level variant"), ("triton", "kernel triton: triton runs on cuda")])
def test_a_bad_kernel_skips_with_its_reason(kernel, why):
    row = measured(case_of("gqa", {"kernel": kernel}, kv_heads=2), FAST)
    assert row["status"] == "skipped" and why in row["reason"]


def test_shape_limits_skip_with_reasons():
    reasons = {name: measured(case, FAST) for name, case in [
        ("mqa", case_of("mqa", kv_heads=2)), ("mha", case_of("mha", kv_heads=2)),
        ("mla", case_of("mla", MLA_SMALL | {"kernel": "naive"})), ("bwd", case_of("mha", mode="fwd_bwd"))]}
    assert all(r["status"] == "skipped" for r in reasons.values())
    assert "needs kv_heads = 1" in reasons["mqa"]["reason"]
    assert "grouped-query" in reasons["mha"]["reason"]
    assert "kernel must be 'sdpa'" in reasons["mla"]["reason"]
    assert "no backward" in reasons["bwd"]["reason"]


@pytest.mark.parametrize("name,params,kv_heads", LAYERS)
def test_analytic_flops_match_flop_counter_on_prefill(name, params, kv_heads):
    row = measured(case_of(name, params, kv_heads=kv_heads), FAST)
    assert row["flops_counted_ratio"] == pytest.approx(1.0, rel=1e-9), row["flops_counted_note"]


def test_weights_are_reproducible_and_leave_the_global_rng_alone():
    case = case_of("mla", MLA_SMALL)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = module_of(case), module_of(case)
    assert torch.rand(1) == before
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not math.isclose(float(next(a.parameters()).detach().abs().sum()), 0.0)


# ---------------------------------------------------------------------------------------------
# The static cache (variants.kvcache): written in place, equal to appending by copy


@pytest.mark.parametrize("name,params,kv_heads", [("gqa", {}, 2), ("mla", MLA_SMALL, H), ("textbook", {}, H)])
@pytest.mark.parametrize("q_len", [1, 5])
def test_static_cache_equals_a_copied_cache_and_repeats(name, params, kv_heads, q_len):
    from variants import kvcache

    case = case_of(name, params, kv_heads=kv_heads, q_len=q_len, causal=True)
    module = module_of(case, torch.float64)

    def cache_and_x(room):
        gen = torch.Generator().manual_seed(9)
        cache = module.make_cache(2, 37 - q_len, generator=gen, dtype=torch.float64, device="cpu", room=room)
        return cache, torch.randn(2, q_len, d, generator=gen, dtype=torch.float64)

    (plain, x), (static, _) = cache_and_x(0), cache_and_x(q_len)
    assert (isinstance(static, kvcache.StaticKV) and static.past == 37 - q_len
            and not isinstance(plain, kvcache.StaticKV))
    with torch.no_grad():
        want = module(x, causal=True, cache=plain)
        first, again = module(x, causal=True, cache=static), module(x, causal=True, cache=static)
    torch.testing.assert_close(first, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # the same slots rewritten: one step each call
    assert want.abs().mean() > 1e-3


def test_static_cache_refuses_more_tokens_than_its_room():
    from variants import kvcache

    cache = kvcache.preallocate([torch.randn(1, 2, 5, 4)], room=1, dim=2)
    with pytest.raises(ValueError, match="cannot take 2 new ones"):
        kvcache.append(cache, 0, torch.randn(1, 2, 2, 4), 2)
