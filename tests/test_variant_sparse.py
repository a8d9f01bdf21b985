"""block_sparse (local_global / bigbird / strided layouts) against hand-checked layouts and the float64 reference."""

import pytest
import torch

import variants.sparse  # noqa: F401  (registers block_sparse)
from harness import get_variant, masks
from harness.core.cases import Case
from harness.core.flops import pair_flops
from harness.measure.inputs import make_qkv
from harness.measure.memory import peak_memory_bytes
from tests.variant_checks import assert_exact, assert_exact_grads, forward_errors, make_case
from variants.sparse import PATTERNS, case_layout, pattern_layout, pattern_mask


def _rows(text: str) -> torch.Tensor:
    return torch.tensor([[ch == "1" for ch in line.split()[0]] for line in text.strip().splitlines()])


# 8 blocks, window_blocks=1, global_blocks=1 (block 0 is global: full row 0 and full column 0)
LOCAL_GLOBAL_8 = _rows("""
11111111
11100000
11110000
10111000
10011100
10001110
10000111
10000011
""")

# 8 blocks, window_blocks=1, stride=3: summary columns 2 and 5 (j % 3 == 2)
STRIDED_8 = _rows("""
11100100
11100100
01110100
00111100
00111100
00101110
00100111
00100111
""")


def _layout(pattern, causal, seq_len=32, **kw):
    kw.setdefault("block", 4)
    kw.setdefault("window_blocks", 1)
    kw.setdefault("global_blocks", 1)
    kw.setdefault("random_blocks", 2)
    kw.setdefault("stride", 3)
    kw.setdefault("seed", 0)
    return pattern_layout(pattern, seq_len, causal, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_local_global_layout_by_hand(causal):
    want = LOCAL_GLOBAL_8.tril() if causal else LOCAL_GLOBAL_8
    got = _layout("local_global", causal)
    assert got.dtype == torch.bool and got.shape == (8, 8)
    assert torch.equal(got, want)
    # a partial last block (30 tokens in blocks of 4) has the same block layout
    assert torch.equal(_layout("local_global", causal, seq_len=30), want)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_layout_by_hand(causal):
    want = STRIDED_8.tril() if causal else STRIDED_8
    assert torch.equal(_layout("strided", causal), want)


def test_more_layouts_by_hand():
    # two global blocks, no band beyond the diagonal
    want = _rows("""
    1111
    1111
    1110
    1101
    """)
    assert torch.equal(_layout("local_global", False, seq_len=16, window_blocks=0, global_blocks=2), want)
    # stride 1: every block is a summary column, so the layout is dense
    assert _layout("strided", False, stride=1).all()
    assert torch.equal(_layout("strided", True, stride=1), torch.ones(8, 8, dtype=torch.bool).tril())
    # a sequence shorter than one block: one block
    assert torch.equal(pattern_layout("bigbird", 5, True), torch.ones(1, 1, dtype=torch.bool))


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_layout_is_local_global_plus_random_blocks(causal):
    r = 2
    base = _layout("local_global", causal)
    got = _layout("bigbird", causal, random_blocks=r)
    extra = got & ~base
    assert torch.equal(got | base, got)  # contains the window and the global blocks
    assert not extra[0].any()  # the global row already sees everything
    i = torch.arange(8).view(-1, 1)
    j = torch.arange(8).view(1, -1)
    candidates = ~base & (i >= 1) & ((j < i) if causal else True)
    assert not (extra & ~candidates).any()
    assert torch.equal(extra.sum(1), candidates.sum(1).clamp(max=r))
    if causal:  # row 3 has one candidate (block 1), row 2 none, row 4 two (blocks 1, 2)
        assert extra[2].sum() == 0 and extra[3].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
        assert extra[4].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    else:
        assert (extra.sum(1)[1:] == r).all()
    assert torch.equal(_layout("bigbird", causal, random_blocks=0), base)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_random_blocks_are_seeded(causal):
    a = pattern_layout("bigbird", 2048, causal, block=32, seed=7)
    b = pattern_layout("bigbird", 2048, causal, block=32, seed=7)
    c = pattern_layout("bigbird", 2048, causal, block=32, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a.sum(1), c.sum(1))  # the same number of random blocks per row, different ones
    # many rows span more than one chunk of the random draw, and stay reproducible
    d = pattern_layout("bigbird", 300 * 4, causal, block=4, seed=3)
    assert torch.equal(d, pattern_layout("bigbird", 300 * 4, causal, block=4, seed=3))
    # params other than the seed do not leak into local_global / strided
    assert torch.equal(
        pattern_layout("local_global", 512, causal, block=16, seed=1, random_blocks=5),
        pattern_layout("local_global", 512, causal, block=16, seed=2, random_blocks=0),
    )


SMALL = {"block": 4, "window_blocks": 1, "global_blocks": 1, "random_blocks": 2, "stride": 3}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [30, 32, 3])
def test_token_mask_expands_the_layout(pattern, causal, seq_len):
    case = make_case("block_sparse", {"pattern": pattern, **SMALL}, causal=causal, seq_len=seq_len)
    layout = case_layout(case)
    want = layout.repeat_interleave(4, 0).repeat_interleave(4, 1)[:seq_len, :seq_len]
    if causal:
        want = want.tril()
    mask = pattern_mask(case)
    assert torch.equal(masks.dense_mask(mask, torch.arange(seq_len), seq_len), want)
    # any broadcastable index shapes, 0-dim included (FlexAttention calls it on scalars under vmap)
    q = torch.arange(seq_len).view(1, 1, -1, 1)
    kv = torch.arange(seq_len).view(1, 1, 1, -1)
    assert torch.equal(mask(None, None, q, kv), want.view(1, 1, seq_len, seq_len))
    for qi, ki in [(0, 0), (seq_len - 1, 0), (0, seq_len - 1), (seq_len // 2, seq_len - 1)]:
        got = mask(torch.tensor(0), torch.tensor(0), torch.tensor(qi), torch.tensor(ki))
        assert got.dim() == 0 and got.dtype == torch.bool and bool(got) == bool(want[qi, ki])


def test_token_mask_builds_a_flex_block_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    case = make_case("block_sparse", {"pattern": "bigbird", "block": 16}, causal=True, seq_len=200)
    mask = pattern_mask(case)
    dense = flex.create_mask(mask, None, None, 200, 200, device="cpu")[0, 0]
    assert torch.equal(dense, masks.dense_mask(mask, torch.arange(200), 200))
    flex.create_block_mask(mask, None, None, 200, 200, device="cpu", BLOCK_SIZE=16)


REF_PARAMS = {
    "local_global": {"block": 16, "window_blocks": 1, "global_blocks": 1},
    "bigbird": {"block": 16, "window_blocks": 1, "global_blocks": 1, "random_blocks": 2, "seed": 3},
    "strided": {"block": 16, "window_blocks": 1, "stride": 3},
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seq_len", [131, 200])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads,dtype", [(4, "float32"), (2, "float32"), (1, "float32"), (2, "bfloat16"),
                                            (1, "bfloat16")])
def test_block_sparse_matches_reference(pattern, seq_len, causal, kv_heads, dtype):
    params = {"pattern": pattern, **REF_PARAMS[pattern]}
    assert_exact(make_case("block_sparse", params, seq_len=seq_len, causal=causal, kv_heads=kv_heads, dtype=dtype))


@pytest.mark.parametrize(
    "params",
    [
        {"pattern": "local_global"},  # defaults: block 64, L=131 is 3 blocks with a short last one
        {"pattern": "bigbird", "block": 8, "window_blocks": 0, "global_blocks": 2, "random_blocks": 5},
        {"pattern": "strided", "block": 8, "window_blocks": 0, "stride": 2},
        {"pattern": "strided", "block": 7, "window_blocks": 2, "stride": 5},
        {"pattern": "local_global", "block": 16, "window_blocks": 100},  # dense
        {"pattern": "bigbird", "block": 1, "window_blocks": 3, "random_blocks": 4},  # token-level
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_other_params_match_reference(params, causal):
    assert_exact(make_case("block_sparse", params, causal=causal, kv_heads=2, seq_len=131))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_float16(pattern, causal):
    params = {"pattern": pattern, **REF_PARAMS[pattern]}
    assert_exact(make_case("block_sparse", params, causal=causal, kv_heads=2, dtype="float16"))


def test_structured_inputs_and_batch_one():
    case = make_case("block_sparse", {"pattern": "bigbird", "block": 16}, inputs="structured", batch=1, heads=3,
                     kv_heads=1, causal=True, seq_len=177)
    assert_exact(case)


def test_dense_layout_equals_dense_attention():
    case = make_case("block_sparse", {"pattern": "strided", "block": 16, "stride": 1}, seq_len=77)
    q, k, v = make_qkv(case)
    for causal in (False, True):
        out = get_variant("block_sparse")(q, k, v, causal=causal, **case.params)
        dense = get_variant("naive")(q, k, v, causal=causal)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_gradients(pattern, causal):
    params = {"pattern": pattern, **REF_PARAMS[pattern]}
    assert_exact_grads(make_case("block_sparse", params, causal=causal, kv_heads=2, seq_len=100))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 2 * 4 * 16 * 64 * 4])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
def test_query_block_chunks(monkeypatch, chunk_bytes, pattern, causal):
    # one query block per chunk, or three (some chunks with masked columns, some without)
    monkeypatch.setattr(variants.sparse, "CHUNK_BYTES", chunk_bytes)
    params = {"pattern": pattern, **REF_PARAMS[pattern]}
    case = make_case("block_sparse", params, causal=causal, kv_heads=2, seq_len=200)
    assert_exact(case)
    assert_exact_grads(case)


def test_block_sparse_bfloat16_gradients():
    params = {"pattern": "bigbird", **REF_PARAMS["bigbird"]}
    assert_exact_grads(make_case("block_sparse", params, causal=True, kv_heads=1, seq_len=90, dtype="bfloat16"))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len,block", [(131, 16), (200, 16), (5, 64), (1000, 64), (97, 7), (64, 64)])
def test_flops_count_the_masks_pairs(pattern, causal, seq_len, block):
    params = {"pattern": pattern, "block": block, "random_blocks": 2, "stride": 3}
    case = make_case("block_sparse", params, causal=causal, seq_len=seq_len, batch=2, heads=3, kv_heads=1, head_dim=24)
    variant = get_variant("block_sparse")
    pairs = masks.pairs(variant.reference_mask(case), seq_len)
    assert variant.flops(case) == 4 * 2 * 3 * 24 * pairs == pair_flops(case, pairs)
    full = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    assert variant.columns(case)["density"] == pytest.approx(pairs / full)


@pytest.mark.parametrize("causal", [False, True])
def test_density(causal):
    variant = get_variant("block_sparse")
    dense = make_case("block_sparse", {"pattern": "local_global", "window_blocks": 10**6}, causal=causal, seq_len=300)
    assert variant.columns(dense)["density"] == 1.0
    sparse = [
        variant.columns(make_case("block_sparse", {"pattern": p}, causal=causal, seq_len=4096))["density"]
        for p in PATTERNS
    ]
    assert all(0 < d < 0.25 for d in sparse)


def test_long_layout_is_refused_not_built():
    variant = get_variant("block_sparse")
    case = make_case("block_sparse", {"block": 1}, seq_len=1 << 20)
    reasons = variant.not_supported_reasons(case)
    assert reasons and "larger block" in reasons[0]
    assert variant.not_supported_reasons(make_case("block_sparse", {}, seq_len=1 << 20)) == []


@pytest.mark.parametrize("pattern", PATTERNS)
def test_memory_is_not_dense(pattern):
    variant = get_variant("block_sparse")
    case = Case("block_sparse", params={**{n: p.default for n, p in variant.params.items()}, "pattern": pattern},
                batch=1, heads=2, kv_heads=2, seq_len=4096, head_dim=32)
    q, k, v = make_qkv(case)
    dense_scores = case.heads * case.seq_len**2 * 4
    with torch.no_grad():
        variant(q, k, v, causal=False, **case.params)  # build the cached plan
        peak = peak_memory_bytes(lambda: variant(q, k, v, causal=False, **case.params), "cpu")
    # forward: query-block chunks keep the peak near a few copies of q plus one chunk's scores
    assert peak < dense_scores / 4
    assert 0.5 * variant.working_set(case) <= peak <= 1.5 * variant.working_set(case)
    # backward keeps the kept blocks' probabilities and gathered K/V: density 8-17%, less than one
    # dense score matrix (naive keeps two)
    for mode in ("bwd", "fwd_bwd"):
        assert variant.working_set(Case(**{**case.__dict__, "mode": mode})) < dense_scores
    max_abs, rel = forward_errors(case)
    assert max_abs < 2e-4 and rel < 2e-5
