"""xformers' ``memory_efficient_attention`` as a peer variant (its dispatcher picks the kernel).

xformers takes (B, L, H, D). Grouped-query attention uses its 5-D form (B, L, G, H, D):
G = kv_heads groups of H = heads // kv_heads queries, keys and values expanded along H with
stride 0 (no copy), as the xformers documentation prescribes. Causal is its
``LowerTriangularMask`` bias.
"""

from __future__ import annotations

from harness import Supports, register_variant
from variants.common import scale_of
from variants.peers.library import cuda_reasons, load, to_blhd

MODULE, INSTALL = "xformers.ops", "pip install xformers"


def _check(case):
    return cuda_reasons(case, MODULE, INSTALL)


@register_variant(
    "xformers",
    family="fused",
    exact=True,
    supports=Supports(devices={"cuda"}, dtypes={"float32", "float16", "bfloat16"}),
    check=_check,
    description="peer: xformers.ops.memory_efficient_attention on (B, L, H, D) views; GQA as its 5-D form",
)
def xformers_attention(q, k, v, *, causal):
    xops = load(MODULE, INSTALL)
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    bias = xops.LowerTriangularMask() if causal else None
    if Hkv == H:
        out = xops.memory_efficient_attention(to_blhd(q), to_blhd(k), to_blhd(v), attn_bias=bias, scale=scale_of(q))
        return out.transpose(1, 2)
    G = H // Hkv
    qg = to_blhd(q).unflatten(2, (Hkv, G))  # (B, L, Hkv, G, D): query head h -> kv head h // G

    def shared(x):
        return to_blhd(x).unsqueeze(3).expand(B, L, Hkv, G, D)

    out = xops.memory_efficient_attention(qg, shared(k), shared(v), attn_bias=bias, scale=scale_of(q))
    return out.flatten(2, 3).transpose(1, 2)
