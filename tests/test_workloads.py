"""Workloads people run: serving batches (per-sequence query and key/value lengths), shared-prefix decoding
and cascade attention, each checked against the float64 reference one sequence at a time; the
serving-batch grammar; suite rules; bench run --model."""

from __future__ import annotations

import pytest
import torch

from harness import get_variant, masks
from harness.core import lengths
from harness.core.cases import Case
from harness.core.config import TimingConfig
from harness.engine.suite import SuiteError, expand_cases, parse_suite
from harness.measure import roofline
from harness.measure.inputs import dense_kv, layout_inputs, make_qkv
from harness.measure.reference import TOLERANCE, reference_attention
from tests.runs import measured

QUICK = TimingConfig(warmup=0, min_time_s=0, min_reps=1, max_reps=1, processes=1)
MIX = "2q17kv60_3q1kv90_q5kv33"  # two chunks of 17 new tokens, three decodes, a 5-token extend


@pytest.mark.parametrize("spec,seqs", [
    ("q2k", [(2048, 2048)]),
    ("8q1kv1k", [(1, 1024)] * 8),
    ("q4kv1k", [(4, 1024)]),
    ("2q2k_32q1kv1k", [(2048, 2048)] * 2 + [(1, 1024)] * 32),
    (MIX, [(17, 60), (17, 60), (1, 90), (1, 90), (1, 90), (5, 33)]),
])
def test_the_serving_batch_grammar_is_vllms(spec, seqs):
    assert lengths.mix(spec) == seqs
    assert lengths.parse(spec) == (spec, None)
    shape = lengths.mix_shape(spec)
    q, kv = max(s[0] for s in seqs), max(s[1] for s in seqs)
    assert shape == {"batch": len(seqs), "seq_len": kv, "q_len": None if q == kv else q}


@pytest.mark.parametrize("spec,words", [("q5kv3", "q_len 5 > kv_len 3"), ("2q1x8", "is not [count]q"),
                                        ("0q4", "at least 1"), ("fixd", "did you mean 'fixed'")])
def test_a_bad_serving_batch_says_why(spec, words):
    value, problem = lengths.parse(spec)
    assert problem is not None and words in problem


def _case(variant: str, params: dict | None = None, **axes) -> Case:
    full = {n: p.default for n, p in get_variant(variant).params.items()}
    full.update(params or {})
    point = dict(heads=4, kv_heads=2, head_dim=16, causal=True)
    point.update(axes)
    return Case.from_point(variant, full, point)


def _per_sequence_check(case: Case, seed: int = 0) -> float:
    """The variant's output, sequence by sequence, against float64 attention over that sequence alone
    (its own queries and keys, bottom-right causal); padding rows must be zero. Returns the largest rel error."""
    variant = get_variant(case.variant)
    q, k, v = make_qkv(case, seed=seed)
    kk, vv, extra = layout_inputs(case, k, v, seed=seed)
    with torch.no_grad():
        out = variant.with_inputs(extra)(q, kk, vv, causal=case.causal, **case.params)
    q_lens, kv_lens = lengths.case_lengths(case)
    k, v = dense_kv(case, kk, vv, extra)
    worst = 0.0
    tol_abs, tol_rel = TOLERANCE[case.dtype]
    for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
        mask = masks.bottom_right_causal(nq, nk) if case.causal else None
        ref = reference_attention(q[b:b + 1, :, :nq], k[b:b + 1, :, :nk], v[b:b + 1, :, :nk], mask)
        got = out[b:b + 1, :, :nq].double()
        rel = float((got - ref).norm() / ref.norm())
        assert (got - ref).abs().max() <= tol_abs and rel <= tol_rel, f"{case.label()} sequence {b}: rel {rel:.2g}"
        assert not out[b, :, nq:].any(), f"{case.label()} sequence {b}: padding rows are not zero"
        worst = max(worst, rel)
    return worst


MIX_VARIANTS = [("padded", {}, {}), ("packed", {"path": "loop"}, {}), ("packed", {"path": "flex"}, {}),
                ("decode_split_k", {}, {}), ("decode_split_k", {"splits": 3}, {}),
                ("paged", {"path": "gather"}, {"kv_layout": "paged", "page_size": 16}),
                ("paged", {"path": "pages"}, {"kv_layout": "paged", "page_size": 16})]


