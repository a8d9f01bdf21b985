"""Run directories: what a run writes, durably as it goes, and how it is read back.

A run directory holds

* ``run.json`` — the suite as run, start/end time, environment (machine, versions, commit);
* ``rows.jsonl`` / ``samples.jsonl`` / ``rounds.jsonl`` — appended and fsync'ed as work
  finishes, so an interrupted run keeps what it measured: a case is timed in one or more
  worker processes, one round each (:func:`harness.engine.lifecycle.run_cases`); each round's
  samples (with the ``process`` index) and its row (``rounds.jsonl``) are appended as the
  round finishes, and the case's final row (``rows.jsonl``; a row means the case is complete)
  when its last round has; all of a case's lines share its ``attempt_id``;
* ``results.parquet`` — one row per case (the table of record, written at the end
  and re-creatable from ``rows.jsonl``);
* ``samples.parquet`` — every raw timing sample: ``case_id, process, rep, time_ms`` (``rep``
  counts within its process);
* ``profile.jsonl``, ``profile.parquet``, ``traces/`` — with ``--profile`` (:mod:`harness.measure.profile`);
* ``report.html`` — the self-contained report.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core import safefs, schema
from harness.core.errors import UserError
from harness.measure import profile as profiling  # --profile's files (standard library only at import)

# pandas is imported where tables are read, so that importing StoreError (the command line's
# start-up) or appending rows costs no pandas import.
if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1

ROWS_LOG = "rows.jsonl"
SAMPLES_LOG = "samples.jsonl"
ROUNDS_LOG = "rounds.jsonl"
RESULTS = "results.parquet"
SAMPLES = "samples.parquet"
RUN_META = "run.json"
REPORT = "report.html"


#: What a run appends to, or writes inside, in its directory (its other files are replaced whole).
APPENDED = (ROWS_LOG, SAMPLES_LOG, ROUNDS_LOG, profiling.PROFILE_LOG, profiling.TRACES, "logs")


class StoreError(UserError):
    """A run directory is missing, damaged or from an incompatible version (one line)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line, fsync'ed, never through a symlink (:func:`harness.core.safefs.append`)."""
    safefs.append(path, json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")


class RunWriter:
    """Appends each finished case to a run directory, durably, and finalises the tables."""

    def __init__(self, run_dir: Path, meta: dict[str, Any]):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta, schema_version=SCHEMA_VERSION)
        self.write_meta()

    @classmethod
    def reopen(cls, run_dir: Path, meta: dict[str, Any]) -> RunWriter:
        """Continue writing an existing run (resume): its rows so far stay as they are."""
        writer = cls.__new__(cls)
        writer.dir = Path(run_dir)
        for name in APPENDED:  # before anything is written: a symlink among them is refused, one line
            safefs.check(writer.dir / name)
        writer.meta = dict(meta, status="running")
        writer.meta.setdefault("resumed", []).append(datetime.now(UTC).isoformat(timespec="seconds"))
        writer.write_meta()
        return writer

    def write_meta(self) -> None:
        """run.json, replaced atomically through a new file (never through a symlink the directory holds)."""
        safefs.write_text(self.dir / RUN_META, json.dumps(self.meta, indent=2, default=str))

    def append_round(self, row: dict[str, Any], samples_s: list[float], *, process: int, attempt_id: str) -> None:
        """Record what process ``process`` measured of a case: its samples, then its row in the
        rounds log. ``attempt_id`` ties the case's rounds and final row together, so samples of an
        attempt cut short before its final row (an interruption between rounds, a kill) are
        dropped when the tables are finalised."""
        for rep, s in enumerate(samples_s):
            _append_line(self.dir / SAMPLES_LOG, {"case_id": row["case_id"], "attempt_id": attempt_id,
                                                  "process": process, "rep": rep, "time_ms": s * 1e3})
        _append_line(self.dir / ROUNDS_LOG, dict(row, attempt_id=attempt_id, process=process))

    def append_final(self, row: dict[str, Any], *, attempt_id: str) -> None:
        """Record a case's final row: from now on the case is complete."""
        _append_line(self.dir / ROWS_LOG, dict(row, attempt_id=attempt_id))

    def finalize(self, **meta_updates: Any) -> pd.DataFrame:
        self.meta.update(meta_updates)
        self.write_meta()
        rows = read_rows_log(self.dir)
        samples = read_samples_log(self.dir)
        if not rows.empty:
            rows = rows.drop_duplicates("case_id", keep="last").reset_index(drop=True)
            kept = set(zip(rows["case_id"], rows["attempt_id"]))
            samples = samples[[k in kept for k in zip(samples["case_id"], samples["attempt_id"])]]
        try:
            with safefs.atomic(self.dir / RESULTS, "wb") as f:  # a symlink there is replaced, not written through
                rows.to_parquet(f, index=False, schema=schema.arrow_schema(rows))
            with safefs.atomic(self.dir / SAMPLES, "wb") as f:
                samples.reset_index(drop=True).to_parquet(f, index=False)
        except (TypeError, ValueError) as exc:  # pyarrow's: a column of mixed kinds (rows a resumed run brought)
            raise StoreError(f"{self.dir}: the tables cannot be written ({type(exc).__name__}: {str(exc)[:200]}); "
                             f"the rows are kept in {ROWS_LOG}") from None
        profiling.write_table(self.dir, profiling.records(_read_jsonl(self.dir / profiling.PROFILE_LOG), self.dir))
        return rows


