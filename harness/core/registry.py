"""The variant registry: every attention implementation the harness can measure.

A variant is a plain function ``fn(q, k, v, *, causal, **params) -> out`` with
q ``(B, H, L, D)``, k and v ``(B, H_kv, L, D)`` and out ``(B, H, L, D)``, scaled by
``1/sqrt(D)``. Registering it declares what it is (family, exact or approximate),
what it supports (devices, dtypes, causal, grouped-query, head dims, backward),
its own parameters, and its analytic FLOP count::

    from harness import register_variant, Param, Supports

    @register_variant(
        "my_attention",
        family="dense",
        exact=True,
        supports=Supports(devices={"cpu"}),
        params={"block": Param(64, min=1, help="query block size")},
    )
    def my_attention(q, k, v, *, causal, block=64):
        ...

``family`` must be one of :data:`FAMILIES`. ``flops`` (forward FLOPs of a case)
defaults to :func:`~harness.core.flops.attention_flops` for an exact variant
without a mask; an approximate or masked variant declares its own. ``baseline=True``
marks an exact variant the report may compare others with (``sdpa`` declares it).

Optional hooks: ``check(case) -> [reasons]`` for variant-specific limits,
``mask(case) -> mask_mod`` for the pattern the float64 reference applies (default:
causal or none, and the case's mask features), ``score_mod(case) -> score_mod`` for the
FlexAttention-style score modifier it applies (default: the case's softcap and ALiBi, or none),
``working_set(case) -> bytes`` for the memory-budget check, and
``columns(case) -> {name: value}`` for extra row columns (e.g. a sparse pattern's
``density``).

Cases a variant cannot run become ``skipped`` rows whose reason is the variant's
own words (:meth:`Variant.not_supported_reasons`: every declared limit the case
violates and every ``check`` reason, all at once, as in xformers' operators).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.metadata
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.core.cases import DTYPES, MODES
from harness.core.errors import UserError
from harness.core.flops import attention_flops
from harness.core.supports import Supports, feature_reasons, head_dim_range, inference_reasons

if TYPE_CHECKING:
    from harness.core.cases import Case


class RegistryError(UserError):
    """A variant could not be registered or found (a user-facing, one-line message)."""


@dataclass(frozen=True)
class Family:
    """A kind of attention implementation; the report groups and compares by it."""

    name: str
    help: str
    #: exact, but attends only part of the (query, key) pairs by a pattern: the report finds the
    #: length from which it beats the dense baseline, as it does for every approximate variant
    pattern: bool = False


#: The families a variant may declare (registering another is a RegistryError).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("dense", "exact attention over every (query, key) pair"),
        Family("memory_efficient", "exact, tiled with an online softmax: the L×L scores never held at once"),
        Family("compiled", "exact, a compiler-generated kernel (torch.compile, FlexAttention)"),
        Family("fused", "exact, a hand-written fused kernel (Triton, CUDA)"),
        Family("local", "a band of keys around each query", pattern=True),
        Family("sparse", "a block-sparse pattern of keys", pattern=True),
        Family("linear", "kernelised attention, linear in L (approximate)"),
        Family("low_rank", "keys and values projected to fewer rows or landmarks (approximate)"),
        Family("quantised", "low-precision arithmetic: int8/fp8 scores, quantised K/V"),
        Family("inference", "decoding, paged KV caches, variable-length batches"),
        Family("distributed", "attention split across devices (ring, context-parallel)"),
        Family("layer", "a whole attention layer, projections included"),
    )
}
#: What a variant's function is: an attention kernel on (q, k, v) (the default), a factory of a whole
#: attention layer measured on hidden states (harness.engine.layerrun), or a kernel run across
#: ``world_size`` ranks of a process group that the harness launches (harness.engine.ranks).
LEVELS = ("kernel", "layer", "distributed")
#: Families whose exact variants skip work by a pattern (see :attr:`Family.pattern`).
PATTERN_FAMILIES: frozenset[str] = frozenset(f.name for f in FAMILIES.values() if f.pattern)


def family_problem(family: Any) -> str | None:
    """Why ``family`` cannot be declared (None: it can), naming the allowed families."""
    if family in FAMILIES:
        return None
    close = difflib.get_close_matches(str(family), list(FAMILIES), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown family {family!r}{hint}; allowed: {', '.join(FAMILIES)}"


@dataclass(frozen=True)
class Param:
    """One of a variant's own parameters, as a suite may set or sweep it."""

    default: Any
    choices: tuple[Any, ...] = ()
    min: float | None = None
    help: str = ""

    @property
    def kind(self) -> type[Any]:
        return type(self.default)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable for this parameter, or None."""
        kind = self.kind
        if any(value == c and type(value) is type(c) for c in self.choices):  # choices may mix types ("auto", 4)
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"expected {kind.__name__}, got {type(value).__name__} {value!r}"
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of {', '.join(map(repr, self.choices))}"
        if self.min is not None and value < self.min:
            return f"must be >= {self.min:g}, got {value!r}"
        return None


FlopFn = Callable[["Case"], float]
CheckFn = Callable[["Case"], "list[str]"]
MaskFactory = Callable[["Case"], Any]
ScoreModFactory = Callable[["Case"], Any]
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
    columns: Callable[[Case], dict[str, Any]] | None = None
    baseline: bool = False
    source: str = "builtin"
    #: ``factory(case) -> score_mod``: the score modifier the float64 reference applies (None: the case's own)
    score_mod: ScoreModFactory | None = None
    #: the variant's own output tolerances by dtype, (max abs, rel), over the harness's defaults
    #: (harness.measure.reference.TOLERANCE); None: the defaults
    tolerance: dict[str, tuple[float, float]] | None = None
    #: one of LEVELS: how the runner measures it
    level: str = "kernel"

    def __call__(self, q, k, v, *, causal: bool = False, **params):
        return self.fn(q, k, v, causal=causal, **params)

    def with_inputs(self, extra: dict[str, Any]) -> Variant:
        """This variant with ``extra`` keyword inputs (``q_lens``, ``kv_lens``, ``block_table`` of an
        inference-shaped case, :func:`harness.measure.inputs.layout_inputs`) passed on every call;
        ``shared_prefix`` only when it declares ``Supports(shared_prefix=True)``."""
        if "shared_prefix" in extra and not self.supports.shared_prefix:
            extra = {k: v for k, v in extra.items() if k != "shared_prefix"}
        return dataclasses.replace(self, fn=functools.partial(self.fn, **extra)) if extra else self

    def not_supported_reasons(self, case: Case) -> list[str]:
        """Human-readable reasons this variant cannot run ``case`` (empty: it can).

        All of them at once: every declared limit the case violates, then ``check``'s reasons.
        """
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
        reasons.extend(inference_reasons(self.name, s, case))
        reasons.extend(feature_reasons(self.name, s, case))
        if self.check is not None:
            reasons.extend(r for r in self.check(case) if r not in reasons)
        return reasons

    def reference_mask(self, case: Case):
        """The mask_mod (harness.core.masks) whose dense float64 attention this variant is measured against."""
        from harness.core import masks

        if self.mask is not None:
            return self.mask(case)
        return masks.case_mask(case)

    def reference_score_mod(self, case: Case):
        """The FlexAttention-style score_mod (or None) the float64 reference applies for this variant: its
        own (``register_variant(score_mod=...)``), else the case's softcap and ALiBi."""
        from harness.core import masks

        if self.score_mod is not None:
            return self.score_mod(case)
        return masks.case_score_mod(case)

    def describe(self) -> dict[str, Any]:
        s = self.supports
        return {
            "name": self.name,
            "family": self.family,
            "exact": self.exact,
            "baseline": self.baseline,
            "level": self.level,
            "devices": sorted(s.devices),
            "dtypes": sorted(s.dtypes),
            "causal": s.causal,
            "non_causal": s.non_causal,
            "gqa": s.gqa,
            "backward": s.backward,
            "head_dim": head_dim_range(s),
            "non_square": s.non_square,
            "varlen": s.varlen,
            "kv_layouts": sorted(s.kv_layouts),
            "takes_shared_prefix": s.shared_prefix,
            "features": list(s.features),
            "score_mod": self.score_mod is not None,
            "params": {n: p.default for n, p in self.params.items()},
            "description": self.description,
            "source": self.source,
        }