@pytest.mark.parametrize("variant,params,layout", MIX_VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_a_serving_batch_is_right_sequence_by_sequence(variant, params, layout, causal):
    if variant == "packed" and params["path"] == "flex" and not causal:
        pytest.skip("one flex compile is enough (causal)")
    case = _case(variant, params, lengths=MIX, causal=causal, **layout)
    assert (case.batch, case.q_len, case.seq_len) == (6, 17, 90)
    assert get_variant(variant).not_supported_reasons(case) == []
    _per_sequence_check(case)


def test_variants_without_per_sequence_lengths_skip_a_serving_batch_with_the_reason():
    reasons = get_variant("sdpa").not_supported_reasons(_case("sdpa", lengths=MIX))
    assert any("variable-length" in r for r in reasons)


def test_a_serving_batch_runs_ok_at_float32_level_and_counts_its_real_pairs_and_tokens():
    row = measured(_case("decode_split_k", lengths=MIX), QUICK)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < TOLERANCE["float32"][1]
    pairs = 2 * lengths.pairs(17, 60, True) + 3 * lengths.pairs(1, 90, True) + lengths.pairs(5, 33, True)
    assert row["flops"] == 4 * 4 * 16 * pairs  # 4·H·D per attended pair, summed over the sequences
    assert row["kv_bytes"] == 2 * (2 * 60 + 3 * 90 + 33) * 2 * 16 * 4
    assert row["tokens_per_s"] == pytest.approx((2 * 17 + 3 + 5) / (row["time_ms"] / 1e3))


# -- shared prefix ------------------------------------------------------------------------------------

PREFIX = dict(batch=3, q_len=2, kv_len=70, shared_prefix=48)


def test_a_shared_prefix_is_the_same_tokens_in_every_sequence_and_is_counted_once():
    case = _case("sdpa", **PREFIX)
    q, k, v = make_qkv(case)
    for x in (k, v):
        assert torch.equal(x[1:, :, :48], x[:1, :, :48].expand(2, -1, -1, -1))
        assert not torch.equal(x[1, :, 48:], x[0, :, 48:])  # each suffix its own
    assert not torch.equal(q[1], q[0])
    assert roofline.kv_bytes(case) == 2 * (48 + 3 * 22) * 2 * 16 * 4
    _, _, extra = layout_inputs(case, k, v)
    assert extra == {"shared_prefix": 48}
    assert get_variant("sdpa").with_inputs(extra) is get_variant("sdpa")  # only a shared_prefix variant gets it
    assert get_variant("cascade").with_inputs(extra).fn.keywords == {"shared_prefix": 48}


@pytest.mark.parametrize("variant,params", [("sdpa", {}), ("naive", {}), ("decode_split_k", {}), ("cascade", {})])
@pytest.mark.parametrize("causal", [True, False])
def test_shared_prefix_decoding_is_right_sequence_by_sequence(variant, params, causal):
    _per_sequence_check(_case(variant, params, causal=causal, **PREFIX))


@pytest.mark.parametrize("axes", [
    dict(batch=4, q_len=1, kv_len=300, shared_prefix=256),  # decode: several prefix and suffix chunks
    dict(batch=2, q_len=5, kv_len=40, shared_prefix=35, heads=4, kv_heads=4),  # queries right after the prefix, MHA
    dict(lengths="2q3kv40_3q1kv64", shared_prefix=24),  # a serving batch after one prompt
    dict(batch=3, q_len=1, kv_len=65, shared_prefix=64, heads=8, kv_heads=1),  # multi-query, one suffix token
])
@pytest.mark.parametrize("causal", [True, False])
def test_cascade_equals_plain_attention(axes, causal):
    case = _case("cascade", causal=causal, **axes)
    assert get_variant("cascade").not_supported_reasons(case) == []
    _per_sequence_check(case)
    q, k, v = make_qkv(case)
    _, _, extra = layout_inputs(case, k, v)
    plain = _case("decode_split_k", causal=causal, **axes)
    with torch.no_grad():
        got = get_variant("cascade").with_inputs(extra)(q, k, v, causal=causal)
        want = get_variant("decode_split_k").with_inputs(layout_inputs(plain, k, v)[2])(q, k, v, causal=causal)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("features", [dict(softcap=5.0), dict(sinks=True), dict(v_head_dim=8),
                                      dict(softcap=5.0, sinks=True, v_head_dim=24)])
def test_cascade_takes_the_position_free_features_and_matches_the_reference(features):
    """Soft-cap on both levels, sinks in the merge, a value width of its own: against flash-decoding with the
    same features, and against the float64 reference through a run."""
    axes = dict(batch=3, q_len=2, kv_len=300, shared_prefix=270, causal=True, **features)
    case, plain = _case("cascade", **axes), _case("decode_split_k", **axes)
    assert get_variant("cascade").not_supported_reasons(case) == []
    q, k, v = make_qkv(case)
    with torch.no_grad():
        got = get_variant("cascade").with_inputs(layout_inputs(case, k, v)[2])(q, k, v, causal=True)
        want = get_variant("decode_split_k").with_inputs(layout_inputs(plain, k, v)[2])(q, k, v, causal=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    row = measured(case, QUICK)
    assert row["status"] == "ok" and row["rel_err"] < TOLERANCE["float32"][1], row["reason"]


def test_cascade_leaves_position_dependent_features_to_plain_attention():
    reasons = get_variant("cascade").not_supported_reasons(_case("cascade", batch=2, q_len=1, kv_len=64,
                                                                 shared_prefix=32, sliding_window=8))
    assert reasons == ["cascade does not take sliding_window = 8"]


def test_cascade_in_bfloat16_is_within_its_tolerance():
    _per_sequence_check(_case("cascade", dtype="bfloat16", **PREFIX))


def test_cascade_needs_a_shared_prefix():
    assert "needs a case with shared_prefix set" in " ".join(get_variant("cascade").not_supported_reasons(
        _case("cascade", q_len=1, kv_len=64)))


def test_a_shared_prefix_case_runs_ok_at_float32_level():
    for variant in ("cascade", "sdpa"):
        row = measured(_case(variant, causal=True, batch=4, q_len=1, kv_len=160, shared_prefix=128), QUICK)
        assert row["status"] == "ok" and row["rel_err"] < TOLERANCE["float32"][1], row["reason"]


# -- suite rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,words", [
    ('lengths = "2q4kv8_q1kv9"\nbatch = 3', "sets batch, q_len and kv_len itself: leave out batch"),
    ('shared_prefix = 100\nq_len = 1\nkv_len = 64', "shared_prefix 100 + q_len 1 exceeds the context 64"),
    ("shared_prefix = 10", "needs q_len and kv_len"),
    ('shared_prefix = 10\nlengths = "zipf"\nq_len = 1\nkv_len = 64', "not 'zipf'"),
    ('shared_prefix = 40\nlengths = "q4kv40"', "leaves no room for the new tokens"),
])
def test_workload_rules_are_one_line_each(text, words):
    with pytest.raises(SuiteError) as info:
        parse_suite(f"[defaults]\n{text}\n[[variant]]\nname = \"padded\"\n")
    assert words in str(info.value)


