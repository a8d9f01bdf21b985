"""Attention features in the variants: the keyword arguments a case's features arrive as, and the
torch pieces the variants share to apply them (the definitions: :mod:`harness.core.features`).

A case that sets a feature passes it to the variant as a keyword argument (and only then, so a
variant without features never sees one): ``softcap`` (float), ``alibi_slopes`` and ``sinks``
(float32 ``(H,)``), ``window_size`` and ``prefix_len`` (int), ``document_ids`` (int32
``(seq_len,)``: the document of each key position). ``v_head_dim`` is v's last dimension.

Positions: query i of ``Lq`` sits at key position ``Lk − Lq + i`` (bottom-right aligned; per
sequence, ``kv_lens[b] − q_lens[b] + i``, for a variable-length batch).
"""

from __future__ import annotations

import torch

#: ``Supports(**ALL)``: every attention feature (the readable references, naive and tiled, take them all).
ALL = dict(softcap=True, alibi=True, sinks=True, v_head_dim=True, sliding_window=True, prefix_lm=True,
           document=True)
#: The keyword arguments of the mask features (a window, prefix-LM, documents).
MASK_KWARGS = ("window_size", "prefix_len", "document_ids")
#: Every feature keyword argument.
KWARGS = ("softcap", "alibi_slopes", "sinks") + MASK_KWARGS


def split(kwargs: dict) -> tuple[dict, dict]:
    """(the feature keyword arguments that are set, the others) of a call's ``kwargs``."""
    features = {k: v for k, v in kwargs.items() if k in KWARGS and v is not None and v is not False}
    return features, {k: v for k, v in kwargs.items() if k not in KWARGS}


def mask_kwargs(features: dict) -> dict:
    """The mask features of ``features`` (window, prefix, documents)."""
    return {k: features[k] for k in MASK_KWARGS if k in features}


def positions(Lq: int, Lk: int, device=None, q_lens=None, kv_lens=None) -> torch.Tensor:
    """Key positions of the queries: ``(Lq, 1)``, or ``(B, Lq, 1)`` for given lengths (long)."""
    i = torch.arange(Lq, device=device).view(-1, 1)
    if q_lens is None:
        return i + (Lk - Lq)
    return i.unsqueeze(0) + (kv_lens.long() - q_lens.long()).view(-1, 1, 1).to(device)


def visible(pos: torch.Tensor, j: torch.Tensor, causal: bool, *, window_size: int | None = None,
            prefix_len: int = 0, document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which keys ``j`` queries at positions ``pos`` see (broadcast together) under causality and the mask
    features, or None when nothing is masked. Lengths (a key past its sequence) are the caller's."""
    keep = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        keep = (j <= pos) | (j < prefix_len) if prefix_len else j <= pos
    if window_size is not None:
        keep = both(keep, (pos - j).abs() <= window_size)
    if document_ids is not None:
        ids, last = document_ids.to(pos.device).long(), len(document_ids) - 1
        keep = both(keep, ids[pos.clamp(0, last)] == ids[j.clamp(0, last)])
    return keep


def modify_scores(s: torch.Tensor, pos: torch.Tensor, j: torch.Tensor, *, softcap: float | None = None,
                  slopes: torch.Tensor | None = None, log_base: float = 1.0,
                  keep_tanh: bool = False) -> torch.Tensor | None:
    """Apply the score modifiers in place to scaled scores ``s`` (natural-log units × ``log_base``:
    log2 e for base-2 scores): softcap, then ALiBi with ``slopes`` broadcast against ``s`` (the caller
    views them per head). ``keep_tanh``: return a copy of tanh(s / cap), what softcap's derivative
    needs (else None)."""
    t = None
    if softcap:
        cap = softcap * log_base
        s.div_(cap).tanh_()
        t = s.clone() if keep_tanh else None
        s.mul_(cap)
    if slopes is not None:  # in place, no score-sized temporary: s −= (slopes·log_base) · |pos − j|
        s.addcmul_(slopes.to(s.dtype), (pos - j).abs().to(s.dtype), value=-log_base)
    return t


def sink_combine(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The output with the sinks in the denominators, from an output normalised without them and its
    natural log-sum-exp ``lse`` (broadcast against ``out`` less its last axis; ``sinks`` viewed
    likewise): ``out · sigmoid(lse − σ)``, i.e. ``Σ exp(s)/(Σ exp(s) + exp(σ))``."""
    return out * torch.sigmoid(lse - sinks).unsqueeze(-1).to(out.dtype)