def tolerance_problem(tolerance: Any) -> str | None:
    """Why ``tolerance`` is not ``{dtype: (max abs, rel)}`` with non-negative numbers, or None."""
    if not isinstance(tolerance, dict):
        return f"tolerance must be a dict {{dtype: (max abs, rel)}}, got {type(tolerance).__name__}"
    for dtype, pair in tolerance.items():
        if dtype not in DTYPES:
            return f"tolerance: unknown dtype {dtype!r}; one of {', '.join(DTYPES)}"
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in pair)):
            return f"tolerance[{dtype!r}] must be (max abs, rel), two numbers >= 0, got {pair!r}"
    return None


_REGISTRY: dict[str, Variant] = {}
_LOADED = False
_LOCK = threading.RLock()
_CURRENT_SOURCE = ["builtin"]


def register_variant(
    name: str,
    *,
    family: str,
    exact: bool,
    flops: FlopFn | None = None,
    supports: Supports | None = None,
    params: dict[str, Param] | None = None,
    description: str = "",
    check: CheckFn | None = None,
    mask: MaskFactory | None = None,
    working_set: BytesFn | None = None,
    columns: Callable[[Case], dict[str, Any]] | None = None,
    baseline: bool = False,
    tolerance: dict[str, tuple[float, float]] | None = None,
    level: str = "kernel",
    score_mod: ScoreModFactory | None = None,
):
    """Decorator: register ``fn`` as attention variant ``name``; returns the :class:`Variant`.

    ``tolerance``: ``{dtype: (max abs, rel)}``, the error against the float64 reference beyond
    which an exact variant's answer is ``incorrect``, where the harness's default for that dtype
    does not fit the algorithm (e.g. ``{"bfloat16": (0.05, 0.02)}``).

    ``score_mod``: ``factory(case) -> score_mod(score, b, h, q_idx, kv_idx)``, the FlexAttention-style
    score modifier the variant applies (attention-gym's ``generate_tanh_softcap(20)``, for one), which
    the float64 reference then applies too; it replaces the case's own softcap and ALiBi there, as
    ``mask`` replaces the case's mask. FLOPs count the matmuls only (harness.core.features), so the
    default ``flops`` holds; declare ``flops=`` to count otherwise.

    Raises RegistryError (one line) for an unknown family, a missing ``flops`` where no
    default applies, a non-exact baseline, a malformed ``tolerance``, or a name that is already
    registered.
    """
    problem = family_problem(family)
    if problem is None and flops is None and not exact:
        problem = "an approximate variant must declare flops= (the FLOPs it really does)"
    if problem is None and flops is None and mask is not None:
        problem = "a variant with a mask must declare flops= (e.g. pair_flops(case, attended pairs))"
    if problem is None and baseline and not exact:
        problem = "only an exact variant can be a baseline"
    if problem is None and tolerance is not None:
        problem = tolerance_problem(tolerance)
    if problem is None and level not in LEVELS:
        problem = f"unknown level {level!r}; one of {', '.join(LEVELS)}"
    if problem is not None:
        raise RegistryError(f"variant {name!r} from {_CURRENT_SOURCE[-1]}: {problem}")

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
                flops=flops if flops is not None else attention_flops,
                supports=supports or Supports(),
                params=dict(params or {}),
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
                check=check,
                mask=mask,
                working_set=working_set,
                columns=columns,
                baseline=bool(baseline),
                source=_CURRENT_SOURCE[-1],
                tolerance={d: (float(a), float(r)) for d, (a, r) in tolerance.items()} if tolerance else None,
                level=level,
                score_mod=score_mod,
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


