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
the run goes on; an allocator refusal an ``oom`` row; a CUDA error (an illegal memory access, a
failed cuDNN execution: errors that poison the process's CUDA context) a ``cuda_error`` row whose
:class:`CaseResult` asks for the worker process to be replaced (``restart``). Memory, FLOP count
and accuracy come after timing, each in its own guard: an OOM there (or a failure of the
harness's own measuring) empties that step's columns and says so in ``phase_note``, and the
timing stays. CUDA cases are budgeted against the device's free memory (:func:`cuda_memory_budget`),
not the host's. The row's columns are declared in :mod:`harness.core.schema`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch

from harness.core import flops as flop_rules
from harness.core import schema
from harness.core.cases import Case
from harness.core.config import RunSettings
from harness.core.registry import Variant, get_variant
from harness.core.schema import CaseResult
from harness.engine.steps import accuracy_columns as _accuracy_columns
from harness.engine.steps import after_timing as _after_timing
from harness.engine.steps import cost_columns as _cost_columns
from harness.engine.steps import error_text as _error_text
from harness.engine.steps import is_cuda_error as _is_cuda_error
from harness.engine.steps import is_oom as _is_oom
from harness.engine.steps import release as _release
from harness.engine.steps import timed as _timed
from harness.measure import profile as profiling
from harness.measure import roofline
from harness.measure.inputs import aligned_copy, dense_kv, layout_inputs, make_grad, make_qkv
from harness.measure.reference import MAX_GRAD_CHECK_LEN, check_rows, errors, reference_attention, reference_grads
from harness.measure.timing import TimingConfig, input_set_count


def base_row(case: Case, variant: Variant | None) -> dict[str, Any]:
    """The row of ``case`` before it runs: its identity, and what ``variant`` declares of it without
    running (family, exactness, baseline, analytic FLOPs and bytes, working-set estimate, the
    variant's own columns)."""
    row = schema.base_row(case, variant.family if variant else None, variant.exact if variant else None,
                          torch.get_num_threads(), baseline=variant.baseline if variant else None)
    if variant is not None:
        row["flops"] = flop_rules.total_flops(variant.flops(case), case.mode)
        row.update(roofline.fact_columns(row))
        if variant.working_set is not None:
            row["working_set_bytes"] = float(variant.working_set(case))
        if variant.columns is not None:
            row.update(variant.columns(case))
    return row


def _io_bytes(case: Case) -> int:
    """Bytes of q, k, v and the output: what any call of the case touches at least."""
    return int(roofline.min_bytes(case, mode="fwd"))


#: Share of the GPU memory free when a CUDA case starts that its working-set estimate may use.
CUDA_MEMORY_FRACTION = 0.9


def cuda_memory_budget(device: str = "cuda") -> int:
    """Bytes a CUDA case may be estimated to use: :data:`CUDA_MEMORY_FRACTION` of the device memory
    free now (``torch.cuda.mem_get_info``, measured in the process that runs the case), counting the
    blocks this process's caching allocator holds unused (it hands those out first)."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_MEMORY_FRACTION * (free + max(cached, 0)))


def estimated_bytes(case: Case, variant: Variant) -> float | None:
    """The variant's working-set estimate plus the inputs and output, × 3 for backward modes
    (saved activations and gradients); None when the variant gives no estimate."""
    if variant.working_set is None:
        return None
    estimate = variant.working_set(case) + _io_bytes(case)
    return estimate * 3 if case.mode != "fwd" else estimate


def skip_reasons(case: Case, variant: Variant, memory_budget: int | None, explicit: bool = False) -> list[str]:
    """Why ``case`` cannot run here. ``memory_budget`` None: no memory check; otherwise a CUDA case is
    checked against :func:`cuda_memory_budget` unless the budget was the user's own (``explicit``),
    and a CPU case against ``memory_budget``."""
    reasons = variant.not_supported_reasons(case)
    if case.device == "cuda" and not torch.cuda.is_available():
        reasons.append("CUDA is not available on this machine")
    estimate = estimated_bytes(case, variant)
    if reasons or memory_budget is None or estimate is None:
        return reasons
    budget, name = memory_budget, "memory budget"
    if case.device == "cuda" and not explicit:
        budget = cuda_memory_budget(case.device)
        name = f"GPU memory budget ({CUDA_MEMORY_FRACTION:.0%} of the device memory free now)"
    if estimate > budget:
        reasons.append(f"estimated working set {estimate / 2**30:.2f} GiB exceeds the {name} {budget / 2**30:.2f} GiB")
    return reasons


def timing_for(case: Case, timing: TimingConfig) -> tuple[TimingConfig, str]:
    """The timing settings for ``case`` and a note: backward alone is never captured into a CUDA
    graph (it replays autograd on a graph retained across calls)."""
    if case.mode == "bwd" and timing.cuda_graph:
        return (dataclasses.replace(timing, cuda_graph=False),
                "cuda_graph: backward alone is not captured; timed eagerly")
    return timing, ""


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
    grad = make_grad(q.new_empty(*q.shape[:-1], v.shape[-1]))  # the output's shape: v's head size
    return lambda: torch.autograd.grad(variant(*leaves, causal=case.causal, **case.params), leaves, grad)


def _accuracy(variant: Variant, case: Case, q, k, v, extra: dict | None = None) -> dict[str, Any]:
    """The accuracy columns; with ``status = "incorrect"`` and the reason (where, how much) when the
    answer is wrong (:func:`harness.measure.reference.correctness_problems`)."""
    from harness.measure.reference import correctness_problems

    mask = variant.reference_mask(case)
    # attention features: the score modifier (softcap, ALiBi, a plugin's score_mod) and the sink logits
    mods = {"score_mod": variant.reference_score_mod(case), "sinks": (extra or {}).get("sinks")}
    rows = check_rows(q.shape[2])
    with torch.no_grad():
        out = variant(q, k, v, causal=case.causal, **case.params)
        ref = reference_attention(q, *dense_kv(case, k, v, extra or {}), mask, rows, **mods)  # a paged cache, gathered
        max_abs, rel = errors(out[:, :, rows.to(out.device)], ref)
    grad_columns: dict[str, float] = {}
    got: tuple[torch.Tensor, ...] = ()
    want: tuple[torch.Tensor, ...] = ()
    if case.mode != "fwd" and case.seq_len <= MAX_GRAD_CHECK_LEN:
        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
        grad_out = variant(*leaves, causal=case.causal, **case.params)
        grad = make_grad(grad_out)
        got = torch.autograd.grad(grad_out, leaves, grad)
        want = reference_grads(q, k, v, mask, grad, **mods)
        rels = [errors(g, w)[1] for g, w in zip(got, want)]
        grad_columns["grad_rel_err"] = float("nan") if any(r != r for r in rels) else max(rels)
    low = q.dtype  # dense attention computed in the case's own dtype: how far its rounding alone goes
    problems = correctness_problems(
        out, ref, rows, dtype=case.dtype, exact=variant.exact, tolerance=variant.tolerance, grads=got,
        grads_ref=want, grads_baseline=lambda: reference_grads(q, k, v, mask, grad, dtype=low, **mods),
        baseline=lambda: reference_attention(q, *dense_kv(case, k, v, extra or {}), mask, rows, dtype=low, **mods))
    return _accuracy_columns(max_abs, rel, problems, **grad_columns)


def run_case(case: Case, settings: RunSettings | None = None, on_phase: Callable[[str], None] | None = None,
             time_only: bool = False) -> CaseResult:
    """Measure one case in this process with ``settings`` (its timing, seed, memory budget, profile;
    default: the defaults); never raises for a variant's failure (it becomes an error row). The row
    holds what was measured here; the derived columns are the parent's (:mod:`harness.measure.derive`:
    :func:`final_row` turns one or more processes' results into the case's row).

    ``time_only``: stop after timing (no memory, FLOP count or accuracy), for the later rounds of a
    case and for re-runs that only compare times (``bench compare --confirm``). The memory budget:
    see :func:`skip_reasons`.

    ``on_phase(name)``, if given, is told each step as it starts: ``inputs``, ``first call``,
    ``warm-up``, ``timing``, ``memory``, ``accuracy``, ``profile`` (for progress display).
    ``settings.profile``: which cases get one more call under torch.profiler, last (:mod:`harness.measure.profile`).
    """
    settings = settings or RunSettings()
    phase = on_phase or (lambda name: None)
    variant = get_variant(case.variant)
    try:
        row = base_row(case, variant)
    except Exception as exc:
        row = base_row(case, None)
        row.update(status="error", reason=f"describing the case failed: {_error_text(exc)}")
        return CaseResult(row, [])
    reasons = skip_reasons(case, variant, settings.memory_budget, settings.memory_budget_explicit)
    if reasons:
        row.update(status="skipped", reason="; ".join(reasons))
        return CaseResult(row, [])
    try:
        samples, restart = measurer(variant.level)(case, variant, settings, row, phase, time_only)
    except Exception as exc:
        samples, restart = [], ""
        status = "cuda_error" if _is_cuda_error(exc) else "oom" if _is_oom(exc) else "error"
        row.update(status=status, reason=_error_text(exc))
        if status == "cuda_error":
            restart = row["reason"]
    released = _release(case)  # outside the handler: the case's tensors are unreferenced by now
    if released:
        if row["status"] != "cuda_error":
            row.update(status="cuda_error", reason=f"CUDA failed after the case (its results are void): {released}")
        samples, restart = [], restart or released
    return CaseResult(row, samples, restart=restart)


class Measurer(Protocol):
    """How a variant of one level is measured in a worker: fill ``row`` (the round's row, its identity
    and declared facts already in) with what this process measured of ``case`` (its own timing
    statistics, then, unless ``time_only``, memory, counted FLOPs, accuracy, the machine's ceilings),
    telling ``phase`` each step; return (timing samples in s, why the worker should be replaced or
    ''). Nothing derived: the parent derives the rate columns (harness.measure.derive)."""

    def __call__(self, case: Case, variant: Variant, settings: RunSettings, row: dict[str, Any],
                 phase: Callable[[str], None], time_only: bool) -> tuple[list[float], str]: ...


def measurer(level: str) -> Measurer:
    """How a variant of ``level`` (harness.core.registry.LEVELS) is measured: a kernel here, a layer on
    hidden states (harness.engine.layerrun), a kernel across a process group of ranks (harness.engine.ranks)."""
    if level == "layer":
        from harness.engine.layerrun import measure_layer

        return measure_layer
    if level == "distributed":
        from harness.engine.ranks import measure_distributed

        return measure_distributed
    return measure_kernel


def measure_kernel(case: Case, variant: Variant, settings: RunSettings, row: dict[str, Any],
                   phase: Callable[[str], None], time_only: bool) -> tuple[list[float], str]:
    """A kernel-level variant (:class:`Measurer`): time the case, then (unless ``time_only``) memory,
    FLOPs and accuracy."""
    timing, seed = settings.timing, settings.seed
    phase("inputs")
    q, k, v = make_qkv(case, seed=seed)
    k, v, extra = layout_inputs(case, k, v, seed=seed)  # inference shapes: page pools, per-sequence lengths
    variant = variant.with_inputs(extra)
    call = _call_for_mode(variant, case, q, k, v)
    # more input sets (copies, same values) when one call's traffic would leave its inputs in the cache
    touched = _io_bytes(case) + (int(variant.working_set(case)) if variant.working_set is not None else 0)
    sets = input_set_count(touched, case.device, timing)
    calls = [call] + [_call_for_mode(variant, case, *(aligned_copy(x) for x in (q, k, v))) for _ in range(sets - 1)]
    config, note = timing_for(case, timing)
    measured = _timed(row, case, calls, config, phase, note)
    del calls
    if time_only:
        return measured.samples_s, measured.restart
    _cost_columns(row, case, call, phase)  # memory, counted FLOPs, roofline
    del call
    phase("accuracy")
    _after_timing(row, case, "accuracy", lambda: _accuracy(variant, case, q, k, v, extra))
    # --profile: one more call under torch.profiler, last (harness.measure.profile)
    profiling.maybe_profile(settings.profile, case, lambda: _call_for_mode(variant, case, q, k, v), phase)
    return measured.samples_s, measured.restart


def final_row(result: CaseResult, confidence: float = 0.95) -> dict[str, Any]:
    """The final row of a case measured by one process (``run_case``'s result), as a run would record it."""
    from harness.measure.derive import final_row as compose

    return compose([result.row], [[s * 1e3 for s in result.samples_s]], confidence)
