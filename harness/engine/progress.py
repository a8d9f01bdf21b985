"""Progress while a suite runs: a rich bar on a terminal, plain lines otherwise (CI logs).

The runner calls ``start(case)`` before a case and ``finish(case, row)`` after it; while a
case runs it may also call ``phase(case, name)`` as the case moves through its steps
(``inputs``, ``first call``, ``warm-up``, ``timing``, ``memory``, ``accuracy``). The first
call includes compilation, autotuning and lazy initialisation (torch.compile, Triton), which
can take minutes, so it is shown as such — "first call: compiling / autotuning 42 s" with a
running clock — rather than as a frozen bar. Without phase calls the current case still shows
its own running clock.

* :class:`RichProgress` (a terminal): spinner, case count, bar, elapsed time, ETA, the current
  case and what it is doing; ``--verbose`` adds one line per finished case above the bar.
* :class:`PlainProgress` (not a terminal, or ``--quiet``): one line per finished case with
  ``--verbose`` (not with ``--quiet``), else one per 10% of the cases; and, so that a CI log
  never goes silent for long, a line every ``heartbeat_s`` while one case keeps running
  ("still running …: first call: compiling / autotuning for 120 s").
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from harness.core.units import duration_ms, finite

#: A phase running longer than this is highlighted (and the first call called a compilation).
SLOW_PHASE_S = 2.0
#: Plain output: a "still running" line this often while one case runs.
HEARTBEAT_S = 60.0
#: What each phase is called on screen.
PHASE_TEXT = {
    "inputs": "preparing inputs",
    "first call": "first call",
    "warm-up": "warming up",
    "timing": "timing",
    "memory": "measuring peak memory",
    "accuracy": "checking accuracy",
    "running": "running",
}
COMPILING_TEXT = "first call: compiling / autotuning"


_finite, _duration = finite, duration_ms


def _summary(row: dict[str, Any]) -> str:
    """One finished case in a few words: time, rate, memory, error (and a long first call)."""
    if row["status"] == "ok":
        parts = [_duration(row["time_ms"])]
        if _finite(row.get("tflops_per_s")):
            parts.append(f"{row['tflops_per_s'] * 1e3:.3g} GFLOP/s")
        if _finite(row.get("peak_mem_bytes")):
            parts.append(f"{row['peak_mem_bytes'] / 2**20:.1f} MiB")
        if _finite(row.get("rel_err")):
            parts.append(f"rel_err {row['rel_err']:.2e}")
        first = row.get("first_call_ms")
        if first is not None and _finite(first) and first >= SLOW_PHASE_S * 1e3:
            parts.append(f"first call {_duration(first)}")
        return "ok  " + ", ".join(parts)
    return f"{row['status']}: {row.get('reason', '')}"


def phase_text(phase: str, seconds: float) -> str:
    """What the current case is doing, for humans: a first call running long is a compilation."""
    if phase == "first call" and seconds >= SLOW_PHASE_S:
        return COMPILING_TEXT
    return PHASE_TEXT.get(phase, phase)


class _CaseClock:
    """The case in flight, its phase and when each started (shared by both displays)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.case = None
        self.phase = "running"
        self.case_t0 = self.phase_t0 = clock()
        self.lock = threading.Lock()

    def start(self, case) -> None:
        with self.lock:
            self.case, self.phase = case, "running"
            self.case_t0 = self.phase_t0 = self.clock()

    def set_phase(self, name: str) -> None:
        with self.lock:
            self.phase, self.phase_t0 = name, self.clock()

    def stop(self) -> None:
        with self.lock:
            self.case = None

    def snapshot(self) -> tuple[Any, str, float, float]:
        with self.lock:
            now = self.clock()
            return self.case, self.phase, now - self.case_t0, now - self.phase_t0


