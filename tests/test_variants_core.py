"""naive, sdpa, sliding_window and linear against the float64 reference."""

import math

import pytest
import torch

from harness import get_variant, masks
from harness.measure.inputs import make_qkv
from harness.measure.reference import errors
from tests.variant_checks import assert_exact, assert_exact_grads, forward_errors, make_case
from variants.local import window_pairs

EXACT = [
    ("naive", {}),
    ("sdpa", {"backend": "math"}),
    ("sdpa", {"backend": "flash"}),
    ("sdpa", {"backend": "auto"}),
    ("sliding_window", {"window": 16, "block": 8}),
    ("sliding_window", {"window": 40, "block": 64}),
    ("sliding_window", {"window": 1000}),  # window larger than the sequence: dense attention
]


@pytest.mark.parametrize("name,params", EXACT)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_variants_match_reference(name, params, causal, kv_heads, dtype):
    assert_exact(make_case(name, params, causal=causal, kv_heads=kv_heads, dtype=dtype))


@pytest.mark.parametrize("name,params", EXACT[:2] + EXACT[4:5])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_variant_gradients(name, params, causal):
    assert_exact_grads(make_case(name, params, causal=causal, kv_heads=2, seq_len=67))


def test_window_larger_than_sequence_equals_dense():
    case = make_case("sliding_window", {"window": 1000}, seq_len=50)
    q, k, v = make_qkv(case)
    dense = get_variant("naive")(q, k, v, causal=False)
    local = get_variant("sliding_window")(q, k, v, causal=False, window=1000)
    torch.testing.assert_close(local, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L,w", [(1, 0), (7, 0), (131, 16), (131, 130), (131, 500), (1000, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_pairs_counts_the_mask(L, w, causal):
    m = masks.sliding_window(w)
    if causal:
        m = masks.and_masks(masks.causal, m)
    assert window_pairs(L, w, causal) == masks.pairs(m, L)


def test_sliding_window_zero_window_is_identity_on_values():
    case = make_case("sliding_window", {"window": 0}, seq_len=33)
    q, k, v = make_qkv(case)
    out = get_variant("sliding_window")(q, k, v, causal=False, window=0)
    torch.testing.assert_close(out, v)


def _linear_reference(q, k, v, causal):
    """Katharopoulos linear attention written directly from its definition, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    a = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("chunk", [1, 16, 64, 500])
def test_linear_matches_its_definition(causal, kv_heads, chunk):
    case = make_case("linear", {"chunk": chunk}, causal=causal, kv_heads=kv_heads)
    q, k, v = make_qkv(case)
    out = get_variant("linear")(q, k, v, causal=causal, chunk=chunk)
    max_abs, rel = errors(out, _linear_reference(q, k, v, causal))
    assert rel < 1e-5, rel


def test_linear_reports_its_error_against_softmax():
    max_abs, rel = forward_errors(make_case("linear", causal=True))
    assert math.isfinite(rel) and 0.05 < rel < 2.0  # a different function: a real, finite error


def test_linear_gradients_flow():
    case = make_case("linear", causal=True, seq_len=40)
    q, k, v = (x.requires_grad_() for x in make_qkv(case))
    get_variant("linear")(q, k, v, causal=True, chunk=8).sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (q, k, v))


@pytest.mark.parametrize("L", [131, 128, 7])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads,dtype", [(4, "float32"), (1, "float32"), (2, "bfloat16")])
def test_dilated_window_matches_reference(L, dilation, causal, kv_heads, dtype):
    from variants.local import _dilated_mask, _dilated_pairs

    case = make_case("dilated_window", {"window": 6, "dilation": dilation, "block": 8},
                     seq_len=L, causal=causal, kv_heads=kv_heads, dtype=dtype)
    assert_exact(case)
    assert _dilated_pairs(case) == masks.pairs(_dilated_mask(case), L)


def test_dilated_window_gradients():
    assert_exact_grads(make_case("dilated_window", {"window": 6, "dilation": 3, "block": 8}, seq_len=67,
                                 causal=True, kv_heads=2))


def test_dilation_one_is_the_sliding_window():
    case = make_case("dilated_window", {"window": 9, "dilation": 1}, seq_len=100)
    q, k, v = make_qkv(case)
    a = get_variant("dilated_window")(q, k, v, causal=True, window=9, dilation=1)
    b = get_variant("sliding_window")(q, k, v, causal=True, window=9)
    torch.testing.assert_close(a, b)
