"""Attention over a paged KV cache (vLLM's PagedAttention layout), three ways.

A paged case (``kv_layout = "paged"``, ``page_size`` tokens per page) passes k and v as page
pools ``(num_pages, H_kv, page_size, D)`` (FlashInfer's HND layout), ``block_table`` ``(B,
max_pages)`` int32 (the pool page of each sequence's i-th page; entries past a sequence's pages
are 0 and must not be read), and ``kv_lens``/``q_lens`` ``(B,)`` int32. A sequence's pages are
scattered over the pool in an order shuffled from the suite's seed, as in a serving engine
after some traffic; its last page may be partly filled (the rest holds random values). q is
``(B, H, Lq, D)``; causal masking is bottom-right aligned per sequence.

``path``:

* ``gather``: gather a chunk of every sequence's pages (16 MiB of K and V, at least 128 tokens)
  into contiguous K and V (``index_select``), attend it, and combine the chunks' partial outputs
  exactly by their log-sum-exps (:func:`variants.inference.combine_splits`): flash-decoding with a
  chunk of pages as the split. The gathered chunk stays in cache, so the cache is read once from
  memory; gathering the whole cache first and then running SDPA (what simple PyTorch
  implementations do) pays a full extra copy of it per call.
* ``pages``: attention page by page in pool order, without copying the cache: every pool page is
  scored against its owner's queries (one batched matmul over pages), the softmax maximum is
  reduced per sequence (``scatter_reduce``), and ``exp(S − max)`` and the page's ``P·V`` are summed
  into their sequence (``index_add``). Flash-decoding with the page as the split. It reads each
  page once; its extra traffic is each page's copy of its owner's queries and its partial output,
  ``G·Lq/page_size`` of the keys and of the values each: small for 128-token pages, larger than
  the cache itself for multi-query heads (G = 32) on 16-token pages.
* ``flex``: FlexAttention over the pool seen as one long single-head sequence (a view, no copy):
  a BlockMask whose blocks are pages lists, per sequence and head, its pool pages in logical
  order, and a mask_mod maps a pool position back to its logical position for the length and
  causal tests. The BlockMask is built once per block table and cached (an engine converts it
  once per step for all layers; its build is in ``first_call_ms``). Skipped where FlexAttention
  does not compile, and on CUDA for pages that are not a multiple of 128 tokens (the page is the
  BlockMask's KV block, which FlexAttention's CUDA kernel tiles by 128, as ``flex``'s own tile).

Attention features (``gather`` and ``pages``; :mod:`variants.features`): softcap and ALiBi modify the
scores of each chunk or page at its logical key positions, the window, prefix-LM and documents join
its mask, the sinks join the combination (gather: one more partial of log-sum-exp σ_h; pages: the
sequence's maximum and denominator); the value pool may have another head size. ``flex``: none.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from harness import Param
from variants import features as feat
from variants.inference import (
    DECODE_FEATURES,
    combine_splits,
    grouped_queries,
    inference_variant,
    partial_attention,
    score_mods,
    sink_partial,
    visible,
    zero_padding_rows,
)

_F32 = torch.float32
PATHS = ("gather", "pages", "flex")
#: The gather path gathers this many bytes of pages (K and V, every sequence) at a time, and at least
#: ``GATHER_MIN_TOKENS`` tokens: a chunk stays in cache between its gather and its attention.
GATHER_CHUNK_BYTES = 16 << 20
GATHER_MIN_TOKENS = 128
#: The flex path's query tile: one tile of queries per sequence (q_len up to this).
FLEX_Q_TILE = 128
#: On CUDA the flex path's page (its BlockMask's KV block) must be a multiple of this, as flex's own tile
#: must (variants.flex): FlexAttention's CUDA kernel needs the sparse block size to be a multiple of its BLOCK_N.
FLEX_CUDA_PAGE_MULTIPLE = 128


def gather_pages(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The contiguous ``(B, H_kv, max_pages·page_size, D)`` cache of a pool and a block table
    (positions past a sequence's length hold whatever its table's entries point at)."""
    P, Hkv, ps, D = pool.shape
    B, pages = block_table.shape
    out = pool.index_select(0, block_table.reshape(-1).long())  # (B·pages, Hkv, ps, D)
    return out.view(B, pages, Hkv, ps, D).transpose(1, 2).reshape(B, Hkv, pages * ps, D)


