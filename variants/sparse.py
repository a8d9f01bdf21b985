"""Block-sparse attention: exact softmax attention restricted to a fixed pattern of key blocks.

The sequence is cut into ``n = ceil(L / block)`` blocks of ``block`` tokens (the
last one may be shorter). A boolean *layout* ``(n, n)`` says which key blocks each
query block attends; inside a kept block every token pair is attended, except
that causal attention also drops the pairs with key > query (so the diagonal
block is a lower triangle). The result is exact softmax attention under the
token mask ``layout[i // block, j // block] & (i >= j if causal)``, which is what
the float64 reference applies (:func:`pattern_mask`).

Patterns (``pattern`` param; ``i`` a query block, ``j`` a key block, ``w`` =
``window_blocks``, ``g`` = ``global_blocks``, ``r`` = ``random_blocks``, ``s`` =
``stride``):

* ``local_global`` (Longformer, Beltagy et al. 2020): ``|i - j| <= w`` (a band of
  ``2w + 1`` blocks) or ``j < g`` (every query sees the global blocks, i.e. the
  first ``g`` blocks of the sequence) or ``i < g`` (global queries see every key).
  ``random_blocks``, ``stride`` and ``seed`` are unused.
* ``bigbird`` (Zaheer et al. 2020, block-sparse "ITC" form): the ``local_global``
  layout plus, for every non-global query block ``i >= g``, ``r`` random key blocks
  drawn without replacement among the blocks it does not already keep (and, when
  causal, only among ``j < i``); a row with fewer than ``r`` candidates takes them
  all. The draw is reproducible from ``seed``: ``torch.Generator().manual_seed(seed)``
  gives, chunk of 256 query-block rows after chunk in order, one uniform number per
  (i, j) (``torch.rand(rows, n)``); each row keeps the ``r`` candidates with the
  smallest numbers. The same layout serves every batch element and head.
  ``stride`` is unused.
* ``strided`` (Sparse Transformer "fixed" pattern, Child et al. 2019, at block
  granularity): ``|i - j| <= w`` (the local band) or ``j % s == s - 1`` (the last
  block of every group of ``s`` blocks is a "summary" column every query sees).
  ``global_blocks``, ``random_blocks`` and ``seed`` are unused.

When causal, every layout is then intersected with ``j <= i`` (so global queries
see all earlier keys, the band is one-sided, and summary columns are only those
at or before the query block).

Computation, at cost proportional to the number of kept blocks (never the dense
L×L scores): query blocks are grouped into buckets of similar kept-block count
(within a bucket, counts differ by at most 25% or by one block; rows are padded
to the bucket's largest count with masked slots that re-read one of the row's
kept blocks). A bucket is processed in chunks of query blocks whose scores take
about ``CHUNK_BYTES`` (4 MiB, so that scores, probabilities and the gathered
blocks stay in cache). For each chunk, the kept key and value blocks of every
query block are gathered (``index_select``) into a contiguous
``(rows, count·block, D)`` tensor, and the scores are one batched matmul of
``(rows, G·block, D) × (rows, D, count·block)``, G being the query heads that share
a key/value head (grouped-query attention never copies K/V per query head).
Kept blocks are in ascending order, so the hidden keys of a row (the causal
diagonal block, the short last block, padding slots) are a suffix of its slots:
only the columns from the chunk's first hidden one on are masked, in place, with
a finite minimum before an ordinary softmax; then ``probs @ V`` is written into
the output rows. Global query blocks form their own bucket (they keep every
block, so their work is dense, and so is their count).
The lookup tables (buckets, gather indices, key positions) depend only on the
pattern and the length; they are built once and cached (per device), as a
block-sparse kernel's layout tables are built once per layout.

Backward runs through autograd; its saved tensors (gathered K/V, probabilities)
are proportional to the kept blocks. The forward alone (no grad) holds one
chunk at a time.

FLOPs count the real kept token pairs (the causal diagonal block as a triangle,
the short last block at its real size): ``4·B·H·D·pairs``. The ``density`` column is
kept pairs / the pairs dense attention with the same causality attends: ``L²``,
or ``L(L+1)/2`` when causal (the real lower triangle, so a causal layout that keeps
every block has density exactly 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from harness import Param, pair_flops, register_variant
from variants.common import masked_value, pad_seq, scale_of

PATTERNS = ("local_global", "bigbird", "strided")

DEFAULTS = {
    "block": 64,
    "window_blocks": 1,
    "global_blocks": 1,
    "random_blocks": 3,
    "stride": 8,
    "seed": 0,
}

#: Rows of the layout drawn per ``torch.rand`` call for bigbird's random blocks.
RANDOM_CHUNK = 256
#: Largest layout (blocks × blocks) the variant agrees to build.
MAX_LAYOUT_ENTRIES = 1 << 28
#: Query blocks are processed in chunks whose scores take about this many bytes (cache-sized).
CHUNK_BYTES = 4 << 20
#: Bucket rule: rows whose kept-block count is at most max(c0 + 1, c0 * BUCKET_SLACK) share a bucket.
BUCKET_SLACK = 1.25

_LAYOUT_KEYS = tuple(DEFAULTS)


def num_blocks(seq_len: int, block: int) -> int:
    return -(-seq_len // block)


@functools.lru_cache(maxsize=8)
def _layout_cached(pattern, seq_len, causal, block, window_blocks, global_blocks, random_blocks, stride, seed):
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparse pattern {pattern!r} (one of {', '.join(PATTERNS)})")
    n = num_blocks(seq_len, block)
    # built with n² bools at most (no n² integer temporaries), so long sequences stay cheap
    layout = torch.zeros(n, n, dtype=torch.bool)
    for d in range(-min(window_blocks, n - 1), min(window_blocks, n - 1) + 1):
        layout.diagonal(d).fill_(True)
    if pattern in ("local_global", "bigbird"):
        layout[:, :global_blocks] = True
        layout[:global_blocks] = True
    else:  # strided
        layout[:, stride - 1 :: stride] = True
    if causal:
        layout = layout.tril()
    if pattern == "bigbird" and random_blocks > 0:
        gen = torch.Generator().manual_seed(seed)
        take = min(random_blocks, n)
        j = torch.arange(n).view(1, n)
        for start in range(0, n, RANDOM_CHUNK):
            rows = torch.arange(start, min(start + RANDOM_CHUNK, n)).view(-1, 1)
            keys = torch.rand(len(rows), n, generator=gen)
            kept = layout[start : start + len(rows)]
            candidate = ~kept & (rows >= global_blocks)
            if causal:
                candidate &= j < rows
            keys = keys.masked_fill(~candidate, 2.0)  # non-candidates sort last
            chosen = keys.topk(take, dim=1, largest=False)
            picked = torch.zeros_like(kept).scatter_(1, chosen.indices, chosen.values < 2.0)
            kept |= picked  # in place, into the layout
    return layout


def pattern_layout(
    pattern: str,
    seq_len: int,
    causal: bool,
    *,
    block: int = DEFAULTS["block"],
    window_blocks: int = DEFAULTS["window_blocks"],
    global_blocks: int = DEFAULTS["global_blocks"],
    random_blocks: int = DEFAULTS["random_blocks"],
    stride: int = DEFAULTS["stride"],
    seed: int = DEFAULTS["seed"],
) -> torch.Tensor:
    """The (n_q_blocks, n_k_blocks) boolean block layout of ``pattern`` (see the module docstring)."""
    return _layout_cached(
        pattern, seq_len, bool(causal), block, window_blocks, global_blocks, random_blocks, stride, seed
    ).clone()


def _layout_params(params: dict) -> dict:
    return {k: params.get(k, DEFAULTS[k]) for k in _LAYOUT_KEYS}


def case_layout(case) -> torch.Tensor:
    """The block layout of a case (on the CPU)."""
    return pattern_layout(case.params["pattern"], case.seq_len, case.causal, **_layout_params(case.params))


def pattern_mask(case):
    """Token-level mask_mod ``mask(b, h, q_idx, kv_idx)`` of the case's pattern (FlexAttention style).

    Indexes the captured block layout with ``q_idx // block`` and ``kv_idx // block``
    (indices broadcast; any shape, 0-dim included), and with ``q_idx >= kv_idx``
    when causal. Out-of-range indices are clamped to the last block, so it never
    raises on a padded index.
    """
    block = case.params.get("block", DEFAULTS["block"])
    layout = case_layout(case).to(case.device)
    last = layout.shape[0] - 1
    causal = case.causal

    def block_sparse(b, h, q_idx, kv_idx):
        lay = layout if layout.device == q_idx.device else layout.to(q_idx.device)
        qb = (q_idx // block).clamp(0, last)
        kb = (kv_idx // block).clamp(0, last)
        keep = lay[qb, kb]
        if causal:
            keep = keep & (q_idx >= kv_idx)
        return keep

    block_sparse.__name__ = f"{case.params['pattern']}_block_sparse"
    return block_sparse


def _block_sizes(seq_len: int, block: int) -> torch.Tensor:
    n = num_blocks(seq_len, block)
    sizes = torch.full((n,), block, dtype=torch.int64)
    sizes[-1] = seq_len - (n - 1) * block
    return sizes


def layout_pairs(layout: torch.Tensor, seq_len: int, block: int, causal: bool) -> int:
    """Exact number of token pairs a block layout keeps (causal diagonal blocks as triangles)."""
    sizes = _block_sizes(seq_len, block)
    full = int((layout.long() * sizes.view(-1, 1) * sizes.view(1, -1)).sum())
    if not causal:
        return full
    diag = layout.diagonal().long()
    # a kept diagonal block of s tokens keeps s(s+1)/2 pairs, not s²
    return full - int((diag * sizes * (sizes - 1) // 2).sum())


def case_pairs(case) -> int:
    return layout_pairs(case_layout(case), case.seq_len, case.params.get("block", DEFAULTS["block"]), case.causal)


def _flops(case) -> float:
    return pair_flops(case, case_pairs(case))


def _columns(case) -> dict:
    L = case.seq_len
    full = L * (L + 1) // 2 if case.causal else L * L
    return {"density": case_pairs(case) / full}


def _check(case) -> list[str]:
    n = num_blocks(case.seq_len, case.params.get("block", DEFAULTS["block"]))
    if n * n > MAX_LAYOUT_ENTRIES:
        return [
            f"block_sparse layout of {n}x{n} blocks exceeds {MAX_LAYOUT_ENTRIES} entries; use a larger block"
        ]
    return []


# ---------------------------------------------------------------------------------------------
# The plan: buckets of query blocks with their gather indices and token masks


@functools.lru_cache(maxsize=8)
def _plan_cached(layout_key: tuple, seq_len: int, causal: bool, device: str):
    """Buckets of query blocks (see :class:`_Bucket`), sizes ∝ the kept blocks."""
    pattern, *rest = layout_key
    block = dict(zip(_LAYOUT_KEYS, rest))["block"]
    layout = _layout_cached(pattern, seq_len, causal, *rest)
    n = layout.shape[0]
    counts = layout.sum(1)
    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()

    # group the sorted rows into buckets of similar count
    bounds = []
    start = 0
    while start < n:
        c0 = sorted_counts[start]
        limit = max(c0 + 1, int(c0 * BUCKET_SLACK))
        end = start
        while end < n and sorted_counts[end] <= limit:
            end += 1
        bounds.append((start, end))
        start = end

    offs = torch.arange(block)
    buckets = []
    for start, end in bounds:
        rows = order[start:end]
        r = len(rows)
        row_counts = counts[rows]
        c = int(row_counts.max())
        # kept key blocks of each row in ascending order, then padding slots
        nz = layout[rows].nonzero()  # (kept, 2), row-major
        first = torch.cumsum(row_counts, 0) - row_counts
        slot = torch.arange(len(nz)) - first[nz[:, 0]]
        slot_ok = torch.zeros(r, c, dtype=torch.bool)
        slot_ok[nz[:, 0], slot] = True
        kidx = torch.zeros(r, c, dtype=torch.int64)
        kidx[nz[:, 0], slot] = nz[:, 1]
        kidx = torch.where(slot_ok, kidx, kidx[:, :1])  # padding re-reads a kept block, masked below

        # key slot p of a row is visible to query row qi iff key_pos[p] <= limit[qi]: padding slots
        # get a key position past any limit; the limit is the last key (and the query itself if causal)
        key_pos = (kidx.unsqueeze(-1) * block + offs).reshape(r, c * block)
        key_pos = key_pos.masked_fill(~slot_ok.repeat_interleave(block, 1), seq_len)
        q_pos = rows.view(-1, 1) * block + offs  # (r, block)
        limit = q_pos.clamp(max=seq_len - 1) if causal else torch.full_like(q_pos, seq_len - 1)
        # first column with a hidden key, per row (c·block: none). Kept blocks ascend, so the hidden
        # keys (causal diagonal block, short last block, padding) are a suffix of each row's slots.
        hidden_any = key_pos > limit.amin(1, keepdim=True)  # (r, c·block): hidden for some query row
        first_hidden = torch.where(hidden_any.any(1), hidden_any.int().argmax(1), c * block)
        buckets.append(
            _Bucket(rows.to(device), kidx.to(device), key_pos.to(device), limit.to(device), first_hidden.tolist())
        )
    return buckets


class _Bucket(NamedTuple):
    rows: torch.Tensor  # (r,) query blocks
    kidx: torch.Tensor  # (r, c) kept key blocks of each, padded by repeating one
    key_pos: torch.Tensor  # (r, c·block) key position of each slot (seq_len for padding)
    limit: torch.Tensor  # (r, block) last visible key of each query row
    first_hidden: list  # per row, first slot column with a hidden key (c·block: none)


def _plan(params: dict, seq_len: int, causal: bool, device: torch.device):
    key = (params["pattern"],) + tuple(_layout_params(params)[k] for k in _LAYOUT_KEYS)
    return _plan_cached(key, seq_len, bool(causal), str(device))


def _working_set(case) -> float:
    """Estimated peak bytes.

    Forward: the scaled, padded and regrouped copies of q and out, plus one chunk's scores and
    probabilities (about ``CHUNK_BYTES`` each, at least one query block) and gathered K/V.
    Backward modes also keep every chunk's probabilities and gathered K/V for autograd (∝ kept blocks).
    """
    layout = case_layout(case)
    block = case.params["block"]
    n = layout.shape[0]
    kept_blocks = int(layout.sum())
    widest = int(layout.sum(1).max()) * block
    e = case.element_bytes
    B, H, Hkv, D = case.batch, case.heads, case.kv_heads, case.head_dim
    copies = 4 * B * H * n * block * D * e
    per_row = B * H * block * widest * e
    rows = max(1, CHUNK_BYTES // per_row)
    chunk = 2 * rows * per_row + 2 * rows * B * Hkv * widest * D * e + rows * block * widest
    if case.mode == "fwd":
        return float(copies + chunk)
    saved = B * H * kept_blocks * block * block * e + 2 * B * Hkv * kept_blocks * block * D * e
    return float(2 * copies + 2 * chunk + saved)  # + gradient copies and a chunk of backward temporaries


@register_variant(
    "block_sparse",
    family="sparse",
    exact=True,
    flops=_flops,
    mask=pattern_mask,
    check=_check,
    working_set=_working_set,
    columns=_columns,
    params={
        "pattern": Param("local_global", choices=PATTERNS, help="block layout (see variants/sparse.py)"),
        "block": Param(DEFAULTS["block"], min=1, help="tokens per block (query and key)"),
        "window_blocks": Param(DEFAULTS["window_blocks"], min=0, help="band: key blocks |i-j| <= this"),
        "global_blocks": Param(DEFAULTS["global_blocks"], min=0, help="first blocks that are global"),
        "random_blocks": Param(DEFAULTS["random_blocks"], min=0, help="bigbird: random key blocks per row"),
        "stride": Param(DEFAULTS["stride"], min=1, help="strided: every stride-th block is a summary column"),
        "seed": Param(DEFAULTS["seed"], min=0, help="bigbird: seed of the random blocks"),
    },
    description="block-sparse exact attention (Longformer / BigBird / Sparse Transformer layouts), "
    "cost ∝ kept blocks",
)
def block_sparse(
    q,
    k,
    v,
    *,
    causal,
    pattern="local_global",
    block=DEFAULTS["block"],
    window_blocks=DEFAULTS["window_blocks"],
    global_blocks=DEFAULTS["global_blocks"],
    random_blocks=DEFAULTS["random_blocks"],
    stride=DEFAULTS["stride"],
    seed=DEFAULTS["seed"],
):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    params = {
        "pattern": pattern,
        "block": block,
        "window_blocks": window_blocks,
        "global_blocks": global_blocks,
        "random_blocks": random_blocks,
        "stride": stride,
        "seed": seed,
    }
    buckets = _plan(params, L, causal, q.device)
    n = num_blocks(L, block)
    Lp = n * block
    fill = masked_value(q.dtype)

    # (B·Hkv, n, G·block, D): the G query heads of a kv head stacked along the rows of each block
    qb = pad_seq(q * scale_of(q), 0, Lp - L).reshape(B, Hkv, G, n, block, D)
    qb = qb.permute(0, 1, 3, 2, 4, 5).reshape(B * Hkv, n, G * block, D)
    kb = pad_seq(k, 0, Lp - L).reshape(B * Hkv, n, block, D)
    vb = pad_seq(v, 0, Lp - L).reshape(B * Hkv, n, block, D)

    out = qb.new_empty(B * Hkv, n, G * block, D)
    for bucket in buckets:
        r, c = bucket.kidx.shape
        width = c * block
        # query blocks per chunk: one chunk's scores stay near CHUNK_BYTES (cache-sized)
        per_row = B * H * block * width * q.element_size()
        step = max(1, CHUNK_BYTES // per_row)
        for i in range(0, r, step):
            j = min(i + step, r)
            rows = bucket.rows[i:j]
            flat = bucket.kidx[i:j].reshape(-1)
            kg = kb.index_select(1, flat).view(B * Hkv, j - i, width, D)
            vg = vb.index_select(1, flat).view(B * Hkv, j - i, width, D)
            scores = qb.index_select(1, rows) @ kg.transpose(-1, -2)  # (B·Hkv, rows, G·block, c·block)
            lo = min(bucket.first_hidden[i:j])
            if lo < width:  # mask the columns from the first hidden one on, in place
                hidden = bucket.key_pos[i:j, lo:].unsqueeze(1) > bucket.limit[i:j].unsqueeze(2)
                scores[..., lo:].view(B * Hkv, j - i, G, block, width - lo).masked_fill_(hidden.unsqueeze(1), fill)
            probs = torch.softmax(scores, dim=-1)
            out.index_copy_(1, rows, probs @ vg)  # (B·Hkv, n, G·block, D), filled chunk by chunk
    out = out.reshape(B, Hkv, n, G, block, D).permute(0, 1, 3, 2, 4, 5).reshape(B, H, Lp, D)
    return out[:, :, :L]
