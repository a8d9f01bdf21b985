"""The variant registry: every attention implementation the harness can measure.

A variant is a plain function ``fn(q, k, v, *, causal, **params) -> out`` with
q ``(B, H, L, D)``, k and v ``(B, H_kv, L, D)`` and out ``(B, H, L, D)``, scaled by
``1/sqrt(D)``. Registering it declares what it is (family, exact or approximate),
what it supports (devices, dtypes, causal, grouped-query, head dims, backward),
its own parameters, and its analytic FLOP count::

    from harness import register_variant, Param, Supports, attention_flops

    @register_variant(
        "my_attention",
        family="dense",
        exact=True,
        supports=Supports(devices={"cpu"}),
        params={"block": Param(64, min=1, help="query block size")},
        flops=attention_flops,
    )
    def my_attention(q, k, v, *, causal, block=64):
        ...

Optional hooks: ``check(case) -> [reasons]`` for variant-specific limits,
``mask(case) -> mask_mod`` for the pattern the float64 reference applies (default:
causal or none), ``working_set(case) -> bytes`` for the memory-budget check, and
``columns(case) -> {name: value}`` for extra row columns (e.g. a sparse pattern's
``density``).

Cases a variant cannot run become ``skipped`` rows whose reason is the variant's
own words (:meth:`Variant.not_supported_reasons`), as in xformers' operators.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from harness.core.cases import DEVICES, DTYPES, MODES

if TYPE_CHECKING:
    from harness.core.cases import Case


class RegistryError(Exception):
    """A variant could not be registered or found (a user-facing, one-line message)."""


@dataclass(frozen=True)
class Param:
    """One of a variant's own parameters, as a suite may set or sweep it."""

    default: Any
    choices: tuple[Any, ...] = ()
    min: float | None = None
    help: str = ""

    @property
    def kind(self) -> type:
        return type(self.default)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable for this parameter, or None."""
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"expected {kind.__name__}, got {type(value).__name__} {value!r}"
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of {', '.join(map(repr, self.choices))}"
        if self.min is not None and value < self.min:
            return f"must be >= {self.min:g}, got {value!r}"
        return None


@dataclass(frozen=True)
class Supports:
    """What a variant can run. ``None`` limits mean unlimited."""

    devices: frozenset[str] = frozenset(DEVICES)
    dtypes: frozenset[str] = frozenset(DTYPES)
    causal: bool = True
    non_causal: bool = True
    gqa: bool = True
    backward: bool = True
    min_head_dim: int | None = None
    max_head_dim: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "devices", frozenset(self.devices))
        object.__setattr__(self, "dtypes", frozenset(self.dtypes))


FlopFn = Callable[["Case"], float]
CheckFn = Callable[["Case"], "list[str]"]
MaskFactory = Callable[["Case"], Any]
BytesFn = Callable[["Case"], float]


@dataclass
class Variant:
    """A registered attention implementation; calling it calls the implementation."""

    name: str
    fn: Callable[..., Any]
    family: str
    exact: bool
    flops: FlopFn
    supports: Supports = field(default_factory=Supports)
    params: dict[str, Param] = field(default_factory=dict)
    description: str = ""
    check: CheckFn | None = None
    mask: MaskFactory | None = None
    working_set: BytesFn | None = None
    columns: Callable[["Case"], dict[str, Any]] | None = None
    source: str = "builtin"

    def __call__(self, q, k, v, *, causal: bool = False, **params):
        return self.fn(q, k, v, causal=causal, **params)

    def not_supported_reasons(self, case: "Case") -> list[str]:
        """Human-readable reasons this variant cannot run ``case`` (empty: it can)."""
        s = self.supports
        reasons = []
        if case.device not in s.devices:
            reasons.append(f"{self.name} runs on {'/'.join(sorted(s.devices))}, not {case.device}")
        if case.dtype not in s.dtypes:
            reasons.append(f"{self.name} supports dtypes {'/'.join(sorted(s.dtypes))}, not {case.dtype}")
        if case.causal and not s.causal:
            reasons.append(f"{self.name} has no causal form")
        if not case.causal and not s.non_causal:
            reasons.append(f"{self.name} is causal only")
        if case.kv_heads != case.heads and not s.gqa:
            reasons.append(f"{self.name} does not support grouped-query attention (kv_heads < heads)")
        if case.mode != "fwd" and not s.backward:
            reasons.append(f"{self.name} has no backward pass")
        if s.max_head_dim is not None and case.head_dim > s.max_head_dim:
            reasons.append(f"{self.name} supports head_dim <= {s.max_head_dim}, not {case.head_dim}")
        if s.min_head_dim is not None and case.head_dim < s.min_head_dim:
            reasons.append(f"{self.name} supports head_dim >= {s.min_head_dim}, not {case.head_dim}")
        if case.mode not in MODES:
            reasons.append(f"unknown mode {case.mode}")
        if not reasons and self.check is not None:
            reasons.extend(self.check(case))
        return reasons

    def reference_mask(self, case: "Case"):
        """The mask_mod (harness.core.masks) whose dense float64 attention this variant is measured against."""
        from harness.core import masks

        if self.mask is not None:
            return self.mask(case)
        return masks.causal if case.causal else None

    def describe(self) -> dict[str, Any]:
        s = self.supports
        return {
            "name": self.name,
            "family": self.family,
            "exact": self.exact,
            "devices": sorted(s.devices),
            "dtypes": sorted(s.dtypes),
            "causal": s.causal,
            "non_causal": s.non_causal,
            "gqa": s.gqa,
            "backward": s.backward,
            "head_dim": _head_dim_range(s),
            "params": {n: p.default for n, p in self.params.items()},
            "description": self.description,
            "source": self.source,
        }


def _head_dim_range(s: Supports) -> str:
    lo, hi = s.min_head_dim, s.max_head_dim
    if lo is None and hi is None:
        return "any"
    return f"{lo or 1}..{hi if hi is not None else ''}"


_REGISTRY: dict[str, Variant] = {}
_LOADED = False
_LOCK = threading.RLock()
_CURRENT_SOURCE = ["builtin"]


def register_variant(
    name: str,
    *,
    family: str,
    exact: bool,
    flops: FlopFn,
    supports: Supports | None = None,
    params: dict[str, Param] | None = None,
    description: str = "",
    check: CheckFn | None = None,
    mask: MaskFactory | None = None,
    working_set: BytesFn | None = None,
    columns: Callable[["Case"], dict[str, Any]] | None = None,
):
    """Decorator: register ``fn`` as attention variant ``name``; returns the :class:`Variant`."""

    def decorate(fn: Callable[..., Any]) -> Variant:
        with _LOCK:
            if name in _REGISTRY:
                raise RegistryError(
                    f"variant {name!r} from {_CURRENT_SOURCE[-1]} is already registered "
                    f"(by {_REGISTRY[name].source})"
                )
            variant = Variant(
                name=name,
                fn=fn,
                family=family,
                exact=exact,
                flops=flops,
                supports=supports or Supports(),
                params=dict(params or {}),
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
                check=check,
                mask=mask,
                working_set=working_set,
                columns=columns,
                source=_CURRENT_SOURCE[-1],
            )
            _REGISTRY[name] = variant
            return variant

    return decorate


@contextmanager
def registering_from(source: str):
    """Attribute variants registered inside this block to ``source`` (a plugin's name)."""
    _CURRENT_SOURCE.append(source)
    try:
        yield
    finally:
        _CURRENT_SOURCE.pop()


def _load_builtins() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        importlib.import_module("variants")
        from harness.engine.plugins import load_entry_points

        load_entry_points()


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``; RegistryError (with the closest names) if none."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise RegistryError(f"unknown variant {name!r}{hint}") from None


def list_variants() -> list[Variant]:
    """All registered variants, sorted by family then name."""
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda v: (v.family, v.name))


def variant_names() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)
