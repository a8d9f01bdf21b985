"""Render a run directory into one self-contained ``report.html``.

Sections (each left out when the rows hold nothing for it, never drawn empty):

* header — suite, run, dates, machine, versions, the measurement environment (worker processes per
  case, allocator, threads, affinity, governor, variables), what was swept, status counts;
* wrong answers — every ``incorrect`` row with its reason, at the top (see :mod:`reports.fidelity`
  for what the speed views leave out: incorrect rows, unstable times, emulated rows);
* scaling — per configuration, time / throughput / memory against L (log-log) with each
  series' measured exponents, and the exponents as a table and a sentence;
* crossovers — for approximate and sparse/local variants, the length from which each beats
  the exact dense baseline in time and in memory;
* throughput — TFLOP/s per variant, % of measured peak and a roofline chart when the rows
  carry calibration columns (``pct_of_peak``, ``arith_intensity``);
* speed vs. accuracy — relative error against time for approximate variants, Pareto front;
* cost of features — each attention feature's time over its plain twin's (:mod:`reports.features`);
* best per workload — the fastest correct, stable variant per workload, its speed-up over the
  declared baseline, fast_p per variant (:mod:`reports.winners`);
* every row in a sortable, filterable table; problems grouped by reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core import schema
from harness.core import units as fmt
from harness.core.cases import axis_names
from harness.engine import store
from reports.analysis import (
    GROUP_KEYS,
    baseline_label,
    crossovers,
    exponent_statement,
    exponents,
    group_title,
    is_approximate,
    pareto_front,
    with_labels,
)
from reports.features import features_context
from reports.fidelity import emulated, measurement_items, speed_rows, stability_note, unstable
from reports.inference import inference_context
from reports.layers import layers_context
from reports.plots import palette, roofline_chart, scaling_chart, speed_accuracy_chart
from reports.profile import profile_context
from reports.templating import environment
from reports.winners import context as winners_context

STATUS_ORDER = ["ok", "incorrect", "skipped", "error", "crash", "cuda_error", "timeout", "oom"]
#: Problems are listed failures first (the ones that need a look), skips last; ``incorrect`` rows have
#: their own section at the top of the page.
PROBLEM_ORDER = ["crash", "cuda_error", "timeout", "oom", "error", "skipped"]

#: Columns the results table either shows in its own cells or leaves out: every declared column but
#: those the schema marks ``report_extra``, and the report's ``label``. Any other numeric column (the
#: ``report_extra`` ones, a variant's own such as ``density``) is shown after them when it holds numbers.
KNOWN_COLUMNS = {c.name for c in schema.COLUMNS if not c.report_extra} | {
    "label", "processes", "time_ms_process_min", "time_ms_process_max", "time_process_spread", "stable",
    "emulated", "is_unstable", "is_emulated"}
#: Unit suffixes of a column name, stripped from the header's name (``power_w`` → "power (W)"); the unit
#: of an undeclared column (a variant's) is taken from its suffix.
UNIT_SUFFIXES = {"_w": "W", "_j": "J", "_mhz": "MHz", "_c": "°C", "_pct": "%", "_bytes": "bytes", "_ms": "ms",
                 "_s": "s", "_gib": "GiB", "_mib": "MiB", "_gbs": "GB/s", "_gb_per_s": "GB/s"}


def _env():
    return environment({"pct": fmt.percent, "sortkey": _sort_key,
                        "spread": lambda x: fmt.percent(100 * x) if fmt.finite(x) else ""})


def _sort_key(x) -> str:
    """The ``data-sort`` value of a numeric cell: the raw number, or empty when missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(float(x)) if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) else ""


#: Columns of a configuration that may be constant in a run: shown in the header when they are,
#: and then left out of the results table.
AXIS_COLUMNS = list(axis_names(exclude=("seq_len",), later=False))
AXIS_NAMES = {"kv_heads": "kv heads", "head_dim": "head dim"}


