"""Attention Bench: measure attention implementations on your own hardware.

Public API (imported lazily, so ``bench --help`` does not pay for torch)::

    from harness import register_variant, get_variant, list_variants, Param, Supports
    from harness import attention_flops, pair_flops, Case, masks
    from harness import models    # the catalogue of real model geometries (harness.core.models)
    from harness import dispatch  # pick the measured winner for a shape (bench winners RUN --format json)

Layers (see docs/architecture.md): ``harness.core`` (the vocabulary: cases,
registry, masks, FLOP rules, result schema), ``harness.measure`` (timing, memory, FLOPs,
accuracy, the machine), ``harness.engine`` (suite → cases → executor → worker → rows → store),
``harness.regression`` (history, statistics, verdicts, compare, confirm, change points),
``harness.cli`` (argument parsing only).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> (module, attribute or None for the module itself)
_PUBLIC = {
    "Param": ("harness.core.registry", "Param"),
    "RegistryError": ("harness.core.registry", "RegistryError"),
    "Supports": ("harness.core.registry", "Supports"),
    "Variant": ("harness.core.registry", "Variant"),
    "register_variant": ("harness.core.registry", "register_variant"),
    "get_variant": ("harness.core.registry", "get_variant"),
    "list_variants": ("harness.core.registry", "list_variants"),
    "attention_flops": ("harness.core.flops", "attention_flops"),
    "pair_flops": ("harness.core.flops", "pair_flops"),
    "pair_count": ("harness.core.flops", "pair_count"),
    "Case": ("harness.core.cases", "Case"),
    "masks": ("harness.core.masks", None),
    "models": ("harness.core.models", None),
    "dispatch": ("harness.dispatch", None),
}

__all__ = [*sorted(_PUBLIC), "__version__"]  # noqa: PLE0604  (the names of _PUBLIC, the one list)


def __getattr__(name: str):
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'harness' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