def plain_file(run_dir: Path, name: str) -> Path | None:
    """``run_dir/name`` when it is a regular file that really lies in the run directory (not a
    symlink out of it: a run directory from elsewhere could point ``report.html`` at a private
    file, and ``bench site`` would publish it); else None."""
    path = Path(run_dir) / name
    try:
        inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(run_dir))
    except (OSError, ValueError):
        return None
    return path if inside and path.is_file() else None


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a new file renamed over it, so that a symlink
    already there (a run directory from elsewhere may hold one) is replaced, never written through
    (:func:`harness.core.safefs.write_text`)."""
    return safefs.write_text(path, text)


def _readable(path: Path, max_bytes: int) -> None:
    """StoreError unless ``path`` is a regular file of at most ``max_bytes`` (a FIFO or a device
    in a run directory from elsewhere would block or never end)."""
    from harness.engine.runmeta import regular_file

    if (problem := regular_file(path, max_bytes)) is not None:
        raise StoreError(f"{path}: {problem}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from harness.engine.runmeta import MAX_TABLE_BYTES

    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    _readable(path, MAX_TABLE_BYTES)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a kill: that case was in flight, not finished
            if isinstance(record, dict):
                records.append(record)
    return records


def read_rows_log(run_dir: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(_read_jsonl(Path(run_dir) / ROWS_LOG))


def read_samples_log(run_dir: Path) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(_read_jsonl(Path(run_dir) / SAMPLES_LOG))
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                           (("case_id", str), ("attempt_id", str), ("process", int), ("rep", int),
                            ("time_ms", float))})
    return df


def read_rounds_log(run_dir: Path) -> pd.DataFrame:
    """Every round of every case as it was appended (``process`` says which), finished or not."""
    import pandas as pd

    return pd.DataFrame(_read_jsonl(Path(run_dir) / ROUNDS_LOG))


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The run's ``run.json``, checked against its declared shape (:mod:`harness.engine.runmeta`):
    a run directory may come from anyone, and is data. StoreError (one line) when it is missing,
    damaged, of another schema version or has a field that does not fit."""
    from harness.engine import runmeta

    path = Path(run_dir) / RUN_META
    if not Path(run_dir).is_dir():
        raise StoreError(f"{run_dir}: no such run directory")
    if not path.exists():
        raise StoreError(f"{run_dir}: not a run directory (no {RUN_META})")
    meta, problem = runmeta.parse_meta(path)
    if meta is None:
        raise StoreError(f"{path}: {problem}")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: results schema version {repr(version)[:40]}, this harness reads version "
                         f"{SCHEMA_VERSION}")
    if (problem := runmeta.meta_problem(meta)) is not None:
        raise StoreError(f"{path}: {problem}")
    return meta


def _checked(frame: pd.DataFrame, source: Path, **kw: Any) -> pd.DataFrame:
    """``frame`` when its columns fit the schema (:func:`harness.engine.runmeta.table_problems`), else StoreError."""
    from harness.engine.runmeta import table_problems

    problems = table_problems(frame, **kw)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"{source}: {problems[0]}{more}")
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    import pandas as pd

    from harness.engine.runmeta import MAX_TABLE_BYTES

    _readable(path, MAX_TABLE_BYTES)
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise StoreError(f"{path}: damaged ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_results(run_dir: Path) -> pd.DataFrame:
    """The run's rows: results.parquet, or the rows log of a run that did not finish; their derived
    columns recomputed from the measured ones (:func:`harness.measure.derive.rederive`), so that
    every run, however old, reads with rates that agree with its rows' own times."""
    from harness.measure.derive import rederive

    run_dir = Path(run_dir)
    read_meta(run_dir)
    path = run_dir / RESULTS
    if path.exists():
        return rederive(_checked(_read_parquet(path), path))
    rows = read_rows_log(run_dir)
    if rows.empty:
        raise StoreError(f"{run_dir}: holds no results yet")
    return rederive(_checked(rows, run_dir / ROWS_LOG))


def read_samples(run_dir: Path) -> pd.DataFrame:
    from harness.engine.runmeta import SAMPLE_COLUMNS

    path = Path(run_dir) / SAMPLES
    source, samples = (path, _read_parquet(path)) if path.exists() else (
        Path(run_dir) / SAMPLES_LOG, read_samples_log(Path(run_dir)))
    return _checked(samples, source, declared=SAMPLE_COLUMNS, required=("case_id", "time_ms"))


def read_profile(run_dir: Path) -> profiling.RunProfile | None:
    """The run's operator profile (``bench run --profile``; :mod:`harness.measure.profile`), or None."""
    run_dir = Path(run_dir)
    path = run_dir / profiling.PROFILE
    try:
        return profiling.run_profile(_read_jsonl(run_dir / profiling.PROFILE_LOG),
                                     _read_parquet(path) if path.exists() else None, run_dir)
    except ValueError as exc:
        raise StoreError(f"{path}: {exc}") from None
