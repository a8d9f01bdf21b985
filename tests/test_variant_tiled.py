"""The tiled (FlashAttention-in-PyTorch) variant against the float64 reference."""

import pytest
import torch

import variants.tiled
from harness import get_variant
from harness.core.flops import attention_flops
from harness.measure.inputs import make_grad, make_qkv
from harness.measure.memory import peak_memory_bytes
from tests.variant_checks import assert_exact, assert_exact_grads, make_case

BLOCKS = [
    {},  # defaults (one tile covers the whole test sequence)
    {"block_q": 16, "block_k": 32},
    {"block_q": 32, "block_k": 16},
    {"block_q": 7, "block_k": 13},  # neither divides L nor each other
]


def test_registration():
    v = get_variant("tiled")
    assert v.family == "memory_efficient" and v.exact
    assert v.flops is attention_flops
    assert set(v.params) == {"block_q", "block_k", "compute"}
    assert v.params["compute"].default == "input" and set(v.params["compute"].choices) == {"input", "float32"}
    assert v.supports.backward and v.supports.gqa and v.supports.causal


@pytest.mark.parametrize("params", BLOCKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_matches_reference(params, causal, kv_heads, dtype):
    assert_exact(make_case("tiled", params, causal=causal, kv_heads=kv_heads, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_forward_float16(causal):
    assert_exact(make_case("tiled", {"block_q": 16, "block_k": 32}, causal=causal, kv_heads=2, dtype="float16"))


@pytest.mark.parametrize("params", BLOCKS[1:])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_peaked_attention(params, causal):
    """Structured inputs (score std ~3): the running max changes often, exercising the rescaling."""
    case = make_case("tiled", params, causal=causal, kv_heads=2, inputs="structured", seq_len=200)
    assert_exact(case)
    assert_exact(case, seed=3)


@pytest.mark.parametrize("L", [1, 2, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_tiny_sequences(L, causal):
    assert_exact(make_case("tiled", {"block_q": 2, "block_k": 3}, causal=causal, seq_len=L, kv_heads=1))


@pytest.mark.parametrize("params", BLOCKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gradients_match_float64_autograd(params, causal, kv_heads):
    assert_exact_grads(make_case("tiled", params, causal=causal, kv_heads=kv_heads, seq_len=67))


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_gradients(causal):
    case = make_case("tiled", {"block_q": 16, "block_k": 32}, causal=causal, kv_heads=2, seq_len=67, dtype="bfloat16")
    q, k, v = (x.requires_grad_() for x in make_qkv(case))
    out = get_variant("tiled")(q, k, v, causal=causal, **case.params)
    out.sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape for x in (q, k, v))
    assert_exact_grads(case)


def test_non_contiguous_inputs():
    case = make_case("tiled", {"block_q": 16, "block_k": 32}, causal=True, kv_heads=2)
    q, k, v = make_qkv(case)
    # (B, L, H, D) storage seen as (B, H, L, D)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    tiled = get_variant("tiled")
    torch.testing.assert_close(tiled(qt, kt, vt, causal=True, **case.params),
                               tiled(q, k, v, causal=True, **case.params))


def test_backward_saves_only_inputs_output_and_lse():
    case = make_case("tiled", {"block_q": 16, "block_k": 32}, causal=True, kv_heads=2, seq_len=67)
    q, k, v = (x.requires_grad_() for x in make_qkv(case))
    out = get_variant("tiled")(q, k, v, causal=True, **case.params)
    node = out.grad_fn
    while type(node).__name__ != "_FlashAttentionBackward":
        node = node.next_functions[0][0]
    saved = node.saved_tensors
    B, H, Hkv, L, D = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    assert [tuple(t.shape) for t in saved] == [
        (B * Hkv, H // Hkv, L, D),  # q
        (B * Hkv, L, D),  # k
        (B * Hkv, L, D),  # v
        (B * Hkv, H // Hkv, L, D),  # out
        (B * Hkv, H // Hkv, L),  # log-sum-exp per row
    ]


def test_lse_is_the_row_logsumexp():
    case = make_case("tiled", {"block_q": 16, "block_k": 32}, causal=True, kv_heads=2, seq_len=67)
    q, k, v = make_qkv(case)
    B, H, Hkv, L, D = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    qg = q.reshape(B * Hkv, H // Hkv, L, D)
    _, lse = variants.tiled.flash_forward(qg, k.reshape(B * Hkv, L, D), v.reshape(B * Hkv, L, D), True, 16, 32, D**-0.5)
    scores = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * D**-0.5
    scores.masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.reshape(B, H, L).double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bq,bk", [(64, 64), (64, 128), (128, 64), (50, 70)])
def test_causal_skips_tiles_above_the_diagonal(bq, bk):
    L = 500
    kblocks = variants.tiled._blocks(L, bk)
    computed = 0
    for i0, i1 in variants.tiled._blocks(L, bq):
        for j0, j1 in variants.tiled._key_blocks(i0, i1, kblocks, causal=True):
            assert j0 <= i1 - 1  # some key of the tile is visible to the last query row
            computed += 1
            mask = variants.tiled._diagonal_mask(i0, i1, j0, j1, "cpu")
            if j1 - 1 <= i0:
                assert mask is None  # entirely below the diagonal: no mask
            else:
                assert mask.shape == (i1 - i0, j1 - j0) and mask.any()
        skipped = len(kblocks) - len(variants.tiled._key_blocks(i0, i1, kblocks, causal=True))
        assert all(j0 > i1 - 1 for j0, _ in kblocks[len(kblocks) - skipped :])
    if bq == bk:
        n = len(kblocks)
        assert computed == n * (n + 1) // 2


def _peak(case, backward=False):
    q, k, v = make_qkv(case)
    tiled = get_variant("tiled")
    if not backward:
        with torch.no_grad():
            return peak_memory_bytes(lambda: tiled(q, k, v, causal=case.causal, **case.params), "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grad = make_grad(q)  # the upstream gradient is the caller's, outside the measured call

    def step():
        out = tiled(q, k, v, causal=case.causal, **case.params)
        return torch.autograd.grad(out, (q, k, v), grad)

    return peak_memory_bytes(step, "cpu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_is_linear_and_matches_working_set(causal, kv_heads, dtype):
    shape = {"batch": 1, "heads": 2, "kv_heads": kv_heads, "seq_len": 2048, "causal": causal, "dtype": dtype}
    case = make_case("tiled", {"block_q": 128, "block_k": 256}, **shape)
    one_score_matrix = case.seq_len**2 * 4  # a single L×L float32 head: 16 MiB
    fwd = _peak(case)
    estimate = get_variant("tiled").working_set(case)
    assert fwd < one_score_matrix / 8
    assert 0.8 * estimate <= fwd <= 1.2 * estimate, (fwd, estimate)
    bwd_case = make_case("tiled", case.params, mode="fwd_bwd", **shape)
    both = _peak(bwd_case, backward=True)
    bwd_estimate = get_variant("tiled").working_set(bwd_case)
    assert both < one_score_matrix / 4
    assert 0.8 * bwd_estimate <= both <= 1.2 * bwd_estimate, (both, bwd_estimate)


@pytest.mark.parametrize("compute", ["input", "float32"])
@pytest.mark.parametrize("inputs", ["gaussian", "structured"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compute_modes_within_tolerance(compute, inputs, causal, dtype):
    """16-bit inputs: both compute schemes, grouped-query, incl. peaked attention (where rounding S would not pass)."""
    params = {"block_q": 16, "block_k": 32, "compute": compute}
    assert_exact(make_case("tiled", params, causal=causal, kv_heads=2, dtype=dtype, inputs=inputs, seq_len=200))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True])
def test_compute_input_gradients(dtype, causal):
    """The backward (float32) from a compute="input" forward's output and log-sum-exp."""
    params = {"block_q": 16, "block_k": 32, "compute": "input"}
    assert_exact_grads(make_case("tiled", params, causal=causal, kv_heads=2, seq_len=67, dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compute_input_differs_only_for_16_bit_inputs(dtype):
    case = make_case("tiled", {"block_q": 16, "block_k": 32}, causal=True, kv_heads=2, dtype=dtype)
    q, k, v = make_qkv(case)
    tiled = get_variant("tiled")
    a = tiled(q, k, v, causal=True, block_q=16, block_k=32, compute="input")
    b = tiled(q, k, v, causal=True, block_q=16, block_k=32, compute="float32")
    assert a.dtype == b.dtype == q.dtype
    assert torch.equal(a, b) == (dtype == "float32")  # 16-bit: P·V really ran on rounded P
