"""What the report derives from the rows: configuration groups, series labels, scaling exponents."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from harness.core.cases import axis_names, decode_params
from harness.core.registry import PATTERN_FAMILIES
from reports.fidelity import unstable
from reports.inference import shape_text, with_inference_columns

#: A configuration: every case field but the variant, its parameters and the sequence length (a field
#: added to harness.core.cases joins it by itself); and the machine, when the run spans several
#: (``machine``, from :func:`with_labels`: empty for a run on one machine).
GROUP_KEYS = [*axis_names(exclude=("seq_len",)), "machine"]
#: Exponents are fitted over at most this many of the largest lengths.
FIT_POINTS = 3


def series_label(variant: str, params_json: str, keys=None) -> str:
    """``variant(k=v,...)`` over the parameters named in ``keys`` (all of them when None)."""
    params = decode_params(params_json)
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if keys is None or k in keys)
    return f"{variant}({inner})" if inner else variant


def label_keys(rows: pd.DataFrame, suite_definition: dict | None = None) -> dict[str, set]:
    """Per variant, the parameters worth naming in its label: those the suite set for it and those
    that differ between its rows. A variant's defaults (block_sparse has seven) stay out of legends."""
    keys: dict[str, set] = {}
    for entry in (suite_definition or {}).get("variant") or []:
        if isinstance(entry, dict) and "name" in entry:
            keys.setdefault(entry["name"], set()).update(k for k in entry if k != "name")
    for variant, g in rows.groupby("variant"):
        decoded = [decode_params(p) for p in g["params"].unique()]
        names = set().union(*decoded) if decoded else set()
        varying = {k for k in names if len({json.dumps(d.get(k), sort_keys=True) for d in decoded}) > 1}
        keys.setdefault(variant, set()).update(varying)
    return keys


def with_labels(rows: pd.DataFrame, suite_definition: dict | None = None) -> pd.DataFrame:
    """Adds ``label``: the series name used in charts and tables (see :func:`label_keys`).

    Without a suite definition every parameter is named, as before.
    """
    rows = rows.copy()
    keys = label_keys(rows, suite_definition) if suite_definition is not None else {}
    rows["label"] = [series_label(v, p, keys.get(v) if suite_definition is not None else None)
                     for v, p in zip(rows["variant"], rows["params"])]
    if suite_definition is not None and rows.groupby("label")["params"].nunique().gt(1).any():
        rows["label"] = [series_label(v, p) for v, p in zip(rows["variant"], rows["params"])]  # keep them apart
    rows["machine"] = machine_labels(rows)
    return with_inference_columns(rows)  # older runs lack the later case fields: their defaults


def machine_labels(rows: pd.DataFrame) -> list[str]:
    """Per row, ``host (fingerprint)`` of the machine it ran on when the rows span several machines
    (``bench merge`` of shards, ``--executor ray``), else ``""``: timings of different machines are
    never drawn or fitted together."""
    if "machine_fingerprint" not in rows.columns:
        return [""] * len(rows)
    prints = rows["machine_fingerprint"].where(rows["machine_fingerprint"].notna(), None)
    if prints.nunique(dropna=True) <= 1:
        return [""] * len(rows)
    hosts = rows["host"] if "host" in rows.columns else pd.Series([None] * len(rows), index=rows.index)
    return [f"{h or 'unknown host'} ({f})" if isinstance(f, str) else "unknown machine" for h, f in zip(hosts, prints)]


def group_title(key: tuple) -> str:
    d = dict(zip(GROUP_KEYS, key))
    heads = f"H={d['heads']}" + (f" kv={d['kv_heads']}" if d["kv_heads"] != d["heads"] else "")
    shape = shape_text(d)
    return (
        f"{d['device']} · {d['dtype']} · {d['mode']} · {'causal' if d['causal'] else 'non-causal'} · "
        f"B={d['batch']} {heads} D={d['head_dim']} · {d['inputs']} inputs"
        + (f" · on {d['machine']}" if d.get("machine") else "") + (f" · {shape}" if shape else "")
    )


