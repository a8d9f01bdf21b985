"""Context-parallel attention across the ranks of a process group: ring attention and Ulysses.

The harness launches ``world_size`` ranks for a case (:mod:`harness.engine.ranks`, gloo on CPU,
NCCL on CUDA with one GPU per rank) and measures the slowest rank. Each variant here is two pieces:
a pure per-rank kernel on LOCAL shards (:func:`ring_attention`, :func:`ulysses_attention`) and its
sharding rule (which global query rows a rank holds: :func:`shard_ranges`).

**The protocol** (``register_variant(..., level="distributed")``; a plugin adds its own distributed
variant the same way). The registered function is::

    fn(q, k, v, *, causal, group, world_size, rank, **params) -> Prepared

with q, k, v the FULL tensors (identical on every rank: same seed), ``group`` the process group
(``torch.distributed.group.WORLD``), called once per rank outside the timing. It shards (copies
its rank's rows: the full tensors may be freed afterwards) and returns a :class:`Prepared`
(any object with these four attributes will do):

* ``run() -> local_out``: the timed call, communication included: this rank's output rows
  ``(B, H, len(rows), D)`` in the input dtype;
* ``comm() -> None``: the same communication alone, with tensors of the same sizes (timed
  separately: the row's ``comm_ms``);
* ``rows``: LongTensor of the global query rows ``local_out`` holds, in its order;
* ``comm_bytes``: bytes this rank sends per ``run()``, counted from the tensors it sends.

**Sharding.** Rows are cut as ``torch.tensor_split`` cuts them: ``n`` chunks, the first ``L mod n``
one row longer, so any length works. ``ring`` with ``zigzag = false``: rank r holds chunk r of
``world_size``; ``zigzag = true`` (causal load balancing): chunks r and 2W−1−r of 2W. Causal masks
use the rows' true global positions. ``ulysses`` holds contiguous chunks.

**Ring** (Liu et al. 2023): every rank keeps its queries; the K/V blocks travel round the ring
(rank r sends to r+1, receives from r−1; W−1 transfers of a K/V block per rank), the next block's
exchange posted (``batch_isend_irecv``) before the current block is computed so communication
overlaps compute; each block's partial output and log-sum-exp merge into float32 accumulators
(online softmax). Causal: blocks wholly above the diagonal are skipped, diagonal chunks are
causal, the rest full. On CPU a block is PyTorch's fused flash kernel, which returns the
log-sum-exp (``aten._scaled_dot_product_flash_attention_for_cpu``, GQA without repeating K/V);
elsewhere plain float32 math (materialises the block's scores).

**Ulysses** (DeepSpeed-Ulysses): all-to-all from sequence-sharded to head-sharded q, k, v (gloo
supports ``all_to_all_single`` with split sizes in torch 2.13: uneven chunks travel
as flat buffers, since its list ``all_to_all`` needs equal sizes), exact local attention over the
whole sequence on H/W heads (``scaled_dot_product_attention``, GQA by ``enable_gqa``), all-to-all
back. Needs heads and kv_heads divisible by world_size.

Both are forward only (no backward pass), for self-attention of equal lengths and fixed-length
batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import Param, Supports, register_variant


@dataclass
class Prepared:
    """One rank's prepared call (the protocol in the module docstring)."""

    run: Callable[[], torch.Tensor]
    comm: Callable[[], None]
    rows: torch.Tensor
    comm_bytes: int


# ---------------------------------------------------------------------------------------------
# Sharding


def chunk_bounds(seq_len: int, chunks: int) -> list[tuple[int, int]]:
    """(start, end) of each of ``chunks`` pieces of ``range(seq_len)``, as ``torch.tensor_split``
    cuts them (the first ``seq_len % chunks`` one row longer)."""
    base, extra = divmod(seq_len, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def shard_ranges(seq_len: int, world_size: int, rank: int, zigzag: bool = False) -> list[tuple[int, int]]:
    """The global row ranges rank ``rank`` holds: chunk ``rank`` of ``world_size``, or (``zigzag``)
    chunks ``rank`` and ``2·world_size − 1 − rank`` of ``2·world_size``."""
    if not zigzag:
        return [chunk_bounds(seq_len, world_size)[rank]]
    bounds = chunk_bounds(seq_len, 2 * world_size)
    return [bounds[rank], bounds[2 * world_size - 1 - rank]]


def rows_of(ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(s, e) for s, e in ranges])


