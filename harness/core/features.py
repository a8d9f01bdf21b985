"""Attention features: the exact definition of each one, in plain Python (no torch).

A case's feature fields (declared in :mod:`harness.core.cases` with ``feature=True``) change what
attention computes. With ``s_ij = q_i·k_j / sqrt(head_dim)`` the scaled score of query i and key j,
and ``p_i = kv_len − q_len + i`` the position of query i among the keys (bottom-right alignment, per
sequence for a variable-length batch), the float64 reference computes, in this order:

1. ``softcap = c`` (> 0): ``s_ij ← c · tanh(s_ij / c)`` (Gemma 2; FlashAttention's ``softcap``).
2. ``alibi = true``: ``s_ij ← s_ij − m_h · |p_i − j|`` with ``m_h`` the ALiBi paper's slope of query
   head h (:func:`alibi_slopes`), rounded to float32 as every kernel receives it. Under causal
   masking ``|p_i − j| = p_i − j``, attention-gym's ``(kv_idx − q_idx)·m_h`` bias; FlashAttention's
   ``alibi_slopes`` is this bias in both cases.
3. Masks: key j is visible to query i when all of these hold —
   causal: ``j ≤ p_i`` or, with ``prefix_lm = P`` (> 0), ``j < P`` (the first P keys are seen by
   every query: the prefix attends bidirectionally); ``sliding_window = w``: ``|p_i − j| ≤ w`` (with causal:
   the w keys before the query and itself, FlashAttention's ``window_size=(w, 0)``; without:
   ``(w, w)``); ``document = n`` (> 1): key j lies in the same document as position ``p_i``
   (:func:`document_starts`), the same for every sequence of the batch.
4. ``sinks = true``: the softmax of row i over its visible keys gets one more term in its
   denominator, ``exp(σ_h)``, one learned logit per query head (gpt-oss); no value is attached to it,
   so ``out_i = Σ_j exp(s_ij) v_j / (exp(σ_h) + Σ_j exp(s_ij))``. The σ_h are drawn standard
   normal from the suite's seed (:func:`harness.measure.inputs.feature_inputs`).
5. ``v_head_dim = dv``: v (and the output) have head size dv instead of ``head_dim``; the scale stays
   ``1/sqrt(head_dim)`` (DeepSeek-V2/V3: 192 for q·k, 128 for v).

A row with no visible key (possible only with a window on more queries than keys, non-causal) has
output 0, as padding rows do.

FLOPs (:mod:`harness.core.flops`): the two matmuls only, ``2·head_dim + 2·v_head_dim`` per attended
pair (FlashAttention's benchmarks' convention, which counts neither the softmax nor a score
modifier): softcap, ALiBi, a score_mod and the sinks add no FLOPs, so their cost is all in the time;
window, prefix-LM and document masks change the pairs attended, counted exactly (:func:`pairs`).
"""

from __future__ import annotations

import bisect
import random
from functools import lru_cache
from typing import Any


def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi slopes of ``heads`` heads (Press et al. 2022, their reference code): for a power of two
    n, ``2^(−8·(h+1)/n)``; otherwise those of the largest power of two n < heads, then every other slope
    of 2n for the remaining heads."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return power_of_two(heads)
    n = 1 << (heads.bit_length() - 1)
    return power_of_two(n) + power_of_two(2 * n)[0::2][: heads - n]


@lru_cache(maxsize=256)
def document_starts(seq_len: int, documents: int) -> tuple[int, ...]:
    """The first position of each of ``documents`` documents packed in ``seq_len`` positions: 0 and
    ``documents − 1`` distinct cut points drawn uniformly from 1 .. seq_len − 1 by a generator seeded
    with (seq_len, documents), not the suite's seed: one case is one workload in every run, as for
    ``lengths``."""
    documents = max(1, min(documents, seq_len))
    cuts = random.Random(f"document/{seq_len}/{documents}").sample(range(1, seq_len), documents - 1)
    return (0, *sorted(cuts))


def document_of(position: int, starts: tuple[int, ...]) -> int:
    """The document holding ``position``."""
    return bisect.bisect_right(starts, position) - 1


def feature_values(case: Any) -> dict[str, Any]:
    """The case's mask features that are set: ``sliding_window``, ``prefix_lm``, ``document`` (absent when off)."""
    out = {}
    if getattr(case, "sliding_window", None) is not None:
        out["sliding_window"] = case.sliding_window
    if getattr(case, "prefix_lm", 0):
        out["prefix_lm"] = case.prefix_lm
    if getattr(case, "document", 1) > 1:
        out["document"] = case.document
    return out


def masked(case: Any) -> bool:
    """Whether a mask feature (window, prefix-LM, documents) restricts the case's pairs."""
    return bool(feature_values(case))


def _row_count(p: int, kv_len: int, causal: bool, window: int | None, prefix: int,
               doc: tuple[int, int] | None) -> int:
    """Keys visible to the query at position ``p`` among ``kv_len`` (see the module doc)."""
    lo, hi = 0, kv_len - 1
    if window is not None:
        lo, hi = max(lo, p - window), min(hi, p + window)
    if doc is not None:
        lo, hi = max(lo, doc[0]), min(hi, doc[1])
    if not causal:
        return max(0, hi - lo + 1)
    seen = max(0, min(hi, p) - lo + 1)
    if prefix:  # keys j < prefix beyond the causal ones, inside the window and document
        extra_lo, extra_hi = max(lo, p + 1), min(hi, prefix - 1)
        seen += max(0, extra_hi - extra_lo + 1)
    return seen


@lru_cache(maxsize=4096)
def pairs(q_len: int, kv_len: int, causal: bool, window: int | None = None, prefix: int = 0,
          documents: int = 1, doc_len: int | None = None) -> int:
    """Visible (query, key) pairs of one head of one sequence of ``q_len`` queries and ``kv_len`` keys
    under the mask features (exact; no L²/2 convention). ``doc_len``: the length the documents were
    drawn over (the case's seq_len; default kv_len)."""
    span = doc_len or kv_len
    starts = document_starts(span, documents) if documents > 1 else None
    ends: tuple[int, ...] = () if starts is None else (*[s - 1 for s in starts[1:]], span - 1)
    total = 0
    for i in range(q_len):
        p = kv_len - q_len + i
        doc = None
        if starts is not None:
            d = document_of(min(max(p, 0), span - 1), starts)
            doc = (starts[d], ends[d])
        total += _row_count(p, kv_len, causal, window, prefix, doc)
    return total


def problems(case: Any) -> list[str]:
    """Why the case's feature values cannot describe an attention (for every variant alike)."""
    out = []
    document = getattr(case, "document", 1)
    if document > case.seq_len:
        out.append(f"document = {document} needs at least as many keys (kv_len {case.seq_len})")
    return out


def describe(values: Any) -> str:
    """The features set in a case or a result row, in words as its label gives them
    (``softcap=30 · alibi · window=128``), or ``""``."""
    from harness.core.cases import AXES, DEFAULTS, _normalised

    c = _normalised(values)
    return " · ".join((ax.label(c) if ax.label is not None else "") or name for name, ax in AXES.items()
                      if ax.feature and c[name] != DEFAULTS[name])
