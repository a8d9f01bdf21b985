"""End to end: the CLI in a subprocess on tiny suites; output files, columns, exit codes."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from harness.engine import store
from tests.runs import bench

REQUIRED_COLUMNS = (
    "run_id suite variant family params device dtype mode batch heads kv_heads seq_len head_dim causal status "
    "reason time_ms time_ms_p10 time_ms_p90 reps flops tflops_per_s peak_mem_bytes max_abs_err rel_err"
).split()


def test_run_writes_results_meta_and_report(tiny_bench):
    proc, out = tiny_bench
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"report: {out / 'report.html'}" in proc.stdout
    rows = pd.read_parquet(out / "results.parquet")
    assert set(REQUIRED_COLUMNS) <= set(rows.columns)
    assert len(rows) == 4 * 5  # 5 variant configurations x 2 lengths x 2 causal
    ok = rows[rows["status"] == "ok"]
    assert len(ok) == 16
    assert (ok["time_ms"] > 0).all() and (ok["reps"] >= 2).all() and (ok["flops"] > 0).all()
    assert (ok["time_ms_p10"] <= ok["time_ms"]).all() and (ok["time_ms"] <= ok["time_ms_p90"]).all()
    assert (ok["peak_mem_bytes"] > 0).all()
    exact = ok[ok["exact"]]
    assert (exact["rel_err"] < 1e-5).all()
    skipped = rows[rows["status"] == "skipped"]
    assert len(skipped) == 4 and skipped["reason"].str.contains("runs only on CUDA").all()
    samples = pd.read_parquet(out / "samples.parquet")
    assert set(samples["case_id"]) == set(ok["case_id"])
    assert samples.groupby("case_id").size().min() >= 2


def test_run_json_records_environment(tiny_bench):
    _, out = tiny_bench
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["suite"]["name"] == "tiny-report"
    env = meta["environment"]
    assert env["versions"]["torch"] and env["versions"]["python"].startswith("3.")
    assert env["machine"]["cpu_model"] and env["threads"] >= 1
    assert "commit" in env["git"]
    assert meta["started"] <= meta["finished"]


def test_report_is_self_contained_html(tiny_bench):
    _, out = tiny_bench
    html = (out / "report.html").read_text()
    assert html.count('<figure class="scaling">') == 2  # one chart (time, throughput, memory) per configuration
    assert html.count("sequence length L (tokens)") == 6 and "peak memory beyond inputs (MiB)" in html
    for external in ('src="http', "src='http", 'href="http', "url(http", "@import", "<link"):
        assert external not in html  # nothing loaded from the network
    assert "runs only on CUDA" in html  # skipped rows with their reasons
    assert "Measured scaling exponents" in html


def test_report_command_rerenders(tiny_bench, tmp_path):
    _, out = tiny_bench
    target = tmp_path / "again.html"
    proc = bench("report", str(out), "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_text().count('<figure class="scaling">') == 2


def test_report_on_a_non_run_directory_is_a_clear_error(tmp_path):
    proc = bench("report", str(tmp_path))
    assert proc.returncode == 2
    assert "not a run directory" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "run.json").write_text("{broken")
    proc = bench("report", str(tmp_path))
    assert proc.returncode == 2 and "damaged" in proc.stderr


def test_bad_suite_exits_2_with_one_line_per_problem(tmp_path):
    suite = tmp_path / "bad.toml"
    suite.write_text('[sweep]\nseq_len = [0]\n[[variant]]\nname = "naiv"\n')
    proc = bench("run", str(suite), "-o", str(tmp_path / "never"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"{suite}:2: sweep.seq_len: must be a positive integer, got 0",
        f"{suite}:4: variant[0] (naiv).name: unknown variant 'naiv' (did you mean naive?)",
    ]
    assert not (tmp_path / "never").exists()


def test_bad_arguments_exit_2_without_traceback():
    proc = bench("run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_list_and_version():
    proc = bench("list", "--json")
    assert proc.returncode == 0
    names = {v["name"] for v in json.loads(proc.stdout)}
    assert {"naive", "sdpa", "sliding_window", "linear"} <= names
    table = bench("list")
    assert table.returncode == 0 and "sliding_window" in table.stdout
    version = bench("--version")
    assert version.returncode == 0 and "attention-bench" in version.stdout


def test_error_in_a_variant_becomes_an_error_row(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "from harness import register_variant, attention_flops\n"
        "@register_variant('always_raises', family='dense', exact=True, flops=attention_flops)\n"
        "def always_raises(q, k, v, *, causal):\n"
        "    raise RuntimeError('kernel exploded\\nsecond line')\n"
    )
    suite = tmp_path / "s.toml"
    suite.write_text(
        'plugins = ["broken.py"]\n[sweep]\nseq_len = [16]\n[timing]\nmin_time_s = 0.0\nmax_reps = 3\n'
        '[[variant]]\nname = "always_raises"\n[[variant]]\nname = "naive"\n'
    )
    proc = bench("run", str(suite), "-o", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = store.read_results(tmp_path / "out").set_index("variant")
    assert rows.loc["always_raises", "status"] == "error"
    assert rows.loc["always_raises", "reason"] == "RuntimeError: kernel exploded"
    assert rows.loc["naive", "status"] == "ok"


HEAVY = ("torch", "numpy", "pandas", "scipy", "rich", "pyarrow", "matplotlib")


def test_help_and_argument_parsing_import_nothing_heavy():
    """Registering every command's parser (bench --help) must not import the measurement stack."""
    code = (
        "import sys\nfrom harness.cli.main import build_parser, main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
        "build_parser().parse_args(['run', 'x.toml', '--isolation', 'none'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run a suite file" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


def test_list_json_needs_no_pandas_scipy_or_rich():
    code = (
        "import sys, io, contextlib\nfrom harness.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['list', '--json']) == 0\n"
        "print(sorted(m for m in ('pandas', 'scipy', 'rich') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "lots"])
def test_a_bad_number_on_the_command_line_is_one_line(tmp_path, value):
    proc = bench("run", str(tmp_path / "s.toml"), "--memory-budget-gib", value)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--memory-budget-gib" in lines[0], lines