def test_the_shipped_model_suites_load_with_unique_labels():
    from pathlib import Path

    from harness.engine.suite import load_suite

    paths = sorted((Path(__file__).resolve().parents[1] / "suites" / "models").glob("*.toml"))
    assert paths
    for path in paths:
        cases = expand_cases(load_suite(path))
        assert len({c.label() for c in cases}) == len(cases), path


def test_a_serving_batch_sets_the_batch_and_lengths_of_its_case():
    (case,) = expand_cases(parse_suite('[defaults]\nlengths = "2q512kv4k_14q1kv8k"\ncausal = true\n'
                                       '[[variant]]\nname = "padded"\n'))
    assert (case.batch, case.q_len, case.seq_len) == (16, 512, 8192)
    assert case.label().endswith("lengths=2q512kv4k_14q1kv8k")


# -- bench run --model ----------------------------------------------------------------------------


def _bench(capsys, *args) -> tuple[int, str, str]:
    """``bench ARGS`` in this process: (exit status, stdout, stderr)."""
    from harness.cli.main import main

    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_model_dry_run_lists_the_cases_it_would_run_and_says_what_it_chose(capsys):
    status, stdout, stderr = _bench(capsys, "run", "--model", "llama-3.1-8b", "--workload", "decode", "--dry-run",
                                    "--memory-budget-gib", "12")
    assert status == 0, stderr
    cases = stdout.strip().splitlines()
    kernels = [c for c in cases if not c.startswith("gqa")]
    contexts = [4096, 8192, 16384, 32768, 65536, 131072]
    assert len(kernels) == 2 * len(contexts) + 3  # sdpa flash, decode_split_k; sdpa math up to 16K on the CPU
    assert all("H32/8" in c and "D128" in c and "Lq1" in c and c.endswith("causal llama-3.1-8b") for c in cases)
    assert {f"Lkv{n}" for n in contexts} == {w for c in cases for w in c.split() if w.startswith("Lkv")}
    assert sum(c.startswith("gqa(kernel=") for c in cases) == 2 * 3  # the layer, two kernels, up to 16K on CPU
    assert "llama-3.1-8b: 32 heads / 8 KV heads × 128" in stderr and "decode: 1 new token" in stderr
    assert "21 cases (dry run" in stderr and "1 thread per case" in stderr


def test_model_dry_run_drops_contexts_over_the_memory_budget_and_says_so(capsys):
    status, stdout, stderr = _bench(capsys, "run", "--model", "llama-3.1-8b", "--dry-run", "--memory-budget-gib", "1")
    assert status == 0, stderr
    assert "Lkv131072" not in stdout and "Lkv16384" in stdout
    assert "context 131072 left out" in stderr


@pytest.mark.parametrize("args,words", [((), "give a suite file, or --model"),
                                        (("suites/quick.toml", "--model", "gpt2"), "not both"),
                                        (("--model", "llama3"), "did you mean llama-3.1-8b")])
def test_model_option_mistakes_are_one_line(capsys, args, words):
    status, _, stderr = _bench(capsys, "run", *args, "--dry-run")
    assert status == 2 and words in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("workload", ["prefill", "decode", "serve"])
def test_every_model_and_workload_builds_a_valid_suite(workload):
    from harness.core import models
    from harness.engine.modelsuite import model_suite

    for name in models.NAMES:
        for device in ("cpu", "cuda"):
            plan = model_suite(name, workload, device=device, memory_budget=12 << 30)
            cases = expand_cases(parse_suite(plan.text))
            assert cases and len({c.label() for c in cases}) == len(cases)
            assert all(c.model == name for c in cases)
