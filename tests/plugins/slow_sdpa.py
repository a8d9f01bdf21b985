"""Test-only plugin: ``slow_sdpa``, PyTorch SDPA plus a controlled amount of extra work.

Used by ``benchmarks/detector.py`` to inject a known slowdown under an unchanged case
key: before the real call it runs SDPA once more on the first ``f·L`` query rows
against all keys (``f·L/2`` for a causal case on a kernel that skips masked blocks,
whose full call does about half the work), so the call does about ``f`` more
attention work; the extra result is discarded, and the extra call's temporaries are
freed before the real call allocates, so peak memory does not change. Its output is
exactly ``sdpa``'s. ``slow_naive`` does the same to the dense ``naive`` variant (which,
like SDPA's math backend, computes the masked scores of a causal case too).

``f`` is the constant ``EXTRA_WORK`` below (a fraction; 0 makes it plain ``sdpa``). It is
code, not configuration, on purpose: the detector slows the probe the way a real
regression arrives, by committing a change to that line, so that ``bench compare
--confirm`` can re-run each side from its own commit.
"""

from __future__ import annotations

from harness import attention_flops, get_variant, register_variant

EXTRA_WORK = 0.0

_sdpa = get_variant("sdpa")
_naive = get_variant("naive")


def extra_rows(length: int, causal: bool, backend: str, fraction: float) -> int:
    """Query rows of the extra call: about ``fraction`` of the real call's attention work."""
    if fraction <= 0:
        return 0
    share = 0.5 if causal and backend != "math" else 1.0  # the math backend computes masked scores too
    return max(1, round(fraction * length * share))


@register_variant(
    "slow_sdpa",
    family="dense",
    exact=True,
    flops=attention_flops,
    supports=_sdpa.supports,
    params=dict(_sdpa.params),
    check=_sdpa.check,
    working_set=_sdpa.working_set,
    description="test only: sdpa plus a fraction EXTRA_WORK of extra work",
)
def slow_sdpa(q, k, v, *, causal, backend="auto"):
    m = extra_rows(q.shape[2], causal, backend, EXTRA_WORK)
    if m:
        extra = _sdpa(q[:, :, :m], k, v, causal=False, backend=backend)
        del extra
    return _sdpa(q, k, v, causal=causal, backend=backend)


@register_variant(
    "slow_naive",
    family="dense",
    exact=True,
    flops=attention_flops,
    supports=_naive.supports,
    check=_naive.check,
    working_set=_naive.working_set,
    description="test only: naive plus a fraction EXTRA_WORK of extra work",
)
def slow_naive(q, k, v, *, causal):
    m = extra_rows(q.shape[2], causal, "math", EXTRA_WORK)  # naive computes every score, as math does
    if m:
        extra = _naive(q[:, :, :m], k, v, causal=False)
        del extra
    return _naive(q, k, v, causal=causal)
