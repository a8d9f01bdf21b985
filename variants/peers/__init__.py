"""Peer libraries' attention kernels as optional built-in variants (family ``fused``).

One thin adapter per library: FlashAttention 2/3/4 (:mod:`.flash_attention`), FlashInfer
(:mod:`.flash_infer`), xformers (:mod:`.xformers_ops`). Each maps the harness's (B, H, L, D)
layout to the library's and back, and imports its library only when a case is checked or run:
without the library (or without CUDA) every case is a skipped row naming what is missing.
"""

from variants.peers import flash_attention, flash_infer, xformers_ops  # noqa: F401
