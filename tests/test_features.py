"""Attention features: the float64 reference against hand-written formulas, the case identity,
FLOP counts, skip reasons, register_variant(score_mod=...) and the report's Cost of features.

The hand-written attention below computes every feature with plain Python floats, element by
element, from the definitions in harness.core.features: nothing of harness.core.masks or the
reference is shared with it.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from harness import get_variant, masks
from harness.core import features as core_features
from harness.core.cases import DEFAULTS, FEATURES, Case
from harness.core.config import TimingConfig
from harness.core.flops import attention_flops, case_pairs
from harness.core.registry import _REGISTRY, RegistryError, register_variant
from harness.measure.inputs import dense_kv, layout_inputs, make_qkv
from harness.measure.reference import reference_attention, reference_grads
from tests.runs import measured

FAST = TimingConfig(warmup=0, min_time_s=0.0, min_reps=1, max_reps=2, processes=1)


# -- the reference against a hand-written formula ------------------------------------------------


def hand_attention(q, k, v, *, causal, softcap=0.0, slopes=None, sinks=None, window=None, prefix=0, starts=None):
    """Attention of float64 (B, H, Lq, D) q on (B, Hkv, Lk, D|Dv) k, v, written out element by element."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = q.tolist(), k.tolist(), v.tolist()
    doc = None if starts is None else [max(i for i, s in enumerate(starts) if s <= j) for j in range(Lk)]
    out = torch.zeros(B, H, Lq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(Lq):
                p = Lk - Lq + i
                logits = {}
                for j in range(Lk):
                    seen = (j <= p or j < prefix) if causal else True
                    seen = seen and (window is None or abs(p - j) <= window)
                    seen = seen and (doc is None or doc[j] == doc[min(max(p, 0), Lk - 1)])
                    if not seen:
                        continue
                    s = sum(a * c for a, c in zip(q[b][h][i], k[b][g][j])) / math.sqrt(D)
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= slopes[h] * abs(p - j)
                    logits[j] = s
                if not logits:
                    continue
                top = max(logits.values())
                weights = {j: math.exp(s - top) for j, s in logits.items()}
                denom = sum(weights.values()) + (math.exp(sinks[h] - top) if sinks is not None else 0.0)
                for d in range(Dv):
                    out[b, h, i, d] = sum(w * v[b][g][j][d] for j, w in weights.items()) / denom
    return out


FEATURE_CASES = [
    dict(softcap=3.0), dict(alibi=True), dict(sinks=True), dict(v_head_dim=6), dict(sliding_window=2),
    dict(prefix_lm=4), dict(document=3), dict(softcap=2.0, alibi=True, sinks=True, sliding_window=3, document=2),
]


@pytest.mark.parametrize("features", FEATURE_CASES, ids=lambda f: ",".join(f))
@pytest.mark.parametrize("shape", [dict(seq_len=9), dict(q_len=3, seq_len=9)], ids=["prefill", "decode"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_the_hand_written_formula(features, shape, causal):
    if features.get("prefix_lm") and not causal:
        pytest.skip("prefix-LM is a causal mask")
    case = Case("naive", batch=2, heads=4, kv_heads=2, head_dim=4, causal=causal, **shape, **features)
    q, k, v = (x.double() for x in make_qkv(case, seed=3))
    _, _, extra = layout_inputs(case, k, v, seed=3)
    ref = reference_attention(q, k, v, masks.case_mask(case), score_mod=masks.case_score_mod(case),
                              sinks=extra.get("sinks"))
    hand = hand_attention(
        q, k, v, causal=causal, softcap=case.softcap, sinks=extra["sinks"].tolist() if case.sinks else None,
        slopes=[float(torch.tensor(m, dtype=torch.float32)) for m in core_features.alibi_slopes(4)] if case.alibi
        else None, window=case.sliding_window, prefix=case.prefix_lm,
        starts=core_features.document_starts(case.seq_len, case.document) if case.document > 1 else None)
    assert ref.shape == hand.shape == (2, 4, case.query_len, case.value_dim)
    assert torch.allclose(ref, hand, atol=1e-12, rtol=0)
    plain = reference_attention(q, k, v, masks.case_mask(Case("naive", causal=causal, **shape)))
    if case.value_dim == 4 and not (case.prefix_lm and case.q_len):  # decode queries are all past the prefix
        assert not torch.allclose(ref, plain, atol=1e-6)  # the feature changed the answer


def test_alibi_slopes_are_the_papers():
    assert core_features.alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the 4 of the largest power of two, then every other slope of 8
    assert core_features.alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert masks.alibi_slopes(12).dtype == torch.float32 and len(masks.alibi_slopes(12)) == 12


def test_documents_are_drawn_from_the_shape_only():
    starts = core_features.document_starts(100, 5)
    assert starts[0] == 0 and len(set(starts)) == 5 and list(starts) == sorted(starts) and starts[-1] < 100
    assert core_features.document_starts(100, 5) == starts and core_features.document_starts(101, 5) != starts
    ids = masks.document_ids(100, 5)
    assert ids[0] == 0 and ids[-1] == 4 and all(ids[s] == d for d, s in enumerate(starts))


def test_reference_gradients_flow_through_the_score_mod_and_sinks():
    case = Case("naive", batch=1, heads=2, kv_heads=2, seq_len=5, head_dim=3, causal=True, softcap=2.0, alibi=True,
                sinks=True)
    q, k, v = (x.double() for x in make_qkv(case))
    _, _, extra = layout_inputs(case, k, v)
    mods = dict(score_mod=masks.case_score_mod(case), sinks=extra["sinks"])
    grad = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    got = reference_grads(q, k, v, masks.case_mask(case), grad, **mods)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(reference_attention(*leaves, masks.case_mask(case), **mods), leaves, grad)
    assert all(torch.allclose(a, b) for a, b in zip(got, want)) and all(g.abs().sum() > 0 for g in got)


# -- identity, suite keys, FLOPs ---------------------------------------------------------------


def test_cases_without_the_new_keys_keep_their_ids():
    plain = Case("sdpa", {"backend": "flash"}, seq_len=1024, causal=True)
    assert plain.case_id == "3deb0b997fee8271"  # as before the feature keys existed (tests/test_inference_suite.py)
    defaults = {name: DEFAULTS[name] for name in FEATURES}
    assert Case("sdpa", {"backend": "flash"}, seq_len=1024, causal=True, **defaults).case_id == plain.case_id
    assert not set(FEATURES) & set(plain.message()) and plain.features == {}
    featured = Case("sdpa", {"backend": "flash"}, seq_len=1024, causal=True, softcap=30)
    assert featured.case_id != plain.case_id and featured.message()["softcap"] == 30.0
    assert Case("sdpa", {"backend": "flash"}, seq_len=1024, causal=True, softcap=30.0).case_id == featured.case_id
    assert featured.label().endswith("softcap=30")


def test_a_suite_sweeps_features_and_normalises_what_changes_nothing():
    from harness.engine.suite import expand_cases, parse_suite

    suite = parse_suite("[defaults]\nhead_dim = 32\n[sweep]\ncausal = [false, true]\nprefix_lm = [0, 8]\n"
                        "v_head_dim = [32, 16]\n[[variant]]\nname = 'naive'\n")
    cases = expand_cases(suite)
    # prefix-LM without causal and v_head_dim = head_dim are the plain cases: 2 causal × 2 + 1 × 2 non-causal
    assert len(cases) == 6 and {c.v_head_dim for c in cases} == {None, 16}
    assert all(c.prefix_lm == 0 for c in cases if not c.causal)
    assert len({c.label() for c in cases}) == 6


@pytest.mark.parametrize("features", [dict(sliding_window=3), dict(prefix_lm=5), dict(document=4),
                                      dict(sliding_window=2, document=3, prefix_lm=2)], ids=str)
@pytest.mark.parametrize("shape", [dict(seq_len=23), dict(q_len=4, seq_len=23),
                                   dict(q_len=2, seq_len=23, lengths="uniform", batch=3)],
                         ids=["square", "decode", "varlen"])
@pytest.mark.parametrize("causal", [False, True])
def test_flops_count_the_pairs_the_mask_keeps(features, shape, causal):
    case = Case("naive", causal=causal, heads=2, kv_heads=2, head_dim=8, **{"batch": 1, **shape}, **features)
    m = masks.batch_head_mask(masks.case_mask(case), torch.arange(case.query_len), case.seq_len, case.batch, 1)
    assert case_pairs(case) == pytest.approx(m.sum().item() / case.batch)
    assert attention_flops(case) == pytest.approx(4 * case.batch * 2 * 8 * m.sum().item() / case.batch)


def test_a_value_head_size_counts_its_own_matmul():
    assert attention_flops(Case("naive", head_dim=192, v_head_dim=128)) == pytest.approx(
        2 * 8 * (192 + 128) * 1024 * 1024)
    assert attention_flops(Case("naive", softcap=30.0, alibi=True, sinks=True)) == attention_flops(Case("naive"))


# -- who takes what: skip reasons -------------------------------------------------------------


@pytest.mark.parametrize("name,features,words", [
    ("sdpa", dict(softcap=30.0), ["sdpa does not take softcap = 30", "no hook between QKᵀ and the softmax"]),
    ("sdpa", dict(sinks=True), ["sdpa does not take sinks"]),
    ("linear", dict(alibi=True), ["linear does not take alibi"]),
    ("sliding_window", dict(sliding_window=8), ["sliding_window does not take sliding_window = 8"]),
    ("decode_split_k", dict(document=99), ["needs at least as many keys"]),
    ("flex", dict(alibi=True, params={"mask": "strided"}), ["takes no attention features"]),
    ("paged", dict(softcap=5.0, params={"path": "flex"}, q_len=1, kv_layout="paged", page_size=16),
     ["paged path 'flex' takes no attention features"]),
    ("triton", dict(prefix_lm=4, causal=True, device="cuda", dtype="float16"), ["triton does not take prefix_lm"]),
    ("flash_attn", dict(sinks=True, device="cuda", dtype="float16"), ["flash_attn does not take sinks"]),
])
def test_variants_that_do_not_take_a_feature_skip_with_the_reason(name, features, words):
    params = {n: p.default for n, p in get_variant(name).params.items()}
    params.update(features.pop("params", {}))
    case = Case(name, params, heads=2, kv_heads=2, head_dim=16, seq_len=64, **features)
    row = measured(case, FAST)
    assert row["status"] == "skipped", row["reason"]
    assert all(w in row["reason"] for w in words), row["reason"]


def test_bench_list_says_who_takes_what():
    described = {v["name"]: v for v in (get_variant(n).describe() for n in ("naive", "sdpa", "linear", "triton"))}
    assert described["naive"]["features"] == list(FEATURES)
    assert "softcap" not in described["sdpa"]["features"] and "alibi" in described["sdpa"]["features"]
    assert described["linear"]["features"] == [] and described["naive"]["score_mod"] is False
    assert set(described["triton"]["features"]) >= {"softcap", "sliding_window"}


# -- register_variant(score_mod=...) ---------------------------------------------------------


def generate_tanh_softcap(soft_cap: int):
    """attention-gym's tanh softcap score_mod, written as it writes it."""
    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return soft_cap * torch.tanh(score / soft_cap)

    return tanh_softcap


def generate_alibi_bias(H: int):
    """attention-gym's ALiBi score_mod (its slopes: exp2(-8(h+1)/H); its bias: (kv_idx - q_idx)·slope)."""
    alibi_bias = torch.exp2(-((torch.arange(H) + 1) * 8.0 / H))

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + alibi_bias[h] * (kv_idx - q_idx)

    return alibi_mod


def _gym_score_mod(case):
    cap, alibi = generate_tanh_softcap(20), generate_alibi_bias(case.heads)
    return lambda score, b, h, q_idx, kv_idx: alibi(cap(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)


def _eager(q, k, v, causal, score_mod):
    """Dense attention applying ``score_mod`` the way a plugin might: on the whole score tensor at once."""
    H, L = q.shape[1], q.shape[2]
    k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    idx = torch.arange(L)
    if score_mod is not None:
        s = score_mod(s, None, torch.arange(H).view(1, -1, 1, 1), idx.view(-1, 1), idx.view(1, -1))
    if causal:
        s = s.masked_fill(idx.view(-1, 1) < idx.view(1, -1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.fixture
def gym_variants():
    names = ("gym_eager", "gym_forgets")
    try:
        register_variant("gym_eager", family="dense", exact=True, score_mod=_gym_score_mod)(
            lambda q, k, v, *, causal: _eager(q, k, v, causal, _gym_score_mod(Case("x", heads=q.shape[1]))))
        register_variant("gym_forgets", family="dense", exact=True, score_mod=_gym_score_mod)(
            lambda q, k, v, *, causal: _eager(q, k, v, causal, None))  # claims the score_mod, does not apply it
        yield names
    finally:
        for n in names:
            _REGISTRY.pop(n, None)


def test_a_plugins_score_mod_is_what_the_reference_applies(gym_variants):
    for causal in (False, True):
        right = measured(Case("gym_eager", heads=4, kv_heads=2, seq_len=40, head_dim=16, causal=causal), FAST)
        assert right["status"] == "ok" and right["rel_err"] < 1e-6, right["reason"]
        wrong = measured(Case("gym_forgets", heads=4, kv_heads=2, seq_len=40, head_dim=16, causal=causal), FAST)
        assert wrong["status"] == "incorrect", wrong
    assert get_variant("gym_eager").describe()["score_mod"] is True


def test_the_reference_calls_a_score_mod_as_flex_attention_does():
    seen = []

    def spy(score, b, h, q_idx, kv_idx):
        seen.append((b.shape, h.shape, tuple(q_idx.shape), tuple(kv_idx.shape), score.dtype))
        return score

    q = torch.randn(2, 3, 5, 4)
    reference_attention(q, q, q, None, score_mod=spy)
    assert len(seen) == 6 and seen[0] == (torch.Size([]), torch.Size([]), (5, 1), (1, 5), torch.float64)


def test_a_score_mod_with_a_mask_still_needs_its_flops():
    with pytest.raises(RegistryError, match="must declare flops"):
        register_variant("gym_masked", family="dense", exact=True, mask=lambda c: None, score_mod=_gym_score_mod)


# -- the runner: every feature through a whole case, forward and backward ------------------------------


def test_a_case_with_every_feature_is_measured_forward_and_backward():
    case = Case("naive", heads=4, kv_heads=2, seq_len=48, head_dim=16, v_head_dim=8, causal=True, mode="fwd_bwd",
                softcap=10.0, alibi=True, sinks=True, sliding_window=12, prefix_lm=6, document=3)
    row = measured(case, FAST)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-4
    assert row["flops"] == pytest.approx(3.5 * attention_flops(case))
    q, k, v = make_qkv(case)
    assert v.shape[-1] == 8 and dense_kv(case, k, v, {})[1].shape[-1] == 8


# -- the report's Cost of features -------------------------------------------------------------


def _row(case: Case, time_ms: float, **extra) -> dict:
    from harness.core import schema

    return {**schema.base_row(case), "status": "ok", "time_ms": time_ms, "flops": attention_flops(case),
            "label": case.variant, "machine": "", **extra}


def test_cost_of_features_pairs_each_feature_with_its_plain_twin():
    from reports.features import feature_cost, features_context

    base = dict(heads=2, kv_heads=2, head_dim=32, seq_len=256, causal=True)
    rows = pd.DataFrame([
        _row(Case("sdpa", **base), 2.0, sdpa_backend_used="flash"),
        _row(Case("sdpa", **base, alibi=True), 3.0, sdpa_backend_used="flash"),
        _row(Case("sdpa", **base, v_head_dim=16), 8.0, sdpa_backend_used="math"),
        _row(Case("naive", **base, sliding_window=16), 1.0),  # no plain naive twin: left out
        {**_row(Case("sdpa", **base, sliding_window=16), 9.0), "status": "incorrect"},  # not a speed result
    ])
    table = {t["feature"]: t for t in feature_cost(rows)}
    assert set(table) == {"alibi", "Dv16"}
    assert table["alibi"]["ratio"] == pytest.approx(1.5) and table["alibi"]["path"] == ""
    assert table["alibi"]["flops_ratio"] == pytest.approx(1.0)
    assert table["Dv16"]["path"] == "sdpa_backend_used: flash → math"
    assert table["Dv16"]["flops_ratio"] == pytest.approx(0.75)
    context = features_context(rows)
    assert context["off_path"] == 1 and context["unpaired"] == 1
    assert features_context(pd.DataFrame([_row(Case("sdpa", **base), 2.0)])) is None
