"""The report's inference sections: decoding against the cache length, and variable-length batches.

Both are left out unless the run has such rows:

* **Decode** (fixed-length rows with ``q_len`` set: fewer queries than keys): per configuration and batch
  size, the median time and the achieved K/V bandwidth against ``kv_len`` (the row's
  ``seq_len``), one line per variant and cache layout; a table at the longest cache with the
  bandwidth as a share of the measured copy bandwidth (``bench calibrate``) and tokens/s; and the
  time of each paged case over the fastest contiguous one of the same shape.
* **Variable-length batches** (configurations with rows whose ``lengths`` is not ``fixed``; their
  fixed rows are the no-padding points): time against the padding fraction of the batch
  (1 − real tokens / (batch · longest)), one line per variant,
  with the padded variant's useful-FLOP fraction and each variant's speed-up over ``padded``.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.core.cases import DEFAULTS, axis_names, is_missing
from harness.core.lengths import case_lengths
from harness.core.units import finite
from reports.plots import _style, plt, to_svg

#: What makes two decode rows one configuration (their lines share a chart): every case field but
#: these (a new field of harness.core.cases joins it by itself).
DECODE_KEYS = list(axis_names(exclude=("batch", "seq_len", "kv_layout", "page_size", "lengths")))
#: ... and two variable-length rows (x: the padding fraction of their lengths).
VARLEN_KEYS = list(axis_names(exclude=("kv_layout", "page_size", "lengths")))


def with_inference_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with every case field declared ``later`` (old runs lack them: their defaults)."""
    for name in axis_names(later=True):
        if name not in rows.columns:
            rows[name] = DEFAULTS[name]
    return rows


def shape_text(values: dict) -> str:
    """A row's (or a configuration's) case fields declared ``later`` in words, those not at their
    defaults (``q=1 · paged/16 · zipf lengths``), or ``""``."""
    parts = []
    for name in axis_names(later=True):
        v = values.get(name)
        if is_missing(v) or v == DEFAULTS[name] or name == "page_size":
            continue
        if name == "q_len":
            parts.append(f"q={int(v)}")
        elif name == "kv_layout":
            page = values.get("page_size")
            parts.append(f"{v}/{int(page)}" if finite(page) else str(v))
        elif name == "lengths":
            parts.append(f"{v} lengths")
        else:
            parts.append(f"{name}={v}")
    return " · ".join(parts)


def _series(row) -> str:
    return row["label"] + (f" paged/{int(row['page_size'])}" if row["kv_layout"] == "paged" else "")


def _title(keys: list[str], key: tuple, extra: str = "") -> str:
    d = dict(zip(keys, key))
    heads = f"H={d['heads']}" + (f"/{d['kv_heads']}" if d["kv_heads"] != d["heads"] else "")
    q = f"q_len={int(d['q_len'])}" if finite(d.get("q_len")) else "q_len=kv_len"
    return (f"{d['device']} · {d['dtype']} · {'causal' if d['causal'] else 'non-causal'} · {heads} "
            f"D={d['head_dim']} · {q}{extra}")


