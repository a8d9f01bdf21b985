"""Charts as inline SVG (matplotlib), so a report is one file that works offline.

Every chart has a title, axis labels with units and a legend. A series keeps its colour
in every chart of a report (:func:`palette`); exact variants are drawn with solid lines,
approximate ones dashed. A point whose timing the run flagged unstable (``stable`` false) is
drawn hollow with a red edge in every time-derived view, and its SVG group carries a ``<title>``
(the hover text) with the run's stability note.
"""

from __future__ import annotations

import io
import math
import re
import zlib
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

from harness.core.units import finite, rate_tflops  # noqa: E402
from reports.fidelity import stability_note, unstable  # noqa: E402

plt.rcParams.update(
    {
        "svg.fonttype": "none",  # text stays text: searchable, sharp when printed
        "svg.hashsalt": "attention-bench",  # stable element ids from run to run
        "font.size": 9,
        "font.family": ["DejaVu Sans", "sans-serif"],
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 9.5,
        "axes.titleweight": "bold",
        "legend.frameon": False,
        # labels come from run data (variant names, commits, hosts): never mathtext or TeX, so "$x$" or a
        # lone "$" is drawn as written and cannot make a chart fail (harness.core.escape.chart)
        "text.parse_math": False,
        "text.usetex": False,
    }
)

#: (column, panel title, axis label, scale factor) of the per-configuration scaling charts.
SCALING_METRICS = [
    ("time_ms", "Time per call", "median time per call (ms)", 1.0),
    ("tflops_per_s", "Throughput", "achieved GFLOP/s", 1e3),
    ("peak_mem_bytes", "Peak memory", "peak memory beyond inputs (MiB)", 1 / 2**20),
]

_COLORS = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors) + list(plt.get_cmap("Set1").colors)
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
#: Unstable points: hollow, red-edged (the report's "bad" colour).
UNSTABLE_EDGE = "#b3261e"
UNSTABLE_LEGEND = "unstable timing: processes disagree (hover for why)"
#: Scaling panels whose values come from the time (and so carry its instability).
TIME_DERIVED = {"time_ms", "tflops_per_s"}


def palette(labels: Iterable[str]) -> dict[str, dict]:
    """A fixed colour and marker per series label, in sorted order, for a whole report."""
    out = {}
    for i, label in enumerate(sorted(set(labels))):
        out[label] = {"color": _COLORS[i % len(_COLORS)], "marker": _MARKERS[i % len(_MARKERS)]}
    return out


def to_svg(fig, title: str | None = None) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    for gid, text in getattr(fig, "svg_titles", {}).items():
        svg = svg.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{_escape(text)}</title>')
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    attrs = ' class="chart" role="img"'
    width = re.search(r'<svg[^>]*? width="([0-9.]+)pt"', svg)
    if width:  # scale down with the page, never up beyond the drawn size (fonts stay as drawn)
        attrs += f' style="max-width: {float(width.group(1)) * 4 / 3:.0f}px"'
    if title:
        attrs += f' aria-label="{_escape(title)}"'
    # the replacement is a function: a title from run data (a backslash in a label) is never a template
    return re.sub(r'(<svg[^>]*?) width="[^"]*" height="[^"]*"', lambda m: m.group(1) + attrs, svg, count=1)


def _escape(text: str) -> str:
    from harness.core.escape import xml

    return xml(text).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def _style(label: str, styles: dict | None, exact: bool = True) -> dict:
    s = (styles or {}).get(label) or palette([label])[label]
    return {"color": s["color"], "marker": s["marker"], "linestyle": "-" if exact else "--"}


