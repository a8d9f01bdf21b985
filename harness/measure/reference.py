"""The float64 reference every variant is checked against, and the error metrics.

The reference is dense softmax attention, computed in float64 from the very
same (already rounded) inputs the variant saw, under the variant's reference
mask: causal for causal cases, the window or sparse pattern for patterned
variants, and full (or causal) softmax attention for approximations, whose
error is then their approximation error.

Attention features (:mod:`harness.core.features`) enter as a FlexAttention-style ``score_mod``
applied to the scaled scores before the mask (softcap, ALiBi, or a variant's own), and ``sinks``:
one logit per query head that joins each row's softmax denominator with no value attached. With
``v`` of another head size than ``q`` and ``k`` the output has v's.

For long sequences the forward check uses an evenly spaced subset of query rows
(every row's output is independent of the others, so a row subset is an exact
check of those rows) to bound the reference's O(rows·L) memory.

A wrong answer is a status, not a number (:func:`correctness_problems`): a non-finite value in
any variant's output or gradients, or an exact variant's error beyond its dtype's tolerance
(:data:`TOLERANCE`, or the variant's own ``tolerance=``), makes the row ``incorrect``, with a
reason that says where and by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from harness.core.masks import MaskMod, ScoreMod, apply_score_mod, batch_head_mask

#: At most this many query rows are checked in the forward pass.
MAX_CHECK_ROWS = 2048
#: Gradients are checked only up to this length (the reference stores L² float64 per head).
MAX_GRAD_CHECK_LEN = 2048


def check_rows(seq_len: int, max_rows: int = MAX_CHECK_ROWS) -> torch.Tensor:
    """The query rows the forward check looks at: all of them, or an even spread incl. first and last."""
    if seq_len <= max_rows:
        return torch.arange(seq_len)
    return torch.linspace(0, seq_len - 1, max_rows).round().long().unique()


#: Float64 scores held at once by the reference (the query-row chunk shrinks to fit: 256 MiB).
REFERENCE_CHUNK_ELEMENTS = 1 << 25


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod | None,
    rows: torch.Tensor | None = None,
    chunk: int = 256,
    dtype: torch.dtype = torch.float64,
    *,
    score_mod: ScoreMod | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 dense attention for query ``rows`` (all if None): shape (B, H, len(rows), Dv).

    k and v may be longer or shorter than q (``mask_mod`` sees key indices up to their length); a
    query the mask leaves no key (a padding row of a variable-length batch) has output 0.
    ``score_mod(score, b, h, q_idx, kv_idx)`` modifies the scaled scores before masking, as in
    FlexAttention; ``sinks`` (H,) adds ``exp(sinks[h])`` to every softmax denominator of head h.
    ``dtype``: compute in another precision instead (:func:`dtype_baseline`)."""
    B, H, L, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    k64, v64 = k.to(dtype), v.to(dtype)  # grouped-query K and V are not repeated per query head
    rows = torch.arange(L) if rows is None else rows
    rows = rows.to(q.device)
    chunk = max(1, min(chunk, REFERENCE_CHUNK_ELEMENTS // max(1, B * H * Lk)))
    sink = None if sinks is None else sinks.to(device=q.device, dtype=dtype).view(1, H, 1, 1)
    outs = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        n = len(r)
        qr = q[:, :, r].to(dtype).reshape(B, Hkv, G * n, D)  # the G query heads of each key/value head
        s = (qr @ k64.transpose(-1, -2)).view(B, H, n, Lk) / math.sqrt(D)
        s = apply_score_mod(score_mod, s, r)
        m = batch_head_mask(mask_mod, r, Lk, B, H)  # (B, H, rows, Lk): masks may depend on b and h
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        if sink is None:
            p = torch.softmax(s, dim=-1)
        else:  # the sink's logit joins the denominator: softmax over [s, σ_h], its column dropped
            p = torch.softmax(torch.cat([s, sink.expand(B, H, n, 1)], dim=-1), dim=-1)[..., :Lk]
        p = p if m is None else p.masked_fill(~m.any(-1, keepdim=True), 0.0)
        outs.append((p.reshape(B, Hkv, G * n, Lk) @ v64).view(B, H, n, Dv))
    return torch.cat(outs, dim=2)


def reference_grads(q, k, v, mask_mod: MaskMod | None, grad_out: torch.Tensor, dtype: torch.dtype = torch.float64,
                    *, score_mod: ScoreMod | None = None, sinks: torch.Tensor | None = None):
    """Float64 gradients (dq, dk, dv) of the reference for upstream gradient ``grad_out`` (``dtype``:
    computed in another precision instead)."""
    q64, k64, v64 = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = reference_attention(q64, k64, v64, mask_mod, dtype=dtype, score_mod=score_mod, sinks=sinks)
    return torch.autograd.grad(out, (q64, k64, v64), grad_out.to(dtype))


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max absolute error, relative Frobenius error) of ``out`` against float64 ``ref``."""
    diff = out.double() - ref
    max_abs = diff.abs().max().item()
    rel = (torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()
    return max_abs, rel


#: Tolerances for exact variants, by dtype: (max abs error, rel error), on unit-variance inputs.
TOLERANCE = {"float32": (2e-4, 2e-5), "bfloat16": (3e-2, 1.2e-2), "float16": (4e-3, 2e-3), "float64": (1e-10, 1e-12)}

#: A gradient's relative error may be this many times its dtype's relative tolerance (backward
#: accumulates over L keys or queries; float32 more so, relative to its tiny tolerance).
GRAD_TOLERANCE_FACTOR = {"float32": 5.0}
DEFAULT_GRAD_TOLERANCE_FACTOR = 2.0

#: An exact variant's error may be up to this many times that of dense attention computed in its own
#: dtype (FlashAttention's tests use 2): beyond the dtype's fixed tolerance, rounding grows with L.
BASELINE_FACTOR = 2.0

#: Index names of an output or dq element, and of a dk or dv element (its head is a key/value head).
QUERY_AXES = ("b", "h", "q", "d")
KEY_AXES = ("b", "h", "k", "d")


def tolerance_for(dtype: str, override: dict[str, tuple[float, float]] | None = None) -> tuple[float, float]:
    """(max abs, rel) tolerance of an exact variant's output in ``dtype``: the variant's own
    (``register_variant(..., tolerance=...)``) where it declares one, else :data:`TOLERANCE`."""
    if override and dtype in override:
        max_abs, rel = override[dtype]
        return max_abs, rel
    return TOLERANCE.get(dtype, TOLERANCE["float32"])


def grad_tolerance(dtype: str, override: dict[str, tuple[float, float]] | None = None) -> float:
    """Relative tolerance of an exact variant's gradients in ``dtype``."""
    return tolerance_for(dtype, override)[1] * GRAD_TOLERANCE_FACTOR.get(dtype, DEFAULT_GRAD_TOLERANCE_FACTOR)


def _num(x: float) -> str:
    return f"{x:.2g}"


def _at(index: tuple[int, ...], axes: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"{a}={int(i)}" for a, i in zip(axes, index)) + ")"


def nonfinite_problem(name: str, x: torch.Tensor, axes: tuple[str, ...] = QUERY_AXES) -> str | None:
    """'output has 12 non-finite values; first at (b=0, h=0, q=3, d=0): nan', or None when all are finite."""
    bad = ~torch.isfinite(x)
    count = int(bad.sum().item())
    if not count:
        return None
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    value = x[first].item()
    return f"{name} has {count} non-finite value{'s' if count != 1 else ''}; first at {_at(first, axes)}: {value}"


def _error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, int, torch.Size]:
    """(max abs error, rel Frobenius error, flat index of the largest error, shape) of ``got`` against ``want``."""
    diff = (got.double() - want.double()).abs()
    flat = int(diff.argmax().item())
    rel = (torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(want.double()).clamp_min(1e-300)).item()
    return diff.flatten()[flat].item(), rel, flat, diff.shape


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def _widened(tol: tuple[float, float], baseline: Callable[[], tuple[float, float]] | None,
             within: Callable[[float, float], bool]) -> tuple[float, float, bool]:
    """(abs, rel tolerance, raised): ``tol``, or, when the error is beyond it and a ``baseline`` is
    given, at least :data:`BASELINE_FACTOR` times the baseline's (abs, rel) errors."""
    if baseline is None or within(*tol):
        return tol[0], tol[1], False
    b_abs, b_rel = baseline()
    return max(tol[0], BASELINE_FACTOR * b_abs), max(tol[1], BASELINE_FACTOR * b_rel), True


