"""The quantised family (int8 QKᵀ, FP8, KV-cache int8/int4) and its quantisation helpers."""

import math

import pytest
import torch

from harness import get_variant
from tests.variant_checks import forward_errors, make_case
from variants import quantised as qz

NAMES = ("int8_qk", "fp8", "kv_quant")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _reference(q, k, v, causal):
    """Float64 softmax attention (grouped-query by repeating K and V)."""
    G = q.shape[1] // k.shape[1]
    k64, v64 = (x.double().repeat_interleave(G, 1) for x in (k, v))
    s = q.double() @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[-2]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v64


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _rel_err(name, params=None, **axes):
    axes.setdefault("kv_heads", 2)
    return forward_errors(make_case(name, params, **axes))[1]


def test_registration():
    for name in NAMES:
        v = get_variant(name)
        assert v.family == "quantised" and not v.exact
        assert not v.supports.backward and v.supports.gqa and v.supports.causal
        assert v.columns is not None
    assert set(get_variant("int8_qk").params) == {"smooth", "block", "pv_dtype", "int_matmul"}
    assert set(get_variant("fp8").params) == {"format", "scaling", "block", "quantize_v", "fp8_matmul"}
    assert set(get_variant("kv_quant").params) == {"bits", "group"}


# --- int8 -------------------------------------------------------------------