def scaling_exponent(lengths, values, points: int = FIT_POINTS) -> float | None:
    """Slope of log(value) against log(length) over the ``points`` largest lengths (None if < 2)."""
    data = sorted((float(x), float(y)) for x, y in zip(lengths, values) if y == y and y > 0)
    data = data[-points:]
    if len(data) < 2 or data[0][0] == data[-1][0]:
        return None
    x = np.log([d[0] for d in data])
    y = np.log([d[1] for d in data])
    return float(np.polyfit(x, y, 1)[0])


def _fit_lengths(lengths, values) -> list[int]:
    """The lengths :func:`scaling_exponent` fits on (the ``FIT_POINTS`` largest with a positive value)."""
    return sorted(int(x) for x, y in zip(lengths, values) if y == y and y > 0)[-FIT_POINTS:]


def _lengths_text(fitted: list[int], all_lengths: list[int]) -> str:
    """``512–4096`` for a run of consecutive measured lengths, else the lengths themselves."""
    if not fitted:
        return ""
    span = [L for L in all_lengths if fitted[0] <= L <= fitted[-1]]
    return f"{fitted[0]}–{fitted[-1]}" if span == fitted else ", ".join(map(str, fitted))


def exponents(ok: pd.DataFrame) -> pd.DataFrame:
    """Per group and series: time and memory exponents, and the lengths they were fitted on.

    Unstable points (``stable`` false) are left out of the time fit (``unstable_excluded`` counts
    them); with fewer than two stable lengths left there is no time exponent and ``time_note`` says
    why. Memory, measured once per case, is fitted over every point.
    """
    records = []
    for key, group in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        for label, s in group.groupby("label", sort=True):
            s = s.sort_values("seq_len")
            shaky = unstable(s)
            steady = s[~shaky]
            t = scaling_exponent(steady["seq_len"], steady["time_ms"])
            m = scaling_exponent(s["seq_len"], s["peak_mem_bytes"])
            excluded = int(shaky.sum())
            if t is None and m is None and not excluded:
                continue
            timed = len(_fit_lengths(s["seq_len"], s["time_ms"]))
            note = (f"too few stable points to fit ({excluded} unstable excluded)"
                    if t is None and excluded and timed >= 2 else "")
            fitted = _fit_lengths(steady["seq_len"], steady["time_ms"]) if t is not None else \
                _fit_lengths(s["seq_len"], s["peak_mem_bytes"])
            records.append(
                {"group": group_title(key), "label": label, "time_exp": t, "mem_exp": m,
                 "fit_lengths": _lengths_text(fitted, sorted(int(x) for x in s["seq_len"].unique())),
                 "unstable_excluded": excluded, "time_note": note}
            )
    return pd.DataFrame(records)


# -- exact dense baseline, crossovers, Pareto fronts ---------------------------------------------

#: sdpa backends in order of preference for the baseline (flash first, math last).
SDPA_PREFERENCE = ("flash", "auto", "efficient", "cudnn", "math")


def _params(params_json) -> dict:
    return decode_params(params_json)


def _is_exact(value) -> bool:
    return value is True or (value is not None and value == value and bool(value))


def is_candidate(family, exact) -> bool:
    """An approximate variant, or one of a family that skips pairs by a pattern (the registry's
    ``PATTERN_FAMILIES``: local, sparse): what crossovers are computed for."""
    return not _is_exact(exact) or family in PATTERN_FAMILIES


def is_approximate(exact) -> bool:
    return not _is_exact(exact)


