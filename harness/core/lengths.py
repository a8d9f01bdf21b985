"""Per-sequence lengths of a case: fixed, drawn (uniform, Zipf) or listed, and the pairs they attend.

A case's ``lengths`` axis says how long each of its ``batch`` sequences is, with the case's
``seq_len`` (its key/value length) as the maximum:

* ``fixed``: every sequence has the maximum length (the dense batch of every other case);
* ``uniform``: lengths drawn uniformly from ``lo .. max``;
* ``zipf``: ``ceil(max / r)`` with the rank ``r`` drawn from a Zipf law, ``P(r) ∝ r^-1.5`` for
  ``r = 1 .. max``: most sequences much shorter than the longest, as in serving traffic;
* an explicit list ``"100,7,1,512"``: those lengths, repeated in turn to fill the batch;
* a **serving batch** ``"2q512kv4k_14q1kv8k"``: sequences with their own query *and* key/value
  lengths (:func:`mix`; some prefilling a chunk, some decoding one token), which also sets the case's
  batch (the sequences counted), ``q_len`` (the longest query) and ``seq_len`` (the longest context).

Drawn lengths come from a generator seeded by the case's own shape (kind, batch, maximum,
lower bound), not the suite's seed: the lengths define *what* is measured (its FLOPs, its bytes),
so one ``case_id`` always means one workload in every run; the input values and a paged cache's
page order do come from the suite's seed. The longest drawn length is raised to the maximum, so
a padded batch is exactly ``seq_len`` long and the padding fraction is the drawn lengths' shortfall.

``lo`` is 1, or the case's ``q_len`` for causal decoding (``q_len < seq_len``): with bottom-right
alignment a sequence shorter than its queries would leave early queries with no key to see.

Query lengths: a self-attention case (``q_len`` unset: prefill) has each sequence's query length
equal to its key length; otherwise every sequence has ``q_len`` queries (decode, chunked prefill,
cross-attention), and only the key/value lengths vary; a serving batch gives each sequence its own.

**Serving-batch grammar** (vLLM's attention benchmarks' batch specs, ``benchmarks/attention_benchmarks``):
terms joined by ``_``, each ``[count]q<q_len>[k][kv<kv_len>[k]]``: ``count`` identical sequences
(default 1) of ``q_len`` new query tokens attending ``kv_len`` tokens of context, the new ones
included (default ``kv_len = q_len``: a prefill); a ``k`` after a number multiplies it by 1024.
``"q2k"`` is one 2048-token prefill, ``"8q1kv1k"`` eight decodes of one token against 1024 tokens,
``"q4kv1k"`` a 4-token extend (speculative verification), ``"2q512kv4k_14q1kv8k"`` two 512-token
chunks of chunked prefill beside fourteen decodes. ``q_len <= kv_len`` in every term (the queries are
the newest tokens of their context; causal masking is bottom-right aligned per sequence). Sequences
keep the order the spec gives.

Pure Python (no torch): the suite validator, the FLOP rules and the roofline columns use it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
from functools import lru_cache
from typing import Any

#: The named kinds of the ``lengths`` axis (besides an explicit list).
KINDS = ("fixed", "uniform", "zipf")
#: Exponent of the Zipf law of ``zipf`` lengths.
ZIPF_EXPONENT = 1.5


def parse(value: Any) -> tuple[Any, str | None]:
    """(canonical value, None) or (value, problem) for a suite's ``lengths`` value: a kind, a list of
    positive integers (written back as ``"a,b,c"``), that comma-separated text, or a serving batch
    (:func:`mix`)."""
    if isinstance(value, list):
        if not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return value, f"expected {', '.join(KINDS)} or a list of positive integers, got {value!r}"
        if min(value) < 1:
            return value, f"lengths must be positive integers, got {min(value)}"
        return ",".join(str(x) for x in value), None
    if isinstance(value, str):
        if value in KINDS:
            return value, None
        if explicit(value) is not None:
            return value, None
        if "q" in value:
            spec, problem = mix_problem(value)
            return value, problem
    close = [k for k in KINDS if isinstance(value, str) and value[:2] == k[:2]]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return value, (f"expected {', '.join(KINDS)}, a list of positive integers or a serving batch such as "
                   f"'2q512kv4k_14q1kv8k', got {value!r}{hint}")


#: One term of a serving batch: [count]q<q_len>[k][kv<kv_len>[k]] (a ``k`` not followed by ``v``).
_TERM = re.compile(r"(?P<count>\d+)?q(?P<q>\d+)(?P<qk>k(?!v))?(?:kv(?P<kv>\d+)(?P<kvk>k)?)?")


def mix_problem(value: str) -> tuple[list[tuple[int, int]] | None, str | None]:
    """(the (q_len, kv_len) of every sequence, None), or (None, why ``value`` is not a serving batch)."""
    seqs: list[tuple[int, int]] = []
    for term in value.split("_"):
        m = _TERM.fullmatch(term.strip())
        if m is None:
            return None, (f"serving batch {value!r}: term {term!r} is not [count]q<q_len>[k][kv<kv_len>[k]] "
                          "(e.g. 2q512kv4k_14q1kv8k: 2 chunks of 512 new tokens in 4096 of context, 14 one-token "
                          "decodes in 8192)")
        count = int(m["count"] or 1)
        q = int(m["q"]) * (1024 if m["qk"] else 1)
        kv = q if m["kv"] is None else int(m["kv"]) * (1024 if m["kvk"] else 1)
        if count < 1 or q < 1:
            return None, f"serving batch {value!r}: term {term!r} needs a count and q_len of at least 1"
        if q > kv:
            return None, (f"serving batch {value!r}: term {term!r} has q_len {q} > kv_len {kv} (the context holds the "
                          "new tokens too)")
        seqs += [(q, kv)] * count
    return seqs, None


def mix(value: Any) -> list[tuple[int, int]] | None:
    """The (q_len, kv_len) of each sequence of a serving-batch ``lengths`` value, or None for any other
    value (a kind, a list of lengths, bad text)."""
    if not isinstance(value, str) or "q" not in value:
        return None
    return mix_problem(value)[0]


def mix_shape(value: Any) -> dict[str, Any] | None:
    """The case fields a serving batch sets: ``batch`` (its sequences), ``seq_len`` (the longest context)
    and ``q_len`` (the longest query; None when that equals ``seq_len``); None for other values."""
    seqs = mix(value)
    if not seqs:
        return None
    kv, q = max(s[1] for s in seqs), max(s[0] for s in seqs)
    return dict(batch=len(seqs), seq_len=kv, q_len=None if q == kv else q)


def explicit(value: str) -> list[int] | None:
    """The integers of an explicit ``"a,b,c"`` lengths value (None for a kind or bad text)."""
    try:
        out = [int(x) for x in value.split(",")]
    except ValueError:
        return None
    return out if out and min(out) >= 1 else None


def sequence_lengths(kind: str, batch: int, maximum: int, lo: int = 1) -> list[int]:
    """The ``batch`` lengths of ``kind`` with ``maximum`` the longest allowed (see the module doc)."""
    return list(_drawn(kind, batch, maximum, max(1, min(lo, maximum))))


@lru_cache(maxsize=1024)
def _drawn(kind: str, batch: int, maximum: int, lo: int) -> tuple[int, ...]:
    if kind == "fixed":
        return (maximum,) * batch
    listed = explicit(kind)
    if listed is not None:
        return tuple(itertools.islice(itertools.cycle(listed), batch))
    rng = random.Random(f"{kind}:{batch}:{maximum}:{lo}")
    if kind == "uniform":
        out = [rng.randint(lo, maximum) for _ in range(batch)]
    elif kind == "zipf":
        cdf = list(itertools.accumulate(r ** -ZIPF_EXPONENT for r in range(1, maximum + 1)))
        ranks = [bisect.bisect_left(cdf, rng.random() * cdf[-1]) + 1 for _ in range(batch)]
        out = [max(lo, math.ceil(maximum / r)) for r in ranks]
    else:
        raise ValueError(f"unknown lengths {kind!r}")
    out[out.index(max(out))] = maximum
    return tuple(out)


def case_lengths(case) -> tuple[list[int], list[int]]:
    """(query lengths, key/value lengths) of each sequence of ``case`` (a Case or a row)."""
    get = case.get if isinstance(case, dict) else lambda name, default=None: getattr(case, name, default)
    batch, kv_max, kind = int(get("batch") or 0), int(get("seq_len") or 0), get("lengths") or "fixed"
    seqs = mix(kind)
    if seqs is not None:  # a serving batch: each sequence its own query and key/value length
        return [q for q, _ in seqs], [kv for _, kv in seqs]
    q_len = _int_or_none(get("q_len"))
    lo = q_len if (q_len is not None and get("causal") and q_len < kv_max) else 1
    kv = sequence_lengths(kind, batch, kv_max, lo)
    return (list(kv) if q_len is None else [q_len] * batch), kv


def pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """(query, key) pairs one sequence attends: all of them, or with causal masking aligned to the
    bottom right (query i sees keys up to ``kv_len - q_len + i``; needs ``q_len <= kv_len``)."""
    if not causal:
        return q_len * kv_len
    return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2


def _int_or_none(x: Any) -> int | None:
    """An integer, or None for None, NaN or pandas' NA (a table's empty cell)."""
    try:
        return None if x is None or math.isnan(float(x)) else int(x)
    except (TypeError, ValueError):
        return None
