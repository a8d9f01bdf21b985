"""Cases: one fully specified benchmark measurement, its fields declared once.

A suite (see :mod:`harness.engine.suite`) sweeps axes as a cartesian product; every point
of that product, for every variant entry and every combination of the variant's
own parameter lists, is one :class:`Case`. A case's identity (``case_id``) is a
stable hash of everything that defines what is measured, so two runs can be
paired case by case and an interrupted run can be resumed.

**One declaration.** Every field of :class:`Case` carries an :class:`Axis` in its metadata: its
help, column type, unit, allowed range or choices, suite default, whether it joined the identity
after case ids existed, and its fragment of the case's label. Everything else is generated from
it: the suite's sweep keys (:data:`harness.core.config.SWEEP`), the result table's identity
columns (:mod:`harness.core.schema`), the defaults, the worker protocol (:meth:`Case.message`),
:meth:`Case.from_row`, the one label function (:func:`label`) and the key lists that reports
group by (:func:`axis_names`). Adding a field is one declaration here.

Inference shapes: ``seq_len`` is the key/value length; ``q_len`` the query length when it
differs (None: the same, self-attention); ``kv_layout`` contiguous or paged (``page_size``
tokens per page); ``lengths`` fixed, or per-sequence lengths (:mod:`harness.core.lengths`), or a
serving batch whose sequences each have their own query and key/value lengths. Workloads people run:
``model`` names a catalogue model (:mod:`harness.core.models`) whose geometry fills the head fields;
``shared_prefix`` is a prompt every sequence of the batch shares (cascade attention reads it once).
Fields declared ``later`` stay out of the identity (and of the worker protocol and the label)
while they hold their defaults, so every case that existed before them keeps its ``case_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.core import lengths as _lengths
from harness.core import models as _models

DEVICES = ("cpu", "cuda")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = ("float32", "bfloat16", "float16")
INPUT_KINDS = ("gaussian", "structured")
KV_LAYOUTS = ("contiguous", "paged")

#: Bytes per element of each dtype name.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

#: Python type of each column dtype (the schema's names).
PY_TYPES: dict[str, type] = {"string": str, "int64": int, "float64": float, "bool": bool}


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA/NaT: a table's empty cell."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        type(value).__name__ in ("NAType", "NaTType")


def json_value(value: Any) -> Any:
    """A table cell as JSON holds it: numpy scalars as Python ones; empty (:func:`is_missing`) and
    non-finite numbers as None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return None if is_missing(value) or (isinstance(value, float) and not math.isfinite(value)) else value


def decode_params(value: Any) -> dict[str, Any]:
    """A row's ``params`` (JSON text, a dict, or empty) as a dict; ``{}`` when it is not a JSON object."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str) or not value:
        return {}
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


_SAME = object()  # an Axis's suite default: the field's own default


@dataclass(frozen=True)
class Axis:
    """How one :class:`Case` field appears everywhere: as a suite key, a result column, in the worker
    protocol and in labels. ``label(values) -> str`` gives the field's fragment of the case's label
    ("" for none) from all the case's values (some fragments read a neighbour: ``H8/2``)."""

    help: str
    dtype: str  # the result column's type: string, int64, float64 or bool
    unit: str = ""
    choices: tuple[Any, ...] = ()
    ge: float | None = None
    #: a key of the suite's sweep (``[defaults]``, ``[sweep]``, ``[[variant]]``)
    sweep: bool = True
    #: the key's default in a suite when it differs from the field's (kv_heads: None, i.e. heads)
    sweep_default: Any = _SAME
    #: a validator of its own, ``value -> (value, problem or None)``, for the suite key
    parse: Callable[[Any], tuple[Any, str | None]] | None = None
    #: a list of integers is one value of this key (``lengths = [100, 7, 512]``), not a sweep of them
    list_value: bool = False
    #: joined the identity after case ids existed: left out of the case id, the worker protocol and
    #: the label while at its default; absent from older runs' tables (read as its default)
    later: bool = False
    label: Callable[[Mapping[str, Any]], str] | None = None
    #: an attention feature (harness.core.features): a variant runs a case that sets it only when its
    #: Supports declares the field of the same name
    feature: bool = False

    @property
    def type(self) -> type:
        return PY_TYPES[self.dtype]


def axis(default: Any = dataclasses.MISSING, **declaration: Any) -> Any:
    """A :class:`Case` field with its :class:`Axis` declaration."""
    meta = {"axis": Axis(**declaration)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta, hash=False)
    return field(default=default, metadata=meta)


def _head(c: Mapping[str, Any]) -> str:
    inner = ",".join(f"{k}={v}" for k, v in sorted(decode_params(c["params"]).items()))
    return f"{c['variant']}({inner})" if inner else str(c["variant"])


