"""The report's "Parameter efficiency" section: whole attention layers (family ``layer``).

Left out unless the run has layer rows (``variant`` mha, gqa, mqa, mla, textbook … measured on hidden
states by ``harness.engine.layerrun``). For each model width and dtype (and device, mode, masking and
inputs when those vary) one table with a row per layer configuration (variant, its parameters and
its key/value heads):

* **parameters** (``param_count``, from the module), **KV-cache bytes per token** of one layer in the
  case dtype (``kv_cache_bytes_per_token``) and the **heads actually used** (``textbook`` with
  ``fixed = false`` is the unfixed form: one head of width ``d_model``, whatever ``heads`` says);
* **time per token** = ``time_ms / (batch · query tokens)``, prefill (queries = keys) and decode (fewer
  new tokens than cached ones, ``q_len``) apart, each at the longest context measured; only correct,
  non-emulated times (a fast wrong answer is not a speed result), an unstable one marked;
* the largest **peak memory** of its correct cases, its worst **rel. error**, and its **status**: a
  configuration with a wrong answer says so in the report's colour for wrong answers, with the reason.

Then **KV cache against context length**: the cache of a :data:`MODEL_DEPTH`-layer model built from
each configuration, ``bytes/token · L · depth``, against a :data:`MEMORY_BUDGET_BYTES` line, and how many
tokens of context fit in the budget for one layer and for the whole model
(``budget / (bytes_per_token · depth)``, one sequence).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from matplotlib.ticker import FuncFormatter

from harness.core.cases import HEAD_GEOMETRY, axis_names, decode_params
from harness.core.units import finite
from reports.fidelity import emulated, stability_note, unstable
from reports.plots import log_tick, palette, plt, to_svg

LAYER_FAMILY = "layer"
#: Layers of the model whose KV cache the chart and the fit table assume (a 7–8B-class decoder).
MODEL_DEPTH = 32
#: The memory budget line of the chart, and of the "tokens that fit" table.
MEMORY_BUDGET_BYTES = 16 * 2**30
#: One table row per value of these (``label``: the variant and its parameters, as elsewhere in the report).
CONFIG_KEYS = ["label", *HEAD_GEOMETRY]
#: One table (and one chart) per value of these (every case field but the geometry, batch and length);
#: the title names those that vary.
TABLE_KEYS = [*axis_names(exclude=("batch", "seq_len", *HEAD_GEOMETRY), later=False), "d_model", "machine"]
#: Status words in the order a configuration's status lists them (its worst first).
STATUS_RANK = ["incorrect", "crash", "cuda_error", "timeout", "oom", "error", "skipped", "ok"]


def param_text(n) -> str:
    """A parameter count with an SI-style suffix: 67_108_864 → '67.1 M', 1.2e9 → '1.2 B'."""
    if not finite(n):
        return ""
    n = float(n)
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}"
    return f"{n:.0f}"


def tokens_that_fit(bytes_per_token, depth: int = 1, budget: float = MEMORY_BUDGET_BYTES) -> int | None:
    """Tokens of context whose KV cache, over ``depth`` layers, fits in ``budget`` bytes (one sequence)."""
    if not finite(bytes_per_token) or float(bytes_per_token) <= 0:
        return None
    return int(budget // (float(bytes_per_token) * depth))


def _params(row: dict) -> dict:
    return decode_params(row.get("params"))


def heads_used(row: dict) -> tuple[int, int, str]:
    """(heads, width of each, note) the layer really attends with: ``textbook`` unfixed (``fixed`` false)
    attends with one head of width ``d_model``; every other layer with ``heads`` of ``head_dim``."""
    if row.get("variant") == "textbook" and _params(row).get("fixed") is False:
        return 1, int(row["d_model"]), "unfixed: one head of width d_model"
    return int(row["heads"]), int(row["head_dim"]), ""


def query_tokens(row: dict) -> int:
    """Query tokens per sequence: ``q_len`` where set (decode: the new tokens), else ``seq_len``."""
    return int(row["q_len"]) if finite(row.get("q_len")) else int(row["seq_len"])


def is_decode(row: dict) -> bool:
    """New tokens against a longer cache (``q_len < seq_len``), as opposed to prefill (queries = keys)."""
    return finite(row.get("q_len")) and int(row["q_len"]) < int(row["seq_len"])


def time_per_token_ms(row: dict) -> float:
    """``time_ms / (batch · query tokens)``: the layer's time for each token it processes."""
    return float(row["time_ms"]) / (int(row["batch"]) * query_tokens(row))


def _per_token(rows: list[dict], decode: bool) -> dict[str, Any] | None:
    """The phase's time per token at its longest context (then its largest batch), or None."""
    mine = [r for r in rows if is_decode(r) is decode and finite(r.get("time_ms")) and r["time_ms"] > 0]
    if not mine:
        return None
    r = max(mine, key=lambda r: (int(r["seq_len"]), int(r["batch"]), -float(r["time_ms"])))
    where = f"B={int(r['batch'])}" + (f", q={query_tokens(r)}" if decode else "") + f", L={int(r['seq_len']):,}"
    return {"ms": time_per_token_ms(r), "where": where, "unstable": stability_note(r) if r["is_unstable"] else ""}


def _constant(g: pd.DataFrame, col: str) -> float | None:
    if col not in g.columns:
        return None
    values = pd.to_numeric(g[col], errors="coerce").dropna()
    return float(values.iloc[0]) if len(values) else None


