"""Act on a measurement: load a dispatch table (``bench winners RUN --format json``) and pick the variant
to use for a shape.

::

    from harness import dispatch

    table = dispatch.load("winners.json")
    entry = table.pick(batch=1, heads=32, kv_heads=8, head_dim=128, q_len=1, kv_len=20000,
                       dtype="float32", device="cpu", causal=True)
    if entry is not None:
        print(entry.variant, entry.params, entry.evidence["speedup"], entry.exact, entry.distance)
        attention = entry.attention()          # the registered variant with those parameters
        out = attention(q, k, v, causal=True)

A table holds one entry per measured workload (a case without its variant: every case field, plus
``level``, kernel or layer, and ``machine``) with the winning variant, its parameters and the evidence
(median time, its interval, stability, rel_err, the baseline and the speed-up); see
:mod:`reports.winners` for how the winner is chosen.

**The rule** (:meth:`DispatchTable.pick`): the fields you give are compared with each entry's workload,
those you leave out match anything (``kv_len`` is ``seq_len``; a ``q_len`` equal to it means the same as
none). The size fields (:data:`harness.core.cases.SIZE_AXES`: ``batch``, ``seq_len``, ``q_len``) may
differ, every other field you give must be equal. Among the entries left, an exact match wins; else the
nearest one by ``Σ |log2(yours / its)|`` over the size fields you gave (the query length of an entry
without ``q_len`` is its ``seq_len``), ties going to the entry listed first (the table lists workloads
in ascending order of their fields, so the smaller of two equally near shapes). ``None`` when no entry
matches the fields that must be equal, or when the nearest is farther than ``max_distance``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.cases import AXES, SIZE_AXES, SWEEP_ALIASES, is_missing

#: The dispatch table's format name and the version this module reads.
FORMAT, VERSION = "attention-bench-dispatch", 1
#: Workload keys beside the case fields.
EXTRA_KEYS = ("level", "machine")


class DispatchError(ValueError):
    """A file that is not a dispatch table, or a field no workload has."""


@dataclass(frozen=True)
class Entry:
    """One measured workload's winner: its workload fields, the variant, its parameters, the evidence;
    ``exact`` (the shape asked for was measured) and ``distance`` (0 when exact) of the pick."""

    workload: Mapping[str, Any]
    variant: str
    params: Mapping[str, Any]
    evidence: Mapping[str, Any]
    label: str = ""
    exact: bool = True
    distance: float = 0.0

    def attention(self) -> Callable[..., Any]:
        """The registered kernel-level variant with the entry's parameters: ``fn(q, k, v, causal=...)``."""
        from harness.core.registry import get_variant

        if self.workload.get("level") == "layer":
            raise DispatchError(f"{self.label}: a layer entry names a layer factory, not an attention kernel "
                                f"(its kernel is params['kernel'] = {self.params.get('kernel')!r})")
        return functools.partial(get_variant(self.variant), **self.params)


@dataclass
class DispatchTable:
    entries: list[Entry]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "dispatch table") -> DispatchTable:
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise DispatchError(f"{source}: not a dispatch table (format {FORMAT!r}; write one with "
                                f"bench winners RUN --format json)")
        if doc.get("version") != VERSION:
            raise DispatchError(f"{source}: dispatch table version {doc.get('version')!r}, this reads {VERSION}")
        entries = []
        for i, e in enumerate(doc.get("entries") or []):
            try:
                entries.append(Entry(dict(e["workload"]), str(e["variant"]), dict(e.get("params") or {}),
                                     dict(e.get("evidence") or {}), str(e.get("label") or e["variant"])))
            except (KeyError, TypeError) as exc:
                raise DispatchError(f"{source}: entry {i} lacks {exc}") from None
        return cls(entries, {k: v for k, v in doc.items() if k != "entries"})

    def pick(self, shape: Any = None, *, max_distance: float = math.inf, **fields: Any) -> Entry | None:
        """The entry for a shape (a Case, a mapping of case fields, and/or keyword fields): see the module
        doc for the rule. ``Entry.exact`` says whether it was measured as asked, ``Entry.distance`` how far."""
        want = _fields(shape, fields)
        best: tuple[float, int] | None = None
        for i, entry in enumerate(self.entries):
            w = entry.workload
            if any(not _equal(w.get(k), v) for k, v in want.items() if k not in SIZE_AXES):
                continue
            d = sum(_log_distance(_size(want, k), _size(w, k)) for k in SIZE_AXES if k in want)
            if best is None or d < best[0]:
                best = (d, i)
        if best is None or best[0] > max_distance:
            return None
        d, i = best
        e = self.entries[i]
        return Entry(e.workload, e.variant, e.params, e.evidence, e.label, exact=d == 0, distance=d)


def load(path: str | Path) -> DispatchTable:
    """The dispatch table in ``path`` (DispatchError when it is not one)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DispatchError(f"{path}: cannot read a dispatch table: {exc}") from None
    return DispatchTable.from_dict(doc, str(path))


def _fields(shape: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields asked for, normalised: a Case's or mapping's values, keywords over them, ``kv_len`` as
    ``seq_len``, a ``q_len`` equal to ``seq_len`` as none; DispatchError for a name no workload has."""
    values: dict[str, Any] = {}
    if shape is not None:
        values.update(shape.values() if hasattr(shape, "values") and callable(shape.values)
                      and not isinstance(shape, Mapping) else dict(shape))
    values.update(fields)
    values.pop("variant", None)
    values.pop("params", None)
    for alias, _ in SWEEP_ALIASES.items():
        if alias in values:
            values["seq_len"] = values.pop(alias)
    unknown = [k for k in values if k not in AXES and k not in EXTRA_KEYS]
    if unknown:
        raise DispatchError(f"unknown workload field(s) {', '.join(unknown)}; fields: "
                            f"{', '.join([*(n for n in AXES if n not in ('variant', 'params')), *EXTRA_KEYS])}")
    if "q_len" in values and "seq_len" in values and values["q_len"] == values["seq_len"]:
        values["q_len"] = None
    return values


def _equal(a: Any, b: Any) -> bool:
    if is_missing(a) or is_missing(b):
        return is_missing(a) and is_missing(b)
    return a == b


def _size(workload: Mapping[str, Any], name: str) -> Any:
    """A size field of a workload (an entry's or the one asked for): its query length is its ``seq_len``
    when ``q_len`` is empty."""
    v = workload.get(name)
    return workload.get("seq_len") if name == "q_len" and is_missing(v) else v


def _log_distance(a: Any, b: Any) -> float:
    if is_missing(a):
        a = None
    if a is None or is_missing(b):
        return 0.0 if a is None and is_missing(b) else math.inf
    return abs(math.log2(float(a) / float(b)))
