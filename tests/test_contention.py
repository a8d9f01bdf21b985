"""Contention figures from a fake /proc, and the judgement of a contended round."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.measure import contention
from harness.measure.contention import Probe, Proc, judge, parse_pid_stat, parse_stat


def stat_line(user=0, nice=0, system=0, idle=0, iowait=0, irq=0, softirq=0, steal=0) -> str:
    return f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} 0 0\ncpu0 1 2 3 4\nintr 5\n"


def pid_stat(pid: int, name: str, ppid: int, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    return f"{pid} ({name}) S {ppid} 1 1 0 -1 4194560 10 0 0 0 {utime} {stime} 0 0 20 0 3 0 100 1 1\n"


class FakeProc:
    """A /proc tree whose counters a test advances."""

    def __init__(self, root: Path):
        self.root = root
        (root / "self").mkdir(parents=True, exist_ok=True)

    def set(self, system: str, procs: dict[int, tuple[str, int, int, int]], children: dict[int, list[int]] = None):
        (self.root / "stat").write_text(system)
        for pid, (name, ppid, ut, st) in procs.items():
            d = self.root / str(pid) / "task" / str(pid)
            d.mkdir(parents=True, exist_ok=True)
            (self.root / str(pid) / "stat").write_text(pid_stat(pid, name, ppid, ut, st))
            (d / "children").write_text(" ".join(map(str, (children or {}).get(pid, []))))


def test_parsing_the_counters():
    times = parse_stat(stat_line(user=100, nice=5, system=20, idle=800, iowait=10, irq=1, softirq=2, steal=7))
    assert (times.busy, times.steal, times.total) == (128, 7, 128 + 800 + 10 + 7)
    assert parse_pid_stat(pid_stat(42, "python (worker) x", 7, 30, 12)) == (7, 42)  # a name with ") "
    with pytest.raises(ValueError):
        parse_stat("intr 1\n")


def test_a_window_counts_other_processes_steal_and_switches(tmp_path):
    fake = FakeProc(tmp_path)
    clock = iter([10.0, 12.0])  # a 2 s window
    switches = iter([100, 700])
    hz = 100
    # the worker (pid 50) and its child (pid 51, a rank process) use 1.5 cores; the machine's busy
    # ticks grow by 350 over 2 s: the others used 350 - 300 = 50 ticks = 0.25 core
    fake.set(stat_line(user=1000, idle=1000, steal=0), {50: ("python", 1, 10, 0), 51: ("python", 50, 0, 0),
                                                          60: ("chrome", 1, 0, 0)}, {50: [51]})
    probe = Probe(proc=Proc(tmp_path), pid=50, clock=lambda: next(clock), ticks_per_s=hz,
                  switches=lambda: next(switches), cores=lambda: 2)
    probe.start()
    fake.set(stat_line(user=1350, idle=1030, steal=20), {50: ("python", 1, 160, 50), 51: ("python", 50, 90, 10),
                                                           60: ("chrome", 1, 50, 0)}, {50: [51]})
    cols = probe.stop()
    assert cols["other_cpu_cores"] == pytest.approx(50 / (2 * hz))
    assert cols["steal_pct"] == pytest.approx(100 * 20 / (350 + 30 + 20))
    assert cols["involuntary_switches_per_s"] == pytest.approx(300.0)
    assert cols["cpu_cores"] == 2 and cols["gpu_other_processes"] is None


def test_no_proc_gives_empty_columns_and_a_reason(tmp_path):
    probe = Probe(proc=Proc(tmp_path / "missing"), pid=1, switches=lambda: None, cores=lambda: 2)
    with probe:
        pass
    assert math.isnan(probe.columns["other_cpu_cores"]) and "contention not measured" in probe.note
    assert contention.unavailable_reason(Proc(tmp_path / "missing")).startswith("/proc/stat unreadable")


@pytest.mark.parametrize("row, contended, words", [
    ({"other_cpu_cores": 0.05, "steal_pct": 0.0, "cpu_cores": 2, "threads": 2}, False, ""),
    ({"other_cpu_cores": 0.98, "steal_pct": 0.0, "cpu_cores": 2, "threads": 2}, True, "0.98 of 2 cores"),
    ({"other_cpu_cores": 0.98, "steal_pct": 0.0, "cpu_cores": 4, "threads": 2}, False, ""),  # spare cores
    ({"other_cpu_cores": 0.1, "steal_pct": 12.0, "cpu_cores": 2, "threads": 1}, True, "stole 12%"),
    ({"other_cpu_cores": 0.0, "steal_pct": 0.0, "cpu_cores": 1, "threads": 1, "gpu_other_processes": 1}, True,
     "1 other process used the GPU"),
    ({"other_cpu_cores": math.nan, "steal_pct": math.nan}, None, ""),
])
def test_judging_a_round(row, contended, words):
    got, why = judge(row)
    assert got is contended and words in why


def test_the_busiest_neighbour_is_named(tmp_path):
    fake = FakeProc(tmp_path)
    fake.set(stat_line(user=0, idle=0), {1: ("init", 0, 0, 0), 70: ("yes", 1, 0, 0), 80: ("bench", 1, 0, 0)})

    def later(_seconds):
        fake.set(stat_line(user=55, idle=45), {1: ("init", 0, 1, 0), 70: ("yes", 1, 48, 1), 80: ("bench", 1, 5, 0)})

    clock = iter([0.0, 0.5])
    used, top = contention.busiest(Proc(tmp_path), 0.5, exclude={80}, sleep=later, clock=lambda: next(clock),
                                   ticks_per_s=100)
    assert top[0] == (70, "yes", pytest.approx(98.0)) and used == pytest.approx(1.0)
