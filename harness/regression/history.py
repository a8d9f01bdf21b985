"""The run history: every run under ``results/runs/``, and the baselines under ``results/baseline/``.

Storage. Every run is its own directory ``results/runs/<run_id>/`` written by
:mod:`harness.engine.store` (``run.json``, ``results.parquet``, ``samples.parquet``);
the history is simply the set of those directories, read together as one table
(a Parquet dataset partitioned by run). Why not SQLite or DuckDB:

* appends are concurrency-safe without any locking: two runs never write the same
  file (each has its own directory, named by a unique run id), whereas one database
  file would need a writer lock and could be left half-written by a killed run;
* a run is immutable once written and self-describing (``run.json`` carries the
  suite, commit, versions and machine fingerprint), so a run directory can be
  copied, archived, attached to a CI artifact or committed as a baseline as is;
* queries across runs are ordinary pandas/pyarrow reads (``load_history``); a few
  hundred runs of a few hundred rows each are read in well under a second.

Keys. A run is keyed by ``run_id`` (timestamp, suite, random suffix), ``suite``,
project commit (``environment.git``), benchmarked-code versions
(``environment.versions``: torch, CUDA, Triton, Python, harness), machine
``fingerprint`` and ``started`` timestamp; each row by ``case_id``.

Baselines. ``results/baseline/<suite>/`` holds a copy of one run per suite (so a
CPU and a GPU nightly suite each have theirs), plus ``baseline.json`` saying
which run was promoted, from where and when. It is meant to be committed to git.

Naming runs (``resolve_run``): a run directory path; a run id or any unique part
of one; ``latest`` (the newest run under ``results/runs``), ``latest~N`` (N runs
before it); ``baseline`` (the baseline of the suite being compared, or the only
baseline there is). ``latest`` and ``baseline`` take ``@SUITE`` to pick a suite:
``latest@nightly-cpu``, ``latest~1@nightly-cpu``, ``baseline@nightly-gpu``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core import names, safefs
from harness.engine import store
from harness.engine.store import StoreError

DEFAULT_ROOT = Path("results")
RUNS = "runs"
BASELINE = "baseline"
BASELINE_INFO = "baseline.json"
#: Files a baseline keeps: the tables of record, the metadata and the report.
BASELINE_FILES = (store.RUN_META, store.RESULTS, store.SAMPLES, store.REPORT)

_LATEST = re.compile(r"^latest(?:~(\d+))?(?:@(.+))?$")
_BASELINE = re.compile(r"^baseline(?:@(.+))?$")


class HistoryError(StoreError):
    """A run could not be found or promoted (one line; the CLI exits 2)."""


@dataclass
class RunInfo:
    """What ``run.json`` says about one run, in the fields the history is keyed by."""

    path: Path
    run_id: str
    suite: str
    started: str
    finished: str | None
    status: str
    commit: str | None
    dirty: bool | None
    fingerprint: str | None
    hostname: str | None
    cases: int | None
    wall_s: float | None
    versions: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def short_commit(self) -> str:
        if not self.commit:
            return "unknown"
        return self.commit[:10] + ("+dirty" if self.dirty else "")

    def status_counts(self) -> dict[str, int]:
        """Rows per status (ok, skipped, error, ...), read from the run's results."""
        try:
            rows = store.read_results(self.path)
        except StoreError:
            return {}
        if "status" not in rows:
            return {}
        return {str(k): int(v) for k, v in rows["status"].value_counts().items()}


def run_info(path: str | Path) -> RunInfo:
    """Read a run directory's ``run.json`` (StoreError if it is not a readable run)."""
    path = Path(path)
    meta = store.read_meta(path)
    run_id = str(meta.get("run_id") or path.name)
    if (problem := names.name_problem(run_id, names.MAX_RUN_ID)) is not None:  # path.name may be '..'
        raise StoreError(f"{path}: run id: {problem}")
    env = meta.get("environment") or {}
    git = env.get("git") or {}
    machine = env.get("machine") or {}
    suite = meta.get("suite") or {}
    return RunInfo(
        path=path,
        run_id=run_id,
        suite=str(suite.get("name") or "?"),
        started=str(meta.get("started") or ""),
        finished=meta.get("finished"),
        status=str(meta.get("status") or "unknown"),
        commit=git.get("commit"),
        dirty=git.get("dirty"),
        fingerprint=machine.get("fingerprint"),
        hostname=machine.get("hostname"),
        cases=meta.get("cases"),
        wall_s=meta.get("wall_s"),
        versions=dict(env.get("versions") or {}),
        meta=meta,
    )


