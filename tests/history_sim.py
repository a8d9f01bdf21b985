"""A simulated nightly history made from one real run: copies of it with planted time series.

Shared by tests/test_site.py and benchmarks/site_build.py. Each night is a copy of a real run
directory (made by ``bench run``) with its own run id, start time, commit and, per case, its
times scaled by a factor: one case flat, one with a step, one noise only, the rest with a
little noise, so a change-point detector has exactly one thing to find.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from tests.test_browser import derive_run

#: Row columns holding times (scaled together with the median).
TIME_COLUMNS = ("time_ms", "time_ms_p10", "time_ms_p90", "time_ms_ci_low", "time_ms_ci_high")


def planted_factors(case_ids: list[str], nights: int, *, flat: str, step: str, noisy: str, step_at: int,
                    step_ratio: float = 1.2, noise: float = 0.06, background: float = 0.01,
                    seed: int = 0) -> list[dict[str, float]]:
    """Per night, the factor each case's times are scaled by.

    ``flat``: exactly 1; ``step``: background noise, times ``step_ratio`` from night index
    ``step_at`` on; ``noisy``: log-normal noise of relative size ``noise``; every other case:
    log-normal noise of size ``background``.
    """
    rng = np.random.default_rng(seed)
    out = []
    for night in range(nights):
        factors = {c: float(np.exp(rng.normal(0.0, background))) for c in case_ids}
        factors[flat] = 1.0
        factors[noisy] = float(np.exp(rng.normal(0.0, noise)))
        if night >= step_at:
            factors[step] *= step_ratio
        out.append(factors)
    return out


def night_run(src: Path, dst: Path, *, run_id: str, started: str, commit: str, factors: dict[str, float],
              suite: str | None = None, fingerprint: str | None = None) -> Path:
    """A copy of the real run ``src`` as one night: new id, start time, clean commit, scaled times."""
    derive_run(src, dst, run_id, started, {})
    rows = pd.read_parquet(dst / "results.parquet")
    samples = pd.read_parquet(dst / "samples.parquet")
    scale = rows["case_id"].map(factors).fillna(1.0)
    for col in TIME_COLUMNS:
        if col in rows and pd.api.types.is_numeric_dtype(rows[col]):
            rows[col] = rows[col] * scale
    samples["time_ms"] = samples["time_ms"] * samples["case_id"].map(factors).fillna(1.0)
    meta = json.loads((dst / "run.json").read_text())
    meta["status"] = "complete"
    meta["environment"]["git"] = {"commit": commit, "dirty": False}
    if suite is not None:
        meta["suite"]["name"] = suite
        rows["suite"] = suite
    if fingerprint is not None:
        meta["environment"]["machine"]["fingerprint"] = fingerprint
    rows.to_parquet(dst / "results.parquet", index=False)
    samples.to_parquet(dst / "samples.parquet", index=False)
    (dst / "run.json").write_text(json.dumps(meta, indent=2))
    if (src / "report.html").exists():
        shutil.copyfile(src / "report.html", dst / "report.html")
    return dst


def timed_cases(src: Path) -> list[str]:
    """The case ids of ``src`` with a measured time, in a fixed order."""
    rows = pd.read_parquet(src / "results.parquet")
    return sorted(rows.loc[(rows["status"] == "ok") & rows["time_ms"].notna(), "case_id"])
