"""Attention masks as tiny composable functions (the attention-gym / FlexAttention style).

A mask_mod is ``mask(b, h, q_idx, kv_idx) -> bool tensor``: True where query
``q_idx`` may attend key ``kv_idx`` in batch ``b``, head ``h``. The same functions
drive the float64 reference (called with zero-dimensional ``b``/``h`` index tensors
and broadcast ``q_idx``/``kv_idx`` index tensors, see :func:`dense_mask`) and
FlexAttention's block masks. Combine them with torch's own
``torch.nn.attention.flex_attention.and_masks`` / ``or_masks``.

Score modifiers are FlexAttention-style too: ``score_mod(score, b, h, q_idx, kv_idx) -> score``,
applied to the scaled score ``q·k/sqrt(D)`` before masking (:func:`apply_score_mod`). A case's
attention features (:mod:`harness.core.features`: softcap, ALiBi, windows, prefix-LM, documents) are
such functions here (:func:`case_score_mod`, :func:`case_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import torch

from harness.core import features as _features

MaskMod = Callable[..., torch.Tensor]
ScoreMod = Callable[..., torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    """Query i sees keys j <= i (equal query and key lengths; otherwise :func:`bottom_right_causal`)."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """Query i sees keys j with |i - j| <= window (FlashAttention window_size=(window, window))."""

    def within_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= window) & (kv_idx - q_idx <= window)

    within_window.__name__ = f"sliding_window_{window}"
    return within_window


@overload
def dense_mask(mask_mod: MaskMod, rows: torch.Tensor, seq_len: int, b: int = 0, h: int = 0) -> torch.Tensor: ...
@overload
def dense_mask(mask_mod: None, rows: torch.Tensor, seq_len: int, b: int = 0, h: int = 0) -> None: ...
@overload
def dense_mask(mask_mod: MaskMod | None, rows: torch.Tensor, seq_len: int, b: int = 0,
               h: int = 0) -> torch.Tensor | None: ...


def dense_mask(mask_mod: MaskMod | None, rows: torch.Tensor, seq_len: int, b: int = 0,
               h: int = 0) -> torch.Tensor | None:
    """The boolean (len(rows), seq_len) matrix of ``mask_mod`` for batch ``b``, head ``h`` (None: all visible).

    Called as FlexAttention calls it: ``b`` and ``h`` are zero-dimensional index tensors,
    ``q_idx`` a (rows, 1) and ``kv_idx`` a (1, seq_len) index tensor, broadcast together, so
    masks that index tensors with ``b``/``h`` (attention-gym's document masks) and torch's
    ``and_masks``/``or_masks`` work as they do in FlexAttention.
    """
    if mask_mod is None:
        return None
    device = rows.device
    q_idx = rows.view(-1, 1)
    kv_idx = torch.arange(seq_len, device=device).view(1, -1)
    bi, hi = torch.tensor(b, device=device), torch.tensor(h, device=device)
    return torch.as_tensor(mask_mod(bi, hi, q_idx, kv_idx), device=device).expand(len(rows), seq_len)


def batch_head_mask(
    mask_mod: MaskMod | None, rows: torch.Tensor, seq_len: int, batch: int, heads: int
) -> torch.Tensor | None:
    """The boolean (batch, heads, len(rows), seq_len) mask: :func:`dense_mask` for every (b, h)."""
    if mask_mod is None:
        return None
    out = torch.empty(batch, heads, len(rows), seq_len, dtype=torch.bool, device=rows.device)
    for b in range(batch):
        for h in range(heads):
            out[b, h] = dense_mask(mask_mod, rows, seq_len, b, h)
    return out


def pairs(mask_mod: MaskMod | None, seq_len: int, chunk: int = 1024) -> int:
    """Number of (query, key) pairs ``mask_mod`` keeps at this length for batch 0, head 0 (counted exactly)."""
    if mask_mod is None:
        return seq_len * seq_len
    total = 0
    for start in range(0, seq_len, chunk):
        rows = torch.arange(start, min(start + chunk, seq_len))
        total += int(dense_mask(mask_mod, rows, seq_len).sum())
    return total


def bottom_right_causal(q_len: int, kv_len: int) -> MaskMod:
    """Causal masking aligned to the bottom right: query i sits at position ``kv_len - q_len + i``
    and sees keys j <= that (FlashAttention's and FlexAttention's decode convention). Equal lengths:
    :func:`causal` itself. PyTorch's ``is_causal=True`` aligns to the top left instead."""
    offset = kv_len - q_len
    if offset == 0:
        return causal

    def bottom_right(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    bottom_right.__name__ = f"causal_bottom_right_{offset}"
    return bottom_right


def lengths_mask(q_lens, kv_lens, causal_: bool) -> MaskMod:
    """Variable-length batch: in sequence ``b`` query i < q_lens[b] sees key j < kv_lens[b] (and, when
    causal, j <= i + kv_lens[b] - q_lens[b]: bottom-right aligned per sequence). Padding queries see nothing."""
    q_lens, kv_lens = torch.as_tensor(q_lens), torch.as_tensor(kv_lens)

    def within_lengths(b, h, q_idx, kv_idx):
        ql, kl = q_lens.to(q_idx.device)[b], kv_lens.to(q_idx.device)[b]
        keep = (q_idx < ql) & (kv_idx < kl)
        return keep & (q_idx + (kl - ql) >= kv_idx) if causal_ else keep

    return within_lengths


def _positions(q_lens, kv_lens, q_len: int, kv_len: int):
    """``pos(b, q_idx)``: the key position of query ``q_idx`` of sequence ``b`` (bottom-right aligned)."""
    if q_lens is None:
        offset = kv_len - q_len
        return lambda b, q_idx: q_idx + offset
    q_lens, kv_lens = torch.as_tensor(q_lens), torch.as_tensor(kv_lens)
    return lambda b, q_idx: q_idx + (kv_lens.to(q_idx.device)[b] - q_lens.to(q_idx.device)[b])


def feature_mask(q_len: int, kv_len: int, causal: bool, *, window: int | None = None, prefix_lm: int = 0,
                 document_ids: torch.Tensor | None = None, q_lens=None, kv_lens=None) -> MaskMod:
    """The mask of a case with mask features (harness.core.features, item 3): causal (or prefix-LM),
    a window and documents, with query positions bottom-right aligned, per sequence when lengths are
    given (then also the lengths' own mask). ``document_ids``: the document of each key position."""
    pos = _positions(q_lens, kv_lens, q_len, kv_len)
    within = lengths_mask(q_lens, kv_lens, False) if q_lens is not None else None
    last = None if document_ids is None else len(document_ids) - 1

    def features(b, h, q_idx, kv_idx):
        p = pos(b, q_idx)
        keep = within(b, h, q_idx, kv_idx) if within is not None else (kv_idx >= 0) & (q_idx >= 0)
        if causal:
            keep = keep & ((kv_idx <= p) | (kv_idx < prefix_lm)) if prefix_lm else keep & (kv_idx <= p)
        if window is not None:
            keep = keep & (p - kv_idx <= window) & (kv_idx - p <= window)
        if document_ids is not None:
            ids = document_ids.to(q_idx.device)
            keep = keep & (ids[p.clamp(0, last)] == ids[kv_idx.clamp(0, last)])
        return keep

    return features


def document_ids(seq_len: int, documents: int, device=None) -> torch.Tensor:
    """The document of each of ``seq_len`` positions (int32), :func:`harness.core.features.document_starts`."""
    starts = torch.tensor(_features.document_starts(seq_len, documents)[1:], dtype=torch.int64)
    return torch.bucketize(torch.arange(seq_len), starts, right=True).to(device=device, dtype=torch.int32)


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's slopes of ``heads`` heads as a float32 ``(heads,)`` tensor: the values every
    kernel (and the reference) uses."""
    return torch.tensor(_features.alibi_slopes(heads), dtype=torch.float32, device=device)


def softcap_mod(cap: float) -> ScoreMod:
    """``score ← cap · tanh(score / cap)``."""

    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    softcap.__name__ = f"softcap_{cap:g}"
    return softcap


def alibi_mod(slopes: torch.Tensor, q_len: int, kv_len: int, q_lens=None, kv_lens=None) -> ScoreMod:
    """``score ← score − slopes[h] · |pos(q_idx) − kv_idx|`` (query positions bottom-right aligned)."""
    pos = _positions(q_lens, kv_lens, q_len, kv_len)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes.to(score.device, score.dtype)[h] * (pos(b, q_idx) - kv_idx).abs()

    return alibi


def chain(*mods: ScoreMod | None) -> ScoreMod | None:
    """One score_mod applying ``mods`` in order (None entries skipped; None when none is left)."""
    mods = tuple(m for m in mods if m is not None)
    if len(mods) <= 1:
        return mods[0] if mods else None

    def chained(score, b, h, q_idx, kv_idx):
        for mod in mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    return chained


def apply_score_mod(score_mod: ScoreMod | None, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``scores`` (B, H, len(rows), Lk) with ``score_mod`` applied as FlexAttention applies it: per (b, h),
    with zero-dimensional ``b``/``h`` index tensors, ``q_idx`` a (rows, 1) and ``kv_idx`` a (1, Lk) index
    tensor (a new tensor: autograd flows through it)."""
    if score_mod is None:
        return scores
    B, H, _, Lk = scores.shape
    device = scores.device
    q_idx, kv_idx = rows.to(device).view(-1, 1), torch.arange(Lk, device=device).view(1, -1)
    out = [torch.stack([torch.as_tensor(score_mod(scores[b, h], torch.tensor(b, device=device),
                                                  torch.tensor(h, device=device), q_idx, kv_idx),
                                        dtype=scores.dtype, device=device).expand(scores.shape[2:])
                        for h in range(H)]) for b in range(B)]
    return torch.stack(out)


def _case_lengths(case):
    from harness.core.lengths import case_lengths

    return case_lengths(case) if case.lengths != "fixed" else (None, None)


def case_mask(case) -> MaskMod | None:
    """The mask of a case's own shape and mask features: none, causal (bottom-right when ``q_len <
    seq_len``), or, for a variable-length batch, :func:`lengths_mask` of its lengths
    (:mod:`harness.core.lengths`); with a window, prefix-LM or documents, :func:`feature_mask`."""
    q_len = case.q_len if case.q_len is not None else case.seq_len
    q_lens, kv_lens = _case_lengths(case)
    if _features.masked(case):
        docs = document_ids(case.seq_len, case.document) if case.document > 1 else None
        return feature_mask(q_len, case.seq_len, case.causal, window=case.sliding_window, prefix_lm=case.prefix_lm,
                            document_ids=docs, q_lens=q_lens, kv_lens=kv_lens)
    if case.lengths == "fixed":
        return bottom_right_causal(q_len, case.seq_len) if case.causal else None
    return lengths_mask(q_lens, kv_lens, case.causal)


def case_score_mod(case) -> ScoreMod | None:
    """The score modifier of a case's features (softcap, then ALiBi), or None."""
    q_len = case.q_len if case.q_len is not None else case.seq_len
    q_lens, kv_lens = _case_lengths(case)
    alibi = alibi_mod(alibi_slopes(case.heads), q_len, case.seq_len, q_lens, kv_lens) if case.alibi else None
    return chain(softcap_mod(case.softcap) if case.softcap else None, alibi)
