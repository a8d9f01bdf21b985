"""Comparing two runs case by case: ratios, intervals, significance, verdicts.

Pairing. Cases are paired by ``case_id``, the stable hash of everything that
defines a measurement (variant, its parameters, device, dtype, mode, shape,
causal, inputs; :class:`harness.core.cases.Case`). A case in only one run is ``new``
or ``missing``.

Time. For a case measured in both runs the point estimate is the ratio of the
medians of the raw samples (``NEW / BASE``; > 1 is slower). Its confidence
interval and p-value come from the Mann–Whitney U test on the log samples:
the p-value is the two-sided test of "same distribution", and the interval is
the Hodges–Lehmann/Moses interval for a multiplicative shift (the order
statistics of all pairwise ratios ``new_j / base_i`` that the U distribution
puts at the ``alpha/2`` and ``1 - alpha/2`` points). Why this rather than a
bootstrap of the medians: it is exact for the small sample counts a benchmark
often has (a percentile bootstrap of a median with 5–10 samples has poor and
unknown coverage); it needs no random resampling (so it is reproducible with
no seed to fix); and the interval and the test are the same procedure, so a
case is significant at ``alpha`` exactly when its interval excludes 1 — the
verdict never contradicts the interval shown beside it. Exact null
distribution when both sides have at most 50 samples and no ties, the normal
approximation with tie correction otherwise.

Many cases. With hundreds of cases, per-case significance at 5% guarantees
false alarms, so the p-values of all the comparison's time tests are adjusted
together with Benjamini–Hochberg (``scipy.stats.false_discovery_control``),
controlling the expected share of false discoveries at ``alpha``.

Verdicts. ``regressed`` (``improved``) needs both a significant adjusted
p-value (q < alpha) and a change beyond the threshold: ratio >= 1 + t
(ratio <= 1 / (1 + t); thresholds are symmetric in log space). Peak memory is
one deterministic measurement per case (an exact allocation trace on CPU,
``max_memory_allocated`` on CUDA), so it has no samples to test: a change
beyond the memory threshold (and at least ``MEMORY_FLOOR_BYTES``) decides. An
exact variant whose error against the float64 reference grows beyond its
dtype's tolerance is ``regressed`` whatever its speed. A case that errors now
and did not before is ``now failing``; the reverse ``now passing``; a case
measured in one run only and skipped (not run) in the other is ``missing`` or
``new``; a case measured in neither (skipped or failing in both) is ``not
compared``.

Thresholds come from, in order: the command line; the ``[compare]`` table of
NEW's suite (stored in run.json); that of BASE's suite; the defaults (5% time,
10% memory, alpha 0.05).

Confirmation (``--confirm``, :mod:`harness.regression.confirm`): a case whose time verdict is
``regressed`` or ``improved`` is measured again on the spot, BASE's code and
NEW's interleaved, and keeps its verdict only if the re-run shows it again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from harness.engine import store
from harness.regression.history import RunInfo, run_info
from harness.engine.store import StoreError
from harness.core.units import duration_ms

#: Verdicts, most severe first (the order of the terminal table).
VERDICTS = ("now failing", "regressed", "missing", "new", "now passing", "improved", "unchanged", "not compared")
SEVERITY = {v: i for i, v in enumerate(VERDICTS)}
#: Statuses that mean the case was attempted and failed.
FAILED = ("error", "crash", "timeout", "oom")

DEFAULT_TIME_THRESHOLD = 0.05
DEFAULT_MEMORY_THRESHOLD = 0.10
DEFAULT_ALPHA = 0.05
#: A memory change smaller than this is never a regression, whatever the ratio (tiny cases).
MEMORY_FLOOR_BYTES = 4096
#: Largest growth of an exact variant's relative error (rel_err, grad_rel_err) that is not a
#: regression, by dtype: about one unit roundoff for the half types, 8 for float32.
ACCURACY_TOLERANCE = {"float32": 1e-6, "float16": 5e-4, "bfloat16": 4e-3, "float64": 1e-12}
#: Exact null distribution of U up to this many samples per side (and no ties).
EXACT_MAX = 50
#: Keys a suite's ``[compare]`` table may set.
COMPARE_KEYS = ("time_threshold", "memory_threshold", "alpha", "accuracy_tolerance")


class CompareError(StoreError):
    """Bad comparison input (one line; the CLI exits 2)."""


# --------------------------------------------------------------------------------------------
# thresholds


@dataclass
class Thresholds:
    time: float = DEFAULT_TIME_THRESHOLD
    memory: float = DEFAULT_MEMORY_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    accuracy: dict[str, float] = field(default_factory=lambda: dict(ACCURACY_TOLERANCE))
    #: where each value came from ("default", "command line", "suite nightly-cpu (NEW)", ...)
    sources: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "time_threshold": self.time,
            "memory_threshold": self.memory,
            "alpha": self.alpha,
            "accuracy_tolerance": dict(self.accuracy),
            "sources": dict(self.sources),
        }


def validate_compare_table(table: Any) -> list[tuple[str | None, str]]:
    """Problems of a suite's ``[compare]`` table, as ``(key, message)`` pairs (empty: fine).

    For :mod:`harness.engine.suite` to call, so a bad value is reported with its line before
    anything runs.
    """
    if not isinstance(table, dict):
        return [(None, "expected a table [compare]")]
    problems: list[tuple[str | None, str]] = []
    for key, value in table.items():
        if key not in COMPARE_KEYS:
            problems.append((key, f"unknown key; one of {', '.join(COMPARE_KEYS)}"))
        elif key == "accuracy_tolerance":
            if not isinstance(value, dict):
                problems.append((key, "expected a table of dtype = tolerance, e.g. { bfloat16 = 4e-3 }"))
                continue
            for dtype, tol in value.items():
                if dtype not in ACCURACY_TOLERANCE:
                    problems.append((key, f"unknown dtype {dtype!r}; one of {', '.join(ACCURACY_TOLERANCE)}"))
                elif not _is_number(tol) or tol < 0:
                    problems.append((key, f"{dtype}: expected a number >= 0, got {tol!r}"))
        elif not _is_number(value) or not 0 < value < 1:
            what = "a fraction between 0 and 1 (0.05 = 5%)"
            problems.append((key, f"expected {what}, got {value!r}"))
    return problems


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _suite_compare_table(meta: dict[str, Any]) -> dict[str, Any]:
    definition = ((meta.get("suite") or {}).get("definition")) or {}
    table = definition.get("compare")
    return table if isinstance(table, dict) else {}


def resolve_thresholds(
    base_meta: dict[str, Any],
    new_meta: dict[str, Any],
    time: float | None = None,
    memory: float | None = None,
    alpha: float | None = None,
) -> Thresholds:
    """Thresholds for a comparison: command line, then NEW's suite, then BASE's, then defaults."""
    t = Thresholds(sources={"time_threshold": "default", "memory_threshold": "default", "alpha": "default"})
    for side, meta in (("BASE", base_meta), ("NEW", new_meta)):  # NEW applied last: it wins
        table = _suite_compare_table(meta)
        if not table:
            continue
        name = (meta.get("suite") or {}).get("name", "?")
        problems = validate_compare_table(table)
        if problems:
            key, message = problems[0]
            raise CompareError(f"suite {name} ({side}) [compare] {key or ''}: {message}")
        where = f"suite {name} ({side})"
        if "time_threshold" in table:
            t.time, t.sources["time_threshold"] = float(table["time_threshold"]), where
        if "memory_threshold" in table:
            t.memory, t.sources["memory_threshold"] = float(table["memory_threshold"]), where
        if "alpha" in table:
            t.alpha, t.sources["alpha"] = float(table["alpha"]), where
        for dtype, tol in (table.get("accuracy_tolerance") or {}).items():
            t.accuracy[dtype] = float(tol)
            t.sources[f"accuracy_tolerance.{dtype}"] = where
    for key, value, attr in (("time_threshold", time, "time"), ("memory_threshold", memory, "memory"), ("alpha", alpha, "alpha")):
        if value is not None:
            if not 0 < value < 1:
                raise CompareError(f"--{key.replace('_', '-')}: expected a fraction between 0 and 1, got {value}")
            setattr(t, attr, float(value))
            t.sources[key] = "command line"
    return t


# --------------------------------------------------------------------------------------------
# statistics


def u_null_cdf(n: int, m: int) -> np.ndarray:
    """Exact ``P(U <= u)``, u = 0..n*m, of the Mann–Whitney U statistic with no ties.

    The counts of U are the coefficients of the Gaussian binomial coefficient
    ``[n+m choose n]_q = prod_{i=1..n} (1 - q^(m+i)) / (1 - q^i)``, built one factor
    at a time (a division by ``1 - q^i`` is a cumulative sum with stride i).
    """
    if n > m:
        n, m = m, n
    size = n * m + 1
    c = np.zeros(size)
    c[0] = 1.0
    for i in range(1, n + 1):
        s = m + i
        if s < size:
            c[s:] -= c[:-s].copy()
        pad = (-size) % i
        c = np.concatenate([c, np.zeros(pad)]).reshape(-1, i).cumsum(axis=0).ravel()[:size]
    c = np.clip(c, 0, None)
    return np.cumsum(c) / c.sum()


def _has_ties(a: np.ndarray, b: np.ndarray) -> bool:
    both = np.concatenate([a, b])
    return len(np.unique(both)) < len(both)


def _ci_rank(n: int, m: int, alpha: float, ties: bool, tie_counts: np.ndarray | None = None) -> int:
    """k (1-based): the interval is [d_(k), d_(nm+1-k)] of the sorted pairwise differences; 0 if none."""
    if not ties and n <= EXACT_MAX and m <= EXACT_MAX:
        cdf = u_null_cdf(n, m)
        # largest k with P(U <= k-1) <= alpha/2
        ok = np.nonzero(cdf <= alpha / 2 + 1e-12)[0]
        return int(ok[-1]) + 1 if len(ok) else 0
    N = n + m
    correction = 0.0
    if tie_counts is not None and len(tie_counts):
        correction = float(((tie_counts**3) - tie_counts).sum()) / (N * (N - 1))
    sigma = math.sqrt(n * m / 12.0 * ((N + 1) - correction))
    z = stats.norm.ppf(1 - alpha / 2)
    # P(U <= k-1) ~ Phi((k - 1 + 0.5 - nm/2) / sigma) <= alpha/2, with continuity correction
    k = int(math.floor(n * m / 2.0 - z * sigma + 0.5))
    return max(k, 0)


@dataclass
class TimeTest:
    ratio: float  # median(new) / median(base)
    ci_low: float  # interval for the multiplicative shift (nan when samples are too few)
    ci_high: float
    shift: float  # Hodges–Lehmann estimate of the ratio
    p_value: float
    n_base: int
    n_new: int


def time_test(base_ms, new_ms, alpha: float = DEFAULT_ALPHA) -> TimeTest:
    """Ratio of medians, Moses interval at level 1 - alpha, and Mann–Whitney p-value (two-sided)."""
    a = np.asarray(base_ms, dtype=float)
    b = np.asarray(new_ms, dtype=float)
    a = a[np.isfinite(a) & (a > 0)]
    b = b[np.isfinite(b) & (b > 0)]
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return TimeTest(math.nan, math.nan, math.nan, math.nan, math.nan, n, m)
    ratio = float(np.median(b) / np.median(a))
    la, lb = np.log(a), np.log(b)
    diffs = np.sort((lb[None, :] - la[:, None]).ravel())
    shift = float(math.exp(np.median(diffs)))
    if n < 2 or m < 2:
        return TimeTest(ratio, math.nan, math.nan, shift, math.nan, n, m)
    ties = _has_ties(la, lb)
    method = "exact" if (not ties and n <= EXACT_MAX and m <= EXACT_MAX) else "asymptotic"
    p = float(stats.mannwhitneyu(lb, la, alternative="two-sided", method=method).pvalue)
    _, counts = np.unique(np.concatenate([la, lb]), return_counts=True)
    k = _ci_rank(n, m, alpha, ties, counts[counts > 1])
    if k < 1:
        lo = hi = math.nan  # too few samples for an interval at this level
    else:
        lo, hi = float(math.exp(diffs[k - 1])), float(math.exp(diffs[n * m - k]))
    return TimeTest(ratio, lo, hi, shift, p, n, m)


def bh_adjust(p_values) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


# --------------------------------------------------------------------------------------------
# case-by-case comparison


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def case_label(row: dict[str, Any]) -> str:
    params = row.get("params") or "{}"
    try:
        p = json.loads(params) if isinstance(params, str) else dict(params)
    except (TypeError, ValueError):
        p = {}
    inner = ",".join(f"{k}={v}" for k, v in sorted(p.items()))
    head = f"{row.get('variant')}({inner})" if inner else str(row.get("variant"))
    kv = f"/{row.get('kv_heads')}" if row.get("kv_heads") not in (None, row.get("heads")) else ""
    dtype = str(row.get("dtype", "")).replace("float", "f").replace("bf", "bf")
    extra = "" if row.get("inputs") in (None, "gaussian") else f" {row.get('inputs')}"
    return (
        f"{head} {row.get('device')} {dtype} {row.get('mode')} B{row.get('batch')} H{row.get('heads')}{kv} "
        f"L{row.get('seq_len')} D{row.get('head_dim')}{' causal' if row.get('causal') else ''}{extra}"
    )


def _status(row: dict[str, Any] | None) -> str | None:
    return None if row is None else str(row.get("status") or "ok")


def _samples_by_case(samples: pd.DataFrame) -> dict[str, np.ndarray]:
    if samples is None or samples.empty:
        return {}
    return {cid: g["time_ms"].to_numpy(dtype=float) for cid, g in samples.groupby("case_id", sort=False)}


def _accuracy_problems(base: dict[str, Any], new: dict[str, Any], tolerance: dict[str, float]) -> list[str]:
    tol = tolerance.get(str(new.get("dtype")), ACCURACY_TOLERANCE["float32"])
    problems = []
    for col in ("rel_err", "grad_rel_err"):
        b, x = base.get(col), new.get(col)
        b_ok, x_ok = _finite(b), _finite(x)
        if b_ok and not x_ok and x is not None:
            problems.append(f"{col} is now {x} (was {b:.2e})")
        elif b_ok and x_ok and float(x) - float(b) > tol:
            problems.append(f"{col} {b:.2e} → {x:.2e} (tolerance +{tol:g} for {new.get('dtype')})")
    return problems


def _fmt_ratio(r: float) -> str:
    if not _finite(r):
        return "?"
    return f"{(r - 1) * 100:+.1f}%"


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
    sa = _samples_by_case(base_samples)
    sb = _samples_by_case(new_samples)
    order = list(base_by) + [c for c in new_by if c not in base_by]
    records = []
    for cid in order:
        b, n = base_by.get(cid), new_by.get(cid)
        ident = n if n is not None else b
        rec: dict[str, Any] = {
            "case_id": cid,
            "label": case_label(ident),
            "variant": ident.get("variant"),
            "params": ident.get("params"),
            "exact": bool(ident.get("exact")) if ident.get("exact") is not None else None,
            **{k: ident.get(k) for k in ("device", "dtype", "mode", "batch", "heads", "kv_heads", "seq_len", "head_dim", "causal", "inputs")},
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
            "time_verdict": "",
            "memory_verdict": "",
            "accuracy_verdict": "",
            "verdict": "",
            "note": "",
        }
        if b is not None and n is not None and rec["base_status"] == "ok" and rec["new_status"] == "ok":
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
            if _finite(bm) and _finite(nm) and float(bm) > 0:
                rec["mem_ratio"] = float(nm) / float(bm)
            rec["_accuracy"] = _accuracy_problems(b, n, th.accuracy) if rec["exact"] else []
        records.append(rec)

    table = pd.DataFrame.from_records(records)
    if table.empty:
        return _with_columns(table)
    table["q_value"] = bh_adjust(table["p_value"].to_numpy(dtype=float))
    verdicts = [_decide(rec, th) for rec in table.to_dict("records")]
    for col in ("time_verdict", "memory_verdict", "accuracy_verdict", "verdict", "note"):
        table[col] = [v[col] for v in verdicts]
    table = table.drop(columns=["_accuracy"], errors="ignore")
    return sort_by_severity(table)


def _with_columns(table: pd.DataFrame) -> pd.DataFrame:
    cols = ["case_id", "label", "verdict", "time_verdict", "memory_verdict", "accuracy_verdict", "note",
            "time_ratio", "ci_low", "ci_high", "p_value", "q_value", "mem_ratio"]
    for c in cols:
        if c not in table:
            table[c] = pd.Series(dtype=object)
    return table


def _decide(rec: dict[str, Any], th: Thresholds) -> dict[str, str]:
    """The verdicts of one case (time, memory, accuracy, overall) and a one-line note."""
    out = {"time_verdict": "", "memory_verdict": "", "accuracy_verdict": "", "verdict": "", "note": ""}
    bs, ns = rec["base_status"], rec["new_status"]
    if bs is None:
        out["verdict"] = "new"
        out["note"] = "only in NEW" + ("" if ns == "ok" else f" ({ns})")
        return out
    if ns is None:
        out["verdict"] = "missing"
        out["note"] = "only in BASE" + ("" if bs == "ok" else f" ({bs})")
        return out
    if ns in FAILED and bs not in FAILED:
        out["verdict"] = "now failing"
        out["note"] = f"{bs} → {ns}"
        return out
    if bs in FAILED and ns == "ok":
        out["verdict"] = "now passing"
        out["note"] = f"{bs} → ok"
        return out
    if bs == "ok" and ns != "ok":
        out["verdict"] = "missing"
        out["note"] = f"{ns} in NEW"
        return out
    if bs != "ok" and ns == "ok":
        out["verdict"] = "new"
        out["note"] = f"{bs} in BASE"
        return out
    if bs != "ok" or ns != "ok":
        out["verdict"] = "not compared"
        out["note"] = f"{bs} in BASE, {ns} in NEW"
        return out

    notes = []
    # time
    ratio, q = rec["time_ratio"], rec["q_value"]
    up, down = 1 + th.time, 1 / (1 + th.time)
    significant = _finite(q) and q < th.alpha
    if _finite(ratio) and significant and ratio >= up:
        out["time_verdict"] = "regressed"
    elif _finite(ratio) and significant and ratio <= down:
        out["time_verdict"] = "improved"
    else:
        out["time_verdict"] = "unchanged"
        if _finite(ratio) and (ratio >= up or ratio <= down):
            why = "too few samples to test" if not _finite(q) else f"not significant, q={q:.2g}"
            notes.append(f"time {_fmt_ratio(ratio)} ({why})")
    if out["time_verdict"] != "unchanged":
        notes.append(f"time {_fmt_ratio(ratio)}")
    lo, hi = rec["ci_low"], rec["ci_high"]
    if _finite(ratio) and _finite(lo) and _finite(hi) and not lo <= ratio <= hi:
        # the interval is for a uniform shift of the whole distribution; medians moving
        # differently means the shape changed (e.g. a second mode): worth a look either way
        notes.append("distribution changed shape (median ratio outside the shift interval)")
    # memory
    mr = rec["mem_ratio"]
    bm, nm = rec["base_mem_bytes"], rec["new_mem_bytes"]
    big = _finite(bm) and _finite(nm) and abs(float(nm) - float(bm)) >= MEMORY_FLOOR_BYTES
    if _finite(mr) and big and mr >= 1 + th.memory:
        out["memory_verdict"] = "regressed"
        notes.append(f"memory {_fmt_ratio(mr)}")
    elif _finite(mr) and big and mr <= 1 / (1 + th.memory):
        out["memory_verdict"] = "improved"
        notes.append(f"memory {_fmt_ratio(mr)}")
    else:
        out["memory_verdict"] = "unchanged" if _finite(mr) else ""
    # accuracy (exact variants only)
    problems = rec.get("_accuracy") or []
    if rec.get("exact"):
        out["accuracy_verdict"] = "regressed" if problems else "unchanged"
        notes.extend(f"accuracy: {p}" for p in problems)
    parts = (out["time_verdict"], out["memory_verdict"], out["accuracy_verdict"])
    if "regressed" in parts:
        out["verdict"] = "regressed"
    elif "improved" in parts:
        out["verdict"] = "improved"
    else:
        out["verdict"] = "unchanged"
    out["note"] = "; ".join(notes)
    return out


def sort_by_severity(table: pd.DataFrame) -> pd.DataFrame:
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


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list):
        out[prefix] = ", ".join(map(str, d))
    else:
        out[prefix] = "" if d is None else str(d)
    return out


def environment_table(base_meta: dict[str, Any], new_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The two runs' environments side by side: ``{key, base, new, differs}`` per setting."""

    def view(meta: dict[str, Any]) -> dict[str, str]:
        env = meta.get("environment") or {}
        flat = _flatten({"machine": env.get("machine"), "versions": env.get("versions"), "git": env.get("git")})
        flat["threads"] = str(env.get("threads"))
        flat.update(_flatten({"timing": meta.get("timing")}))
        flat["seed"] = str(meta.get("seed"))
        flat["suite"] = str((meta.get("suite") or {}).get("name"))
        flat["started"] = str(meta.get("started"))
        flat["status"] = str(meta.get("status"))
        return flat

    a, b = view(base_meta), view(new_meta)
    keys = list(a) + [k for k in b if k not in a]
    volatile = {"started"}  # differs by construction; shown, not flagged
    return [
        {"key": k, "base": a.get(k, ""), "new": b.get(k, ""), "differs": k not in volatile and a.get(k, "") != b.get(k, "")}
        for k in keys
    ]


