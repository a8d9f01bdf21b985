"""Counted FLOPs: a cross-check of the analytic counts with ``torch.utils.flop_counter``.

:func:`counted_flops` runs a call once under ``FlopCounterMode`` and returns the
FLOPs PyTorch's formulas attribute to the ATen operators it dispatched, or
``None`` with the reason when they do not count the call:

* FlopCounterMode has formulas for matmuls, convolutions and the fused SDPA
  kernels, but not for ``aten._scaled_dot_product_flash_attention_for_cpu`` (and
  its backward), which is SDPA's default CPU path: there it counts **zero**. This
  module registers formulas for both (the same as PyTorch's for the CUDA flash
  kernel) when it is imported, unless PyTorch already has them.
* Inside ``flex_attention`` (a higher-order operator compiled by inductor)
  FlopCounterMode raises; custom kernels (Triton) and element-wise work are not
  counted at all. A count of zero or an exception is reported as not counted,
  never as 0 FLOPs.
* ``torch.compile``'d code is counted through its eager Python (the call runs under
  ``torch.compiler.set_stance("force_eager")``): the matmuls are the same, and
  running compiled code under a dispatch mode would otherwise make dynamo mark its
  frames as skipped, breaking every later compiled call of the variant.

Conventions differ from the analytic ones (:mod:`harness.core.flops`) in two known
ways, which the cross-check states rather than hides: FlopCounterMode counts every
(query, key) pair of a causal call (its SDPA formulas ignore ``is_causal``, and a
masked matmul computes every pair), where the analytic convention counts L²/2;
and autograd's backward of a materialised ``softmax(QKᵀ)V`` does 4 matmuls (2×
the forward), where a fused backward that recomputes the scores does 5 (2.5×,
the analytic convention).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: CPU SDPA kernels FlopCounterMode has no formula for (in torch <= 2.13 at least).
CPU_FLASH_FORWARD = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
CPU_FLASH_BACKWARD = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_flash_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # (query, key, value, dropout_p=0., is_causal=False, *, attn_mask=None, scale=None) -> (output, logsumexp)
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    # (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None)
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_sdpa_formulas() -> list[str]:
    """Register FLOP formulas for the CPU flash SDPA kernels where PyTorch has none; returns
    the names of the operators registered now."""
    registered = []
    for op, formula in ((CPU_FLASH_FORWARD, _cpu_flash_forward_flops), (CPU_FLASH_BACKWARD, _cpu_flash_backward_flops)):
        if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
            continue
        flop_counter.register_flop_formula(op)(formula)
        registered.append(str(op))
    return registered


REGISTERED = register_cpu_sdpa_formulas()


class _OpRecorder(TorchDispatchMode):
    """Counts the ATen operators a call dispatches (to explain a count of zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _has_formula(name: str) -> bool:
    return any(str(k) == name or str(getattr(k, "overloadpacket", "")) == name for k in flop_counter.flop_registry)


def _eager_stance():
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def counted_flops(fn: Callable[[], Any]) -> tuple[float | None, str]:
    """(FLOPs FlopCounterMode counts for one call of ``fn``, "") or (None, why not counted)."""
    recorder = _OpRecorder()
    try:
        # force_eager: compiled code runs its eager Python under the mode. Without it, dynamo
        # meets a dispatch mode, marks the compiled frames as skipped, and the variant's later
        # compiled calls fail ("found no compiled frames", or flex falling back to dense math).
        with warnings.catch_warnings(), _eager_stance(), recorder, \
                flop_counter.FlopCounterMode(display=False) as counter:
            warnings.simplefilter("ignore")  # e.g. flex_attention's "called without torch.compile()"
            result = fn()
        del result
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return None, f"not counted: FlopCounterMode raised {type(exc).__name__}: {(text[0] if text else '')[:200]}"
    total = counter.get_total_flops()
    if total > 0:
        return float(total), ""
    uncounted = [name for name, _ in recorder.ops.most_common() if not _has_formula(name)]
    if not recorder.ops:
        why = "no ATen operators were dispatched (a custom kernel or compiled code it cannot see)"
    else:
        shown = ", ".join(uncounted[:6]) + (", ..." if len(uncounted) > 6 else "")
        why = f"no FLOP formula for the operators it ran ({shown})"
    return None, f"not counted: FlopCounterMode counted 0 FLOPs: {why}"


def flop_columns(fn: Callable[[], Any], causal: bool = False) -> dict[str, Any]:
    """The cross-check columns of a row: ``flops_counted`` (NaN when not counted) and
    ``flops_counted_note`` (``flops_counted_ratio``, counted / analytic, is derived from them:
    harness.measure.derive)."""
    value, note = counted_flops(fn)
    if value is not None and causal and not note:
        note = "FlopCounterMode counts all L² pairs of a causal call; the analytic count halves them"
    return {"flops_counted": value if value is not None else math.nan, "flops_counted_note": note}
