"""Running cases: each case becomes one row (ok, skipped or error) and its raw timing samples.

For one case, in order: the variant's own not-supported reasons and the memory
budget (a ``skipped`` row if either says no); random inputs; the call for the
case's mode; timing (:mod:`harness.measure.timing`); peak memory of one more call
(:mod:`harness.measure.memory`); FLOPs counted by FlopCounterMode (:mod:`harness.measure.flopcount`);
the roofline columns against this machine's calibration (:mod:`harness.measure.calibrate`);
error against the float64 reference (:mod:`harness.measure.reference`). Timing runs inside an
NVML telemetry sampler (:mod:`harness.measure.telemetry`; empty columns off NVIDIA GPUs) and
rotates among several copies of the inputs when one set fits in the cache
(:func:`harness.measure.timing.input_set_count`). Any exception becomes an ``error`` row and
the run goes on.
"""

from __future__ import annotations

import gc
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from harness.measure import calibrate
from harness.measure import environment
from harness.measure import flopcount
from harness.measure import telemetry
from harness.core import flops as flop_rules
from harness.core.cases import Case
from harness.measure.inputs import aligned_copy, make_grad, make_qkv
from harness.measure.memory import peak_memory_bytes
from harness.measure.reference import MAX_GRAD_CHECK_LEN, check_rows, errors, reference_attention, reference_grads
from harness.core.registry import Variant, get_variant
from harness.engine.store import RunWriter
from harness.measure.timing import TimingConfig, input_set_count, time_call

#: Default share of the machine's available memory one case may be estimated to use.
MEMORY_BUDGET_FRACTION = 0.6


@dataclass
class CaseResult:
    row: dict[str, Any]
    samples_s: list[float]


