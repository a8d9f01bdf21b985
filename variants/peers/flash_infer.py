"""FlashInfer's prefill kernels as a peer variant (forward only: FlashInfer has no backward).

Batch 1 is ``flashinfer.single_prefill_with_kv_cache``: queries as (L, H, D) (one transposed
copy), keys and values in its ``HND`` layout, which is ours without a copy. A larger batch is
one ``BatchPrefillWithRaggedKVCacheWrapper`` call over the B sequences laid end to end
(``NHD``: each of q, k, v copied once), planned on the first call of a shape and reused, as a
serving system plans once per batch; the plan and its 128 MiB workspace are in
``first_call_ms`` and the memory figures. Grouped-query attention is native. A softcap is
FlashInfer's ``logits_soft_cap`` (given to ``plan`` for the batch wrapper); the other features skip.
"""

from __future__ import annotations

import torch

from harness import Supports, register_variant
from variants.common import scale_of
from variants.peers.library import cuda_reasons, load

MODULE, INSTALL = "flashinfer", "pip install flashinfer-python"
WORKSPACE_BYTES = 128 << 20
#: the planned batch wrapper of the last shape (one kept: each holds a workspace)
_PLANNED: dict[tuple, object] = {}


def _check(case):
    return cuda_reasons(case, MODULE, INSTALL)


def _batch_wrapper(fi, q, k, causal: bool, extra: dict):
    B, H, L, D = q.shape
    key = (q.device, q.dtype, B, H, k.shape[1], L, D, causal, tuple(sorted(extra.items())))
    wrapper = _PLANNED.get(key)
    if wrapper is None:
        _PLANNED.clear()
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
        wrapper = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        indptr = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=q.device)
        wrapper.plan(indptr, indptr, H, k.shape[1], D, causal=causal, sm_scale=scale_of(q), q_data_type=q.dtype,
                     **extra)
        _PLANNED[key] = wrapper
    return wrapper


@register_variant(
    "flashinfer",
    family="fused",
    exact=True,
    supports=Supports(devices={"cuda"}, dtypes={"float16", "bfloat16"}, backward=False, max_head_dim=256,
                      softcap=True),
    check=_check,
    description="peer: FlashInfer prefill (single_prefill_with_kv_cache; batch: ragged batch prefill wrapper)",
)
def flashinfer_attention(q, k, v, *, causal, softcap=None):
    fi = load(MODULE, INSTALL)
    B, H, L, D = q.shape
    extra = {"logits_soft_cap": float(softcap)} if softcap else {}
    if B == 1:
        out = fi.single_prefill_with_kv_cache(
            q[0].transpose(0, 1).contiguous(), k[0].contiguous(), v[0].contiguous(),
            causal=bool(causal), kv_layout="HND", sm_scale=scale_of(q), **extra,
        )  # (L, H, D)
        return out.transpose(0, 1).unsqueeze(0)

    def ragged(x):  # (B, h, L, D) -> (B·L, h, D)
        return x.transpose(1, 2).reshape(B * L, x.shape[1], D)

    out = _batch_wrapper(fi, q, k, bool(causal), extra).run(ragged(q), ragged(k), ragged(v))
    return out.view(B, L, H, D).transpose(1, 2)
