"""Random inputs for a case: never zeros, never constants, reproducible from a seed.

Two kinds, chosen by the suite's ``inputs`` axis:

* ``gaussian``: q, k, v i.i.d. standard normal. Scores ``q·k/sqrt(D)`` have unit
  variance, so attention is diffuse: the easy case for approximations.
* ``structured``: q and k share a rank-8 component on top of N(0, 0.5²) noise,
  scaled so that scores have a standard deviation of about 3; attention is then
  peaked on a few keys per query, as in trained models. v is standard normal.

Inputs are drawn in float32 on the CPU with a seeded generator and then cast and
moved, so the same case gets the same values on every device.

Every input starts on a 4 KiB boundary (:func:`aligned_copy`). The allocators
only promise 64 bytes (CPU) or 512 bytes (CUDA), so where a tensor lands within
a page is luck, and CPU BLAS speed depends on it: on this project's 2-core EPYC
test machine ``naive`` at L=1024 (one thread) took 16.5 ms with k and v
page-aligned and 33-37 ms with either 64 bytes off, and the same case measured
in two processes differed by 2x depending on where its inputs happened to land.
Aligning them makes the measurement repeat from run to run (the regression
detector depends on it) and measures the aligned case, which is also what a
fresh large allocation from the OS gets.
"""

from __future__ import annotations

import math

import torch

from harness.core.cases import Case

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

#: Byte boundary every input tensor starts on (a page).
ALIGNMENT = 4096

STRUCTURED_RANK = 8
STRUCTURED_SCORE_STD = 3.0


def make_qkv(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) for ``case``, in its dtype and on its device."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, L, D = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    if case.inputs == "gaussian":
        q = torch.randn(B, H, L, D, generator=g)
        k = torch.randn(B, Hkv, L, D, generator=g)
    elif case.inputs == "structured":
        r = STRUCTURED_RANK
        basis = torch.randn(r, D, generator=g) / math.sqrt(D)
        # scores ~ (zq·basis)·(zk·basis)ᵀ / sqrt(D): choose the latent scale to give std ~ STRUCTURED_SCORE_STD
        scale = math.sqrt(STRUCTURED_SCORE_STD * math.sqrt(D) / math.sqrt(r))
        q = 0.5 * torch.randn(B, H, L, D, generator=g) + scale * torch.randn(B, H, L, r, generator=g) @ basis
        k = 0.5 * torch.randn(B, Hkv, L, D, generator=g) + scale * torch.randn(B, Hkv, L, r, generator=g) @ basis
    else:
        raise ValueError(f"unknown inputs kind {case.inputs!r}")
    v = torch.randn(B, Hkv, L, D, generator=g)
    dtype = TORCH_DTYPES[case.dtype]
    return tuple(aligned_copy(x.to(device=case.device, dtype=dtype)) for x in (q, k, v))


def aligned_copy(x: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """A contiguous copy of ``x`` whose data starts on an ``alignment``-byte boundary."""
    item = x.element_size()
    if alignment % item:
        raise ValueError(f"alignment {alignment} is not a multiple of the element size {item}")
    spare = alignment // item
    buf = torch.empty(x.numel() + spare, dtype=x.dtype, device=x.device)
    offset = (-(buf.data_ptr() // item)) % spare
    out = buf[offset:offset + x.numel()].view(x.shape)
    out.copy_(x)
    return out


def make_grad(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A random upstream gradient shaped like ``out`` for backward timing."""
    g = torch.Generator().manual_seed(seed)
    return aligned_copy(torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype))
