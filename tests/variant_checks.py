"""Shared checks of a variant against the float64 reference (used by every variant test)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import and_masks

from harness import get_variant, masks
from harness.core.cases import Case
from harness.measure.inputs import make_grad, make_qkv
from harness.measure.reference import TOLERANCE, errors, reference_attention, reference_grads


def make_case(name: str, params: dict | None = None, **axes) -> Case:
    variant = get_variant(name)
    full = {n: p.default for n, p in variant.params.items()}
    full.update(params or {})
    axes.setdefault("heads", 4)
    axes.setdefault("kv_heads", axes["heads"])
    axes.setdefault("seq_len", 131)
    axes.setdefault("head_dim", 32)
    axes.setdefault("batch", 2)
    return Case(variant=name, params=full, **axes)


def forward_errors(case: Case, seed: int = 0) -> tuple[float, float]:
    """(max abs, rel) error of the variant's output against the float64 reference."""
    variant = get_variant(case.variant)
    q, k, v = make_qkv(case, seed=seed)
    assert q.abs().sum() > 0, "inputs must not be zeros"
    with torch.no_grad():
        out = variant(q, k, v, causal=case.causal, **case.params)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    return errors(out, reference_attention(q, k, v, variant.reference_mask(case)))


def assert_exact(case: Case, seed: int = 0) -> None:
    max_abs, rel = forward_errors(case, seed)
    tol_abs, tol_rel = TOLERANCE[case.dtype]
    assert max_abs <= tol_abs and rel <= tol_rel, f"{case.label()}: max_abs={max_abs:.3g} rel={rel:.3g}"


def grad_errors(case: Case, seed: int = 0) -> list[float]:
    """Relative errors of (dq, dk, dv) against float64 autograd of the reference."""
    variant = get_variant(case.variant)
    q, k, v = (x.requires_grad_() for x in make_qkv(case, seed=seed))
    out = variant(q, k, v, causal=case.causal, **case.params)
    grad = make_grad(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = reference_grads(q, k, v, variant.reference_mask(case), grad)
    return [errors(g, w)[1] for g, w in zip(got, want)]


def assert_exact_grads(case: Case, seed: int = 0) -> None:
    rels = grad_errors(case, seed)
    tol = TOLERANCE[case.dtype][1] * (5 if case.dtype == "float32" else 2)
    assert max(rels) <= tol, f"{case.label()}: grad rel errors {rels}"


def gym_mask(batch: int, seq_len: int):
    """A document mask that indexes a (B, L) tensor with ``b``, a per-head window that uses ``h``,
    and causality, combined with torch's own ``and_masks``; and the same pattern written out."""
    doc = torch.stack([torch.arange(seq_len) // (17 + 9 * b) for b in range(batch)])  # (B, L) document ids

    def document(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]

    def head_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= 4 + 11 * h

    def explicit(heads: int) -> torch.Tensor:  # (B, H, L, L), without calling any mask_mod
        i = torch.arange(seq_len).view(1, 1, -1, 1)
        j = torch.arange(seq_len).view(1, 1, 1, -1)
        hh = torch.arange(heads).view(1, -1, 1, 1)
        same_doc = doc.view(batch, 1, seq_len, 1) == doc.view(batch, 1, 1, seq_len)
        return same_doc & (j <= i) & (i - j <= 4 + 11 * hh)

    return and_masks(masks.causal, document, head_window), explicit
