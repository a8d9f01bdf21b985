"""Test-only plugin: ``slow_sdpa``, PyTorch SDPA plus a controlled amount of extra work.

Used by ``benchmarks/detector.py`` to inject a known slowdown under an unchanged case
key: before the real call it runs SDPA once more on the first ``f·L`` query rows
against all keys (``f·L/2`` for a causal case on a kernel that skips masked blocks,
whose full call does about half the work), so the call does about ``f`` more
attention work; the extra result is discarded, and the extra call's temporaries are
freed before the real call allocates, so peak memory does not change. Its output is
exactly ``sdpa``'s.

``f`` is read at every call from the environment variable ``ATTENTION_BENCH_EXTRA_WORK``
(a fraction; default 0.10, i.e. ~10% more work; 0 makes it plain ``sdpa``). The run
records nothing about it, so two runs that differ only in ``f`` look like the same
code to ``bench compare --confirm``: do not use --confirm with this plugin.
"""

from __future__ import annotations

import os

from harness import attention_flops, get_variant, register_variant

EXTRA_WORK_ENV = "ATTENTION_BENCH_EXTRA_WORK"
DEFAULT_EXTRA_WORK = 0.10

_sdpa = get_variant("sdpa")


def extra_work() -> float:
    value = os.environ.get(EXTRA_WORK_ENV)
    return DEFAULT_EXTRA_WORK if value in (None, "") else float(value)


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
    description="test only: sdpa plus ~10% extra work (ATTENTION_BENCH_EXTRA_WORK)",
)
def slow_sdpa(q, k, v, *, causal, backend="auto"):
    m = extra_rows(q.shape[2], causal, backend, extra_work())
    if m:
        extra = _sdpa(q[:, :, :m], k, v, causal=False, backend=backend)
        del extra
    return _sdpa(q, k, v, causal=causal, backend=backend)
