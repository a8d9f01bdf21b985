"""GPU rows in `bench report`, `bench compare` and `bench export`, from a recorded FAKE GPU run.

``tests/data/fake-gpu-run/`` is a real tiny CPU run doctored into a CUDA run by
``tests/data/make_fake_gpu_run.py`` (device, timing method, telemetry, an sdpa backend, a
``cuda_error`` and an ``oom`` row, an H100-like GPU record): what the reading side sees from a GPU.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "data" / "fake-gpu-run"


def bench(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.fixture
def run(tmp_path):
    dest = tmp_path / "fake-gpu-run"
    shutil.copytree(FAKE, dest)
    return dest


def test_the_fake_run_is_labelled_and_looks_like_a_gpu_run():
    meta = json.loads((FAKE / "run.json").read_text())
    assert "FAKE" in meta["environment"]["machine"]["gpu"]["name"] and "doctored" in meta["fake"]
    rows = pd.read_parquet(FAKE / "results.parquet")
    assert set(rows["device"]) == {"cuda"} and {"ok", "cuda_error", "oom"} <= set(rows["status"])
    ok = rows[rows["status"] == "ok"]
    assert (ok["timing_method"] == "cuda_events").all() and (ok["power_w"] > 0).all() and (ok["energy_j"] > 0).all()
    samples = pd.read_parquet(FAKE / "samples.parquet")
    assert set(samples["case_id"]) == set(ok["case_id"])  # case ids recomputed for device cuda, consistently
    from harness.core.cases import Case

    for row in rows.to_dict("records"):
        Case.from_row(row)  # raises when a case id does not match its row


def test_report_renders_gpu_rows(run, tmp_path):
    out = tmp_path / "report.html"
    proc = bench("report", str(run), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    assert "H100" in html and "cuda_error" in html and "illegal memory access" in html and "cuda" in html


def test_compare_finds_a_planted_10_percent_slowdown(run, tmp_path):
    new = tmp_path / "slower"
    shutil.copytree(run, new)
    rows = pd.read_parquet(new / "results.parquet")
    samples = pd.read_parquet(new / "samples.parquet")
    ok = rows[rows["status"] == "ok"]
    spread = (ok["time_ms_p90"] - ok["time_ms_p10"]) / ok["time_ms"]
    target = ok.loc[spread.idxmin(), "case_id"]  # the steadiest case: a 10% step must stand out of its noise
    assert spread.min() < 0.05
    samples.loc[samples["case_id"] == target, "time_ms"] *= 1.10
    for col in ("time_ms", "time_ms_p10", "time_ms_p90", "time_ms_ci_low", "time_ms_ci_high"):
        rows.loc[rows["case_id"] == target, col] *= 1.10
    rows["run_id"] = "fake-gpu-slower"
    rows.to_parquet(new / "results.parquet", index=False)
    samples.to_parquet(new / "samples.parquet", index=False)
    meta = json.loads((new / "run.json").read_text())
    meta["run_id"] = "fake-gpu-slower"
    (new / "run.json").write_text(json.dumps(meta))

    proc = bench("compare", str(run), str(new), "--format", "json", "--fail-on-regression")
    assert proc.returncode == 1, proc.stderr  # the gate fails on the regression
    cases = {c["case_id"]: c for c in json.loads(proc.stdout)["cases"]}
    assert cases[target]["verdict"] == "regressed" and cases[target]["time_ratio"] == pytest.approx(1.10, rel=1e-3)
    others = [c["verdict"] for cid, c in cases.items() if cid != target]
    assert others and all(v in ("unchanged", "not compared") for v in others), others
    same = bench("compare", str(run), str(run), "--format", "json", "--fail-on-regression")
    assert same.returncode == 0, same.stderr


def test_export_writes_the_ok_gpu_rows(run, tmp_path):
    out = tmp_path / "export.json"
    proc = bench("export", "--format", "pytest-benchmark", str(run), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    ok = pd.read_parquet(run / "results.parquet").query("status == 'ok'")
    assert len(data["benchmarks"]) == len(ok)
    assert all("cuda" in b["fullname"] for b in data["benchmarks"])
