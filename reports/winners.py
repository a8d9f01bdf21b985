"""Best per workload: which variant to use for each shape a run measured, by how much, and fast_p.

A **workload** is a case without its variant: every case field (:func:`harness.core.cases.axis_names`;
a field added there joins it by itself), whether the rows are attention kernels or whole layers
(``level``: a layer's time includes its projections), and the machine when a run spans several.

* **Candidates** of a workload are its rows whose time is a trustworthy speed of a right answer:
  status ``ok`` (an exact variant within its dtype's tolerance; a wrong answer is ``incorrect``),
  an approximate variant only when its ``rel_err`` is also within the dtype's exact tolerance
  (:data:`harness.measure.reference.TOLERANCE`), not ``emulated``, not ``unstable`` (the worker
  processes agreed), and not of a family that attends a pattern the workload does not name (local,
  sparse: :data:`harness.core.registry.PATTERN_FAMILIES`).
* The **winner** is the candidate with the smallest median time (equal times: the first label in
  alphabetical order); its **ties** are the other candidates whose confidence interval of the median
  overlaps the winner's (the measurement cannot tell them apart); ``faster_unstable`` names the rows
  that were faster but unstable (re-measure them on a quieter machine before believing either).
* The **baseline** of a workload is the declared one, as the rows record it (``baseline`` column:
  ``register_variant(..., baseline=True)``: sdpa, and padded for variable-length batches), chosen among
  its ``ok``, non-emulated rows by the report's rule (:func:`reports.analysis.baseline_label`: sdpa's
  flash backend first; where no declared baseline ran, its name rules: an sdpa backend, else ``naive``,
  as for a model feature sdpa does not take); for layers, the layer that attends with the declared baseline kernel
  (``kernel = "sdpa"``). **Speed-up** = baseline time / winner time (1 when the baseline wins; none
  when no baseline ran).
* **fast_p** of a variant (KernelBench's metric, with "at least p× faster"): the share of the
  workloads where it ran (not skipped) and a baseline time exists in which it is a candidate and
  ``baseline time / its time >= p``; p = 1, 1.5, 2. An error, timeout, wrong, unstable or emulated row
  counts as not fast.

:func:`dispatch_table` is the same as JSON (``bench winners RUN --format json``), which
:mod:`harness.dispatch` loads to pick a variant for a shape.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from harness.core.cases import DEFAULTS, axis_names, decode_params, is_missing, json_value
from harness.core.cases import label as case_label
from harness.core.registry import PATTERN_FAMILIES
from reports.analysis import baseline_label
from reports.fidelity import emulated, unstable

#: The p of fast_p.
P_VALUES = (1.0, 1.5, 2.0)
#: What makes a workload besides the case fields: kernel or layer, and the machine (multi-machine runs).
EXTRA_KEYS = ("level", "machine")
#: Format name and version of the dispatch table (bench winners --format json).
DISPATCH_FORMAT, DISPATCH_VERSION = "attention-bench-dispatch", 1
#: The variant parameter that names a layer's attention kernel, and the kernel that is the baseline.
LAYER_KERNEL, BASELINE_KERNEL = "kernel", "sdpa"


def workload_keys() -> list[str]:
    return [*axis_names(), *EXTRA_KEYS]


def _prepared(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with ``label``, ``machine``, ``level`` and every case field (old runs: defaults)."""
    from reports.analysis import machine_labels, series_label

    rows = rows.copy()
    for name in axis_names():
        if name not in rows.columns:
            rows[name] = DEFAULTS[name]
    if "label" not in rows.columns:
        rows["label"] = [series_label(v, p) for v, p in zip(rows["variant"], rows["params"])]
    if "machine" not in rows.columns:
        rows["machine"] = machine_labels(rows)
    family = rows["family"] if "family" in rows.columns else pd.Series([None] * len(rows), index=rows.index)
    rows["level"] = ["layer" if f == "layer" else "kernel" for f in family]
    rows["is_unstable"], rows["is_emulated"] = unstable(rows), emulated(rows)
    rows["is_candidate"] = _candidates(rows)
    return rows


def _tolerance(dtype: str) -> float:
    from harness.measure.reference import TOLERANCE

    return TOLERANCE.get(dtype, TOLERANCE["float32"])[1]


def _exact(value) -> bool:
    return value is True or (not is_missing(value) and bool(value))


