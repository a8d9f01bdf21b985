"""``tiled`` with attention features: the same FlashAttention-2 loops, with every feature in its tile.

Per tile of ``block_q`` queries × ``block_k`` keys, in base-2 units (q pre-scaled by scale·log2 e as
in :mod:`variants.tiled`): the scores; a softcap ``c·tanh(s/c)`` (``c`` in base-2 units); the ALiBi
bias ``−m_h·|p − j|·log2 e``; the mask of causality, window, prefix and documents, a tile no query
of the block can see being skipped (a window attends O(L·w) pairs, not L²). The online softmax keeps
a running maximum that may be −inf until a row's first visible key (a window's first key block is
not every row's), so it subtracts a finite stand-in. The sinks join the denominators at the end:
``l + 2^(σ·log2 e − m)``. The log-sum-exp saved for the backward includes them, so the backward
recomputes each probability as ``P = 2^(S − lse)`` unchanged; softcap's derivative ``1 − tanh²``
multiplies ``dS``. ``v`` may have another head size than q and k.
"""

from __future__ import annotations

import math

import torch

from variants import features as feat

_F32 = torch.float32
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


class TileFeatures:
    """The features of one call, per tile: ``Hkv`` key/value heads of ``G`` query heads each, ``L``
    queries at positions ``Lk − L + i``."""

    def __init__(self, Hkv: int, G: int, L: int, Lk: int, causal: bool, softcap=None, alibi_slopes=None,
                 sinks=None, **masks):
        self.Hkv, self.G, self.offset, self.causal, self.masks = Hkv, G, Lk - L, causal, masks
        self.softcap = softcap
        self.slopes = None if alibi_slopes is None else alibi_slopes.float().view(1, Hkv, G, 1, 1)
        self.sinks = None if sinks is None else sinks.float().view(1, Hkv, G, 1, 1)

    def keep(self, i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
        """The tile's visible (query, key) pairs (None: all of them)."""
        pos = torch.arange(i0, i1, device=device).view(-1, 1) + self.offset
        return feat.visible(pos, torch.arange(j0, j1, device=device).view(1, -1), self.causal, **self.masks)

    def scores(self, s: torch.Tensor, i0: int, i1: int, j0: int, j1: int, keep, keep_tanh: bool = False):
        """Modify the base-2 score tile ``s`` (N, G·rows, cols) in place: softcap, ALiBi, mask. Returns tanh
        of the softcap (``keep_tanh``) or None."""
        s5 = s.view(-1, self.Hkv, self.G, i1 - i0, j1 - j0)
        pos = torch.arange(i0, i1, device=s.device).view(-1, 1) + self.offset
        t = feat.modify_scores(s5, pos, torch.arange(j0, j1, device=s.device).view(1, -1), softcap=self.softcap,
                               slopes=self.slopes, log_base=_LOG2E, keep_tanh=keep_tanh)
        if keep is not None:
            s5.masked_fill_(~keep, float("-inf"))
        return t


def _blocks(length: int, block: int):
    return [(s, min(s + block, length)) for s in range(0, length, block)]


def _tile(x: torch.Tensor, i0: int, i1: int, scale: float | None = None) -> torch.Tensor:
    """Rows [i0, i1) of x (N, G, L, D) as a float32 (N, G·rows, D) tile, optionally scaled."""
    N, G, _, D = x.shape
    t = x[:, :, i0:i1].to(_F32)
    return (t * scale if scale is not None else t).reshape(N, G * (i1 - i0), D)


def forward(q, k, v, block_q: int, block_k: int, scale: float, compute: str, f: TileFeatures):
    """Tiled forward with features. q (N, G, L, D); k (N, Lk, D), v (N, Lk, Dv). Returns out (q's dtype,
    (N, G, L, Dv)) and the natural log-sum-exp of every row, sinks included (N, G, L) float32. Tiles live
    in buffers reused across the loop (variants.tiled's: no allocation, no page faults per tile)."""
    from variants.tiled import _Tiles

    N, G, L, D = q.shape
    Lk, Dv = k.shape[1], v.shape[-1]
    low = compute == "input" and q.dtype != _F32
    kf, vf = k.to(_F32), (v if low else v.to(_F32))
    out = q.new_empty(N, G, L, Dv)
    lse = torch.empty(N, G, L, dtype=_F32, device=q.device)
    tiles = _Tiles(q.device)
    for i0, i1 in _blocks(L, min(block_q, L)):
        rows = G * (i1 - i0)
        qs = _tile(q, i0, i1, scale * _LOG2E)
        acc = tiles.get("acc", (N, rows, Dv)).zero_()
        m = tiles.get("m", (N, rows, 1)).fill_(float("-inf"))
        l = tiles.get("l", (N, rows, 1)).zero_()
        m_new, m_use = tiles.get("m_new", (N, rows, 1)), tiles.get("m_use", (N, rows, 1))
        for j0, j1 in _blocks(Lk, min(block_k, Lk)):
            keep = f.keep(i0, i1, j0, j1, q.device)
            if keep is not None and not keep.any():
                continue  # no query of the block sees a key of this tile
            s = torch.bmm(qs, kf[:, j0:j1].transpose(1, 2), out=tiles.get("s", (N, rows, j1 - j0)))
            f.scores(s, i0, i1, j0, j1, keep)
            torch.maximum(m, s.amax(-1, keepdim=True), out=m_new)
            torch.nan_to_num(m_new, neginf=0.0, out=m_use)  # no key seen yet (−inf): subtract 0
            p = s.sub_(m_use).exp2_()
            alpha = m.sub_(m_use).exp2_()  # in m's buffer: m is m_new from here on
            l.mul_(alpha).add_(p.sum(-1, keepdim=True))
            pv = tiles.get("pv", (N, rows, Dv), v.dtype if low else _F32)
            if low:
                torch.bmm(tiles.get("p_low", (N, rows, j1 - j0), v.dtype).copy_(p), vf[:, j0:j1], out=pv)
            else:
                torch.bmm(p, vf[:, j0:j1], out=pv)
            acc.mul_(alpha).add_(pv)
            m.copy_(m_new)
        if f.sinks is not None:  # the sink's 2^(σ log2 e) joins the denominator
            sink = f.sinks.expand(N // f.Hkv, -1, -1, i1 - i0, 1).reshape(N, rows, 1) * _LOG2E
            top = torch.maximum(m, sink)
            alpha = (m - top).exp2_()
            l, acc, m = l * alpha + (sink - top).exp2_(), acc * alpha, top
        o = acc / l.clamp_min(torch.finfo(_F32).tiny)  # a row that sees no key: 0
        out[:, :, i0:i1] = o.view(N, G, i1 - i0, Dv).to(out.dtype)
        lse[:, :, i0:i1] = ((m + l.log2()) * _LN2).view(N, G, i1 - i0)
    return out, lse


def backward(q, k, v, out, lse, dout, block_q: int, block_k: int, scale: float, f: TileFeatures):
    """FlashAttention-2 backward with features from the saved log-sum-exp; float32 (dq, dk, dv)."""
    N, G, L, D = q.shape
    Lk, Dv = k.shape[1], v.shape[-1]
    kf, vf = k.to(_F32), v.to(_F32)
    dq = torch.empty(N, G, L, D, dtype=_F32, device=q.device)
    dk = torch.zeros(N, Lk, D, dtype=_F32, device=q.device)
    dv = torch.zeros(N, Lk, Dv, dtype=_F32, device=q.device)
    for i0, i1 in _blocks(L, min(block_q, L)):
        qs = _tile(q, i0, i1, scale * _LOG2E)
        do, o = _tile(dout, i0, i1), _tile(out, i0, i1)
        delta = (o * do).sum(-1, keepdim=True)  # D_i = rowsum(dO ∘ O): the sink has no value, so unchanged
        lse2 = (lse[:, :, i0:i1] * _LOG2E).reshape(N, -1, 1)
        lse2 = torch.where(torch.isfinite(lse2), lse2, torch.full_like(lse2, float("inf")))  # no key: P = 0
        dq_acc = torch.zeros_like(qs)
        for j0, j1 in _blocks(Lk, min(block_k, Lk)):
            keep = f.keep(i0, i1, j0, j1, q.device)
            if keep is not None and not keep.any():
                continue
            kb, vb = kf[:, j0:j1], vf[:, j0:j1]
            s = torch.bmm(qs, kb.transpose(1, 2))
            t = f.scores(s, i0, i1, j0, j1, keep, keep_tanh=True)
            p = s.sub_(lse2).exp2_()  # P recomputed from the log-sum-exp (sinks included)
            dv[:, j0:j1] += torch.bmm(p.transpose(1, 2), do)
            ds = (torch.bmm(do, vb.transpose(1, 2)) - delta) * p  # dS = P ∘ (dP − D_i)
            if t is not None:
                ds = ds * (1 - t.view_as(ds) ** 2)  # through c·tanh(s/c)
            dq_acc += torch.bmm(ds, kb)
            dk[:, j0:j1] += torch.bmm(ds.transpose(1, 2), qs)
        dq[:, :, i0:i1] = (dq_acc * scale).view(N, G, i1 - i0, D)
    return dq, dk / _LOG2E, dv