def _length(c: Mapping[str, Any]) -> str:
    return f"L{c['seq_len']}" if c["q_len"] is None else f"Lq{c['q_len']} Lkv{c['seq_len']}"



@dataclass(frozen=True)
class Case:
    """One measurement: a variant with its parameters on one shape, dtype, device and mode."""

    variant: str = axis(help="registered variant name", dtype="string", sweep=False, label=_head)
    params: dict[str, Any] = axis({}, help="JSON of the variant's own parameters (sorted keys)", dtype="string",
                                  sweep=False)
    device: str = axis("cpu", help="where the case runs: cpu or cuda", dtype="string", choices=DEVICES,
                       label=lambda c: f"{c['device']} {c['dtype']}")  # the dtype beside it
    mode: str = axis("fwd", help="forward, backward alone, or both: fwd, bwd or fwd_bwd", dtype="string",
                     choices=MODES, label=lambda c: str(c["mode"]))
    batch: int = axis(1, help="batch size B", dtype="int64", ge=1, label=lambda c: f"B{c['batch']}")
    heads: int = axis(8, help="query heads H", dtype="int64", ge=1, label=lambda c: f"H{c['heads']}" + (
        f"/{c['kv_heads']}" if c["kv_heads"] != c["heads"] else ""))
    kv_heads: int = axis(8, help="key/value heads (fewer than heads: grouped-query); a suite's default: heads",
                         dtype="int64", ge=1, sweep_default=None)  # labelled with heads: H8/2
    seq_len: int = axis(1024, help="sequence length L (with q_len: the key/value length)", dtype="int64",
                        unit="tokens", ge=1, label=_length)
    head_dim: int = axis(64, help="head dimension D", dtype="int64", ge=1, label=lambda c: f"D{c['head_dim']}")
    dtype: str = axis("float32", help="element type of q, k, v: float32, bfloat16 or float16", dtype="string",
                      choices=DTYPES)  # labelled with device: cpu float32
    causal: bool = axis(False, help="causal masking", dtype="bool", label=lambda c: "causal" if c["causal"] else "")
    inputs: str = axis("gaussian", help="input distribution: gaussian or structured (see "
                       "docs/explanation/measurement.md)", dtype="string", choices=INPUT_KINDS,
                       label=lambda c: "" if c["inputs"] == "gaussian" else str(c["inputs"]))
    q_len: int | None = axis(None, help="query length when it differs from seq_len (1: decode); in a suite, with "
                             "kv_len instead of seq_len; empty: the same", dtype="int64", unit="tokens", ge=1,
                             later=True)  # labelled with seq_len: Lq1 Lkv4096
    kv_layout: str = axis("contiguous", help="KV cache layout: contiguous, or paged (a pool of pages and a block "
                          "table)", dtype="string", choices=KV_LAYOUTS, later=True,
                          label=lambda c: f"paged/{c['page_size']}" if c["kv_layout"] == "paged" else "")
    page_size: int | None = axis(None, help="tokens per page of a paged KV cache (empty: contiguous)",
                                 dtype="int64", unit="tokens", ge=1, later=True)  # labelled with kv_layout
    lengths: str = axis("fixed", help="per-sequence lengths: fixed, uniform, zipf, or a list (the maximum: seq_len "
                        "or kv_len)", dtype="string", parse=_lengths.parse, list_value=True, later=True,
                        label=lambda c: f"lengths={c['lengths']}" if c["lengths"] != "fixed" else "")
    # attention features (harness.core.features gives each one's exact definition)
    softcap: float = axis(0.0, help="tanh logit cap c: each scaled score s becomes c·tanh(s/c) (0: off)",
                          dtype="float64", ge=0, later=True, feature=True,
                          label=lambda c: f"softcap={c['softcap']:g}" if c["softcap"] else "")
    alibi: bool = axis(False, help="ALiBi: add −m_h·|query position − key position| to the scores, m_h the ALiBi "
                       "paper's slope of head h", dtype="bool", later=True, feature=True,
                       label=lambda c: "alibi" if c["alibi"] else "")
    sinks: bool = axis(False, help="attention sinks: one learned logit per head joins each softmax's denominator "
                       "(gpt-oss); drawn from the suite's seed", dtype="bool", later=True, feature=True,
                       label=lambda c: "sinks" if c["sinks"] else "")
    v_head_dim: int | None = axis(None, help="value (and output) head size when it differs from head_dim (e.g. "
                                  "192/128); empty: head_dim", dtype="int64", ge=1, later=True, feature=True,
                                  label=lambda c: f"Dv{c['v_head_dim']}" if c["v_head_dim"] is not None else "")
    sliding_window: int | None = axis(
        None, help="sliding window w: a query at position p sees keys p−w ≤ j ≤ p+w (j ≤ p when causal), positions "
        "aligned to the bottom right; empty: none", dtype="int64", unit="tokens", ge=0, later=True, feature=True,
        label=lambda c: f"window={c['sliding_window']}" if c["sliding_window"] is not None else "")
    prefix_lm: int = axis(0, help="prefix-LM: with causal masking every query also sees the first P keys (0: off; "
                          "no effect without causal)", dtype="int64", unit="tokens", ge=0, later=True, feature=True,
                          label=lambda c: f"prefix={c['prefix_lm']}" if c["prefix_lm"] else "")
    document: int = axis(1, help="documents packed in each sequence: a query sees only keys of its own document "
                         "(1: off)", dtype="int64", ge=1, later=True, feature=True,
                         label=lambda c: f"docs={c['document']}" if c["document"] > 1 else "")
    # workloads people run (issue 28): a model's geometry from the catalogue, a shared prefix
    model: str | None = axis(None, help="a model of the catalogue (harness.core.models) whose attention geometry "
                             "fills heads, kv_heads and head_dim (and an attention layer's d_model)", dtype="string",
                             choices=_models.NAMES, later=True, label=lambda c: str(c["model"]) if c["model"] else "")
    shared_prefix: int | None = axis(
        None, help="tokens at the start of every sequence's context that all the batch's sequences share (one system "
        "prompt; empty: none)", dtype="int64", unit="tokens", ge=1, later=True,
        label=lambda c: f"shared_prefix={c['shared_prefix']}" if c["shared_prefix"] else "")

    def __post_init__(self):
        for name, ax in AXES.items():  # 30 and 30.0 are one softcap, one case id
            value = getattr(self, name)
            if ax.dtype == "float64" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    @classmethod
    def from_point(cls, variant: str, params: dict[str, Any], point: dict[str, Any]) -> Case:
        """The case of one point of a suite's sweep (its sweep keys), normalised: ``kv_heads``
        defaults to ``heads``, ``kv_len`` is ``seq_len``, a ``q_len`` equal to it is dropped,
        ``page_size`` only belongs to a paged layout, a ``v_head_dim`` equal to ``head_dim`` is dropped,
        and so is ``prefix_lm`` without causal masking (it changes nothing there); a ``model`` fills its
        geometry (and its features, where their fields hold their defaults) and a serving batch
        (``lengths = "2q512kv4k_14q1kv8k"``) its batch, query and key/value lengths."""
        point = dict(point)
        if point.get("model"):  # its geometry, and its features where a field carries them and holds its default
            point.update(_models.case_geometry(point["model"]))
            for name, value in _models.case_features(point["model"]).items():
                if name in AXES and point.get(name, DEFAULTS[name]) == DEFAULTS[name] \
                        and isinstance(value, AXES[name].type):
                    point[name] = value
        if point.get("kv_heads") is None:
            point["kv_heads"] = point.get("heads", DEFAULTS["heads"])
        kv_len = point.pop("kv_len", None)
        if kv_len is not None:
            point["seq_len"] = kv_len
        point.update(_lengths.mix_shape(point.get("lengths")) or {})
        if point.get("q_len") == point.get("seq_len"):
            point["q_len"] = None
        if point.get("kv_layout", "contiguous") != "paged":
            point["page_size"] = None
        if point.get("v_head_dim") is not None and point["v_head_dim"] == point.get("head_dim", DEFAULTS["head_dim"]):
            point["v_head_dim"] = None  # the value head size is head_dim: the plain case
        if not point.get("causal", DEFAULTS["causal"]):
            point["prefix_lm"] = 0  # a non-causal query already sees every key
        return cls(variant=variant, params=params, **point)

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    def values(self) -> dict[str, Any]:
        """Every field's value (``params`` as a dict)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def key(self) -> dict[str, Any]:
        """Everything that defines what this case measures (its identity)."""
        d = self.values()
        d["params"] = self.params_json
        return {name: v for name, v in d.items() if not (AXES[name].later and v == DEFAULTS[name])}

    @property
    def case_id(self) -> str:
        blob = json.dumps(self.key, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def message(self) -> dict[str, Any]:
        """The case as the worker protocol sends it: fields declared ``later`` only when they differ
        from their defaults, so that a worker of an older commit (``bench compare --confirm``
        re-running a baseline) still reads every case it could have run."""
        return {name: v for name, v in self.values().items() if not (AXES[name].later and v == DEFAULTS[name])}

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
    def value_dim(self) -> int:
        """Head size of v and of the output (``v_head_dim``, else ``head_dim``)."""
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def features(self) -> dict[str, Any]:
        """The attention features this case sets (fields declared ``feature``, away from their defaults)."""
        return {n: getattr(self, n) for n in FEATURES if getattr(self, n) != DEFAULTS[n]}

    @property
    def inference_shaped(self) -> bool:
        """Queries and keys of different lengths, a paged cache or a variable-length batch."""
        return self.q_len is not None or self.kv_layout != "contiguous" or self.lengths != "fixed"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Case:
        """The case a result row measured; ``ValueError`` when the row's ``case_id`` does not match it
        (``KeyError`` when it lacks a field every run has). A field declared ``later`` that the row
        lacks (written before it existed) or leaves empty takes its default."""
        values: dict[str, Any] = {}
        for name, ax in AXES.items():
            if name == "params":
                continue
            value = row.get(name) if ax.later else row[name]
            values[name] = DEFAULTS[name] if ax.later and is_missing(value) else ax.type(value)
        raw = row.get("params") or "{}"
        case = cls(**{**values, "params": json.loads(raw) if isinstance(raw, str) else dict(raw)})
        if "case_id" in row and case.case_id != row["case_id"]:
            raise ValueError(f"case {row['case_id']} cannot be rebuilt from its row (got {case.case_id})")
        return case

    def label(self) -> str:
        return label(self)


#: Every field's declaration, in field order.
AXES: dict[str, Axis] = {f.name: f.metadata["axis"] for f in dataclasses.fields(Case)}
#: Every field's default (``variant`` has none: None).
DEFAULTS: dict[str, Any] = {
    f.name: (f.default if f.default is not dataclasses.MISSING else
             f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    for f in dataclasses.fields(Case)
}
#: The attention features (harness.core.features): each a field declared ``feature``, and a flag of
#: harness.core.registry.Supports of the same name.
FEATURES: tuple[str, ...] = tuple(n for n, ax in AXES.items() if ax.feature)
#: The fields that give a case's head geometry (an attention layer's shape beside its width).
HEAD_GEOMETRY: tuple[str, ...] = ("heads", "kv_heads", "head_dim")
#: The fields that give a workload's size: ``harness.dispatch`` matches the others exactly and measures
#: the distance between workloads over these (the query length is ``q_len``, else ``seq_len``).
SIZE_AXES: tuple[str, ...] = ("batch", "seq_len", "q_len")
#: Keys a suite may sweep that are not fields: ``kv_len`` is ``seq_len`` given beside ``q_len`` (a
#: suite's keys are listed, and swept, in field order with an alias after the field it follows).
SWEEP_ALIASES: dict[str, tuple[str, Axis]] = {
    "kv_len": ("q_len", Axis(help="key/value (cache) length; with q_len, instead of seq_len", dtype="int64", ge=1)),
}


def axis_names(exclude: tuple[str, ...] = (), *, later: bool | None = None) -> tuple[str, ...]:
    """The fields that describe a case's shape and setting (every field but ``variant`` and ``params``),
    in field order, less ``exclude``; only those declared ``later`` (True) or not (False) if asked.
    Reports group rows by these, so a field added to :class:`Case` joins every grouping by itself."""
    return tuple(n for n, ax in AXES.items() if n not in ("variant", "params", *exclude)
                 and (later is None or ax.later == later))


def sweep_defaults() -> dict[str, Any]:
    """Each sweep key's default in a suite (``kv_len``: None, i.e. ``seq_len``)."""
    out: dict[str, Any] = {}
    for name, ax in AXES.items():
        if ax.sweep:
            out[name] = DEFAULTS[name] if ax.sweep_default is _SAME else ax.sweep_default
        out.update({alias: None for alias, (after, _) in SWEEP_ALIASES.items() if after == name})
    return out


