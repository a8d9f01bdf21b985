"""HTML for regression tracking: ``compare.html`` (two runs) and ``trend.html`` (a history).

Both pages extend ``base.html.j2`` (styles, sortable tables, the row filter) and are
self-contained: charts are inline SVG drawn with matplotlib, nothing is loaded from
the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness.core import units as fmt  # noqa: E402
from reports.plots import to_svg  # noqa: E402
from reports.templating import environment  # noqa: E402

#: At most this many cases in the ratio chart (the most changed; the table lists all).
CHART_MAX_CASES = 60
VERDICT_COLORS = {
    "now failing": "#b3261e",
    "regressed": "#d93025",
    "missing": "#8a6d00",
    "new": "#1a73e8",
    "now passing": "#1f7a3a",
    "inconclusive": "#a15c00",
    "improved": "#1f9d55",
    "unchanged": "#7b8494",
    "not compared": "#b0b6c2",
}


def _env():
    return environment({"pct": fmt.change, "ratio": _ratio})


def _ratio(r) -> str:
    return f"×{float(r):.3f}" if fmt.finite(r) else ""


# ----------------------------------------------------------------------------------------------
# compare.html


def ratio_chart(cases: list[dict[str, Any]], time_threshold: float, memory_threshold: float) -> str:
    """Horizontal bars of NEW/BASE time ratio (with interval) and memory ratio, one row per case."""
    n = len(cases)
    height = 1.2 + 0.24 * n
    has_mem = any(fmt.finite(c.get("mem_ratio")) for c in cases)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 9, height), sharey=True,
                             gridspec_kw={"width_ratios": [3, 1]} if has_mem else None, squeeze=False)
    y = np.arange(n)[::-1]
    labels = [c["label"] for c in cases]
    colors = [VERDICT_COLORS.get(c["verdict"], "#7b8494") for c in cases]

    ax = axes[0][0]
    ratios = np.array([float(c["time_ratio"]) if fmt.finite(c.get("time_ratio")) else np.nan for c in cases])
    lo = np.array([float(c["ci_low"]) if fmt.finite(c.get("ci_low")) else np.nan for c in cases])
    hi = np.array([float(c["ci_high"]) if fmt.finite(c.get("ci_high")) else np.nan for c in cases])
    finite = ratios[np.isfinite(ratios)]
    span = 1 + 2 * time_threshold
    if len(finite):
        span = max(span, math.exp(float(np.max(np.abs(np.log(finite))))) * 1.15)
    ax.set_xscale("log")
    ax.set_xlim(1 / span, span)
    ax.axvspan(1 / (1 + time_threshold), 1 + time_threshold, color="#e8ebf0", zorder=0,
               label=f"±{time_threshold:.0%} threshold")
    ax.axvline(1.0, color="#1d2330", lw=0.8, zorder=1)
    ok = np.isfinite(ratios)
    ax.barh(y[ok], ratios[ok] - 1, left=1, height=0.6, color=[c for c, k in zip(colors, ok) if k], alpha=0.85, zorder=2)
    has_ci = ok & np.isfinite(lo) & np.isfinite(hi)
    if has_ci.any():
        err = np.vstack([ratios[has_ci] - np.clip(lo[has_ci], 1 / span, None),
                         np.clip(hi[has_ci], None, span) - ratios[has_ci]])
        ax.errorbar(ratios[has_ci], y[has_ci], xerr=np.clip(err, 0, None), fmt="none", ecolor="#1d2330", elinewidth=0.9,
                    capsize=2, zorder=3, label="confidence interval")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7.5)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("time ratio NEW / BASE (log scale; > 1 is slower)")
    ax.set_title("Median time ratio")
    ticks = _spread_ticks((0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2, 4), span)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.legend(loc="lower right", fontsize=7)

    if has_mem:
        mx = axes[0][1]
        mem = np.array([float(c["mem_ratio"]) if fmt.finite(c.get("mem_ratio")) else np.nan for c in cases])
        mfin = mem[np.isfinite(mem)]
        mspan = 1 + 2 * memory_threshold
        if len(mfin):
            mspan = max(mspan, math.exp(float(np.max(np.abs(np.log(mfin))))) * 1.15)
        mx.set_xscale("log")
        mx.set_xlim(1 / mspan, mspan)
        mx.axvspan(1 / (1 + memory_threshold), 1 + memory_threshold, color="#e8ebf0", zorder=0)
        mx.axvline(1.0, color="#1d2330", lw=0.8)
        mok = np.isfinite(mem)
        mx.barh(y[mok], mem[mok] - 1, left=1, height=0.6, color=[c for c, k in zip(colors, mok) if k], alpha=0.85)
        mx.set_xlabel("peak memory ratio NEW / BASE")
        mx.set_title("Peak memory ratio")
        mticks = _spread_ticks((0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2), mspan)
        mx.set_xticks(mticks)
        mx.set_xticklabels([f"{t:g}" for t in mticks])
        mx.minorticks_off()
    fig.tight_layout()
    return to_svg(fig)


def _spread_ticks(candidates, span: float) -> list[float]:
    """Ticks inside [1/span, span], 1 always, none closer than a tenth of the axis (log)."""
    gap = 2 * math.log(span) / 10
    inside = [t for t in candidates if 1 / span <= t <= span]
    kept = [1.0]
    for t in sorted(inside, key=lambda t: abs(math.log(t))):
        if all(abs(math.log(t) - math.log(k)) >= gap for k in kept):
            kept.append(t)
    return sorted(kept)


def _chart_cases(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The cases in the chart: every one with a time ratio, or the most changed CHART_MAX_CASES."""
    measured = [r for r in rows if fmt.finite(r.get("time_ratio"))]
    if len(measured) <= CHART_MAX_CASES:
        return measured, 0
    flagged = [r for r in measured if r["verdict"] != "unchanged"]
    rest = sorted((r for r in measured if r["verdict"] == "unchanged"), key=lambda r: -abs(math.log(r["time_ratio"])))
    chosen = (flagged + rest)[:CHART_MAX_CASES]
    ids = {r["case_id"] for r in chosen}
    return [r for r in measured if r["case_id"] in ids], len(measured) - len(chosen)