def comparison_warnings(base: RunInfo, new: RunInfo) -> list[str]:
    warnings = []
    if base.fingerprint != new.fingerprint:
        bm = ((base.meta.get("environment") or {}).get("machine")) or {}
        nm = ((new.meta.get("environment") or {}).get("machine")) or {}
        warnings.append(
            f"machine fingerprints differ: BASE {base.fingerprint} ({bm.get('hostname')}, {bm.get('cpu_model')}) vs "
            f"NEW {new.fingerprint} ({nm.get('hostname')}, {nm.get('cpu_model')}); "
            "timings from different machines are not comparable"
        )
    if base.suite != new.suite:
        warnings.append(f"different suites: BASE {base.suite!r}, NEW {new.suite!r}; only cases present in both are compared")
    bt, nt = base.meta.get("timing") or {}, new.meta.get("timing") or {}
    if bt != nt:
        diff = ", ".join(f"{k} {bt.get(k)}→{nt.get(k)}" for k in sorted(set(bt) | set(nt)) if bt.get(k) != nt.get(k))
        warnings.append(f"timing settings differ ({diff})")
    be, ne = base.meta.get("environment") or {}, new.meta.get("environment") or {}
    if be.get("threads") != ne.get("threads"):
        warnings.append(f"thread counts differ: BASE {be.get('threads')}, NEW {ne.get('threads')}")
    for side, info in (("BASE", base), ("NEW", new)):
        if info.status != "complete":
            warnings.append(f"{side} run {info.run_id} is {info.status!r}: cases it did not finish count as missing/new")
    return warnings


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

    def summary_line(self) -> str:
        parts = [f"{n} {v}" for v, n in self.counts.items() if n]
        return ", ".join(parts) if parts else "no cases"

    # -- output formats ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def run(info: RunInfo) -> dict[str, Any]:
            return {"run_id": info.run_id, "path": str(info.path), "suite": info.suite, "started": info.started,
                    "status": info.status, "commit": info.commit, "dirty": info.dirty, "fingerprint": info.fingerprint}

        cases = []
        for rec in self.cases.to_dict("records"):
            cases.append({k: _json_value(v) for k, v in rec.items()})
        return {
            "base": run(self.base),
            "new": run(self.new),
            "thresholds": self.thresholds.as_dict(),
            "warnings": list(self.warnings),
            "counts": self.counts,
            "regressed": self.has_regression,
            "confirm": self.confirm,
            "cases": cases,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self, all_cases: bool = False) -> str:
        c = self.counts
        head = "❌ regressions" if self.has_regression else "✅ no regressions"
        lines = [
            f"### Attention Bench: {head}",
            "",
            f"`{self.base.run_id}` ({self.base.short_commit}) → `{self.new.run_id}` ({self.new.short_commit}) · "
            + ", ".join(f"**{n}** {v}" for v, n in c.items() if n),
            "",
            f"Thresholds: time ±{self.thresholds.time:.0%}, memory ±{self.thresholds.memory:.0%}, "
            f"FDR {self.thresholds.alpha:g} (Benjamini–Hochberg).",
        ]
        for w in self.warnings:
            lines += ["", f"> ⚠️ {w}"]
        if self.confirm:
            lines += ["", f"Confirmation: {self.confirm.get('message', '')}"]
        shown = self.cases if all_cases else self.cases[self.cases["verdict"] != "unchanged"]
        if not shown.empty:
            lines += ["", "| verdict | case | BASE | NEW | time ratio (95% CI) | q | memory | note |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
            for r in shown.to_dict("records"):
                lines.append(
                    f"| {r['verdict']} | {r['label']} | {_ms(r['base_time_ms'])} | {_ms(r['new_time_ms'])} | "
                    f"{format_ratio_ci(r)} | {_q(r['q_value'])} | {_fmt_ratio(r['mem_ratio']) if _finite(r['mem_ratio']) else ''} | "
                    f"{str(r['note']).replace('|', '/')} |"
                )
        unchanged = c["unchanged"]
        if unchanged and not all_cases:
            lines += ["", f"{unchanged} case(s) unchanged."]
        return "\n".join(lines) + "\n"


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _ms(x) -> str:
    return duration_ms(float(x)) if _finite(x) else ""


def _q(q) -> str:
    return f"{q:.2g}" if _finite(q) else ""


def format_ratio_ci(r: dict[str, Any]) -> str:
    ratio = r.get("time_ratio")
    if not _finite(ratio):
        return ""
    text = f"×{ratio:.3f}"
    if _finite(r.get("ci_low")) and _finite(r.get("ci_high")):
        text += f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    return text


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
