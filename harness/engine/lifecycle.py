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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import RunExistsError, UserError

if TYPE_CHECKING:
    import pandas as pd

    from harness.core.cases import Case
    from harness.core.config import RunSettings
    from harness.engine.executors import Executor
    from harness.engine.rounds import ContentionPolicy
    from harness.engine.store import RunWriter
    from harness.engine.suite import Suite


#: Default share of the machine's available memory one case may be estimated to use.
MEMORY_BUDGET_FRACTION = 0.6


class ResumeError(UserError):
    """A run cannot be resumed with this suite (one line)."""


@dataclass
class Outcome:
    """How :func:`execute` ended: ``status`` as run.json records it, the run's rows, and the
    signal that interrupted it (None when it ran to the end)."""

    status: str
    rows: pd.DataFrame
    interrupted: str | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def new_run_id(suite_name: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{suite_name}-{uuid.uuid4().hex[:6]}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- start, resume, finish --------------------------------------------------------------------


def start_run(suite: Suite, out_dir: Path | None, cases: list[Case],
              results_root: Path = Path("results")) -> RunWriter:
    """Create the run directory and its run.json (status 'running')."""
    import torch

    from harness.engine.store import RunWriter
    from harness.measure import environment

    run_id = new_run_id(suite.name)
    run_dir = Path(out_dir) if out_dir else results_root / "runs" / run_id
    if (run_dir / "run.json").exists():
        raise RunExistsError(f"{run_dir} already holds a run; choose another -o directory")
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


def remaining_cases(run_dir: Path, cases: list[Case]) -> list[Case]:
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


def resume_run(run_dir: Path, suite: Suite | None = None, trust_plugins: bool = False,
               processes: int | None = None, allocator: str | None = None) -> tuple[Suite, list[Case], RunWriter]:
    """(suite, cases still to run, writer) to continue the run in ``run_dir``: with ``suite``
    (whose cases must be the run's), or else with the suite stored in its run.json, whose plugins
    must be this checkout's code unless ``trust_plugins``, and which sets no executor or cluster
    address (:mod:`harness.engine.trust`). ``processes``/``allocator``: the command line's, else the run's."""
    from harness.engine.store import RunWriter, read_meta
    from harness.engine.suite import expand_cases, parse_suite
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


def with_options(suite: Suite, *, processes: int | None = None, allocator: str | None = None) -> Suite:
    """``suite`` with ``[timing] processes`` and ``[run] allocator`` replaced where given (the
    command line's ``--processes``, ``--allocator``); the run records what it used."""
    if processes is not None:
        suite = dataclasses.replace(suite, timing=dataclasses.replace(suite.timing, processes=int(processes)))
    if allocator is not None:
        suite = dataclasses.replace(suite, run=dataclasses.replace(suite.run, allocator=allocator))
    return suite


def option_problem(suite: Suite, isolation: str | None = None) -> str | None:
    """Why the suite's ``[run]`` settings (with ``isolation`` overriding its own) cannot run, in one
    line naming the file and key; None when they can."""
    from harness.measure.environment import ALLOCATOR_ENV

    if suite.run.allocator != "default" and (isolation or suite.run.isolation) == "none":
        if "allocator" in ((suite.raw or {}).get("run") or {}):  # set in the file: FILE:LINE: run.allocator
            from harness.engine.suite import _Locator

            line = _Locator(suite.text or "").line("run", "allocator")
            where = f"{suite.path or 'suite'}" + (f":{line}" if line else "") + ": run.allocator"
        else:
            where = "bench: --allocator"
        return (f"{where}: {suite.run.allocator!r} sets {ALLOCATOR_ENV} in the worker processes, and with "
                "isolation = \"none\" there are none (this process has imported torch already); "
                "use isolation = \"process\"")
    from harness.engine.rayexec import option_problem as ray_problem  # [run] executor = "ray"

    return ray_problem(suite, isolation)


def finish_run(writer: RunWriter, status: str, wall_s: float) -> pd.DataFrame:
    """Record the end in run.json and write the tables; returns the run's rows."""
    return writer.finalize(finished=_now(), status=status, wall_s=round(wall_s, 3))


# -- executor ---------------------------------------------------------------------------------


def default_memory_budget() -> int:
    """:data:`MEMORY_BUDGET_FRACTION` of the memory available now (8 GiB assumed when unknown)."""
    from harness.measure.environment import available_memory_bytes

    available = available_memory_bytes() or 8 * 2**30
    return int(available * MEMORY_BUDGET_FRACTION)


def memory_budget(suite: Suite, gib: float | None = None) -> int:
    """Bytes one case may be estimated to use: ``gib``, else the suite's ``[run] memory_budget_gib``,
    else :func:`default_memory_budget`."""
    gib = gib or suite.run.memory_budget_gib
    return int(gib * 2**30) if gib else default_memory_budget()


def run_settings(suite: Suite, *, case_timeout_s: float | None = None, memory_budget_gib: float | None = None,
                 profile: bool | list[str] | None = None, run_dir: Path | None = None) -> RunSettings:
    """What every executor and worker of ``suite``'s run receives (:class:`harness.core.config.RunSettings`):
    the suite's settings, with the arguments given (the command line's) overriding its ``[run]`` table."""
    from harness.core.config import RunSettings
    from harness.measure.profile import request as profile_request

    return RunSettings(
        timing=suite.timing, seed=suite.seed, memory_budget=memory_budget(suite, memory_budget_gib),
        memory_budget_explicit=bool(memory_budget_gib or suite.run.memory_budget_gib),
        plugins=tuple(suite.plugins), base_dir=str(suite.base_dir), threads=suite.timing.threads,
        case_timeout_s=case_timeout_s or suite.run.case_timeout_s,
        profile=profile_request(suite.run.profile if profile is None else profile, run_dir))


def make_executor(suite: Suite, log_dir: Path | None = None, *, isolation: str | None = None,
                  case_timeout_s: float | None = None, memory_budget_gib: float | None = None,
                  profile: bool | list[str] | None = None, run_dir: Path | None = None) -> Executor:
    """The executor for ``suite``'s cases (:mod:`harness.engine.executors`): the arguments given
    override the suite's ``[run]`` table. Worker logs go to ``log_dir``. The workers get the
    environment of this process as it is, plus what ``[run] allocator`` asks for (default: nothing)."""
    from harness.engine.executors import InProcess, WorkerPool
    from harness.measure.environment import allocator_env, host_identity

    settings = run_settings(suite, case_timeout_s=case_timeout_s, memory_budget_gib=memory_budget_gib,
                            profile=profile, run_dir=run_dir)
    if suite.run.executor == "ray":  # harness.engine.rayexec: each case a Ray task on a node of a cluster
        from harness.engine.rayexec import RayExecutor

        given = memory_budget_gib or suite.run.memory_budget_gib  # else each node's own budget
        return RayExecutor(dataclasses.replace(settings, memory_budget=int(given * 2**30) if given else None),
                           address=suite.run.ray_address, env=allocator_env(suite.run.allocator),
                           budget_fraction=MEMORY_BUDGET_FRACTION)
    if (isolation or suite.run.isolation) == "none":
        return InProcess(settings)
    pool = WorkerPool(settings, log_dir=log_dir, env=allocator_env(suite.run.allocator))
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

    def __enter__(self) -> _Signals:
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if exc_type is KeyboardInterrupt:  # a Ctrl-C before the handler was in place, or the second one
            self.received = self.received or "SIGINT"
            return True
        return False


def run_cases(cases: list[Case], writer: RunWriter, executor: Executor, progress: Any = None,
              stop: Callable[[], bool] = lambda: False, processes: int = 1, policy: ContentionPolicy | None = None,
              log: Callable[[str], None] = _stderr) -> int:
    """Run ``cases`` through ``executor`` in ``processes`` rounds (:mod:`harness.engine.rounds`: each
    round in a fresh worker process, each case's final row appended to ``writer`` once its last round
    has finished; contended rounds handled by ``policy``), until ``stop()`` says so; returns how many
    cases got their final row."""
    from harness.engine.rounds import Rounds

    return executor.run_cases(cases, Rounds(writer, processes, policy, log=log), progress=progress, stop=stop)


def contention_policy(suite: Suite, mode: str | None = None) -> ContentionPolicy:
    """The suite's ``[run] contention`` settings (``mode``: the command line's, overriding it)."""
    from harness.engine.rounds import ContentionPolicy

    return ContentionPolicy(mode=mode or suite.run.contention, retries=suite.run.contention_retries,
                            wait_s=suite.run.contention_wait_s, threads=suite.timing.threads)


def check_machine(threads: int | None, log: Callable[[str], None] = _stderr, seconds: float = 0.5) -> dict[str, Any]:
    """Before the first case: sample the machine for ``seconds``; when other processes use cores the
    workers' threads will need, say so in one line naming the busiest (pid, name, % CPU) and the
    thread count the cases will use. Returns what was seen (for run.json)."""
    from harness.measure import contention

    cores = contention.cores_available()
    used, top = contention.busiest(seconds=seconds)
    threads = threads or cores
    seen = {"other_cpu_cores": round(used, 3), "cores": cores, "threads": threads,
            "busiest": [{"pid": p, "name": n, "cpu_pct": round(pct, 1)} for p, n, pct in top[:3]]}
    if top and threads + used > cores + contention.MARGIN_CORES:
        pid, name, pct = top[0]
        log(f"warning: the machine is busy: other processes use {used:.2f} of {cores} cores (busiest: pid {pid} "
            f"{name!r} at {pct:.0f}% CPU); cases run with {threads} thread{'s' if threads != 1 else ''}, so timings "
            "may be slowed: contended cases are re-run, then flagged (contended = true)")
    return seen


def execute(suite: Suite, cases: list[Case], writer: RunWriter, *, progress: Any = None,
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
    mode = executor_options.pop("contention", None)
    policy = contention_policy(suite, mode)
    if suite.run.executor != "ray":  # a cluster's nodes are not this machine
        writer.meta.setdefault("environment", {})["contention"] = dict(
            check_machine(suite.timing.threads, log), policy=policy.mode, retries=policy.retries)
        writer.write_meta()
    t0 = time.monotonic()
    with _Signals(log) as signals:
        with make_executor(suite, writer.dir / "logs", run_dir=writer.dir, **executor_options) as executor:
            breaker = executor.breaker  # harness.engine.executors.CircuitBreaker: a lost GPU ends the run
            run_cases(cases, writer, executor, progress=progress,
                      stop=lambda: signals.received is not None or breaker.tripped is not None, processes=processes,
                      policy=policy, log=log)
    status = "complete" if signals.received is None else f"interrupted ({signals.received})"
    if breaker.tripped and signals.received is None:
        log(f"\nstopping the run: {breaker.tripped}")
        status = "aborted (consecutive crash/cuda_error cases, health probe failed)"
    return Outcome(status, finish_run(writer, status, time.monotonic() - t0),
                   signals.received or ("circuit breaker" if breaker.tripped else None))