def _chart(group: pd.DataFrame, x: str, panels: list[tuple[str, str, float]], xlabel: str, title: str,
           styles: dict, logx: bool) -> str:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4))
    axes = [axes] if len(panels) == 1 else list(axes)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    handles = {}
    for ax, (col, ylabel, scale) in zip(axes, panels):
        for name, s in group.groupby("series", sort=True):
            s = s.sort_values(x)
            y = pd.to_numeric(s[col], errors="coerce") * scale
            if not (y > 0).any():
                continue
            st = _style(name.split(" paged/")[0], styles)
            st["linestyle"] = "--" if " paged/" in name else "-"
            (handles[name],) = ax.plot(s[x], y, ms=4, lw=1.4, **st)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.02),
                   ncol=min(3, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return to_svg(fig, title)


def _num(x) -> float | None:
    return float(x) if finite(x) else None


def decode_context(ok: pd.DataFrame, styles: dict) -> dict[str, Any] | None:
    rows = ok[ok["q_len"].map(finite) & (ok["lengths"].fillna("fixed") == "fixed")].copy()  # varlen: its own section
    if rows.empty:
        return None
    rows["series"] = [_series(r) for r in rows.to_dict("records")]
    panels = [("time_ms", "median time per call (ms)", 1.0), ("achieved_bandwidth", "K/V read (GB/s)", 1e-9)]
    charts, table = [], []
    for key, group in rows.groupby(DECODE_KEYS, sort=True, dropna=False):
        for batch, g in group.groupby("batch", sort=True):
            title = _title(DECODE_KEYS, key, f" · B={batch}")
            charts.append({"title": title, "svg": _chart(g, "seq_len", panels, "kv_len (tokens)", title, styles,
                                                          logx=True)})
            longest = g[g["seq_len"] == g["seq_len"].max()]
            for r in longest.sort_values("time_ms").to_dict("records"):
                table.append({"group": title, "series": r["series"], "kv_len": int(r["seq_len"]),
                              "time_ms": _num(r["time_ms"]), "gbs": _num(r.get("achieved_bandwidth", math.nan) / 1e9),
                              "pct": _num(r.get("pct_of_bandwidth")), "tokens": _num(r.get("tokens_per_s"))})
    return {"charts": charts, "table": table, "paged": _paged_ratios(rows)}


def _paged_ratios(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Each paged row's time over the fastest contiguous row of the same shape (any variant)."""
    keys = DECODE_KEYS + ["batch", "seq_len"]
    out = []
    for key, g in rows.groupby(keys, sort=True, dropna=False):
        flat = g[g["kv_layout"] != "paged"]
        if flat.empty:
            continue
        best = flat.loc[flat["time_ms"].idxmin()]
        for r in g[g["kv_layout"] == "paged"].sort_values("time_ms").to_dict("records"):
            out.append({"group": _title(DECODE_KEYS, key[:-2], f" · B={key[-2]} · kv_len={key[-1]}"),
                        "series": r["series"], "ratio": r["time_ms"] / best["time_ms"], "against": best["series"]})
    return out


def padding_fraction(row: dict) -> float:
    """1 − real key tokens / (batch · longest): the share of a padded batch that is padding."""
    _, kv = case_lengths(row)
    return 1.0 - sum(kv) / (len(kv) * int(row["seq_len"]))


def varlen_context(ok: pd.DataFrame, styles: dict) -> dict[str, Any] | None:
    """Configurations with variable-length rows, their fixed-length rows included (no padding)."""
    varied = ok["lengths"].fillna("fixed") != "fixed"
    if not varied.any():
        return None
    keys = pd.Series([repr(tuple(r)) for r in ok[VARLEN_KEYS].itertuples(index=False)], index=ok.index)
    rows = ok[keys.isin(set(keys[varied]))].copy()
    rows["series"] = [_series(r) for r in rows.to_dict("records")]
    rows["padding"] = [padding_fraction(r) for r in rows.to_dict("records")]
    charts, table = [], []
    for key, group in rows.groupby(VARLEN_KEYS, sort=True, dropna=False):
        d = dict(zip(VARLEN_KEYS, key))
        title = _title(VARLEN_KEYS, key, f" · B={d['batch']} · max {d['seq_len']}")
        charts.append({"title": title, "svg": _chart(group, "padding", [("time_ms", "median time per call (ms)", 1.0)],
                                                      "padding fraction of the batch", title, styles, logx=False)})
        for lengths, g in group.groupby("lengths", sort=True):
            padded = g.loc[g["variant"] == "padded", "time_ms"]
            base = float(padded.min()) if len(padded) else math.nan
            for r in g.sort_values("time_ms").to_dict("records"):
                table.append({"group": title, "lengths": lengths, "padding": r["padding"], "series": r["series"],
                              "time_ms": _num(r["time_ms"]), "useful": _num(r.get("useful_fraction")),
                              "speedup": _num(base / r["time_ms"]) if finite(base) else None})
    return {"charts": charts, "table": table}


def inference_context(rows: pd.DataFrame, styles: dict) -> dict[str, Any] | None:
    """The decode and variable-length sections of a run's rows (None when it has neither)."""
    ok = with_inference_columns(rows[rows["status"] == "ok"].copy())
    if ok.empty:
        return None
    decode, varlen = decode_context(ok, styles), varlen_context(ok, styles)
    if decode is None and varlen is None:
        return None
    return {"decode": decode, "varlen": varlen}
