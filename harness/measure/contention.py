"""Contention: how much of the machine other processes took while a case was being sampled.

A steady neighbour (a browser, a CI job beside ours, a data loader) slows every process of a run
alike, so comparing the run's processes with each other cannot see it (harness.measure.stability).
It can be seen directly, cheaply, from what Linux counts anyway: a few reads of ``/proc`` at the
start and the end of each process's sampling window (never per sample):

* ``other_cpu_cores``: CPU time the machine spent busy outside this process and its children
  (``/proc/stat``'s busy jiffies less this process tree's ``utime + stime``), over the window's wall
  time: how many cores' worth of work other processes did (1.0: one core, all the time);
* ``steal_pct``: the share of the machine's CPU time the hypervisor gave to other guests (``steal``);
* ``involuntary_switches_per_s``: how often this process's threads were preempted
  (``getrusage``'s involuntary context switches, every thread of the process);
* ``cpu_cores``: the cores this process may run on (its affinity mask);
* on NVIDIA GPUs, ``gpu_other_processes``: other processes holding a context on the device (NVML).

Where the OS does not give a figure (not Linux, ``/proc`` unreadable) the columns are empty and
:func:`availability` says why (run.json). The judgement — whether those figures mean the case was
*contended* — is made by the parent from every round's figures (:func:`judge`), so that one margin
applies to every row of a run and can be tested alone.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``contended``: other processes took more than the cores the worker's threads left free, plus this
#: margin (in cores). Chosen by measurement (README, "Numbers on a busy machine"): on a quiet 2-core VM
#: the parent's own progress display and the system's daemons used at most 0.12 cores during any
#: case of the quick suite, and one busy-looping neighbour shows as 0.9–1.0 core.
MARGIN_CORES = 0.25
#: ``contended`` as well when the hypervisor stole more than this share of the machine's CPU time.
STEAL_LIMIT_PCT = 5.0
#: Windows shorter than this many clock ticks give no figure (the counters advance once a tick).
MIN_TICKS = 2

COLUMNS = ("other_cpu_cores", "steal_pct", "involuntary_switches_per_s", "cpu_cores", "gpu_other_processes")


@dataclass(frozen=True)
class SystemTimes:
    """The ``cpu`` line of ``/proc/stat``, in clock ticks: busy (user, nice, system, irq, softirq),
    steal, and all of them with idle and iowait (total)."""

    busy: int
    steal: int
    total: int


def parse_stat(text: str) -> SystemTimes:
    """The machine's CPU times from the text of ``/proc/stat`` (ValueError when it has no cpu line)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(x) for x in line.split()[1:]]
            values += [0] * (8 - len(values))
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            busy = user + nice + system + irq + softirq
            return SystemTimes(busy=busy, steal=steal, total=busy + idle + iowait + steal)
    raise ValueError("no 'cpu' line")


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime in ticks) from the text of ``/proc/<pid>/stat`` (the command name, in
    parentheses, may hold spaces and parentheses of its own)."""
    rest = text[text.rindex(")") + 2:].split()
    # after the name: state(3) ppid(4) ... utime(14) stime(15), counted from 1 with pid and comm
    return int(rest[1]), int(rest[11]) + int(rest[12])


@dataclass
class Proc:
    """Where the counters are read: ``/proc`` (a directory of fake files in tests)."""

    root: Path = Path("/proc")

    def read(self, *parts: str) -> str:
        return (self.root.joinpath(*parts)).read_text()

    def system(self) -> SystemTimes:
        return parse_stat(self.read("stat"))

    def children(self, pid: int) -> list[int]:
        """Child processes of ``pid`` (every thread's ``children`` file)."""
        out: list[int] = []
        try:
            tasks = [p.name for p in self.root.joinpath(str(pid), "task").iterdir()]
        except OSError:
            return out
        for tid in tasks:
            try:
                out += [int(x) for x in self.read(str(pid), "task", tid, "children").split()]
            except (OSError, ValueError):
                continue
        return out

    def tree_ticks(self, pid: int) -> int:
        """utime + stime of ``pid`` and all its descendants (a distributed case's rank processes)."""
        total, todo, seen = 0, [pid], set()
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            try:
                total += parse_pid_stat(self.read(str(p), "stat"))[1]
            except (OSError, ValueError, IndexError):
                continue
            todo += self.children(p)
        return total

    def processes(self) -> dict[int, tuple[str, int]]:
        """Every process: pid → (name, utime + stime ticks)."""
        out = {}
        for entry in self.root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                text = entry.joinpath("stat").read_text()
                name = text[text.index("(") + 1:text.rindex(")")]
                out[int(entry.name)] = (name, parse_pid_stat(text)[1])
            except (OSError, ValueError, IndexError):
                continue
        return out


def clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def involuntary_switches() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)
    except (ImportError, OSError):
        return None


