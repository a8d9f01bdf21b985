"""Cases: one fully specified benchmark measurement, and their expansion from a suite.

A suite (see :mod:`harness.engine.suite`) sweeps axes as a cartesian product; every point
of that product, for every variant entry and every combination of the variant's
own parameter lists, is one :class:`Case`. A case's identity (``case_id``) is a
stable hash of everything that defines what is measured, so two runs can be
paired case by case and an interrupted run can be resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
}

DEVICES = ("cpu", "cuda")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = ("float32", "bfloat16", "float16")
INPUT_KINDS = ("gaussian", "structured")

#: Bytes per element of each dtype name.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


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

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @property
    def key(self) -> dict[str, Any]:
        """Everything that defines what this case measures (its identity)."""
        d = dataclasses.asdict(self)
        d["params"] = self.params_json
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

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Case":
        """The case a result row measured; ``ValueError`` when the row's ``case_id`` does not match it."""
        params = row.get("params") or "{}"
        fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name not in ("variant", "params")}
        casts = {"int": int, "bool": bool, "str": str}
        case = cls(
            variant=str(row["variant"]),
            params=json.loads(params) if isinstance(params, str) else dict(params),
            **{name: casts[kind](row[name]) for name, kind in fields.items()},
        )
        if "case_id" in row and case.case_id != row["case_id"]:
            raise ValueError(f"case {row['case_id']} cannot be rebuilt from its row (got {case.case_id})")
        return case

    def label(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        head = f"{self.variant}({p})" if p else self.variant
        kv = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return (
            f"{head} {self.device} {self.dtype} {self.mode} "
            f"B{self.batch} H{self.heads}{kv} L{self.seq_len} D{self.head_dim}"
            f"{' causal' if self.causal else ''}"
        )
