"""Comparing two runs case by case: pairing, ratios, intervals, significance, verdicts.

Pairing. Cases are paired by ``case_id``, the stable hash of everything that
defines a measurement (variant, its parameters, device, dtype, mode, shape,
causal, inputs; :class:`harness.core.cases.Case`). A case in only one run is ``new``
or ``missing``. When either run spans several machines (rows' ``machine_fingerprint``: merged
shards, the Ray executor), a case measured ok on two different machines is ``not compared``:
timings are paired only on one machine.

Time. For a case measured in both runs the point estimate is the ratio of the
medians of the raw samples (``NEW / BASE``; > 1 is slower). Its confidence
interval and p-value come from the Mann–Whitney U test on the log samples:
the p-value is the two-sided test of "same distribution", and the interval is
the Hodges–Lehmann/Moses interval for a multiplicative shift (the order
statistics of all pairwise ratios ``new_j / base_i`` that the U distribution
puts at the ``alpha/2`` and ``1 - alpha/2`` points; :func:`harness.core.stats.time_test`).
Why this rather than a bootstrap of the medians: it is exact for the small
sample counts a benchmark often has (a percentile bootstrap of a median with
5–10 samples has poor and unknown coverage); it needs no random resampling (so
it is reproducible with no seed to fix); and the interval and the test are the
same procedure, so a case is significant at ``alpha`` exactly when its interval
excludes 1 — the verdict never contradicts the interval shown beside it.

Many cases. With hundreds of cases, per-case significance at 5% guarantees
false alarms, so the p-values of all the comparison's time tests are adjusted
together with Benjamini–Hochberg (:func:`harness.core.stats.bh_adjust`),
controlling the expected share of false discoveries at ``alpha``.

Verdicts and thresholds: :mod:`harness.regression.verdicts` (the one rule, also
used by ``--confirm``). Differences of the runs' environments:
:mod:`harness.regression.envdiff`. Terminal, markdown and JSON output:
:mod:`harness.regression.output`; HTML: :mod:`reports.compare`.

Confirmation (``--confirm``, :mod:`harness.regression.confirm`): a case whose time verdict is
``regressed`` or ``improved`` is measured again on the spot, BASE's code and
NEW's interleaved, and keeps its verdict only if the re-run shows it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core import schema
from harness.core.cases import label as case_label
from harness.core.stats import bh_adjust, time_test
from harness.core.units import finite
from harness.engine import store
from harness.regression.envdiff import comparison_warnings, environment_table
from harness.regression.history import RunInfo, run_info
from harness.regression.verdicts import (
    SEVERITY,
    VERDICTS,
    CompareError,
    Thresholds,
    _flag,
    accuracy_problems,
    decide,
    resolve_thresholds,
)

#: What a comparison row says of its case, from the case's rows (:data:`harness.core.schema.IDENTITY`):
#: the variant, its parameters and exactness, then the case's axes in schema order.
DESCRIPTION = ("variant", "params", "exact")
AXES = tuple(c for c in schema.IDENTITY if c not in ("case_id", "family", *DESCRIPTION))
#: The columns of an empty comparison.
COLUMNS = ("case_id", "label", "verdict", "doubt", "time_verdict", "memory_verdict", "accuracy_verdict", "note",
           "time_ratio", "ci_low", "ci_high", "p_value", "q_value", "mem_ratio")


def _status(row: dict[str, Any] | None) -> str | None:
    return None if row is None else str(row.get("status") or "ok")


def _samples_by_case(samples: pd.DataFrame | None) -> dict[str, np.ndarray]:
    if samples is None or samples.empty:
        return {}
    return {cid: g["time_ms"].to_numpy(dtype=float) for cid, g in samples.groupby("case_id", sort=False)}


def _pair(cid: str, b: dict[str, Any] | None, n: dict[str, Any] | None) -> dict[str, Any]:
    """A comparison row with both sides' figures and nothing computed yet."""
    ident = n if n is not None else b
    assert ident is not None  # every case compared is in one run at least
    return {
        "case_id": cid,
        "label": case_label(ident),
        "variant": ident.get("variant"),
        "params": ident.get("params"),
        "exact": bool(ident.get("exact")) if ident.get("exact") is not None else None,
        **{k: ident.get(k) for k in AXES},
        "base_status": _status(b),
        "new_status": _status(n),
        "base_time_ms": (b or {}).get("time_ms", math.nan),
        "new_time_ms": (n or {}).get("time_ms", math.nan),
        "time_ratio": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_value": math.nan,
        "q_value": math.nan,
        "n_base": 0,
        "n_new": 0,
        "base_mem_bytes": (b or {}).get("peak_mem_bytes", math.nan),
        "new_mem_bytes": (n or {}).get("peak_mem_bytes", math.nan),
        "mem_ratio": math.nan,
        "base_rel_err": (b or {}).get("rel_err", math.nan),
        "new_rel_err": (n or {}).get("rel_err", math.nan),
        # a side whose timing is in doubt: contended by other processes, or its processes disagreed
        "base_contended": _flag(b, "contended", True),
        "new_contended": _flag(n, "contended", True),
        "base_unstable": _flag(b, "stable", False),
        "new_unstable": _flag(n, "stable", False),
        "time_verdict": "",
        "memory_verdict": "",
        "accuracy_verdict": "",
        "verdict": "",
        "doubt": "",
        "note": "",
    }


def _spans_machines(rows: pd.DataFrame) -> bool:
    """Whether a run's rows were measured on more than one machine (``machine_fingerprint``)."""
    return "machine_fingerprint" in rows.columns and rows["machine_fingerprint"].nunique(dropna=True) > 1


