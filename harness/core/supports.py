"""What a variant can run (:class:`Supports`), and the reasons a case is beyond it.

A variant declares its limits once, in :func:`harness.core.registry.register_variant`'s
``supports=``; :meth:`harness.core.registry.Variant.not_supported_reasons` turns every limit a case
breaks into a reason of its own (a ``skipped`` row). Attention features (:mod:`harness.core.features`)
are flags named as the case fields they allow: a case that sets ``softcap`` runs only on a variant
whose ``Supports(softcap=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.core import features as _features
from harness.core.cases import DEVICES, DTYPES, FEATURES

if TYPE_CHECKING:
    from harness.core.cases import Case


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
    #: queries and keys of different lengths (q_len != kv_len), causal aligned to the bottom right
    non_square: bool = False
    #: variable-length batches: takes ``q_lens``/``kv_lens`` keyword arguments
    varlen: bool = False
    #: the KV cache layouts it reads: contiguous tensors, or paged pools with a ``block_table``
    kv_layouts: frozenset[str] = frozenset({"contiguous"})
    #: takes a ``shared_prefix`` keyword argument in shared-prefix cases (the first shared_prefix keys and
    #: values of every sequence are the same tokens: cascade attention); other variants run them plainly
    shared_prefix: bool = False
    # attention features (harness.core.features), each a keyword argument of the call when the case sets it:
    #: tanh logit capping: ``softcap=`` (float)
    softcap: bool = False
    #: ALiBi: ``alibi_slopes=`` (float32 (H,) tensor)
    alibi: bool = False
    #: attention sinks: ``sinks=`` (float32 (H,) tensor of logits)
    sinks: bool = False
    #: v (and the output) with another head size than q and k
    v_head_dim: bool = False
    #: a sliding window: ``window_size=`` (int, keys on each side, bottom-right aligned positions)
    sliding_window: bool = False
    #: prefix-LM with causal masking: ``prefix_len=`` (int)
    prefix_lm: bool = False
    #: documents packed per sequence: ``document_ids=`` (int32 (seq_len,) tensor: each key position's document)
    document: bool = False

    def __post_init__(self):
        object.__setattr__(self, "devices", frozenset(self.devices))
        object.__setattr__(self, "dtypes", frozenset(self.dtypes))
        object.__setattr__(self, "kv_layouts", frozenset(self.kv_layouts))

    @property
    def features(self) -> tuple[str, ...]:
        """The attention features it takes (harness.core.cases.FEATURES it declares)."""
        return tuple(name for name in FEATURES if getattr(self, name, False))


def inference_reasons(name: str, s: Supports, case: Case) -> list[str]:
    """Why ``case``'s inference shape (q_len, lengths, kv_layout) is beyond what ``s`` declares."""
    reasons = []
    if getattr(case, "q_len", None) is not None and not s.non_square:
        reasons.append(f"{name} needs q_len == kv_len (self-attention of equal lengths), "
                       f"not q_len={case.q_len}, kv_len={case.seq_len}")
    if getattr(case, "lengths", "fixed") != "fixed" and not s.varlen:
        reasons.append(f"{name} does not take variable-length batches (lengths = {case.lengths})")
    layout = getattr(case, "kv_layout", "contiguous")
    if layout not in s.kv_layouts:
        reasons.append(f"{name} reads a {'/'.join(sorted(s.kv_layouts))} KV cache, not a {layout} one")
    return reasons


def feature_reasons(name: str, s: Supports, case: Case) -> list[str]:
    """Why ``case``'s attention features are beyond what ``s`` declares, or cannot be (any variant)."""
    reasons = []
    for feature, value in getattr(case, "features", {}).items():
        if not getattr(s, feature, False):
            reasons.append(f"{name} does not take {feature}" + ("" if isinstance(value, bool) else f" = {value:g}"))
    if getattr(case, "features", None):
        reasons.extend(_features.problems(case))
    return reasons


def head_dim_range(s: Supports) -> str:
    lo, hi = s.min_head_dim, s.max_head_dim
    if lo is None and hi is None:
        return "any"
    return f"{lo or 1}..{hi if hi is not None else ''}"