def output_problem(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, tolerance: tuple[float, float],
                   baseline: Callable[[], torch.Tensor] | None = None, dtype: str = "") -> str | None:
    """Why an exact variant's output ``out`` (all rows) is wrong against the float64 reference ``ref``
    of query ``rows``, where and by how much; None when it is within ``tolerance`` (max abs, rel) or
    within :data:`BASELINE_FACTOR` times the error of ``baseline()`` (dense attention computed in the
    variant's own ``dtype``, on the same rows)."""
    max_abs, rel, flat, shape = _error(out[:, :, rows.to(out.device)], ref)
    base = None if baseline is None else (lambda: _error(baseline(), ref)[:2])
    tol_abs, tol_rel, raised = _widened(tolerance, base, lambda a, r: max_abs <= a and rel <= r)
    if max_abs <= tol_abs and rel <= tol_rel:
        return None
    b, h, r, d = _index(flat, shape)
    whose = f" ({BASELINE_FACTOR:g}x dense attention's in {dtype})" if raised else ""
    return (f"output differs from the float64 reference: max abs error {_num(max_abs)} at "
            f"{_at((b, h, int(rows[r]), d), QUERY_AXES)} {'>' if max_abs > tol_abs else '<='} tolerance "
            f"{_num(tol_abs)} (rel {_num(rel)} {'>' if rel > tol_rel else '<='} {_num(tol_rel)}){whose}")


