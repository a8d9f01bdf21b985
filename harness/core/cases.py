"""Cases: one fully specified benchmark measurement, and their expansion from a suite.

A suite (see :mod:`harness.engine.suite`) sweeps axes as a cartesian product; every point
of that product, for every variant entry and every combination of the variant's
own parameter lists, is one :class:`Case`. A case's identity (``case_id``) is a
stable hash of everything that defines what is measured, so two runs can be
paired case by case and an interrupted run can be resumed.

Inference shapes: ``seq_len`` is the key/value length; ``q_len`` the query length when it
differs (None: the same, self-attention); ``kv_layout`` contiguous or paged (``page_size``
tokens per page); ``lengths`` fixed, or per-sequence lengths (:mod:`harness.core.lengths`).
These fields stay out of the identity while they hold their defaults, so every case that
existed before them keeps its ``case_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

#: The axes a suite may sweep, with their default single values.
AXES: dict[str, Any] = {
    "device": "cpu",
    "mode": "fwd",
    "batch": 1,
    "heads": 8,
    "kv_heads": None,  # None: equal to heads
    "seq_len": 1024,
    "head_dim": 64,
    "dtype": "float32",
    "causal": False,
    "inputs": "gaussian",
    "q_len": None,  # None: seq_len (self-attention)
    "kv_len": None,  # None: seq_len
    "kv_layout": "contiguous",
    "page_size": None,  # paged layouts only
    "lengths": "fixed",
}

DEVICES = ("cpu", "cuda")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = ("float32", "bfloat16", "float16")
INPUT_KINDS = ("gaussian", "structured")
KV_LAYOUTS = ("contiguous", "paged")

#: Bytes per element of each dtype name.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

#: Case fields left out of the identity while they hold these values (added after case ids existed).
IDENTITY_DEFAULTS = {"q_len": None, "kv_layout": "contiguous", "page_size": None, "lengths": "fixed"}


@dataclass(frozen=True)
class Case:
    """One measurement: a variant with its parameters on one shape, dtype, device and mode."""

    variant: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    device: str = "cpu"
    mode: str = "fwd"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    seq_len: int = 1024
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    inputs: str = "gaussian"
    q_len: int | None = None
    kv_layout: str = "contiguous"
    page_size: int | None = None
    lengths: str = "fixed"

    @classmethod
    def from_point(cls, variant: str, params: dict[str, Any], point: dict[str, Any]) -> "Case":
        """The case of one point of a suite's sweep (keys of :data:`AXES`), normalised: ``kv_heads``
        defaults to ``heads``, ``kv_len`` is ``seq_len``, a ``q_len`` equal to it is dropped, and
        ``page_size`` only belongs to a paged layout."""
        point = dict(point)
        if point.get("kv_heads") is None:
            point["kv_heads"] = point["heads"]
        kv_len = point.pop("kv_len", None)
        if kv_len is not None:
            point["seq_len"] = kv_len
        if point.get("q_len") == point["seq_len"]:
            point["q_len"] = None
        if point.get("kv_layout", "contiguous") != "paged":
            point["page_size"] = None
        return cls(variant=variant, params=params, **point)

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @property
    def key(self) -> dict[str, Any]:
        """Everything that defines what this case measures (its identity)."""
        d = dataclasses.asdict(self)
        d["params"] = self.params_json
        for name, default in IDENTITY_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @property
    def case_id(self) -> str:
        blob = json.dumps(self.key, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1: multi-head, heads: multi-query)."""
        return self.heads // self.kv_heads

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def query_len(self) -> int:
        """Query rows per sequence (the longest, for a variable-length batch)."""
        return self.seq_len if self.q_len is None else self.q_len

    @property
    def inference_shaped(self) -> bool:
        """Queries and keys of different lengths, a paged cache or a variable-length batch."""
        return self.q_len is not None or self.kv_layout != "contiguous" or self.lengths != "fixed"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Case":
        """The case a result row measured; ``ValueError`` when the row's ``case_id`` does not match it.
        An inference column (:data:`IDENTITY_DEFAULTS`) the row lacks (written before it existed) or
        leaves empty takes its default."""
        params = row.get("params") or "{}"
        casts = {"int": int, "bool": bool, "str": str, "int | None": int}
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in ("variant", "params"):
                continue
            value = row.get(f.name) if f.name in IDENTITY_DEFAULTS else row[f.name]
            values[f.name] = IDENTITY_DEFAULTS[f.name] if _empty(value) else casts[f.type](value)
        case = cls(
            variant=str(row["variant"]),
            params=json.loads(params) if isinstance(params, str) else dict(params),
            **values,
        )
        if "case_id" in row and case.case_id != row["case_id"]:
            raise ValueError(f"case {row['case_id']} cannot be rebuilt from its row (got {case.case_id})")
        return case

    def label(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        head = f"{self.variant}({p})" if p else self.variant
        kv = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        length = f"L{self.seq_len}" if self.q_len is None else f"Lq{self.q_len} Lkv{self.seq_len}"
        extra = (f" paged/{self.page_size}" if self.kv_layout == "paged" else "") + (
            f" lengths={self.lengths}" if self.lengths != "fixed" else "")
        return (
            f"{head} {self.device} {self.dtype} {self.mode} "
            f"B{self.batch} H{self.heads}{kv} {length} D{self.head_dim}"
            f"{' causal' if self.causal else ''}{extra}"
        )


def _empty(value: Any) -> bool:
    """None, NaN or pandas' NA: a table's empty cell."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"
