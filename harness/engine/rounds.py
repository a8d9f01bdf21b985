"""A case's rounds: one per fresh worker process, recorded as they finish, composed into its final row.

A run times each case in ``[timing] processes`` fresh worker processes, one round each. The
schedule (asv's, :func:`run_sequential`): round 0 runs every case fully (timing, memory, FLOPs,
accuracy); rounds 1 .. processes-1 each start a fresh process (``executor.new_process()``) and time
again every case that was ``ok`` so far (``time_only``). Rounds are the outer loop and cases the
inner one, so what changes from process to process, or over the run, shows as a difference
between processes. Parallel executors (harness.engine.rayexec) run a case's rounds where they like
and hand them to the same :class:`Rounds`.

:class:`Rounds` logs each round durably (its samples with the process index, its measurements in
the rounds log) and, once a case's last round is in (or as soon as one did not end ``ok``), makes
its final row with :func:`harness.measure.derive.final_row`: the processes combined, every derived
column computed once from the combined time.

**Contention** (:mod:`harness.measure.contention`; ``[run] contention``): a round whose sampling
other processes contended is, with ``retry`` (the default), logged as discarded (its samples kept
in ``samples.jsonl`` under an attempt id of their own, so they never reach the tables) and run again
in a fresh process after ``contention_wait_s``, up to ``contention_retries`` times; the last one is
kept, flagged. When several cases in a row stay contended through their retries the machine is
busy for good: retrying then only multiplies the run's time, so the run says so once and flags
from then on. With ``wait``, each round first waits (up to ``contention_wait_s``) for the machine to
be quiet. With ``flag``, nothing is re-run.

**Quarantine**: a variant whose cases crash the worker :data:`QUARANTINE_AFTER` times in a row has
its remaining cases ``skipped`` with that reason, instead of crashing each of them in turn; the
other variants' cases run on.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.measure import contention
from harness.measure.derive import final_row

if TYPE_CHECKING:
    from harness.core.cases import Case
    from harness.core.schema import CaseResult
    from harness.engine.store import RunWriter

#: Consecutive cases of one variant that crash the worker before its other cases are skipped.
QUARANTINE_AFTER = 3
#: Statuses that mean the worker process died under a case (the variant's doing, or the device's).
CRASHES = ("crash", "cuda_error")


@dataclass(frozen=True)
class ContentionPolicy:
    """``[run] contention`` and its settings (harness.core.config.RunConfig)."""

    mode: str = "retry"
    retries: int = 2
    wait_s: float = 1.0
    #: cases in a row still contended after their retries before retrying stops for the run
    give_up_after: int = 3
    #: the worker's threads (None: every core it may use), for ``wait``'s idea of a quiet machine
    threads: int | None = None


class Shown:
    """A case as the progress display shows it during round ``index`` of ``total``."""

    def __init__(self, case: Case, index: int, total: int):
        self.case, self.index, self.total = case, index, total

    def label(self) -> str:
        return f"{self.case.label()} [process {self.index + 1} of {self.total}]"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.case, name)


class Rounds:
    """Each case's per-process results so far, until its final row is composed.

    Round 0 ran it fully; rounds 1.. only timed it. :meth:`record` logs each round's result
    durably and gives the case's final row once its last round has finished, or as soon as a
    round did not end ``ok``; :meth:`should_retry` decides whether a contended round is re-run."""

    def __init__(self, writer: RunWriter, processes: int, policy: ContentionPolicy | None = None,
                 log: Callable[[str], None] = lambda message: None,
                 sleep: Callable[[float], None] = time.sleep):
        self.writer, self.processes = writer, processes
        self.policy = policy or ContentionPolicy()
        self.log, self.sleep = log, sleep
        self.attempts: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.samples: dict[str, list[list[float]]] = {}
        self.discarded: dict[str, int] = {}
        self._retried: dict[tuple[str, int], int] = {}
        self._still_contended = 0  # cases in a row that stayed contended through their retries
        self.retrying = self.policy.mode == "retry"

    @property
    def pending(self) -> set[str]:
        """Cases that are ``ok`` so far and still have rounds to run."""
        return set(self.rows)

    def _attempt(self, case: Case, index: int) -> str:
        if index == 0 and (case.case_id, 0) not in self._retried:
            self.attempts[case.case_id] = uuid.uuid4().hex[:12]
        return self.attempts[case.case_id]

    def should_retry(self, case: Case, index: int, result: CaseResult) -> bool:
        """Whether ``result`` (round ``index`` of ``case``) is to be run again in a fresh process because
        other processes contended it; if so it is logged as discarded (never in the tables)."""
        if result.row.get("status") != "ok" or not result.samples_s:
            return False
        contended, why = contention.judge(result.row)
        key = (case.case_id, index)
        if not contended:
            self._still_contended = 0
            return False
        if not self.retrying or self._retried.get(key, 0) >= self.policy.retries:
            if self.retrying:
                self._still_contended += 1
                if self._still_contended >= self.policy.give_up_after:
                    self.retrying = False
                    self.log(f"the machine stays busy ({why}): {self._still_contended} cases in a row were still "
                             "contended after their retries, so contended rounds are flagged from now on instead "
                             "of re-run")
            return False
        attempt = self._attempt(case, index)
        n = self._retried[key] = self._retried.get(key, 0) + 1
        self.discarded[case.case_id] = self.discarded.get(case.case_id, 0) + 1
        row = dict(result.row, discarded=f"contended: {why}")
        self.writer.append_round(row, result.samples_s, process=index, attempt_id=f"{attempt}-discarded-{index}-{n}")
        return True

    def record(self, case: Case, index: int, result: CaseResult) -> dict[str, Any] | None:
        cid = case.case_id
        attempt = self._attempt(case, index)
        self.writer.append_round(result.row, result.samples_s, process=index, attempt_id=attempt)
        samples_ms = [s * 1e3 for s in result.samples_s]
        status = result.row.get("status")
        if index == 0:
            if status == "ok" and samples_ms and self.processes > 1:
                self.rows[cid], self.samples[cid] = [result.row], [samples_ms]
                return None
            return self._final(final_row([result.row], [samples_ms]), cid, attempt)
        rows, samples = self.rows[cid], self.samples[cid]
        failed = status != "ok" or not samples_ms
        if not failed:
            rows.append(result.row)
            samples.append(samples_ms)
            if index < self.processes - 1:
                return None
        final = final_row(rows, samples)
        if failed:
            reason = result.row.get("reason") or "no timing samples"
            final.update(status=status if status != "ok" else "error",
                         reason=f"process {index + 1} of {self.processes}: {reason}")
        del self.rows[cid], self.samples[cid]
        return self._final(final, cid, attempt)

    def skip(self, case: Case, reason: str, threads: int | None = None) -> dict[str, Any]:
        """Record ``case`` as skipped without running it (its variant is quarantined)."""
        from harness.core.schema import CaseResult, base_row

        row = base_row(case, threads=threads)
        row.update(status="skipped", reason=reason)
        final = self.record(case, 0, CaseResult(row, []))
        assert final is not None  # round 0 without samples is final at once
        return final

    def _final(self, row: dict[str, Any], cid: str, attempt: str) -> dict[str, Any]:
        row["discarded_rounds"] = self.discarded.get(cid, 0)
        row["run_id"] = self.writer.meta["run_id"]
        row["suite"] = self.writer.meta["suite"]["name"]
        self.writer.append_final(row, attempt_id=attempt)
        return row


class Quarantine:
    """Variants whose cases crashed the worker :data:`QUARANTINE_AFTER` times in a row."""

    def __init__(self, after: int = QUARANTINE_AFTER):
        self.after = after
        self.streak: dict[str, list[str]] = {}
        self.reasons: dict[str, str] = {}

    def record(self, case: Case, row: dict[str, Any]) -> None:
        status = row.get("status")
        if status == "skipped":
            return
        if status in CRASHES:
            self.streak.setdefault(case.variant, []).append(str(row.get("reason") or status))
            if len(self.streak[case.variant]) >= self.after and case.variant not in self.reasons:
                last = self.streak[case.variant][-1][:200]
                self.reasons[case.variant] = (f"quarantined: {case.variant} crashed the worker on {self.after} "
                                              f"consecutive cases (the last: {last}); its other cases are not run")
        else:
            self.streak.pop(case.variant, None)

    def reason(self, case: Case) -> str | None:
        return self.reasons.get(case.variant)


def wait_for_quiet(policy: ContentionPolicy, log: Callable[[str], None] = lambda m: None,
                   clock: Callable[[], float] = time.monotonic, window_s: float = 0.25) -> float:
    """``[run] contention = "wait"``: sample the machine until other processes leave the worker's
    threads their cores, for at most ``policy.wait_s``; returns the seconds waited."""
    t0 = clock()
    cores = contention.cores_available()
    threads = policy.threads or cores
    while True:
        others, _ = contention.busiest(seconds=window_s, exclude=contention.own_pids() | contention.children_pids())
        if threads + others <= cores + contention.MARGIN_CORES or clock() - t0 >= policy.wait_s:
            return clock() - t0


def run_sequential(executor: Any, cases: list[Case], rounds: Rounds, progress: Any = None,
                   stop: Callable[[], bool] = lambda: False, quarantine: Quarantine | None = None) -> int:
    """Run ``cases`` one at a time through ``executor`` (``run``, ``new_process``), round after round,
    recording each round in ``rounds`` (contended rounds re-run as its policy says; the cases of a
    quarantined variant skipped), until ``stop()`` says so; returns how many cases got their final row."""
    processes = rounds.processes
    quarantine = quarantine if quarantine is not None else Quarantine()
    threads = getattr(getattr(executor, "settings", None), "threads", None)
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
            shown = case if processes == 1 else Shown(case, index, processes)
            if progress is not None:
                progress.start(shown)
            why = quarantine.reason(case) if index == 0 else None
            if why is not None:
                skipped = rounds.skip(case, why, threads)
                done += 1
                if progress is not None:
                    progress.finish(shown, skipped)
                continue
            report = getattr(progress, "phase", None)
            on_phase = None if report is None else (lambda name, c=shown, r=report: r(c, name))
            if rounds.policy.mode == "wait":
                wait_for_quiet(rounds.policy)
            result = executor.run(case, on_phase=on_phase, time_only=index > 0)
            while rounds.should_retry(case, index, result):
                executor.new_process()  # a fresh process after a short wait: the neighbour may be gone
                rounds.sleep(rounds.policy.wait_s)
                result = executor.run(case, on_phase=on_phase, time_only=index > 0)
            quarantine.record(case, result.row)
            final = rounds.record(case, index, result)
            done += final is not None
            if progress is not None:
                progress.finish(shown, final if final is not None else result.row)
        if index == 0 and hasattr(progress, "set_total"):  # the later rounds re-run only the ok cases
            progress.set_total(len(cases) + len(rounds.pending) * (processes - 1))
    return done
