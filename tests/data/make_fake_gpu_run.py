"""Make ``tests/data/fake-gpu-run/``: a real tiny CPU run doctored to look like a CUDA run.

    python tests/data/make_fake_gpu_run.py [OUT_DIR]

It is test data for the code that reads GPU rows (``bench report``, ``bench compare``,
``bench export``), made without a GPU and labelled as fake everywhere a reader looks (the GPU's
name, run.json's ``fake`` note). It runs a small bfloat16 suite on the CPU in this process, then:
device → cuda (case ids recomputed), times ÷ 100 (so throughput looks like a GPU's) and the samples
replaced by seeded draws within about ±1% of that median (a GPU's samples are that tight; these CPU
ones came from a loaded 2-core VM) with the time columns recomputed from them,
CUDA timing method, NVML-like telemetry (seeded), an sdpa backend used, a measured peak for the
roofline, one ``cuda_error`` row and one ``oom`` row; run.json gets an H100-like GPU record.
Re-running it rewrites the files (the values differ from run to run: they are measured).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SUITE = """
name = "fake-gpu"
description = "tiny sweep, measured on a CPU and doctored into a fake CUDA run (test data)"
[defaults]
batch = 1
heads = 2
head_dim = 16
dtype = "bfloat16"
[sweep]
seq_len = [64, 128]
causal = [false, true]
[timing]
warmup = 1
min_time_s = 0.0
min_reps = 12
max_reps = 12
target_precision = 0.0
[[variant]]
name = "naive"
[[variant]]
name = "sdpa"
backend = ["auto", "math"]
"""
SCALE = 0.01  # CPU milliseconds → "GPU" milliseconds
TIME_COLUMNS = ("time_ms", "time_ms_p10", "time_ms_p90", "first_call_ms", "time_ms_ci_low", "time_ms_ci_high")
GPU = {"name": "NVIDIA H100 80GB HBM3 (FAKE: test data)", "compute_capability": "9.0", "memory_bytes": 85520809984,
       "count": 1, "cuda": "12.8", "cudnn": 91002, "sm_count": 132, "l2_cache_bytes": 52428800,
       "driver": "570.86.15", "record": {"uuid": "GPU-00000000-fake-0000-0000-000000000000", "power_limit_w": 700.0,
                                         "persistence_mode": True, "ecc_mode": True, "mig_mode": False,
                                         "allow_tf32_matmul": False, "float32_matmul_precision": "highest",
                                         "other_processes": []}}


def measure(work: Path) -> Path:
    (work / "suite.toml").write_text(SUITE)
    run = work / "run"
    subprocess.run([sys.executable, "-m", "harness", "run", str(work / "suite.toml"), "-o", str(run),
                    "--isolation", "none", "--no-report", "--quiet"], cwd=ROOT, check=True)
    return run


def doctor(run: Path, out: Path) -> None:
    from harness.core.cases import Case
    from harness.measure.environment import fingerprint

    rows = pd.read_parquet(run / "results.parquet")
    samples = pd.read_parquet(run / "samples.parquet")
    rng = np.random.default_rng(0)
    new_ids = {}
    for _, row in rows.iterrows():
        d = row.to_dict()
        d["device"] = "cuda"
        new_ids[row["case_id"]] = Case.from_row({k: v for k, v in d.items() if k != "case_id"}).case_id
    rows["case_id"] = rows["case_id"].map(new_ids)
    samples = samples[samples["case_id"].isin(new_ids)].assign(case_id=lambda s: s["case_id"].map(new_ids))
    rows["device"] = "cuda"
    from harness.measure.timing import Timing

    drawn = []
    for i, row in rows.iterrows():
        times = samples.loc[samples["case_id"] == row["case_id"], "time_ms"].to_numpy()
        if not len(times):
            continue
        median_s = float(np.median(times)) * SCALE / 1e3
        tight = list(median_s * np.exp(rng.normal(0.0, 0.01, len(times))))
        timing = Timing(samples_s=tight, first_call_s=row["first_call_ms"] * SCALE / 1e3)
        for col, value in timing.row_columns().items():
            if col in TIME_COLUMNS:
                rows.loc[i, col] = value
        drawn.append(pd.DataFrame({"case_id": row["case_id"], "attempt_id": row["attempt_id"], "process": 0,
                                   "rep": range(len(tight)), "time_ms": [1e3 * t for t in tight]}))
    samples = pd.concat(drawn, ignore_index=True)
    rows["tflops_per_s"] = rows["flops"] / (rows["time_ms"] / 1e3) / 1e12
    n = len(rows)
    rows["timing_method"] = "cuda_events"
    rows["power_w"] = rng.uniform(300, 650, n)
    rows["power_w_max"] = rows["power_w"] + rng.uniform(0, 40, n)
    rows["sm_clock_mhz"] = rng.uniform(1700, 1980, n)
    rows["sm_clock_mhz_min"] = rows["sm_clock_mhz"] - 50
    rows["mem_clock_mhz"] = 2619.0
    rows["temp_c_max"] = rng.uniform(45, 70, n)
    rows["throttle_reasons"] = ""
    rows["throttled"] = False
    rows["energy_j"] = rows["power_w"] * rows["time_ms"] / 1e3
    rows["tokens_per_joule"] = rows["batch"] * rows["seq_len"] / rows["energy_j"]
    rows["energy_source"] = "counter"
    rows["peak_tflops_per_s"] = 700.0
    rows["pct_of_peak"] = 100 * rows["tflops_per_s"] / 700.0
    for col, value in (("host_bound", False), ("throttle_time_ms", 0.0), ("telemetry_note", "")):
        if col in rows:
            rows[col] = value
    rows.loc[rows["variant"] == "sdpa", "sdpa_backend_used"] = "flash"
    # two failure rows, as a GPU run has them: a sticky CUDA error and an OOM (no timing, no samples)
    for idx, status, reason in ((n - 1, "cuda_error", "AcceleratorError: CUDA error: an illegal memory access was "
                                 "encountered (the worker was replaced)"),
                                (n - 2, "oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 GiB")):
        for col in TIME_COLUMNS + ("tflops_per_s", "pct_of_peak", "energy_j", "tokens_per_joule", "rel_err",
                                   "max_abs_err"):
            rows.loc[idx, col] = np.nan
        rows.loc[idx, ["status", "reason", "reps"]] = [status, reason, 0]
        samples = samples[samples["case_id"] != rows.loc[idx, "case_id"]]
    meta = json.loads((run / "run.json").read_text())
    meta["case_ids"] = [new_ids[c] for c in meta["case_ids"]]
    meta["suite"]["text"] = meta["suite"]["text"].replace("[defaults]\n", '[defaults]\ndevice = "cuda"\n', 1)
    meta["suite"]["definition"].setdefault("defaults", {})["device"] = "cuda"
    meta["suite"]["path"] = meta["suite"]["resolved_path"] = None
    machine = meta["environment"]["machine"]
    machine.update(gpu=GPU, hostname="fake-gpu-host")
    machine["fingerprint"] = fingerprint(machine)
    meta["environment"]["versions"]["cuda"] = GPU["cuda"]
    meta["environment"]["telemetry"] = {"available": True, "reason": "", "driver": GPU["driver"]}
    meta["environment"]["git"] = {"commit": None, "dirty": None, "root": None}
    meta["fake"] = "test data: a CPU run doctored by tests/data/make_fake_gpu_run.py; not a measurement of any GPU"
    out.mkdir(parents=True, exist_ok=True)
    from harness.core import schema

    rows.to_parquet(out / "results.parquet", index=False, schema=schema.arrow_schema(rows))
    samples.reset_index(drop=True).to_parquet(out / "samples.parquet", index=False)
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "fake-gpu-run"
    with tempfile.TemporaryDirectory() as tmp:
        run = measure(Path(tmp))
        shutil.rmtree(out, ignore_errors=True)
        doctor(run, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
