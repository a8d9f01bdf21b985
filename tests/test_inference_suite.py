"""Inference shapes in suites, case identity, FLOPs and bytes, rows and the report's sections."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from harness.core import lengths
from harness.core.cases import Case
from harness.core.flops import attention_flops
from harness.engine.suite import SuiteError, expand_cases, parse_suite
from harness.measure import roofline
from harness.measure.derive import derive
from tests.runs import measured

BASELINE = Path(__file__).resolve().parents[1] / "results" / "baseline" / "nightly-cpu" / "results.parquet"


def test_existing_case_ids_are_unchanged():
    """Ids computed before q_len, kv_layout, page_size and lengths existed (hard-coded on purpose)."""
    assert Case(variant="sdpa", params={"backend": "flash"}, seq_len=1024, causal=True).case_id == "3deb0b997fee8271"
    assert Case(variant="naive", params={}, batch=2, heads=8, kv_heads=2, seq_len=512, head_dim=64,
                dtype="bfloat16", mode="fwd_bwd").case_id == "96516f79105a34e4"
    assert Case(variant="tiled", params={"block_q": 256, "block_k": 256, "compute": "input"}, seq_len=4096,
                inputs="structured").case_id == "2141cfbe07a2bb0e"
    assert Case(variant="flex", params={"mask": "none", "tile": 128, "window": 256}, device="cuda", seq_len=2048,
                dtype="float16", causal=True).case_id == "31ec8c5739e72ea8"
    quick = expand_cases(parse_suite((Path(__file__).resolve().parents[1] / "suites" / "quick.toml").read_text()))
    assert [c.case_id for c in quick[:3]] == ["f3535706723ad53f", "c77070c2b8c8789c", "7dd546d3d0cd2bbd"]


def test_committed_baseline_rows_rebuild_their_case_ids():
    rows = pd.read_parquet(BASELINE).to_dict("records")  # written before the new columns existed
    assert rows and all(Case.from_row(r).case_id == r["case_id"] for r in rows)


def test_new_style_cases_have_new_ids_and_rebuild_from_rows():
    from harness.core.schema import base_row

    point = dict(variant="paged", params={"path": "pages"}, batch=4, heads=8, kv_heads=2, seq_len=4096, q_len=1,
                 causal=True, kv_layout="paged", page_size=16, lengths="zipf")
    case = Case(**point)
    plain = Case(variant="paged", params={"path": "pages"}, batch=4, heads=8, kv_heads=2, seq_len=4096, causal=True)
    assert case.case_id != plain.case_id and "q_len" in case.key and "q_len" not in plain.key
    row = base_row(case)
    assert (row["q_len"], row["kv_layout"], row["page_size"], row["lengths"]) == (1, "paged", 16, "zipf")
    assert Case.from_row(row) == case
    table = pd.DataFrame([row, base_row(plain)])  # as a results table holds them: NaN where unset
    assert [Case.from_row(r) for r in table.to_dict("records")] == [case, plain]


def test_from_point_normalises_inference_axes():
    base = {"device": "cpu", "mode": "fwd", "batch": 1, "heads": 8, "kv_heads": None, "seq_len": 1024,
            "head_dim": 64, "dtype": "float32", "causal": True, "inputs": "gaussian", "q_len": None, "kv_len": None,
            "kv_layout": "contiguous", "page_size": None, "lengths": "fixed"}
    same = Case.from_point("sdpa", {}, {**base, "q_len": 512, "kv_len": 512, "page_size": 16})
    assert same == Case(variant="sdpa", seq_len=512, causal=True)  # q_len = kv_len is seq_len; no pages
    decode = Case.from_point("sdpa", {}, {**base, "q_len": 1, "kv_len": 4096})
    assert (decode.q_len, decode.seq_len, decode.query_len, decode.kv_heads) == (1, 4096, 1, 8)


SUITE = """
[defaults]
heads = 4
{defaults}
[sweep]
{sweep}
[[variant]]
name = "sdpa"
"""


def problems(sweep: str, defaults: str = "") -> list[str]:
    with pytest.raises(SuiteError) as err:
        parse_suite(textwrap.dedent(SUITE.format(sweep=sweep, defaults=defaults)), Path("s.toml"))
    return err.value.problems


@pytest.mark.parametrize("sweep,defaults,key,words", [
    ("q_len = [16]\nkv_len = [8]", "causal = true", "sweep.q_len", "q_len 16 > kv_len 8 with causal: refused"),
    ("q_len = [1]\nkv_len = [8]\nseq_len = [8]", "", "sweep.q_len", "set together with seq_len"),
    ("q_len = [1]", "", "sweep.q_len", "needs kv_len"),
    ("page_size = [0]", 'kv_layout = "paged"', "sweep.page_size", "must be a positive integer, got 0"),
    ("seq_len = [64]", 'kv_layout = "paged"', "defaults.kv_layout", "needs page_size"),
    ("page_size = [16]", "", "sweep.page_size", 'applies to kv_layout = "paged" only'),
    ("seq_len = [64]", "batch = 2\nlengths = [4, 5, 6]", "defaults.lengths", "3 lengths listed for batch 2"),
    ("seq_len = [64]", "batch = 2\nlengths = [4, 65]", "defaults.lengths", "length 65 is longer than the maximum"),
    ("q_len = [8]\nkv_len = [64]", "batch = 2\ncausal = true\nlengths = [4, 64]", "defaults.lengths",
     "length 4 is shorter than q_len 8"),
    ('lengths = ["zipp"]', "", "sweep.lengths", "did you mean 'zipf'?"),
    ('kv_layout = ["pagd"]', "", "sweep.kv_layout", "did you mean 'paged'?"),
])
def test_suite_errors_for_the_inference_keys(sweep, defaults, key, words):
    found = problems(sweep, defaults)
    assert any(p.startswith("s.toml:") and f": {key}: " in p and words in p for p in found), found
    line = int(next(p for p in found if f": {key}: " in p).split(":")[1])
    text = textwrap.dedent(SUITE.format(sweep=sweep, defaults=defaults)).splitlines()
    assert key.split(".")[1] in text[line - 1]  # the line named is the key's own


def test_q_len_above_kv_len_is_cross_attention_without_causal():
    suite = parse_suite(textwrap.dedent(SUITE.format(sweep="q_len = [16]\nkv_len = [8]", defaults="")))
    (case,) = expand_cases(suite)
    assert (case.q_len, case.seq_len, case.causal) == (16, 8, False)


def test_lengths_lists_are_one_value_and_sweeps_expand():
    suite = parse_suite(textwrap.dedent(SUITE.format(
        sweep='lengths = ["fixed", "zipf", [64, 1, 30]]\nkv_layout = ["contiguous", "paged"]\npage_size = [16, 32]',
        defaults="batch = 3\nseq_len = 64")))
    cases = expand_cases(suite)
    assert {c.lengths for c in cases} == {"fixed", "zipf", "64,1,30"}
    assert {(c.kv_layout, c.page_size) for c in cases} == {("contiguous", None), ("paged", 16), ("paged", 32)}
    assert len(cases) == 3 * 3  # contiguous is one case, whatever page_size says
    explicit = parse_suite(textwrap.dedent(SUITE.format(sweep="lengths = [64, 1, 30]",
                                                        defaults="batch = 3\nseq_len = 64")))
    assert [c.lengths for c in expand_cases(explicit)] == ["64,1,30"]


def test_drawn_lengths_are_reproducible_and_bounded():
    for kind in ("uniform", "zipf"):
        drawn = lengths.sequence_lengths(kind, 32, 4096, lo=8)
        assert drawn == lengths.sequence_lengths(kind, 32, 4096, lo=8) and max(drawn) == 4096
        assert min(drawn) >= 8 and len(set(drawn)) > 4
    assert lengths.sequence_lengths("3,5", 5, 10) == [3, 5, 3, 5, 3]
    assert lengths.sequence_lengths("fixed", 3, 10) == [10, 10, 10]
    z = lengths.sequence_lengths("zipf", 256, 4096)
    assert 0.3 < 1 - sum(z) / (256 * 4096) < 0.8  # Zipf: much of a padded batch is padding


def test_flops_count_real_pairs_under_bottom_right_alignment():
    per_pair = 4 * 2 * 8 * 64  # 4·B·H·D
    decode = Case(variant="sdpa", batch=2, seq_len=100, q_len=1, causal=True)
    assert attention_flops(decode) == per_pair * 100  # one query sees every key
    chunk = Case(variant="sdpa", batch=2, seq_len=100, q_len=8, causal=True)
    assert attention_flops(chunk) == per_pair * (8 * 92 + 36)
    cross = Case(variant="sdpa", batch=2, seq_len=77, q_len=300)
    assert attention_flops(cross) == per_pair * 300 * 77
    square = Case(variant="sdpa", batch=2, seq_len=100, causal=True)
    assert attention_flops(square) == per_pair * 100 * 100 / 2  # the square convention stays
    varlen = Case(variant="padded", batch=2, seq_len=100, lengths="100,10", causal=True)
    assert attention_flops(varlen) == 4 * 8 * 64 * (100 * 101 // 2 + 10 * 11 // 2)


def test_bytes_bandwidth_and_tokens_columns():
    row = {"batch": 2, "heads": 8, "kv_heads": 2, "head_dim": 64, "seq_len": 1000, "q_len": 4, "dtype": "float32",
           "mode": "fwd", "causal": True, "lengths": "1000,500", "kv_layout": "paged", "page_size": 16,
           "time_ms": 2.0}
    assert roofline.kv_bytes(row) == 2 * 1500 * 2 * 64 * 4
    assert roofline.min_bytes(row) == (2 * 8 * 4 * 64 * 2 + 1500 * 2 * 64 * 2) * 4
    rates = derive(dict(row, peak_gb_per_s=100.0))
    assert rates["achieved_bandwidth"] == pytest.approx(roofline.kv_bytes(row) / 2e-3)
    assert rates["pct_of_bandwidth"] == pytest.approx(100 * rates["achieved_bandwidth"] / 1e11)
    assert rates["tokens_per_s"] == pytest.approx(8 / 2e-3)
    plain = dict(row, q_len=None, lengths="fixed", kv_layout="contiguous", page_size=None, seq_len=64)
    assert math.isnan(derive(plain)["tokens_per_s"])
    assert roofline.min_bytes(plain) == (2 * 8 * 64 * 64 * 2 + 2 * 2 * 64 * 64 * 2) * 4  # as before


def test_a_variants_own_parameter_may_mix_auto_and_integers():
    ok = parse_suite(textwrap.dedent('''
        [defaults]
        q_len = 1
        kv_len = 300
        [[variant]]
        name = "decode_split_k"
        splits = ["auto", 4]
        '''))
    assert sorted(str(c.params["splits"]) for c in expand_cases(ok)) == ["4", "auto"]
    with pytest.raises(SuiteError) as err:
        parse_suite('[[variant]]\nname = "decode_split_k"\nsplits = 5\n', Path("s.toml"))
    assert "variant[0] (decode_split_k).splits" in err.value.problems[0]


def _run_in_process(case: Case):
    from harness.measure.timing import TimingConfig

    timing = TimingConfig(warmup=0, min_time_s=0.0, min_reps=1, max_reps=2, max_time_s=0.1, processes=1)
    return measured(case, timing, seed=3)


@pytest.mark.parametrize("case", [
    Case(variant="paged", params={"path": "pages"}, batch=3, heads=4, kv_heads=2, head_dim=16, seq_len=100, q_len=2,
         causal=True, kv_layout="paged", page_size=16, lengths="uniform"),
    Case(variant="decode_split_k", params={"splits": "auto"}, batch=2, heads=4, kv_heads=1, head_dim=16, seq_len=70,
         q_len=1, causal=True),
    Case(variant="padded", params={}, batch=4, heads=2, kv_heads=2, head_dim=16, seq_len=40, lengths="40,1,17,3"),
])
def test_the_runner_measures_and_checks_inference_cases(case):
    row = _run_in_process(case)
    assert row["status"] == "ok", row["reason"]
    assert row["rel_err"] < 1e-5 and row["case_id"] == case.case_id
    assert row["kv_bytes"] == roofline.kv_bytes(case) > 0 and row["achieved_bandwidth"] > 0
    assert row["tokens_per_s"] > 0
    if case.variant == "padded":  # it computes the padded batch; the real pairs are its useful FLOPs
        assert row["flops"] == attention_flops(Case(**{**case.__dict__, "lengths": "fixed"})) > row["useful_flops"]
        assert row["useful_flops"] == attention_flops(case)
    else:
        assert row["flops"] == attention_flops(case)
    assert Case.from_row(row) == case


def test_a_variant_that_ignores_the_lengths_is_wrong(monkeypatch):
    """The check is not blind to the padding: a variant that attends padded keys is caught."""
    import dataclasses

    from harness.core import registry
    from variants import inference

    case = Case(variant="padded", params={}, batch=3, heads=2, kv_heads=2, head_dim=16, seq_len=40, lengths="40,5,17")
    sloppy = dataclasses.replace(registry.get_variant("padded"),
                                 fn=lambda q, k, v, *, causal, q_lens=None, kv_lens=None:
                                     inference.padded(q, k, v, causal=causal))
    monkeypatch.setitem(registry._REGISTRY, "padded", sloppy)
    row = _run_in_process(case)
    assert row["status"] == "incorrect" and row["rel_err"] > 1e-2


def _inference_rows() -> list[dict]:
    from harness.core.schema import base_row

    rows = []
    for kv in (1024, 4096, 16384):
        for variant, params, layout, page, seconds in (("sdpa", {"backend": "auto"}, "contiguous", None, 2e-6),
                                                       ("paged", {"path": "pages"}, "paged", 16, 2.4e-6)):
            case = Case(variant=variant, params=params, batch=1, heads=32, kv_heads=8, head_dim=128, seq_len=kv,
                        q_len=1, causal=True, kv_layout=layout, page_size=page)
            row = base_row(case, "dense" if variant == "sdpa" else "inference", True, 2)
            row.update(time_ms=seconds * kv * 1e3, time_ms_p10=seconds * kv * 1e3, time_ms_p90=seconds * kv * 1e3,
                       reps=3, flops=attention_flops(case), peak_mem_bytes=1e6, rel_err=1e-7, peak_gb_per_s=10.0,
                       **roofline.fact_columns(row))
            row.update(derive(row))
            rows.append(row)
    for lengths_kind in ("uniform", "zipf"):
        for variant, t in (("padded", 10.0), ("packed", 6.0)):
            case = Case(variant=variant, batch=8, heads=8, kv_heads=2, head_dim=64, seq_len=1024, lengths=lengths_kind)
            row = base_row(case, "inference", True, 2)
            row.update(time_ms=t, time_ms_p10=t, time_ms_p90=t, reps=3, flops=1e9, rel_err=1e-7, peak_mem_bytes=1e6,
                       useful_flops=0.5e9 if variant == "padded" else math.nan)
            row.update(derive(row))
            rows.append(row)
    return rows


def test_report_has_decode_and_varlen_sections_only_with_such_rows(tmp_path):
    from reports.render import render_report
    from tests.test_report import synthetic_rows, write_run

    html = render_report(write_run(tmp_path / "inference", _inference_rows())).read_text()
    assert 'id="decode"' in html and 'id="varlen"' in html and 'id="paged-vs-contiguous"' in html
    assert "×1.20" in html  # paged over contiguous: 2.4 / 2.0
    assert "×1.67" in html  # packed over padded: 10 / 6
    plain = render_report(write_run(tmp_path / "plain", synthetic_rows())).read_text()
    assert 'id="decode"' not in plain and 'id="varlen"' not in plain
