"""`bench export --format pytest-benchmark`, read back by pytest-benchmark's own code.

A real tiny run is exported; pytest-benchmark's file storage loader reads it, its grouping
and table code display it, its ``compare`` command accepts it, and a ``pytest --benchmark-only``
run of the same suite through ``tests/benchmarks`` pairs with it case by case
(``--benchmark-compare`` against the exported run saved in its storage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pytest_benchmark")

from _pytest.config import Config  # noqa: E402
from pytest_benchmark.logger import Logger  # noqa: E402
from pytest_benchmark.plugin import pytest_benchmark_group_stats, pytest_benchmark_scale_unit  # noqa: E402
from pytest_benchmark.storage.file import FileStorage  # noqa: E402
from pytest_benchmark.table import TableResults  # noqa: E402
from pytest_benchmark.utils import NAME_FORMATTERS, get_machine_id, report_noprogress  # noqa: E402

from harness.core.cases import Case  # noqa: E402
from harness.regression.export import benchmark_group, benchmark_id  # noqa: E402
from tests.runs import TINY_SUITE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def export(*argv: str) -> int:
    """``bench export ...`` as the command line runs it (its errors caught once, in main)."""
    from harness.cli.main import main

    return main(["export", *argv])


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "exported.json"
    assert export(str(run), "-o", str(out)) == 0
    return out


def _load(path: Path) -> list[dict]:
    storage = FileStorage(path.parent, logger=Logger(Logger.QUIET))
    return list(storage.load_benchmarks(str(path)))


def test_loader_reads_every_ok_case_with_its_raw_samples(run, exported):
    rows = pd.read_parquet(run / "results.parquet")
    samples = pd.read_parquet(run / "samples.parquet")
    ok = rows[rows["status"] == "ok"].set_index("case_id")
    benches = _load(exported)
    assert len(benches) == len(ok) == 16
    for b in benches:
        row = ok.loc[b["extra_info"]["case_id"]]
        data = samples[samples["case_id"] == row.name].sort_values(["process", "rep"])["time_ms"].to_numpy() / 1e3
        assert b["data"] == pytest.approx(list(data))
        assert b["rounds"] == row["reps"] == len(data) and b["iterations"] == 1
        # pytest-benchmark's statistics of the same samples agree with the run's own figures
        if row["processes"] == 1:
            assert b["median"] == pytest.approx(row["time_ms"] / 1e3, rel=1e-12)
        else:  # the run's time is the median of the processes' medians; the pooled median lies between them
            assert row["time_ms_process_min"] <= b["median"] * 1e3 <= row["time_ms_process_max"]
        assert b["min"] == pytest.approx(data.min()) and b["max"] == pytest.approx(data.max())
        assert b["mean"] == pytest.approx(data.mean()) and b["ops"] == pytest.approx(len(data) / data.sum())
        assert b["name"] == f"test_attention[{b['param']}]"
        assert b["fullname"] == f"tests/benchmarks/test_attention.py::test_attention[{b['param']}]"
        assert b["extra_info"]["flops"] == row["flops"] and b["extra_info"]["variant"] == row["variant"]
    doc = json.loads(exported.read_text())
    assert doc["commit_info"]["id"] and doc["attention_bench"]["fingerprint"]
    assert doc["attention_bench"]["run_id"] == json.loads((run / "run.json").read_text())["run_id"]


def test_compare_table_code_renders_the_export(exported, capsys):
    benches = _load(exported)
    groups = pytest_benchmark_group_stats(config=None, benchmarks=benches, group_by="group")
    assert {g for g, _ in groups} == {benchmark_group(b["extra_info"]) for b in benches}

    class Reporter:  # the terminal writer interface TableResults uses
        def __init__(self):
            self.lines = []

        def write_line(self, line, **_):
            self.lines.append(line)

        def write(self, text, **_):
            self.lines.append(text)

        def section(self, title, *_, **__):
            self.lines.append(title)

        def rewrite(self, *_, **__):
            pass

        def ensure_newline(self):
            pass

    reporter = Reporter()
    # as pytest-benchmark's own `compare` command builds it (pytest_benchmark.cli.main)
    scale_unit = partial(pytest_benchmark_scale_unit, config=Config.fromdictargs({"benchmark_time_unit": None}, []))
    table = TableResults(columns=["min", "median", "max", "rounds"], sort="min", histogram=False,
                         name_format=NAME_FORMATTERS["short"], logger=Logger(Logger.QUIET), scale_unit=scale_unit)
    table.display(reporter, groups, progress_reporter=report_noprogress)
    text = "\n".join(str(x) for x in reporter.lines)
    assert "sdpa(backend=flash)-cpu-float32-fwd-B1-H2-L64-D16-causal" in text
    assert "naive-cpu-float32-fwd-B1-H2-L32-D16" in text


def test_pytest_benchmark_compare_command_reads_it(exported):
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(exported), "--group-by=group",
                           "--columns=min,median,max"], capture_output=True, text=True, timeout=120,
                          cwd=exported.parent)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to load" not in proc.stdout + proc.stderr
    assert "test_attention[naive-cpu-float32-fwd-B1-H2-L64-D16-causal]" in proc.stdout


def test_pytest_benchmark_run_of_the_same_suite_pairs_with_the_export(run, tmp_path):
    """The other direction: tests/benchmarks under pytest-benchmark, compared against the export."""
    storage = tmp_path / ".benchmarks"
    assert export(str(run), "--storage", str(storage)) == 0
    saved = list((storage / get_machine_id()).glob("0001_*.json"))
    assert len(saved) == 1
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    native = tmp_path / "native.json"
    env = dict(os.environ, ATTENTION_BENCH_SUITE=str(suite))
    # run from tmp_path: pytest-benchmark 5.x fails printing its machine_info warning for a storage
    # folder outside the working directory; the node ids stay relative to the project root
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "benchmarks"), "-q", "-p", "no:cacheprovider",
         "--benchmark-only", "--benchmark-storage=file://.benchmarks", "--benchmark-compare",
         f"--benchmark-json={native}", "--benchmark-min-rounds=2", "--benchmark-max-time=0.001",
         "--benchmark-warmup=off", "--benchmark-columns=min,median,rounds", f"--rootdir={ROOT}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "16 passed, 4 skipped" in out and "runs only on CUDA" in out
    assert f"Comparing against benchmarks from: {get_machine_id()}/{saved[0].name}" in out
    assert "(0001_" in out  # the exported run's rows appear in the comparison table
    native_names = {b["fullname"] for b in json.loads(native.read_text())["benchmarks"]}
    exported_names = {b["fullname"] for b in json.loads(saved[0].read_text())["benchmarks"]}
    assert native_names == exported_names and len(native_names) == 16


def test_ids_and_groups():
    case = Case("sdpa", params={"backend": "flash"}, heads=8, kv_heads=2, seq_len=256, head_dim=64, causal=True)
    assert benchmark_id(case) == "sdpa(backend=flash)-cpu-float32-fwd-B1-H8/2-L256-D64-causal"
    assert benchmark_group(case) == "cpu float32 fwd B1 H8/2 L256 D64 causal"
    row = {"variant": "naive", "params": "{}", "device": "cpu", "dtype": "bfloat16", "mode": "bwd", "batch": 2,
           "heads": 4, "kv_heads": 4, "seq_len": 512, "head_dim": 32, "causal": np.False_, "inputs": "structured"}
    assert benchmark_id(row) == "naive-cpu-bfloat16-bwd-B2-H4-L512-D32-structured"


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert export(str(tmp_path / "missing")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "run directory" in err[0]
    (tmp_path / "run.json").write_text("{broken")
    assert export(str(tmp_path)) == 2
    assert "damaged" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        export(str(tmp_path), "--format", "csv")
    assert exc.value.code == 2


def test_runs_are_found_by_id_and_latest(run, tmp_path, capsys):
    import shutil

    meta = json.loads((run / "run.json").read_text())
    shutil.copytree(run, tmp_path / "runs" / meta["run_id"])
    out = tmp_path / "by-id.json"
    assert export(meta["run_id"], "--root", str(tmp_path), "-o", str(out)) == 0
    assert len(json.loads(out.read_text())["benchmarks"]) == 16
    assert export("latest", "--root", str(tmp_path), "-o", str(tmp_path / "latest.json")) == 0
    assert export("no-such-run", "--root", str(tmp_path)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3  # two summaries and one error line


def test_stdout_and_default_locations(run, capsys):
    assert export(str(run), "-o", "-") == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["benchmarks"]) == 16
    assert "4 rows without timing samples left out" in captured.err
    assert export(str(run)) == 0
    assert (run / "pytest-benchmark.json").exists()