def baseline_label(group: pd.DataFrame) -> tuple[str | None, str]:
    """The exact dense baseline among a configuration's ``ok`` rows, and why it was chosen.

    Variants that declared themselves baselines (``register_variant(..., baseline=True)``, as the
    rows' ``baseline`` column records it: the report of a run reads the same whichever plugins the
    process that renders it has loaded) come first; only when none of them ran (or the rows are
    from before the column) do the name rules choose among all rows. Either way the preference is
    sdpa's flash backend, else another sdpa
    backend (auto, efficient, cudnn, math in that order), else naive; among declared baselines
    that are none of these, the first by label. Returns ``(None, reason)`` when none ran.
    """
    labels = group.drop_duplicates("label").set_index("label")
    if "baseline" in labels.columns:  # as the rows record it: never this process's registry
        declared = labels[labels["baseline"].map(_is_exact).astype(bool)]
    else:
        declared = labels.iloc[0:0]
    if not declared.empty:
        chosen, why = _by_name(declared)
        if chosen is None:
            chosen = str(min(declared.index))
            why = f"{chosen} (declared baseline)"
        return chosen, why
    return _by_name(labels)


def _by_name(labels: pd.DataFrame) -> tuple[str | None, str]:
    """The name rules: sdpa flash, else another sdpa backend, else naive."""
    sdpa = {}
    for label, r in labels.iterrows():
        if r["variant"] == "sdpa":
            sdpa[_params(r["params"]).get("backend", "auto")] = label
    for backend in SDPA_PREFERENCE:
        if backend in sdpa:
            return sdpa[backend], ("sdpa flash" if backend == "flash"
                                   else f"sdpa {backend} (no sdpa flash in this configuration)")
    if sdpa:
        backend = sorted(sdpa)[0]
        return sdpa[backend], f"sdpa {backend}"
    if "naive" in labels.index:
        return "naive", "naive (no sdpa in this configuration)"
    return None, "no exact dense baseline (sdpa or naive) ran in this configuration"


def crossover_length(lengths, ratios) -> dict:
    """Where ``ratio = candidate / baseline`` drops below 1 for good, interpolated on log-log.

    ``lengths`` ascending, ``ratios`` positive. Returns ``{"kind": ..., "length": ...}`` with kind
    ``"always"`` (below 1 at every length: the crossover is at or before the first one),
    ``"at"`` (interpolated between the last length at or above 1 and the next),
    ``"never"`` (not below 1 at the largest length), or ``"none"`` (no common lengths).
    """
    pts = [(float(x), float(r)) for x, r in zip(lengths, ratios) if r == r and r > 0 and x > 0]
    if not pts:
        return {"kind": "none", "length": None}
    if pts[-1][1] >= 1:
        wins = [int(x) for x, r in pts if r < 1]
        return {"kind": "never", "length": None, "wins": wins}
    last = max((i for i, (_, r) in enumerate(pts) if r >= 1), default=None)
    if last is None:
        return {"kind": "always", "length": pts[0][0]}
    (x0, r0), (x1, r1) = pts[last], pts[last + 1]
    lx0, lx1, lr0, lr1 = np.log(x0), np.log(x1), np.log(r0), np.log(r1)
    t = 0.0 if lr0 == lr1 else lr0 / (lr0 - lr1)
    return {"kind": "at", "length": float(np.exp(lx0 + t * (lx1 - lx0))), "between": (int(x0), int(x1))}


def _describe(result: dict, better: str) -> str:
    kind = result["kind"]
    if kind == "none":
        return "no common lengths"
    if kind == "always":
        return f"{better} at every measured length (from L ≤ {int(result['length'])})"
    if kind == "at":
        a, b = result["between"]
        return f"L ≈ {result['length']:,.0f} (between {a:,} and {b:,})"
    wins = result.get("wins") or []
    text = "never in this sweep"
    if wins:
        text += f" ({better} only at L = {', '.join(f'{w:,}' for w in wins)})"
    return text


