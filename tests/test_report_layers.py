"""The report's Parameter-efficiency section (attention layers) and the quantised variants in
the speed-vs-accuracy views: the section only with layer rows; parameters, KV bytes per token, time
per token and the tokens that fit a memory budget computed from the rows; wrong answers marked; the
KV-cache chart drawn; int8 rows on the Pareto front against the exact baseline of their own dtype,
emulated rows (FP8 on a CPU, the KV-cache round trip) in no speed view."""

from __future__ import annotations

import json
import math
import re

import pytest

from harness.core import units as fmt
from reports.layers import MEMORY_BUDGET_BYTES, MODEL_DEPTH, heads_used, param_text, time_per_token_ms, tokens_that_fit
from reports.render import build_context, render_report
from tests.test_report import _row, write_run

D_MODEL, HEADS, HEAD_DIM = 4096, 32, 128
WRONG = "output differs from the float64 reference: max abs error 0.9 at (b=0, h=0, q=3, d=1) > tolerance 0.03"


def _projections(kv_heads: int) -> int:
    """Q and O projections d×d, K and V d×(kv_heads·head_dim): the module's parameter count (no bias)."""
    return 2 * D_MODEL * D_MODEL + 2 * D_MODEL * kv_heads * HEAD_DIM


#: (variant, kv_heads, params, param_count, KV bytes per token per layer in bfloat16)
LAYERS = [
    ("mha", 32, {"kernel": "sdpa"}, _projections(32), 2 * 32 * HEAD_DIM * 2),
    ("gqa", 8, {"kernel": "sdpa"}, _projections(8), 2 * 8 * HEAD_DIM * 2),
    ("mqa", 1, {"kernel": "sdpa"}, _projections(1), 2 * 1 * HEAD_DIM * 2),
    ("mla", 32, {"kv_lora_rank": 512, "rope_dim": 64, "absorb": True}, 45_000_000, (512 + 64) * 2),
    ("textbook", 32, {"fixed": False}, 4 * D_MODEL * D_MODEL, 2 * D_MODEL * 2),
]
#: prefill (queries = keys, batch 2) at these lengths; decode: one new token against a 4096-token cache
PREFILL = [1024, 2048]


def _layer_row(variant, kv_heads, params, count, kv_bpt, L, time_ms, *, q_len=None, batch=2, **extra):
    row = _row(variant, L, time_ms, 1000.0 * L, params=params, family="layer", dtype="bfloat16", heads=HEADS,
               kv_heads=kv_heads, head_dim=HEAD_DIM, batch=batch, q_len=q_len, d_model=D_MODEL, param_count=count,
               kv_cache_bytes_per_token=float(kv_bpt), projection_flops=2.0 * count * L, rel_err=2e-3, **extra)
    row["case_id"] += f"-q{q_len}"
    return row


def layer_rows() -> list[dict]:
    rows = []
    for i, (variant, kv, params, count, bpt) in enumerate(LAYERS):
        for L in PREFILL:
            rows.append(_layer_row(variant, kv, params, count, bpt, L, (1 + i) * 2e-3 * L))
        rows.append(_layer_row(variant, kv, params, count, bpt, 4096, 0.5 * (1 + i), q_len=1))
    gqa_long = next(r for r in rows if r["variant"] == "gqa" and r["seq_len"] == 2048)
    gqa_long.update(status="incorrect", reason=WRONG, time_ms=1e-4, rel_err=0.8)  # a fast wrong answer
    mha_long = next(r for r in rows if r["variant"] == "mha" and r["seq_len"] == 2048)
    mha_long.update(stable=False, stability_note="two modes: 4.1 ms (1 process) and 8.2 ms (1 process)")
    return rows


@pytest.fixture(scope="module")
def layer_report(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("layers") / "run", layer_rows())
    render_report(run)
    html = (run / "report.html").read_text()
    return build_context(run), html


def _section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}"')
    return html[start:html.index("</section>", start)]


def _config_row(section: str, label: str) -> str:
    """The ``<tr>`` of the parameter table whose first cell is ``label``."""
    table = section[section.index('class="layers-table"'):]
    rows = re.findall(r"<tr[^>]*>\s*<td>(.*?)</td>(.*?)</tr>", table[:table.index("</table>")], flags=re.S)
    match = [r for r in rows if r[0] == label]
    assert match, f"no row {label!r} in {[r[0] for r in rows]}"
    start = table.index(f"<td>{label}</td>")
    return table[table.rindex("<tr", 0, start):table.index("</tr>", start)]


def test_no_layer_rows_means_no_section(tmp_path):
    rows = [_row("sdpa", L, 1e-5 * L**2, 16.0 * L**2, params={"backend": "flash"}) for L in (256, 512)]
    run = write_run(tmp_path / "run", rows)
    assert build_context(run)["layers"] is None
    render_report(run)
    html = (run / "report.html").read_text()
    assert 'id="layers"' not in html and "Parameter efficiency" not in html