def sweep_axis(name: str) -> Axis:
    """The declaration of a sweep key: a field's, or an alias's."""
    return SWEEP_ALIASES[name][1] if name in SWEEP_ALIASES else AXES[name]


def _normalised(values: Case | Mapping[str, Any]) -> dict[str, Any]:
    """Every field's value from a case or a result row: an empty or absent cell takes the field's
    default (``kv_heads``: ``heads``)."""
    if isinstance(values, Case):
        return values.values()
    out: dict[str, Any] = {}
    for name, ax in AXES.items():
        v = values.get(name)
        if is_missing(v):
            v = values.get("heads") if name == "kv_heads" else DEFAULTS[name]
        elif ax.dtype in ("int64", "bool") and not isinstance(v, str):
            try:  # a table's integer column with empty cells reads back as floats (1.0)
                v = ax.type(v)
            except (TypeError, ValueError, OverflowError):
                pass
        out[name] = v
    return out


def label(values: Case | Mapping[str, Any]) -> str:
    """The one label of a case, for a :class:`Case` or any result row (an old run's, a partial one):
    ``naive(block=32) cpu float32 fwd B1 H8/2 L1024 D64 causal structured`` — every field whose
    value is not implied (fields declared ``later`` only when set)."""
    c = _normalised(values)
    parts = (ax.label(c) for ax in AXES.values() if ax.label is not None)
    return " ".join(p for p in parts if p)