def own_pids() -> set[int]:
    """This process and its parent (the ``bench`` process that started the worker): neither is
    "another process" on the GPU."""
    return {os.getpid(), os.getppid()}


def children_pids(proc: Proc | None = None) -> set[int]:
    """This process's children (its worker processes) and their descendants."""
    proc = proc or Proc()
    out: set[int] = set()
    todo = proc.children(os.getpid())
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += proc.children(pid)
    return out


def unavailable_reason(proc: Proc | None = None) -> str | None:
    """Why contention cannot be measured here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"contention is read from /proc, which {sys.platform} does not have"
    try:
        (proc or Proc()).system()
    except (OSError, ValueError) as exc:
        return f"/proc/stat unreadable ({type(exc).__name__}: {exc})"
    return None


def availability() -> dict[str, Any]:
    """For run.json: whether the contention columns are recorded, and why not."""
    why = unavailable_reason()
    return {"available": why is None, "reason": why or "", "margin_cores": MARGIN_CORES,
            "steal_limit_pct": STEAL_LIMIT_PCT}


@dataclass
class Snapshot:
    wall: float
    system: SystemTimes
    own: int
    switches: int | None


@dataclass
class Probe:
    """Reads the counters at :meth:`start` and :meth:`stop` of a sampling window; :attr:`columns`
    then holds the window's figures (empty, with ``note``, where they cannot be read)."""

    proc: Proc = field(default_factory=Proc)
    pid: int = field(default_factory=os.getpid)
    clock: Callable[[], float] = time.monotonic
    ticks_per_s: int = field(default_factory=clock_ticks)
    switches: Callable[[], int | None] = involuntary_switches
    cores: Callable[[], int] = cores_available
    columns: dict[str, Any] = field(default_factory=lambda: empty_columns())
    note: str = ""
    _start: Snapshot | None = None

    def _snapshot(self) -> Snapshot:
        return Snapshot(self.clock(), self.proc.system(), self.proc.tree_ticks(self.pid), self.switches())

    def start(self) -> None:
        try:
            self._start = self._snapshot()
        except (OSError, ValueError) as exc:
            self._start, self.note = None, f"contention not measured ({type(exc).__name__}: {exc})"

    def stop(self) -> dict[str, Any]:
        if self._start is None:
            self.columns = empty_columns()
            return self.columns
        try:
            end = self._snapshot()
        except (OSError, ValueError) as exc:
            self.note = f"contention not measured ({type(exc).__name__}: {exc})"
            self.columns = empty_columns()
            return self.columns
        self.columns = window_columns(self._start, end, self.ticks_per_s, self.cores())
        return self.columns

    def __enter__(self) -> Probe:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def empty_columns() -> dict[str, Any]:
    return {"other_cpu_cores": float("nan"), "steal_pct": float("nan"), "involuntary_switches_per_s": float("nan"),
            "cpu_cores": None, "gpu_other_processes": None}


def window_columns(a: Snapshot, b: Snapshot, ticks_per_s: int, cores: int) -> dict[str, Any]:
    """The contention columns of the window from snapshot ``a`` to ``b``."""
    out = empty_columns()
    out["cpu_cores"] = int(cores)
    wall = b.wall - a.wall
    if wall <= 0:
        return out
    if (b.system.total - a.system.total) >= MIN_TICKS:
        others = max(0, (b.system.busy - a.system.busy) - (b.own - a.own))
        out["other_cpu_cores"] = min(float(cores_in(b.system.total - a.system.total, wall, ticks_per_s)),
                                     others / (wall * ticks_per_s))
        out["steal_pct"] = 100.0 * (b.system.steal - a.system.steal) / (b.system.total - a.system.total)
    if a.switches is not None and b.switches is not None:
        out["involuntary_switches_per_s"] = (b.switches - a.switches) / wall
    return out


