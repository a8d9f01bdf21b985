"""Inference-shaped attention: bottom-right causal for every non-square variant, split-K, paged caches,
variable-length batches, each against float64 attention computed here per sequence."""

from __future__ import annotations

import math

import pytest
import torch

from harness import get_variant, masks
from harness.core.cases import Case
from harness.measure.derive import derive
from harness.measure.inputs import dense_kv, layout_inputs, make_qkv
from harness.measure.reference import TOLERANCE, errors, reference_attention
from variants import flex, inference, paged

flex_runs = pytest.mark.skipif(flex.unavailable("cpu") is not None, reason=str(flex.unavailable("cpu")))

#: Every exact variant that takes q_len != kv_len, with parameters to cover its paths.
NON_SQUARE = [
    ("naive", {}), ("sdpa", {"backend": "auto"}), ("sdpa", {"backend": "math"}), ("sdpa", {"backend": "flash"}),
    ("tiled", {"block_q": 16, "block_k": 32, "compute": "input"}), ("decode_split_k", {"splits": "auto"}),
    ("decode_split_k", {"splits": 3}), ("padded", {}), ("packed", {"path": "auto", "tile": 16}),
    ("packed", {"path": "loop", "tile": 16}),
    pytest.param("flex", {"mask": "none", "window": 256, "tile": 16}, marks=flex_runs),
]
PAGED_PATHS = ["gather", "pages", pytest.param("flex", marks=flex_runs)]


def case_of(name, params=None, **axes) -> Case:
    variant = get_variant(name)
    full = {n: p.default for n, p in variant.params.items()} | (params or {})
    axes = {"batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "seq_len": 131, "causal": True} | axes
    return Case.from_point(name, full, {"kv_len": None, **axes})


def run(case: Case, seed: int = 0):
    """(q, dense k, dense v, output, extra) of ``case`` through the harness's own input path."""
    q, k, v = make_qkv(case, seed=seed)
    k_in, v_in, extra = layout_inputs(case, k, v, seed=seed)
    with torch.no_grad():
        out = get_variant(case.variant)(q, k_in, v_in, causal=case.causal, **extra, **case.params)
    assert out.shape == q.shape and torch.isfinite(out).all()
    return q, k, v, out, extra


def per_sequence(q, k, v, q_lens, kv_lens, causal) -> torch.Tensor:
    """Float64 attention of each sequence alone (its own rows and keys), bottom-right causal written
    out by hand; padding query rows zero. Independent of harness.core.masks and the reference."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    G = q.shape[1] // k.shape[1]
    for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
        qb = q[b, :, :nq].double()
        kb, vb = (x[b, :, :nk].double().repeat_interleave(G, 0) for x in (k, v))
        s = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            i, j = torch.arange(nq).view(-1, 1), torch.arange(nk).view(1, -1)
            s = s.masked_fill(j > i + (nk - nq), float("-inf"))
        out[b, :, :nq] = torch.softmax(s, -1) @ vb
    return out


def assert_close(out, want, dtype="float32"):
    max_abs, rel = errors(out, want)
    tol_abs, tol_rel = TOLERANCE[dtype]
    assert max_abs <= tol_abs and rel <= tol_rel, (max_abs, rel)


@pytest.mark.parametrize("name,params", NON_SQUARE)
@pytest.mark.parametrize("q_len,kv_len", [(1, 131), (7, 131), (131, 131), (1, 1), (64, 64 + 37)])
def test_bottom_right_causal_for_every_non_square_variant(name, params, q_len, kv_len):
    case = case_of(name, params, q_len=q_len, seq_len=kv_len)
    q, k, v, out, _ = run(case)
    B = case.batch
    assert_close(out, per_sequence(q, k, v, [q_len] * B, [kv_len] * B, True))
    if not case.causal or q_len == kv_len:
        return
    # and not PyTorch's top-left alignment: the last query of a decode step sees every key
    top_left = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    assert errors(out, top_left)[1] > 1e-2


def test_bottom_right_is_the_last_rows_of_square_causal_attention():
    """The float64 reference under masks.bottom_right_causal equals square causal attention's last rows."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    square = reference_attention(q, k, v, masks.causal)
    for q_len in (1, 9, 50):
        rows = reference_attention(q[:, :, -q_len:], k, v, masks.bottom_right_causal(q_len, 50))
        torch.testing.assert_close(rows, square[:, :, -q_len:], rtol=1e-12, atol=1e-12)
    assert masks.bottom_right_causal(50, 50) is masks.causal


@pytest.mark.parametrize("q_len", [1, 5])
def test_kv_quant_takes_decode_cases(q_len):
    case = case_of("kv_quant", {"bits": 8, "group": 16}, q_len=q_len, seq_len=200)
    assert not get_variant("kv_quant").not_supported_reasons(case)
    q, k, v, out, _ = run(case)
    _, rel = errors(out, per_sequence(q, k, v, [q_len] * 2, [200] * 2, True))
    assert 0 < rel < 2e-2  # int8 K/V: an approximation, but of bottom-right causal attention


@pytest.mark.parametrize("splits", inference.SPLIT_CHOICES)
@pytest.mark.parametrize("lengths", ["fixed", "5,131"])
def test_split_k_combine_is_exact_against_unsplit(splits, lengths):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 131, 16, generator=g, dtype=torch.float64) for _ in range(2))
    kw = {}
    if lengths != "fixed":
        kw = {"q_lens": torch.tensor([3, 3], dtype=torch.int32), "kv_lens": torch.tensor([5, 131], dtype=torch.int32)}
    whole = inference.decode_split_k(q, k, v, causal=True, splits=1, **kw)
    split = inference.decode_split_k(q, k, v, causal=True, splits=splits, **kw)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    outs, lses = inference.split_k_partials(q, k, v, True, 7, **kw)
    assert outs.shape[0] == 7 and torch.isfinite(lses.logsumexp(0)).all()


