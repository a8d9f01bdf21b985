"""What the peer adapters share: importing an optional library late, and saying why a case cannot run.

A peer library is imported when a case is checked or run, never when the harness starts, so
a missing library is a skip reason (``flash_attn is not installed (pip install flash-attn)``)
rather than an import error. Nothing is cached: a library installed (or, in the tests, faked
in ``sys.modules``) later is found.
"""

from __future__ import annotations

import importlib

import torch


def import_problem(module: str, install: str) -> str | None:
    """Why ``module`` cannot be imported (None: it can). ``install`` says how to get it."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return f"{e.name} is not installed ({install})"
        return f"{module} failed to import: {e}"
    except Exception as e:  # a broken build: CUDA/torch ABI mismatch, missing shared library
        return f"{module} failed to import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def load(module: str, install: str):
    """The imported module; RuntimeError with :func:`import_problem`'s reason if it is unavailable."""
    problem = import_problem(module, install)
    if problem:
        raise RuntimeError(problem)
    return importlib.import_module(module)


def cuda_reasons(case, module: str, install: str, *, gpu_ok=None, gpu: str = "") -> list[str]:
    """The reasons a CUDA-only peer cannot run ``case`` here: library, GPU, compute capability.

    ``gpu_ok((major, minor))`` says whether the library runs on a GPU of that compute
    capability; ``gpu`` names the GPUs it runs on.
    """
    reasons = []
    problem = import_problem(module, install)
    if problem:
        reasons.append(problem)
    if case.device == "cuda" and not torch.cuda.is_available():
        reasons.append("needs a CUDA GPU")
    elif case.device == "cuda" and gpu_ok is not None and not gpu_ok(torch.cuda.get_device_capability()):
        major, minor = torch.cuda.get_device_capability()
        reasons.append(f"{module} needs {gpu}, this GPU is sm{major}{minor}")
    return reasons


def to_blhd(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H, D), the layout flash_attn and xformers take (a view: no copy)."""
    return x.transpose(1, 2)
