"""Progress while a suite runs: a rich bar on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _summary(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        parts = [f"{row['time_ms']:.3f} ms", f"{row['tflops_per_s'] * 1e3:.1f} GFLOP/s"]
        if row.get("peak_mem_bytes") == row.get("peak_mem_bytes"):
            parts.append(f"{row['peak_mem_bytes'] / 2**20:.1f} MiB")
        if row.get("rel_err") == row.get("rel_err"):
            parts.append(f"rel_err {row['rel_err']:.2e}")
        return "ok  " + ", ".join(parts)
    return f"{row['status']}: {row['reason']}"


class PlainProgress:
    """One line per finished case (``--verbose``) or per 10%; nothing in between."""

    def __init__(self, total: int, verbose: bool = False, stream=None):
        self.total, self.verbose, self.done = total, verbose, 0
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self, case) -> None:
        pass

    def finish(self, case, row) -> None:
        self.done += 1
        step = max(1, self.total // 10)
        if self.verbose or self.done % step == 0 or self.done == self.total:
            elapsed = time.monotonic() - self.t0
            print(f"[{self.done}/{self.total} {elapsed:6.1f}s] {case.label()}: {_summary(row)}", file=self.stream, flush=True)


class RichProgress:
    """A bar with case count, the current case, elapsed time and ETA."""

    def __init__(self, total: int, verbose: bool = False):
        self.verbose = verbose
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.bar.add_task("starting", total=total)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, case) -> None:
        self.bar.update(self.task, description=case.label())

    def finish(self, case, row) -> None:
        if self.verbose:
            self.console.print(f"{case.label()}: {_summary(row)}", highlight=False)
        self.bar.advance(self.task)


def make_progress(total: int, verbose: bool = False, quiet: bool = False):
    if quiet or not sys.stderr.isatty():
        return PlainProgress(total, verbose=verbose and not quiet) if not quiet else PlainProgress(total, stream=_Null())
    return RichProgress(total, verbose=verbose)


class _Null:
    def write(self, *_):
        pass

    def flush(self):
        pass
