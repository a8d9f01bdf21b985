"""Every variant that declares an attention feature, against the float64 reference.

Forward for all, backward where the variant has one (naive, tiled, sdpa); decode shapes and paged
caches for the inference variants; flex compiled (a few cases: each compiles); the Triton kernel
under Triton's interpreter in a child process; the peer adapters through fake libraries that
compute the documented semantics of softcap, alibi_slopes, window_size and logits_soft_cap; and,
end to end, a plugin that wraps FlexAttention with attention-gym-style score_mods registered
through ``score_mod=`` under ``bench run``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness import get_variant
from harness.core.cases import Case
from harness.measure.inputs import dense_kv, layout_inputs, make_grad, make_qkv
from harness.measure.reference import TOLERANCE, errors, reference_attention, reference_grads

ROOT = Path(__file__).resolve().parents[1]
ONE_BY_ONE = [dict(softcap=4.0), dict(alibi=True), dict(sinks=True), dict(v_head_dim=8), dict(sliding_window=5),
              dict(prefix_lm=7), dict(document=3)]
ALL = dict(softcap=4.0, alibi=True, sinks=True, v_head_dim=24, sliding_window=6, document=2)


def feature_errors(case: Case, seed: int = 0, grads: bool = False) -> list[float]:
    """(max abs, rel) of the output against the float64 reference, then the gradients' rel errors."""
    variant = get_variant(case.variant)
    assert variant.not_supported_reasons(case) == [], variant.not_supported_reasons(case)
    q, k, v = make_qkv(case, seed)
    k, v, extra = layout_inputs(case, k, v, seed)
    fn = variant.with_inputs(extra)
    mask, mods = variant.reference_mask(case), dict(score_mod=variant.reference_score_mod(case),
                                                    sinks=extra.get("sinks"))
    with torch.no_grad():
        out = fn(q, k, v, causal=case.causal, **case.params)
    assert out.shape == (*q.shape[:-1], case.value_dim) and torch.isfinite(out).all()
    result = list(errors(out, reference_attention(q, *dense_kv(case, k, v, extra), mask, **mods)))
    if grads:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, causal=case.causal, **case.params)
        g = make_grad(out)
        got = torch.autograd.grad(out, leaves, g)
        result += [errors(a, b)[1] for a, b in zip(got, reference_grads(q, k, v, mask, g, **mods))]
    return result


def _case(name: str, params=None, **axes) -> Case:
    full = {n: p.default for n, p in get_variant(name).params.items()}
    full.update(params or {})
    return Case(name, full, **{"batch": 2, "heads": 4, "kv_heads": 2, "seq_len": 37, "head_dim": 16, **axes})


def _assert_exact(errs: list[float], dtype: str = "float32") -> None:
    tol_abs, tol_rel = TOLERANCE[dtype]
    assert errs[0] <= tol_abs and errs[1] <= tol_rel, errs
    assert all(e <= 5 * tol_rel for e in errs[2:]), errs  # gradients


@pytest.mark.parametrize("features", ONE_BY_ONE + [ALL], ids=lambda f: ",".join(f))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,params", [("naive", {}), ("tiled", {"block_q": 16, "block_k": 8}),
                                         ("sdpa", {"backend": "auto"})], ids=["naive", "tiled", "sdpa"])
def test_prefill_variants_forward_and_backward(name, params, features, causal):
    if features.get("prefix_lm") and not causal:
        pytest.skip("prefix-LM is a causal mask")
    case = _case(name, params, causal=causal, **features)
    variant = get_variant(name)
    if not all(getattr(variant.supports, f) for f in features):  # sdpa: softcap and sinks
        assert any("does not take" in r for r in variant.not_supported_reasons(case))
        return
    _assert_exact(feature_errors(case, grads=True))


@pytest.mark.parametrize("features", [dict(softcap=4.0, alibi=True, sinks=True, sliding_window=9, document=2),
                                      dict(prefix_lm=7, v_head_dim=24)], ids=["mods", "prefix,dv"])
def test_tiled_in_bfloat16_and_on_decode_shapes(features):
    _assert_exact(feature_errors(_case("tiled", {"block_q": 16, "block_k": 8}, causal=True, dtype="bfloat16",
                                       **features)), "bfloat16")
    for name in ("naive", "tiled"):
        _assert_exact(feature_errors(_case(name, {"block_q": 2, "block_k": 8} if name == "tiled" else {},
                                           causal=True, q_len=5, **features), grads=True))


DECODE_SHAPES = {
    "split_k": ("decode_split_k", {"splits": 3}, dict(q_len=3)),
    "split_k_varlen": ("decode_split_k", {"splits": 3}, dict(q_len=2, lengths="uniform", batch=3)),
    "paged_gather": ("paged", {"path": "gather"}, dict(q_len=3, kv_layout="paged", page_size=8)),
    "paged_pages_varlen": ("paged", {"path": "pages"}, dict(q_len=2, kv_layout="paged", page_size=8,
                                                             lengths="uniform", batch=3)),
}


