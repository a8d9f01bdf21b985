"""Test-only variants that misbehave in every way a kernel under development can."""

import ctypes
import os
import time

import torch

from harness import attention_flops, get_variant, register_variant


def _naive(q, k, v, causal):
    return get_variant("naive")(q, k, v, causal=causal)


@register_variant("fault_ok", family="dense", exact=True, flops=attention_flops)
def fault_ok(q, k, v, *, causal):
    return _naive(q, k, v, causal)


@register_variant("fault_raise", family="dense", exact=True, flops=attention_flops)
def fault_raise(q, k, v, *, causal):
    raise ValueError("this kernel always fails")


@register_variant("fault_segfault", family="dense", exact=True, flops=attention_flops)
def fault_segfault(q, k, v, *, causal):
    print("about to dereference a null pointer", flush=True)
    ctypes.string_at(0)  # SIGSEGV
    return q


@register_variant("fault_abort", family="dense", exact=True, flops=attention_flops)
def fault_abort(q, k, v, *, causal):
    os.abort()


@register_variant("fault_hang", family="dense", exact=True, flops=attention_flops)
def fault_hang(q, k, v, *, causal):
    while True:
        time.sleep(0.05)


@register_variant(
    "fault_huge", family="dense", exact=True, flops=attention_flops, working_set=lambda case: float(2**50)
)
def fault_huge(q, k, v, *, causal):
    raise AssertionError("must never run: its working set is over any budget")


@register_variant("fault_alloc", family="dense", exact=True, flops=attention_flops)
def fault_alloc(q, k, v, *, causal):
    torch.empty(2**46, dtype=torch.uint8)  # 64 TiB: the allocator refuses
    return q


@register_variant("fault_slow", family="dense", exact=True, flops=attention_flops)
def fault_slow(q, k, v, *, causal):
    time.sleep(0.05)
    return _naive(q, k, v, causal)
