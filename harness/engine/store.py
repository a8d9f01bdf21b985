"""Run directories: what a run writes, durably as it goes, and how it is read back.

A run directory holds

* ``run.json`` — the suite as run, start/end time, environment (machine, versions, commit);
* ``rows.jsonl`` / ``samples.jsonl`` — one line per finished case, appended and
  fsync'ed as each case finishes, so an interrupted run keeps what it measured;
* ``results.parquet`` — one row per case (the table of record, written at the end
  and re-creatable from ``rows.jsonl``);
* ``samples.parquet`` — every raw timing sample: ``case_id, rep, time_ms``;
* ``report.html`` — the self-contained report.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core import schema

# pandas is imported where tables are read, so that importing StoreError (the command line's
# start-up) or appending rows costs no pandas import.
if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1

ROWS_LOG = "rows.jsonl"
SAMPLES_LOG = "samples.jsonl"
RESULTS = "results.parquet"
SAMPLES = "samples.parquet"
RUN_META = "run.json"
REPORT = "report.html"


class StoreError(Exception):
    """A run directory is missing, damaged or from an incompatible version (one line)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


class RunWriter:
    """Appends each finished case to a run directory, durably, and finalises the tables."""

    def __init__(self, run_dir: Path, meta: dict[str, Any]):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta, schema_version=SCHEMA_VERSION)
        self.write_meta()

    @classmethod
    def reopen(cls, run_dir: Path, meta: dict[str, Any]) -> "RunWriter":
        """Continue writing an existing run (resume): its rows so far stay as they are."""
        writer = cls.__new__(cls)
        writer.dir = Path(run_dir)
        writer.meta = dict(meta, status="running")
        writer.meta.setdefault("resumed", []).append(datetime.now(timezone.utc).isoformat(timespec="seconds"))
        writer.write_meta()
        return writer

    def write_meta(self) -> None:
        tmp = self.dir / (RUN_META + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2, default=str))
        os.replace(tmp, self.dir / RUN_META)

    def append(self, row: dict[str, Any], samples_s: list[float]) -> None:
        """Record one finished case: its samples first, then its row (a row means the case is complete).

        Both carry an ``attempt_id``, so samples of an attempt that was cut short before its
        row was written (a kill between the two) are dropped when the tables are finalised.
        """
        row = dict(row, attempt_id=uuid.uuid4().hex[:12])
        for rep, s in enumerate(samples_s):
            _append_line(
                self.dir / SAMPLES_LOG,
                {"case_id": row["case_id"], "attempt_id": row["attempt_id"], "rep": rep, "time_ms": s * 1e3},
            )
        _append_line(self.dir / ROWS_LOG, row)

    def finalize(self, **meta_updates: Any) -> pd.DataFrame:
        self.meta.update(meta_updates)
        self.write_meta()
        rows = read_rows_log(self.dir)
        samples = read_samples_log(self.dir)
        if not rows.empty:
            rows = rows.drop_duplicates("case_id", keep="last").reset_index(drop=True)
            kept = set(zip(rows["case_id"], rows["attempt_id"]))
            samples = samples[[k in kept for k in zip(samples["case_id"], samples["attempt_id"])]]
        rows.to_parquet(self.dir / RESULTS, index=False, schema=schema.arrow_schema(rows))
        samples.reset_index(drop=True).to_parquet(self.dir / SAMPLES, index=False)
        return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that case was in flight, not finished
    return records


def read_rows_log(run_dir: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(_read_jsonl(Path(run_dir) / ROWS_LOG))


def read_samples_log(run_dir: Path) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(_read_jsonl(Path(run_dir) / SAMPLES_LOG))
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                           (("case_id", str), ("attempt_id", str), ("rep", int), ("time_ms", float))})
    return df


def read_meta(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_META
    if not Path(run_dir).is_dir():
        raise StoreError(f"{run_dir}: no such run directory")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{run_dir}: not a run directory (no {RUN_META})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: damaged ({exc})") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: results schema version {version!r}, this harness reads version {SCHEMA_VERSION}")
    return meta


def read_results(run_dir: Path) -> pd.DataFrame:
    """The run's rows: results.parquet, or the rows log of a run that did not finish."""
    run_dir = Path(run_dir)
    read_meta(run_dir)
    path = run_dir / RESULTS
    if path.exists():
        import pandas as pd

        try:
            return pd.read_parquet(path)
        except Exception as exc:
            raise StoreError(f"{path}: damaged ({type(exc).__name__}: {exc})") from None
    rows = read_rows_log(run_dir)
    if rows.empty:
        raise StoreError(f"{run_dir}: holds no results yet")
    return rows


def read_samples(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / SAMPLES
    if path.exists():
        import pandas as pd

        return pd.read_parquet(path)
    return read_samples_log(Path(run_dir))
