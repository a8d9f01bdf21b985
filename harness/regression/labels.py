"""The one label of a result row's case, for tables of rows (compare, show, trend).

Shorter than :meth:`harness.core.cases.Case.label` (``f32``, ``bf16``) and it names non-default
inputs; it works on any row, including one whose fields no longer rebuild a :class:`Case`
(an old run's, a partial one).
"""

from __future__ import annotations

import json
from typing import Any


def row_label(row: dict[str, Any]) -> str:
    """``naive(block=32) cpu f32 fwd B1 H8/2 L1024 D64 causal structured`` for a result row."""
    params = row.get("params") or "{}"
    try:
        p = json.loads(params) if isinstance(params, str) else dict(params)
    except (TypeError, ValueError):
        p = {}
    inner = ",".join(f"{k}={v}" for k, v in sorted(p.items()))
    head = f"{row.get('variant')}({inner})" if inner else str(row.get("variant"))
    kv = f"/{row.get('kv_heads')}" if row.get("kv_heads") not in (None, row.get("heads")) else ""
    dtype = str(row.get("dtype", "")).replace("float", "f")
    extra = "" if row.get("inputs") in (None, "gaussian") else f" {row.get('inputs')}"
    return (
        f"{head} {row.get('device')} {dtype} {row.get('mode')} B{row.get('batch')} H{row.get('heads')}{kv} "
        f"L{row.get('seq_len')} D{row.get('head_dim')}{' causal' if row.get('causal') else ''}{extra}"
    )