def compare_context(comparison) -> dict[str, Any]:
    rows = comparison.cases.to_dict("records")
    chart_rows, left_out = _chart_cases(rows)
    th = comparison.thresholds
    counts = [(v, n, v.replace(" ", "_")) for v, n in comparison.counts.items() if n]

    def side(info):
        env = info.meta.get("environment") or {}
        return {"info": info, "env": env, "machine": env.get("machine") or {}}

    return {
        "base": side(comparison.base),
        "new": side(comparison.new),
        "counts": counts,
        "total": len(rows),
        "regressed": comparison.has_regression,
        "warnings": comparison.warnings,
        "confirm": comparison.confirm,
        "thresholds": th,
        "chart": ratio_chart(chart_rows, th.time, th.memory) if chart_rows else "",
        "chart_left_out": left_out,
        "rows": rows,
        "environment": comparison.environment,
        "env_differences": sum(1 for e in comparison.environment if e["differs"]),
    }


def render_compare(comparison, out: str | Path) -> Path:
    """Write the comparison page to ``out``; returns its path."""
    from harness.engine.store import write_text

    html = _env().get_template("compare.html.j2").render(**compare_context(comparison))
    return write_text(Path(out), html)  # NEW/compare.html: never through a symlink the run directory holds


# ----------------------------------------------------------------------------------------------
# trend.html


def trend_chart(trend: dict[str, Any], runs_total: int) -> str:
    """One case's median time per run (p10–p90 band), with its change points marked."""
    pts = trend["points"]
    x = np.array([p["run_index"] for p in pts])
    t = np.array([p["time_ms"] for p in pts])
    p10 = np.array([p["time_ms_p10"] for p in pts])
    p90 = np.array([p["time_ms_p90"] for p in pts])
    fig, ax = plt.subplots(figsize=(11, 2.6))
    band = np.isfinite(p10) & np.isfinite(p90)
    if band.any():
        ax.fill_between(x[band], p10[band], p90[band], color="#9db4e8", alpha=0.35, lw=0, label="p10–p90 of samples")
    ax.plot(x, t, marker="o", ms=3, lw=1.2, color="#2754c5", label="median time")
    bounds = [0] + [s["index"] for s in trend["steps"]] + [len(pts)]
    for a, b in zip(bounds, bounds[1:]):
        level = float(np.median(t[a:b]))
        ax.hlines(level, x[a] - 0.3, x[b - 1] + 0.3, colors="#1d2330", lw=1, linestyles="-", alpha=0.6)
    for s in trend["steps"]:
        at = pts[s["index"]]["run_index"] - 0.5
        color = "#d93025" if s["ratio"] > 1 else "#1f9d55"
        ax.axvline(at, color=color, lw=1.2, ls="--")
        ax.annotate(f"{(s['ratio'] - 1) * 100:+.1f}% at {s['commit'] or s['run_id']}", (at, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(3, -10), textcoords="offset points",
                    fontsize=7.5, color=color, va="top")
    ax.set_xlim(-0.5, max(runs_total - 0.5, 0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("run (oldest → newest)")
    ax.set_ylabel("median time (ms)")
    ax.set_title(trend["label"])
    ax.legend(loc="upper left", fontsize=7, bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return to_svg(fig)


def render_trend(trends: list[dict[str, Any]], runs, suite: str, out: str | Path, min_step: float = 0.05) -> Path:
    """Write the trend page: per case its time series across ``runs`` with change points."""
    charts = [{"trend": t, "svg": trend_chart(t, len(runs))} for t in trends]
    steps = [
        {"label": t["label"], **s} for t in trends for s in t["steps"]
    ]
    steps.sort(key=lambda s: -abs(math.log(s["ratio"])))
    html = _env().get_template("trend.html.j2").render(
        suite=suite, runs=runs, charts=charts, steps=steps, min_step=min_step,
        first=runs[0] if runs else None, last=runs[-1] if runs else None,
    )
    from harness.core.safefs import write_text

    return write_text(Path(out), html)  # ROOT/trend.html: never through a symlink the results root holds
