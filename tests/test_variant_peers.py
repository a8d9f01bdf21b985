"""Peer libraries' kernels (FlashAttention 2/3/4, FlashInfer, xformers) as optional variants.

Without the library or without CUDA every case is skipped with a reason naming what is
missing. With a fake library in ``sys.modules`` — one that computes attention in torch in the
library's own layout, as its documentation defines it — each adapter must hand it the right
layout, grouped-query heads, causal flag and scale, and transpose the result back: checked
against the float64 reference like every variant.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from harness import get_variant, list_variants, masks
from harness.measure.inputs import make_qkv
from harness.measure.reference import TOLERANCE, errors, reference_attention
from tests.variant_checks import make_case
from variants.peers import flash_infer

#: variant -> the module its adapter imports
PEERS = {
    "flash_attn": "flash_attn",
    "flash_attn3": "flash_attn_interface",
    "flash_attn4": "flash_attn.cute",
    "flashinfer": "flashinfer",
    "xformers": "xformers.ops",
}
SHAPE = dict(batch=2, heads=4, kv_heads=2, seq_len=37, head_dim=16)  # H != L != D: a layout mix-up cannot pass


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def test_peers_are_registered_builtins_of_the_fused_family():
    listed = {v.name: v for v in list_variants()}
    for name in PEERS:
        assert name in listed, name
        assert (listed[name].family, listed[name].exact, listed[name].source) == ("fused", True, "builtin")
        assert listed[name].supports.devices == {"cuda"}


def test_registering_does_not_import_the_libraries():
    roots = sorted({m.split(".")[0] for m in PEERS.values()})
    code = f"import sys, variants; print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype,causal,kv_heads", [("float16", True, 4), ("bfloat16", False, 1), ("float32", True, 2)])
def test_every_case_skips_here_with_a_reason(name, device, dtype, causal, kv_heads):
    v = get_variant(name)
    module = PEERS[name]
    reasons = v.not_supported_reasons(make_case(name, device=device, dtype=dtype, causal=causal, kv_heads=kv_heads))
    if not _installed(module):
        assert any(f"{module.split('.')[0]}" in r and "not installed" in r for r in reasons), reasons
    if not torch.cuda.is_available():
        assert any("cuda" in r.lower() for r in reasons), reasons
    if not (_installed(module) and torch.cuda.is_available()):
        assert reasons


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_missing_library_is_named_with_how_to_install_it(name, monkeypatch):
    module = PEERS[name]
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a module that cannot be imported
    reasons = get_variant(name).not_supported_reasons(make_case(name, device="cuda", dtype="float16"))
    missing = [r for r in reasons if "is not installed" in r]
    assert missing and missing[0].startswith(f"{module} is not installed (") and "install" in missing[0][len(module):]
    with pytest.raises(RuntimeError, match="is not installed"):
        q = torch.randn(1, 2, 4, 16)
        get_variant(name).fn(q, q, q, causal=False)


@pytest.mark.parametrize(
    "name,capability,expect",
    [("flash_attn", (7, 5), "Ampere"), ("flash_attn3", (8, 0), "Hopper"), ("flash_attn3", (10, 0), "Hopper"),
     ("flash_attn4", (8, 9), "Hopper or Blackwell")],
)
def test_gpu_generation_limits(name, capability, expect, monkeypatch):
    _install_fakes(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    reasons = get_variant(name).not_supported_reasons(make_case(name, device="cuda", dtype="float16"))
    assert len(reasons) == 1 and expect in reasons[0] and f"sm{capability[0]}{capability[1]}" in reasons[0], reasons
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert get_variant(name).not_supported_reasons(make_case(name, device="cuda", dtype="float16")) == []


# --------------------------------------------------------------------------------------------
# fake libraries: attention in torch, in each library's documented layout


def attention_blhd(q, k, v, causal: bool, scale):
    """(B, L, H, D) queries on (B, L, H_kv, D) keys/values; query head h uses kv head h // (H // H_kv)."""
    B, L, H, D = q.shape
    group = H // k.shape[2]
    k, v = (x.double().repeat_interleave(group, dim=2) for x in (k, v))
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k) * (1 / math.sqrt(D) if scale is None else scale)
    if causal:
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).to(q.dtype)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so that submodules resolve
    mod.__dict__.update(attrs)
    return mod