def _scan(directory: Path) -> list[RunInfo]:
    found: list[RunInfo] = []
    if not directory.is_dir():
        return found
    for child in directory.iterdir():
        if child.is_dir() and not child.name.startswith(".") and (child / store.RUN_META).exists():
            try:
                found.append(run_info(child))
            except StoreError:
                continue  # a damaged or foreign directory is not part of the history
    return found


def _order(runs: list[RunInfo]) -> list[RunInfo]:
    return sorted(runs, key=lambda r: (r.started, r.run_id))


def list_runs(root: str | Path = DEFAULT_ROOT, suite: str | None = None) -> list[RunInfo]:
    """Every readable run under ``ROOT/runs``, oldest first (optionally one suite's)."""
    runs = _scan(Path(root) / RUNS)
    if suite is not None:
        runs = [r for r in runs if r.suite == suite]
    return _order(runs)


def baseline_dir(root: str | Path, suite: str) -> Path:
    """``ROOT/baseline/<suite>/``: the suite's name checked (:mod:`harness.core.names`) and the path
    staying inside ``ROOT/baseline`` (HistoryError otherwise): a name read from a run.json."""
    try:
        return names.inside(Path(root) / BASELINE, suite)
    except ValueError as exc:
        raise HistoryError(f"baseline of suite {str(suite)[:60]!r}: {exc}") from None


def _suite_name(spec: str, suite: str | None) -> str | None:
    """The ``@SUITE`` of ``spec``, checked as a suite name (HistoryError if it is not one)."""
    if suite is not None and (problem := names.name_problem(suite)) is not None:
        raise HistoryError(f"{spec[:80]!r}: suite {problem}")
    return suite


def list_baselines(root: str | Path = DEFAULT_ROOT) -> list[RunInfo]:
    """The baselines under ``ROOT/baseline/<suite>/``, one per suite."""
    return sorted(_scan(Path(root) / BASELINE), key=lambda r: r.suite)


def _suites_hint(runs: list[RunInfo]) -> str:
    names = sorted({r.suite for r in runs})
    return ", ".join(names) if names else "none"


def resolve_run(spec: str, root: str | Path = DEFAULT_ROOT, suite_hint: str | None = None) -> Path:
    """The run directory that ``spec`` names (see the module docstring); HistoryError if none.

    ``suite_hint`` (the suite of the other side of a comparison) picks the baseline when
    ``spec`` is a bare ``baseline``.
    """
    root = Path(root)
    path = Path(spec)
    try:
        is_dir = path.is_dir()
    except OSError:  # e.g. a name too long for a path
        is_dir = False
    if is_dir:
        if (path / store.RUN_META).exists():
            return path
        if spec not in ("latest", "baseline") and not _LATEST.match(spec) and not _BASELINE.match(spec):
            raise HistoryError(f"{spec}: not a run directory (no {store.RUN_META})")

    if m := _BASELINE.match(spec):
        suite = _suite_name(spec, m.group(1)) or suite_hint
        baselines = list_baselines(root)
        if suite is not None:
            for b in baselines:
                if b.suite == suite:
                    return b.path
            raise HistoryError(
                f"no baseline for suite {suite!r} under {root / BASELINE} (baselines: {_suites_hint(baselines)}; "
                "promote a run with: bench baseline set RUN)"
            )
        if len(baselines) == 1:
            return baselines[0].path
        if not baselines:
            raise HistoryError(f"no baseline under {root / BASELINE} (promote a run with: bench baseline set RUN)")
        raise HistoryError(f"several baselines ({_suites_hint(baselines)}): say which, e.g. "
                           f"baseline@{baselines[0].suite}")

    if m := _LATEST.match(spec):
        back = int(m.group(1) or 0)
        suite = _suite_name(spec, m.group(2))
        runs = list_runs(root, suite)
        if not runs:
            where = f"suite {suite!r} under {root / RUNS}" if suite else f"{root / RUNS}"
            raise HistoryError(f"no runs for {where}")
        if back >= len(runs):
            raise HistoryError(f"{spec}: only {len(runs)} run(s) in the history")
        return runs[-1 - back].path

    candidates = list_runs(root) + list_baselines(root)
    exact = [r for r in candidates if spec in (r.run_id, r.path.name)]
    if exact:
        # a run and its baseline copy share a run id: the run itself is the one meant
        exact.sort(key=lambda r: r.path.parent.name != RUNS)
        return exact[0].path
    partial = {r.run_id: r for r in candidates if spec in r.run_id}
    if len(partial) == 1:
        run = next(iter(partial.values()))
        same = [r for r in candidates if r.run_id == run.run_id]
        same.sort(key=lambda r: r.path.parent.name != RUNS)
        return same[0].path
    if len(partial) > 1:
        shown = ", ".join(sorted(partial)[:5]) + (" ..." if len(partial) > 5 else "")
        raise HistoryError(f"{spec!r} matches {len(partial)} runs ({shown}); give more of the run id")
    raise HistoryError(
        f"no run directory, run id, 'latest' or 'baseline' matches {spec!r} under {root} (see: bench history)"
    )


