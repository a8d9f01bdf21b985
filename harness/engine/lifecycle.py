"""A run's life: start it (or resume it), execute its cases, finish it.

* :func:`start_run` creates the run directory and its ``run.json`` (status ``running``);
  :func:`resume_run` reopens an interrupted run, with the suite it started with (kept in
  ``run.json``) or with a suite file whose cases must be the run's (:class:`ResumeError` if not),
  and gives the cases that have no final row yet.
* :func:`execute` runs cases (:func:`run_cases`) through an executor (:func:`make_executor`: a reusable worker
  process or this process, from the suite's ``[run]`` table unless the caller overrides it, with
  the memory budget of :func:`memory_budget`), in ``[timing] processes`` rounds, each in a fresh
  worker process (asv's schedule: rounds outer, cases inner), appending each round as it
  finishes and each case's row when its last round has. SIGINT and
  SIGTERM are handled: the first lets the case in flight finish and launches no more, a second
  abandons it. Then :func:`finish_run` writes the tables and the final ``run.json`` status.

The command line (:mod:`harness.cli.run`) only parses arguments, shows progress and prints.
"""

from __future__ import annotations

import dataclasses
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

from harness.measure.stability import combine

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
        "timing": dataclasses.asdict(suite.timing),
        "seed": suite.seed,
        "cases": len(cases),
        "case_ids": [c.case_id for c in cases],
        "started": _now(),
        "finished": None,
        "status": "running",
        "environment": environment.capture(suite.run.allocator),
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


def resume_run(run_dir: Path, suite: "Suite | None" = None, trust_plugins: bool = False,
               processes: int | None = None, allocator: str | None = None) -> tuple["Suite", list["Case"], "RunWriter"]:
    """(suite, cases still to run, writer) to continue the run in ``run_dir``: with ``suite``
    (whose cases must be the run's), or else with the suite stored in its run.json, whose plugins
    must be this checkout's code unless ``trust_plugins``, and which sets no executor or cluster
    address (:mod:`harness.engine.trust`). ``processes``/``allocator``: the command line's, else the run's."""
    from harness.engine.suite import expand_cases
    from harness.engine.store import RunWriter, read_meta
    from harness.engine.suite import parse_suite
    from harness.engine.trust import check_recorded_suite, received_suite, recorded_options

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if suite is None:
        recorded = meta.get("suite") or {}
        path, text = Path(recorded["path"]) if recorded.get("path") else None, recorded.get("text") or ""
        check_recorded_suite(text, path, run_dir, trust=trust_plugins)  # before parsing imports them
        suite = received_suite(parse_suite(text, path), processes)  # no connection target, bounded numbers
    # as the run started: its processes and allocator (perhaps given on the command line then), checked
    suite = with_options(suite, **recorded_options(meta, processes=processes, allocator=allocator))
    from harness.engine.shard import cases_of_run  # a shard resumes its own cases

    todo = remaining_cases(run_dir, cases_of_run(expand_cases(suite), meta))
    return suite, todo, RunWriter.reopen(run_dir, meta)


def with_options(suite: "Suite", *, processes: int | None = None, allocator: str | None = None) -> "Suite":
    """``suite`` with ``[timing] processes`` and ``[run] allocator`` replaced where given (the
    command line's ``--processes``, ``--allocator``); the run records what it used."""
    if processes is not None:
        suite = dataclasses.replace(suite, timing=dataclasses.replace(suite.timing, processes=int(processes)))
    if allocator is not None:
        suite = dataclasses.replace(suite, run=dataclasses.replace(suite.run, allocator=allocator))
    return suite