def _install_fakes(monkeypatch, calls: list) -> None:
    def flash_attn_func(returns_lse):
        def fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
            calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=causal, scale=softmax_scale))
            out = attention_blhd(q, k, v, causal, softmax_scale)
            return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if returns_lse else out

        return fn

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
        calls.append(dict(q=tuple(query.shape), k=tuple(key.shape), causal=isinstance(attn_bias, LowerTriangularMask),
                          scale=scale))
        if query.ndim == 5:  # (B, L, G, H, D): keys and values given for every query head of their group
            assert key.shape == query.shape and key.stride(3) == 0 and value.stride(3) == 0
            flat = [x.flatten(2, 3) for x in (query, key, value)]
            return attention_blhd(*flat, isinstance(attn_bias, LowerTriangularMask), scale).unflatten(
                2, query.shape[2:4])
        return attention_blhd(query, key, value, isinstance(attn_bias, LowerTriangularMask), scale)

    def single_prefill_with_kv_cache(q, k, v, causal=False, kv_layout="NHD", sm_scale=None, **kw):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=causal, scale=sm_scale, layout=kv_layout))
        if kv_layout == "HND":
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        return attention_blhd(q[None], k[None], v[None], causal, sm_scale)[0]

    class BatchPrefillWithRaggedKVCacheWrapper:
        def __init__(self, workspace, kv_layout="NHD"):
            assert kv_layout == "NHD"

        def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, causal=False, sm_scale=None,
                 **kw):
            calls.append(dict(plan=(num_qo_heads, num_kv_heads, head_dim_qk), causal=causal, scale=sm_scale))
            self.qo, self.kv, self.causal, self.scale = qo_indptr.tolist(), kv_indptr.tolist(), causal, sm_scale
            self.heads = (num_qo_heads, num_kv_heads)

        def run(self, q, k, v):
            calls.append(dict(q=tuple(q.shape), k=tuple(k.shape)))
            assert (q.shape[1], k.shape[1]) == self.heads
            segments = zip(self.qo[:-1], self.qo[1:], self.kv[:-1])
            return torch.cat([attention_blhd(q[None, a:b], k[None, c:c + b - a], v[None, c:c + b - a], self.causal,
                                             self.scale)[0] for a, b, c in segments])

    fakes = {
        "flash_attn": _module("flash_attn", flash_attn_func=flash_attn_func(False)),
        "flash_attn_interface": _module("flash_attn_interface", flash_attn_func=flash_attn_func(True)),
        "flash_attn.cute": _module("flash_attn.cute", flash_attn_func=flash_attn_func(True)),
        "xformers": _module("xformers"),
        "xformers.ops": _module("xformers.ops", memory_efficient_attention=memory_efficient_attention,
                                LowerTriangularMask=LowerTriangularMask),
        "flashinfer": _module("flashinfer", single_prefill_with_kv_cache=single_prefill_with_kv_cache,
                              BatchPrefillWithRaggedKVCacheWrapper=BatchPrefillWithRaggedKVCacheWrapper),
    }
    fakes["flash_attn"].cute = fakes["flash_attn.cute"]
    fakes["xformers"].ops = fakes["xformers.ops"]
    for name, mod in fakes.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(flash_infer, "_PLANNED", {})


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("batch", [1, 2])
def test_adapter_through_a_fake_library_matches_float64(name, causal, kv_heads, batch, monkeypatch):
    calls = []
    _install_fakes(monkeypatch, calls)
    variant = get_variant(name)
    case = make_case(name, dtype="float32", causal=causal, **{**SHAPE, "kv_heads": kv_heads, "batch": batch})
    assert not any("install" in r for r in variant.not_supported_reasons(case))  # the library is "there"
    q, k, v = make_qkv(case)
    out = variant.fn(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    max_abs, rel = errors(out, reference_attention(q, k, v, masks.causal if causal else None))
    tol_abs, tol_rel = TOLERANCE["float32"]
    assert max_abs <= tol_abs and rel <= tol_rel, (max_abs, rel)

    B, H, L, D = q.shape
    seen = {}  # what the library was given (flashinfer's batch path: plan, then run)
    for call in calls:
        seen.update(call)
    assert seen["causal"] == causal and math.isclose(seen["scale"], 1 / math.sqrt(D))
    if name.startswith("flash_attn"):
        assert (seen["q"], seen["k"]) == ((B, L, H, D), (B, L, kv_heads, D))
    elif name == "xformers":
        group = H // kv_heads
        assert (seen["q"], seen["k"]) == (((B, L, H, D),) * 2 if group == 1 else ((B, L, kv_heads, group, D),) * 2)
    elif batch == 1:
        assert (seen["q"], seen["k"], seen["layout"]) == ((L, H, D), (kv_heads, L, D), "HND")
    else:
        assert (seen["q"], seen["k"], seen["plan"]) == ((B * L, H, D), (B * L, kv_heads, D), (H, kv_heads, D))


def test_flashinfer_plans_a_batch_shape_once(monkeypatch):
    calls = []
    _install_fakes(monkeypatch, calls)
    case = make_case("flashinfer", dtype="float32", causal=True, **SHAPE)
    q, k, v = make_qkv(case)
    fn = get_variant("flashinfer").fn
    for _ in range(3):
        fn(q, k, v, causal=True)
    assert sum("plan" in c for c in calls) == 1
    fn(q, k, v, causal=False)  # another shape key: planned again
    assert sum("plan" in c for c in calls) == 2