def _take(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """A contiguous copy of rows ``ranges`` of x (B, H, L, D)."""
    return torch.cat([x[:, :, s:e] for s, e in ranges], dim=2).contiguous()


def _size(ranges: list[tuple[int, int]]) -> int:
    return sum(e - s for s, e in ranges)


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# Ring attention


def block_attention(q, k, v, *, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, log-sum-exp) of softmax attention of q (B, H, n, D) over k, v (B, H_kv, m, D); causal:
    top-left aligned (a diagonal block of equal rows). The output in q's dtype or float32, lse float32."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal, scale=scale)
    G = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(G, dim=1) if G > 1 else x.float() for x in (k, v))
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if is_causal:
        s.masked_fill_(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ vf, lse


def _merge(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor) -> None:
    """Fold a block's (out, lse) into the running (acc, lse) in place: the log-sum-exp merge."""
    new = torch.logaddexp(lse, out_lse)
    acc.mul_(torch.exp(lse - new).unsqueeze(-1)).add_(out.float() * torch.exp(out_lse - new).unsqueeze(-1))
    lse.copy_(new)


def _accumulate(acc, lse, q, k, v, q_ranges, kv_ranges, causal: bool, scale: float) -> None:
    """Attend the local queries (rows ``q_ranges``) to one K/V block (rows ``kv_ranges``), chunk by
    chunk: skipped when every key is after every query (causal), causal on the diagonal, else full."""
    qo = 0
    for qs, qe in q_ranges:
        ko = 0
        for ks, ke in kv_ranges:
            if qe > qs and ke > ks and not (causal and ks >= qe):
                diagonal = causal and ke - 1 > qs
                if diagonal and (qs, qe) != (ks, ke):
                    raise ValueError(f"rows {qs}:{qe} and keys {ks}:{ke} overlap off the diagonal")
                o, l = block_attention(q[:, :, qo:qo + qe - qs], k[:, :, ko:ko + ke - ks], v[:, :, ko:ko + ke - ks],
                                       is_causal=diagonal, scale=scale)
                _merge(acc[:, :, qo:qo + qe - qs], lse[:, :, qo:qo + qe - qs], o, l)
            ko += ke - ks
        qo += qe - qs


def _ring_exchange(k, v, incoming_rows: int, group) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Post sending (k, v) to the next rank and receiving the previous rank's block (``incoming_rows``
    rows); returns (requests, k buffer, v buffer)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (dist.get_global_rank(group, (r + s) % W) for s in (1, -1))
    shape = (k.shape[0], k.shape[1], incoming_rows, k.shape[3])
    nk, nv = k.new_empty(shape), v.new_empty(shape)
    ops = [dist.P2POp(dist.isend, k, nxt, group), dist.P2POp(dist.isend, v, nxt, group),
           dist.P2POp(dist.irecv, nk, prv, group), dist.P2POp(dist.irecv, nv, prv, group)]
    return dist.batch_isend_irecv(ops), nk, nv