def option_problem(suite: "Suite", isolation: str | None = None) -> str | None:
    """Why the suite's ``[run]`` settings (with ``isolation`` overriding its own) cannot run, in one
    line naming the file and key; None when they can."""
    from harness.measure.environment import ALLOCATOR_ENV

    if suite.run.allocator != "default" and (isolation or suite.run.isolation) == "none":
        if "allocator" in ((suite.raw or {}).get("run") or {}):  # set in the file: FILE:LINE: run.allocator
            from harness.engine.suite import _Locator

            line = _Locator(suite.text or "").line("run", "allocator")
            where = f"{suite.path or 'suite'}:{line}: run.allocator" if line else f"{suite.path or 'suite'}: run.allocator"
        else:
            where = "bench: --allocator"
        return (f"{where}: {suite.run.allocator!r} sets {ALLOCATOR_ENV} in the worker processes, and with "
                "isolation = \"none\" there are none (this process has imported torch already); "
                "use isolation = \"process\"")
    from harness.engine.rayexec import option_problem as ray_problem  # [run] executor = "ray"

    return ray_problem(suite, isolation)


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
                  case_timeout_s: float | None = None, memory_budget_gib: float | None = None,
                  profile: bool | list[str] | None = None, run_dir: Path | None = None):
    """The executor for ``suite``'s cases (:mod:`harness.engine.executors`): the arguments given
    override the suite's ``[run]`` table. Worker logs go to ``log_dir``. The workers get the
    environment of this process as it is, plus what ``[run] allocator`` asks for (default: nothing)."""
    from harness.engine.executors import InProcess, WorkerPool
    from harness.measure.environment import allocator_env
    from harness.measure.profile import request as profile_request

    common = dict(seed=suite.seed, memory_budget=memory_budget(suite, memory_budget_gib),
                  memory_budget_explicit=bool(memory_budget_gib or suite.run.memory_budget_gib),
                  profile=profile_request(suite.run.profile if profile is None else profile, run_dir))
    if suite.run.executor == "ray":  # harness.engine.rayexec: each case a Ray task on a node of a cluster
        from harness.engine.rayexec import RayExecutor

        return RayExecutor(suite, seed=suite.seed, memory_budget_gib=memory_budget_gib or suite.run.memory_budget_gib,
                           case_timeout_s=case_timeout_s, address=suite.run.ray_address, profile=common["profile"],
                           budget_fraction=MEMORY_BUDGET_FRACTION)
    if (isolation or suite.run.isolation) == "none":
        return InProcess(suite.timing, **common)
    pool = WorkerPool(
        suite.timing, **common, plugins=suite.plugins, base_dir=suite.base_dir, threads=suite.timing.threads,
        case_timeout_s=case_timeout_s or suite.run.case_timeout_s, log_dir=log_dir,
        env=allocator_env(suite.run.allocator),
    )
    from harness.measure.environment import host_identity

    pool.identity = host_identity()  # the rows' host and machine_fingerprint: this machine
    return pool


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


class _Shown:
    """A case as the progress display shows it during round ``index`` of ``total``."""

    def __init__(self, case: "Case", index: int, total: int):
        self.case, self.index, self.total = case, index, total

    def label(self) -> str:
        return f"{self.case.label()} [process {self.index + 1} of {self.total}]"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.case, name)


class _Rounds:
    """Each case's per-process results so far, until its final row is composed.

    Round 0 ran it fully; rounds 1.. only timed it. :meth:`record` logs each round's result
    durably (its samples with the process index, a line in the rounds log) and gives the case's
    final row once its last round has finished, or as soon as a round did not end ``ok``."""

    def __init__(self, writer: "RunWriter", processes: int):
        self.writer, self.processes = writer, processes
        self.attempts: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.samples: dict[str, list[list[float]]] = {}

    @property
    def pending(self) -> set[str]:
        """Cases that are ``ok`` so far and still have rounds to run."""
        return set(self.rows)

    def record(self, case: "Case", index: int, result) -> dict[str, Any] | None:
        cid = case.case_id
        if index == 0:
            self.attempts[cid] = uuid.uuid4().hex[:12]
        attempt = self.attempts[cid]
        self.writer.append_round(result.row, result.samples_s, process=index, attempt_id=attempt)
        samples_ms = [s * 1e3 for s in result.samples_s]
        status = result.row.get("status")
        if index == 0:
            final = dict(result.row)
            if status == "ok" and samples_ms and self.processes > 1:
                self.rows[cid], self.samples[cid] = [result.row], [samples_ms]
                return None
            if samples_ms:
                final.update(combine([result.row], [samples_ms]))
            return self._final(final, attempt)
        rows, samples = self.rows[cid], self.samples[cid]
        final = dict(rows[0])
        if status != "ok" or not samples_ms:
            reason = result.row.get("reason") or "no timing samples"
            final.update(status=status if status != "ok" else "error",
                         reason=f"process {index + 1} of {self.processes}: {reason}")
        else:
            rows.append(result.row)
            samples.append(samples_ms)
            if index < self.processes - 1:
                return None
        final.update(combine(rows, samples))
        del self.rows[cid], self.samples[cid]
        return self._final(final, attempt)

    def _final(self, row: dict[str, Any], attempt: str) -> dict[str, Any]:
        row["run_id"] = self.writer.meta["run_id"]
        row["suite"] = self.writer.meta["suite"]["name"]
        self.writer.append_final(row, attempt_id=attempt)
        return row


