"""Render a run directory into one self-contained ``report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness import store
from reports import format as fmt
from reports.analysis import GROUP_KEYS, exponents, group_title, with_labels
from reports.plots import scaling_chart

TEMPLATES = Path(__file__).parent / "templates"
STATUS_ORDER = ["ok", "skipped", "error", "crash", "timeout", "oom"]


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters.update(ms=fmt.duration_ms, bytes=fmt.size_bytes, tflops=fmt.rate_tflops, err=fmt.error)
    return env


def _swept(rows: pd.DataFrame) -> list[tuple[str, str]]:
    out = []
    for col in ["variant", "params"] + GROUP_KEYS + ["seq_len"]:
        values = sorted(rows[col].dropna().astype(str).unique(), key=lambda x: (len(x), x))
        out.append((col, ", ".join(values)))
    return out


def _table_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    table = []
    for r in rows.sort_values(["label", "device", "dtype", "mode", "causal", "seq_len"]).to_dict("records"):
        table.append(r)
    return table


def build_context(run_dir: Path) -> dict[str, Any]:
    meta = store.read_meta(run_dir)
    rows = with_labels(store.read_results(run_dir))
    ok = rows[rows["status"] == "ok"]
    exps = exponents(ok) if not ok.empty else pd.DataFrame()
    charts = []
    for key, group in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        title = group_title(key)
        e = {}
        if not exps.empty:
            for r in exps[exps["group"] == title].to_dict("records"):
                e[r["label"]] = (r["time_exp"], r["mem_exp"])
        if group["seq_len"].nunique() >= 1:
            charts.append({"title": title, "svg": scaling_chart(group, title, e)})
    counts = rows["status"].value_counts().to_dict()
    statuses = [(s, counts.get(s, 0)) for s in STATUS_ORDER if counts.get(s, 0)] + [
        (s, n) for s, n in counts.items() if s not in STATUS_ORDER
    ]
    problems = rows[rows["status"] != "ok"]
    problem_groups = [
        {"status": status, "reason": reason, "cases": sorted(g["label"] + " · " + _case_brief(g))}
        for (status, reason), g in problems.groupby(["status", "reason"], sort=True)
    ]
    env = meta.get("environment", {})
    return {
        "meta": meta,
        "env": env,
        "rows": _table_rows(rows),
        "statuses": statuses,
        "total": len(rows),
        "swept": _swept(rows),
        "charts": charts,
        "exponents": exps.to_dict("records") if not exps.empty else [],
        "problems": problem_groups,
        "extra_columns": [c for c in ("density",) if c in rows.columns],
    }


def _case_brief(g: pd.DataFrame) -> pd.Series:
    return (
        g["device"] + " " + g["dtype"] + " " + g["mode"] + " L=" + g["seq_len"].astype(str)
        + g["causal"].map({True: " causal", False: ""})
    )


def render_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for the run in ``run_dir`` (or to ``out``); returns its path."""
    run_dir = Path(run_dir)
    html = _env().get_template("report.html.j2").render(**build_context(run_dir))
    path = Path(out) if out else run_dir / store.REPORT
    path.write_text(html, encoding="utf-8")
    return path