def _candidates(rows: pd.DataFrame) -> pd.Series:
    """Which rows may win: ok, correct (exact, or approximate within the dtype's exact tolerance), stable,
    not emulated, not a pattern family."""
    out = []
    for r in rows.to_dict("records"):
        ok = r.get("status") == "ok" and not r["is_unstable"] and not r["is_emulated"] \
            and r.get("family") not in PATTERN_FAMILIES and _finite(r.get("time_ms"))
        if ok and not _exact(r.get("exact")):
            err = r.get("rel_err")
            ok = _finite(err) and float(err) <= _tolerance(str(r.get("dtype")))
        out.append(bool(ok))
    return pd.Series(out, index=rows.index, dtype=bool)


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _baseline(group: pd.DataFrame) -> tuple[dict | None, str]:
    """The workload's baseline row (its ok, non-emulated rows) and why it was chosen, or (None, why none)."""
    usable = group[(group["status"] == "ok") & ~group["is_emulated"] & group["time_ms"].map(_finite)]
    if usable.empty:
        return None, "no baseline ran"
    if (usable["level"] == "layer").all():
        kernels = [decode_params(p).get(LAYER_KERNEL) for p in usable["params"]]
        chosen = usable[[k == BASELINE_KERNEL for k in kernels]]
        if chosen.empty:
            return None, f"no layer attending with {BASELINE_KERNEL} ran"
        row = chosen.sort_values("label").iloc[0].to_dict()
        return row, f"{row['label']} (the layer with the baseline kernel {BASELINE_KERNEL})"
    declared = usable[usable["baseline"].map(_exact)] if "baseline" in usable.columns else usable.iloc[0:0]
    pool = declared if not declared.empty else usable  # else the name rules over every row: sdpa, naive
    name, why = baseline_label(pool)
    if name is None:
        return None, why
    return pool[pool["label"] == name].iloc[0].to_dict(), why


def _label(values: dict) -> str:
    """The workload's label: the case label without the variant (``layer ·`` first for layers)."""
    text = case_label({**values, "variant": "", "params": "{}"})
    prefix = "layer · " if values.get("level") == "layer" else ""
    machine = f" · on {values['machine']}" if values.get("machine") else ""
    return prefix + text + machine


def _sort_key(values: dict) -> tuple:
    return tuple((0, "") if is_missing(values.get(k)) else (1, values.get(k)) if not isinstance(values.get(k), str)
                 else (2, values.get(k)) for k in ("level", *axis_names()))