def test_parameters_kv_bytes_and_heads_used_are_shown(layer_report):
    ctx, html = layer_report
    section = _section(html, "layers")
    assert 'href="#layers"' in html  # in the table of contents
    (table,) = ctx["layers"]["tables"]
    assert table["title"] == f"d_model = {D_MODEL} · bfloat16"
    assert [c["label"] for c in table["configs"]] == sorted(v for v, *_ in LAYERS)  # label: variant(params)
    for variant, kv, _params, count, bpt in LAYERS:
        row = _config_row(section, variant)
        assert f">{param_text(count)}<" in row and f">{fmt.size_bytes(bpt)}<" in row
        assert f'<td class="num">{kv}</td>' in row
    assert param_text(_projections(32)) == "67.1 M"  # 4·4096²
    assert ">16 KiB<" in _config_row(section, "mha")
    # textbook, unfixed: one head of width d_model, whatever heads says; the others heads × head_dim
    assert f"1 × {D_MODEL}" in _config_row(section, "textbook") and "unfixed: one head of width d_model" in section
    assert f"{HEADS} × {HEAD_DIM}" in _config_row(section, "mha")
    assert heads_used({"variant": "textbook", "params": json.dumps({"fixed": True}), "heads": 32, "head_dim": 128,
                       "d_model": 4096})[:2] == (32, 128)


def test_time_per_token_is_split_into_prefill_and_decode(layer_report):
    ctx, html = layer_report
    mqa = next(c for c in ctx["layers"]["tables"][0]["configs"] if c["label"] == "mqa")
    # mqa (i = 2): prefill 6e-3·L ms for B=2 sequences of L tokens; decode 1.5 ms for B=2 single tokens
    assert mqa["prefill"]["ms"] == pytest.approx(6e-3 * 2048 / (2 * 2048))
    assert mqa["prefill"]["where"] == "B=2, L=2,048"
    assert mqa["decode"]["ms"] == pytest.approx(1.5 / 2) and mqa["decode"]["where"] == "B=2, q=1, L=4,096"
    row = _config_row(_section(html, "layers"), "mqa")
    assert fmt.duration_ms(6e-3 / 2) in row and fmt.duration_ms(0.75) in row
    assert time_per_token_ms({"time_ms": 8.0, "batch": 4, "seq_len": 4096, "q_len": 2}) == 1.0


def test_an_incorrect_layer_is_marked_and_its_time_not_used(layer_report):
    ctx, html = layer_report
    section = _section(html, "layers")
    gqa = next(c for c in ctx["layers"]["tables"][0]["configs"] if c["label"] == "gqa")
    assert gqa["status"]["incorrect"] == 1 and gqa["status"]["worst"] == "incorrect"
    assert gqa["prefill"]["where"] == "B=2, L=1,024"  # the wrong answer at L=2048 is not a time per token
    assert gqa["prefill"]["ms"] == pytest.approx(4e-3 * 1024 / (2 * 1024))
    assert gqa["rel_err"] == pytest.approx(0.8)  # but its error is the worst
    row = _config_row(section, "gqa")
    assert row.startswith('<tr class="s-incorrect">') and '<span class="badge s-incorrect"' in row
    assert "1 incorrect" in row and WRONG.split(":")[0] in row
    assert "1 layer case gave a wrong answer" in section
    assert "gqa" in _section(html, "incorrect")  # and listed at the top, as every wrong answer
    assert "s-incorrect" not in _config_row(section, "mha")
    # an unstable time stays, marked, with the run's note
    assert 'class="s-unstable" title="unstable: two modes: 4.1 ms' in _config_row(section, "mha")
    assert "s-unstable" not in _config_row(section, "mqa")


def test_kv_cache_chart_and_the_tokens_that_fit_the_budget(layer_report):
    ctx, html = layer_report
    section = _section(html, "layers")
    assert MODEL_DEPTH == 32 and MEMORY_BUDGET_BYTES == 16 * 2**30
    figure = section[section.index('<figure class="kv-cache">'):]
    figure = figure[:figure.index("</figure>")]
    assert "<svg" in figure and f"KV cache of a {MODEL_DEPTH}-layer model" in figure and "budget: 16 GiB" in figure
    assert "32-layer" in figure and "16 GiB" in figure
    fit = section[section.index('class="kv-fit-table"'):]
    for variant, kv, _, _, bpt in LAYERS:
        one, model = math.floor(16 * 2**30 / bpt), math.floor(16 * 2**30 / (bpt * 32))
        assert tokens_that_fit(bpt) == one and tokens_that_fit(bpt, MODEL_DEPTH) == model
        assert re.search(rf"<td>{variant} · kv_heads={kv}</td>.*?>{one:,}<.*?>{model:,}<", fit, flags=re.S)
    assert tokens_that_fit(1152, 32) == 466_033  # MLA: 16 GiB / (1152 B · 32), rounded down
    assert tokens_that_fit(float("nan")) is None and tokens_that_fit(0) is None