def _mark_unstable(ax, points: pd.DataFrame, xs, ys, key: str, marker: str = "o") -> None:
    """Draw unstable points hollow with a red edge, each in an SVG group titled with its stability note."""
    titles = getattr(ax.figure, "svg_titles", None)
    if titles is None:
        titles = ax.figure.svg_titles = {}
    for x, y, row in zip(xs, ys, points.to_dict("records")):
        note = f"{row.get('label', '')} at L={row.get('seq_len')}: unstable — {stability_note(row)}"
        gid = f"unstable-{zlib.crc32(f'{key}|{x!r}|{y!r}|{note}'.encode()):08x}"
        ax.scatter([x], [y], s=48, marker=marker, facecolors="white", edgecolors=UNSTABLE_EDGE, linewidths=1.5,
                   zorder=5, gid=gid)
        titles[gid] = note


def _unstable_handle():
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="o", ls="", ms=7, mfc="white", mec=UNSTABLE_EDGE, mew=1.5)


def _scatter(ax, points: pd.DataFrame, xcol: str, ycol: str, key: str, st: dict, scale: float = 1.0, **kw):
    """A series' points: the stable ones as ``kw`` says, the unstable ones hollow and red-edged.
    Returns the stable points' artist (for the legend) and whether any point was unstable."""
    shaky = unstable(points)
    steady = points[~shaky]
    h = ax.scatter(steady[xcol], steady[ycol] * scale, color=st["color"], marker=st["marker"], **kw)
    if shaky.any():
        _mark_unstable(ax, points[shaky], points.loc[shaky, xcol], points.loc[shaky, ycol] * scale, key, st["marker"])
    return h, bool(shaky.any())


def _log_length_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    ax._length_axis = True
    ticks = sorted({int(x) for x in lengths})
    if ticks and len(ticks) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: _short_int(int(round(v)))))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sequence length L (tokens)")


def _short_int(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def log_tick(value: float, _pos=None) -> str:
    """Plain-text tick labels for log axes ('0.5', '200', '10⁻⁴'), no mathtext (fast, selectable)."""
    if value <= 0 or not math.isfinite(value):
        return ""
    exp = math.floor(math.log10(value) + 1e-9)
    if -2 <= exp <= 4:
        return f"{value:g}"
    mant = value / 10**exp
    if abs(mant - 1) < 1e-6:
        return "10" + str(exp).translate(_SUPERSCRIPT)
    return f"{mant:g}×10" + str(exp).translate(_SUPERSCRIPT)


def _format_log_axis(axis, lo: float, hi: float) -> None:
    """Decades labelled; on an axis spanning under ~1.5 decades also 2× and 5× so it has labels."""
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(log_tick))
    if lo > 0 and hi / lo < 100:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(log_tick))
    else:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)) if hi / lo < 1e4 else NullLocator())
        axis.set_minor_formatter(NullFormatter())


def _finish_log_axes(ax) -> None:
    if ax.get_yscale() == "log":
        _format_log_axis(ax.yaxis, *ax.get_ylim())
    if ax.get_xscale() == "log" and not getattr(ax, "_length_axis", False):
        _format_log_axis(ax.xaxis, *ax.get_xlim())


def _log_y(ax) -> None:
    ax.set_yscale("log")


def _exactness(group: pd.DataFrame) -> dict[str, bool]:
    out = {}
    for label, exact in zip(group["label"], group.get("exact", pd.Series([True] * len(group), index=group.index))):
        out[label] = exact is True or (exact is not None and exact == exact and bool(exact))
    return out


