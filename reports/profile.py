"""The report's "Where the time goes" section, for runs made with ``--profile``.

From the run's operator profile (``profile.parquet`` and ``profile.jsonl``, read through
:func:`harness.engine.store.read_profile`): per configuration, a stacked bar per profiled case
(variant and length) of its profiled call's self time split into the operator groups the profile
recorded (``group``, classified when it was written), with each case's exact operator table and a
link to its Chrome/Perfetto trace; and, for one case per variant (its largest length), the bytes
allocated over the call. :func:`profile_context` gives the template's context, or None when the
run has no profile, and the section is then left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from harness.engine import store
from reports.analysis import GROUP_KEYS, group_title
from reports.plots import to_svg

#: The groups in stacking order (harness.measure.profile.GROUPS; the report reads the stored names,
#: so a group it does not know is still drawn, after these).
GROUP_ORDER = ["matmul", "fused attention", "softmax/exp", "masking/where", "copies/gathers/cat", "reductions", "other"]
_GROUP_COLORS = dict(zip(GROUP_ORDER, ["#4e79a7", "#76b7b2", "#f28e2b", "#e15759", "#b07aa1", "#59a14f", "#bab0ac"]))
_EXTRA_COLORS = ["#edc948", "#ff9da7", "#9c755f", "#86bcb6"]
CUDA = "cuda_self_time_ms"


def _basis(ops: pd.DataFrame) -> str:
    """The time column a case's shares are of: CUDA self time where the case ran on CUDA."""
    return CUDA if CUDA in ops.columns and ops[CUDA].notna().any() else "self_time_ms"


def _group_colors(groups) -> dict[str, str]:
    extra = [g for g in sorted(set(groups)) if g not in _GROUP_COLORS]
    return {**_GROUP_COLORS, **{g: _EXTRA_COLORS[i % len(_EXTRA_COLORS)] for i, g in enumerate(extra)}}


def stacked_bars(cases: list[dict], title: str) -> str:
    """Horizontal stacked bars: one per case (``name``, ``groups``: group → ms), segments by group."""
    names = [c["name"] for c in cases]
    present = [g for g in GROUP_ORDER if any(c["groups"].get(g) for c in cases)]
    present += sorted({g for c in cases for g in c["groups"]} - set(GROUP_ORDER))
    colors = _group_colors(present)
    fig, ax = plt.subplots(figsize=(7.6, 0.9 + 0.32 * len(cases)))
    y = list(range(len(cases)))[::-1]
    left = [0.0] * len(cases)
    for g in present:
        widths = [c["groups"].get(g, 0.0) for c in cases]
        ax.barh(y, widths, left=left, color=colors[g], label=g, height=0.7, edgecolor="white", linewidth=0.4)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(y, names)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("self time of the profiled call, by operator group (ms)")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return to_svg(fig, title)


def memory_chart(timelines: list[dict], title: str) -> str:
    """Small multiples: bytes allocated over each call (``name``, ``t_ms``, ``bytes``, ``peak_bytes``)."""
    n = len(timelines)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 0.6, 2.1 * rows + 0.5), squeeze=False)
    for ax, t in zip(axes.flat, timelines):
        mib = [b / 2**20 for b in t["bytes"]]
        ax.step(t["t_ms"], mib, where="post", color="#4e79a7", linewidth=1)
        ax.fill_between(t["t_ms"], mib, step="post", alpha=0.15, color="#4e79a7")
        ax.axhline(t["peak_bytes"] / 2**20, color="#e15759", linewidth=0.8, linestyle=":")
        ax.set_title(f"{t['name']}\npeak {t['peak_bytes'] / 2**20:.2f} MiB", fontsize=8)
        ax.set_xlabel("ms since the call's first allocation", fontsize=8)
        ax.set_ylabel("allocated (MiB)", fontsize=8)
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=9.5, fontweight="bold")
    fig.tight_layout()
    return to_svg(fig, title)


def _case_entry(record: dict, row: dict, ops: pd.DataFrame) -> dict[str, Any]:
    basis = _basis(ops)
    ops = ops.sort_values(basis, ascending=False)
    return {
        "case_id": row["case_id"], "label": row["label"], "length": int(row["seq_len"]),
        "name": f"{row['label']} L={int(row['seq_len'])}", "trace": record.get("trace"),
        "total_ms": float(ops[basis].sum()), "timed_ms": row.get("time_ms"), "basis": basis,
        "profile_s": record.get("profile_s"),
        "groups": ops.groupby("group")[basis].sum().to_dict(),
        "ops": ops.to_dict("records"),
    }


def profile_context(run_dir: Path, rows: pd.DataFrame) -> dict[str, Any] | None:
    """The section's context for ``rows`` (the run's rows with their report ``label``), or None
    when the run has no profile."""
    profile = store.read_profile(run_dir)
    if profile is None:
        return None
    ops_of = {cid: ops for cid, ops in profile.table.groupby("case_id")}
    known = rows[rows["case_id"].isin(profile.cases.keys())]
    configs, firsts, errors = [], {}, []
    for key, group in known.groupby(GROUP_KEYS, sort=True, dropna=False):
        cases = []
        for row in group.sort_values(["label", "seq_len"]).to_dict("records"):
            record = profile.cases[row["case_id"]]
            if record.get("error") or row["case_id"] not in ops_of:
                errors.append({"name": f"{row['label']} L={int(row['seq_len'])}",
                               "error": record.get("error") or "no operators recorded"})
                continue
            entry = _case_entry(record, row, ops_of[row["case_id"]])
            cases.append(entry)
            memory = record.get("memory") or {}
            best = firsts.get(row["label"])
            if memory.get("t_ms") and (best is None or entry["length"] > best["length"]):
                firsts[row["label"]] = {"name": entry["name"], "length": entry["length"], **memory}
        if cases:
            title = f"Where the time goes · {group_title(key)}"
            configs.append({"title": group_title(key), "svg": stacked_bars(cases, title), "cases": cases})
    if not configs and not errors:
        return None
    timelines = [firsts[label] for label in sorted(firsts)]
    seconds = sorted(r["profile_s"] for r in profile.cases.values() if r.get("profile_s") is not None)
    return {
        "configs": configs,
        "memory_svg": memory_chart(timelines, "Memory over the profiled call, one case per variant (largest length)")
        if timelines else None,
        "errors": errors,
        "cases": len(profile.cases),
        "profile_s_median": seconds[len(seconds) // 2] if seconds else None,
        "profile_s_total": sum(seconds),
    }
