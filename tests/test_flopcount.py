"""FlopCounterMode cross-check: analytic and counted FLOPs agree for dense attention, fwd and bwd;
'not counted' (never 0) where FlopCounterMode cannot count."""

import math

import pytest
import torch
from torch.utils.flop_counter import flop_registry

from harness import get_variant
from harness.core.cases import Case
from harness.core.flops import attention_flops, total_flops
from harness.measure import flopcount
from harness.measure.derive import derive
from harness.measure.inputs import make_grad, make_qkv


def dense_case(variant="sdpa", kv_heads=4, causal=False, **kw):
    return Case(variant, kw.pop("params", {}), batch=2, heads=4, kv_heads=kv_heads, seq_len=96, head_dim=16,
                causal=causal, **kw)


def forward_call(case):
    q, k, v = make_qkv(case)
    variant = get_variant(case.variant)

    def call():
        with torch.no_grad():
            return variant(q, k, v, causal=case.causal, **case.params)

    return call


def backward_call(case):
    leaves = tuple(x.requires_grad_() for x in make_qkv(case))
    out = get_variant(case.variant)(*leaves, causal=case.causal, **case.params)
    grad = make_grad(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def test_cpu_flash_sdpa_kernels_have_formulas():
    assert flopcount.CPU_FLASH_FORWARD in flop_registry
    assert flopcount.CPU_FLASH_BACKWARD in flop_registry


def test_default_cpu_sdpa_path_is_the_one_the_registration_covers():
    # the trap this module fixes: SDPA's default CPU kernel (counted 0 before registration)
    recorder = flopcount._OpRecorder()
    with recorder:
        forward_call(dense_case())()
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in recorder.ops


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_forward_counted_equals_analytic(kv_heads):
    case = dense_case(kv_heads=kv_heads)
    counted, note = flopcount.counted_flops(forward_call(case))
    assert note == ""
    assert counted == attention_flops(case) == 4 * 2 * 4 * 16 * 96 * 96


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_sdpa_backward_counted_equals_analytic(backend):
    # the fused backward recomputes the scores: 5 matmuls = 2.5 x forward, the analytic convention
    case = dense_case(params={"backend": backend}, mode="bwd")
    counted, note = flopcount.counted_flops(backward_call(case))
    expected = total_flops(attention_flops(case), "bwd")
    if backend == "auto":
        assert counted == expected
    else:  # the math backend's autograd backward materialises P and does 4 matmuls (2 x forward)
        assert counted == 0.8 * expected


def test_naive_forward_and_backward():
    case = dense_case("naive")
    assert flopcount.counted_flops(forward_call(case))[0] == attention_flops(case)
    counted_bwd = flopcount.counted_flops(backward_call(case))[0]
    assert counted_bwd == 2 * attention_flops(case)  # autograd of QKᵀ and PV: 4 matmuls, no recompute


def test_causal_is_counted_in_full_and_said_so():
    case = dense_case(causal=True)
    cols = flopcount.flop_columns(forward_call(case), causal=True)
    assert derive({**cols, "flops": attention_flops(case)})["flops_counted_ratio"] == 2.0  # analytic halves causal
    assert "causal" in cols["flops_counted_note"]


def test_zero_count_is_not_counted_never_zero():
    x = torch.randn(64, 64)
    value, note = flopcount.counted_flops(lambda: torch.softmax(x, dim=-1))
    assert value is None and "not counted" in note and "aten._softmax" in note
    cols = flopcount.flop_columns(lambda: torch.softmax(x, dim=-1))
    assert math.isnan(cols["flops_counted"]) and math.isnan(derive({**cols, "flops": 1e6})["flops_counted_ratio"])


def test_a_call_that_raises_is_not_counted():
    def boom():
        raise RuntimeError("inside a higher-order op\nsecond line")

    value, note = flopcount.counted_flops(boom)
    assert value is None and note == "not counted: FlopCounterMode raised RuntimeError: inside a higher-order op"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_is_not_counted_or_counted_positive():
    import variants.flex as flex_module

    why = flex_module.unavailable("cpu")
    if why:
        pytest.skip(f"flex cannot compile here: {why}")
    shape = dict(flex_module.PROBE_SHAPE)
    case = Case("flex", {}, causal=True, **shape)
    call = forward_call(case)
    value, note = flopcount.counted_flops(call)
    assert (value is None and note.startswith("not counted")) or value > 0
    call()  # the compiled kernel still runs after being counted


def test_counting_compiled_code_leaves_it_working():
    @torch.compile(backend="eager", fullgraph=True)
    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    q, k, v = make_qkv(dense_case())
    expected = attention(q, k, v)
    counted, note = flopcount.counted_flops(lambda: attention(q, k, v))
    assert counted == attention_flops(dense_case()) and note == ""
    torch.testing.assert_close(attention(q, k, v), expected)  # still compiled, still right
