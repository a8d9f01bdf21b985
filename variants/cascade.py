"""Cascade attention for a batch that shares a prefix (FlashInfer's cascade inference, in PyTorch).

N requests after one system prompt share its P tokens of keys and values. Plain attention reads that
prefix once per request and multiplies it with one request's queries at a time (a matrix-vector
product per request when decoding). Cascade attention splits the keys in two levels:

1. **the shared prefix, once for all requests**: every query row of every request (B·G·Lq rows per
   key/value head) against the one copy of the prefix, as one matrix product per key/value head (a
   GEMM instead of B GEMVs), each prefix chunk giving a partial output normalised by its own softmax
   sum and its log-sum-exp;
2. **each request's own suffix**: flash-decoding over the keys after the prefix (bottom-right causal
   within the suffix, per-sequence lengths too), the same partials;

then merges every partial exactly by log-sum-exp, ``out = Σ_s exp(lse_s − lse) · out_s`` with ``lse =
logsumexp_s lse_s`` (FlashInfer's ``merge_state``; :func:`variants.inference.combine_splits`).

A shared-prefix case (``shared_prefix`` P, see :mod:`harness.measure.inputs`) gives every variant the usual
contiguous ``(B, H_kv, L, D)`` keys and values whose first P rows are the same in every sequence (a
plain variant reads them all: the memory a request-by-request engine reads), and gives this variant,
which declares ``Supports(shared_prefix=True)``, their length as ``shared_prefix``: it reads the prefix
of sequence 0 only. Every query must come after the prefix (``shared_prefix + q_len <= kv_len``, checked
when the suite loads), so every query sees the whole prefix. Features that do not depend on where a key
sits join both levels: a soft-cap on every score, attention sinks in the final merge, a value width other
than the key width. Forward only; exact.
"""

from __future__ import annotations

import dataclasses

import torch

from variants import features as feat
from variants.inference import (
    VARLEN,
    auto_splits,
    combine_splits,
    grouped_queries,
    inference_variant,
    partial_attention,
    sink_partial,
    visible,
    zero_padding_rows,
)


def _softcap(cap):
    """``mods(scores, keys)`` applying a tanh soft-cap in place (position-free: one rule for both levels)."""
    if not cap:
        return None
    return lambda s, keys: feat.modify_scores(s, None, None, softcap=cap)


def prefix_partials(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, batch: int, softcap=None):
    """Partials of every query row ``qg`` (B·H_kv, R, D) against the shared prefix, read once from
    sequence 0: lists of outputs (B·H_kv, R, Dv) and log-sum-exps (B·H_kv, R, 1), one per prefix chunk."""
    N, R, D = qg.shape
    Hkv, Dv = N // batch, v.shape[-1]
    rows = qg.view(batch, Hkv, R, D).transpose(0, 1).reshape(Hkv, batch * R, D)  # the batch's rows together
    kp, vp = k[0, :, :prefix_len], v[0, :, :prefix_len]  # (H_kv, P, D): one copy of the prefix
    n = auto_splits(Hkv, prefix_len, batch * R, str(qg.device))
    chunk = -(-prefix_len // n)
    outs, lses = [], []
    for j0 in range(0, prefix_len, chunk):
        o, lse = partial_attention(rows, kp[:, j0:j0 + chunk], vp[:, j0:j0 + chunk], None, (Hkv, 1, batch * R, 1),
                                   _softcap(softcap))
        outs.append(o.view(Hkv, batch, R, Dv).transpose(0, 1).reshape(N, R, Dv))
        lses.append(lse.view(Hkv, batch, R, 1).transpose(0, 1).reshape(N, R, 1))
    return outs, lses


def suffix_partials(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, causal: bool, lq: int,
                    q_lens=None, kv_lens=None, softcap=None):
    """Partials of each sequence's queries against its own keys after the prefix (flash-decoding;
    bottom-right causal within the suffix; per-sequence lengths when given)."""
    B, Hkv, L, D = k.shape
    S = L - prefix_len
    G = qg.shape[1] // lq
    kf, vf = (x[:, :, prefix_len:].reshape(B * Hkv, S, x.shape[-1]) for x in (k, v))
    lens = None if kv_lens is None else kv_lens - prefix_len
    n = auto_splits(B * Hkv, S, qg.shape[1], str(qg.device))
    chunk = -(-S // n)
    outs, lses = [], []
    for j0 in range(0, S, chunk):
        j1 = min(j0 + chunk, S)
        mask = visible(lq, S, causal, q_lens, lens, j0, j1, device=qg.device)
        o, lse = partial_attention(qg, kf[:, j0:j1], vf[:, j0:j1], mask, (B, Hkv, G, lq), _softcap(softcap))
        outs.append(o)
        lses.append(lse)
    return outs, lses


def _check(case) -> list[str]:
    if not case.shared_prefix:
        return ["cascade attends a prefix shared by the batch's sequences: it needs a case with shared_prefix set "
                "(shared_prefix = P, q_len and kv_len)"]
    return []


def _working_set(case) -> float:
    """Scores of a chunk of the prefix for every query row, and of the suffixes; the partial outputs."""
    rows = case.batch * case.heads * case.query_len
    return float(4 * rows * (case.seq_len + 4 * case.head_dim))


#: The features cascade takes: those that do not depend on where a key sits (a window, ALiBi, prefix-LM or
#: documents would make the shared prefix look different from each request; plain attention takes them).
CASCADE = dataclasses.replace(VARLEN, shared_prefix=True, softcap=True, sinks=True, v_head_dim=True)


@inference_variant(
    "cascade",
    supports=CASCADE,
    check=_check,
    working_set=_working_set,
    description="cascade attention: the shared prefix once for all requests, then each suffix, merged by "
    "log-sum-exp (FlashInfer's cascade inference)",
)
def cascade(q, k, v, *, causal, shared_prefix=None, q_lens=None, kv_lens=None, softcap=None, sinks=None):
    B, H, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    qg = grouped_queries(q, Hkv)  # (B·H_kv, G·Lq, D), scaled, float32
    outs, lses = prefix_partials(qg, k, v, shared_prefix, B, softcap) if shared_prefix else ([], [])
    more = suffix_partials(qg, k, v, shared_prefix or 0, causal, Lq, q_lens, kv_lens, softcap)
    lses = torch.stack(lses + more[1])
    sink = None if sinks is None else sink_partial(sinks, lses, (B, Hkv, H // Hkv, Lq))
    out = combine_splits(torch.stack(outs + more[0]), lses, sink)
    return zero_padding_rows(out.view(B, H, Lq, Dv).to(q.dtype), q_lens)