def load_builtins() -> None:
    """Register the built-in variants (package ``variants``) and installed entry points, once."""
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        importlib.import_module("variants")
        load_entry_points()


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``; RegistryError (with the closest names) if none."""
    load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise RegistryError(f"unknown variant {name!r}{hint}") from None


def list_variants() -> list[Variant]:
    """All registered variants, sorted by family then name."""
    load_builtins()
    return sorted(_REGISTRY.values(), key=lambda v: (v.family, v.name))


def variant_names() -> list[str]:
    load_builtins()
    return list(_REGISTRY)


#: Installed packages register variants through this entry-point group.
ENTRY_POINT_GROUP = "attention_bench.variants"
_ENTRY_POINTS_LOADED: dict[str, str] = {}


class PluginError(RegistryError):
    """A plugin could not be loaded (one line naming the plugin)."""


def load_entry_points() -> list[str]:
    """Load every installed ``attention_bench.variants`` entry point; returns their names."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry-point:{ep.value}"
        if key in _ENTRY_POINTS_LOADED:
            continue
        try:
            with registering_from(f"entry point {ep.name} ({ep.value})"):
                ep.load()
        except RegistryError as exc:
            raise PluginError(f"entry point {ep.name!r}: {exc}") from None
        except Exception as exc:
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from None
        _ENTRY_POINTS_LOADED[key] = ep.name
        loaded.append(ep.name)
    return loaded