@pytest.mark.parametrize("features", ONE_BY_ONE + [ALL], ids=lambda f: ",".join(f))
@pytest.mark.parametrize("shape", sorted(DECODE_SHAPES))
def test_decode_variants_on_decode_shapes(shape, features):
    name, params, axes = DECODE_SHAPES[shape]
    for causal in (False, True):
        if features.get("prefix_lm") and not causal:
            continue
        _assert_exact(feature_errors(_case(name, params, causal=causal, **axes, **features)))


def test_sdpa_gives_alibi_as_a_float_mask_and_records_the_backend():
    from variants.dense import _feature_mask, _sdpa_columns

    case = _case("sdpa", causal=True, alibi=True, sliding_window=5)
    q, k, v = make_qkv(case)
    _, _, extra = layout_inputs(case, k, v)
    mask = _feature_mask(q, k, True, alibi_slopes=extra["alibi_slopes"], window_size=5)["attn_mask"]
    assert mask.dtype == q.dtype and mask.shape == (1, 4, 37, 37) and torch.isinf(mask).any()
    assert _feature_mask(q, k, True, alibi_slopes=extra["alibi_slopes"], window_size=5)["attn_mask"] is mask  # kept
    assert _sdpa_columns(_case("sdpa", causal=True, alibi=True))["sdpa_backend_used"] is not None
    # PyTorch's flash kernels need v of q's head size: a value head of its own leaves them
    assert _sdpa_columns(_case("sdpa", causal=True, head_dim=32, v_head_dim=16))["sdpa_backend_used"] == "math"
    reasons = get_variant("sdpa").not_supported_reasons(_case("sdpa", {"backend": "flash"}, head_dim=32, v_head_dim=16))
    assert any("needs v of q's head size" in r for r in reasons)


def test_flex_compiles_the_features():
    from variants import flex

    if why := flex.unavailable("cpu"):
        pytest.skip(why)
    # one compile: every feature at once, on a decode shape (5 queries at the end of 37 keys)
    _assert_exact(feature_errors(_case("flex", {"tile": 16}, causal=True, q_len=5, **ALL, prefix_lm=4)))


# -- the Triton kernel, interpreted -------------------------------------------------------------

TRITON_CASES = [  # (heads, kv_heads, seq_len, head_dim, causal, features)
    (4, 2, 67, 32, False, dict(softcap=5.0)),
    (4, 2, 67, 32, True, dict(sliding_window=5)),
    (2, 1, 33, 16, False, dict(sliding_window=20)),
    (4, 2, 70, 32, True, dict(alibi=True, sinks=True)),
    (4, 4, 67, 16, False, dict(softcap=5.0, alibi=True, sinks=True, sliding_window=9)),
]


def run_triton_cases(cases) -> dict:
    """In the interpreted child: each case's errors against the float64 reference."""
    from variants import triton_fused

    out = {}
    for i, (H, Hkv, L, D, causal, features) in enumerate(cases):
        case = Case("triton", dtype="float16", batch=1, heads=H, kv_heads=Hkv, seq_len=L, head_dim=D, causal=causal,
                    **features)
        variant = get_variant("triton")
        q, k, v = make_qkv(case)
        k, v, extra = layout_inputs(case, k, v)
        got = triton_fused.launch(q, k, v, causal=causal, **extra)
        ref = reference_attention(q, k, v, variant.reference_mask(case), score_mod=variant.reference_score_mod(case),
                                  sinks=extra.get("sinks"))
        out[str(i)] = [*errors(got, ref), bool(torch.isfinite(got).all())]
    return out


