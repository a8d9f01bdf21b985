"""What the report derives from the rows: configuration groups, series labels, scaling exponents."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

#: A configuration: everything but the variant and the sequence length.
GROUP_KEYS = ["device", "dtype", "mode", "causal", "batch", "heads", "kv_heads", "head_dim", "inputs"]
#: Exponents are fitted over at most this many of the largest lengths.
FIT_POINTS = 3


def series_label(variant: str, params_json: str) -> str:
    params = json.loads(params_json) if params_json else {}
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{variant}({inner})" if inner else variant


def with_labels(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["label"] = [series_label(v, p) for v, p in zip(rows["variant"], rows["params"])]
    return rows


def group_title(key: tuple) -> str:
    d = dict(zip(GROUP_KEYS, key))
    heads = f"H={d['heads']}" + (f" kv={d['kv_heads']}" if d["kv_heads"] != d["heads"] else "")
    return (
        f"{d['device']} · {d['dtype']} · {d['mode']} · {'causal' if d['causal'] else 'non-causal'} · "
        f"B={d['batch']} {heads} D={d['head_dim']} · {d['inputs']} inputs"
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


def exponents(ok: pd.DataFrame) -> pd.DataFrame:
    """Per group and series: time and memory exponents, and the lengths they were fitted on."""
    records = []
    for key, group in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        for label, s in group.groupby("label", sort=True):
            s = s.sort_values("seq_len")
            t = scaling_exponent(s["seq_len"], s["time_ms"])
            m = scaling_exponent(s["seq_len"], s["peak_mem_bytes"])
            if t is None and m is None:
                continue
            fitted = sorted(s["seq_len"].unique())[-FIT_POINTS:]
            records.append(
                {"group": group_title(key), "label": label, "time_exp": t, "mem_exp": m,
                 "fit_lengths": f"{fitted[0]}–{fitted[-1]}"}
            )
    return pd.DataFrame(records)