def _machines_apart(b: dict[str, Any], n: dict[str, Any]) -> str:
    """Why a case's two rows are not compared when a run spans several machines: they were measured
    on different ones (or one side's machine is unknown); ``""`` when on the same machine."""
    fb, fn = b.get("machine_fingerprint"), n.get("machine_fingerprint")
    if isinstance(fb, str) and fb == fn:
        return ""
    return (f"measured on different machines (BASE {b.get('host') or '?'} {fb or 'unknown'}, NEW "
            f"{n.get('host') or '?'} {fn or 'unknown'}): a run spans several machines, and timings are only "
            "compared on one machine")


def compare_frames(
    base_rows: pd.DataFrame,
    base_samples: pd.DataFrame | None,
    new_rows: pd.DataFrame,
    new_samples: pd.DataFrame | None,
    thresholds: Thresholds | None = None,
) -> pd.DataFrame:
    """One row per case of either run: the two sides, the ratios, interval, p/q-values, verdicts."""
    th = thresholds or Thresholds()
    base_by = {r["case_id"]: r for r in base_rows.to_dict("records")} if not base_rows.empty else {}
    new_by = {r["case_id"]: r for r in new_rows.to_dict("records")} if not new_rows.empty else {}
    sa, sb = _samples_by_case(base_samples), _samples_by_case(new_samples)
    records, accuracy, aparts = [], [], []
    multi = _spans_machines(base_rows) or _spans_machines(new_rows)
    for cid in list(base_by) + [c for c in new_by if c not in base_by]:
        b, n = base_by.get(cid), new_by.get(cid)
        rec = _pair(cid, b, n)
        problems: list[str] = []
        apart = _machines_apart(b, n) if multi and b is not None and n is not None else ""
        if not apart and b is not None and n is not None and rec["base_status"] == "ok" and rec["new_status"] == "ok":
            a_s = sa.get(cid)
            if a_s is None or len(a_s) == 0:
                a_s = np.array([b.get("time_ms", math.nan)])
            n_s = sb.get(cid)
            if n_s is None or len(n_s) == 0:
                n_s = np.array([n.get("time_ms", math.nan)])
            test = time_test(a_s, n_s, th.alpha)
            rec.update(time_ratio=test.ratio, ci_low=test.ci_low, ci_high=test.ci_high, p_value=test.p_value,
                       n_base=test.n_base, n_new=test.n_new)
            bm, nm = b.get("peak_mem_bytes"), n.get("peak_mem_bytes")
            if finite(bm) and finite(nm) and float(bm) > 0:
                rec["mem_ratio"] = float(nm) / float(bm)
            problems = accuracy_problems(b, n, th.accuracy) if rec["exact"] else []
        records.append(rec)
        accuracy.append(problems)
        aparts.append(apart)

    if not records:
        return _with_columns(pd.DataFrame())
    # verdicts on the records themselves: a DataFrame would turn a side's missing status (None) into NaN
    for rec, q, problems, apart in zip(records, bh_adjust([r["p_value"] for r in records]), accuracy, aparts):
        rec["q_value"] = q
        rec.update(decide(rec, th, problems))
        if apart and rec["base_status"] == "ok" and rec["new_status"] == "ok":
            rec.update(verdict="not compared", time_verdict="", memory_verdict="", accuracy_verdict="", note=apart)
    return sort_by_severity(pd.DataFrame.from_records(records))


def _with_columns(table: pd.DataFrame) -> pd.DataFrame:
    for c in COLUMNS:
        if c not in table:
            table[c] = pd.Series(dtype=object)
    return table


def sort_by_severity(table: pd.DataFrame) -> pd.DataFrame:
    """Most severe verdict first; within one, accuracy regressions first, then the largest time change."""
    if table.empty:
        return table
    key = pd.DataFrame({
        "sev": table["verdict"].map(SEVERITY).fillna(len(VERDICTS)),
        "acc": (table.get("accuracy_verdict", pd.Series("", index=table.index)) != "regressed").astype(int),
        "mag": -np.abs(np.log(pd.to_numeric(table["time_ratio"], errors="coerce").astype(float))).fillna(0.0),
        "label": table["label"].astype(str),
    })
    order = key.sort_values(["sev", "acc", "mag", "label"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# whole runs


@dataclass
class Comparison:
    base: RunInfo
    new: RunInfo
    cases: pd.DataFrame
    thresholds: Thresholds
    warnings: list[str] = field(default_factory=list)
    environment: list[dict[str, Any]] = field(default_factory=list)
    confirm: dict[str, Any] | None = None

    @property
    def counts(self) -> dict[str, int]:
        vc = self.cases["verdict"].value_counts().to_dict() if not self.cases.empty else {}
        return {v: int(vc.get(v, 0)) for v in VERDICTS}

    @property
    def has_regression(self) -> bool:
        c = self.counts
        return c["regressed"] + c["now failing"] > 0


def compare_runs(
    base_dir: str | Path,
    new_dir: str | Path,
    time_threshold: float | None = None,
    memory_threshold: float | None = None,
    alpha: float | None = None,
) -> Comparison:
    """Compare two run directories (see the module docstring)."""
    base, new = run_info(base_dir), run_info(new_dir)
    th = resolve_thresholds(base.meta, new.meta, time_threshold, memory_threshold, alpha)
    base_rows, new_rows = store.read_results(base.path), store.read_results(new.path)
    for info, rows in ((base, base_rows), (new, new_rows)):
        if "case_id" not in rows.columns:
            raise CompareError(f"{info.path}: results have no case_id column")
    cases = compare_frames(base_rows, store.read_samples(base.path), new_rows, store.read_samples(new.path), th)
    return Comparison(
        base=base, new=new, cases=cases, thresholds=th,
        warnings=comparison_warnings(base, new),
        environment=environment_table(base.meta, new.meta),
    )
