"""A comparison as text: the terminal table, markdown (CI comments) and JSON.

The HTML page is :mod:`reports.compare`. Cases that did not change are left out of the
table and the markdown unless ``all_cases``.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
import pandas as pd

from harness.core import escape, units
from harness.core.units import finite
from harness.regression.compare import Comparison
from harness.regression.history import RunInfo
from harness.regression.verdicts import verdict_text

#: Rich styles of the verdicts in the terminal table.
VERDICT_STYLE = {
    "now failing": "bold red",
    "regressed": "red",
    "missing": "yellow",
    "new": "cyan",
    "now passing": "green",
    "inconclusive": "magenta",
    "improved": "green",
    "unchanged": "dim",
    "not compared": "dim",
}


def format_ratio_ci(r: dict[str, Any]) -> str:
    """``×1.300 [1.291, 1.309]``: a comparison row's time ratio with its interval ('' if none)."""
    ratio = r.get("time_ratio")
    if not finite(ratio):
        return ""
    text = f"×{ratio:.3f}"
    if finite(r.get("ci_low")) and finite(r.get("ci_high")):
        text += f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return text


def _ms(x) -> str:
    return units.duration_ms(float(x)) if finite(x) else ""


def _q(q) -> str:
    return f"{q:.2g}" if finite(q) else ""


def summary_line(comparison: Comparison) -> str:
    """``1 regressed, 2 inconclusive (1 contended), 3 unchanged``: the verdict counts, most severe first."""
    parts = []
    for v, n in comparison.counts.items():
        if not n:
            continue
        doubts = _doubts(comparison) if v == "inconclusive" else {}
        extra = ", ".join(f"{k} {d}" for d, k in doubts.items() if d != "interval" and k)
        parts.append(f"{n} {v}" + (f" ({extra})" if extra else ""))
    return ", ".join(parts) if parts else "no cases"


def _doubts(comparison: Comparison) -> dict[str, int]:
    """How many inconclusive cases were so for each reason (contended, unstable, interval)."""
    cases = comparison.cases
    if cases.empty or "doubt" not in cases:
        return {}
    return cases.loc[cases["verdict"] == "inconclusive", "doubt"].value_counts().to_dict()


def _verdict(r: dict[str, Any]) -> str:
    return verdict_text(str(r.get("verdict") or ""), str(r.get("doubt") or ""))


def _shown(comparison: Comparison, all_cases: bool) -> pd.DataFrame:
    cases = comparison.cases
    return cases if all_cases else cases[cases["verdict"] != "unchanged"]


# --------------------------------------------------------------------------------------------
# JSON


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _run(info: RunInfo) -> dict[str, Any]:
    return {"run_id": info.run_id, "path": str(info.path), "suite": info.suite, "started": info.started,
            "status": info.status, "commit": info.commit, "dirty": info.dirty, "fingerprint": info.fingerprint}


def to_dict(comparison: Comparison) -> dict[str, Any]:
    """Everything about the comparison as plain JSON values (NaN as None)."""
    return {
        "base": _run(comparison.base),
        "new": _run(comparison.new),
        "thresholds": comparison.thresholds.as_dict(),
        "warnings": list(comparison.warnings),
        "counts": comparison.counts,
        "regressed": comparison.has_regression,
        "confirm": comparison.confirm,
        "cases": [{k: _json_value(v) for k, v in rec.items()} for rec in comparison.cases.to_dict("records")],
    }


def to_json(comparison: Comparison) -> str:
    return json.dumps(to_dict(comparison), indent=2)


# --------------------------------------------------------------------------------------------
# markdown


