"""Attention Bench: measure attention implementations on your own hardware.

Public API::

    from harness import register_variant, get_variant, list_variants, Param, Supports
"""

from harness.flops import attention_flops, pair_flops
from harness.registry import (
    Param,
    RegistryError,
    Supports,
    Variant,
    get_variant,
    list_variants,
    register_variant,
)

__version__ = "0.1.0"

__all__ = [
    "Param",
    "RegistryError",
    "Supports",
    "Variant",
    "attention_flops",
    "get_variant",
    "list_variants",
    "pair_flops",
    "register_variant",
    "__version__",
]