class PlainProgress:
    """Line-based progress for logs: finished cases, and a heartbeat while one case runs long."""

    def __init__(self, total: int, verbose: bool = False, stream=None, heartbeat_s: float | None = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.verbose, self.done = total, verbose, 0
        self.stream = stream or sys.stderr
        self.clock = clock
        self.t0 = clock()
        self.current = _CaseClock(clock)
        self.heartbeat_s = heartbeat_s
        self._last_beat = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.heartbeat_s:
            self._thread = threading.Thread(target=self._beat, name="bench-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, (self.heartbeat_s or 4.0) / 4)):
            self.tick()

    def _print(self, text: str) -> None:
        print(f"[{self.done}/{self.total} {self.clock() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)

    def tick(self) -> None:
        """Print a 'still running' line when the case in flight has run another ``heartbeat_s``."""
        case, phase, case_s, phase_s = self.current.snapshot()
        if case is None or not self.heartbeat_s:
            return
        beats = int(case_s // self.heartbeat_s)
        if beats >= 1 and beats > self._last_beat:
            self._last_beat = beats
            self._print(f"still running {case.label()}: {phase_text(phase, phase_s)} for {phase_s:.0f} s "
                        f"(case {case_s:.0f} s)")

    def start(self, case) -> None:
        self._last_beat = 0
        self.current.start(case)

    def phase(self, case, name: str) -> None:
        self.current.set_phase(name)

    def set_total(self, total: int) -> None:
        """The number of steps changed (a run with several processes per case, once round 0 is done)."""
        self.total = total

    def finish(self, case, row) -> None:
        self.current.stop()
        self.done += 1
        step = max(1, self.total // 10)
        if self.verbose or self.done % step == 0 or self.done == self.total:
            self._print(f"{case.label()}: {_summary(row)}")


class PhaseColumn(ProgressColumn):
    """The current case's phase with its own running clock; yellow once it runs long."""

    def __init__(self, current: _CaseClock):
        super().__init__()
        self.current = current

    def render(self, task) -> Text:
        case, phase, case_s, phase_s = self.current.snapshot()
        if case is None:
            return Text("")
        text = f"{phase_text(phase, phase_s)} {phase_s:4.1f} s"
        if phase != "running" and case_s - phase_s >= 0.05:
            text += f" (case {case_s:.1f} s)"
        slow = phase_s >= SLOW_PHASE_S
        return Text(text, style="bold yellow" if slow and phase == "first call" else ("yellow" if slow else "cyan"))


class RichProgress:
    """A bar with case count, elapsed time and ETA; below it the current case and its phase."""

    def __init__(self, total: int, verbose: bool = False, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.verbose = verbose
        self.console = console or Console(stderr=True)
        self.current = _CaseClock(clock)
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("[bold]cases"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self.task = self.bar.add_task("cases", total=total)
        self.case_bar = Progress(  # the phase first: on a narrow terminal the case label is what gets cut
            TextColumn("  [dim]now[/dim]"), PhaseColumn(self.current), TextColumn("{task.description}"),
            console=self.console, transient=True, refresh_per_second=4,
        )
        self.case_task = self.case_bar.add_task("starting", total=None)

    def __enter__(self):
        from rich.console import Group
        from rich.live import Live

        self.live = Live(Group(self.bar, self.case_bar), console=self.console, refresh_per_second=4, transient=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.current.stop()
        self.case_bar.update(self.case_task, description="", visible=False)
        return self.live.__exit__(*exc)

    def start(self, case) -> None:
        self.current.start(case)
        self.case_bar.update(self.case_task, description=case.label())

    def phase(self, case, name: str) -> None:
        self.current.set_phase(name)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)

    def finish(self, case, row) -> None:
        self.current.stop()
        if self.verbose:
            self.console.print(f"{case.label()}: {_summary(row)}", highlight=False)
        self.bar.advance(self.task)


def make_progress(total: int, verbose: bool = False, quiet: bool = False):
    """The rich bar on a terminal; plain lines when stderr is not a terminal or with ``quiet``.

    ``quiet`` (``--quiet``) keeps a log short: a line per 10% of the cases and the heartbeat of a
    long case, never a bar, and not a line per case even with ``verbose``.
    """
    if quiet:
        return PlainProgress(total)
    if not sys.stderr.isatty():
        return PlainProgress(total, verbose=verbose)
    return RichProgress(total, verbose=verbose)
