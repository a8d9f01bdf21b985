"""Inference-shaped attention: decoding with split-K, variable-length batches (padded, packed).

How these variants receive their inputs (docs/how-to/inference.md says the same):
q is ``(B, H, Lq, D)``, k and v ``(B, H_kv, Lk, D)`` with ``Lq`` the case's ``q_len`` and
``Lk`` its ``seq_len``/``kv_len``; causal masking is aligned to the bottom right (query i sits
at position ``Lk - Lq + i``). A variable-length case (``lengths`` not ``fixed``) also passes
``q_lens`` and ``kv_lens``, int32 tensors ``(B,)``: sequence b's queries are rows
``< q_lens[b]`` and its keys rows ``< kv_lens[b]`` of the padded tensors (whose padding holds
random values, so a variant that reads it is caught), causal bottom-right per sequence, and the
output rows of padding queries must be zero. Paged caches are :mod:`variants.paged`.

* ``decode_split_k``: flash-decoding (Dao et al. 2023) in PyTorch. The keys are cut into
  ``splits`` chunks; each chunk gives a partial output normalised by its own softmax sum and its
  log-sum-exp ``lse_s``, and the partials are combined exactly,
  ``out = Σ_s exp(lse_s − lse) · out_s`` with ``lse = logsumexp_s lse_s``. ``splits = "auto"``
  (:func:`auto_splits`): on CUDA enough chunks for two work items per multiprocessor over the
  ``B·H_kv`` key/value heads (flash-decoding's reason to split); on the CPU chunks whose scores
  fit in 1 MiB of cache; at least 256 keys a chunk (``splits`` column: the number used).
  Attention features (:mod:`variants.features`): softcap and ALiBi modify each chunk's scores,
  the window, prefix-LM and documents join each chunk's mask, and the sinks join the combination as
  one more partial of log-sum-exp σ_h and output 0; v may have another head size.
* ``padded``: the naive variable-length baseline: PyTorch SDPA over the padded batch with a
  boolean mask of each sequence's keys (and causality). It computes every padded pair: its
  ``flops`` are those of the padded batch, ``useful_flops`` those of the real pairs, and
  ``useful_fraction`` their ratio.
* ``packed``: the sequences' real tokens concatenated (gathered from the padded tensors inside
  the call, and the output scattered back, so its time includes that): ``path = "nested"``
  runs PyTorch's jagged nested tensors through SDPA (on the CPU non-causal only, or ``q_len =
  1`` where bottom-right causality masks nothing; nested SDPA has no grouped-query form, so the
  G query heads of a key/value head become G times as many query rows); ``"flex"`` runs
  FlexAttention over the packed sequence with a
  document mask (the BlockMask is built once per set of lengths and cached, as an engine builds
  it once per batch for every layer: its build is in ``first_call_ms``); ``"flash_attn"`` calls
  ``flash_attn_varlen_func`` (CUDA, when installed); ``"auto"`` picks nested where it runs,
  else flex; ``"loop"`` is the plain alternative to packing: one SDPA call per sequence on its
  own rows of the padded tensors (views, no gather), so no padded pair is computed either.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch
import torch.nn.functional as F

from harness import Param, Supports, attention_flops, register_variant
from variants import features as feat
from variants.common import causal_sdpa_kwargs, scale_of

_F32 = torch.float32
#: The least keys per split that ``splits = "auto"`` takes.
MIN_SPLIT_KEYS = 256
#: ``splits = "auto"`` on the CPU: the float32 scores of one split, at most (half a 2 MiB L2).
SPLIT_SCORE_BYTES = 1 << 20
SPLIT_CHOICES = ("auto", 1, 2, 3, 4, 8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------
# Shared: registration, which keys each query sees, and the rows of padding queries

#: What this family's variants take: any q_len (bottom-right causal), variable lengths; forward only.
VARLEN = Supports(devices={"cpu", "cuda"}, backward=False, non_square=True, varlen=True)


def inference_variant(name: str, **kw):
    """``register_variant`` for this family: exact, :data:`VARLEN` and :func:`attention_flops` unless
    ``kw`` says otherwise."""
    return register_variant(name, family="inference", exact=True,
                            **{"flops": attention_flops, "supports": VARLEN, **kw})


def visible(Lq: int, Lk: int, causal: bool, q_lens=None, kv_lens=None, start: int = 0, stop: int | None = None,
            device=None, **masks):
    """Boolean ``(B or 1, 1, Lq, stop - start)``: which of the keys ``start .. stop`` (default: all
    ``Lk``) each query row sees, or None when every row sees all of them. Causal is bottom-right
    aligned, per sequence when lengths are given; a padding query row (``i >= q_lens[b]``) sees its
    sequence's keys, so no row is empty (its output is zeroed by :func:`zero_padding_rows`).
    ``masks``: the mask features' keyword arguments (window, prefix, documents)."""
    stop = Lk if stop is None else stop
    if masks:
        pos = feat.positions(Lq, Lk, device, q_lens, kv_lens).view(-1, 1, Lq, 1)
        j = torch.arange(start, stop, device=device).view(1, 1, 1, -1)
        keep = feat.visible(pos, j, causal, **masks)
        return keep if q_lens is None else keep & (j < kv_lens.view(-1, 1, 1, 1).long())
    if q_lens is None and (not causal or stop - 1 <= Lk - Lq):  # the first query already sees them all
        return None
    i = torch.arange(Lq, device=device).view(1, 1, -1, 1)
    j = torch.arange(start, stop, device=device).view(1, 1, 1, -1)
    if q_lens is None:
        return i + (Lk - Lq) >= j
    ql, kl = q_lens.view(-1, 1, 1, 1).long(), kv_lens.view(-1, 1, 1, 1).long()
    keep = j < kl
    return keep & (i + (kl - ql) >= j) if causal else keep


