"""An Attention Bench plugin: exact attention computed in chunks of queries."""

import torch

from harness import Param, attention_flops, register_variant


@register_variant("chunked", family="dense", exact=True, flops=attention_flops,
                  params={"chunk": Param(128, min=1, help="query rows per chunk")})
def chunked(q, k, v, *, causal, chunk=128):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    outs = []
    for start in range(0, q.shape[2], chunk):
        rows = torch.arange(start, min(start + chunk, q.shape[2]), device=q.device)
        mask = rows[:, None] >= torch.arange(k.shape[2], device=q.device) if causal else None
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask))
    return torch.cat(outs, dim=2)