def ring_attention(q, k, v, *, causal: bool, group, q_ranges, kv_ranges_of, scale: float | None = None,
                   compute: bool = True) -> torch.Tensor | None:
    """Ring attention on this rank's shards: q (B, H, n, D) holds global rows ``q_ranges``; k, v
    (B, H_kv, m, D) this rank's K/V block; ``kv_ranges_of[s]`` the rows of rank s's block (every
    rank knows the sharding, so no positions travel). ``compute=False``: the K/V rotation alone."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if compute else None
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device) if compute else None
    for step in range(W):
        reqs = []
        if step < W - 1:
            reqs, nk, nv = _ring_exchange(k, v, _size(kv_ranges_of[(r - step - 1) % W]), group)
        if compute:
            _accumulate(acc, lse, q, k, v, q_ranges, kv_ranges_of[(r - step) % W], causal, scale)
        for req in reqs:
            req.wait()
        if reqs:
            k, v = nk, nv
    return acc.to(q.dtype) if compute else None


def _ring_bytes(k: torch.Tensor, v: torch.Tensor, rank: int, kv_ranges_of) -> int:
    """Bytes rank ``rank`` sends in one ring pass: at step s the block of rank (rank − s), s < W − 1."""
    W = len(kv_ranges_of)
    per_row = _bytes(k, v) // max(1, k.shape[2])
    return sum(per_row * _size(kv_ranges_of[(rank - s) % W]) for s in range(W - 1))


def _available_ranks(device: str) -> tuple[int, str]:
    if device == "cuda":
        return (torch.cuda.device_count() if torch.cuda.is_available() else 0), "CUDA devices"
    return len(os.sched_getaffinity(0)), "usable CPU cores (os.sched_getaffinity)"


def _common_check(case, per_rank_chunks: int) -> list[str]:
    world = case.params.get("world_size", 2)
    reasons = []
    have, what = _available_ranks(case.device)
    if world > have:
        reasons.append(f"world_size {world} exceeds the {have} {what} of this machine")
    if case.seq_len < world * per_rank_chunks:
        reasons.append(f"seq_len {case.seq_len} < {world * per_rank_chunks}: a rank would hold an empty chunk")
    return reasons


def _ring_check(case) -> list[str]:
    return _common_check(case, 2 if case.params.get("zigzag") else 1)


def _working_set(case) -> float:
    """Every rank holds the full q, k, v while preparing, its shards, and the buffers in flight."""
    world = case.params.get("world_size", 2)
    qkvo = case.batch * (2 * case.heads + 2 * case.kv_heads) * case.seq_len * case.head_dim * case.element_bytes
    return float(world * qkvo + 2 * qkvo)


_SUPPORTS = Supports(backward=False)
_WORLD = Param(2, min=1, help="ranks of the process group the harness launches (one per core or GPU)")


@register_variant(
    "ring", family="distributed", exact=True, level="distributed", supports=_SUPPORTS, check=_ring_check,
    working_set=_working_set,
    params={"world_size": _WORLD,
            "zigzag": Param(False, help="causal load balancing: rank r holds chunks r and 2W-1-r of 2W")},
    description="ring attention: K/V blocks rotate round the ranks, online-softmax (log-sum-exp) merge",
)
def ring(q, k, v, *, causal, group, world_size, rank, zigzag=False) -> Prepared:
    L = q.shape[2]
    ranges = [shard_ranges(L, world_size, r, zigzag) for r in range(world_size)]
    q_local, k_local, v_local = (_take(x, ranges[rank]) for x in (q, k, v))

    def run():
        return ring_attention(q_local, k_local, v_local, causal=causal, group=group, q_ranges=ranges[rank],
                              kv_ranges_of=ranges)

    def comm():
        ring_attention(q_local, k_local, v_local, causal=causal, group=group, q_ranges=ranges[rank],
                       kv_ranges_of=ranges, compute=False)

    return Prepared(run, comm, rows_of(ranges[rank]), _ring_bytes(k_local, v_local, rank, ranges))


# ---------------------------------------------------------------------------------------------
# Ulysses


def _all_to_all(sends: list[torch.Tensor], recv_shapes: list[tuple[int, ...]], group) -> list[torch.Tensor]:
    """Tensor j of ``sends`` to rank j; one tensor of ``recv_shapes[i]`` from each rank i. Through
    ``all_to_all_single`` with split sizes on flat buffers, because gloo's list ``all_to_all`` refuses
    tensors of unequal sizes (uneven chunks)."""
    counts = [math.prod(shape) for shape in recv_shapes]
    flat = torch.cat([s.reshape(-1) for s in sends])
    out = flat.new_empty(sum(counts))
    dist.all_to_all_single(out, flat, output_split_sizes=counts, input_split_sizes=[s.numel() for s in sends],
                           group=group)
    return [piece.view(shape) for piece, shape in zip(out.split(counts), recv_shapes)]


def seq_to_heads(x: torch.Tensor, seq_sizes: list[int], group) -> torch.Tensor:
    """(B, h, n_rank, D) rows of this rank → (B, h/W, L, D) all rows of this rank's heads."""
    W = len(seq_sizes)
    B, h, _, D = x.shape
    sends = list(x.chunk(W, dim=1))
    return torch.cat(_all_to_all(sends, [(B, h // W, n, D) for n in seq_sizes], group), dim=2)


def heads_to_seq(y: torch.Tensor, seq_sizes: list[int], rank: int, group) -> torch.Tensor:
    """(B, h/W, L, D) → (B, h, n_rank, D): the inverse of :func:`seq_to_heads`."""
    B, hw, _, D = y.shape
    sends = list(y.split(seq_sizes, dim=2))
    return torch.cat(_all_to_all(sends, [(B, hw, seq_sizes[rank], D)] * len(seq_sizes), group), dim=1)


def ulysses_attention(q, k, v, *, causal: bool, group, seq_sizes: list[int], compute: bool = True):
    """Ulysses on this rank's contiguous rows (q (B, H, n, D), k, v (B, H_kv, n, D); rank s holds
    ``seq_sizes[s]`` rows, in rank order). ``compute=False``: the four all-to-alls alone (the
    output's stand-in is the head-sharded q, of the output's shape)."""
    r = dist.get_rank(group)
    qh, kh, vh = (seq_to_heads(x, seq_sizes, group) for x in (q, k, v))
    if not compute:
        heads_to_seq(qh, seq_sizes, r, group)
        return None
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, enable_gqa=kh.shape[1] != qh.shape[1])
    return heads_to_seq(out, seq_sizes, r, group)


def _ulysses_bytes(q, k, v, seq_sizes: list[int], rank: int) -> int:
    """Bytes rank ``rank`` sends to the other ranks: (W−1)/W of its q, k, v rows, then its heads'
    rows of every other rank's output."""
    W = len(seq_sizes)
    out_rows = sum(n for s, n in enumerate(seq_sizes) if s != rank)
    per_row_out = _bytes(q) // max(1, q.shape[2]) // W
    return _bytes(q, k, v) * (W - 1) // W + per_row_out * out_rows


def _ulysses_check(case) -> list[str]:
    world = case.params.get("world_size", 2)
    reasons = _common_check(case, 1)
    for name in ("heads", "kv_heads"):
        if getattr(case, name) % world:
            reasons.append(f"ulysses shards heads: {name} = {getattr(case, name)} is not divisible by "
                           f"world_size {world}")
    return reasons


@register_variant(
    "ulysses", family="distributed", exact=True, level="distributed", supports=_SUPPORTS, check=_ulysses_check,
    working_set=_working_set, params={"world_size": _WORLD},
    description="DeepSpeed-Ulysses: all-to-all sequence→head sharding, local SDPA, all-to-all back",
)
def ulysses(q, k, v, *, causal, group, world_size, rank) -> Prepared:
    ranges = [shard_ranges(q.shape[2], world_size, r) for r in range(world_size)]
    sizes = [_size(x) for x in ranges]
    q_local, k_local, v_local = (_take(x, ranges[rank]) for x in (q, k, v))

    def run():
        return ulysses_attention(q_local, k_local, v_local, causal=causal, group=group, seq_sizes=sizes)

    def comm():
        ulysses_attention(q_local, k_local, v_local, causal=causal, group=group, seq_sizes=sizes, compute=False)

    return Prepared(run, comm, rows_of(ranges[rank]), _ulysses_bytes(q_local, k_local, v_local, sizes, rank))