def _swept(rows: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """What varied across the run (variants always listed) and what was the same for every row."""
    varied = [("variants", ", ".join(sorted(rows["label"].unique())))]
    fixed = []
    for col in AXIS_COLUMNS + ["seq_len"]:
        values = sorted(rows[col].dropna().unique(), key=lambda x: (isinstance(x, str), x))
        text = ", ".join(("causal" if v else "non-causal") if col == "causal" else f"{v}" for v in values)
        name = AXIS_NAMES.get(col, col.replace("_", " "))
        (varied if len(values) > 1 or col == "seq_len" else fixed).append((name, text))
    return {"varied": varied, "fixed": fixed}


def _extra_columns(rows: pd.DataFrame) -> list[dict[str, str]]:
    """Numeric columns the table has no place for (a variant's ``density``, telemetry …), with units."""
    extra = []
    for c in rows.columns:
        if c in KNOWN_COLUMNS:
            continue
        s = rows[c]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) and s.notna().any():
            base, stat = c, ""
            for tail in ("_max", "_min", "_mean"):
                if c.endswith(tail):
                    base, stat = c[: -len(tail)], tail[1:]
            name, unit = base, ""
            for suffix, u in sorted(UNIT_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
                if base.endswith(suffix) and len(base) > len(suffix):
                    name, unit = base[: -len(suffix)], u
                    break
            unit = schema.unit(c) if c in schema.BY_NAME else unit
            name = name.replace("_", " ") + (f" {stat}" if stat else "")
            extra.append({"column": c, "name": name, "unit": unit})
    return extra


def _present(rows: pd.DataFrame, col: str) -> bool:
    return col in rows.columns and pd.to_numeric(rows[col], errors="coerce").notna().any()


def _roofs(rows: pd.DataFrame) -> dict[str, dict]:
    """Measured ceilings per (device, dtype), from the rows' calibration columns (``bench calibrate``).

    Compute roof: the ``peak_tflops_per_s`` column if present, else ``tflops_per_s / (pct_of_peak / 100)``
    (the same for every row of one device and dtype). Memory roof: the ``peak_gb_per_s`` column
    (GB/s = 1e9 bytes/s), drawn where present.
    """
    roofs = {}
    for (device, dtype), g in rows.groupby(["device", "dtype"], sort=True):
        peak = None
        if _present(g, "peak_tflops_per_s"):
            peak = float(pd.to_numeric(g["peak_tflops_per_s"], errors="coerce").median())
        elif _present(g, "pct_of_peak"):
            pct = pd.to_numeric(g["pct_of_peak"], errors="coerce")
            derived = (g["tflops_per_s"] / (pct / 100)).replace([np.inf, -np.inf], np.nan).dropna()
            peak = float(derived.median()) if len(derived) else None
        bw = None
        if _present(g, "peak_gb_per_s"):
            bw = float(pd.to_numeric(g["peak_gb_per_s"], errors="coerce").median())
        if peak or bw:
            roofs[f"{device} {dtype}"] = {"peak_tflops": peak, "bandwidth_gbs": bw}
    return roofs


def _scaling(ok: pd.DataFrame, styles: dict) -> tuple[list[dict], list[dict]]:
    exps = exponents(ok) if not ok.empty else pd.DataFrame()
    charts = []
    for key, group in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        title = group_title(key)
        mine = exps[exps["group"] == title] if not exps.empty else pd.DataFrame()
        e = {r["label"]: (r["time_exp"], r["mem_exp"]) for r in mine.to_dict("records")}
        charts.append(
            {
                "title": title,
                "svg": scaling_chart(group, title, e, styles),
                "statement": exponent_statement(mine) if not mine.empty else "",
                "lengths": group["seq_len"].nunique(),
            }
        )
    records = exps.to_dict("records") if not exps.empty else []
    for r in records:
        for k in ("time_exp", "mem_exp"):
            if not fmt.finite(r[k]):
                r[k] = None
    return charts, records


def _throughput(ok: pd.DataFrame, meta: dict, styles: dict) -> dict[str, Any] | None:
    rated = ok[pd.to_numeric(ok["tflops_per_s"], errors="coerce") > 0]
    if rated.empty:
        return None
    has_pct = _present(rated, "pct_of_peak")
    table = []
    for key, group in rated.groupby(GROUP_KEYS, sort=True, dropna=False):
        for label, s in group.groupby("label", sort=True):
            s = s.sort_values("seq_len")
            last = s.iloc[-1]
            best = s.loc[s["tflops_per_s"].idxmax()]
            table.append(
                {
                    "group": group_title(key), "label": label, "length": int(last["seq_len"]),
                    "unstable": stability_note(last) if last["is_unstable"] else "",
                    "best_unstable": stability_note(best) if best["is_unstable"] else "",
                    "tflops": float(last["tflops_per_s"]),
                    "pct": float(last["pct_of_peak"]) if has_pct and fmt.finite(last.get("pct_of_peak")) else None,
                    "best_tflops": float(best["tflops_per_s"]), "best_length": int(best["seq_len"]),
                    "best_pct": float(best["pct_of_peak"]) if has_pct and fmt.finite(best.get("pct_of_peak")) else None,
                    "attainable": float(last["attainable_tflops_per_s"])
                    if fmt.finite(last.get("attainable_tflops_per_s")) else None,
                }
            )
    roofline = None
    if _present(rated, "arith_intensity"):
        pts = rated[pd.to_numeric(rated["arith_intensity"], errors="coerce") > 0].copy()
        pts["arith_intensity"] = pd.to_numeric(pts["arith_intensity"])
        roofs = _roofs(pts) if not pts.empty else {}
        if roofs:  # a roofline needs a measured roof (bench calibrate); intensities alone are not one
            title = "Roofline: every measured case against this machine's ceilings"
            roofline = {"svg": roofline_chart(pts, title, roofs, styles), "roofs": roofs, "title": title}
    return {"table": table, "has_pct": has_pct, "roofline": roofline,
            "has_attainable": _present(rated, "attainable_tflops_per_s")}


def _speed_accuracy(ok: pd.DataFrame, styles: dict) -> list[dict]:
    """Per configuration with approximate variants: error against time at each length.

    Emulated rows have no place on the time axis: they are listed with their error only
    (``accuracy_only``), never on the chart or the Pareto front.
    """
    charts = []
    for key, group in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        approx = group[[is_approximate(e) for e in group["exact"]]]
        approx = approx[pd.to_numeric(approx["rel_err"], errors="coerce") > 0]
        accuracy_only = approx[approx["is_emulated"]].sort_values(["seq_len", "label"])
        approx, group = approx[~approx["is_emulated"]], group[~group["is_emulated"]]
        if approx.empty and accuracy_only.empty:
            continue
        base, why = baseline_label(group) if not group.empty else (None, "")
        base_err = dict(zip(group.loc[group["label"] == base, "seq_len"], group.loc[group["label"] == base, "rel_err"]))
        pts = approx
        if base is not None and not approx.empty:
            b = group[(group["label"] == base) & (pd.to_numeric(group["rel_err"], errors="coerce") > 0)]
            pts = pd.concat([approx, b[b["seq_len"].isin(approx["seq_len"])]])
        pts = pts[(pts["time_ms"] > 0)]
        front = pd.Series(False, index=pts.index)
        rows = []
        for L, at in pts.groupby("seq_len", sort=True):
            front.loc[at.index] = pareto_front(at["time_ms"], at["rel_err"])
            for idx, r in at.sort_values("time_ms").iterrows():
                rows.append({"length": int(L), "label": r["label"], "time_ms": float(r["time_ms"]),
                             "rel_err": float(r["rel_err"]), "front": bool(front[idx]), "baseline": r["label"] == base,
                             "unstable": stability_note(r) if r["is_unstable"] else ""})
        title = f"Speed vs. accuracy · {group_title(key)}"
        charts.append(
            {"title": title, "svg": speed_accuracy_chart(pts, title, front, styles) if not pts.empty else "",
             "baseline": base, "baseline_reason": why, "rows": rows, "group": group_title(key),
             "accuracy_only": [{"length": int(r["seq_len"]), "label": r["label"], "rel_err": float(r["rel_err"]),
                                "max_abs_err": r.get("max_abs_err"), "baseline_rel_err": base_err.get(r["seq_len"])}
                               for r in accuracy_only.to_dict("records")]}
        )
    return charts


def _incorrect(rows: pd.DataFrame) -> list[dict]:
    """Every wrong answer: variant, configuration, length and the reason (where and how much)."""
    wrong = rows[rows["status"] == "incorrect"].sort_values(["label", *GROUP_KEYS, "seq_len"], kind="stable")
    return [{"label": r["label"], "group": group_title(tuple(r[k] for k in GROUP_KEYS)), "length": int(r["seq_len"]),
             "reason": r["reason"] if isinstance(r["reason"], str) and r["reason"] else "(no reason recorded)",
             "time_ms": r.get("time_ms")} for r in wrong.to_dict("records")]


def _problems(rows: pd.DataFrame) -> list[dict]:
    problems = rows[~rows["status"].isin(["ok", "incorrect"])]
    order = {s: i for i, s in enumerate(PROBLEM_ORDER)}
    groups = []
    for (status, reason), g in problems.groupby(["status", "reason"], sort=True, dropna=False):
        groups.append(
            {"status": status, "reason": reason if isinstance(reason, str) and reason else "(no reason recorded)",
             "cases": sorted(g["label"] + " · " + _case_brief(g))}
        )
    groups.sort(key=lambda p: (order.get(p["status"], len(order)), -len(p["cases"]), p["reason"]))
    return groups


def _table_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    cols = ["label", *axis_names(exclude=("seq_len",)), "seq_len"]
    return rows.sort_values([c for c in cols if c in rows.columns], kind="stable").to_dict("records")


def build_context(run_dir: Path) -> dict[str, Any]:
    meta = store.read_meta(run_dir)
    rows = with_labels(store.read_results(run_dir), (meta.get("suite") or {}).get("definition") or {})
    for col in ("family", "exact"):
        if col not in rows.columns:
            rows[col] = None
    rows["is_unstable"], rows["is_emulated"] = unstable(rows), emulated(rows)
    ok = rows[rows["status"] == "ok"]  # incorrect rows are not ok: in no speed view
    speed = speed_rows(ok)  # nor are emulated ones
    styles = palette(rows["label"])
    charts, exps = _scaling(speed, styles)
    cross = crossovers(speed) if not speed.empty else pd.DataFrame()
    counts = rows["status"].value_counts().to_dict()
    statuses = [(s, counts.get(s, 0)) for s in STATUS_ORDER if counts.get(s, 0)] + [
        (s, n) for s, n in counts.items() if s not in STATUS_ORDER
    ]
    env = meta.get("environment", {}) or {}
    table_has = {c: _present(rows, c) for c in ("first_call_ms", "grad_rel_err", "pct_of_peak", "arith_intensity",
                                                 "working_set_bytes", "flops", "time_ci_rel", "time_ms_process_min")}
    table_has["stable"] = "stable" in rows.columns and rows["stable"].notna().any()
    return {
        "meta": meta,
        "env": env,
        "suite_name": (meta.get("suite") or {}).get("name", "?"),
        "rows": _table_rows(rows),
        "statuses": statuses,
        "total": len(rows),
        "swept": _swept(rows),
        "charts": charts,
        "exponents": exps,
        "crossovers": cross.to_dict("records") if not cross.empty else [],
        "throughput": _throughput(speed, meta, styles),
        "speed_accuracy": _speed_accuracy(ok, styles) if not ok.empty else [],
        "problems": _problems(rows),
        "incorrect": _incorrect(rows),
        "unstable_count": int(rows["is_unstable"].sum()),
        "emulated_labels": sorted(set(ok.loc[ok["is_emulated"], "label"])),
        "measurement": measurement_items(env, meta, rows),
        "extra_columns": _extra_columns(rows),
        "show": {c: rows[c].nunique(dropna=False) > 1 for c in AXIS_COLUMNS},
        "table_has": table_has,
        "profile": profile_context(run_dir, rows),  # None unless the run was made with --profile
        "inference": inference_context(rows[~rows["is_emulated"]], styles),  # None unless decode or varlen rows
        "layers": layers_context(rows),  # None unless the run has attention-layer rows (family "layer")
        "features": features_context(rows),  # None unless the run has attention-feature rows with plain twins
        "winners": winners_context(rows),  # None unless some workload has a variant that may win
    }


def _case_brief(g: pd.DataFrame) -> pd.Series:
    return (
        g["device"].astype(str) + " " + g["dtype"].astype(str) + " " + g["mode"].astype(str)
        + " L=" + g["seq_len"].astype(str) + g["causal"].map({True: " causal", False: ""}).fillna("")
    )


def render_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for the run in ``run_dir`` (or to ``out``); returns its path."""
    run_dir = Path(run_dir)
    html = _env().get_template("report.html.j2").render(**build_context(run_dir))
    path = Path(out) if out else run_dir / store.REPORT
    return store.write_text(path, html)  # never through a symlink the run directory holds