def cores_in(total_ticks: int, wall: float, ticks_per_s: int) -> float:
    """How many cores the machine's total ticks over ``wall`` seconds amount to (its online CPUs)."""
    return total_ticks / (wall * ticks_per_s)


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def judge(row: Mapping[str, Any]) -> tuple[bool | None, str]:
    """(contended, why) from a round's contention columns and thread count: True when other processes
    took cores the worker's threads needed (``threads + other_cpu_cores > cpu_cores + MARGIN_CORES``),
    the hypervisor stole more than ``STEAL_LIMIT_PCT``, or another process used the GPU; None when
    nothing was measured."""
    others, steal, cores = _num(row.get("other_cpu_cores")), _num(row.get("steal_pct")), _num(row.get("cpu_cores"))
    gpu = _num(row.get("gpu_other_processes"))
    threads = _num(row.get("threads"))
    if not (others == others or steal == steal or gpu == gpu):
        return None, ""
    threads = threads if threads == threads and threads > 0 else (cores if cores == cores else 1.0)
    reasons = []
    if others == others and cores == cores and threads + others > cores + MARGIN_CORES:
        reasons.append(f"other processes used {others:.2f} of {cores:.0f} cores while this case ran on "
                       f"{threads:.0f} thread{'s' if threads != 1 else ''}")
    if steal == steal and steal > STEAL_LIMIT_PCT:
        reasons.append(f"the hypervisor stole {steal:.0f}% of the CPU time")
    if gpu == gpu and gpu > 0:
        reasons.append(f"{gpu:.0f} other process{'es' if gpu != 1 else ''} used the GPU")
    return bool(reasons), "; ".join(reasons)


def busiest(proc: Proc | None = None, seconds: float = 0.5, exclude: set[int] | None = None,
            sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
            ticks_per_s: int | None = None) -> tuple[float, list[tuple[int, str, float]]]:
    """Sample the machine for ``seconds``: (CPU cores other processes used, the busiest of them as
    (pid, name, % of one core), busiest first). ``exclude``: this process and its own (default: this
    process). Empty figures (0.0, []) where ``/proc`` cannot be read."""
    proc = proc or Proc()
    exclude = exclude if exclude is not None else {os.getpid()}
    hz = ticks_per_s or clock_ticks()
    try:
        t0, s0, p0 = clock(), proc.system(), proc.processes()
        sleep(seconds)
        t1, s1, p1 = clock(), proc.system(), proc.processes()
    except (OSError, ValueError):
        return 0.0, []
    wall = max(t1 - t0, 1e-9)
    used = []
    for pid, (name, ticks) in p1.items():
        if pid in exclude or pid not in p0:
            continue
        delta = ticks - p0[pid][1]
        if delta > 0:
            used.append((pid, name, 100.0 * delta / (wall * hz)))
    used.sort(key=lambda x: -x[2])
    others = sum(x[2] for x in used) / 100.0
    total_busy = (s1.busy - s0.busy) / (wall * hz)
    return min(others, max(total_busy, others)), used


def combine(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A case's contention columns from the rounds kept: each figure the largest of the rounds' (the
    worst the case saw), ``contended`` when any round was (:func:`judge`), with the reasons."""
    out: dict[str, Any] = {}
    for name in ("other_cpu_cores", "steal_pct", "involuntary_switches_per_s", "gpu_other_processes"):
        values = [_num(r.get(name)) for r in rounds]
        values = [v for v in values if v == v]
        out[name] = max(values) if values else (float("nan") if name != "gpu_other_processes" else None)
    if out["gpu_other_processes"] is not None:
        out["gpu_other_processes"] = int(out["gpu_other_processes"])
    cores = [int(_num(r.get("cpu_cores"))) for r in rounds if _num(r.get("cpu_cores")) == _num(r.get("cpu_cores"))]
    out["cpu_cores"] = min(cores) if cores else None
    # the judgement is monotone in each figure: the worst figures are contended iff some round was
    out["contended"], out["contention_note"] = judge({**out, "threads": rounds[0].get("threads") if rounds else None})
    return out