def winners(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per workload with rows (see the module doc): the workload's fields and label, the winner
    (``label``, ``variant``, ``params``, ``time_ms``, ``ci_low``, ``ci_high``, ``stable``, ``rel_err``), its
    ``ties``, the ``baseline`` (label, time, why) and the ``speedup``; ``label`` None when no row of the
    workload is a candidate (``why`` says so)."""
    rows = _prepared(rows)
    keys = workload_keys()
    out = []
    for key, group in rows.groupby(keys, sort=False, dropna=False):
        values = {k: json_value(v) for k, v in zip(keys, key)}
        base, base_why = _baseline(group)
        record: dict[str, Any] = {"workload": values, "workload_label": _label(values),
                                  "rows": int(len(group)), "candidates": int(group["is_candidate"].sum()),
                                  "baseline": base["label"] if base else None,
                                  "baseline_time_ms": json_value(base["time_ms"]) if base else None,
                                  "baseline_stable": not bool(base["is_unstable"]) if base else None,
                                  "baseline_why": base_why}
        cands = group[group["is_candidate"]].sort_values(["time_ms", "label"], kind="stable")
        if cands.empty:
            record.update(label=None, why=_no_candidate(group))
            out.append(record)
            continue
        best = cands.iloc[0].to_dict()
        lo, hi = _interval(best)
        shaky = group[(group["status"] == "ok") & group["is_unstable"] & ~group["is_emulated"]
                      & (pd.to_numeric(group["time_ms"], errors="coerce") < float(best["time_ms"]))]
        ties = [r["label"] for r in cands.iloc[1:].to_dict("records") if _interval(r)[0] <= hi]
        record.update(
            label=best["label"], variant=best["variant"], params=decode_params(best["params"]),
            time_ms=json_value(best["time_ms"]), ci_low=lo, ci_high=hi, stable=True,
            rel_err=json_value(best.get("rel_err")), exact=_exact(best.get("exact")), ties=ties,
            runner_up=cands.iloc[1]["label"] if len(cands) > 1 else None,
            runner_up_time_ms=json_value(cands.iloc[1]["time_ms"]) if len(cands) > 1 else None,
            speedup=(float(base["time_ms"]) / float(best["time_ms"])) if base else None, why="",
            faster_unstable=[f"{r['label']} {json_value(r['time_ms']):.4g} ms" for r in
                             shaky.sort_values("time_ms").to_dict("records")])
        out.append(record)
    return sorted(out, key=lambda r: _sort_key(r["workload"]))


def _interval(r: dict) -> tuple[float, float]:
    """The row's confidence interval of the median (its median alone when none was recorded)."""
    t = float(r["time_ms"])
    lo, hi = r.get("time_ms_ci_low"), r.get("time_ms_ci_high")
    return (float(lo) if _finite(lo) else t), (float(hi) if _finite(hi) else t)


def _no_candidate(group: pd.DataFrame) -> str:
    counts = group["status"].value_counts().to_dict()
    ok = group[group["status"] == "ok"]
    parts = [f"{n} {s}" for s, n in counts.items() if s != "ok"]
    if len(ok):
        reasons = []
        if ok["is_unstable"].any():
            reasons.append(f"{int(ok['is_unstable'].sum())} unstable")
        if ok["is_emulated"].any():
            reasons.append(f"{int(ok['is_emulated'].sum())} emulated")
        rest = int(len(ok) - ok["is_unstable"].sum() - ok["is_emulated"].sum())
        if rest:
            reasons.append(f"{rest} approximate beyond tolerance or of a pattern family")
        parts.append(f"{len(ok)} ok but not candidates ({', '.join(reasons)})")
    return "no candidate: " + ", ".join(parts)


def fast_p(rows: pd.DataFrame, p_values: tuple[float, ...] = P_VALUES) -> list[dict[str, Any]]:
    """Per variant label: ``n`` (workloads it ran in that have a baseline time) and ``fast`` {p: share}."""
    rows = _prepared(rows)
    keys = workload_keys()
    tallies: dict[str, dict[str, Any]] = {}
    for _, group in rows.groupby(keys, sort=False, dropna=False):
        base, _ = _baseline(group)
        if base is None:
            continue
        t0 = float(base["time_ms"])
        for r in group[group["status"] != "skipped"].to_dict("records"):
            tally = tallies.setdefault(r["label"], {"label": r["label"], "variant": r["variant"], "n": 0,
                                                    "hits": {p: 0 for p in p_values}})
            tally["n"] += 1
            if r["is_candidate"]:
                for p in p_values:
                    tally["hits"][p] += t0 / float(r["time_ms"]) >= p * (1 - 1e-12)
    out = []
    for t in sorted(tallies.values(), key=lambda t: t["label"]):
        out.append({"label": t["label"], "variant": t["variant"], "n": t["n"],
                    "fast": {p: t["hits"][p] / t["n"] for p in p_values}})
    return out


def context(rows: pd.DataFrame) -> dict[str, Any] | None:
    """The report's "Best per workload" section (None when no workload has a row)."""
    if rows.empty:
        return None
    table = winners(rows)
    if not any(r["label"] for r in table):
        return None
    return {"winners": table, "fast_p": fast_p(rows), "p_values": list(P_VALUES)}


def dispatch_table(rows: pd.DataFrame, meta: dict | None = None) -> dict[str, Any]:
    """The winners as a dispatch table (:mod:`harness.dispatch` reads it): per workload with a winner,
    its fields, the variant and its parameters, and the evidence (time, interval, stable, rel_err,
    baseline and speed-up); fast_p per variant; the run it came from."""
    meta = meta or {}
    machine = ((meta.get("environment") or {}).get("machine") or {})
    entries = []
    for r in winners(rows):
        if not r["label"]:
            continue
        entries.append({"workload": r["workload"], "workload_label": r["workload_label"], "variant": r["variant"],
                        "params": r["params"], "label": r["label"],
                        "evidence": {"time_ms": r["time_ms"], "interval_ms": [r["ci_low"], r["ci_high"]],
                                     "stable": r["stable"], "rel_err": r["rel_err"], "ties": r["ties"],
                                     "baseline": r["baseline"], "baseline_time_ms": r["baseline_time_ms"],
                                     "speedup": r["speedup"]}})
    return {"format": DISPATCH_FORMAT, "version": DISPATCH_VERSION, "run_id": meta.get("run_id"),
            "suite": (meta.get("suite") or {}).get("name"),
            "machine": {"cpu": machine.get("cpu_model"), "gpu": (machine.get("gpu") or {}).get("name"),
                        "fingerprint": machine.get("fingerprint")},
            "rule": "exact match on every workload field; else, among entries equal in every field but batch, "
                    "seq_len and q_len, the nearest by the sum of |log2| ratios of those (harness.dispatch)",
            "entries": entries,
            "fast_p": [{"label": f["label"], "variant": f["variant"], "n": f["n"],
                        **{f"fast_{p:g}": f["fast"][p] for p in P_VALUES}} for f in fast_p(rows)]}


def table_text(rows: pd.DataFrame) -> str:
    """The winners and fast_p as plain text (``bench winners RUN``)."""
    from harness.core import units

    lines = []
    for r in winners(rows):
        if not r["label"]:
            lines.append(f"{r['workload_label']}: {r['why']}")
            continue
        speed = f"{r['speedup']:.2f}x over {r['baseline']}" if r["speedup"] else r["baseline_why"]
        speed += " (an unstable time)" if r["speedup"] and r["baseline_stable"] is False else ""
        ties = f"; within noise of {', '.join(r['ties'])}" if r["ties"] else ""
        ties += f"; faster but unstable: {', '.join(r['faster_unstable'])}" if r["faster_unstable"] else ""
        lines.append(f"{r['workload_label']}: {r['label']} {units.duration_ms(r['time_ms'])} "
                     f"[{units.duration_ms(r['ci_low'])}, {units.duration_ms(r['ci_high'])}], {speed}{ties}")
    fp = fast_p(rows)
    if fp:
        lines.append("")
        lines.append("fast_p (share of the workloads it ran with a baseline where it is correct, stable and "
                     "at least p x faster than the baseline):")
        for f in fp:
            shares = "  ".join(f"fast_{p:g} {100 * f['fast'][p]:.0f}%" for p in P_VALUES)
            lines.append(f"  {f['label']}: {shares}  (of {f['n']})")
    return "\n".join(lines)


def to_json(rows: pd.DataFrame, meta: dict | None = None) -> str:
    return json.dumps(dispatch_table(rows, meta), indent=2)