def new_run_id(suite_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{suite_name}-{uuid.uuid4().hex[:6]}"


def default_memory_budget() -> int:
    available = environment.available_memory_bytes() or 8 * 2**30
    return int(available * MEMORY_BUDGET_FRACTION)


def input_bytes(case: Case) -> int:
    q = case.batch * case.heads * case.seq_len * case.head_dim
    kv = 2 * case.batch * case.kv_heads * case.seq_len * case.head_dim
    return (2 * q + kv) * case.element_bytes  # q, k, v and the output


def base_row(case: Case, variant: Variant | None) -> dict[str, Any]:
    row = {
        "case_id": case.case_id,
        "variant": case.variant,
        "family": variant.family if variant else None,
        "exact": variant.exact if variant else None,
        "params": case.params_json,
        "device": case.device,
        "dtype": case.dtype,
        "mode": case.mode,
        "batch": case.batch,
        "heads": case.heads,
        "kv_heads": case.kv_heads,
        "seq_len": case.seq_len,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "inputs": case.inputs,
        "status": "ok",
        "reason": "",
        "time_ms": math.nan,
        "time_ms_p10": math.nan,
        "time_ms_p90": math.nan,
        "reps": 0,
        "first_call_ms": math.nan,
        "time_ms_ci_low": math.nan,
        "time_ms_ci_high": math.nan,
        "time_ci_rel": math.nan,
        "timing_stop": None,
        "input_sets": None,
        "timing_method": None,
        "timing_note": None,
        "flops": math.nan,
        "tflops_per_s": math.nan,
        "flops_counted": math.nan,
        "flops_counted_ratio": math.nan,
        "flops_counted_note": None,
        "min_bytes": math.nan,
        "arith_intensity": math.nan,
        **{c: math.nan for c in calibrate.ROOFLINE_COLUMNS},
        "roofline_note": None,
        **{c: None for c in telemetry.COLUMNS},
        "peak_mem_bytes": math.nan,
        "working_set_bytes": math.nan,
        "max_abs_err": math.nan,
        "rel_err": math.nan,
        "grad_rel_err": math.nan,
        "threads": torch.get_num_threads(),
    }
    if variant is not None:
        row["flops"] = flop_rules.total_flops(variant.flops(case), case.mode)
        row.update(calibrate.analytic_columns(row))
        if variant.working_set is not None:
            row["working_set_bytes"] = float(variant.working_set(case))
        if variant.columns is not None:
            row.update(variant.columns(case))
    return row


def skip_reasons(case: Case, variant: Variant, memory_budget: int | None) -> list[str]:
    reasons = variant.not_supported_reasons(case)
    if case.device == "cuda" and not torch.cuda.is_available():
        reasons.append("CUDA is not available on this machine")
    if not reasons and memory_budget is not None and variant.working_set is not None:
        estimate = variant.working_set(case) + input_bytes(case)
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
        touched = input_bytes(case) + (int(variant.working_set(case)) if variant.working_set is not None else 0)
        sets = input_set_count(touched, case.device, timing)
        calls = [call] + [_call_for_mode(variant, case, *(aligned_copy(x) for x in (q, k, v))) for _ in range(sets - 1)]
        with telemetry.Sampler(case.device) as tel:
            measured = time_call(calls, timing, device=case.device, on_phase=phase)
            tel.measure_energy(call, tokens=case.batch * case.seq_len)
        del calls
        samples = measured.samples_s
        stats = measured.stats
        row.update(
            time_ms=stats["median"] * 1e3,
            time_ms_p10=stats["p10"] * 1e3,
            time_ms_p90=stats["p90"] * 1e3,
            reps=len(samples),
            first_call_ms=measured.first_call_s * 1e3,
            tflops_per_s=row["flops"] / stats["median"] / 1e12,
        )
        row.update(measured.row_columns())
        row.update(tel.columns)
        if time_only:
            return CaseResult(row, samples)
        phase("memory")
        row["peak_mem_bytes"] = float(peak_memory_bytes(call, case.device))
        row.update(flopcount.flop_columns(call, row["flops"], causal=case.causal))
        row.update(calibrate.row_roofline(row, calibrate.cached()))
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


def run_cases(
    cases: list[Case],
    writer: RunWriter,
    executor,
    progress=None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Run cases in order through ``executor`` (harness.engine.executors), appending each row to
    ``writer`` as it finishes; returns how many ran."""
    done = 0
    for case in cases:
        if stop():
            break
        if progress is not None:
            progress.start(case)
        report = getattr(progress, "phase", None)
        if report is not None:  # progress shows what the case is doing (a long first call: compiling)
            result = executor.run(case, on_phase=lambda name, c=case: report(c, name))
        else:
            result = executor.run(case)
        result.row["run_id"] = writer.meta["run_id"]
        result.row["suite"] = writer.meta["suite"]["name"]
        writer.append(result.row, result.samples_s)
        done += 1
        if progress is not None:
            progress.finish(case, result.row)
    return done


class ResumeError(Exception):
    """A run cannot be resumed with this suite (one line)."""


def remaining_cases(run_dir: Path, cases: list[Case]) -> list[Case]:
    """The cases of ``cases`` that have no final row in ``run_dir``; refuses if identities changed."""
    from harness.engine.store import read_meta, read_rows_log

    meta = read_meta(run_dir)
    recorded = meta.get("case_ids", [])
    now = [c.case_id for c in cases]
    if recorded != now:
        added = len(set(now) - set(recorded))
        removed = len(set(recorded) - set(now))
        raise ResumeError(
            f"{run_dir}: the suite's cases differ from the run's ({added} new, {removed} gone"
            f"{', same cases in another order' if not added and not removed else ''}); "
            "resume needs the suite the run started with"
        )
    rows = read_rows_log(run_dir)
    finished = set(rows["case_id"]) if not rows.empty else set()
    return [c for c in cases if c.case_id not in finished]


def start_run(suite, out_dir: Path | None, cases: list[Case], results_root: Path = Path("results")) -> RunWriter:
    """Create the run directory and its run.json (status 'running')."""
    run_id = new_run_id(suite.name)
    run_dir = Path(out_dir) if out_dir else results_root / "runs" / run_id
    if (run_dir / "run.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose another -o directory")
    if suite.timing.threads:
        torch.set_num_threads(suite.timing.threads)
    meta = {
        "run_id": run_id,
        "suite": {
            "name": suite.name,
            "description": suite.description,
            "path": str(suite.path) if suite.path else None,
            "resolved_path": str(Path(suite.path).resolve()) if suite.path else None,
            "definition": suite.raw,
            "text": suite.text,
        },
        "timing": suite.timing.__dict__,
        "seed": suite.seed,
        "cases": len(cases),
        "case_ids": [c.case_id for c in cases],
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "status": "running",
        "environment": environment.capture(),
    }
    return RunWriter(run_dir, meta)


def finish_run(writer: RunWriter, status: str, wall_s: float):
    return writer.finalize(
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), status=status, wall_s=round(wall_s, 3)
    )

