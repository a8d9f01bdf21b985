"""FlashAttention (Dao-AILab) as peer variants: FA2, FA3 (Hopper) and FA4 (CuTe DSL).

All three take (batch, seqlen, heads, head_dim) with fewer key/value heads for grouped-query
attention, and return the output in that layout: the adapter passes transposed views (no copy)
and transposes the output back. FA3 betas and FA4 return ``(out, softmax_lse)``; only ``out`` is kept.

=============  =========================  ==============================  =====================
variant        module                     install                         GPU
=============  =========================  ==============================  =====================
flash_attn     ``flash_attn``             pip install flash-attn          Ampere or newer
flash_attn3    ``flash_attn_interface``   build hopper/ (flash-attention)  Hopper only
flash_attn4    ``flash_attn.cute``        pip install flash-attn-4        Hopper or Blackwell
=============  =========================  ==============================  =====================

Attention features, where the library has them: ``softcap`` (FlashAttention's ``softcap``, FA2 and
FA3), ALiBi (``alibi_slopes``, float32 (H,): FA2), a window (``window_size=(w, w)``, ``(w, 0)`` when
causal: FA2 and FA3). Each skips the others with the reason.
"""

from __future__ import annotations

from harness import Supports, register_variant
from variants.common import scale_of
from variants.peers.library import cuda_reasons, load, to_blhd

#: The features each library takes (Supports flags), from its flash_attn_func's arguments.
FEATURES = {"flash_attn": dict(softcap=True, alibi=True, sliding_window=True),
            "flash_attn3": dict(softcap=True, sliding_window=True), "flash_attn4": {}}
#: variant name -> (module, how to install it, GPUs it runs on (capability -> bool), those GPUs in words, what)
FLASH_ATTENTION = {
    "flash_attn": (
        "flash_attn", "pip install flash-attn", lambda cap: cap >= (8, 0), "an Ampere or newer GPU (sm80+)",
        "FlashAttention-2, flash_attn.flash_attn_func",
    ),
    "flash_attn3": (
        "flash_attn_interface", "build it from hopper/ in the flash-attention repository",
        lambda cap: cap[0] == 9, "a Hopper GPU (sm90)", "FlashAttention-3, flash_attn_interface.flash_attn_func",
    ),
    "flash_attn4": (
        "flash_attn.cute", "pip install flash-attn-4", lambda cap: cap[0] >= 9, "a Hopper or Blackwell GPU (sm90+)",
        "FlashAttention-4 (CuTe DSL), flash_attn.cute.flash_attn_func",
    ),
}


def _register(name: str, module: str, install: str, gpu_ok, gpu: str, what: str) -> None:
    def check(case):
        return cuda_reasons(case, module, install, gpu_ok=gpu_ok, gpu=gpu)

    def flash(q, k, v, *, causal, softcap=None, alibi_slopes=None, window_size=None):
        lib = load(module, install)
        extra = {}  # only what the case sets: a library without the argument never sees it
        if softcap:
            extra["softcap"] = float(softcap)
        if alibi_slopes is not None:
            extra["alibi_slopes"] = alibi_slopes.float()
        if window_size is not None:
            extra["window_size"] = (int(window_size), 0 if causal else int(window_size))
        out = lib.flash_attn_func(to_blhd(q), to_blhd(k), to_blhd(v), softmax_scale=scale_of(q), causal=bool(causal),
                                  **extra)
        if isinstance(out, tuple):  # (out, softmax_lse)
            out = out[0]
        return out.transpose(1, 2)

    register_variant(
        name,
        family="fused",
        exact=True,
        supports=Supports(devices={"cuda"}, dtypes={"float16", "bfloat16"}, max_head_dim=256, **FEATURES[name]),
        check=check,
        description=f"peer: {what} on (B, L, H, D) views; grouped-query native",
    )(flash)


for _name, _spec in FLASH_ATTENTION.items():
    _register(_name, *_spec)
