"""The report and the terminal table on numbers a user can trust: wrong answers listed at the
top and kept out of every speed view, unstable times marked and kept out of time fits and crossovers,
emulated times kept out of speed views but not accuracy views, the measurement environment shown."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from harness.core import units as fmt
from reports.analysis import exponent_statement, exponents, pareto_front, with_labels
from reports.fidelity import cpu_list, measurement_items
from reports.render import build_context, render_report
from reports.terminal import EMULATED, FASTEST, headline_tables, print_headline
from tests.test_report import _row, synthetic_rows, write_run

NOTE = "two modes: 8.4 ms (2 processes) and 41.4 ms (1 process)"
WRONG = ("output differs from the float64 reference: max abs error 0.51 at (b=0, h=2, q=17, d=5) > tolerance 1e-4 "
         "(rel 0.41 > 1e-5)")
#: naive's times are 3e-5·L² ms times these factors; at L=2048 an unstable case caught in its slow mode
NAIVE_BUMPS = {256: 1.0, 512: 1.1, 1024: 0.93, 2048: 5.0, 4096: 1.04}
#: run.json's ``environment.measurement`` as harness.measure.environment.measurement writes it
MEASUREMENT = {"allocator": "default", "THP_MEM_ALLOC_ENABLE": None,
               "variables": {"KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "2"}, "threads": 2,
               "cpu_affinity": [0, 1, 2, 3, 6], "cpu_governor": ["performance"]}


def doctored_rows() -> list[dict]:
    """The synthetic run (known power laws) with three kinds of untrustworthy numbers planted:

    * unstable: naive at L=2048 (its time 5× off) and sliding_window at L=512;
    * incorrect: linear at L=1024, a wrong answer 10⁴× faster than the rest of its series;
    * emulated: an ``fp8`` variant, fastest and more accurate than the other approximations.
    """
    rows = synthetic_rows()
    for r in rows:
        if r["status"] != "ok":
            continue
        r.update(stable=True, stability_note="", processes=3, time_process_spread=0.05,
                 time_ms_process_min=r["time_ms"] * 0.98, time_ms_process_max=r["time_ms"] * 1.03)
        if r["variant"] == "naive":
            r["time_ms"] *= NAIVE_BUMPS[r["seq_len"]]
        if (r["variant"], r["seq_len"]) in (("naive", 2048), ("sliding_window", 512)):
            r.update(stable=False, stability_note=NOTE)
        if (r["variant"], r["seq_len"]) == ("linear", 1024):
            r.update(status="incorrect", reason=WRONG, time_ms=0.001)
            r["tflops_per_s"] = r["flops"] / (r["time_ms"] / 1e3) / 1e12  # the measured columns stay filled
    for L in sorted({r["seq_len"] for r in rows if r["status"] == "ok"}):
        rows.append(_row("fp8", L, 1e-3 * L, 4.0 * L**2, params={"format": "e4m3fn"}, family="quantised",
                         exact=False, rel_err=0.01, emulated=True, quant_matmul="emulated (float32 matmul)",
                         stable=True, stability_note="", processes=3))
    return rows


def doctored_run(directory: Path) -> Path:
    """The doctored rows as a run directory (3 processes per case, a measurement record), rendered."""
    run = write_run(directory / "run", doctored_rows(),
                    timing={"warmup": 1, "min_time_s": 0.1, "min_reps": 3, "max_reps": 10, "processes": 3})
    meta = json.loads((run / "run.json").read_text())
    meta["environment"]["measurement"] = MEASUREMENT
    (run / "run.json").write_text(json.dumps(meta))
    render_report(run)
    return run


@pytest.fixture(scope="module")
def doctored(tmp_path_factory):
    run = doctored_run(tmp_path_factory.mktemp("doctored"))
    return run, build_context(run), (run / "report.html").read_text()


def _section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}"')
    return html[start:html.index("</section>", start)]


def test_incorrect_rows_are_listed_at_the_top_with_their_reason_and_counted(doctored):
    _, ctx, html = doctored
    assert re.search(r'class="badge s-incorrect">1 incorrect<', html)
    wrong = _section(html, "incorrect")
    assert html.index('id="incorrect"') < html.index('id="scaling"')  # before every chart
    assert ">linear<" in wrong and ">1024<" in wrong and "non-causal" in wrong
    assert WRONG.replace(">", "&gt;") in wrong
    assert [x["label"] for x in ctx["incorrect"]] == ["linear"]
    # in the table with its status, not among the skipped and failed
    assert '<td class="s-incorrect">incorrect' in _section(html, "results")
    assert "max abs error 0.51" not in _section(html, "problems")


def test_incorrect_rows_are_in_no_crossover_fit_or_throughput_figure(doctored):
    _, ctx, html = doctored
    linear = next(c for c in ctx["crossovers"] if c["label"] == "linear")
    # linear's time is 0.02·L ms against sdpa flash's 1e-5·L²: ratio 2000/L, below 1 from L = 2000.
    # The wrong answer at L=1024 (0.001 ms) would move the crossing to between 512 and 1,024.
    assert linear["time_text"] == "L ≈ 2,000 (between 512 and 2,048)"
    assert "L ≈ 2,000 (between 512 and 2,048)" in _section(html, "crossovers")
    best = [t for t in ctx["throughput"]["table"] if t["label"] == "linear"]
    assert best and all(t["best_length"] != 1024 for t in best)
    assert all(r["length"] != 1024 for c in ctx["speed_accuracy"] for r in c["rows"] if r["label"] == "linear")


def _fit(lengths, times):
    return float(np.polyfit(np.log(lengths), np.log(times), 1)[0])


def test_the_time_exponent_leaves_the_unstable_point_out_and_says_so(doctored):
    _, ctx, html = doctored
    time = {L: 3e-5 * L**2 * f for L, f in NAIVE_BUMPS.items()}
    without = _fit([512, 1024, 4096], [time[L] for L in (512, 1024, 4096)])  # the 3 largest stable lengths
    with_it = _fit([1024, 2048, 4096], [time[L] for L in (1024, 2048, 4096)])
    assert f"{without:.2f}" != f"{with_it:.2f}"
    naive = next(e for e in ctx["exponents"] if e["label"] == "naive")
    assert naive["time_exp"] == pytest.approx(without)
    assert naive["unstable_excluded"] == 1 and naive["fit_lengths"] == "512, 1024, 4096"
    scaling = _section(html, "scaling")
    assert f"naive: L^{without:.2f} (1 unstable point excluded), L^2.00" in scaling
    assert f"L^{with_it:.2f}" not in scaling
    assert "unstable points excluded</th>" in scaling


def test_too_few_stable_points_give_no_exponent():
    rows = [_row("naive", L, 1e-4 * L**2, 8.0 * L**2, stable=L == 256, stability_note=NOTE) for L in (256, 512, 1024)]
    exps = exponents(with_labels(pd.DataFrame(rows)))
    r = exps.iloc[0]
    assert r["time_exp"] is None and r["mem_exp"] == pytest.approx(2.0)
    assert r["time_note"] == "too few stable points to fit (2 unstable excluded)"
    assert exponent_statement(exps) == ("naive: time — too few stable points to fit (2 unstable excluded), "
                                        "memory ∝ L^2.00")


def test_an_unstable_length_is_left_out_of_the_time_crossover(doctored):
    _, ctx, _ = doctored
    sw = next(c for c in ctx["crossovers"] if c["label"] == "sliding_window")
    # ratio 500/L again, but read between 256 and 1,024: 512 is unstable
    assert sw["time_text"] == "L ≈ 500 (between 256 and 1,024) (1 unstable length left out)"
    assert sw["time_length"] == pytest.approx(500)
    assert sw["mem_kind"] == "always"  # memory, measured once, keeps every length


def test_unstable_cases_have_their_own_marker_hover_text_and_column(doctored):
    _, ctx, html = doctored
    assert re.search(r'class="badge s-unstable"[^>]*>2 unstable<', html)
    scaling = _section(html, "scaling")
    titles = re.findall(r'<g id="unstable-[0-9a-f]+"><title>([^<]*)</title>', scaling)
    # time and throughput panels, for each of the two unstable cases
    assert sorted(titles) == sorted([f"naive at L=2048: unstable — {NOTE}"] * 2
                                    + [f"sliding_window at L=512: unstable — {NOTE}"] * 2)
    assert "unstable timing: processes disagree" in scaling
    table = _section(html, "results")
    assert "<th" in table and ">stability</th>" in table
    assert table.count(f'class="s-unstable unstable" title="{NOTE}">unstable</td>') == 2
    assert table.count("<td>stable</td>") == sum(1 for r in ctx["rows"] if r.get("stable") is True)


def test_per_process_spread_in_the_table(doctored):
    _, ctx, html = doctored
    table = _section(html, "results")
    assert ">per-process medians</th>" in table
    flash = next(r for r in ctx["rows"] if r["label"] == "sdpa(backend=flash)" and r["seq_len"] == 1024)
    cell = (f"{fmt.duration_ms(flash['time_ms_process_min'])} – {fmt.duration_ms(flash['time_ms_process_max'])}"
            f" ({fmt.percent(5.0)})")
    assert cell in table


def test_emulated_rows_are_out_of_speed_views_but_in_accuracy_views(doctored):
    _, ctx, html = doctored
    label = "fp8"
    assert label not in {c["label"] for c in ctx["crossovers"]}
    assert label not in {e["label"] for e in ctx["exponents"]}
    assert label not in {t["label"] for t in ctx["throughput"]["table"]}
    (chart,) = ctx["speed_accuracy"]
    assert label not in {r["label"] for r in chart["rows"]}
    # it would have been on every front: faster than all and more accurate than the other approximations
    at = [(r["time_ms"], r["rel_err"]) for r in chart["rows"] if r["length"] == 4096]
    assert pareto_front([t for t, _ in at] + [1e-3 * 4096], [e for _, e in at] + [0.01])[-1]
    assert [(a["label"], a["length"]) for a in chart["accuracy_only"]] == [(label, L) for L in
                                                                           (256, 512, 1024, 2048, 4096)]
    accuracy = _section(html, "speed-accuracy")
    assert "Accuracy only (emulated" in accuracy and fmt.error(0.01) in accuracy
    assert label not in accuracy.split("Pareto front:")[1].split("</figcaption>")[0]
    table = _section(html, "results")
    assert table.count('<span class="tag" title="emulated: the time is not a speed result">emulated</span>') == 5
    assert "Emulated rows (fp8) are left out" in _section(html, "scaling")


def test_the_header_shows_the_measurement_environment(doctored):
    _, _, html = doctored
    header = html[:html.index("</header>")]
    assert "3 fresh worker processes per case" in header
    assert "default · THP_MEM_ALLOC_ENABLE unset" in header
    assert "KMP_BLOCKTIME=0, OMP_NUM_THREADS=2" in header and "LD_PRELOAD" not in header
    assert "0–3, 6 (5 CPUs)" in header and "performance" in header


def test_measurement_items_read_what_the_harness_records():
    from harness.measure.environment import measurement

    record = measurement("thp", environ={"OMP_NUM_THREADS": "3", "HOME": "/root"})
    items = dict(measurement_items({"measurement": record}, {"timing": {"processes": 1}}, pd.DataFrame()))
    assert items["allocator"] == "thp · THP_MEM_ALLOC_ENABLE=1"
    assert items["variables"] == "OMP_NUM_THREADS=3" and items["threads"] == str(record["threads"])
    assert items["processes"] == "1 worker process per case"
    if record["cpu_affinity"]:
        assert items["CPU affinity"] == cpu_list(record["cpu_affinity"])


def test_measurement_items_read_other_shapes_and_older_runs():
    rows = pd.DataFrame({"processes": [2, 2, 1]})
    items = dict(measurement_items({"measurement": {
        "allocator": {"choice": "thp", "THP_MEM_ALLOC_ENABLE": "1"}, "env": {}, "threads": {"intra_op": 4},
        "affinity": [0, 1], "cpu_governor": {"cpu0": "powersave", "cpu1": "powersave"}}}, {}, rows))
    assert items["allocator"] == "thp · THP_MEM_ALLOC_ENABLE=1"
    assert items["threads"] == "4" and items["CPU affinity"] == "0–1 (2 CPUs)" and items["CPU governor"] == "powersave"
    assert items["variables"].startswith("no allocator or threading variable set")
    assert items["processes"].startswith("2 fresh worker processes") and "(some cases by 1)" in items["processes"]
    # a run from before the measurement record: its allocator variable, nothing invented
    assert measurement_items({"allocator": {"THP_MEM_ALLOC_ENABLE": "1"}}, {}, pd.DataFrame()) == [
        ("allocator", "THP_MEM_ALLOC_ENABLE=1")]
    assert measurement_items({}, {}, pd.DataFrame()) == []
    assert cpu_list([3]) == "3 (1 CPU)"


def test_terminal_table_marks_emulated_and_incorrect_and_never_calls_them_fastest():
    rows = pd.DataFrame([r for r in doctored_rows() if r["seq_len"] in (1024, 4096)])
    (_, table), = headline_tables(rows)
    cols = {str(c.header): [re.sub(r"\[/?[a-z ]*\]", "", str(x)) for x in c.cells] for c in table.columns}
    variants = cols["variant"]
    assert cols["L=1,024"][variants.index("linear")] == "incorrect"  # its 0.001 ms is not shown as a time
    fp8 = cols["L=4,096"][variants.index("fp8(format=e4m3fn)")]
    assert fp8.endswith(EMULATED) and FASTEST not in fp8  # the smallest time, but not a speed result
    assert FASTEST in cols["L=4,096"][variants.index("sliding_window(window=256)")]
    out = io.StringIO()
    print_headline(rows, Console(file=out, width=200))
    assert f"{EMULATED}: time not a speed result" in out.getvalue()