def run_cases(cases: list["Case"], writer: "RunWriter", executor, progress: Any = None,
              stop: Callable[[], bool] = lambda: False, processes: int = 1) -> int:
    """Run ``cases`` through ``executor`` (harness.engine.executors) in ``processes`` rounds, each in a
    fresh worker process, appending each case's final row to ``writer`` once its last round has
    finished, until ``stop()`` says so; returns how many cases got their final row.

    The schedule (asv's): round 0 runs every case fully (timing, memory, FLOPs, accuracy); rounds
    1 .. processes-1 each start a fresh process (``executor.new_process()``) and time again every
    case that was ``ok`` so far (``time_only``). Rounds are the outer loop and cases the inner one,
    so what changes from process to process, or over the run, shows as a difference between
    processes (:func:`harness.measure.stability.combine` makes the row and judges it)."""
    if hasattr(executor, "run_cases"):  # harness.engine.rayexec: cases in parallel, recorded as they finish
        return executor.run_cases(cases, _Rounds(writer, processes), progress=progress, stop=stop)
    rounds = _Rounds(writer, processes)
    done = 0
    for index in range(processes):
        todo = cases if index == 0 else [c for c in cases if c.case_id in rounds.pending]
        if not todo or stop():
            break
        if index > 0:
            executor.new_process()
        for case in todo:
            if stop():
                return done
            shown = case if processes == 1 else _Shown(case, index, processes)
            if progress is not None:
                progress.start(shown)
            report = getattr(progress, "phase", None)
            on_phase = None if report is None else (lambda name, c=shown: report(c, name))
            result = executor.run(case, on_phase=on_phase, time_only=index > 0)
            final = rounds.record(case, index, result)
            done += final is not None
            if progress is not None:
                progress.finish(shown, result.row)
        if index == 0 and hasattr(progress, "set_total"):  # the later rounds re-run only the ok cases
            progress.set_total(len(cases) + len(rounds.pending) * (processes - 1))
    return done


def execute(suite: "Suite", cases: list["Case"], writer: "RunWriter", *, progress: Any = None,
            log: Callable[[str], None] = _stderr, **executor_options: Any) -> Outcome:
    """Run ``cases`` into ``writer``'s run directory, stopping early on SIGINT/SIGTERM, then
    finish the run (tables, run.json). ``executor_options`` go to :func:`make_executor`;
    ``progress`` (optional) has ``start(case)``, ``finish(case, row)`` and ``phase(case, name)``."""
    problem = option_problem(suite, executor_options.get("isolation"))
    if problem:
        raise ValueError(problem)
    processes = suite.timing.processes
    if processes > 1 and (executor_options.get("isolation") or suite.run.isolation) == "none":
        log(f"isolation = \"none\": one process times each case (processes = {processes} needs worker processes)")
        processes = 1
    if writer.meta.get("timing", {}).get("processes") != processes:
        writer.meta["timing"] = dict(writer.meta.get("timing") or {}, processes=processes)
        writer.write_meta()
    t0 = time.monotonic()
    with _Signals(log) as signals:
        with make_executor(suite, writer.dir / "logs", run_dir=writer.dir, **executor_options) as executor:
            breaker = executor.breaker  # harness.engine.executors.CircuitBreaker: a lost GPU ends the run
            run_cases(cases, writer, executor, progress=progress,
                      stop=lambda: signals.received is not None or breaker.tripped is not None, processes=processes)
    status = "complete" if signals.received is None else f"interrupted ({signals.received})"
    if breaker.tripped and signals.received is None:
        log(f"\nstopping the run: {breaker.tripped}")
        status = "aborted (consecutive crash/cuda_error cases)"
    return Outcome(status, finish_run(writer, status, time.monotonic() - t0),
                   signals.received or ("circuit breaker" if breaker.tripped else None))