def _gather(q, k_pool, v_pool, causal, block_table, kv_lens, q_lens, sinks=None, **features):
    B, H, Lq, D = q.shape
    P, Hkv, ps, _ = k_pool.shape
    G, pages, Dv = H // Hkv, block_table.shape[1], v_pool.shape[-1]
    row = B * Hkv * ps * (D + Dv) * k_pool.element_size()  # bytes of one page of every sequence, K and V
    per = min(pages, max(-(-GATHER_MIN_TOKENS // ps), GATHER_CHUNK_BYTES // row))
    qg = grouped_queries(q, Hkv)
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1)
    pools = (k_pool.view(P * Hkv, ps, D), v_pool.view(P * Hkv, ps, Dv))  # one (page, head) block per row
    # logical positions: kv_lens are per sequence, so the length of the table is a bound only (lengths mask)
    mods = score_mods(q, pages * ps, Hkv, q_lens, kv_lens, features.get("softcap"), features.get("alibi_slopes"))
    masks = feat.mask_kwargs(features)
    outs, lses = [], []
    for p0 in range(0, pages, per):
        table = block_table[:, p0:p0 + per].long()
        n = table.shape[1] * ps
        ids = (table.view(B, 1, -1) * Hkv + heads).reshape(-1)  # (b, head, page) order: (B, H_kv, n, D)
        kc, vc = (x.index_select(0, ids).view(B * Hkv, n, x.shape[-1]) for x in pools)
        mask = visible(Lq, n, causal, q_lens, kv_lens, p0 * ps, p0 * ps + n, device=q.device, **masks)
        o, lse = partial_attention(qg, kc, vc, mask, (B, Hkv, G, Lq), mods,
                                   torch.arange(p0 * ps, p0 * ps + n, device=q.device))
        outs.append(o)
        lses.append(lse)
    lses = torch.stack(lses)
    sink = None if sinks is None else sink_partial(sinks, lses, (B, Hkv, G, Lq))
    return combine_splits(torch.stack(outs), lses, sink).view(B, H, Lq, Dv)


def page_owners(block_table, kv_lens, num_pages: int, page_size: int):
    """(owner sequence, logical page index) of every pool page; a page no sequence uses has owner 0
    and logical index −1."""
    B, pages = block_table.shape
    used = torch.arange(pages, device=block_table.device).view(1, -1) < ((kv_lens.long() + page_size - 1)
                                                                           // page_size).view(-1, 1)
    ids = block_table.long()[used]
    b, lp = used.nonzero(as_tuple=True)
    owner = torch.zeros(num_pages, dtype=torch.long, device=block_table.device)
    logical = torch.full((num_pages,), -1, dtype=torch.long, device=block_table.device)
    owner[ids], logical[ids] = b, lp
    return owner, logical


def _pages(q, k_pool, v_pool, causal, block_table, kv_lens, q_lens, sinks=None, softcap=None, alibi_slopes=None,
           **masks):
    P, Hkv, ps, D = k_pool.shape
    B, H, Lq, _ = q.shape
    G, Dv = H // Hkv, v_pool.shape[-1]
    owner, logical = page_owners(block_table, kv_lens, P, ps)
    qg = grouped_queries(q, Hkv).view(B, Hkv, G * Lq, D)
    s = torch.matmul(qg[owner], k_pool.to(qg.dtype).transpose(-1, -2))  # (P, Hkv, G·Lq, ps)
    j = logical.view(-1, 1) * ps + torch.arange(ps, device=q.device)  # (P, ps) logical key positions
    kl, ql = kv_lens.long()[owner].view(-1, 1, 1), q_lens.long()[owner].view(-1, 1, 1)
    keep = (j.unsqueeze(1) < kl) & (logical >= 0).view(-1, 1, 1)  # (P, 1, ps)
    pos = torch.arange(Lq, device=q.device).view(1, -1, 1) + (kl - ql)  # (P, Lq, 1): the queries' positions
    if softcap or alibi_slopes is not None:
        slopes = None if alibi_slopes is None else alibi_slopes.view(1, Hkv, G, 1, 1)
        feat.modify_scores(s.view(P, Hkv, G, Lq, ps), pos.view(P, 1, 1, Lq, 1), j.view(P, 1, 1, 1, ps),
                           softcap=softcap, slopes=slopes)
    if masks:
        keep = keep & feat.visible(pos, j.unsqueeze(1), causal, **masks)  # (P, Lq, ps)
    elif causal:
        keep = keep & (pos >= j.unsqueeze(1))  # (P, Lq, ps)
    s.view(P, Hkv, G, Lq, ps).masked_fill_(~keep.view(P, 1, 1, -1, ps), float("-inf"))
    page_max = s.amax(-1, keepdim=True)
    top = s.new_full((B, Hkv, G * Lq, 1), float("-inf"))
    top.scatter_reduce_(0, owner.view(-1, 1, 1, 1).expand_as(page_max), page_max, "amax")
    sink = None if sinks is None else sink_partial(sinks, top, (B, Hkv, G, Lq))[0].view(B, Hkv, G * Lq, 1)
    if sink is not None or masks:
        top = top if sink is None else torch.maximum(top, sink)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row that sees no key
    p = s.sub_(top[owner]).exp_()  # exp(S - the sequence's max): masked keys give 0
    l = s.new_zeros(B, Hkv, G * Lq, 1).index_add_(0, owner, p.sum(-1, keepdim=True))
    if sink is not None:
        l += (sink - top).exp()  # the sink's term of the denominator
    out = s.new_zeros(B, Hkv, G * Lq, Dv).index_add_(0, owner, torch.matmul(p, v_pool.to(s.dtype)))
    return out.div_(l.clamp_min(torch.finfo(l.dtype).tiny)).view(B, Hkv, G, Lq, Dv).reshape(B, H, Lq, Dv)


_BLOCK_MASKS: dict = {}
_LOCK = threading.Lock()


def _pool_block_mask(block_table, kv_lens, q_lens, causal: bool, heads: int, Lq: int, kv_heads: int,
                     num_pages: int, page_size: int):
    """The BlockMask of the pool as one sequence of ``num_pages·H_kv`` blocks (block = page·H_kv + head),
    cached per block table (kept alive with the mask, so its id is not reused)."""
    key = (id(block_table), block_table._version, id(kv_lens), causal, heads, Lq, kv_heads, num_pages, page_size)
    with _LOCK:
        hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        return hit[0]
    from torch.nn.attention.flex_attention import BlockMask

    device, ps, G = block_table.device, page_size, heads // kv_heads
    _, logical = page_owners(block_table, kv_lens, num_pages, ps)
    kl, ql = kv_lens.long(), q_lens.long()
    B, pages = block_table.shape
    npages = (kl + ps - 1) // ps
    head = torch.arange(heads, device=device) // G
    listed = torch.arange(pages, device=device).view(1, -1) < npages.view(-1, 1)
    # a page every query row sees entirely is full (no mask evaluated); the others partial
    first_row_sees = (kl - ql) if causal else kl - 1
    whole = ((torch.arange(pages, device=device) + 1) * ps - 1).view(1, -1) <= first_row_sees.view(-1, 1)
    whole &= ((torch.arange(pages, device=device) + 1) * ps).view(1, -1) <= kl.view(-1, 1)
    def counts(sel):  # (B, H, 1): pages each row lists
        return sel.sum(-1, dtype=torch.int32).view(B, 1, 1).expand(B, heads, 1).contiguous()

    def table(sel):  # (B, H, 1, blocks): each row's selected pages first, in logical order
        lp = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        blocks = block_table.long().gather(1, lp).view(B, 1, pages) * kv_heads + head.view(1, -1, 1)
        out = torch.zeros(B, heads, 1, num_pages * kv_heads, dtype=torch.int32, device=device)
        out[:, :, 0, :pages] = blocks.int()
        return out

    def mask_mod(b, h, q_idx, kv_idx):
        page = kv_idx // (ps * kv_heads)
        j = logical[page] * ps + kv_idx % ps
        keep = (j < kl[b]) & (j >= 0)
        return keep & (q_idx + (kl[b] - ql[b]) >= j) if causal else keep

    partial_sel, full_sel = listed & ~whole, listed & whole
    bm = BlockMask.from_kv_blocks(counts(partial_sel), table(partial_sel), counts(full_sel), table(full_sel),
                                  BLOCK_SIZE=(FLEX_Q_TILE, ps), mask_mod=mask_mod,
                                  seq_lengths=(Lq, num_pages * kv_heads * ps))
    with _LOCK:
        if len(_BLOCK_MASKS) > 16:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = (bm, block_table, kv_lens)
    return bm


def _flex(q, k_pool, v_pool, causal, block_table, kv_lens, q_lens):
    from variants import flex

    P, Hkv, ps, D = k_pool.shape
    bm = _pool_block_mask(block_table, kv_lens, q_lens, causal, q.shape[1], q.shape[2], Hkv, P, ps)
    flat = (x.view(1, 1, P * Hkv * ps, D) for x in (k_pool, v_pool))  # the pool as one sequence: a view
    return flex.compiled_call(q, *flat, bm, True)


def _check(case) -> list[str]:
    if case.params.get("path") != "flex":
        return []
    if case.features:
        return ["paged path 'flex' takes no attention features (gather and pages take them)"]
    from variants import flex

    reasons = []
    if case.device == "cuda" and (case.page_size or 16) % FLEX_CUDA_PAGE_MULTIPLE:
        reasons.append(f"paged path 'flex' on CUDA needs page_size a multiple of {FLEX_CUDA_PAGE_MULTIPLE} "
                       "(the page is FlexAttention's KV block, which its CUDA kernel tiles by "
                       f"{FLEX_CUDA_PAGE_MULTIPLE}), "
                       f"not {case.page_size or 16}")
    if not reasons and (why := flex.unavailable(case.device)):
        reasons.append(f"paged path 'flex': {why}")
    if (case.q_len or case.seq_len) > FLEX_Q_TILE:
        reasons.append(f"paged path 'flex' takes q_len <= {FLEX_Q_TILE} (one query tile per sequence)")
    return reasons


def _working_set(case) -> float:
    B, H, Hkv, L, D, e = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim, case.element_bytes
    Lq, ps = case.query_len, case.page_size or 16
    out = B * H * Lq * D * e
    path = case.params["path"]
    if path == "gather":  # the gathered K and V, and the mask
        return float(out + 2 * B * Hkv * (-(-L // ps) * ps) * D * e + B * Lq * L)
    if path == "pages":  # scores, the per-page queries and partial outputs (float32)
        return float(out + 4 * B * H * Lq * (L + 2 * D * -(-L // ps)))
    blocks = B * -(-L // ps) * Hkv  # flex: the BlockMask's tables (several copies of (B, H, blocks))
    return float(out + 6 * 4 * B * H * blocks)


@inference_variant(
    "paged",
    supports=dataclasses.replace(DECODE_FEATURES, kv_layouts={"paged"}),
    params={"path": Param("gather", choices=PATHS, help="gather pages then SDPA, attend page by page in pool "
                          "order (no copy), or FlexAttention over the pool")},
    check=_check,
    working_set=_working_set,
    description="attention over a paged KV cache (block table, shuffled pool pages): gather, page-wise or flex",
)
def paged(q, k, v, *, causal, block_table, kv_lens, q_lens, path="gather", **features):
    run = {"gather": _gather, "pages": _pages, "flex": _flex}[path]
    return zero_padding_rows(run(q, k, v, causal, block_table, kv_lens, q_lens, **features).to(q.dtype), q_lens)