def to_markdown(comparison: Comparison, all_cases: bool = False) -> str:
    """A markdown summary (for a pull request or a CI job's summary). Every text from the runs is
    escaped (:func:`harness.core.escape.markdown`): a name cannot add a heading, an image, a link or
    HTML, nor shift the table with a ``|``."""
    md = escape.markdown
    c, th = comparison.counts, comparison.thresholds
    base, new = comparison.base, comparison.new
    head = "❌ regressions" if comparison.has_regression else "✅ no regressions"
    lines = [
        f"### Attention Bench: {head}",
        "",
        f"{escape.markdown_code(base.run_id)} ({md(base.short_commit)}) → {escape.markdown_code(new.run_id)} "
        f"({md(new.short_commit)}) · " + ", ".join(f"**{n}** {md(v)}" for v, n in c.items() if n),
        "",
        f"Thresholds: time ±{th.time:.0%}, memory ±{th.memory:.0%}, FDR {th.alpha:g} (Benjamini–Hochberg).",
    ]
    for w in comparison.warnings:
        lines += ["", f"> ⚠️ {md(w)}"]
    if comparison.confirm:
        lines += ["", f"Confirmation: {md(comparison.confirm.get('message', ''))}"]
    shown = _shown(comparison, all_cases)
    doubtful = shown["verdict"] == "inconclusive" if not shown.empty else None
    for title, part in (("", shown[~doubtful] if doubtful is not None else shown),
                        ("Inconclusive: the measurement could not decide (interval across the threshold, "
                         "or a contended or unstable side); re-run with `--confirm`, or on a quieter machine",
                         shown[doubtful] if doubtful is not None else shown.iloc[0:0])):
        if part.empty:
            continue
        lines += [""] + ([f"**{md(title)}**", ""] if title else [])
        lines += ["| verdict | case | BASE | NEW | time ratio (95% CI) | q | memory | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in part.to_dict("records"):
            cells = (_verdict(r), r["label"], _ms(r["base_time_ms"]), _ms(r["new_time_ms"]), format_ratio_ci(r),
                     _q(r["q_value"]), units.change(r["mem_ratio"]), str(r["note"]))
            lines.append("| " + " | ".join(md(x) for x in cells) + " |")
    unchanged = c["unchanged"]
    if unchanged and not all_cases:
        lines += ["", f"{unchanged} case(s) unchanged."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# terminal


def console():
    """A rich console for tables: the terminal's width, or 200 columns when not a terminal."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def print_table(comparison: Comparison, all_cases: bool = False) -> None:
    """The comparison as a rich table on stdout, then a one-line verdict."""
    from rich.console import JustifyMethod
    from rich.table import Table

    th = comparison.thresholds
    out = console()
    esc = escape.rich  # every text from the runs: no markup, no control characters
    table = Table(
        title=esc(f"{comparison.base.run_id} → {comparison.new.run_id}"),
        caption=f"ratio = NEW/BASE median time with its {1 - th.alpha:.0%} interval; q = Benjamini–Hochberg adjusted "
                f"p-value; thresholds: time ±{th.time:.0%}, memory ±{th.memory:.0%}",
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("verdict", "left"), ("case", "left"), ("BASE", "right"), ("NEW", "right"), ("time ratio [CI]", "right"),
        ("q", "right"), ("memory", "right"), ("note", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")
    shown = _shown(comparison, all_cases)
    for r in shown.to_dict("records"):
        table.add_row(
            f"[{VERDICT_STYLE.get(r['verdict'], '')}]{esc(_verdict(r))}[/]", esc(r["label"]),
            *map(esc, (_ms(r.get("base_time_ms")), _ms(r.get("new_time_ms")), format_ratio_ci(r),
                       _q(r.get("q_value")), units.change(r.get("mem_ratio")), str(r.get("note") or ""))),
        )
    if len(shown):
        out.print(table)
    hidden = len(comparison.cases) - len(shown)
    tail = f" ({hidden} unchanged not listed; --all lists them)" if hidden else ""
    verdict = "[red]REGRESSED[/]" if comparison.has_regression else "[green]no regressions[/]"
    out.print(f"{verdict}: {esc(summary_line(comparison))}{tail}")
