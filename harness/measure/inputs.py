"""Random inputs for a case: never zeros, never constants, reproducible from a seed.

Two kinds, chosen by the suite's ``inputs`` axis:

* ``gaussian``: q, k, v i.i.d. standard normal. Scores ``q·k/sqrt(D)`` have unit
  variance, so attention is diffuse: the easy case for approximations.
* ``structured``: q and k share a rank-8 component on top of N(0, 0.5²) noise,
  scaled so that scores have a standard deviation of about 3; attention is then
  peaked on a few keys per query, as in trained models. v is standard normal.

Inputs are drawn in float32 on the CPU with a seeded generator and then cast and
moved, so the same case gets the same values on every device.

Inference shapes: q has the case's query length (``q_len``) and k, v its key/value length
(``seq_len``). :func:`layout_inputs` gives what a variant receives besides q: for a
variable-length batch the padded tensors (padding rows hold random values too) and ``q_lens``,
``kv_lens`` (int32 ``(B,)``); for a paged cache k and v as page pools ``(num_pages, H_kv,
page_size, D)`` with a ``block_table`` ``(B, max_pages)``, each sequence's pages placed in the
pool in an order shuffled from the seed (a partly filled last page holds random values past the
sequence's end). :func:`dense_kv` gives the contiguous cache back for the float64 reference. A
shared-prefix case (``shared_prefix`` P) draws one prefix of P keys and values for all the batch's
sequences (:func:`share_prefix`) and tells a variant that can use it its length (``shared_prefix``).

Attention features (:mod:`harness.core.features`) reach a variant as keyword arguments too, only when
the case sets them (:func:`feature_inputs`): ``softcap`` (float), ``alibi_slopes`` and ``sinks``
(float32 ``(H,)``: the ALiBi paper's slopes; sink logits drawn standard normal from the seed),
``window_size`` and ``prefix_len`` (int) and ``document_ids`` (int32 ``(seq_len,)``: each key
position's document). ``v_head_dim`` is v's last dimension (and the output's).

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
from harness.core.lengths import case_lengths

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}

#: Byte boundary every input tensor starts on (a page).
ALIGNMENT = 4096

STRUCTURED_RANK = 8
STRUCTURED_SCORE_STD = 3.0


def make_qkv(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) for ``case``, in its dtype and on its device."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, L, D = case.batch, case.heads, case.kv_heads, case.seq_len, case.head_dim
    Lq = getattr(case, "query_len", L)
    if case.inputs == "gaussian":
        q = torch.randn(B, H, Lq, D, generator=g)
        k = torch.randn(B, Hkv, L, D, generator=g)
    elif case.inputs == "structured":
        r = STRUCTURED_RANK
        basis = torch.randn(r, D, generator=g) / math.sqrt(D)
        # scores ~ (zq·basis)·(zk·basis)ᵀ / sqrt(D): choose the latent scale to give std ~ STRUCTURED_SCORE_STD
        scale = math.sqrt(STRUCTURED_SCORE_STD * math.sqrt(D) / math.sqrt(r))
        q = 0.5 * torch.randn(B, H, Lq, D, generator=g) + scale * torch.randn(B, H, Lq, r, generator=g) @ basis
        k = 0.5 * torch.randn(B, Hkv, L, D, generator=g) + scale * torch.randn(B, Hkv, L, r, generator=g) @ basis
    else:
        raise ValueError(f"unknown inputs kind {case.inputs!r}")
    v = torch.randn(B, Hkv, L, getattr(case, "value_dim", D), generator=g)
    share_prefix(case, k, v)
    dtype = TORCH_DTYPES[case.dtype]
    q, k, v = (aligned_copy(x.to(device=case.device, dtype=dtype)) for x in (q, k, v))
    return q, k, v


def share_prefix(case: Case, k: torch.Tensor, v: torch.Tensor) -> None:
    """A shared-prefix case (``shared_prefix`` P): every sequence's first P keys and values become sequence 0's
    (in place), as N requests after one system prompt."""
    p = getattr(case, "shared_prefix", None)
    if p:
        for x in (k, v):
            x[1:, :, :p] = x[:1, :, :p]


#: Offset of the sinks' generator from the suite's seed (the inputs use the seed itself, pages seed + 1..3).
SINK_SEED_OFFSET = 7


def feature_inputs(case: Case, device, seed: int = 0) -> dict:
    """The keyword arguments of the case's attention features that are set (see the module doc)."""
    from harness.core import masks

    extra: dict = {}
    if getattr(case, "softcap", 0):
        extra["softcap"] = float(case.softcap)
    if getattr(case, "alibi", False):
        extra["alibi_slopes"] = masks.alibi_slopes(case.heads, device)
    if getattr(case, "sinks", False):
        g = torch.Generator().manual_seed(seed + SINK_SEED_OFFSET)
        extra["sinks"] = torch.randn(case.heads, generator=g).to(device)
    window = getattr(case, "sliding_window", None)
    if window is not None:
        extra["window_size"] = int(window)
    if getattr(case, "prefix_lm", 0):
        extra["prefix_len"] = int(case.prefix_lm)
    if getattr(case, "document", 1) > 1:
        extra["document_ids"] = masks.document_ids(case.seq_len, case.document, device)
    return extra


