"""FlexAttention: PyTorch's compiled attention with mask_mods and block-sparse BlockMasks.

``flex`` calls :func:`torch.nn.attention.flex_attention.flex_attention` through
``torch.compile`` (inductor generates a fused kernel: C++ on the CPU, Triton on
CUDA). The attention pattern is a mask_mod from :mod:`harness.core.masks` (the same
function the float64 reference applies) plus a *BlockMask*: for every tile of
``tile × tile`` (query, key) positions it records whether the tile is empty
(skipped entirely), full (computed without evaluating the mask) or partial
(computed with the mask_mod applied). Work is therefore proportional to the
tiles a pattern touches, not to L².

``mask`` param:

* ``none``: full attention, or causal when the case is causal.
* ``sliding_window``: ``|i - j| <= window`` (and ``j <= i`` when causal), the
  pattern of the ``sliding_window`` variant.
* ``local_global``, ``bigbird``, ``strided``: the block-sparse layouts of
  :mod:`variants.sparse` (``pattern_mask``), with its parameter names and
  defaults (``block``, ``window_blocks``, ``global_blocks``, ``random_blocks``,
  ``stride``, ``seed``). Available when ``variants/sparse.py`` is present.

The BlockMask is built here, not with ``create_block_mask``: the mask_mod is
evaluated on broadcast index tensors one chunk of query tiles at a time and
reduced to tile level, so building it needs O(chunk · L) memory instead of the
O(L²) dense boolean mask (and int64 index temporaries) ``create_block_mask``
materialises. The tile classification is the same as ``create_block_mask``'s
(a tile cut by the end of the sequence counts as partial).

Caching: the mask_mod and BlockMask are cached per (mask params, causal,
length, tile, device) (full attention too gets an explicit BlockMask, all tiles full,
so ``tile`` applies to it as well); the compiled function is one ``torch.compile`` object
whose per-shape/dtype/mask specialisations dynamo keeps (``dynamic=False``:
every shape gets its own static kernel). The first call of a new
configuration compiles (seconds); the harness times a separate warm-up call.

Queries and keys of different lengths (decode, chunked prefill) run with ``mask = "none"``:
causal is aligned to the bottom right (:func:`harness.masks.bottom_right_causal`), and the
BlockMask has ceil(Lq/tile) rows of ceil(Lk/tile) tiles. The other masks need equal lengths.
:func:`compiled_call`, :func:`tile_layout` and :func:`ordered_blocks` serve the inference
variants (paged caches, packed sequences) too.

Attention features (:mod:`harness.core.features`), with ``mask = "none"``: a score_mod and a
mask_mod with its BlockMask, :mod:`variants.flex_features`.

Limits: PyTorch's FlexAttention has no backward on the CPU (inference only),
and needs ``torch.compile`` to work (on the CPU: an x86 CPU with AVX2 and a C++
compiler; on CUDA: Triton). Both are probed once, lazily, by ``check``; a case
that cannot run gets that reason rather than an error. Without compilation
flex_attention would fall back to an eager path that materialises the dense
score matrix, which is not what this variant measures, so it is never used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import torch
from torch.nn.attention.flex_attention import and_masks

from harness import Param, Supports, attention_flops, masks, pair_flops, register_variant
from variants import features as feat
from variants.local import window_pairs

try:  # the block-sparse layouts are optional (another module)
    import variants.sparse as _sparse
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the checkout
    if exc.name != "variants.sparse":
        raise
    _sparse = None

PATTERNS: tuple[str, ...] = tuple(_sparse.PATTERNS) if _sparse is not None else ()
MASKS: tuple[str, ...] = ("none", "sliding_window") + PATTERNS
#: The block-sparse pattern params, with variants.sparse's defaults.
PATTERN_DEFAULTS: dict = dict(_sparse.DEFAULTS) if _sparse is not None else {}

#: Tile sizes of the BlockMask (on the CPU also the kernel's query/key split sizes).
TILES = (16, 32, 64, 128, 256)
#: Mask entries evaluated at once while building a BlockMask (query rows × keys).
BUILD_CHUNK_ELEMENTS = 1 << 23
#: Recompile limit for the compiled flex_attention: one specialisation per shape/dtype/mask.
RECOMPILE_LIMIT = 1024


# ---------------------------------------------------------------------------------------------
# Masks


def _mask_key(params: dict, causal: bool) -> tuple:
    """What defines the mask: its kind, its own params and causality (hashable)."""
    kind = params.get("mask", "none")
    if kind == "none":
        return ("none", bool(causal))
    if kind == "sliding_window":
        return ("sliding_window", bool(causal), int(params.get("window", 256)))
    if kind in PATTERNS:
        return (kind, bool(causal)) + tuple((k, params.get(k, PATTERN_DEFAULTS[k])) for k in PATTERN_DEFAULTS)
    raise ValueError(f"flex: unknown mask {kind!r} (one of {', '.join(MASKS)})")


@functools.lru_cache(maxsize=256)
def _mask_mod(key: tuple, seq_len: int, device: str, q_len: int | None = None):
    """The mask_mod of ``key`` (None: full attention) for ``q_len`` queries (default: seq_len) and
    ``seq_len`` keys. Cached, so dynamo sees one object per mask."""
    kind, causal = key[0], key[1]
    if kind == "none":
        return masks.bottom_right_causal(q_len or seq_len, seq_len) if causal else None
    if kind == "sliding_window":
        window = masks.sliding_window(key[2])
        return and_masks(masks.causal, window) if causal else window
    if _sparse is None:  # pragma: no cover
        raise ValueError(f"flex: mask {kind!r} needs variants/sparse.py")
    from harness.core.cases import Case

    case = Case(variant="flex", params=dict(key[2:], pattern=kind), device=device, seq_len=seq_len, causal=causal)
    return _sparse.pattern_mask(case)  # applies causality itself


def _case_mask(case):
    """The reference's mask_mod: the very function the kernel applies (with features: the case's mask)."""
    if case.features and case.params.get("mask", "none") == "none":
        return masks.case_mask(case)
    return _mask_mod(_mask_key(case.params, case.causal), case.seq_len, case.device, case.q_len)


def _pairs(case) -> float:
    """Attended (query, key) pairs per head: dense counts L²/2 when causal (convention)."""
    kind, L = case.params["mask"], case.seq_len
    if kind == "none":
        return L * L / 2 if case.causal else float(L * L)
    if kind == "sliding_window":
        return float(window_pairs(L, case.params["window"], case.causal))
    params = {k: case.params.get(k, PATTERN_DEFAULTS[k]) for k in PATTERN_DEFAULTS}
    params["pattern"] = kind
    return float(_sparse.case_pairs(dataclasses.replace(case, params=params)))


def _flops(case) -> float:
    if case.params["mask"] == "none":  # full or causal, equal lengths or not
        return attention_flops(case)
    return pair_flops(case, _pairs(case))


def _columns(case) -> dict:
    """``density``: attended pairs / the pairs dense attention with the same causality attends
    (``L(L+1)/2`` when causal: the real triangle, so mask "none" has density 1)."""
    if case.params["mask"] == "none":
        if not case.features:
            return {"density": 1.0}
        from harness.core.flops import case_pairs, pair_count

        return {"density": case_pairs(case) / pair_count(case.query_len, case.seq_len, False)}
    L = case.seq_len
    dense = L * (L + 1) / 2 if case.causal else float(L * L)
    return {"density": _pairs(case) / dense}


# ---------------------------------------------------------------------------------------------
# BlockMask construction (chunked: never the L×L boolean mask)


def tile_layout(mask_mod, seq_len: int, tile: int, device,
                q_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) boolean (nq, n) tile maps of ``mask_mod``, n = ceil(L / tile), nq the same of
    ``q_len`` queries (default: L), on the CPU.

    A tile is full when every one of its tile×tile positions is kept (a tile cut by
    the end of the sequence is never full), partial when some but not all are. The
    mask is evaluated one chunk of query tiles at a time (O(chunk · L) memory).
    """
    q_len = seq_len if q_len is None else q_len
    n, nq = -(-seq_len // tile), -(-q_len // tile)
    Lp = n * tile
    partial = torch.zeros(nq, n, dtype=torch.bool)
    full = torch.zeros(nq, n, dtype=torch.bool)
    step = max(1, BUILD_CHUNK_ELEMENTS // (tile * Lp))  # query tiles per chunk
    for t0 in range(0, nq, step):
        t1 = min(nq, t0 + step)
        rows = torch.arange(t0 * tile, min(t1 * tile, q_len), device=device)
        m = masks.dense_mask(mask_mod, rows, seq_len)  # (rows, L) bool
        m = torch.nn.functional.pad(m, (0, Lp - seq_len, 0, (t1 - t0) * tile - len(rows)))
        m = m.view(t1 - t0, tile, n, tile)
        some = m.any(3).any(1).cpu()
        every = m.all(3).all(1).cpu()
        full[t0:t1] = every
        partial[t0:t1] = some & ~every
    return partial, full


def band_tile_layout(lo: float, hi: float, seq_len: int, tile: int,
                     q_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) tile maps of the band mask ``lo <= q_idx - kv_idx <= hi``, in O(n²), for
    ``q_len`` queries (default: seq_len) against ``seq_len`` keys.

    Tile (a, b) holds rows r0..r1 and keys c0..c1 (consecutive), so its differences
    q - kv are exactly the integers from r0 - c1 to r1 - c0: it keeps some pair when
    that range meets [lo, hi], and all of them when the range lies inside it (and the
    tile is not cut by the end of the sequence).
    """
    def spans(length):
        start = torch.arange(-(-length // tile)) * tile
        last = torch.clamp(start + tile - 1, max=length - 1)
        return start, last, (last - start + 1) == tile

    r_start, r_last, r_whole = spans(seq_len if q_len is None else q_len)
    c_start, c_last, c_whole = spans(seq_len)
    dmin = r_start.view(-1, 1) - c_last.view(1, -1)  # r0 - c1
    dmax = r_last.view(-1, 1) - c_start.view(1, -1)  # r1 - c0
    some = (dmax >= lo) & (dmin <= hi)
    every = (dmin >= lo) & (dmax <= hi) & r_whole.view(-1, 1) & c_whole.view(1, -1)
    return some & ~every, every


def _band(key: tuple) -> tuple[float, float] | None:
    """(lo, hi) of q_idx - kv_idx when mask ``key`` is a band (causal / sliding window), else None."""
    kind, causal = key[0], key[1]
    if kind == "none":
        return (0, math.inf) if causal else (-math.inf, math.inf)
    if kind == "sliding_window":
        return (0 if causal else -key[2], key[2])
    return None


def ordered_blocks(blocks: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks (1,1,n), indices (1,1,n,n)) int32: each row's kept tile indices first, ascending."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.view(1, 1, -1).to(device), idx.view(1, 1, *blocks.shape).to(device).contiguous()


_BLOCK_MASKS: dict = {}
_LOCK = threading.Lock()


def _block_mask(key: tuple, seq_len: int, tile: int, device: torch.device, q_len: int | None = None):
    """The cached BlockMask of mask ``key`` (full attention: every tile full, the tail one partial),
    for ``q_len`` queries (default: seq_len; fewer: causal bottom-right aligned) and ``seq_len`` keys."""
    mask_mod = _mask_mod(key, seq_len, str(device), q_len)
    if mask_mod is None:
        from torch.nn.attention.flex_attention import noop_mask

        mask_mod = noop_mask
    cache_key = (key, seq_len, tile, str(device), q_len)
    with _LOCK:
        bm = _BLOCK_MASKS.get(cache_key)
    if bm is None:
        from torch.nn.attention.flex_attention import BlockMask

        band = _band(key)
        shift = seq_len - (q_len or seq_len)  # q_idx - kv_idx >= -shift: bottom-right causal
        if band is not None:
            partial, full = band_tile_layout(band[0] - shift, band[1] - shift, seq_len, tile, q_len)
        else:
            partial, full = tile_layout(mask_mod, seq_len, tile, device, q_len)
        kv_num, kv_idx = ordered_blocks(partial, device)
        full_num, full_idx = ordered_blocks(full, device)
        bm = BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
            seq_lengths=(q_len or seq_len, seq_len)
        )
        with _LOCK:
            bm = _BLOCK_MASKS.setdefault(cache_key, bm)
    return bm


# ---------------------------------------------------------------------------------------------
# Compilation and its availability


@functools.lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def compiled_call(q, k, v, block_mask, enable_gqa: bool, score_mod=None):
    """The compiled flex_attention of (q, k, v) under ``block_mask`` (and ``score_mod``)."""
    # one specialisation per shape/dtype/mask: raise the recompile limit, and fail rather than
    # silently fall back to eager flex_attention (dense scores) if it is ever hit
    with torch._dynamo.config.patch(
        recompile_limit=RECOMPILE_LIMIT,
        accumulated_recompile_limit=RECOMPILE_LIMIT,
        fail_on_recompile_limit_hit=True,
    ):
        return _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa)


def _run(q, k, v, *, causal: bool, params: dict):
    Lq, Lk = q.shape[-2], k.shape[-2]
    key = _mask_key(params, causal)
    bm = _block_mask(key, Lk, params.get("tile", 128), q.device, Lq if Lq != Lk else None)
    return compiled_call(q, k, v, bm, k.shape[1] != q.shape[1])


#: The probe: a tiny case whose compiled kernel is also used by the tests (kept in the cache).
PROBE_SHAPE = dict(batch=1, heads=2, kv_heads=1, seq_len=131, head_dim=16)


@functools.cache
def unavailable(device: str) -> str | None:
    """Why FlexAttention cannot be compiled on ``device`` here (None: it can). Probed once per device."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"this torch {torch.__version__} has no flex_attention ({exc})"
    import torch._dynamo as dynamo  # bound as its own name: `torch` stays the module global here

    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/platform"
    if device == "cuda":
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs Triton, which is not installed"
    else:
        try:
            from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

            if not check_cpu_supported():
                return "FlexAttention's compiled CPU kernel needs an x86 CPU with AVX2"
        except ImportError:
            pass
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except ImportError:
            pass
        except Exception as exc:  # noqa: BLE001 - inductor raises when it finds no usable compiler
            return f"torch.compile on the CPU needs a C++ compiler: {str(exc).strip()[:160]}"
    # the real test: compile and run a tiny causal case, check it against plain softmax attention
    try:
        g = torch.Generator().manual_seed(0)
        B, L, D = PROBE_SHAPE["batch"], PROBE_SHAPE["seq_len"], PROBE_SHAPE["head_dim"]
        q = torch.randn(B, PROBE_SHAPE["heads"], L, D, generator=g).to(device)
        k, v = (torch.randn(B, PROBE_SHAPE["kv_heads"], L, D, generator=g).to(device) for _ in range(2))
        with torch.no_grad():
            out = _run(q, k, v, causal=True, params={"mask": "none"})
            want = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
            )
        if not torch.allclose(out.double(), want, atol=1e-4, rtol=1e-4):
            return "compiled flex_attention gave wrong results in the availability probe"
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot run here
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"torch.compile of flex_attention failed on {device}: {type(exc).__name__}: {first}"
    return None


def _check(case) -> list[str]:
    reasons = []
    if case.device == "cpu" and case.mode != "fwd":
        reasons.append("FlexAttention has no backward pass on the CPU (PyTorch supports CPU inference only)")
    if case.device == "cuda" and case.head_dim < 16:
        reasons.append("FlexAttention on CUDA needs head_dim >= 16")
    if case.device == "cuda" and case.params.get("tile", 128) % 128:
        reasons.append("FlexAttention's CUDA kernel needs tile 128 or 256 (a multiple of its BLOCK_M/BLOCK_N)")
    if getattr(case, "q_len", None) is not None and case.params.get("mask", "none") != "none":
        reasons.append(f"flex mask {case.params['mask']!r} needs q_len == kv_len; mask 'none' takes other lengths")
    if getattr(case, "features", None) and case.params.get("mask", "none") != "none":
        reasons.append(f"flex mask {case.params['mask']!r} takes no attention features (mask 'none' takes them all)")
    if not reasons:
        why = unavailable(case.device)
        if why:
            reasons.append(why)
    return reasons


def _working_set(case) -> float:
    """The output, the BlockMask tables, the per-thread tiles, and the chunked mask build."""
    out = case.batch * case.heads * case.seq_len * case.head_dim * case.element_bytes
    n = -(-case.seq_len // case.params["tile"])
    tables = 8 * n * n * 4
    build = 10 * BUILD_CHUNK_ELEMENTS  # bool mask + index temporaries of one chunk
    return float(out + tables + build + (8 << 20))


_PARAMS = {
    "mask": Param("none", choices=MASKS, help="none (full/causal), sliding_window, or a block-sparse pattern"),
    "window": Param(256, min=0, help="sliding_window: keys on each side a query sees"),
    "tile": Param(128, choices=TILES, help="BlockMask tile (on the CPU also the kernel's split size; CUDA: 128/256)"),
}
_PATTERN_HELP = {
    "block": "pattern: tokens per layout block",
    "window_blocks": "pattern: band of key blocks |i-j| <= this",
    "global_blocks": "local_global/bigbird: first blocks that are global",
    "random_blocks": "bigbird: random key blocks per row",
    "stride": "strided: every stride-th block is a summary column",
    "seed": "bigbird: seed of the random blocks",
}
for _name, _default in PATTERN_DEFAULTS.items():
    _PARAMS[_name] = Param(_default, min=1 if _name in ("block", "stride") else 0, help=_PATTERN_HELP.get(_name, ""))


@register_variant(
    "flex",
    family="compiled",
    exact=True,
    flops=_flops,
    supports=Supports(devices={"cpu", "cuda"}, dtypes={"float32", "bfloat16", "float16"}, non_square=True,
                      **feat.ALL),
    params=_PARAMS,
    check=_check,
    mask=_case_mask,
    working_set=_working_set,
    columns=_columns,
    description="torch.compile'd FlexAttention with block-sparse BlockMasks (none / sliding window / "
    "sparse patterns)",
)
def flex(q, k, v, *, causal, mask="none", window=256, tile=128, **pattern_params):
    features, pattern_params = feat.split(pattern_params)
    if features:
        from variants.flex_features import run_features

        return run_features(q, k, v, causal=causal, tile=tile, features=features)
    params = dict(pattern_params, mask=mask, window=window, tile=tile)
    return _run(q, k, v, causal=causal, params=params)
