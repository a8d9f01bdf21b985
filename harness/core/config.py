"""Every setting a suite file takes, declared once, and the one validator for all of them.

A suite's ``[timing]``, ``[run]`` and ``[compare]`` tables and its sweep keys (``[defaults]``,
``[sweep]``, overrides inside ``[[variant]]``) are described here as :class:`Key` declarations:
name, type, default, range or choices, and a one-line help. :meth:`Table.check` validates a
table against them and returns the values to use with ``(key, message)`` problems, all at
once; :mod:`harness.engine.suite` turns those into ``FILE:LINE: TABLE.KEY: message`` lines.
:class:`TimingConfig` and :class:`RunConfig` are plain frozen dataclasses whose fields are declared
with :func:`setting`, and :data:`TIMING` and :data:`RUN` are made from them (:meth:`Table.of`); the
sweep keys are generated from the case fields' declarations (:mod:`harness.core.cases`). Adding a
key is one declaration. :class:`RunSettings` is what every executor and worker receives.

This module imports nothing of the harness but :mod:`harness.core.cases` (no torch, numpy or
pandas), so the measurement layer (``harness.measure.timing``) and the command line can read it.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from harness.core.cases import sweep_axis, sweep_defaults

#: The variable ``[run] allocator = "thp"`` sets in the worker processes (harness.measure.environment).
ALLOCATOR_ENV = "THP_MEM_ALLOC_ENABLE"

#: How a value's type is named in messages (TOML's names).
_TYPE_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
#: What a key of each type expects, in messages.
_EXPECTS = {bool: "boolean (true or false)", int: "integer", float: "number", str: "string",
            dict: "table of name = number"}


def type_name(value: Any) -> str:
    """TOML's name for the type of ``value``: boolean, integer, float, string, array, table."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def closest(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Key:
    """One setting: its type (bool, int, float, str, or dict: a table of ``name = number``), default,
    allowed range (``ge``/``gt``/``le``/``lt``) or ``choices``, and help. For a dict key, ``choices``
    are the names its table may hold (``names`` says what they are) and the range applies to each value.
    """

    name: str
    type: type
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    names: str = "name"
    #: a validator of its own, ``value -> (value to use, problem or None)``, instead of type and range
    parse: Callable[[Any], tuple[Any, str | None]] | None = None
    #: a list of integers is one value of this key (``lengths = [100, 7, 512]``), not a sweep of them
    list_value: bool = False

    @property
    def annotation(self) -> str:
        kind = "dict[str, float]" if self.type is dict else self.type.__name__
        return f"{kind} | None" if self.default is None else kind

    def range_text(self) -> str:
        """The allowed range in words: 'a positive integer', '>= 0', '> 0 and < 1', or ''."""
        if self.type is int and self.ge == 1 and self.le is None and self.lt is None:
            return "a positive integer"
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        parts = [f"{op} {bound}" for op, bound in bounds if bound is not None]
        return " and ".join(parts)

    def check(self, value: Any) -> tuple[Any, str | None]:
        """(the value to use, None) or (value, problem); integers are accepted where a number is."""
        if self.parse is not None:
            return self.parse(value)
        if self.type is dict:
            return self._check_table(value)
        return self._check_scalar(value, self.type, self.choices)

    def _check_scalar(self, value: Any, kind: builtins.type[Any],
                      choices: tuple[str, ...] = ()) -> tuple[Any, str | None]:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2**1023 else math.inf
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            return value, f"expected {_EXPECTS[kind]}, got {type_name(value)} {value!r}"
        if kind is float and not math.isfinite(value):
            return value, f"must be a finite number, got {value}"
        if choices and value not in choices:
            return value, f"unknown {self.name} {value!r}{closest(value, choices)}; one of {', '.join(choices)}"
        if kind in (int, float) and not (
            (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        ):
            return value, f"must be {self.range_text()}, got {value}"
        return value, None

    def _check_table(self, value: Any) -> tuple[Any, str | None]:
        if not isinstance(value, dict):
            example = f"{{ {self.choices[0]} = {self.default[self.choices[0]]} }}" if self.choices else ""
            return value, f"expected a table of {self.names} = number{', e.g. ' + example if example else ''}"
        out = {}
        for name, item in value.items():
            if self.choices and name not in self.choices:
                return value, (f"unknown {self.names} {name!r}{closest(name, self.choices)}; "
                               f"one of {', '.join(self.choices)}")
            item, problem = self._check_scalar(item, float)
            if problem:
                return value, f"{name}: {problem}"
            out[name] = item
        return out, None


@dataclass(frozen=True)
class Order:
    """``key`` must be ``<=`` (or ``>=``) ``other``; when a file sets ``other`` but not ``key``,
    ``key``'s default gives way (it is clamped to ``other``) instead of contradicting it."""

    key: str
    op: str  # "<=" or ">="
    other: str

    def problem(self, values: Mapping[str, Any]) -> str | None:
        a, b = values[self.key], values[self.other]
        if (a <= b) if self.op == "<=" else (a >= b):
            return None
        return f"{self.key} ({a}) must be {self.op} {self.other} ({b})"

    def give_way(self, values: dict[str, Any]) -> None:
        values[self.key] = (min if self.op == "<=" else max)(values[self.key], values[self.other])


@dataclass(frozen=True)
class Table:
    """A suite table's keys, and the order constraints between them."""

    name: str
    keys: tuple[Key, ...]
    orders: tuple[Order, ...] = ()

    @classmethod
    def of(cls, name: str, settings: type, orders: tuple[Order, ...] = ()) -> Table:
        """The table of a settings dataclass whose fields were declared with :func:`setting`."""
        hints = typing.get_type_hints(settings)
        keys = []
        for f in dataclasses.fields(settings):
            spec = dict(f.metadata["key"])
            kind = spec.pop("type", None) or next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],)
                                                  if t is not type(None))
            keys.append(Key(f.name, kind, f.default, **spec))
        return cls(name, tuple(keys), orders)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)

    def __getitem__(self, name: str) -> Key:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def defaults(self) -> dict[str, Any]:
        return {k.name: (dict(k.default) if isinstance(k.default, Mapping) else k.default) for k in self.keys}

    def unknown(self, name: str) -> str:
        return f"unknown key{closest(name, self.names)}; one of {', '.join(self.names)}"

    def check(self, table: Any) -> tuple[dict[str, Any], list[tuple[str | None, str]]]:
        """(the settings the table gives, converted; problems as (key, message), key None for the
        table itself). Settings that break an order constraint are reported, and still returned."""
        if not isinstance(table, dict):
            return {}, [(None, f"expected a table [{self.name}], got {type_name(table)}")]
        given: dict[str, Any] = {}
        problems: list[tuple[str | None, str]] = []
        for name, value in table.items():
            if name not in self:
                problems.append((name, self.unknown(name)))
                continue
            value, problem = self[name].check(value)
            if problem:
                problems.append((name, problem))
            else:
                given[name] = value
        values = {**self.defaults(), **given}
        for order in self.orders:
            if order.key not in given and order.other in given:
                order.give_way(values)
                given[order.key] = values[order.key]
        return given, problems + self.order_problems(values)

    def order_problems(self, values: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(key, message) for each order constraint ``values`` (every key of the table) break."""
        return [(o.key, p) for o in self.orders if (p := o.problem(values)) is not None]


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A field of a settings dataclass, declared as a suite key (:class:`Key`'s range, choices,
    ``parse`` …; ``type`` when the annotation does not say it)."""
    return dataclasses.field(default=default, metadata={"key": dict(spec, help=help)})


#: ``[timing] processes`` by default: see harness.engine.lifecycle.run_cases and the docs.
DEFAULT_PROCESSES = 2

@dataclass(frozen=True)
class TimingConfig:
    """How one case is timed: the ``[timing]`` table (harness.measure.timing)."""

    warmup: int = setting(3, "warm-up calls (the first call is timed separately)", ge=0)
    min_time_s: float = setting(0.2, "keep sampling until the samples add up to this many seconds", ge=0)
    max_reps: int = setting(100, "stop after this many samples", ge=1)
    min_reps: int = setting(3, "take at least this many samples", ge=1)
    threads: int | None = setting(None, "torch intra-op threads (default: PyTorch's choice, all cores)", ge=1)
    target_precision: float = setting(
        0.01, "stop once the confidence interval of the median is within ± this fraction of it (0: off)", ge=0, le=1)
    confidence: float = setting(0.95, "confidence level of that interval", gt=0, lt=1)
    max_time_s: float = setting(5.0, "per-case sampling budget in seconds; never cuts below min_reps", ge=0)
    rotate_inputs: bool = setting(True, "rotate copies of the inputs when one set fits in the last-level cache")
    cuda_graph: bool = setting(False, "CUDA: time a captured CUDA graph's replay")
    flush_l2: bool = setting(True, "CUDA: overwrite a buffer larger than L2 before every sample")
    processes: int = setting(
        DEFAULT_PROCESSES, "fresh worker processes that time each case, one round each; the time is the median of "
        "their medians, and the row says whether they agree (stable)", ge=1)


TIMING = Table.of("timing", TimingConfig,
                  orders=(Order("min_reps", "<=", "max_reps"), Order("max_time_s", ">=", "min_time_s")))


def _profile_setting(v: Any) -> tuple[Any, str | None]:
    ok = isinstance(v, bool) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
    return v, None if ok else f"expected true, false or an array of variant names, got {type_name(v)} {v!r}"


@dataclass(frozen=True)
class RunConfig:
    """How cases are executed: the ``[run]`` table (harness.engine.lifecycle, harness.engine.executors)."""

    isolation: str = setting(
        "process", "process: each case in a reusable worker process, which survives crashes | none: in the bench "
        "process", choices=("process", "none"))
    executor: str = setting(
        "process", "process: cases one after another on this machine | ray: each case a Ray task on any node of a "
        "Ray cluster (or a local Ray), in its own worker process there (harness.engine.rayexec)",
        choices=("process", "ray"))
    ray_address: str | None = setting(
        None, "the Ray cluster to send cases to (default: RAY_ADDRESS, else a local Ray started for the run)")
    case_timeout_s: float = setting(900.0, "a case with no result by then is killed: status timeout", gt=0)
    memory_budget_gib: float | None = setting(
        None, "skip cases whose estimated working set exceeds this (default: 60% of available memory)", gt=0)
    allocator: str = setting(
        "default", f"default: the workers measure in your environment as it is | thp: {ALLOCATOR_ENV}=1 in the "
        "worker processes (page-aligned, huge-page CPU allocations; needs isolation = process)",
        choices=("default", "thp"))
    contention: str = setting(
        "retry", "what to do with a round other processes contended (harness.measure.contention): retry: run it "
        "again in a fresh process after a short wait, up to contention_retries times, then keep it flagged | flag: "
        "keep it, flagged (contended = true, stable = false) | wait: before each round wait (up to "
        "contention_wait_s) for the machine to be quiet, then flag what is still contended",
        choices=("retry", "flag", "wait"))
    contention_retries: int = setting(2, "contended rounds re-run per case and round before one is kept flagged", ge=0)
    contention_wait_s: float = setting(
        1.0, "retry: seconds to wait before re-running a contended round | wait: longest wait for a quiet machine "
        "before each round", ge=0)
    profile: bool | list[str] = setting(
        False, "profile every case (true) or those of these variants (an array of names) after timing them: one "
        "call under torch.profiler (harness.measure.profile)", type=object, parse=_profile_setting)


RUN = Table.of("run", RunConfig)

#: Tolerances of an exact variant's error growth, by dtype (about one unit roundoff; 8 for float32).
ACCURACY_TOLERANCE = MappingProxyType({"float32": 1e-6, "float16": 5e-4, "bfloat16": 4e-3, "float64": 1e-12})

#: ``[compare]``: what bench compare counts as a change for runs of this suite (harness.regression.compare).
COMPARE = Table("compare", (
    Key("time_threshold", float, 0.05, "smallest time change that counts (a fraction: 0.05 = 5%)", gt=0, lt=1),
    Key("memory_threshold", float, 0.10, "smallest memory change that counts (a fraction)", gt=0, lt=1),
    Key("alpha", float, 0.05, "false-discovery rate across the cases (Benjamini–Hochberg)", gt=0, lt=1),
    Key("accuracy_tolerance", dict, ACCURACY_TOLERANCE,
        "error growth of an exact variant that counts as a regression, by dtype", ge=0,
        choices=tuple(ACCURACY_TOLERANCE), names="dtype"),
))

#: The sweep keys: one value each in ``[defaults]``, lists in ``[sweep]`` and ``[[variant]]``; generated
#: from the declaration of every case field (:data:`harness.core.cases.AXES`) and its aliases.
SWEEP = Table("sweep", tuple(
    Key(name, ax.type, default, ax.help, ge=ax.ge, choices=ax.choices, parse=ax.parse, list_value=ax.list_value)
    for name, default in sweep_defaults().items()
    for ax in (sweep_axis(name),)
))

TABLES: dict[str, Table] = {t.name: t for t in (TIMING, RUN, COMPARE, SWEEP)}



@dataclass(frozen=True)
class RunSettings:
    """Everything an executor and its workers need to measure cases, beside the case itself: one
    frozen, JSON-serialisable value (the worker protocol's first message) instead of loose keyword
    arguments. ``memory_budget``: bytes a case may be estimated to use (None: no check);
    ``memory_budget_explicit``: the user gave it (a CUDA case is otherwise budgeted against the GPU's
    free memory); ``profile``: :func:`harness.measure.profile.request`'s dict, or None."""

    timing: TimingConfig = dataclasses.field(default_factory=TimingConfig)
    seed: int = 0
    memory_budget: int | None = None
    memory_budget_explicit: bool = False
    plugins: tuple[str, ...] = ()
    base_dir: str = "."
    threads: int | None = None
    case_timeout_s: float = 900.0
    profile: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["plugins"] = list(self.plugins)
        d["profile"] = dict(self.profile) if self.profile else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunSettings:
        """The settings a ``to_json`` dict describes (keys it does not know are ignored, so that a worker
        of another commit reads what it can)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        timing = values.get("timing") or {}
        tk = {f.name for f in dataclasses.fields(TimingConfig)}
        values["timing"] = TimingConfig(**{k: v for k, v in timing.items() if k in tk})
        values["plugins"] = tuple(values.get("plugins") or ())
        return cls(**values)
