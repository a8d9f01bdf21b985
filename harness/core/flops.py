"""FLOP conventions, so that figures compare with published ones.

Exact attention does ``4 * B * H * D`` FLOPs per attended (query, key) pair:
2·D for the score q·k and 2·D for accumulating p·v. Dense non-causal attention
attends L² pairs; causal counts L²/2 (the FlashAttention convention, although
the real lower triangle has L(L+1)/2). Patterned variants (sliding window,
block-sparse) count the pairs they really attend. The backward pass counts
2.5× the forward (FlashAttention's convention), so ``fwd_bwd`` counts 3.5×.

Inference shapes count the real pairs: queries and keys of different lengths (decode, chunked
prefill, cross-attention) and variable-length batches attend, per sequence, ``q·kv`` pairs, or
with causal masking (bottom-right aligned) ``q·(kv − q) + q(q+1)/2``, summed over the batch
(:func:`harness.core.lengths.pairs`); only the square, fixed-length causal case keeps the L²/2
convention.

Attention features (:mod:`harness.core.features`): the count is the two matmuls', ``2·D`` for q·k and
``2·Dv`` for p·v per pair (``Dv`` = ``v_head_dim``, else ``D``), as FlashAttention's benchmarks count
(``--headdim 192-128``); the softmax, a softcap, ALiBi, any score_mod and the sinks are elementwise and
count nothing, so what they cost shows in the time at equal FLOPs. A window, prefix-LM or documents
change the pairs: counted exactly, per sequence (the L²/2 convention is only for plain causal).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.core.cases import Case

#: FLOPs of a mode, in units of the forward pass.
MODE_MULTIPLIER = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def dense_pairs(seq_len: int, causal: bool) -> float:
    """Attended pairs of full attention: L², or L²/2 when causal (FlashAttention convention)."""
    return seq_len * seq_len / 2 if causal else float(seq_len * seq_len)


def pair_flops(case: Case, pairs: float) -> float:
    """Forward FLOPs of exact attention over ``pairs`` attended (query, key) pairs per head:
    ``2·(D + Dv)`` each (``4·D`` when v has q's head size)."""
    value_dim = getattr(case, "v_head_dim", None) or case.head_dim
    return 2.0 * case.batch * case.heads * (case.head_dim + value_dim) * pairs


def pair_count(q_len: int, kv_len: int, causal: bool) -> float:
    """Attended (query, key) pairs of one head of one sequence: the dense convention when queries
    and keys are equally long, else the real pairs (causal aligned to the bottom right)."""
    if q_len == kv_len:
        return dense_pairs(kv_len, causal)
    from harness.core.lengths import pairs

    return float(pairs(q_len, kv_len, causal))


def case_pairs(case: Case) -> float:
    """Attended (query, key) pairs per head, averaged over the batch's sequences: the dense
    convention for a square fixed-length case, else the real pairs (see the module doc)."""
    from harness.core import features

    mask = features.feature_values(case)
    if mask:
        from harness.core.lengths import case_lengths

        count = functools.partial(features.pairs, causal=case.causal, window=mask.get("sliding_window"),
                                  prefix=mask.get("prefix_lm", 0), documents=mask.get("document", 1),
                                  doc_len=case.seq_len)
        q_lens, kv_lens = case_lengths(case)
        return sum(count(q, kv) for q, kv in zip(q_lens, kv_lens)) / case.batch
    if case.lengths == "fixed":
        return pair_count(case.query_len, case.seq_len, case.causal)
    from harness.core.lengths import case_lengths, pairs

    q_lens, kv_lens = case_lengths(case)
    return sum(pairs(q, kv, case.causal) for q, kv in zip(q_lens, kv_lens)) / case.batch


def attention_flops(case: Case) -> float:
    """Forward FLOPs of exact attention over the case's pairs (square causal counts half)."""
    return pair_flops(case, case_pairs(case))


def total_flops(forward_flops: float, mode: str) -> float:
    """FLOPs of one call in ``mode`` given the forward count."""
    return forward_flops * MODE_MULTIPLIER[mode]
