"""The headline numbers of a run, in the terminal: what ``bench run`` prints at its end and ``bench show`` too.

One table per configuration (device, dtype, mode, causal, batch, heads, head_dim, inputs): a row
per variant, a column per sequence length, the median time in each cell (and the peak memory with
``verbose``). The fastest cell of each column is marked; a case that did not give a time shows its
status word (``skipped``, ``error``, ``oom``, ``incorrect`` …) instead; a time the run flags as
unstable (a ``stable`` column that is false) carries a mark, and an emulated row's time (``emulated``
true: not a speed result) is marked so and never the fastest.
"""

from __future__ import annotations

import sys

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.core import units as fmt
from harness.core.escape import rich as esc
from reports.analysis import GROUP_KEYS, group_title, with_labels

FASTEST = "★"
UNSTABLE = "~"
CONTENDED = "!"
EMULATED = "emulated"
NEEDED = ("status", "variant", "params", "seq_len", "time_ms")


def default_console() -> Console:
    """stdout; a fixed width when it is not a terminal (CI logs), so tables are not squeezed to 80."""
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _flag(row: dict, column: str, value: bool) -> bool:
    v = row.get(column)
    return v is not None and not pd.isna(v) and bool(v) is value


def _unstable(row: dict) -> bool:
    return _flag(row, "stable", False)


def _emulated(row: dict) -> bool:
    return _flag(row, "emulated", True)


def _cell(row: dict | None, fastest: bool, verbose: bool) -> str:
    if row is None:
        return "[dim]—[/]"
    status = str(row.get("status") or "ok")
    if status != "ok" or not fmt.finite(row.get("time_ms")):
        style = "yellow" if status == "skipped" else "bold red"
        return f"[{style}]{esc(status, limit=40)}[/]"
    text = fmt.duration_ms(row["time_ms"])
    if _flag(row, "contended", True):  # other processes took its cores: not this machine's time
        text += f" [red]{CONTENDED}[/]"
    elif _unstable(row):
        text += f" [yellow]{UNSTABLE}[/]"
    if _emulated(row):
        text += f" [dim]{EMULATED}[/]"
    if fastest:
        text = f"[bold green]{text} {FASTEST}[/]"
    if verbose and fmt.finite(row.get("peak_mem_bytes")):
        text += f"\n[dim]{fmt.size_bytes(row['peak_mem_bytes'])}[/]"
    return text


def headline_tables(rows: pd.DataFrame, verbose: bool = False,
                    suite_definition: dict | None = None) -> list[tuple[str, Table]]:
    """The tables :func:`print_headline` prints, one per configuration with its title, in a stable order."""
    if rows is None or rows.empty or not set(NEEDED) <= set(rows.columns):
        return []
    rows = with_labels(rows, suite_definition)
    keys = [k for k in GROUP_KEYS if k in rows.columns]
    tables = []
    for key, group in rows.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        full = dict(zip(GROUP_KEYS, [None] * len(GROUP_KEYS))) | dict(zip(keys, key))
        lengths = sorted(int(n) for n in group["seq_len"].dropna().unique())
        cells = {(r["label"], int(r["seq_len"])): r for r in group.to_dict("records")}
        best = {}
        for length in lengths:
            times = [r["time_ms"] for (_, n), r in cells.items()
                     if n == length and r.get("status") == "ok" and fmt.finite(r.get("time_ms")) and not _emulated(r)]
            if len(times) >= 2:
                best[length] = min(times)
        table = Table()
        table.add_column("variant", overflow="fold")
        for length in lengths:
            table.add_column(f"L={length:,}", justify="right")
        for label in sorted(group["label"].unique()):
            row_cells = []
            for length in lengths:
                r = cells.get((label, length))
                is_best = (r is not None and length in best and r.get("status") == "ok" and not _emulated(r)
                           and r.get("time_ms") == best[length])
                row_cells.append(_cell(r, is_best, verbose))
            table.add_row(esc(label), *row_cells)
        tables.append((esc(group_title(tuple(full[k] for k in GROUP_KEYS))), table))
    return tables


def print_headline(rows: pd.DataFrame, console: Console | None = None, verbose: bool = False,
                   suite_definition: dict | None = None) -> None:
    """Print the headline tables of ``rows`` (a run's results) to ``console`` (default: stdout)."""
    console = console or default_console()
    tables = headline_tables(rows, verbose=verbose, suite_definition=suite_definition)
    for title, table in tables:
        console.print(f"[bold]{title}[/]")
        console.print(table)
    if tables:
        legend = f"median time per call{', peak memory below it' if verbose else ''}; {FASTEST} fastest in its column"
        if "stable" in rows.columns:
            legend += f"; {UNSTABLE} unstable"
        if "contended" in rows.columns and rows["contended"].map(lambda v: _flag({"c": v}, "c", True)).any():
            legend += f"; {CONTENDED} contended: other processes took its cores (see contention_note)"
        if "emulated" in rows.columns and rows["emulated"].map(lambda v: _flag({"e": v}, "e", True)).any():
            legend += f"; {EMULATED}: time not a speed result, never fastest"
        console.print(f"[dim]{legend}; other cases by their status[/]")