def test_auto_splits_follow_the_shape():
    assert inference.auto_splits(1, 65536, 4) == 1  # 1 MiB of scores: one split on the CPU
    assert inference.auto_splits(8, 65536, 32) == 64  # 64 MiB of scores: 1 MiB splits
    assert inference.auto_splits(256, 65536, 32, "cpu") == 256  # at least 256 keys a split
    assert inference.auto_splits(1, 300, 64) == 1


@pytest.mark.parametrize("page_size,lengths", [(16, "fixed"), (16, "1,131,17,64"), (7, "uniform"), (128, "zipf")])
def test_paged_cache_gathers_back_to_the_contiguous_one(page_size, lengths):
    case = case_of("paged", batch=4, q_len=1, kv_layout="paged", page_size=page_size, lengths=lengths)
    q, k, v = make_qkv(case, seed=5)
    k_pool, v_pool, extra = layout_inputs(case, k, v, seed=5)
    kv_lens = extra["kv_lens"].tolist()
    assert k_pool.shape[1:] == (2, page_size, 16) and k_pool.shape[0] == sum(-(-n // page_size) for n in kv_lens)
    kd, vd = dense_kv(case, k_pool, v_pool, extra)
    for b, n in enumerate(kv_lens):
        assert torch.equal(kd[b, :, :n], k[b, :, :n]) and torch.equal(vd[b, :, :n], v[b, :, :n])
        assert torch.equal(paged.gather_pages(k_pool, extra["block_table"])[b, :, :n], k[b, :, :n])
    table = extra["block_table"][0, : -(-kv_lens[0] // page_size)]
    if len(table) > 2:  # pages shuffled over the pool, not laid out in order
        assert not torch.equal(table, torch.arange(table[0], table[0] + len(table), dtype=table.dtype))
    again = layout_inputs(case, k, v, seed=6)[2]["block_table"]
    assert not torch.equal(again, extra["block_table"]) or len(table) <= 2  # the order comes from the seed


@pytest.mark.parametrize("path", PAGED_PATHS)
@pytest.mark.parametrize("q_len,lengths,causal", [(1, "fixed", True), (4, "1,131,17,64", True),
                                                  (3, "uniform", False), (None, "7,40,1,33", True)])
def test_paged_attention_against_float64_per_sequence(path, q_len, lengths, causal):
    lengths = "4,131,17,64" if (q_len == 4 and lengths.startswith("1,")) else lengths  # causal: no length < q_len
    case = case_of("paged", {"path": path}, batch=4, q_len=q_len, seq_len=131, causal=causal,
                   kv_layout="paged", page_size=16, lengths=lengths)
    reasons = get_variant("paged").not_supported_reasons(case)
    if reasons:  # flex here takes one tile of queries
        assert path == "flex" and q_len is None and "q_len <= 128" in reasons[0], reasons
        return
    q, k, v, out, extra = run(case)
    assert_close(out, per_sequence(q, k, v, extra["q_lens"].tolist(), extra["kv_lens"].tolist(), causal))


VARLEN = [("padded", {}), ("packed", {"path": "auto", "tile": 16}), ("packed", {"path": "nested", "tile": 16}),
          ("packed", {"path": "loop", "tile": 16}),
          pytest.param("packed", {"path": "flex", "tile": 16}, marks=flex_runs), ("decode_split_k", {"splits": 4})]


@pytest.mark.parametrize("name,params", VARLEN)
@pytest.mark.parametrize("q_len,causal", [(None, True), (None, False), (1, True), (6, False)])
def test_varlen_against_float64_per_sequence(name, params, q_len, causal):
    case = case_of(name, params, batch=4, q_len=q_len, seq_len=131, causal=causal, lengths="1,131,17,64")
    reasons = get_variant(name).not_supported_reasons(case)
    if reasons:
        assert params.get("path") == "nested" and causal and (q_len or 131) > 1, reasons
        return
    q, k, v, out, extra = run(case)
    q_lens, kv_lens = extra["q_lens"].tolist(), extra["kv_lens"].tolist()
    assert 1 in kv_lens and 131 in kv_lens
    assert_close(out, per_sequence(q, k, v, q_lens, kv_lens, causal))  # padding rows must be zero too


def test_padded_reports_its_useful_flops():
    case = case_of("padded", batch=4, q_len=None, seq_len=100, causal=False, lengths="100,50,50,100")
    cols = get_variant("padded").columns(case)
    assert get_variant("padded").flops(case) == 4 * 4 * 4 * 16 * 100 * 100
    assert cols["useful_flops"] == 4 * 4 * 16 * (100 * 100 * 2 + 50 * 50 * 2)
    assert derive({**cols, "flops": get_variant("padded").flops(case)})["useful_fraction"] == pytest.approx(0.625)


def test_variants_without_support_skip_inference_cases_with_reasons():
    decode = case_of("sliding_window", q_len=1)
    assert any("q_len" in r for r in get_variant("sliding_window").not_supported_reasons(decode))
    varlen = case_of("sdpa", lengths="zipf")
    assert any("variable-length" in r for r in get_variant("sdpa").not_supported_reasons(varlen))
    paged_case = case_of("sdpa", kv_layout="paged", page_size=16)
    assert any("paged" in r for r in get_variant("sdpa").not_supported_reasons(paged_case))
    assert any("paged" in r or "contiguous" in r for r in
               get_variant("paged").not_supported_reasons(case_of("paged")))
    if flex.unavailable("cpu") is None:
        window = case_of("flex", {"mask": "sliding_window"}, q_len=1)
        assert get_variant("flex").not_supported_reasons(window)
