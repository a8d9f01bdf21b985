"""Test-only variants that give wrong answers (family "dense"), and approximate ones, for the
correctness status: each is ``naive`` attention with one deliberate fault."""

import torch

from harness import attention_flops, get_variant, register_variant

#: The (b, h, q, d) element the faulty variants damage.
AT = (0, 1, 5, 3)


def _naive(q, k, v, causal):
    return get_variant("naive")(q, k, v, causal=causal)


def _with_nan(out):
    out = out.clone()
    out[AT] = float("nan")
    return out


def _exact(name, **kw):
    return register_variant(name, family="dense", exact=True, flops=attention_flops, **kw)


def _approx(name, **kw):
    return register_variant(name, family="linear", exact=False, flops=attention_flops, **kw)


@_exact("wrong_nan")
def wrong_nan(q, k, v, *, causal):
    return _with_nan(_naive(q, k, v, causal))


@_exact("wrong_scaled")
def wrong_scaled(q, k, v, *, causal):
    return 1.5 * _naive(q, k, v, causal)


@_exact("wrong_row")
def wrong_row(q, k, v, *, causal):
    """Right everywhere except one query row, which gets its neighbour's output."""
    out = _naive(q, k, v, causal).clone()
    b, h, row, _ = AT
    out[b, h, row] = out[b, h, row + 1]
    return out


class _InfGrad(torch.autograd.Function):
    """The identity, whose backward puts an inf into the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[AT] = float("inf")
        return grad


@_exact("wrong_inf_grad")
def wrong_inf_grad(q, k, v, *, causal):
    """The right output; an inf in dk."""
    return _naive(q, _InfGrad.apply(k), v, causal)


@_exact("slightly_off")
def slightly_off(q, k, v, *, causal):
    """0.1% too large: beyond float32's tolerance."""
    return 1.001 * _naive(q, k, v, causal)


@_exact("slightly_off_tolerated", tolerance={"float32": (1e-2, 1e-2)})
def slightly_off_tolerated(q, k, v, *, causal):
    """The same 0.1%, with a tolerance of its own (1%) that accepts it."""
    return 1.001 * _naive(q, k, v, causal)


@_approx("approx_close")
def approx_close(q, k, v, *, causal):
    """An approximation 1% off: its error is a measurement, the row is ok."""
    return 1.01 * _naive(q, k, v, causal)


@_approx("approx_nan")
def approx_nan(q, k, v, *, causal):
    return _with_nan(_naive(q, k, v, causal))