def layout_inputs(case: Case, k: torch.Tensor, v: torch.Tensor, seed: int = 0):
    """(k, v, extra keyword arguments) as the case's variant receives them: ``k, v, {}`` for a fixed
    contiguous batch; ``q_lens``/``kv_lens`` for a variable-length or paged one; page pools and a
    ``block_table`` for a paged one (see the module doc); its features' (:func:`feature_inputs`); and
    ``shared_prefix`` for a shared-prefix case (passed on only to a variant that declares
    ``Supports(shared_prefix=True)``)."""
    features = feature_inputs(case, k.device, seed)
    prefix = getattr(case, "shared_prefix", None)
    if prefix:
        features["shared_prefix"] = int(prefix)
    if case.lengths == "fixed" and case.kv_layout == "contiguous":
        return k, v, features
    q_lens, kv_lens = case_lengths(case)
    extra = {name: torch.tensor(x, dtype=torch.int32, device=k.device) for name, x in
             (("q_lens", q_lens), ("kv_lens", kv_lens))}
    extra.update(features)
    if case.kv_layout != "paged":
        return k, v, extra
    ps, B, Hkv = case.page_size, k.shape[0], k.shape[1]
    assert ps is not None  # a paged case has its page size (the suite requires one)
    pages = [-(-n // ps) for n in kv_lens]
    order = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(seed + 1)).to(k.device)
    table = torch.zeros(B, max(pages), dtype=torch.int32, device=k.device)
    pools = []
    for i, x in enumerate((k, v)):
        junk, D = torch.Generator().manual_seed(seed + 2 + i), x.shape[-1]
        pool = aligned_copy(torch.randn(sum(pages), Hkv, ps, D, generator=junk)
                            .to(device=k.device, dtype=k.dtype))  # unwritten slots: random, never zero
        start = 0
        for b, (n, count) in enumerate(zip(kv_lens, pages)):
            ids = order[start:start + count]
            table[b, :count] = ids.int()
            padded = torch.nn.functional.pad(x[b, :, :n], (0, 0, 0, count * ps - n)).view(Hkv, count, ps, D)
            pool[ids] = torch.where(torch.arange(count * ps, device=k.device).view(count, 1, ps, 1) < n,
                                    padded.transpose(0, 1), pool[ids])
            start += count
        pools.append(pool)
    return pools[0], pools[1], {**extra, "block_table": table}


def dense_kv(case: Case, k: torch.Tensor, v: torch.Tensor, extra: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous (B, H_kv, seq_len, D) k and v of what :func:`layout_inputs` gave (a paged cache
    gathered through its block table; positions past a sequence's length are never attended)."""
    if "block_table" not in extra:
        return k, v
    table = extra["block_table"].long()
    B, pages = table.shape
    _, Hkv, ps, _ = k.shape
    k, v = (x[table].transpose(1, 2).reshape(B, Hkv, pages * ps, x.shape[-1])[:, :, :case.seq_len]
            for x in (k, v))
    return k, v


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
