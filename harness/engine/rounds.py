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
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable

from harness.measure.derive import final_row

if TYPE_CHECKING:
    from harness.core.cases import Case
    from harness.core.schema import CaseResult
    from harness.engine.store import RunWriter


class Shown:
    """A case as the progress display shows it during round ``index`` of ``total``."""

    def __init__(self, case: "Case", index: int, total: int):
        self.case, self.index, self.total = case, index, total

    def label(self) -> str:
        return f"{self.case.label()} [process {self.index + 1} of {self.total}]"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.case, name)


class Rounds:
    """Each case's per-process results so far, until its final row is composed.

    Round 0 ran it fully; rounds 1.. only timed it. :meth:`record` logs each round's result
    durably and gives the case's final row once its last round has finished, or as soon as a
    round did not end ``ok``."""

    def __init__(self, writer: "RunWriter", processes: int):
        self.writer, self.processes = writer, processes
        self.attempts: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.samples: dict[str, list[list[float]]] = {}

    @property
    def pending(self) -> set[str]:
        """Cases that are ``ok`` so far and still have rounds to run."""
        return set(self.rows)

    def record(self, case: "Case", index: int, result: "CaseResult") -> dict[str, Any] | None:
        cid = case.case_id
        if index == 0:
            self.attempts[cid] = uuid.uuid4().hex[:12]
        attempt = self.attempts[cid]
        self.writer.append_round(result.row, result.samples_s, process=index, attempt_id=attempt)
        samples_ms = [s * 1e3 for s in result.samples_s]
        status = result.row.get("status")
        if index == 0:
            if status == "ok" and samples_ms and self.processes > 1:
                self.rows[cid], self.samples[cid] = [result.row], [samples_ms]
                return None
            return self._final(final_row([result.row], [samples_ms]), attempt)
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
        return self._final(final, attempt)

    def _final(self, row: dict[str, Any], attempt: str) -> dict[str, Any]:
        row["run_id"] = self.writer.meta["run_id"]
        row["suite"] = self.writer.meta["suite"]["name"]
        self.writer.append_final(row, attempt_id=attempt)
        return row


def run_sequential(executor: Any, cases: list["Case"], rounds: Rounds, progress: Any = None,
                   stop: Callable[[], bool] = lambda: False) -> int:
    """Run ``cases`` one at a time through ``executor`` (``run``, ``new_process``), round after round,
    recording each round in ``rounds``, until ``stop()`` says so; returns how many cases got their
    final row."""
    processes = rounds.processes
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
            report = getattr(progress, "phase", None)
            on_phase = None if report is None else (lambda name, c=shown: report(c, name))
            result = executor.run(case, on_phase=on_phase, time_only=index > 0)
            final = rounds.record(case, index, result)
            done += final is not None
            if progress is not None:
                progress.finish(shown, final if final is not None else result.row)
        if index == 0 and hasattr(progress, "set_total"):  # the later rounds re-run only the ok cases
            progress.set_total(len(cases) + len(rounds.pending) * (processes - 1))
    return done