def grad_problem(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float,
                 axes: tuple[str, ...] = QUERY_AXES, baseline: Callable[[], torch.Tensor] | None = None,
                 dtype: str = "") -> str | None:
    """Why gradient ``name`` of an exact variant is wrong (rel error beyond ``tolerance``, and beyond
    :data:`BASELINE_FACTOR` times that of ``baseline()`` when given), or None."""
    max_abs, rel, flat, shape = _error(got, want)
    base = None if baseline is None else (lambda: (0.0, _error(baseline(), want)[1]))
    _, tol, raised = _widened((math.inf, tolerance), base, lambda a, r: rel <= r)
    if rel <= tol:
        return None
    whose = f" ({BASELINE_FACTOR:g}x dense attention's in {dtype})" if raised else ""
    return (f"gradient {name} differs from the float64 reference: rel error {_num(rel)} > tolerance "
            f"{_num(tol)}{whose} (max abs error {_num(max_abs)} at {_at(_index(flat, shape), axes)})")


def correctness_problems(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, *, dtype: str, exact: bool,
                         tolerance: dict[str, tuple[float, float]] | None = None,
                         grads: tuple = (), grads_ref: tuple = (),
                         baseline: Callable[[], torch.Tensor] | None = None,
                         grads_baseline: Callable[[], tuple] | None = None) -> list[str]:
    """Why a variant's answer is wrong, where and by how much (empty: it is right).

    Any variant: a non-finite value anywhere in its output ``out`` (all rows) or its gradients
    ``grads`` (dq, dk, dv; backward modes). An exact variant also: an output error against the
    float64 reference ``ref`` of query ``rows`` beyond its dtype's tolerance (max abs or rel; the
    variant's own ``tolerance`` where it declares one), or a gradient's rel error against
    ``grads_ref`` beyond :func:`grad_tolerance` — unless it is within :data:`BASELINE_FACTOR` times
    the error of dense attention computed in the same dtype (``baseline()``: its output on ``rows``;
    ``grads_baseline()``: its gradients), as FlashAttention's tests judge a kernel: a half-precision
    dtype's own rounding grows with the sequence and with peaked attention. An approximate
    variant's finite error is a measurement, not a fault."""
    problems = []
    bad = nonfinite_problem("output", out)
    if bad is None and exact:
        bad = output_problem(out, ref, rows, tolerance_for(dtype, tolerance), baseline, dtype)
    problems += [bad] if bad else []
    computed: list = []  # the baseline's gradients, computed once, when a gradient needs them

    def grad_baseline(i: int) -> Callable[[], torch.Tensor] | None:
        if grads_baseline is None:
            return None

        def get() -> torch.Tensor:
            if not computed:
                computed.extend(grads_baseline())
            return computed[i]

        return get

    for i, (name, axes, got, want) in enumerate(zip(("dq", "dk", "dv"), (QUERY_AXES, KEY_AXES, KEY_AXES), grads,
                                                    grads_ref or (None,) * len(grads))):
        bad = nonfinite_problem(f"gradient {name}", got, axes)
        if bad is None and exact and want is not None:
            bad = grad_problem(name, got, want, grad_tolerance(dtype, tolerance), axes, grad_baseline(i), dtype)
        problems += [bad] if bad else []
    return problems
