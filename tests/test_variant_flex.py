"""flex (torch.compile'd FlexAttention) and triton (our fused kernel) against the float64 reference.

Compilation is slow (a few seconds per new shape/dtype/mask on a cold inductor
cache), so the flex tests share a handful of shapes: most use the availability
probe's shape (B1 H2/1 L131 D16), whose causal kernel the probe already compiled.
The flex tests are skipped, with the probe's reason, where compilation is not
available. The triton tests that run a kernel need CUDA and Triton.
"""

import os

import pytest
import torch

import variants.flex as flex_module
import variants.triton_fused as triton_module
from harness import get_variant, masks
from harness.measure.inputs import make_qkv
from harness.measure.reference import TOLERANCE, errors, reference_attention
from tests.variant_checks import assert_exact, gym_mask, make_case
from variants.local import window_pairs

PROBE = dict(flex_module.PROBE_SHAPE)  # B1 H2 (kv 1: multi-query) L131 (odd: 128 + a 3-row tile) D16


@pytest.fixture(scope="module")
def compiled_flex():
    why = flex_module.unavailable("cpu")
    if why:
        pytest.skip(f"flex cannot compile here: {why}")
    return get_variant("flex")


def flex_case(params=None, **axes):
    return make_case("flex", params, **{**PROBE, **axes})


# --------------------------------------------------------------------------------------------
# flex: results against the float64 reference (compiles)


@pytest.mark.parametrize(
    "params,causal",
    [
        ({"mask": "none"}, True),  # the probe's own kernel
        ({"mask": "none"}, False),
        ({"mask": "sliding_window", "window": 40}, False),
        ({"mask": "sliding_window", "window": 40}, True),
    ],
)
def test_flex_matches_reference_fp32(compiled_flex, params, causal):
    assert_exact(flex_case(params, causal=causal))


@pytest.mark.parametrize("causal,dtype", [(False, "float32"), (True, "bfloat16")])
def test_flex_gqa_block_sparse(compiled_flex, causal, dtype):
    """Grouped-query (4 heads on 2 kv heads), batch 2, D32, L300 on 32-token tiles (10×10):
    every block-sparse pattern (16-token layout blocks), whose tiles really are skipped.
    Without variants/sparse.py, a sliding window stands in for them. (bfloat16 rides on the
    causal run: every new dtype/mask/shape costs a compilation.)"""
    shape = dict(batch=2, heads=4, kv_heads=2, seq_len=300, head_dim=32)
    if flex_module.PATTERNS:
        configs = [{"mask": p, "block": 16, "stride": 4, "random_blocks": 2} for p in flex_module.PATTERNS]
    else:
        configs = [{"mask": "sliding_window", "window": 40}]
    for params in configs:
        case = flex_case({**params, "tile": 32}, causal=causal, dtype=dtype, **shape)
        assert_exact(case)
        bm = flex_module._block_mask(flex_module._mask_key(case.params, causal), 300, 32, torch.device("cpu"))
        assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) < (55 if causal else 100)


def test_flex_caches_block_masks_and_compiled_kernels(compiled_flex):
    from torch._dynamo.utils import counters

    case = flex_case({"mask": "none"}, causal=True)
    q, k, v = make_qkv(case)
    compiled_flex(q, k, v, causal=True, **case.params)
    graphs, block_masks = counters["stats"]["unique_graphs"], len(flex_module._BLOCK_MASKS)
    for _ in range(3):
        compiled_flex(q, k, v, causal=True, **case.params)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert len(flex_module._BLOCK_MASKS) == block_masks  # no new BlockMask


