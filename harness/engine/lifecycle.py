"""A run's life: start it (or resume it), execute its cases, finish it.

* :func:`start_run` creates the run directory and its ``run.json`` (status ``running``);
  :func:`resume_run` reopens an interrupted run, with the suite it started with (kept in
  ``run.json``) or with a suite file whose cases must be the run's (:class:`ResumeError` if not),
  and gives the cases that have no final row yet.
* :func:`execute` runs cases (:func:`run_cases`) through an executor (:func:`make_executor`: a reusable worker
  process or this process, from the suite's ``[run]`` table unless the caller overrides it, with
  the memory budget of :func:`memory_budget`), appending each row as it finishes. SIGINT and
  SIGTERM are handled: the first lets the case in flight finish and launches no more, a second
  abandons it. Then :func:`finish_run` writes the tables and the final ``run.json`` status.

The command line (:mod:`harness.cli.run`) only parses arguments, shows progress and prints.
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import pandas as pd

    from harness.core.cases import Case
    from harness.engine.store import RunWriter
    from harness.engine.suite import Suite

#: Default share of the machine's available memory one case may be estimated to use.
MEMORY_BUDGET_FRACTION = 0.6


class ResumeError(Exception):
    """A run cannot be resumed with this suite (one line)."""


@dataclass
class Outcome:
    """How :func:`execute` ended: ``status`` as run.json records it, the run's rows, and the
    signal that interrupted it (None when it ran to the end)."""

    status: str
    rows: "pd.DataFrame"
    interrupted: str | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def new_run_id(suite_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{suite_name}-{uuid.uuid4().hex[:6]}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- start, resume, finish --------------------------------------------------------------------


def start_run(suite: "Suite", out_dir: Path | None, cases: list["Case"],
              results_root: Path = Path("results")) -> "RunWriter":
    """Create the run directory and its run.json (status 'running')."""
    import torch

    from harness.engine.store import RunWriter
    from harness.measure import environment

    run_id = new_run_id(suite.name)
    run_dir = Path(out_dir) if out_dir else results_root / "runs" / run_id
    if (run_dir / "run.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose another -o directory")
    if suite.timing.threads:
        torch.set_num_threads(suite.timing.threads)
    meta = {
        "run_id": run_id,
        "suite": {
            "name": suite.name,
            "description": suite.description,
            "path": str(suite.path) if suite.path else None,
            "resolved_path": str(Path(suite.path).resolve()) if suite.path else None,
            "definition": suite.raw,
            "text": suite.text,
        },
        "timing": suite.timing.__dict__,
        "seed": suite.seed,
        "cases": len(cases),
        "case_ids": [c.case_id for c in cases],
        "started": _now(),
        "finished": None,
        "status": "running",
        "environment": environment.capture(),
    }
    return RunWriter(run_dir, meta)


def remaining_cases(run_dir: Path, cases: list["Case"]) -> list["Case"]:
    """The cases of ``cases`` that have no final row in ``run_dir``; refuses if identities changed."""
    from harness.engine.store import read_meta, read_rows_log

    meta = read_meta(run_dir)
    recorded = meta.get("case_ids", [])
    now = [c.case_id for c in cases]
    if recorded != now:
        added = len(set(now) - set(recorded))
        removed = len(set(recorded) - set(now))
        raise ResumeError(
            f"{run_dir}: the suite's cases differ from the run's ({added} new, {removed} gone"
            f"{', same cases in another order' if not added and not removed else ''}); "
            "resume needs the suite the run started with"
        )
    rows = read_rows_log(run_dir)
    finished = set(rows["case_id"]) if not rows.empty else set()
    return [c for c in cases if c.case_id not in finished]


def resume_run(run_dir: Path, suite: "Suite | None" = None) -> tuple["Suite", list["Case"], "RunWriter"]:
    """(suite, cases still to run, writer) to continue the run in ``run_dir``: with ``suite``
    (whose cases must be the run's), or else with the suite stored in its run.json."""
    from harness.engine.suite import expand_cases
    from harness.engine.store import RunWriter, read_meta
    from harness.engine.suite import parse_suite

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if suite is None:
        path = meta["suite"].get("path")
        suite = parse_suite(meta["suite"].get("text", ""), Path(path) if path else None)
    todo = remaining_cases(run_dir, expand_cases(suite))
    return suite, todo, RunWriter.reopen(run_dir, meta)


def finish_run(writer: "RunWriter", status: str, wall_s: float) -> "pd.DataFrame":
    """Record the end in run.json and write the tables; returns the run's rows."""
    return writer.finalize(finished=_now(), status=status, wall_s=round(wall_s, 3))


# -- executor ---------------------------------------------------------------------------------


def default_memory_budget() -> int:
    """:data:`MEMORY_BUDGET_FRACTION` of the memory available now (8 GiB assumed when unknown)."""
    from harness.measure.environment import available_memory_bytes

    available = available_memory_bytes() or 8 * 2**30
    return int(available * MEMORY_BUDGET_FRACTION)


def memory_budget(suite: "Suite", gib: float | None = None) -> int:
    """Bytes one case may be estimated to use: ``gib``, else the suite's ``[run] memory_budget_gib``,
    else :func:`default_memory_budget`."""
    gib = gib or suite.run.memory_budget_gib
    return int(gib * 2**30) if gib else default_memory_budget()


def make_executor(suite: "Suite", log_dir: Path | None = None, *, isolation: str | None = None,
                  case_timeout_s: float | None = None, memory_budget_gib: float | None = None):
    """The executor for ``suite``'s cases (:mod:`harness.engine.executors`): the arguments given
    override the suite's ``[run]`` table. Worker logs go to ``log_dir``."""
    from harness.engine.executors import InProcess, WorkerPool

    common = dict(seed=suite.seed, memory_budget=memory_budget(suite, memory_budget_gib))
    if (isolation or suite.run.isolation) == "none":
        return InProcess(suite.timing, **common)
    return WorkerPool(
        suite.timing, **common, plugins=suite.plugins, base_dir=suite.base_dir, threads=suite.timing.threads,
        case_timeout_s=case_timeout_s or suite.run.case_timeout_s, log_dir=log_dir,
    )


# -- execute ----------------------------------------------------------------------------------


class _Signals:
    """SIGINT/SIGTERM while cases run: the first is remembered (the case in flight finishes, no
    more start), a second abandons the case in flight (KeyboardInterrupt)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: str | None = None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.log(f"\n{self.received}: finishing the current case, then writing what exists "
                 "(send again to abandon it)")

    def __enter__(self) -> "_Signals":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if exc_type is KeyboardInterrupt:  # a Ctrl-C before the handler was in place, or the second one
            self.received = self.received or "SIGINT"
            return True
        return False


def run_cases(cases: list["Case"], writer: "RunWriter", executor, progress: Any = None,
              stop: Callable[[], bool] = lambda: False) -> int:
    """Run cases in order through ``executor`` (harness.engine.executors), appending each row to
    ``writer`` as it finishes, until ``stop()`` says so; returns how many ran."""
    done = 0
    for case in cases:
        if stop():
            break
        if progress is not None:
            progress.start(case)
        report = getattr(progress, "phase", None)
        if report is not None:  # progress shows what the case is doing (a long first call: compiling)
            result = executor.run(case, on_phase=lambda name, c=case: report(c, name))
        else:
            result = executor.run(case)
        result.row["run_id"] = writer.meta["run_id"]
        result.row["suite"] = writer.meta["suite"]["name"]
        writer.append(result.row, result.samples_s)
        done += 1
        if progress is not None:
            progress.finish(case, result.row)
    return done


def execute(suite: "Suite", cases: list["Case"], writer: "RunWriter", *, progress: Any = None,
            log: Callable[[str], None] = _stderr, **executor_options: Any) -> Outcome:
    """Run ``cases`` into ``writer``'s run directory, stopping early on SIGINT/SIGTERM, then
    finish the run (tables, run.json). ``executor_options`` go to :func:`make_executor`;
    ``progress`` (optional) has ``start(case)``, ``finish(case, row)`` and ``phase(case, name)``."""
    t0 = time.monotonic()
    with _Signals(log) as signals:
        with make_executor(suite, writer.dir / "logs", **executor_options) as executor:
            run_cases(cases, writer, executor, progress=progress, stop=lambda: signals.received is not None)
    status = "complete" if signals.received is None else f"interrupted ({signals.received})"
    return Outcome(status, finish_run(writer, status, time.monotonic() - t0), signals.received)