@pytest.mark.parametrize("block", [64, 16, 7])
def test_int8_round_trip_and_absmax_scale(block):
    x = _randn(2, 3, 131, 32)
    values, scale = qz.quantize_int8(x, block)
    assert values.dtype == torch.int8 and values.shape == x.shape and scale.shape == x.shape[:-1]
    assert values.abs().max() <= 127
    for b0 in range(0, 131, block):  # each block's absmax maps to ±127, with one scale for the block
        blk = values[..., b0 : b0 + block, :]
        assert (blk.abs().amax(dim=(-1, -2)) == 127).all()
        s = scale[..., b0 : b0 + block]
        assert (s == s[..., :1]).all()
        torch.testing.assert_close(s[..., 0], x[..., b0 : b0 + block, :].abs().amax(dim=(-1, -2)) / 127)
    err = (values.float() * scale.unsqueeze(-1) - x).abs()
    assert (err <= scale.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all()  # round to nearest: half a step


@pytest.mark.parametrize("causal", [False, True])
def test_smoothing_leaves_exact_softmax_unchanged(causal):
    q, k, v = _randn(2, 4, 67, 32, seed=1), _randn(2, 4, 67, 32, seed=2) + 3.0, _randn(2, 4, 67, 32, seed=3)
    smoothed = k.double() - k.double().mean(dim=-2, keepdim=True)
    torch.testing.assert_close(_reference(q, smoothed, v, causal), _reference(q, k, v, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_int8_qk_error_bounded(causal, dtype, kv_heads):
    rel = _rel_err("int8_qk", {}, causal=causal, dtype=dtype, kv_heads=kv_heads, seq_len=131)
    assert 1e-4 < rel < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_int8_smoothing_helps_when_keys_have_a_large_mean(causal):
    q, v = _randn(2, 4, 131, 32, seed=1), _randn(2, 2, 131, 32, seed=3)
    k = _randn(2, 2, 131, 32, seed=2) + 8.0
    ref = _reference(q, k, v, causal)
    int8_qk = get_variant("int8_qk")
    smooth = _rel(int8_qk(q, k, v, causal=causal, smooth=True), ref)
    raw = _rel(int8_qk(q, k, v, causal=causal, smooth=False), ref)
    assert smooth < 0.05 and raw > 1.5 * smooth, (smooth, raw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int_mm_and_its_emulation_agree_bit_for_bit(causal, dtype):
    q, k, v = (_randn(1, 4, 97, 64, seed=s, dtype=getattr(torch, dtype)) for s in (1, 2, 3))
    k = k[:, :2]
    int8_qk = get_variant("int8_qk")
    a = int8_qk(q, k, v[:, :2], causal=causal, int_matmul="int_mm")
    b = int8_qk(q, k, v[:, :2], causal=causal, int_matmul="emulated")
    assert torch.equal(a, b)


def test_int8_matmul_path_column():
    assert qz.int_matmul_path("cpu", 64, 4096) == qz.INT_MM
    assert qz.int_matmul_path("cuda", 60, 4096) != qz.INT_MM  # CUDA: head_dim must be a multiple of 8
    assert "float32" in qz.int_matmul_path("cpu", 64, 4096, "emulated")
    assert "float64" in qz.int_matmul_path("cpu", 2048, 4096, "emulated")  # 2048·127² ≥ 2²⁴
    int8_qk = get_variant("int8_qk")
    assert int8_qk.columns(make_case("int8_qk")) == {"quant_matmul": qz.INT_MM, "emulated": False}
    assert int8_qk.columns(make_case("int8_qk", {"int_matmul": "emulated"}))["emulated"] is True
    forced = make_case("int8_qk", {"int_matmul": "int_mm"}, device="cuda", head_dim=60)
    assert "multiples of 8" in " ".join(int8_qk.not_supported_reasons(forced))


def test_int8_pv_dtype_bfloat16_bounded():
    full = _rel_err("int8_qk", {"pv_dtype": "input"})
    half = _rel_err("int8_qk", {"pv_dtype": "bfloat16"})
    assert half < 0.05 and abs(half - full) < 0.01


# --- FP8 --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_fp8_cast_round_trip(fmt, scaling):
    x = _randn(2, 3, 131, 32) * 5
    values, scale = qz.quantize_fp8(x, fmt, scaling, block=32)
    assert values.dtype == qz.FP8_FORMATS[fmt]
    back = values.float() * scale
    fmax = torch.finfo(qz.FP8_FORMATS[fmt]).max
    assert values.float().abs().max() == fmax  # the absmax maps onto the format's largest value
    mantissa = {"e4m3": 3, "e5m2": 2}[fmt]
    normal = x.abs() > scale * 2.0 ** -6  # away from subnormals: relative error ≤ half an ulp
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= 2.0 ** -(mantissa + 1) * (1 + 1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_fp8_error_bounded_and_e5m2_worse(causal, scaling):
    rel = {fmt: _rel_err("fp8", {"format": fmt, "scaling": scaling}, causal=causal) for fmt in ("e4m3", "e5m2")}
    assert 1e-3 < rel["e4m3"] < 0.08 and rel["e5m2"] < 0.15
    assert rel["e5m2"] > 1.5 * rel["e4m3"], rel


def test_fp8_without_v_quantisation_is_closer():
    assert _rel_err("fp8", {"quantize_v": False}) < _rel_err("fp8", {"quantize_v": True})


def test_fp8_is_emulated_on_cpu_and_scaled_mm_needs_an_fp8_gpu():
    fp8 = get_variant("fp8")
    for params in ({}, {"fp8_matmul": "scaled_mm"}):
        cols = fp8.columns(make_case("fp8", params, head_dim=64, seq_len=128))
        assert cols["emulated"] is True  # CPU: emulated, or torch's software _scaled_mm
    assert "emulated" in fp8.columns(make_case("fp8", {}))["quant_matmul"]
    assert fp8.not_supported_reasons(make_case("fp8", {"fp8_matmul": "scaled_mm"})) == []
    cuda = make_case("fp8", {"fp8_matmul": "scaled_mm", "format": "e5m2"}, device="cuda", head_dim=64, seq_len=128)
    assert fp8.not_supported_reasons(cuda)  # no FP8 GPU here, or no e5m2 × e5m2 GEMM on one


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_fp8_scaled_mm_path_matches_emulation_on_cpu(fmt, scaling):
    """The _scaled_mm code path (per-head 2-D calls, column-major K, tensor or per-row scales) on CPU's _scaled_mm."""
    q, k, v = (_randn(1, 4, 100, 32, seed=s) for s in (1, 2, 3))
    k, v = k[:, :2], v[:, :2]
    fp8 = get_variant("fp8")
    params = {"format": fmt, "scaling": scaling, "block": 16}
    a = fp8(q, k, v, causal=True, fp8_matmul="scaled_mm", **params)
    b = fp8(q, k, v, causal=True, fp8_matmul="emulated", **params)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 CUDA GPU"
)
def test_fp8_scaled_mm_matches_emulation_on_cuda():
    q, k, v = (_randn(1, 4, 256, 64, seed=s).cuda() for s in (1, 2, 3))
    fp8 = get_variant("fp8")
    a = fp8(q, k, v, causal=True, fp8_matmul="scaled_mm")
    b = fp8(q, k, v, causal=True, fp8_matmul="emulated")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# --- KV cache ---------------------------------------------------------------


def test_int4_packing_round_trip_is_exact():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)[:, torch.randperm(64)]
    packed = qz.pack_int4(values)
    assert packed.dtype == torch.int8 and packed.shape == (3, 32)
    assert torch.equal(qz.unpack_int4(packed), values)
    assert qz.pack_int4(torch.tensor([1, -1], dtype=torch.int8)).view(torch.uint8).item() == 0xF1  # low nibble first


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 16])
def test_kv_quant_round_trip_bounded_by_group_scale(bits, group):
    x = _randn(2, 2, 67, 64, seed=4) * 3
    qkv = qz.quantize_kv(x, bits, group)
    assert qkv.data.dtype == torch.int8 and qkv.data.shape[-1] == (64 if bits == 8 else 32)
    assert qkv.scale.shape == (2, 2, 67, 64 // group)
    back = qz.dequantize_kv(qkv)
    step = qkv.scale.repeat_interleave(group, dim=-1)
    assert ((back - x).abs() <= step * 0.5 * (1 + 1e-5)).all()
    qmax = 127 if bits == 8 else 7
    groups = x.unflatten(-1, (-1, group))
    torch.testing.assert_close(qkv.scale, groups.abs().amax(-1) / qmax)
    assert qz.dequantize_kv(qkv, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_kv_rejects_bad_shapes():
    with pytest.raises(ValueError):
        qz.quantize_kv(_randn(2, 40), 8, 32)
    with pytest.raises(ValueError):
        qz.quantize_kv(_randn(2, 32), 3, 32)
    case = make_case("kv_quant", {"group": 24}, head_dim=32)
    assert get_variant("kv_quant").not_supported_reasons(case)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_quant_error_bounded_and_int4_worse(causal, dtype):
    int8 = _rel_err("kv_quant", {"bits": 8}, causal=causal, dtype=dtype)
    int4 = _rel_err("kv_quant", {"bits": 4}, causal=causal, dtype=dtype)
    assert 1e-4 < int8 < 0.02 and int4 < 0.25
    assert int4 > 5 * int8, (int8, int4)


@pytest.mark.parametrize("name", NAMES)
def test_working_set_estimate_is_linear_in_length(name):
    """One chunk of scores at a time: doubling L at most doubles the estimate plus the chunk (no L² term)."""
    ws = get_variant(name).working_set
    small, big = (ws(make_case(name, {}, seq_len=L, head_dim=64)) for L in (4096, 8192))
    assert 0 < small and big < 2.2 * small
