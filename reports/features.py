"""The report's "Cost of features": each attention feature's time against the same case without it.

Left out unless the run has rows that set an attention feature (the case fields declared ``feature``:
softcap, ALiBi, sinks, v_head_dim, a sliding window, prefix-LM, documents; :mod:`harness.core.features`).
Each such row is paired with its **twin**: the row of the same variant and parameters, the same case
in every other field, with no feature set (``suites/features.toml`` sweeps each feature [off, on] so
that every case has one). For each pair:

* **× time**: the feature's median time over the twin's;
* **× FLOPs**: its FLOPs over the twin's (1 for score modifiers, which count nothing; below 1 for a
  window or documents, which attend fewer pairs), so a time ratio can be read against the work;
* **path**: whether the feature moved the variant off its fast path, read from what the variant
  records of the kernel it ran: every text column of the variant's own (not the schema's) that
  differs between the two rows, e.g. ``sdpa_backend_used: flash → math``.

Only correct, non-emulated ``ok`` rows are paired (a fast wrong answer is not a speed result); an
unstable time is marked. :func:`feature_cost` is the table, also for ``benchmarks/feature_cost.py``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.core import schema
from harness.core.cases import DEFAULTS, FEATURES, axis_names, is_missing
from harness.core.features import describe
from harness.core.units import finite
from reports.fidelity import emulated, stability_note, unstable

#: What must agree between a feature's row and its twin, besides the feature fields.
TWIN_KEYS = ["label", "machine", *axis_names(exclude=FEATURES)]
#: Columns that are never a path even when they hold text (the report's own).
NOT_PATHS = {"label", "machine", "params", "reason", "stability_note"}


def _value(v: Any) -> Any:
    """A cell as a hashable key part: missing cells are one value, numbers compare as numbers."""
    if is_missing(v):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _plain(row: dict) -> bool:
    """Whether the row sets no feature (an absent or empty cell is the default)."""
    return all(is_missing(row.get(n)) or row.get(n) == DEFAULTS[n] for n in FEATURES)


def _path_columns(rows: pd.DataFrame) -> list[str]:
    """The variants' own text columns (``sdpa_backend_used``): what they record of the kernel that ran."""
    return [c for c in rows.columns if c not in schema.BY_NAME and c not in NOT_PATHS
            and rows[c].map(lambda v: isinstance(v, str)).any()]


def _title(row: dict) -> str:
    heads = f"H={int(row['heads'])}" + (f"/{int(row['kv_heads'])}" if row["kv_heads"] != row["heads"] else "")
    q = row.get("q_len")
    length = f"L={int(row['seq_len'])}" if is_missing(q) else f"q={int(q)} kv={int(row['seq_len'])}"
    layout = f" · paged/{int(row['page_size'])}" if row.get("kv_layout") == "paged" else ""
    lengths = f" · {row['lengths']} lengths" if row.get("lengths") not in (None, "fixed") else ""
    machine = f" · on {row['machine']}" if row.get("machine") else ""
    return (f"{row['device']} · {row['dtype']} · {row['mode']} · {'causal' if row['causal'] else 'non-causal'} · "
            f"B={int(row['batch'])} {heads} D={int(row['head_dim'])} · {length}{layout}{lengths}{machine}")


def feature_cost(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per feature row that has its twin (see the module doc), ordered by configuration,
    variant and feature: group, label, feature, time_off, time_on, ratio, flops_ratio, path, unstable."""
    if rows.empty or not any(n in rows.columns for n in FEATURES):
        return []
    rows = rows.copy()
    for name in (*FEATURES, "machine"):
        if name not in rows.columns:
            rows[name] = DEFAULTS.get(name, "")
    ok = rows[(rows["status"] == "ok") & ~emulated(rows) & (pd.to_numeric(rows["time_ms"], errors="coerce") > 0)]
    shaky = unstable(ok)
    paths = _path_columns(ok)
    records = ok.to_dict("records")
    twins = {tuple(_value(r.get(k)) for k in TWIN_KEYS): (r, bool(s)) for r, s in zip(records, shaky) if _plain(r)}
    out = []
    for r, s in zip(records, shaky):
        if _plain(r):
            continue
        twin = twins.get(tuple(_value(r.get(k)) for k in TWIN_KEYS))
        if twin is None:
            continue
        base, base_shaky = twin
        moved = [f"{c}: {base.get(c)} → {r.get(c)}" for c in paths
                 if isinstance(r.get(c), str) and isinstance(base.get(c), str) and r.get(c) != base.get(c)]
        flops = [pd.to_numeric(x.get("flops"), errors="coerce") for x in (r, base)]
        notes = [stability_note(x) for x, flag in ((r, s), (base, base_shaky)) if flag]
        out.append({
            "group": _title(base), "label": r["label"], "feature": describe(r),
            "time_off": float(base["time_ms"]), "time_on": float(r["time_ms"]),
            "ratio": float(r["time_ms"]) / float(base["time_ms"]),
            "flops_ratio": float(flops[0] / flops[1]) if all(finite(f) and f > 0 for f in flops) else None,
            "path": "; ".join(moved), "unstable": "; ".join(notes),
        })
    return sorted(out, key=lambda x: (x["group"], x["label"], x["feature"]))


def features_context(rows: pd.DataFrame) -> dict[str, Any] | None:
    """The section's content, or None when the run has no feature row with its twin."""
    table = feature_cost(rows)
    if not table:
        return None
    featured = rows[[not _plain(r) for r in rows.to_dict("records")]] if any(
        n in rows.columns for n in FEATURES) else rows.iloc[:0]
    paired = len(table)
    return {"table": table, "unpaired": int((featured["status"] == "ok").sum()) - paired,
            "off_path": sum(1 for t in table if t["path"])}
