"""The steps every measurer shares (harness.engine.runner's kernels, harness.engine.layerrun's layers,
harness.engine.ranks's process groups): telling an OOM and a CUDA error from a variant's failure,
freeing what a case left, and running one step after timing (memory, FLOPs, accuracy) in its own guard.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from harness.core.cases import Case
from harness.measure import calibrate, contention, flopcount, roofline, telemetry
from harness.measure.memory import peak_memory_bytes
from harness.measure.timing import Timing, TimingConfig, time_call


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, cuBLAS failing to allocate its workspace, or the CPU allocator's
    "can't allocate memory"."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom_type and isinstance(exc, oom_type):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


#: Texts of errors that leave a process's CUDA context unusable (with torch's without AcceleratorError).
CUDA_ERROR_TEXT = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
                   "CUDNN_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_EXECUTION_FAILED", "cuDNN error")


def is_cuda_error(exc: BaseException) -> bool:
    """An error of the CUDA runtime or cuDNN (``torch.AcceleratorError`` where torch has it), not an OOM."""
    if is_oom(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in CUDA_ERROR_TEXT)


def release(case: Case) -> str:
    """Free what a case left behind (garbage, the CUDA cache); the error when CUDA itself fails
    there (a sticky error from an asynchronous kernel surfaces at the next CUDA call), else ''."""
    gc.collect()
    if case.device == "cuda" and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception as exc:
            return error_text(exc)
    return ""


def add_note(row: dict[str, Any], column: str, note: str) -> None:
    row[column] = "; ".join(x for x in (row.get(column), note) if x)


def after_timing(row: dict[str, Any], case: Case, step: str, fn: Callable[[], dict[str, Any]]) -> None:
    """One step after timing (memory, flops, accuracy), in its own guard: a CUDA error propagates
    (the process is unusable); an OOM, or a failure of the harness's own measuring, leaves the step's
    columns empty with a note in ``phase_note``; the variant failing its accuracy call is an error
    row that keeps its timing."""
    try:
        row.update(fn())
    except Exception as exc:
        if is_cuda_error(exc):
            raise
        if step == "accuracy" and not is_oom(exc):
            row.update(status="error", reason=f"accuracy check: {error_text(exc)}")
        else:
            add_note(row, "phase_note", f"{step}: {'oom' if is_oom(exc) else 'error'}: {error_text(exc)}")
        release(case)


def accuracy_columns(max_abs: float, rel: float, problems: Sequence[str], **extra: Any) -> dict[str, Any]:
    """The accuracy columns of a row, and ``status = "incorrect"`` with the reasons when the answer
    has ``problems`` (harness.measure.reference.correctness_problems): a wrong answer is never ok."""
    result: dict[str, Any] = {"max_abs_err": max_abs, "rel_err": rel, **extra}
    if problems:
        result.update(status="incorrect", reason="; ".join(problems))
    return result


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def memory_columns(call: Callable[[], Any], device: str) -> dict[str, float]:
    return {"peak_mem_bytes": float(peak_memory_bytes(call, device))}


def timed(row: dict[str, Any], case: Case, calls: Sequence[Callable[[], Any]], config: TimingConfig,
          phase: Callable[[str], None], note: str = "") -> Timing:
    """Time ``calls`` (rotated) inside an NVML telemetry sampler, then one energy loop of the first;
    fill the row's time columns (this process's statistics of its samples), ``timing_note`` (plus
    ``note``) and telemetry."""
    probe = contention.Probe()
    with telemetry.Sampler(case.device) as tel:
        with tel.window("timing"), probe:  # other processes on the machine while the samples were taken
            measured = time_call(list(calls), config, device=case.device, on_phase=phase)
        others = tel.other_processes(contention.own_pids())
        tel.measure_energy(calls[0], tokens=case.batch * case.query_len)
    row.update(measured.row_columns())
    add_note(row, "timing_note", note)
    row.update(tel.columns)
    row.update(probe.columns, gpu_other_processes=others)
    return measured


def cost_columns(row: dict[str, Any], case: Case, call: Callable[[], Any], phase: Callable[[str], None]) -> None:
    """After timing: peak memory of one more call, its FLOPs counted by FlopCounterMode (each in its
    own guard), and this machine's ceilings for the row from its calibration (the roofline's rates
    are derived from them in the parent: harness.measure.derive)."""
    phase("memory")
    after_timing(row, case, "memory", functools.partial(memory_columns, call, case.device))
    after_timing(row, case, "flops", functools.partial(flopcount.flop_columns, call, causal=case.causal))
    row.update(roofline.machine_columns(case.device, case.dtype, row.get("threads"), calibrate.cached()))