def _status(g: pd.DataFrame) -> dict[str, Any]:
    counts = g["status"].value_counts()
    order = sorted(counts.index, key=lambda s: STATUS_RANK.index(s) if s in STATUS_RANK else len(STATUS_RANK) - 1)
    worst = order[0]
    reasons = [x for x in g.loc[g["status"] == worst, "reason"] if isinstance(x, str) and x]
    return {"worst": worst, "text": ", ".join(f"{int(counts[s])} {s}" for s in order if s != "incorrect"),  # badge
            "reason": reasons[0] if reasons and worst != "ok" else "", "incorrect": int(counts.get("incorrect", 0))}


def _config(key: tuple, g: pd.DataFrame) -> dict[str, Any]:
    d = dict(zip(CONFIG_KEYS, key))
    first = g.iloc[0].to_dict()
    heads, width, note = heads_used(first)
    speed = g[(g["status"] == "ok") & ~g["is_emulated"]].to_dict("records")
    ok = g[g["status"] == "ok"]
    answered = g[g["status"].isin(["ok", "incorrect"])]
    errs = pd.to_numeric(answered["rel_err"], errors="coerce").dropna()
    bpt = _constant(g, "kv_cache_bytes_per_token")
    mem = pd.to_numeric(ok["peak_mem_bytes"], errors="coerce").dropna()
    return {
        "name": f"{d['label']} · kv_heads={int(d['kv_heads'])}", "label": d["label"], "kv_heads": int(d["kv_heads"]),
        "heads": heads, "width": width, "heads_note": note, "param_count": _constant(g, "param_count"),
        "params_text": param_text(_constant(g, "param_count")), "kv_bytes_per_token": bpt,
        "prefill": _per_token(speed, decode=False), "decode": _per_token(speed, decode=True),
        "peak_mem_bytes": float(mem.max()) if len(mem) else None, "rel_err": float(errs.max()) if len(errs) else None,
        "status": _status(g), "fit_layer": tokens_that_fit(bpt), "fit_model": tokens_that_fit(bpt, MODEL_DEPTH),
    }


def _title(key: tuple, varying: set[str]) -> str:
    d = dict(zip(TABLE_KEYS, key))
    parts = [f"d_model = {int(d['d_model'])}", str(d["dtype"])]
    parts += [str(d["device"])] if "device" in varying else []
    parts += [str(d["mode"])] if "mode" in varying else []
    parts += ["causal" if d["causal"] else "non-causal"] if "causal" in varying else []
    parts += [f"{d['inputs']} inputs"] if "inputs" in varying else []
    parts += [f"on {d['machine']}"] if d.get("machine") else []
    return " · ".join(parts)


def _tokens_tick(value: float, _pos=None) -> str:
    n = int(round(value))
    for suffix, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return f"{n}"


def kv_cache_chart(configs: list[dict], title: str, depth: int = MODEL_DEPTH,
                   budget: float = MEMORY_BUDGET_BYTES) -> str:
    """KV-cache bytes of a ``depth``-layer model against context length, one line per configuration,
    with the budget as a horizontal line and each line's crossing of it marked."""
    drawn = [c for c in configs if c["fit_model"]]
    styles = palette(c["name"] for c in drawn)
    longest = max(c["fit_model"] for c in drawn)
    hi = 2 ** min(26, max(17, math.ceil(math.log2(max(longest, 1))) + 1))
    xs = [2.0**p for p in range(10, int(math.log2(hi)) + 1)]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    ax.set_title(title)
    for c in drawn:
        st = styles[c["name"]]
        ax.plot(xs, [c["kv_bytes_per_token"] * depth * x / 2**30 for x in xs], color=st["color"], lw=1.5,
                label=f"{c['name']}: {c['kv_bytes_per_token'] / 2**10:.3g} KiB/token/layer")
        ax.scatter([c["fit_model"]], [budget / 2**30], color=st["color"], marker=st["marker"], s=36, zorder=4)
    ax.axhline(budget / 2**30, color="#b3261e", lw=1.2, ls="--", label=f"budget: {budget / 2**30:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens_tick))
    ax.yaxis.set_major_formatter(FuncFormatter(log_tick))
    ax.set_xlabel("context length (tokens, one sequence)")
    ax.set_ylabel(f"KV cache of {depth} layers (GiB)")
    ax.legend(loc="upper left", fontsize=7.5)
    fig.tight_layout()
    return to_svg(fig, title)


def layers_context(rows: pd.DataFrame) -> dict[str, Any] | None:
    """The section's context from a run's labelled rows (every status), or None without layer rows."""
    if "family" not in rows.columns or not (rows["family"] == LAYER_FAMILY).any():
        return None
    rows = rows[rows["family"] == LAYER_FAMILY].copy()
    for col in TABLE_KEYS + ["q_len"]:
        if col not in rows.columns:
            rows[col] = None
    missing = rows["d_model"].map(lambda x: not finite(x))
    rows.loc[missing, "d_model"] = rows.loc[missing, "heads"] * rows.loc[missing, "head_dim"]
    rows["is_unstable"], rows["is_emulated"] = unstable(rows), emulated(rows)
    varying = {k for k in TABLE_KEYS if rows[k].nunique(dropna=False) > 1}
    tables = []
    for key, group in rows.groupby(TABLE_KEYS, sort=True, dropna=False):
        title = _title(key, varying)
        configs = [_config(k, g) for k, g in group.groupby(CONFIG_KEYS, sort=True, dropna=False)]
        chart_title = f"KV cache of a {MODEL_DEPTH}-layer model against context · {title}"
        chart = kv_cache_chart(configs, chart_title) if any(c["fit_model"] for c in configs) else ""
        tables.append({"title": title, "configs": configs, "chart": chart,
                       "has_decode": any(c["decode"] for c in configs)})
    return {"tables": tables, "depth": MODEL_DEPTH, "budget_bytes": MEMORY_BUDGET_BYTES,
            "incorrect": int((rows["status"] == "incorrect").sum())}