def scaling_chart(
    group: pd.DataFrame, title: str, exponents: dict[str, tuple] | None = None, styles: dict | None = None
) -> str:
    """Time, throughput and peak memory against sequence length, log-log, one line per series.

    The legend (shared by the three panels) gives each series' measured time and memory exponents.
    """
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.5))
    fig.suptitle(title, fontsize=10, fontweight="bold")
    exact = _exactness(group)
    handles, names, any_unstable = [], [], False
    for ax, (col, panel, label, scale) in zip(axes, SCALING_METRICS):
        for name, s in group.groupby("label", sort=True):
            s = s.sort_values("seq_len")
            y = s[col] * scale
            if y.notna().sum() == 0 or (y.dropna() <= 0).all():
                continue
            st = _style(name, styles, exact.get(name, True))
            shaky = unstable(s).to_numpy() & (col in TIME_DERIVED)
            if shaky.any():  # the line goes through them; their markers are drawn apart
                st["markevery"] = [i for i, u in enumerate(shaky) if not u]
            if col == "time_ms":
                err = [
                    (s["time_ms"] - s["time_ms_p10"]).clip(lower=0).fillna(0),
                    (s["time_ms_p90"] - s["time_ms"]).clip(lower=0).fillna(0),
                ]
                h = ax.errorbar(s["seq_len"], y, yerr=err, ms=4, capsize=2, lw=1.4, **st)
            else:
                (h,) = ax.plot(s["seq_len"], y, ms=4, lw=1.4, **st)
            if shaky.any():
                _mark_unstable(ax, s[shaky], s["seq_len"][shaky], y[shaky], f"{title}|{name}|{col}")
                any_unstable = True
            if name not in names:
                names.append(name)
                handles.append(h)
        _log_length_axis(ax, group["seq_len"].unique())
        _log_y(ax)
        ax.set_ylabel(label)
        ax.set_title(panel)
        _finish_log_axes(ax)
    legend = []
    for name in names:
        text = name
        if exponents and name in exponents:
            t, m = exponents[name]
            bits = []
            if finite(t):
                bits.append(f"time ∝ L^{t:.2f}")
            if finite(m):
                bits.append(f"memory ∝ L^{m:.2f}")
            if bits:
                text += "  (" + ", ".join(bits) + ")"
        legend.append(text)
    if any_unstable:
        handles.append(_unstable_handle())
        legend.append(UNSTABLE_LEGEND)
    if handles:
        longest = max(len(t) for t in legend)
        ncol = 1 if longest > 90 else 2 if longest > 60 else 3
        fig.legend(handles, legend, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(ncol, len(handles)),
                   fontsize=8, handlelength=2.6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return to_svg(fig, title)


def speed_accuracy_chart(
    group: pd.DataFrame, title: str, front: pd.Series, styles: dict | None = None, cols: int = 4
) -> str:
    """Relative error against time, one panel per sequence length; the Pareto front joined and ringed.

    ``group`` holds the points (approximate variants and the exact baseline); ``front`` is a
    boolean Series on the same index marking Pareto-optimal points within each length.
    """
    lengths = sorted(group["seq_len"].unique())
    ncols = min(cols, len(lengths))
    nrows = math.ceil(len(lengths) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 0.4, 2.8 * nrows + 0.5), squeeze=False)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    exact = _exactness(group)
    handles: dict[str, object] = {}
    any_unstable = False
    for ax, L in zip(axes.flat, lengths):
        pts = group[group["seq_len"] == L]
        for name, s in pts.groupby("label", sort=True):
            st = _style(name, styles, exact.get(name, True))
            h, shaky = _scatter(ax, s, "time_ms", "rel_err", f"{title}|{name}|{L}", st, s=30, zorder=3,
                                edgecolors="black" if exact.get(name, True) else "none", linewidths=0.6)
            any_unstable |= shaky
            handles.setdefault(name, h)
        on = pts[front.loc[pts.index]].sort_values("time_ms")
        if len(on):
            ax.plot(on["time_ms"], on["rel_err"], color="black", lw=1, ls=":", zorder=2)
            ax.scatter(on["time_ms"], on["rel_err"], s=110, facecolors="none", edgecolors="black", lw=1.1, zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"L = {L:,}")
        ax.set_xlabel("median time per call (ms)")
        ax.set_ylabel("relative error (‖out−ref‖/‖ref‖)")
        _pad_log_limits(ax, pts["time_ms"], pts["rel_err"])
        _finish_log_axes(ax)
    for ax in list(axes.flat)[len(lengths):]:
        fig.delaxes(ax)
    from matplotlib.lines import Line2D

    ring = Line2D([], [], marker="o", ms=10, mfc="none", mec="black", ls=":", color="black")
    names = list(handles)
    labels = [n + ("  (exact baseline)" if exact.get(n, True) else "") for n in names]
    extra = [(ring, "Pareto front (faster or more accurate than all others)")]
    if any_unstable:
        extra.append((_unstable_handle(), UNSTABLE_LEGEND))
    fig.legend([handles[n] for n in names] + [h for h, _ in extra], labels + [t for _, t in extra],
               loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(3, len(names) + 1), fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return to_svg(fig, title)


def _pad_log_limits(ax, xs, ys) -> None:
    """Keep single points or tight clusters readable on log axes (a decade around them at least)."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        v = np.asarray([x for x in values if x == x and x > 0], dtype=float)
        if v.size == 0:
            continue
        lo, hi = v.min(), v.max()
        if hi / lo < 10:
            mid = math.sqrt(lo * hi)
            lo, hi = min(lo, mid / 3.5), max(hi, mid * 3.5)
        if hi / lo > 60:  # several decades: whole decades, so both ends carry a label
            lo, hi = 10 ** math.floor(math.log10(lo / 1.15)), 10 ** math.ceil(math.log10(hi * 1.15))
        else:
            lo, hi = lo / 1.6, hi * 1.6
        setter(lo, hi)


def roofline_chart(
    rows: pd.DataFrame, title: str, roofs: dict[str, dict], styles: dict | None = None
) -> str:
    """Achieved TFLOP/s against arithmetic intensity (FLOP/byte), log-log, with the measured roofs.

    ``roofs`` maps a roof name (e.g. ``cpu float32``) to ``{"peak_tflops": p, "bandwidth_gbs": b}``
    (either may be None): a horizontal compute roof at ``p`` and, where the bandwidth is known, the
    memory roof ``b·I`` up to the ridge point.
    """
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    ax.set_title(title)
    exact = _exactness(rows)
    peaks = [r.get("peak_tflops") or 0 for r in roofs.values()]
    # GFLOP/s when everything (points and roofs) is below 1 TFLOP/s, as on most CPUs
    unit, scale = ("TFLOP/s", 1.0) if max([rows["tflops_per_s"].max()] + peaks) >= 1 else ("GFLOP/s", 1e3)
    any_unstable = False
    for name, s in rows.groupby("label", sort=True):
        st = _style(name, styles, exact.get(name, True))
        _, shaky = _scatter(ax, s, "arith_intensity", "tflops_per_s", f"{title}|{name}", st, scale, s=26,
                            label=name, zorder=3, alpha=0.9)
        any_unstable |= shaky
    if any_unstable:
        ax.plot([], [], marker="o", ls="", ms=7, mfc="white", mec=UNSTABLE_EDGE, mew=1.5, label=UNSTABLE_LEGEND)
    xs = rows["arith_intensity"][rows["arith_intensity"] > 0]
    lo, hi = xs.min() / 4, xs.max() * 4
    roof_colors = plt.get_cmap("Greys")(np.linspace(0.5, 0.9, max(1, len(roofs))))
    for (name, roof), color in zip(sorted(roofs.items()), roof_colors):
        peak, bw = roof.get("peak_tflops"), roof.get("bandwidth_gbs")
        if peak and bw:
            ridge = peak * 1e12 / (bw * 1e9)
            lo, hi = min(lo, ridge / 8), max(hi, ridge * 8)
            x = np.geomspace(lo, hi, 200)
            ax.plot(x, np.minimum(peak, bw * 1e9 * x / 1e12) * scale, color=color, lw=1.6, zorder=2,
                    label=f"roof {name}: {rate_tflops(peak)}, {bw:,.0f} GB/s")
        elif peak:
            ax.axhline(peak * scale, color=color, lw=1.6, zorder=2, label=f"compute roof {name}: {rate_tflops(peak)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    _finish_log_axes(ax)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel(f"achieved {unit}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7.5)
    fig.tight_layout()
    return to_svg(fig, title)