def test_triton_kernel_features_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    proc = subprocess.run([sys.executable, "-m", "tests.test_features_variants"], input=json.dumps(TRITON_CASES),
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    tol_abs, tol_rel = TOLERANCE["float16"]
    for i, case in enumerate(TRITON_CASES):
        max_abs, rel, finite = results[str(i)]
        assert finite and max_abs <= tol_abs and rel <= tol_rel, (case, max_abs, rel)


# -- the peer adapters, through fake libraries ----------------------------------------------------


def _fake_flash_attn_func(calls):
    """flash_attn_func as FlashAttention documents it, in (B, L, H, D): softcap, alibi_slopes (a bias of
    −slope·|i + Lk − Lq − j|), window_size=(left, right) (−1: unbounded)."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, **kw):
        calls.append(dict(softcap=softcap, alibi=alibi_slopes, window=window_size, causal=causal))
        B, Lq, H, D = q.shape
        Lk = k.shape[1]
        k, v = (x.double().repeat_interleave(H // x.shape[2], dim=2) for x in (k, v))
        s = torch.einsum("blhd,bmhd->bhlm", q.double(), k) * softmax_scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(Lq).view(-1, 1) + Lk - Lq
        j = torch.arange(Lk).view(1, -1)
        if alibi_slopes is not None:
            s = s - alibi_slopes.double().view(1, H, 1, 1) * (i - j).abs()
        left, right = window_size
        keep = torch.ones(Lq, Lk, dtype=torch.bool)
        if causal:
            right = 0 if right < 0 else min(right, 0)
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        s = s.masked_fill(~keep, float("-inf"))
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).to(q.dtype)

    return flash_attn_func


def _fake_flashinfer(calls):
    def single_prefill_with_kv_cache(q, k, v, causal=False, kv_layout="NHD", sm_scale=None, logits_soft_cap=None, **kw):
        calls.append(dict(softcap=logits_soft_cap, causal=causal))
        k, v = (x.transpose(0, 1) for x in (k, v)) if kv_layout == "HND" else (k, v)
        s = torch.einsum("lhd,mhd->hlm", q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1))
        s = s * sm_scale
        if logits_soft_cap:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        vv = v.double().repeat_interleave(q.shape[1] // v.shape[1], 1)
        return torch.einsum("hlm,mhd->lhd", s.softmax(-1), vv).to(q.dtype)

    return types.SimpleNamespace(single_prefill_with_kv_cache=single_prefill_with_kv_cache)


@pytest.mark.parametrize("causal", [False, True])
def test_peer_adapters_pass_their_features(causal, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=_fake_flash_attn_func(calls)))
    monkeypatch.setitem(sys.modules, "flashinfer", _fake_flashinfer(calls))
    for name, features in (("flash_attn", dict(softcap=4.0, alibi=True, sliding_window=5)),
                           ("flashinfer", dict(softcap=4.0))):
        case = _case(name, causal=causal, batch=1, **features)
        variant = get_variant(name)
        assert not [r for r in variant.not_supported_reasons(case) if "does not take" in r]
        q, k, v = make_qkv(case)
        k, v, extra = layout_inputs(case, k, v)
        out = variant.with_inputs(extra).fn(q, k, v, causal=causal)
        ref = reference_attention(q, k, v, variant.reference_mask(case), score_mod=variant.reference_score_mod(case))
        _assert_exact(list(errors(out, ref)))
    fa, fi = calls
    assert fa["softcap"] == 4.0 and fa["alibi"] is not None and fa["window"] == (5, 0 if causal else 5)
    assert fi["softcap"] == 4.0


# -- end to end: an attention-gym-style plugin under bench run -----------------------------------

PLUGIN = '''
"""FlexAttention with attention-gym's tanh softcap and ALiBi score_mods, as a user would write it."""
import functools

import torch
from torch.nn.attention.flex_attention import flex_attention

from harness import register_variant


def generate_tanh_softcap(soft_cap):
    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return soft_cap * torch.tanh(score / soft_cap)
    return tanh_softcap


def generate_alibi_bias(H):
    alibi_bias = torch.exp2(-((torch.arange(H) + 1) * 8.0 / H))
    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + alibi_bias[h] * (kv_idx - q_idx)
    return alibi_mod


@functools.lru_cache(maxsize=None)
def score_mod_for(heads):
    cap, alibi = generate_tanh_softcap(20), generate_alibi_bias(heads)
    def softcap_alibi(score, b, h, q_idx, kv_idx):
        return alibi(cap(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)
    return softcap_alibi


compiled = torch.compile(flex_attention, dynamic=False)


@register_variant("gym_flex", family="compiled", exact=True, score_mod=lambda case: score_mod_for(case.heads))
def gym_flex(q, k, v, *, causal):
    return compiled(q, k, v, score_mod=score_mod_for(q.shape[1]), enable_gqa=k.shape[1] != q.shape[1])
'''

SUITE = '''
name = "gym-features"
plugins = ["gym_plugin.py"]
[defaults]
heads = 4
kv_heads = 2
head_dim = 16
seq_len = 128
dtype = "float32"
[timing]
warmup = 1
min_time_s = 0.0
min_reps = 2
max_reps = 3
processes = 1
[[variant]]
name = "gym_flex"
[[variant]]
name = "naive"
softcap = [0.0, 20.0]
'''


def test_a_flex_plugin_with_gym_score_mods_is_ok_under_bench_run(tmp_path):
    from variants import flex

    if why := flex.unavailable("cpu"):
        pytest.skip(why)
    (tmp_path / "gym_plugin.py").write_text(PLUGIN)
    (tmp_path / "suite.toml").write_text(SUITE)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(tmp_path / "suite.toml"), "-o", str(run),
                           "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.read_parquet(run / "results.parquet")
    gym = rows[rows["variant"] == "gym_flex"].iloc[0]
    assert gym["status"] == "ok" and gym["rel_err"] < 1e-5, (gym["status"], gym["reason"], gym["rel_err"])
    assert (rows["status"] == "ok").all(), rows[["variant", "status", "reason"]]
    html = (run / "report.html").read_text()
    assert 'id="features"' in html and "Cost of features" in html and "softcap=20" in html
    out = tmp_path / "feature-cost.json"
    script = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "feature_cost.py"), str(run), "--json",
                             str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert script.returncode == 0, script.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["name"] == "feature-cost" and [r[1:3] for r in doc["rows"]] == [["naive", "softcap=20"]]
    assert math.isclose(doc["rows"][0][5], doc["rows"][0][4] / doc["rows"][0][3], rel_tol=0.05), doc["rows"]


if __name__ == "__main__":  # the interpreted child of test_triton_kernel_features_under_the_interpreter
    cases = [tuple(c) for c in json.loads(sys.stdin.read())]
    print(json.dumps(run_triton_cases(cases)))