def zero_padding_rows(out: torch.Tensor, q_lens) -> torch.Tensor:
    """``out`` (B, H, Lq, D) with the rows of padding queries set to zero (in place)."""
    if q_lens is not None:
        rows = torch.arange(out.shape[2], device=out.device).view(1, 1, -1, 1)
        out.masked_fill_(rows >= q_lens.view(-1, 1, 1, 1), 0.0)
    return out


def _lengths_or_full(q, k, q_lens, kv_lens):
    """(q_lens, kv_lens) as given, or full lengths for a fixed batch."""
    if q_lens is not None:
        return q_lens, kv_lens
    B = q.shape[0]
    return (torch.full((B,), q.shape[2], dtype=torch.int32, device=q.device),
            torch.full((B,), k.shape[2], dtype=torch.int32, device=q.device))


# ---------------------------------------------------------------------------------------------
# decode_split_k


def auto_splits(kv_heads_total: int, kv_len: int, rows: int, device: str = "cpu") -> int:
    """Splits of ``kv_len`` keys for ``B·H_kv`` key/value heads of ``rows`` (G·Lq) query rows each,
    every split at least :data:`MIN_SPLIT_KEYS` keys. CUDA (flash-decoding's rule): enough splits
    for two work items per multiprocessor. CPU, where each operation is already spread over the
    threads: splits whose float32 scores fit in :data:`SPLIT_SCORE_BYTES`, so that the softmax's
    passes over them and P·V read them from cache."""
    if device.startswith("cuda") and torch.cuda.is_available():
        want = -(-2 * torch.cuda.get_device_properties(device).multi_processor_count // max(1, kv_heads_total))
    else:
        want = -(-kv_heads_total * rows * kv_len * 4 // SPLIT_SCORE_BYTES)
    return max(1, min(want, kv_len // MIN_SPLIT_KEYS))


def _splits(case) -> int:
    s = case.params.get("splits", "auto")
    if s != "auto":
        return min(int(s), case.seq_len)
    return auto_splits(case.batch * case.kv_heads, case.seq_len, case.group_size * case.query_len, case.device)


def partial_attention(qg, kc, vc, mask, shape, mods=None, keys=None):
    """One split: the partial output of queries ``qg`` (N, G·Lq, D), already scaled, against the keys
    ``kc``/``vc`` (N, c, D) of one chunk, normalised by its own softmax sum, and its log-sum-exp
    (N, G·Lq, 1), −inf where no key of the chunk is visible. ``mask``: (B|1, 1, Lq, c) or None;
    ``shape`` = (B, H_kv, G, Lq); ``mods(scores (B, H_kv, G, Lq, c), keys)``: the score features
    (:func:`score_mods`) for the chunk's key positions ``keys``."""
    B, Hkv, G, Lq = shape
    acc = qg.dtype
    s = torch.bmm(qg, kc.to(acc).transpose(1, 2))  # (N, G·Lq, c)
    if mods is not None:
        mods(s.view(B, Hkv, G, Lq, -1), keys)
    if mask is not None:  # rows (b, hkv, g, i)
        s.view(B, Hkv, G, Lq, -1).masked_fill_(~mask.unsqueeze(2), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a chunk with no visible key
    p = s.sub_(m).exp_()
    l = p.sum(-1, keepdim=True)
    return torch.bmm(p, vc.to(acc)).div_(l.clamp_min(torch.finfo(acc).tiny)), m + l.log()


def grouped_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q (B, H, Lq, D) scaled by 1/sqrt(D), as (B·H_kv, G·Lq, D) in float32 (float64 for float64 inputs)."""
    B, H, Lq, D = q.shape
    acc = torch.promote_types(q.dtype, _F32)
    return (q.to(acc) * scale_of(q)).reshape(B * kv_heads, (H // kv_heads) * Lq, D)


def score_mods(q, Lk: int, Hkv: int, q_lens=None, kv_lens=None, softcap=None, alibi_slopes=None):
    """``mods(scores, keys)`` applying softcap and ALiBi in place to scores ``(B, H_kv, G, Lq, c)`` of
    key positions ``keys`` (c,), or None when neither is set."""
    if not softcap and alibi_slopes is None:
        return None
    Lq = q.shape[2]
    pos = feat.positions(Lq, Lk, q.device, q_lens, kv_lens).view(-1, 1, 1, Lq, 1)
    slopes = None if alibi_slopes is None else alibi_slopes.view(1, Hkv, -1, 1, 1)
    return lambda s, keys: feat.modify_scores(s, pos, keys.view(1, 1, 1, 1, -1), softcap=softcap, slopes=slopes)


def split_k_partials(q, k, v, causal: bool, splits: int, q_lens=None, kv_lens=None, **features):
    """The per-split partial outputs ``(S, N, G·Lq, Dv)`` (each normalised by its own softmax sum)
    and log-sum-exps ``(S, N, G·Lq, 1)`` (−inf where a split has no visible key), in float32
    (float64 for float64 inputs). ``features``: softcap, ALiBi and mask features (not the sinks)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qg = grouped_queries(q, Hkv)
    kf, vf = k.reshape(B * Hkv, Lk, D), v.reshape(B * Hkv, Lk, v.shape[-1])
    mods = score_mods(q, Lk, Hkv, q_lens, kv_lens, features.get("softcap"), features.get("alibi_slopes"))
    chunk = -(-Lk // splits)
    outs, lses = [], []
    for j0 in range(0, Lk, chunk):
        j1 = min(j0 + chunk, Lk)
        mask = visible(Lq, Lk, causal, q_lens, kv_lens, j0, j1, device=q.device, **feat.mask_kwargs(features))
        o, lse = partial_attention(qg, kf[:, j0:j1], vf[:, j0:j1], mask, (B, Hkv, H // Hkv, Lq), mods,
                                   torch.arange(j0, j1, device=q.device))
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def sink_partial(sinks, lses: torch.Tensor, shape) -> torch.Tensor:
    """The sinks as one more split's log-sum-exp ``(1, N, G·Lq, 1)`` (its output is 0): σ of each row's
    head; ``shape`` = (B, H_kv, G, Lq)."""
    B, Hkv, G, Lq = shape
    return sinks.to(lses.dtype).view(1, 1, Hkv, G, 1, 1).expand(1, B, Hkv, G, Lq, 1).reshape(1, B * Hkv, G * Lq, 1)


def combine_splits(outs: torch.Tensor, lses: torch.Tensor, sink_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The exact softmax output from split partials: ``Σ_s exp(lse_s − lse) · out_s``; ``sink_lse``
    (:func:`sink_partial`) joins ``lse`` with no output of its own. A row with no visible key: 0."""
    every = lses if sink_lse is None else torch.cat([lses, sink_lse])
    lse = torch.logsumexp(every, dim=0, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (torch.exp(lses - lse) * outs).sum(0)


#: The features the decode variants take (decode_split_k; paged's gather and pages paths).
DECODE_FEATURES = dataclasses.replace(VARLEN, **feat.ALL)


@inference_variant(
    "decode_split_k",
    supports=DECODE_FEATURES,
    params={"splits": Param("auto", choices=SPLIT_CHOICES,
                            help="key chunks, each a partial output and log-sum-exp, combined exactly")},
    working_set=lambda case: float(4 * case.batch * case.heads * case.query_len
                                   * (case.seq_len + 2 * _splits(case) * case.head_dim)),
    columns=lambda case: {"splits": _splits(case)},
    description="flash-decoding in PyTorch: K/V split into chunks, partial outputs and LSEs combined exactly",
)
def decode_split_k(q, k, v, *, causal, splits="auto", q_lens=None, kv_lens=None, sinks=None, **features):
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    n = auto_splits(B * Hkv, Lk, H // Hkv * Lq, str(q.device)) if splits == "auto" else min(int(splits), Lk)
    outs, lses = split_k_partials(q, k, v, causal, n, q_lens, kv_lens, **features)
    sink = None if sinks is None else sink_partial(sinks, lses, (B, Hkv, H // Hkv, Lq))
    out = combine_splits(outs, lses, sink).view(B, Hkv, H // Hkv, Lq, Dv).reshape(B, H, Lq, Dv)
    return zero_padding_rows(out.to(q.dtype), q_lens)


# ---------------------------------------------------------------------------------------------
# padded


def _padded_flops(case) -> float:
    """The work of the padded batch: every sequence as long as the longest."""
    return attention_flops(dataclasses.replace(case, lengths="fixed"))


def _padded_columns(case) -> dict:
    return {"useful_flops": attention_flops(case)}  # useful_fraction = useful_flops / flops: derived


def _sdpa_with_mask(q, k, v, causal, q_lens=None, kv_lens=None):
    if q_lens is None:
        mask = causal_sdpa_kwargs(q, k, causal)
    else:
        mask = {"attn_mask": visible(q.shape[2], k.shape[2], causal, q_lens, kv_lens, device=q.device)}
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1], **mask)


@inference_variant(
    "padded",
    baseline=True,  # the naive variable-length baseline: what the others are compared with where sdpa cannot run
    flops=_padded_flops,
    columns=_padded_columns,
    working_set=lambda case: float(case.batch * case.query_len * case.seq_len
                                   + 4 * case.batch * case.heads * case.query_len * case.head_dim),
    description="variable-length batch padded to the longest, SDPA with a key-padding mask (naive baseline)",
)
def padded(q, k, v, *, causal, q_lens=None, kv_lens=None):
    return zero_padding_rows(_sdpa_with_mask(q, k, v, causal, q_lens, kv_lens), q_lens)


# ---------------------------------------------------------------------------------------------
# packed

PACKED_PATHS = ("auto", "nested", "flex", "flash_attn", "loop")
_FLASH_ATTN = ("flash_attn", "pip install flash-attn")


def _nested_runs(causal: bool, q_len: int) -> bool:
    """Nested SDPA refuses causal masking on the CPU (and aligns it top-left on CUDA); with one query
    bottom-right causality masks nothing."""
    return not causal or q_len == 1


def _packed_path(path: str, causal: bool, q_len: int, device: str) -> str:
    if path != "auto":
        return path
    return "nested" if _nested_runs(causal, q_len) else "flex"


def _packed_check(case) -> list[str]:
    q_len = case.query_len
    path = _packed_path(case.params.get("path", "auto"), case.causal, q_len, case.device)
    if path == "nested" and not _nested_runs(case.causal, q_len):
        return ["packed path 'nested': PyTorch's nested-tensor SDPA has no bottom-right causal form (q_len > 1)"]
    if path == "flex":
        from variants import flex

        why = flex.unavailable(case.device)
        return [f"packed path 'flex': {why}"] if why else []
    if path == "flash_attn":
        from variants.peers.library import cuda_reasons

        return [f"packed path 'flash_attn': {r}" for r in cuda_reasons(case, *_FLASH_ATTN)]
    return []


def _pack(x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (T, heads, D), batch index (T,), position (T,)) of the real rows of x (B, heads, L, D)."""
    L = x.shape[2]
    keep = torch.arange(L, device=x.device).view(1, -1) < lens.view(-1, 1).to(x.device)
    b, pos = keep.nonzero(as_tuple=True)
    return x.transpose(1, 2)[b, pos], b, pos


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    return F.pad(lens.long().cumsum(0), (1, 0))


def _nested(qp, kp, vp, q_lens, kv_lens):
    """Nested SDPA of packed tokens. Grouped-query without repeating K and V: the G query heads of a
    key/value head become G·q query rows of its sequence (no causal mask here: their order is free)."""
    T, H, D = qp.shape
    Hkv = kp.shape[1]
    G = H // Hkv
    rows = qp.view(T, Hkv, G, D).transpose(1, 2).reshape(T * G, Hkv, D)
    njt = torch.nested.nested_tensor_from_jagged
    q, k, v = (njt(x, _offsets(n)).transpose(1, 2) for x, n in ((rows, q_lens * G), (kp, kv_lens), (vp, kv_lens)))
    with warnings.catch_warnings():  # "the PyTorch API of nested tensors is in prototype stage"
        warnings.simplefilter("ignore", UserWarning)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()  # (T·G, H_kv, D)
    return out.view(T, G, Hkv, D).transpose(1, 2).reshape(T, H, D)


_DOC_MASKS: dict = {}
_LOCK = threading.Lock()


def _document_block_mask(q_lens, kv_lens, causal: bool, tile: int, device):
    """The cached BlockMask of sequences packed one after another (a document mask): query token t
    of sequence b sees the keys of b, bottom-right causal within it when ``causal``."""
    key = (tuple(q_lens.tolist()), tuple(kv_lens.tolist()), causal, tile, str(device))
    with _LOCK:
        bm = _DOC_MASKS.get(key)
    if bm is not None:
        return bm
    from torch.nn.attention.flex_attention import BlockMask

    from variants import flex

    ql, kl = q_lens.long().cpu(), kv_lens.long().cpu()
    doc_q = torch.repeat_interleave(torch.arange(len(ql)), ql).to(device)
    doc_k = torch.repeat_interleave(torch.arange(len(kl)), kl).to(device)
    pos_q = (torch.arange(int(ql.sum())) - torch.repeat_interleave(_offsets(ql)[:-1], ql)).to(device)
    pos_k = (torch.arange(int(kl.sum())) - torch.repeat_interleave(_offsets(kl)[:-1], kl)).to(device)
    shift = (kl - ql).to(device)

    def document(b, h, q_idx, kv_idx):
        same = doc_q[q_idx] == doc_k[kv_idx]
        return same & (pos_q[q_idx] + shift[doc_q[q_idx]] >= pos_k[kv_idx]) if causal else same

    Tq, Tk = len(doc_q), len(doc_k)
    partial, full = flex.tile_layout(document, Tk, tile, device, q_len=Tq)
    kv_num, kv_idx = flex.ordered_blocks(partial, device)
    full_num, full_idx = flex.ordered_blocks(full, device)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=document,
                                  seq_lengths=(Tq, Tk))
    with _LOCK:
        if len(_DOC_MASKS) > 64:
            _DOC_MASKS.clear()
        return _DOC_MASKS.setdefault(key, bm)


def _flex_packed(qp, kp, vp, q_lens, kv_lens, causal, tile):
    from variants import flex

    bm = _document_block_mask(q_lens, kv_lens, causal, tile, qp.device)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (qp, kp, vp))  # (1, heads, T, D)
    return flex.compiled_call(q, k, v, bm, k.shape[1] != q.shape[1])[0].transpose(0, 1)


def _per_sequence(q, k, v, causal, q_lens, kv_lens):
    """One SDPA call per sequence on its own rows of the padded tensors (views: no copy, no padding)."""
    out = torch.zeros_like(q)
    for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
        qb, kb, vb = q[b:b + 1, :, :nq], k[b:b + 1, :, :nk], v[b:b + 1, :, :nk]
        out[b:b + 1, :, :nq] = F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=k.shape[1] != q.shape[1],
                                                              **causal_sdpa_kwargs(qb, kb, causal))
    return out


def _flash_varlen(qp, kp, vp, q_lens, kv_lens, causal):
    from variants.peers.library import load

    lib = load(*_FLASH_ATTN)
    cu_q, cu_k = _offsets(q_lens).int(), _offsets(kv_lens).int()
    return lib.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, int(q_lens.max()), int(kv_lens.max()),
                                      softmax_scale=scale_of(qp), causal=bool(causal))


@inference_variant(
    "packed",
    params={
        "path": Param("auto", choices=PACKED_PATHS, help="nested SDPA, FlexAttention document mask, "
                      "flash_attn_varlen_func (CUDA), auto (nested where it runs, else flex), or loop (one SDPA "
                      "call per sequence at its own length)"),
        "tile": Param(128, choices=(16, 32, 64, 128, 256), help="flex: BlockMask tile"),
    },
    check=_packed_check,
    working_set=lambda case: float(case.batch * case.head_dim * case.element_bytes
                                   * (3 * case.heads * case.query_len + 2 * case.kv_heads * case.seq_len)
                                   + 4 * case.batch * case.heads * case.query_len * case.seq_len + (1 << 26)),
    description="variable-length batch as packed sequences: nested-tensor SDPA, or FlexAttention with a "
    "document mask",
)
def packed(q, k, v, *, causal, path="auto", tile=128, q_lens=None, kv_lens=None):
    B, H, Lq, D = q.shape
    ql, kl = _lengths_or_full(q, k, q_lens, kv_lens)
    path = _packed_path(path, causal, Lq, q.device.type)
    if path == "loop":
        return _per_sequence(q, k, v, causal, ql.tolist(), kl.tolist())
    (qp, bq, pq), (kp, _, _), (vp, _, _) = _pack(q, ql), _pack(k, kl), _pack(v, kl)
    if path == "nested":
        out = _nested(qp, kp, vp, ql, kl)
    elif path == "flex":
        out = _flex_packed(qp, kp, vp, ql, kl, causal, tile)
    else:
        out = _flash_varlen(qp, kp, vp, ql, kl, causal)
    padded_out = q.new_zeros(B, Lq, H, D)
    padded_out[bq, pq] = out.to(q.dtype)
    return padded_out.transpose(1, 2)
