"""naive, sdpa, sliding_window and linear against the float64 reference; the registry's declarations
(families, baselines, default FLOPs, skip reasons) and masks in the attention-gym style."""

import math
import textwrap

import pandas as pd
import pytest
import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

from harness import Param, RegistryError, Supports, attention_flops, get_variant, masks, register_variant
from harness.core import registry
from harness.measure.inputs import make_qkv
from harness.measure.reference import errors
from tests.runs import measured
from tests.variant_checks import assert_exact, assert_exact_grads, forward_errors, gym_mask, make_case
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
        m = and_masks(masks.causal, m)
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


# --------------------------------------------------------------------------------------------
# masks written the attention-gym way: b and h are index tensors, combined with torch's and_masks


def test_attention_gym_mask_with_torch_and_masks_in_the_float64_reference():
    from harness.measure.reference import reference_attention

    B, H, L, D = 2, 3, 70, 16
    mask, explicit = gym_mask(B, L)
    want_mask = explicit(H)
    # the pattern really differs between batches and between heads, so a reference ignoring b or h fails
    assert not torch.equal(want_mask[0], want_mask[1]) and not torch.equal(want_mask[:, 0], want_mask[:, 2])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    want = torch.softmax(s.masked_fill(~want_mask, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(reference_attention(q, k, v, mask), want, rtol=1e-12, atol=1e-12)
    rows = torch.tensor([0, 5, 69])  # a subset of query rows is checked exactly the same way
    torch.testing.assert_close(reference_attention(q, k, v, mask, rows=rows), want[:, :, rows], rtol=1e-12, atol=1e-12)
    for b in range(B):
        for h in range(H):
            assert torch.equal(masks.dense_mask(mask, torch.arange(L), L, b, h), want_mask[b, h])
    # or_masks too: the per-head window or the first key (an attention sink)
    sink = or_masks(lambda b, h, q_idx, kv_idx: kv_idx == 0, mask)
    assert torch.equal(masks.dense_mask(sink, torch.arange(L), L, 1, 2), want_mask[1, 2] | (torch.arange(L) == 0))


# --------------------------------------------------------------------------------------------
# the registry: declared families, baselines, default FLOPs, all skip reasons at once


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry with the built-ins loaded; registrations made in the test are forgotten after it."""
    registry.list_variants()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


def _copy_of_naive(q, k, v, *, causal):
    return get_variant("naive")(q, k, v, causal=causal)


def test_unknown_family_is_refused_naming_the_allowed_ones(scratch_registry, tmp_path):
    from harness.engine.plugins import PluginError, load_plugin

    plugin = tmp_path / "sparse_plugin.py"
    plugin.write_text(textwrap.dedent("""
        from harness import register_variant, pair_flops
        @register_variant("my_sparse", family="block_sparse", exact=True, flops=lambda case: pair_flops(case, 1))
        def my_sparse(q, k, v, *, causal):
            return q
    """))
    with pytest.raises(PluginError) as err:
        load_plugin("sparse_plugin.py", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "'my_sparse'" in message and "unknown family 'block_sparse'" in message
    assert "did you mean sparse?" in message
    assert "allowed: " + ", ".join(registry.FAMILIES) in message
    assert "my_sparse" not in registry.variant_names()
    for family in ("quantised", "inference", "distributed", "layer", "dense", "sparse", "local"):
        assert family in registry.FAMILIES
    assert {v.family for v in registry.list_variants()} <= set(registry.FAMILIES)


def test_report_crossover_families_come_from_the_registry():
    from reports.analysis import is_candidate

    assert {f for f in registry.FAMILIES if is_candidate(f, True)} == registry.PATTERN_FAMILIES == {"local", "sparse"}
    assert all(is_candidate(f, False) for f in registry.FAMILIES)  # every approximate variant is compared


def test_flops_default_to_exact_attention_and_approximations_must_declare_theirs(scratch_registry):
    exact = register_variant("plain_exact", family="dense", exact=True)(_copy_of_naive)
    assert exact.flops is attention_flops
    assert get_variant("naive").flops is attention_flops and get_variant("sdpa").flops is attention_flops
    with pytest.raises(RegistryError, match="'plain_approx'.*approximate variant must declare flops="):
        register_variant("plain_approx", family="linear", exact=False)
    with pytest.raises(RegistryError, match="'plain_masked'.*with a mask must declare flops="):
        register_variant("plain_masked", family="local", exact=True, mask=lambda case: masks.sliding_window(4))
    with pytest.raises(RegistryError, match="'approx_baseline'.*only an exact variant can be a baseline"):
        register_variant("approx_baseline", family="linear", exact=False, flops=attention_flops, baseline=True)
    assert not {"plain_approx", "plain_masked", "approx_baseline"} & set(registry.variant_names())


def test_all_skip_reasons_at_once_declared_limits_and_check(scratch_registry):
    from harness.measure.timing import TimingConfig

    register_variant(
        "picky", family="dense", exact=True, supports=Supports(dtypes={"float32"}, causal=False),
        check=lambda case: [f"picky needs an even head_dim, not {case.head_dim}"] if case.head_dim % 2 else [],
        params={"block": Param(8, min=1)},
    )(lambda q, k, v, *, causal, block=8: _copy_of_naive(q, k, v, causal=causal))
    case = make_case("picky", dtype="bfloat16", causal=True, head_dim=33)
    row = measured(case, TimingConfig())
    assert row["status"] == "skipped"
    assert row["reason"] == ("picky supports dtypes float32, not bfloat16; picky has no causal form; "
                             "picky needs an even head_dim, not 33")
    # the check alone, and nothing at all when the case fits
    assert get_variant("picky").not_supported_reasons(make_case("picky", dtype="float32", head_dim=33)) == [
        "picky needs an even head_dim, not 33"]
    assert get_variant("picky").not_supported_reasons(make_case("picky", dtype="float32", head_dim=32)) == []


def test_declared_baseline_is_the_crossover_baseline(scratch_registry, tmp_path):
    from harness.engine.plugins import load_plugin
    from harness.engine.runner import base_row
    from reports.analysis import baseline_label, crossovers, with_labels

    (tmp_path / "base_plugin.py").write_text(textwrap.dedent("""
        from harness import get_variant, register_variant
        @register_variant("house_dense", family="dense", exact=True, baseline=True)
        def house_dense(q, k, v, *, causal):
            return get_variant("naive")(q, k, v, causal=causal)
    """))
    load_plugin("base_plugin.py", tmp_path)
    assert get_variant("sdpa").baseline and get_variant("house_dense").baseline
    assert not get_variant("naive").baseline

    def rows(*variants):
        out = []
        for name, params in variants:
            for L in (256, 512, 1024):
                case = make_case(name, params, seq_len=L)
                row = base_row(case, get_variant(name))  # the row as a run records it
                row.update(time_ms=(5e-3 if name == "sliding_window" else 1e-5 * L) * L, peak_mem_bytes=8.0 * L * L)
                out.append(row)
        return with_labels(pd.DataFrame(out))

    naive, sdpa = ("naive", {}), ("sdpa", {"backend": "flash"})
    house, local = ("house_dense", {}), ("sliding_window", {"window": 16})
    label, why = baseline_label(rows(naive, house, local))
    assert (label, why) == ("house_dense", "house_dense (declared baseline)")  # declared, before naive
    cross = crossovers(rows(naive, house, local))
    assert list(cross["label"]) == ["sliding_window(block=64,window=16)"]
    assert list(cross["baseline"]) == ["house_dense"] and cross["time_text"].iloc[0] == "L ≈ 500 (between 256 and 512)"
    # several declared baselines: the name rules break the tie (sdpa flash first)
    assert baseline_label(rows(naive, house, sdpa, local)) == ("sdpa(backend=flash)", "sdpa flash")
    # no declared baseline ran: the name rules alone
    unknown = rows(naive, local)
    assert baseline_label(unknown) == ("naive", "naive (no sdpa in this configuration)")
    # a plugin this process has not loaded (bench report DIR): the rows' own `baseline` column, where recorded
    gone = rows(naive).assign(variant="gone_plugin", label="gone_plugin", baseline=True)
    assert "gone_plugin" not in registry.variant_names()
    recorded = pd.concat([unknown.assign(baseline=False), gone])
    assert baseline_label(recorded) == ("gone_plugin", "gone_plugin (declared baseline)")