def test_attention_gym_mask_runs_in_flex_as_in_the_reference(compiled_flex):
    """A document mask indexing a tensor with ``b``, a window that uses ``h``, and causality, combined
    with torch's ``and_masks``: the same mask_mod in the compiled kernel (through torch's own
    create_block_mask, per batch and head) and in the float64 reference agree."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, L, D = 2, 3, 70, 16
    mask, explicit = gym_mask(B, L)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    bm = create_block_mask(mask, B, H, L, L, device="cpu", BLOCK_SIZE=16)
    out = flex_module.compiled_call(q, k, v, bm, enable_gqa=False)  # under the variant's recompile limit
    ref = reference_attention(q, k, v, mask)
    max_abs, rel = errors(out, ref)
    tol_abs, tol_rel = TOLERANCE["float32"]
    assert max_abs <= tol_abs and rel <= tol_rel, (max_abs, rel)
    # and the pattern is the written-out one (a kernel or reference ignoring b or h would differ)
    s = (q.double() @ k.double().transpose(-1, -2)) / D**0.5
    want = torch.softmax(s.masked_fill(~explicit(H), float("-inf")), -1) @ v.double()
    assert errors(out, want)[1] <= tol_rel


# --------------------------------------------------------------------------------------------
# flex: block masks, FLOPs, capabilities (no compilation)


BAND_KEYS = [("none", True), ("sliding_window", False, 40), ("sliding_window", True, 40), ("sliding_window", True, 200)]


@pytest.mark.parametrize("L", [1, 5, 128, 131, 300, 1000])
def test_band_tiles_closed_form_equals_evaluating_the_mask(L):
    for key in BAND_KEYS:
        for tile in (16, 128):
            closed = flex_module.band_tile_layout(*flex_module._band(key), L, tile)
            evaluated = flex_module.tile_layout(flex_module._mask_mod(key, L, "cpu"), L, tile, "cpu")
            assert torch.equal(closed[0], evaluated[0]) and torch.equal(closed[1], evaluated[1]), (key, tile)


def test_sliding_window_skips_tiles():
    partial, full = flex_module.band_tile_layout(0, 40, 300, 128)  # causal, window 40: 3×3 tiles
    assert partial.tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    assert not full.any()  # no 128×128 tile lies inside a 41-wide band


@pytest.mark.parametrize("L", [5, 131, 300])
def test_block_masks_equal_create_block_mask(L):
    from torch.nn.attention.flex_attention import create_block_mask

    keys = [("none", False)] + BAND_KEYS
    layout = tuple((n, 16 if n == "block" else d) for n, d in flex_module.PATTERN_DEFAULTS.items())
    keys += [(p, c) + layout for p in flex_module.PATTERNS for c in (False, True)]
    for key in keys:
        for tile in (16, 128):
            ours = flex_module._block_mask(key, L, tile, torch.device("cpu"))
            want = create_block_mask(ours.mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=tile)
            assert torch.equal(ours.to_dense(), want.to_dense()), (key, tile)
            assert torch.equal(ours.full_kv_num_blocks, want.full_kv_num_blocks), (key, tile)


def test_reference_mask_is_the_kernels_mask():
    v = get_variant("flex")
    case = flex_case({"mask": "sliding_window", "window": 7}, causal=True)
    bm = flex_module._block_mask(flex_module._mask_key(case.params, True), case.seq_len, 128, torch.device("cpu"))
    assert v.reference_mask(case) is bm.mask_mod
    assert v.reference_mask(flex_case({"mask": "none"}, causal=True)) is masks.causal
    assert v.reference_mask(flex_case({"mask": "none"}, causal=False)) is None


@pytest.mark.parametrize("causal", [False, True])
def test_flex_flops_count_kept_pairs(causal):
    v = get_variant("flex")
    L, per_pair = 300, 4 * 2 * 16  # 4·B·H·D with the probe's B1 H2 D16
    assert v.flops(flex_case({"mask": "none"}, causal=causal, seq_len=L)) == per_pair * (L * L / (2 if causal else 1))
    case = flex_case({"mask": "sliding_window", "window": 40}, causal=causal, seq_len=L)
    assert v.flops(case) == per_pair * window_pairs(L, 40, causal) == per_pair * masks.pairs(v.reference_mask(case), L)
    for pattern in flex_module.PATTERNS:
        case = flex_case({"mask": pattern, "block": 16}, causal=causal, seq_len=L)
        assert v.flops(case) == per_pair * masks.pairs(v.reference_mask(case), L)
        assert 0 < v.columns(case)["density"] < 1


def test_flex_declares_its_limits():
    v = get_variant("flex")
    assert (v.family, v.exact) == ("compiled", True)
    assert set(v.params["mask"].choices) == {"none", "sliding_window", *flex_module.PATTERNS}
    for name, default in flex_module.PATTERN_DEFAULTS.items():
        assert v.params[name].default == default
    reasons = v.not_supported_reasons(flex_case(mode="fwd_bwd"))
    assert reasons and "backward" in reasons[0]
    if not torch.cuda.is_available():
        assert v.not_supported_reasons(flex_case(device="cuda")) == ["needs a CUDA GPU"]


# --------------------------------------------------------------------------------------------
# triton


def test_triton_registered_with_its_capabilities():
    v = get_variant("triton")
    s = v.supports
    assert (v.family, v.exact) == ("fused", True)
    assert s.devices == {"cuda"} and s.dtypes == {"float16", "bfloat16"} and not s.backward
    assert (s.min_head_dim, s.max_head_dim) == (16, 256) and s.gqa and s.causal


def test_triton_gives_clear_reasons():
    v = get_variant("triton")
    cpu = v.not_supported_reasons(make_case("triton", dtype="float16"))
    # every reason at once: the declared device, then the check's own (Triton missing, if it is)
    assert cpu == ["triton runs on cuda, not cpu"] + ([] if triton_module.HAS_TRITON else ["Triton is not installed"])
    cuda = v.not_supported_reasons(make_case("triton", device="cuda", dtype="float16"))
    if not triton_module.HAS_TRITON:
        assert "Triton is not installed" in cuda
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in cuda
    odd = v.not_supported_reasons(make_case("triton", device="cuda", dtype="float16", head_dim=48))
    assert any("power-of-two" in r for r in odd)


@pytest.mark.skipif(
    not (triton_module.HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton"
)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seq_len,head_dim", [(131, 64), (1024, 64), (131, 16), (1024, 128), (131, 256)])
def test_triton_matches_reference(dtype, causal, kv_heads, seq_len, head_dim, monkeypatch):
    monkeypatch.setenv(triton_module.TUNE_ENV, "fixed")  # one compile a shape: correctness, not tuning
    assert_exact(
        make_case("triton", device="cuda", dtype=dtype, causal=causal, kv_heads=kv_heads,
                  seq_len=seq_len, head_dim=head_dim)
    )


@pytest.mark.skipif(
    not (triton_module.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="runs the kernel in Triton's CPU interpreter: needs Triton and TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads,seq_len,head_dim", [(4, 131, 16), (2, 300, 64), (1, 1, 32), (1, 129, 128)])
def test_triton_kernel_in_interpreter(causal, kv_heads, seq_len, head_dim):
    """The kernel's logic without a GPU (float16 only: the interpreter's bfloat16 dot is broken)."""
    case = make_case("triton", dtype="float16", causal=causal, kv_heads=kv_heads, seq_len=seq_len,
                     head_dim=head_dim, batch=1)
    q, k, v = make_qkv(case)
    out = triton_module.triton_attention.fn(q, k, v, causal=causal)
    max_abs, rel = errors(out, reference_attention(q, k, v, masks.causal if causal else None))
    tol_abs, tol_rel = TOLERANCE["float16"]
    assert max_abs <= tol_abs and rel <= tol_rel, (max_abs, rel)