def set_baseline(spec: str, root: str | Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Copy the run ``spec`` names into ``ROOT/baseline/<suite>/``, replacing the previous one.

    Refuses a run that did not complete (an interrupted run would make its missing
    cases look 'new' in every later comparison) unless ``force``.
    """
    root = Path(root)
    source = resolve_run(spec, root)
    info = run_info(source)
    if info.status != "complete" and not force:
        raise HistoryError(f"run {info.run_id} is {info.status!r}, not complete; pass --force to promote it anyway")
    dest = baseline_dir(root, info.suite)
    if dest.resolve() == source.resolve():
        raise HistoryError(f"{source} is already the baseline of suite {info.suite!r}")
    # nothing is written or copied through a symlink (harness.core.safefs): not in ROOT/baseline/<suite>,
    # and a symlink in the run (report.html → a file of yours) is an error, never its target's content
    safefs.check(dest, root)
    safefs.makedirs(dest.parent, root)
    token = uuid.uuid4().hex[:12]
    tmp, old = dest.parent / f".{info.suite}.tmp-{token}", dest.parent / f".{info.suite}.old-{token}"
    tmp.mkdir()  # a new name: nothing there to follow
    try:
        for name in BASELINE_FILES:
            if os.path.lexists(source / name):
                safefs.copy_file(source / name, tmp / name)
        # a run that was interrupted before finalising has only its logs: write the tables
        if not (tmp / store.RESULTS).exists():
            with safefs.atomic(tmp / store.RESULTS, "wb") as f:
                store.read_results(source).to_parquet(f, index=False)
        if not (tmp / store.SAMPLES).exists():
            with safefs.atomic(tmp / store.SAMPLES, "wb") as f:
                store.read_samples(source).to_parquet(f, index=False)
        provenance = {
            "run_id": info.run_id,
            "suite": info.suite,
            "source": str(source),
            "commit": info.commit,
            "promoted": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        safefs.write_text(tmp / BASELINE_INFO, json.dumps(provenance, indent=2) + "\n")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        safefs.remove(old)
    return dest


def load_history(
    root: str | Path = DEFAULT_ROOT,
    suite: str | None = None,
    fingerprint: str | None = None,
    last: int | None = None,
) -> tuple[pd.DataFrame, list[RunInfo]]:
    """The rows of many runs as one table, oldest run first, with the runs' keys as columns.

    Filters: one ``suite``, one machine ``fingerprint``, the ``last`` N runs. Returns
    ``(rows, runs)``; rows gain ``run_index`` (0 = oldest kept), ``started``, ``commit``,
    ``dirty``, ``fingerprint``.
    """
    runs = list_runs(root, suite)
    if fingerprint is not None:
        runs = [r for r in runs if r.fingerprint == fingerprint]
    if last is not None:
        runs = runs[-last:] if last > 0 else []
    frames = []
    kept: list[RunInfo] = []
    for info in runs:
        try:
            rows = store.read_results(info.path)
        except StoreError:
            continue
        rows = rows.copy()
        rows["run_id"] = info.run_id
        rows["run_index"] = len(kept)
        rows["started"] = info.started
        rows["commit"] = info.commit
        rows["dirty"] = info.dirty
        rows["fingerprint"] = info.fingerprint
        frames.append(rows)
        kept.append(info)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table, kept
