"""The headline table at the end of ``bench run`` and in ``bench show``: per configuration, variants ×
sequence lengths of median time, the fastest of each column marked, other outcomes by their status."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pandas as pd
import pytest
from rich.console import Console

from reports.analysis import with_labels
from reports.terminal import FASTEST, UNSTABLE, headline_tables, print_headline

TWO_CASES = """
name = "two-cases"
defaults = {heads = 2, head_dim = 16, seq_len = 32}
timing = {warmup = 1, min_time_s = 0.0, min_reps = 2, max_reps = 3}
variant = [{name = "naive"}, {name = "sdpa", backend = "flash"}]
"""


@pytest.fixture(scope="module")
def rows(tiny_run):
    return pd.read_parquet(tiny_run / "results.parquet")


def _plain(text: str) -> str:
    return re.sub(r"\[/?[a-z ]*\]", "", text)


def _columns(table) -> dict[str, list[str]]:
    return {str(c.header): [_plain(str(x)) for x in c.cells] for c in table.columns}


def test_a_column_per_length_and_the_fastest_of_each_column_marked(rows):
    tables = headline_tables(rows)
    labelled = with_labels(rows)
    assert len(tables) == 2  # causal and not: the two configurations of the tiny suite
    for title, table in tables:
        cols = _columns(table)
        assert list(cols) == ["variant", "L=32", "L=64"]
        causal = "non-causal" not in title
        for length in (32, 64):
            cells = cols[f"L={length}"]
            marked = [label for label, cell in zip(cols["variant"], cells) if FASTEST in cell]
            ok = labelled[(labelled["causal"] == causal) & (labelled["seq_len"] == length)
                          & (labelled["status"] == "ok")]
            assert marked == [ok.loc[ok["time_ms"].idxmin(), "label"]]
        skipped = cols["variant"].index("sdpa(backend=efficient)")  # not on CPU: its status, not a time
        assert cols["L=32"][skipped] == "skipped" and cols["L=64"][skipped] == "skipped"
        assert all(re.search(r"\d( ms| µs| s)", c) for i, c in enumerate(cols["L=32"]) if i != skipped)


def test_unstable_and_failing_cases_are_marked_and_never_fastest(rows):
    rows = rows.copy()
    group = rows[(~rows["causal"]) & (rows["seq_len"] == 32) & (rows["status"] == "ok")]
    fastest = group["time_ms"].idxmin()
    rows.loc[fastest, "status"] = "error"  # the fastest time came from a case that failed
    slowest = group["time_ms"].idxmax()
    rows["stable"], rows["contended"] = True, False  # whatever the machine running the tests was doing
    rows.loc[slowest, "stable"] = False
    (title, table), _ = headline_tables(rows)
    assert "non-causal" in title
    cols = _columns(table)
    label = with_labels(rows).loc[fastest, "label"]
    assert cols["L=32"][cols["variant"].index(label)] == "error"
    marked = [c for c in cols["L=32"] if FASTEST in c]
    assert len(marked) == 1 and "error" not in marked[0]
    slow_label = with_labels(rows).loc[slowest, "label"]
    assert cols["L=32"][cols["variant"].index(slow_label)].endswith(UNSTABLE)
    out = io.StringIO()
    print_headline(rows, Console(file=out, width=200))
    assert f"{UNSTABLE} unstable" in out.getvalue()


def test_verbose_adds_peak_memory_and_output_is_plain_text(rows):
    out = io.StringIO()
    print_headline(rows, Console(file=out, width=200), verbose=True)
    text = out.getvalue()
    assert "KiB" in text and "peak memory" in text
    assert "\x1b[" not in text  # not a terminal: no colour codes in logs


def _run(tmp_path, *flags):
    suite = tmp_path / "two.toml"
    suite.write_text(TWO_CASES)
    out = tmp_path / ("run" + "".join(flags).replace("-", "_"))
    return subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "-o", str(out), "--isolation", "none",
                           *flags], capture_output=True, text=True, timeout=300)


def test_bench_run_prints_the_table_and_quiet_does_not(tmp_path):
    loud = _run(tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "L=32" in loud.stdout and FASTEST in loud.stdout and "sdpa(backend=flash)" in loud.stdout
    quiet = _run(tmp_path, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "L=32" not in quiet.stdout + quiet.stderr and FASTEST not in quiet.stdout


def test_bench_show_prints_the_same_table(tiny_run):
    run = tiny_run
    proc = subprocess.run([sys.executable, "-m", "harness", "show", str(run)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("L=64") >= 2 and proc.stdout.count(FASTEST) >= 4
    assert "non-causal" in proc.stdout and "skipped" in proc.stdout