# -- quantised variants in the speed views ---------------------------------------------------------

def quantised_rows() -> list[dict]:
    """sdpa flash in float32 and bfloat16 (its error larger in bfloat16); int8_qk (a real int8 product,
    faster than sdpa, less accurate) in both; fp8 emulated (fastest and most accurate on paper); a decode
    shape with sdpa and kv_quant (always emulated)."""
    rows = []
    for dtype, base_err in (("float32", 1e-7), ("bfloat16", 2e-3)):
        for L in (1024, 2048, 4096):
            rows.append(_row("sdpa", L, 1e-5 * L**2, 16.0 * L**2, params={"backend": "flash"}, dtype=dtype,
                             rel_err=base_err))
            rows.append(_row("int8_qk", L, 5e-6 * L**2, 20.0 * L**2, params={"smooth": True}, family="quantised",
                             exact=False, dtype=dtype, rel_err=1e-2, emulated=False, quant_matmul="torch._int_mm"))
            rows.append(_row("fp8", L, 1e-7 * L**2, 8.0 * L**2, params={"format": "e4m3"}, family="quantised",
                             exact=False, dtype=dtype, rel_err=1e-9, emulated=True, quant_matmul="emulated"))
        for kv in (4096, 16384):
            rows.append(_row("sdpa", kv, 1e-4 * kv, 64.0 * kv, params={"backend": "flash"}, dtype=dtype, q_len=1,
                             rel_err=base_err))
            rows.append(_row("kv_quant", kv, 1e-6 * kv, 4.0 * kv, params={"bits": 4}, family="quantised", exact=False,
                             dtype=dtype, q_len=1, rel_err=3e-2, emulated=True))
    for r in rows:
        r["case_id"] += f"-{r['dtype']}-{r.get('q_len')}"
    return rows


@pytest.fixture(scope="module")
def quantised_report(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("quantised") / "run", quantised_rows())
    render_report(run)
    return build_context(run), (run / "report.html").read_text()


def test_int8_rows_are_on_the_pareto_front_against_the_baseline_of_their_dtype(quantised_report):
    ctx, html = quantised_report
    charts = {c["group"].split(" · ")[1]: c for c in ctx["speed_accuracy"] if "q=1" not in c["group"]}
    assert set(charts) == {"float32", "bfloat16"}
    for dtype, base_err in (("float32", 1e-7), ("bfloat16", 2e-3)):
        chart = charts[dtype]
        assert chart["baseline"] == "sdpa" and chart["svg"]
        assert {r["label"] for r in chart["rows"]} == {"sdpa", "int8_qk"}  # fp8 is emulated: not on the time axis
        base = [r for r in chart["rows"] if r["baseline"]]
        assert {r["rel_err"] for r in base} == {base_err}  # the exact baseline of this dtype, not the other's
        assert all(r["front"] for r in chart["rows"])  # int8: faster, sdpa: more accurate
        assert {a["label"] for a in chart["accuracy_only"]} == {"fp8"}
        assert {a["baseline_rel_err"] for a in chart["accuracy_only"]} == {base_err}  # compared with its own dtype's
    section = _section(html, "speed-accuracy")
    assert "int8_qk" in section and "L=4096</b> int8_qk → sdpa" in section
    assert "Accuracy only (emulated" in section and '<td>fp8 <span class="tag">emulated</span>' in section
    assert "baseline rel. error" in section and f">{fmt.error(2e-3)}</td></tr>" in section


def test_emulated_rows_are_in_no_speed_view(quantised_report):
    ctx, html = quantised_report
    assert {c["label"] for c in ctx["crossovers"]} == {"int8_qk"}  # fp8 and kv_quant are emulated
    assert all(c["baseline"] == "sdpa" and c["time_kind"] == "always" for c in ctx["crossovers"])
    assert {t["label"] for t in ctx["throughput"]["table"]} == {"sdpa", "int8_qk"}
    scaling = " ".join(c["title"] + c["svg"] for c in ctx["charts"])
    assert "fp8" not in scaling and "kv_quant" not in scaling
    decode = ctx["inference"]["decode"]  # the decode view: sdpa alone, kv_quant's time is no speed result
    assert {t["series"] for t in decode["table"]} == {"sdpa"}
    assert "kv_quant" not in _section(html, "decode")
    # the decode shape's accuracy view: kv_quant with its error, next to the baseline's chart-free group
    decode_acc = [c for c in ctx["speed_accuracy"] if "q=1" in c["group"]]
    assert {a["label"] for c in decode_acc for a in c["accuracy_only"]} == {"kv_quant"}
    assert {(c["group"].split(" · ")[1], a["baseline_rel_err"]) for c in decode_acc for a in c["accuracy_only"]} == {
        ("float32", 1e-7), ("bfloat16", 2e-3)}
    assert ctx["layers"] is None
