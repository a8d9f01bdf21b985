"""Running cases: each case becomes one row (ok, skipped or error) and its raw timing samples.

For one case, in order: the variant's own not-supported reasons and the memory
budget (a ``skipped`` row if either says no); random inputs; the call for the
case's mode; timing (:mod:`harness.measure.timing`); peak memory of one more call
(:mod:`harness.measure.memory`); FLOPs counted by FlopCounterMode (:mod:`harness.measure.flopcount`);
the roofline columns against this machine's calibration (:mod:`harness.measure.roofline`,
:mod:`harness.measure.calibrate`);
error against the float64 reference (:mod:`harness.measure.reference`). Timing runs inside an
NVML telemetry sampler (:mod:`harness.measure.telemetry`; empty columns off NVIDIA GPUs) and
rotates among several copies of the inputs when one set fits in the cache
(:func:`harness.measure.timing.input_set_count`). Any exception becomes an ``error`` row and
the run goes on. The row's columns are declared in :mod:`harness.core.schema`.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch

from harness.measure import calibrate
from harness.measure import flopcount
from harness.measure import roofline
from harness.measure import telemetry
from harness.core import flops as flop_rules
from harness.core import schema
from harness.core.cases import Case
from harness.measure.inputs import aligned_copy, make_grad, make_qkv
from harness.measure.memory import peak_memory_bytes
from harness.measure.reference import MAX_GRAD_CHECK_LEN, check_rows, errors, reference_attention, reference_grads
from harness.core.registry import Variant, get_variant
from harness.core.schema import CaseResult
from harness.measure.timing import TimingConfig, input_set_count, time_call

def base_row(case: Case, variant: Variant | None) -> dict[str, Any]:
    """The row of ``case`` before it runs: its identity, and what ``variant`` says of it without
    running (analytic FLOPs and bytes, working-set estimate, the variant's own columns)."""
    row = schema.base_row(
        case, variant.family if variant else None, variant.exact if variant else None, torch.get_num_threads()
    )
    if variant is not None:
        row["flops"] = flop_rules.total_flops(variant.flops(case), case.mode)
        row.update(roofline.analytic_columns(row))
        if variant.working_set is not None:
            row["working_set_bytes"] = float(variant.working_set(case))
        if variant.columns is not None:
            row.update(variant.columns(case))
    return row


def _io_bytes(case: Case) -> int:
    """Bytes of q, k, v and the output: what any call of the case touches at least."""
    return int(roofline.min_bytes(case, mode="fwd"))


def skip_reasons(case: Case, variant: Variant, memory_budget: int | None) -> list[str]:
    reasons = variant.not_supported_reasons(case)
    if case.device == "cuda" and not torch.cuda.is_available():
        reasons.append("CUDA is not available on this machine")
    if not reasons and memory_budget is not None and variant.working_set is not None:
        estimate = variant.working_set(case) + _io_bytes(case)
        if case.mode != "fwd":
            estimate *= 3  # saved activations and gradients
        if estimate > memory_budget:
            reasons.append(
                f"estimated working set {estimate / 2**30:.2f} GiB exceeds the memory budget "
                f"{memory_budget / 2**30:.2f} GiB"
            )
    return reasons


def _call_for_mode(variant: Variant, case: Case, q, k, v) -> Callable[[], Any]:
    """The callable that is timed: forward, backward alone, or both."""
    if case.mode == "fwd":

        def forward():
            with torch.no_grad():
                return variant(q, k, v, causal=case.causal, **case.params)

        return forward
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    if case.mode == "bwd":
        out = variant(*leaves, causal=case.causal, **case.params)
        grad = make_grad(out)
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    grad = make_grad(torch.empty_like(q))
    return lambda: torch.autograd.grad(variant(*leaves, causal=case.causal, **case.params), leaves, grad)


def _accuracy(variant: Variant, case: Case, q, k, v) -> dict[str, float]:
    mask = variant.reference_mask(case)
    rows = check_rows(case.seq_len)
    with torch.no_grad():
        out = variant(q, k, v, causal=case.causal, **case.params)
        ref = reference_attention(q, k, v, mask, rows)
        max_abs, rel = errors(out[:, :, rows.to(out.device)], ref)
    result = {"max_abs_err": max_abs, "rel_err": rel}
    if case.mode != "fwd" and case.seq_len <= MAX_GRAD_CHECK_LEN:
        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
        out = variant(*leaves, causal=case.causal, **case.params)
        grad = make_grad(out)
        got = torch.autograd.grad(out, leaves, grad)
        want = reference_grads(q, k, v, mask, grad)
        result["grad_rel_err"] = max(errors(g, w)[1] for g, w in zip(got, want))
    return result


def _is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_type and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()
    )


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def run_case(case: Case, timing: TimingConfig, seed: int = 0, memory_budget: int | None = None,
             on_phase: Callable[[str], None] | None = None, time_only: bool = False) -> CaseResult:
    """Measure one case; never raises for a variant's failure (it becomes an error row).

    ``time_only``: stop after timing (no memory, FLOP count or accuracy), for re-runs that only
    compare times (``bench compare --confirm``).

    ``on_phase(name)``, if given, is told each step as it starts: ``inputs``, ``first call``,
    ``warm-up``, ``timing``, ``memory``, ``accuracy`` (for progress display).
    """
    phase = on_phase or (lambda name: None)
    variant = get_variant(case.variant)
    try:
        row = base_row(case, variant)
    except Exception as exc:
        row = base_row(case, None)
        row.update(status="error", reason=f"describing the case failed: {_error_text(exc)}")
        return CaseResult(row, [])
    reasons = skip_reasons(case, variant, memory_budget)
    if reasons:
        row.update(status="skipped", reason="; ".join(reasons))
        return CaseResult(row, [])
    samples: list[float] = []
    try:
        phase("inputs")
        q, k, v = make_qkv(case, seed=seed)
        call = _call_for_mode(variant, case, q, k, v)
        # more input sets (copies, same values) when one call's traffic would leave its inputs in the cache
        touched = _io_bytes(case) + (int(variant.working_set(case)) if variant.working_set is not None else 0)
        sets = input_set_count(touched, case.device, timing)
        calls = [call] + [_call_for_mode(variant, case, *(aligned_copy(x) for x in (q, k, v))) for _ in range(sets - 1)]
        with telemetry.Sampler(case.device) as tel:
            measured = time_call(calls, timing, device=case.device, on_phase=phase)
            tel.measure_energy(call, tokens=case.batch * case.seq_len)
        del calls
        samples = measured.samples_s
        row.update(measured.row_columns())
        row["tflops_per_s"] = row["flops"] / measured.median_s / 1e12
        row.update(tel.columns)
        if time_only:
            return CaseResult(row, samples)
        phase("memory")
        row["peak_mem_bytes"] = float(peak_memory_bytes(call, case.device))
        row.update(flopcount.flop_columns(call, row["flops"], causal=case.causal))
        row.update(roofline.row_roofline(row, calibrate.cached()))
        del call
        phase("accuracy")
        row.update(_accuracy(variant, case, q, k, v))
    except Exception as exc:
        row.update(status="oom" if _is_oom(exc) else "error", reason=_error_text(exc))
        samples = []
    finally:
        gc.collect()
        if case.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return CaseResult(row, samples)