def crossovers(ok: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and approximate/sparse series: from which length it beats the baseline.

    Time compares medians (``time_ms``), memory compares ``peak_mem_bytes``; both read off the
    lengths where the two series have a measurement, interpolated on log-log axes. A length where
    either time is unstable is left out of the time comparison (the text says how many were).
    Give it the rows whose times are speed results (``ok``, not emulated).
    """
    records = []
    for key, group in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        cands = group[[is_candidate(f, e) for f, e in zip(group["family"], group["exact"])]]
        if cands.empty:
            continue
        base, why = baseline_label(group)
        for label, s in cands.groupby("label", sort=True):
            rec = {"group": group_title(key), "label": label, "baseline": base, "baseline_reason": why}
            if base is None:
                rec.update(time_text="no baseline", mem_text="no baseline", time_length=None, mem_length=None,
                           compared="", time_ratio_last=None, mem_ratio_last=None, last_length=None)
                records.append(rec)
                continue
            b = group[group["label"] == base]
            shaky = set(s.loc[unstable(s), "seq_len"]) | set(b.loc[unstable(b), "seq_len"])
            b, c = b.set_index("seq_len"), s.set_index("seq_len")
            for col, prefix, better in (("time_ms", "time", "faster"), ("peak_mem_bytes", "mem", "smaller")):
                both = c[[col]].join(b[[col]].rename(columns={col: col + "_base"}), how="inner").dropna()
                both = both[(both[col] > 0) & (both[col + "_base"] > 0)].sort_index()
                left_out = both.index.isin(list(shaky)) if prefix == "time" else both.index.isin([])
                both = both[~left_out]
                ratios = both[col] / both[col + "_base"]
                result = crossover_length(list(both.index), list(ratios))
                rec[f"{prefix}_kind"] = result["kind"]
                rec[f"{prefix}_length"] = result["length"]
                rec[f"{prefix}_text"] = _describe(result, better) + (
                    f" ({int(left_out.sum())} unstable length{'s' if left_out.sum() != 1 else ''} left out)"
                    if left_out.any() else "")
                rec[f"{prefix}_ratio_last"] = float(1 / ratios.iloc[-1]) if len(ratios) else None
                if prefix == "time":
                    rec["last_length"] = int(both.index[-1]) if len(both) else None
                    rec["compared"] = (f"{int(both.index[0]):,}–{int(both.index[-1]):,}" if len(both) else "")
            records.append(rec)
    return pd.DataFrame(records)


def pareto_front(times, errors) -> list[bool]:
    """Which points are on the Pareto front of (time, error), both minimised.

    A point is on the front when no other point is at least as good in both and better in one.
    """
    pts = [(float(t), float(e)) for t, e in zip(times, errors)]
    on = []
    for i, (t, e) in enumerate(pts):
        dominated = any(
            (t2 <= t and e2 <= e) and (t2 < t or e2 < e) for j, (t2, e2) in enumerate(pts) if j != i
        )
        on.append(not dominated)
    return on


def _exponent_text(r: dict, what: str) -> str:
    value = r.get(f"{what}_exp")
    if value is None or value != value:
        return (r.get("time_note") or "?") if what == "time" else "?"
    n = r.get("unstable_excluded") if what == "time" else 0
    n = int(n) if n and n == n else 0
    return f"L^{value:.2f}" + (f" ({n} unstable point{'s' if n != 1 else ''} excluded)" if n else "")


def exponent_statement(exps: pd.DataFrame) -> str:
    """'naive: time ∝ L^1.97, memory ∝ L^2.00; sliding_window(...): L^1.02, L^1.00' for one group;
    unstable points left out of a time fit are counted ('L^1.97 (1 unstable point excluded)'), and a
    series with too few stable points says so instead of an exponent."""
    parts = []
    for i, r in enumerate(exps.to_dict("records")):
        t, m = _exponent_text(r, "time"), _exponent_text(r, "mem")
        if i == 0:
            parts.append(f"{r['label']}: time {'∝' if t.startswith('L^') else '—'} {t}, memory ∝ {m}")
        else:
            parts.append(f"{r['label']}: {t}, {m}")
    return "; ".join(parts)
