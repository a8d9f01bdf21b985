"""Test-only CUDA variants that fail the ways a GPU kernel under development does (the crash drill of
``benchmarks/gpu_check.py``; on a machine without a GPU they are skipped rows).

* ``fault_cuda_ok``: correct attention (dense, through the naive variant).
* ``fault_cuda_oob``: a kernel that writes far outside its buffer, which leaves the process's CUDA
  context with a sticky "illegal memory access" error: every later CUDA call in that process fails.
  A Triton kernel when Triton is installed; otherwise an out-of-range index, whose device-side
  assert is just as sticky.
* ``fault_cuda_oom``: asks the caching allocator for 64 TiB (an ``oom`` row; the process stays usable).

And, for the CPU tests of the harness's handling, fakes that raise what a real CUDA failure
raises (the harness cannot tell them from the real thing, which is the point):
``fault_fake_ok``, ``fault_fake_illegal_access`` (``torch.AcceleratorError``: "CUDA error: an
illegal memory access was encountered") and ``fault_fake_cudnn_failure`` (cuDNN's
``CUDNN_STATUS_EXECUTION_FAILED``).
"""

import torch

from harness import Supports, attention_flops, get_variant, register_variant

CUDA_ONLY = Supports(devices={"cuda"})

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _write_far_away(ptr, offset):
        tl.store(ptr + offset, 1.0)

except ImportError:  # the device-side assert below does the same harm
    triton = None


@register_variant("fault_cuda_ok", family="dense", exact=True, flops=attention_flops, supports=CUDA_ONLY)
def fault_cuda_ok(q, k, v, *, causal):
    return get_variant("naive")(q, k, v, causal=causal)


@register_variant("fault_cuda_oob", family="dense", exact=True, flops=attention_flops, supports=CUDA_ONLY)
def fault_cuda_oob(q, k, v, *, causal):
    out = torch.empty_like(q)
    if triton is not None:
        _write_far_away[(1,)](out, 1 << 40)  # 4 TiB past the buffer: illegal address
    else:
        out.view(-1)[torch.tensor([1 << 40], device=q.device)] = 1.0  # device-side assert
    torch.cuda.synchronize()  # the error surfaces here (or at the next CUDA call)
    return out


@register_variant("fault_cuda_oom", family="dense", exact=True, flops=attention_flops, supports=CUDA_ONLY)
def fault_cuda_oom(q, k, v, *, causal):
    torch.empty(2**46, dtype=torch.uint8, device=q.device)  # 64 TiB
    return q


@register_variant("fault_fake_ok", family="dense", exact=True, flops=attention_flops)
def fault_fake_ok(q, k, v, *, causal):
    return get_variant("naive")(q, k, v, causal=causal)


@register_variant("fault_fake_illegal_access", family="dense", exact=True, flops=attention_flops)
def fault_fake_illegal_access(q, k, v, *, causal):
    error = getattr(torch, "AcceleratorError", RuntimeError)
    raise error("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
                "reported at some other API call")


@register_variant("fault_fake_cudnn_failure", family="dense", exact=True, flops=attention_flops)
def fault_fake_cudnn_failure(q, k, v, *, causal):
    raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: CUDNN_STATUS_EXECUTION_FAILED")
