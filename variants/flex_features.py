"""``flex`` with attention features (``mask = "none"``): what the case sets becomes FlexAttention's own.

Softcap and ALiBi are a score_mod (:func:`harness.core.masks.softcap_mod`, :func:`~harness.core.masks.alibi_mod`:
the functions the float64 reference applies), the window, prefix-LM and documents a mask_mod
(:func:`harness.core.masks.feature_mask`) whose BlockMask skips the tiles no query sees; both are built
once per shape and feature values and kept (dynamo sees one object each, and the tensors they capture
stay alive). Sinks: FlexAttention has no sink argument, and on the CPU it cannot return the
log-sum-exp that would fold one in afterwards, so the sink is one more key, of zero value, whose score
the score_mod replaces by the head's sink logit and which every query sees; appending it copies K and
V in each call (part of the time). A value head size other than q's is native.
"""

from __future__ import annotations

import torch

from harness import masks
from variants import features as feat
from variants.flex import _LOCK, compiled_call, ordered_blocks, tile_layout

#: (block mask, score_mod, the tensors they capture) per shape and feature values
_FEATURES: dict = {}


def _feature_mods(q, Lk: int, causal: bool, tile: int, features: dict):
    """(block mask, score_mod) of the call's features, built once per shape and feature values and kept
    with the tensors they capture (a sink is key ``Lk``, seen by every query, its score the sink logit)."""
    Lq, slopes, sinks, ids = q.shape[-2], features.get("alibi_slopes"), features.get("sinks"), \
        features.get("document_ids")
    held = (slopes, sinks, ids)
    key = (Lq, Lk, bool(causal), tile, str(q.device), features.get("softcap"), features.get("window_size"),
           features.get("prefix_len", 0), *map(id, held))
    with _LOCK:
        hit = _FEATURES.get(key)
    if hit is not None:
        return hit[:2]
    masked = causal or any(k in features for k in feat.MASK_KWARGS)
    base = masks.feature_mask(Lq, Lk, causal, window=features.get("window_size"), prefix_lm=features.get(
        "prefix_len", 0), document_ids=ids) if masked else None
    mods = [masks.softcap_mod(features["softcap"]) if features.get("softcap") else None,
            masks.alibi_mod(slopes, Lq, Lk) if slopes is not None else None]
    if sinks is not None:
        def sink_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx == Lk, sinks[h].to(score.dtype), score)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx == Lk) | base(b, h, q_idx, kv_idx) if base is not None else kv_idx >= 0

        mods.append(sink_mod)
    else:
        mask_mod = base
    if mask_mod is None:
        from torch.nn.attention.flex_attention import noop_mask

        mask_mod = noop_mask
    from torch.nn.attention.flex_attention import BlockMask

    keys = Lk + (sinks is not None)
    partial, full = tile_layout(mask_mod, keys, tile, q.device, q_len=Lq)
    bm = BlockMask.from_kv_blocks(*ordered_blocks(partial, q.device), *ordered_blocks(full, q.device),
                                  BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(Lq, keys))
    with _LOCK:
        if len(_FEATURES) > 64:
            _FEATURES.clear()
        _FEATURES[key] = (bm, masks.chain(*mods), held)
    return bm, _FEATURES[key][1]


def run_features(q, k, v, *, causal: bool, tile: int, features: dict):
    bm, score_mod = _feature_mods(q, k.shape[-2], causal, tile, features)
    if "sinks" in features:  # the sink key: zero K and V rows (its score is the score_mod's)
        k, v = (torch.cat([x, x.new_zeros(*x.shape[:2], 1, x.shape[-1])], dim=2) for x in (k, v))
    return compiled_call(q, k, v, bm, k.shape[1] != q.shape[1], score_mod)
