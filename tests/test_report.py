"""The run report: crossovers, Pareto fronts, baselines, optional sections, and a real tiny run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.core import schema
from harness.core import units as fmt
from harness.engine.store import RunWriter
from reports.analysis import (
    baseline_label,
    crossover_length,
    crossovers,
    exponent_statement,
    exponents,
    pareto_front,
    with_labels,
)
from reports.render import build_context, render_report
from tests.runs import record_case

# -- crossovers ----------------------------------------------------------------------------------

def test_crossover_interpolates_on_log_log():
    # ratio = 4 at L=256, 1/4 at L=1024: log-linear in log L, so 1 at the geometric midpoint 512
    r = crossover_length([128, 256, 1024, 2048], [8, 4, 0.25, 0.1])
    assert r["kind"] == "at" and r["between"] == (256, 1024)
    assert r["length"] == pytest.approx(512)
    # unequal ratios: log r goes from log 2 to log(1/8): crosses a quarter of the way in log L
    r = crossover_length([1000, 16000], [2, 1 / 8])
    assert r["length"] == pytest.approx(1000 * 16 ** 0.25)


def test_crossover_uses_the_last_crossing_and_reports_never_and_always():
    # ahead at 512, behind again at 1024, ahead from 2048 on: the crossover is between 1024 and 2048
    r = crossover_length([256, 512, 1024, 2048, 4096], [2, 0.5, 1.5, 0.5, 0.25])
    assert r["kind"] == "at" and r["between"] == (1024, 2048)
    assert 1024 < r["length"] < 2048
    assert crossover_length([256, 512], [0.5, 0.3]) == {"kind": "always", "length": 256.0}
    never = crossover_length([256, 512, 1024], [2, 0.8, 1.2])
    assert never["kind"] == "never" and never["wins"] == [512]
    assert crossover_length([], [])["kind"] == "none"
    # exactly equal at a measured length: the crossover is that length
    assert crossover_length([256, 512, 1024], [2, 1.0, 0.5])["length"] == pytest.approx(512)


def _row(variant, L, time_ms, mem, *, params=None, family="dense", exact=True, causal=False, rel_err=1e-7,
         status="ok", reason="", **extra):
    row = schema.empty_row()  # every declared column, as the runner's rows have them
    row.update({
        "case_id": f"{variant}-{json.dumps(params or {})}-{L}-{causal}", "variant": variant, "family": family,
        "exact": exact, "params": json.dumps(params or {}, sort_keys=True), "device": "cpu", "dtype": "float32",
        "mode": "fwd", "batch": 1, "heads": 4, "kv_heads": 4, "seq_len": L, "head_dim": 64, "causal": causal,
        "inputs": "gaussian", "status": status, "reason": reason, "time_ms": time_ms,
        "time_ms_p10": time_ms * 0.95 if time_ms == time_ms else math.nan,
        "time_ms_p90": time_ms * 1.1 if time_ms == time_ms else math.nan, "reps": 5 if status == "ok" else 0,
        "first_call_ms": time_ms * 3, "flops": 4.0 * 4 * 64 * L * L, "peak_mem_bytes": mem,
        "working_set_bytes": mem, "max_abs_err": rel_err * 3, "rel_err": rel_err, "grad_rel_err": math.nan,
        "threads": 2, "run_id": "synthetic", "suite": "synthetic",
    })
    row["tflops_per_s"] = row["flops"] / (time_ms / 1e3) / 1e12 if status == "ok" else math.nan
    row.update(extra)
    return row


LENGTHS = [256, 512, 1024, 2048, 4096]


def synthetic_rows(calibrated: bool = False) -> list[dict]:
    """Known power laws: dense time 1e-5·L² ms, memory 16·L² B; local time 5e-3·L ms, memory 2048·L B.

    The local variant is faster from L = 500 (5e-3·L = 1e-5·L²) and smaller at every length (from 128).
    """
    rows = []
    for L in LENGTHS:
        rows.append(_row("sdpa", L, 1e-5 * L**2, 16.0 * L**2, params={"backend": "flash"}))
        rows.append(_row("sdpa", L, 2e-5 * L**2, 24.0 * L**2, params={"backend": "math"}))
        rows.append(_row("naive", L, 3e-5 * L**2, 32.0 * L**2))
        rows.append(_row("sliding_window", L, 5e-3 * L, 2048.0 * L, params={"window": 256}, family="local"))
        # approximate: faster from L = 2000 (0.02·L = 1e-5·L²), never smaller (memory 32·L² > 16·L²)
        rows.append(_row("linear", L, 0.02 * L, 32.0 * L**2, family="linear", exact=False, rel_err=0.7))
        rows.append(_row("lowrank", L, 0.1 * L, 8.0 * L**2, params={"rank": 16}, family="low_rank", exact=False,
                         rel_err=0.3))
    rows.append(_row("sdpa", 256, math.nan, math.nan, params={"backend": "efficient"}, status="skipped",
                     reason="sdpa backend 'efficient' runs only on CUDA"))
    rows.append(_row("naive", 8192, math.nan, math.nan, status="skipped", reason="estimated working set too big"))
    rows.append(_row("lowrank", 8192, math.nan, math.nan, params={"rank": 16}, family="low_rank", exact=False,
                     status="error", reason="RuntimeError: boom"))
    if calibrated:
        for r in rows:  # what a worker records of the machine (the rates are derived from them on reading)
            r["peak_tflops_per_s"] = 0.5
            r["min_bytes"] = 4 * 4 * 4 * 64 * r["seq_len"]
            r["peak_gb_per_s"] = 20.0  # the calibration's copy bandwidth
    return rows


def write_run(run_dir: Path, rows: list[dict], **meta) -> Path:
    base = {"run_id": "synthetic-run", "suite": {"name": "synthetic", "description": "known power laws"},
            "timing": {"warmup": 1, "min_time_s": 0.1, "min_reps": 3, "max_reps": 10}, "started": "2026-01-01T00:00:00",
            "finished": "2026-01-01T00:01:00", "status": "complete",
            "environment": {"machine": {"cpu_model": "Test CPU", "cpu_count": 2, "gpu": None},
                            "versions": {"python": "3.11", "torch": "2.13", "harness": "0.1.0"}, "threads": 2,
                            "git": {"commit": "abc1234", "dirty": False}}}
    base.update(meta)
    writer = RunWriter(run_dir, base)
    for r in rows:
        record_case(writer, r, [r["time_ms"] / 1e3] * 3 if r["status"] == "ok" else [])
    writer.finalize()
    return run_dir


def test_crossovers_against_known_power_laws():
    ok = with_labels(pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok"]))
    cross = crossovers(ok).set_index("label")
    assert set(cross.index) == {"sliding_window(window=256)", "linear", "lowrank(rank=16)"}  # not sdpa/naive
    assert (cross["baseline"] == "sdpa(backend=flash)").all()
    sw = cross.loc["sliding_window(window=256)"]
    assert sw["time_kind"] == "at" and sw["time_length"] == pytest.approx(500, rel=1e-9)
    assert sw["mem_kind"] == "always" and sw["mem_length"] == 256
    lin = cross.loc["linear"]
    assert lin["time_length"] == pytest.approx(2000, rel=1e-9)
    assert lin["mem_kind"] == "never" and lin["mem_text"] == "never in this sweep"
    assert lin["time_ratio_last"] == pytest.approx(1e-5 * 4096**2 / (0.02 * 4096))
    assert cross.loc["lowrank(rank=16)", "mem_kind"] == "always"
    assert "L ≈ 500 (between 256 and 512)" == sw["time_text"]


def test_baseline_preference_flash_then_other_sdpa_then_naive():
    ok = with_labels(pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok"]))
    assert baseline_label(ok)[0] == "sdpa(backend=flash)"
    no_flash = ok[ok["label"] != "sdpa(backend=flash)"]
    label, why = baseline_label(no_flash)
    assert label == "sdpa(backend=math)" and "no sdpa flash" in why
    label, why = baseline_label(no_flash[no_flash["variant"] != "sdpa"])
    assert label == "naive" and "no sdpa" in why
    assert baseline_label(ok[ok["family"] == "local"])[0] is None
    # no baseline: the crossover row says so instead of inventing one
    cross = crossovers(ok[ok["variant"].isin(["linear", "sliding_window"])])
    assert (cross["time_text"] == "no baseline").all()


def test_labels_name_the_parameters_the_suite_set_or_that_vary():
    rows = pd.DataFrame(
        [{"variant": "block_sparse", "params": json.dumps({"block": 64, "seed": 0, "pattern": p})}
         for p in ("bigbird", "local_global")]
        + [{"variant": "sliding_window", "params": json.dumps({"block": 64, "window": 256})},
           {"variant": "linear", "params": json.dumps({"chunk": 64})}, {"variant": "naive", "params": "{}"}]
    )
    definition = {"variant": [{"name": "sliding_window", "window": 256}, {"name": "block_sparse"},
                              {"name": "linear"}, {"name": "naive"}]}
    assert list(with_labels(rows, definition)["label"]) == [
        "block_sparse(pattern=bigbird)", "block_sparse(pattern=local_global)", "sliding_window(window=256)",
        "linear", "naive"]
    assert list(with_labels(rows)["label"])[2] == "sliding_window(block=64,window=256)"  # no suite: all of them


def test_pareto_front():
    times = [1.0, 2.0, 3.0, 0.5, 2.0]
    errs = [0.5, 0.1, 0.2, 0.9, 0.1]  # (3, 0.2) is dominated by (2, 0.1); the two (2, 0.1) tie
    assert pareto_front(times, errs) == [True, True, False, True, True]
    assert pareto_front([1.0], [0.1]) == [True]


def test_exponents_and_statement_recover_power_laws():
    ok = with_labels(pd.DataFrame([r for r in synthetic_rows() if r["status"] == "ok"]))
    exps = exponents(ok).set_index("label")
    assert exps.loc["naive", "time_exp"] == pytest.approx(2.0)
    assert exps.loc["sliding_window(window=256)", "mem_exp"] == pytest.approx(1.0)
    text = exponent_statement(exps.reset_index().loc[lambda d: d["label"].isin(["naive", "linear"])])
    assert text == "linear: time ∝ L^1.00, memory ∝ L^2.00; naive: L^2.00, L^2.00"


# -- the rendered page ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    """The synthetic run (analytic intensity but no calibration; a variant column, a telemetry column)."""
    rows = synthetic_rows()
    for r in rows:
        r["density"] = 0.125
        r["power_w"] = 250.0
        r["arith_intensity"] = r["flops"] / (4 * 4 * 4 * 64 * r["seq_len"])
    run = write_run(tmp_path_factory.mktemp("synthetic") / "run", rows)
    return run, render_report(run).read_text()


def test_report_without_calibration_has_no_roofline_and_no_percent(synthetic_report):
    run, html = synthetic_report
    ctx = build_context(run)
    assert ctx["throughput"]["roofline"] is None and not ctx["throughput"]["has_pct"]
    assert "Roofline" not in html and "% of peak" not in html
    assert 'id="crossovers"' in html and "L ≈ 500 (between 256 and 512)" in html
    assert "L ≈ 2,000 (between 1,024 and 2,048)" in html
    assert 'id="speed-accuracy"' in html
    # scaling charts: one per configuration (one here); speed-vs-accuracy: one
    assert html.count('<figure class="scaling">') == 1 and html.count('<figure class="speed-accuracy">') == 1
    assert "time ∝ L^2.00" in html and "naive: L^2.00, L^2.00" in html
    # problems grouped by reason, errors before skips
    problems = html[html.index('id="problems"'):]
    assert problems.index("RuntimeError: boom") < problems.index("runs only on CUDA")


def test_extra_numeric_columns_are_shown_with_units(synthetic_report):
    _, html = synthetic_report
    assert '<th class="num">density</th>' in html and ">0.125<" in html
    assert '<th class="num">power <span class="unit">W</span></th>' in html and ">250<" in html


def test_report_with_calibration_draws_the_roofline(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows(calibrated=True))
    ctx = build_context(run)
    tp = ctx["throughput"]
    assert tp["has_pct"] and tp["roofline"] is not None
    roof = tp["roofline"]["roofs"]["cpu float32"]
    assert roof["peak_tflops"] == pytest.approx(0.5) and roof["bandwidth_gbs"] == 20.0
    html = render_report(run).read_text()
    assert html.count('<figure class="roofline">') == 1
    assert "arithmetic intensity (FLOP/byte)" in html and "% of peak" in html
    assert "achieved GFLOP/s" in tp["roofline"]["svg"]  # a sub-TFLOP/s machine is drawn in GFLOP/s
    # the percentage shown is the row's own: sdpa flash at L=4096 runs at 1e-5·4096² ms
    flash = next(t for t in tp["table"] if t["label"] == "sdpa(backend=flash)")
    tflops = 4.0 * 4 * 64 * 4096**2 / (1e-5 * 4096**2 / 1e3) / 1e12
    assert flash["pct"] == pytest.approx(tflops / 0.5 * 100)


def test_no_approximate_variants_means_no_speed_accuracy_section(tmp_path):
    rows = [r for r in synthetic_rows() if r["exact"]]
    html = render_report(write_run(tmp_path / "run", rows)).read_text()
    assert 'id="speed-accuracy"' not in html and "Pareto" not in html
    assert 'id="crossovers"' in html  # sliding_window is local: compared although exact


def test_units():
    assert fmt.duration_ms(0.0123) == "12.3 µs" and fmt.duration_ms(12.34) == "12.3 ms"
    assert fmt.duration_ms(2500) == "2.5 s"
    assert fmt.size_bytes(3 * 2**20) == "3 MiB" and fmt.size_bytes(1.5 * 2**30) == "1.5 GiB"
    assert fmt.rate_tflops(0.0421) == "42.1 GFLOP/s" and fmt.rate_tflops(312) == "312 TFLOP/s"
    assert fmt.ratio(3.2) == "3.2× faster" and fmt.ratio(0.5) == "2× slower" and fmt.ratio(1.001) == "same"
    assert fmt.flop_count(2.5e9) == "2.5 GFLOP" and fmt.percent(42.345) == "42.3 %"
    assert fmt.ci_percent(0.0123) == "±1.2 %" and fmt.ci_percent(2.7) == "±270 %"
    assert fmt.duration_ms(float("nan")) == "" and fmt.ratio(None) == ""


def test_report_from_a_real_tiny_run(tiny_run):
    html = (tiny_run / "report.html").read_text()
    rows = pd.read_parquet(tiny_run / "results.parquet")
    assert len(rows) == 20
    # header: suite, run id, machine, counts
    meta = json.loads((tiny_run / "run.json").read_text())
    assert meta["run_id"] in html and "tiny-report" in html
    assert re.search(r'class="badge s-ok">16 ok<', html) and re.search(r'class="badge s-skipped">4 skipped<', html)
    assert meta["environment"]["machine"]["cpu_model"] in html
    # sections present; the roofline and % of peak exactly when this machine has a calibration
    for section in ("scaling", "crossovers", "throughput", "speed-accuracy", "results", "problems"):
        assert f'id="{section}"' in html
    calibrated = "pct_of_peak" in rows.columns and rows["pct_of_peak"].notna().any()
    assert ('<figure class="roofline">' in html) == calibrated
    assert ("% of peak</th>" in html) == calibrated
    assert html.count('<figure class="scaling">') == 2  # causal and not
    # every row in the table, with units
    body = html[html.index('id="results-table"'):]
    assert body.count("<tr>") == 1 + 20
    assert re.search(r"\d (µs|ms)<", body) and re.search(r"\d (KiB|MiB)<", body) and "FLOP/s<" in body
    # crossovers name the baseline: sdpa flash ran
    ctx = build_context(tiny_run)
    assert {c["baseline"] for c in ctx["crossovers"]} == {"sdpa(backend=flash)"}
    # labels name the parameters the suite set (window), not every default (block, chunk)
    assert {c["label"] for c in ctx["crossovers"]} == {"sliding_window(window=8)", "linear"}
    # speed vs accuracy: linear's error is an approximation error, far above the exact baseline's
    for chart in ctx["speed_accuracy"]:
        errs = {r["label"].split("(")[0]: r["rel_err"] for r in chart["rows"]}
        assert errs["linear"] > 100 * errs["sdpa"]
        assert any(r["front"] for r in chart["rows"])
    for external in ('src="http', 'href="http', "url(http", "@import", "<link"):
        assert external not in html


# -- progress while it runs (harness/engine/progress.py) ------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _ok_row(**extra):
    row = {"status": "ok", "time_ms": 1.5, "tflops_per_s": 0.02, "peak_mem_bytes": 3 * 2**20, "rel_err": 2e-7,
           "first_call_ms": 2.0}
    row.update(extra)
    return row


def test_plain_progress_lines_and_heartbeat_during_a_long_first_call():
    import io

    from harness.core.cases import Case
    from harness.engine.progress import PlainProgress

    clock, out = FakeClock(), io.StringIO()
    p = PlainProgress(3, verbose=True, stream=out, heartbeat_s=60, clock=clock)
    compiled = Case("flex", params={"mask": "causal"}, seq_len=4096)
    p.start(compiled)
    p.phase(compiled, "inputs")
    clock.t += 1
    p.phase(compiled, "first call")
    clock.t += 30
    p.tick()
    assert out.getvalue() == ""  # nothing to say before the first heartbeat
    clock.t += 40
    p.tick()
    p.tick()  # the same heartbeat is not repeated
    lines = out.getvalue().splitlines()
    assert lines == [(f"[0/3   71.0s] still running {compiled.label()}: first call: compiling / autotuning "
                      "for 70 s (case 71 s)")]
    clock.t += 60
    p.tick()
    assert "for 130 s" in out.getvalue().splitlines()[-1]
    p.phase(compiled, "timing")
    clock.t += 5
    p.finish(compiled, _ok_row(first_call_ms=130_000.0))
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("[1/3  136.0s] flex(mask=causal)") and "ok  1.5 ms, 20 GFLOP/s, 3.0 MiB" in last
    assert "first call 130 s" in last
    p.tick()  # no case in flight: silent
    assert len(out.getvalue().splitlines()) == 3


def test_plain_progress_without_verbose_prints_every_tenth():
    import io

    from harness.core.cases import Case
    from harness.engine.progress import PlainProgress

    out = io.StringIO()
    p = PlainProgress(20, stream=out, heartbeat_s=None, clock=FakeClock())
    for i in range(20):
        case = Case("naive", seq_len=64 + i)
        p.start(case)
        p.finish(case, _ok_row() if i != 7 else {"status": "error", "reason": "RuntimeError: boom"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("[2/20") and lines[-1].startswith("[20/20")


def test_rich_progress_shows_the_phase_and_a_compilation_as_such():
    import io
    import re as _re

    from rich.console import Console

    from harness.core.cases import Case
    from harness.engine.progress import RichProgress

    clock, buf = FakeClock(), io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, color_system=None)
    case = Case("flex", seq_len=2048)
    with RichProgress(2, verbose=True, console=console, clock=clock) as p:
        p.start(case)
        p.phase(case, "first call")
        clock.t += 0.5
        p.live.refresh()
        shown = _re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
        assert "first call  0.5 s" in shown and "compiling" not in shown
        clock.t += 41.5
        p.live.refresh()
        shown = _re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
        assert f"now first call: compiling / autotuning 42.0 s {case.label()}" in shown
        p.phase(case, "timing")
        clock.t += 2
        p.live.refresh()
        shown = _re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
        assert "timing  2.0 s (case 44.0 s)" in shown
        p.finish(case, _ok_row(first_call_ms=42_000.0))
    shown = _re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert f"{case.label()}: ok  1.5 ms" in shown and "first call 42 s" in shown
    assert "1/2" in shown


def test_make_progress_is_plain_off_a_terminal_and_when_quiet(monkeypatch):
    import io

    from harness.engine.progress import PlainProgress, RichProgress, make_progress

    assert isinstance(make_progress(5), PlainProgress)  # pytest's stderr is not a terminal
    assert make_progress(5, verbose=True).verbose
    monkeypatch.setattr("sys.stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    assert isinstance(make_progress(5), RichProgress)
    quiet = make_progress(5, verbose=True, quiet=True)  # on a terminal too: lines, not a bar, not per case
    assert isinstance(quiet, PlainProgress) and not quiet.verbose and quiet.heartbeat_s
