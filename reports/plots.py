"""Charts as inline SVG (matplotlib), so a report is one file that works offline."""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})

#: (column, axis label, scale factor) of the per-configuration scaling charts.
SCALING_METRICS = [
    ("time_ms", "median time per call (ms)", 1.0),
    ("tflops_per_s", "achieved GFLOP/s", 1e3),
    ("peak_mem_bytes", "peak memory beyond inputs (MiB)", 1 / 2**20),
]


def to_svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return re.sub(r'(<svg[^>]*?) width="[^"]*" height="[^"]*"', r'\1 class="chart"', svg, count=1)


def scaling_chart(group: pd.DataFrame, title: str, exponents: dict[str, tuple] | None = None) -> str:
    """Time, throughput and peak memory against sequence length, log-log, one line per series."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    fig.suptitle(title, fontsize=10)
    for ax, (col, label, scale) in zip(axes, SCALING_METRICS):
        for name, s in group.groupby("label", sort=True):
            s = s.sort_values("seq_len")
            y = s[col] * scale
            if y.notna().sum() == 0:
                continue
            legend = name
            if exponents and name in exponents and col != "tflops_per_s":
                t_exp, m_exp = exponents[name]
                e = t_exp if col == "time_ms" else m_exp
                if e is not None:
                    legend = f"{name}  ∝ L^{e:.2f}"
            if col == "time_ms":
                err = [(s["time_ms"] - s["time_ms_p10"]).clip(lower=0), (s["time_ms_p90"] - s["time_ms"]).clip(lower=0)]
                ax.errorbar(s["seq_len"], y, yerr=err, marker="o", ms=3, capsize=2, label=legend)
            else:
                ax.plot(s["seq_len"], y, marker="o", ms=3, label=legend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return to_svg(fig)
