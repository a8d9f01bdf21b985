"""Merging runs: the shards of one sweep (:mod:`harness.engine.shard`), run on several machines,
become one run directory with one report (``bench merge RUN... -o DIR``).

Before anything is written, the parts must be measurements of the same thing: the same suite
text, project commit, library versions (Python, torch, CUDA, cuDNN, Triton, the harness), seed
and timing settings (:data:`MUST_MATCH`); anything else is a :class:`MergeError` naming the run
and what differs (one line; the command line exits 2). Then the cases: a case with a row in two
parts (a shard given twice, or run twice) is a duplicate; a case the parts planned but have no
row for (an interrupted shard), or a shard of ``1..n`` not given, is missing. Both are refused
unless ``allow_partial``: then a duplicate keeps the row of the run given first (shard order
for shards) and the merged run's status says how many cases it lacks.

The merged run is written as the store writes any run (:class:`harness.engine.store.RunWriter`):
the parts' rows, samples and rounds appended to its logs, then its tables. Its ``run.json`` holds
the first part's suite, environment and machine (plus ``merged_from``: each part's run id, path,
shard, status and machine, and ``machines``: every distinct machine), the earliest start, the
latest end, and the longest part's ``wall_s``; each row keeps the ``host`` and
``machine_fingerprint`` it was measured on. A merged run is not resumed: resume the interrupted
part (or run the missing shard) and merge again. Profiles (``--profile``) are not merged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import RunExistsError, UserError
from harness.engine import store
from harness.engine.shard import ShardError, recorded_shard

if TYPE_CHECKING:
    import pandas as pd

#: What every part must share: (name in messages, path into run.json).
MUST_MATCH = (
    ("suite text", ("suite", "text")),
    ("commit", ("environment", "git", "commit")),
    ("versions", ("environment", "versions")),
    ("seed", ("seed",)),
    ("timing settings", ("timing",)),
)


class MergeError(UserError):
    """Runs that cannot be merged (one line)."""


@dataclass
class Part:
    """One run to merge: its directory, run.json, rows and samples."""

    path: Path
    meta: dict[str, Any]
    rows: pd.DataFrame
    samples: pd.DataFrame

    @property
    def shard(self) -> dict[str, Any] | None:
        """run.json's ``shard`` (:func:`harness.engine.shard.recorded_shard` has checked it), or None."""
        return self.meta.get("shard")

    @property
    def shard_index(self) -> int:
        """The part's shard index; only for a part of shards (where one is, all are: :func:`check_compatible`)."""
        assert self.shard is not None
        return self.shard["index"]

    @property
    def name(self) -> str:
        return f"{self.path} (shard {self.shard['index']}/{self.shard['count']})" if self.shard else str(self.path)


@dataclass
class Merged:
    """What :func:`merge_runs` wrote: the run directory, its rows, and what it lacks or dropped."""

    path: Path
    rows: pd.DataFrame
    missing: list[str]
    duplicates: list[str]
    machines: int


def _get(meta: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = meta
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "…"


def _difference(a: Any, b: Any) -> str:
    """The first differing key of two dicts (``torch: "2.13.0" vs "2.12.1"``), or both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{key}: {_shown(a.get(key))} vs {_shown(b.get(key))}"
    if isinstance(a, str) and isinstance(b, str) and "\n" in a + b:
        return "the suite files differ"
    return f"{_shown(a)} vs {_shown(b)}"


def read_part(path: Path) -> Part:
    """A run directory to merge (StoreError, one line, when it is not a readable run)."""
    path = Path(path)
    meta = store.read_meta(path)
    try:
        rows = store.read_results(path)
    except store.StoreError:
        import pandas as pd

        rows = pd.DataFrame({"case_id": pd.Series(dtype=str)})  # a part that finished no case yet
    try:
        recorded_shard(meta)
    except ShardError as exc:
        raise MergeError(f"{path}/{store.RUN_META}: {str(exc).removeprefix('run.json: ')}") from None
    return Part(path, meta, rows, store.read_samples(path))


def check_compatible(parts: Sequence[Part]) -> None:
    """MergeError unless every part shares :data:`MUST_MATCH` with the first, and their shards
    (if any) are of one partition."""
    first = parts[0]
    for part in parts[1:]:
        for what, key in MUST_MATCH:
            a, b = _get(first.meta, key), _get(part.meta, key)
            if a != b:
                raise MergeError(f"{part.path}: its {what} differ from {first.path}'s ({_difference(a, b)}); "
                                 "only runs of the same suite, code, versions and seed merge")
    _check_column_kinds(parts)
    counts = {p.shard["count"] if p.shard else None for p in parts}
    if len(counts) > 1:
        shown = ", ".join(f"{p.path}: " + (f"shard {p.shard['index']}/{p.shard['count']}" if p.shard else "not a shard")
                          for p in parts)
        raise MergeError(f"the runs are not shards of one partition ({shown})")


def _kind(series) -> str | None:
    """``number``, ``boolean``, ``text`` or ``mixed``: what a column holds (None: nothing)."""
    typed = {"i": "number", "u": "number", "f": "number", "b": "boolean"}.get(getattr(series.dtype, "kind", "O"))
    if typed is not None:
        return typed if series.notna().any() else None
    values = [v for v in series.tolist() if v is not None and v == v]
    kinds = {"boolean" if isinstance(v, bool) or type(v).__name__ == "bool_" else
             "number" if isinstance(v, (int, float)) or hasattr(v, "dtype") else
             "text" if isinstance(v, str) else type(v).__name__ for v in values}
    return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def _check_column_kinds(parts: Sequence[Part]) -> None:
    """MergeError (one line) when a column holds numbers in one part and text in another, or a mix
    in one: one table cannot hold both."""
    seen: dict[str, tuple[str, Path]] = {}
    for part in parts:
        for col in part.rows.columns:
            kind = _kind(part.rows[col])
            if kind is None:
                continue
            if kind == "mixed":
                raise MergeError(f"{part.path}: column {str(col)[:60]!r} mixes kinds of values; it cannot be merged")
            other = seen.setdefault(col, (kind, part.path))
            if other[0] != kind:
                raise MergeError(f"{part.path}: column {str(col)[:60]!r} holds {kind} values, {other[1]}'s "
                                 f"{other[0]}; only runs whose columns agree merge")


def _order(parts: list[Part]) -> list[Part]:
    return sorted(parts, key=lambda p: p.shard_index) if parts[0].shard else parts


def plan(parts: Sequence[Part]) -> tuple[list[str], list[str], list[str]]:
    """(every planned case id in order, duplicate case ids, problems that make cases missing)."""
    planned: list[str] = []
    seen_planned: set[str] = set()
    for part in parts:
        for cid in part.meta.get("case_ids") or []:
            if cid not in seen_planned:
                seen_planned.add(cid)
                planned.append(cid)
    present: dict[str, Path] = {}
    duplicates: list[str] = []
    for part in parts:
        for cid in part.rows["case_id"].tolist() if not part.rows.empty else []:
            if cid in present:
                duplicates.append(cid)
            else:
                present[cid] = part.path
    missing = []
    if parts[0].shard:
        count = parts[0].shard["count"]
        indices = [p.shard_index for p in parts]
        twice = sorted({i for i in indices if indices.count(i) > 1})
        if twice:
            duplicates.extend(f"shard {i}/{count}" for i in twice if f"shard {i}/{count}" not in duplicates)
        absent = sorted(set(range(1, count + 1)) - set(indices))
        if absent:  # as ranges, so that a large count stays one short line
            missing.append(f"shard {absent[0]}/{count} (not given)" if len(absent) == 1
                           else f"shards {_ranges(absent)} of {count} (not given)")
    unfinished = [cid for cid in planned if cid not in present]
    if unfinished:
        missing.append(f"{len(unfinished)} planned case(s) without a row (an interrupted part: bench resume it first)")
    return planned, duplicates, missing


def _ranges(numbers: list[int], most: int = 8) -> str:
    """``1, 3-5, 9`` for sorted ``numbers``: at most ``most`` ranges, then how many more numbers."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:most])
    rest = sum(b - a + 1 for a, b in spans[most:])
    return shown + (f" and {rest} more" if rest else "")


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Append ``records`` as JSON lines (non-finite floats as null), fsync'ed once."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    from harness.core import safefs  # never through a symlink the output directory holds

    safefs.append(path, "".join(json.dumps({k: clean(v) for k, v in record.items()}, default=str) + "\n"
                                for record in records))


def _machines(parts: Sequence[Part]) -> list[dict[str, Any]]:
    """Every distinct machine the parts' rows (``host``, ``machine_fingerprint``) or run.json name."""
    found: dict[tuple, dict[str, Any]] = {}
    for part in parts:
        machine = _get(part.meta, ("environment", "machine")) or {}
        hosts: set[tuple[Any, Any]] = set()  # (host, fingerprint)
        if not part.rows.empty and "machine_fingerprint" in part.rows.columns:
            hosts = {(h, f) for h, f in zip(part.rows.get("host", [None] * len(part.rows)),
                                            part.rows["machine_fingerprint"]) if isinstance(f, str)}
        for host, fp in hosts or {(machine.get("hostname"), machine.get("fingerprint"))}:
            found.setdefault((host, fp), {"hostname": host, "fingerprint": fp})
    return list(found.values())


def merge_runs(paths: Sequence[Path], out_dir: Path, allow_partial: bool = False) -> Merged:
    """Merge the runs at ``paths`` into a new run at ``out_dir`` (see the module doc); MergeError
    (one line) when they do not share the suite, code, versions and seed, or have duplicate or
    missing cases and not ``allow_partial``; RunExistsError when ``out_dir`` holds a run."""
    from harness.engine.lifecycle import new_run_id
    from harness.engine.store import RunWriter

    if not paths:
        raise MergeError("no run to merge")
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise MergeError("a run directory is given twice")
    if Path(out_dir).resolve() in resolved:
        raise MergeError(f"-o {out_dir} is one of the runs to merge; choose a new directory")
    if (Path(out_dir) / store.RUN_META).exists():
        raise RunExistsError(f"{out_dir} already holds a run; choose another -o directory")
    parts = [read_part(p) for p in paths]
    check_compatible(parts)
    parts = _order(parts)
    planned, duplicates, missing = plan(parts)
    if (duplicates or missing) and not allow_partial:
        problems = ([f"duplicate: {', '.join(duplicates[:5])}{' …' if len(duplicates) > 5 else ''}"] if duplicates
                    else []) + ([f"missing: {'; '.join(missing)}"] if missing else [])
        raise MergeError("; ".join(problems) + " (--allow-partial merges what there is; "
                         "a duplicate keeps the row of the run given first)")
    first = parts[0]
    run_id = new_run_id(str(first.meta["suite"]["name"]))
    env = json.loads(json.dumps(first.meta.get("environment") or {}))
    if isinstance(env.get("git"), dict):
        env["git"]["dirty"] = any(bool(_get(p.meta, ("environment", "git", "dirty"))) for p in parts) or \
            env["git"].get("dirty")
    machines = _machines(parts)
    shard_total = first.shard.get("suite_cases") if first.shard else None
    meta: dict[str, Any] = {k: first.meta[k] for k in ("suite", "timing", "seed") if k in first.meta}
    meta.update(
        run_id=run_id, cases=max(len(planned), shard_total or 0), case_ids=planned,
        started=min(str(p.meta.get("started") or "") for p in parts) or None,
        finished=max(str(p.meta.get("finished") or "") for p in parts) or None,
        status="running", environment=env, machines=machines,
        merged_from=[{"run_id": p.meta.get("run_id"), "path": str(p.path.resolve()), "status": p.meta.get("status"),
                      "shard": p.shard, "hostname": _get(p.meta, ("environment", "machine", "hostname")),
                      "fingerprint": _get(p.meta, ("environment", "machine", "fingerprint"))} for p in parts],
    )
    writer = RunWriter(out_dir, meta)
    kept: set[str] = set()
    for part in parts:
        if part.rows.empty:
            continue
        rows = part.rows[~part.rows["case_id"].isin(kept)].copy()
        kept.update(rows["case_id"])
        rows["run_id"] = run_id
        pairs = set(zip(rows["case_id"], rows["attempt_id"])) if "attempt_id" in rows else set()
        samples = part.samples
        if "attempt_id" in samples.columns:
            samples = samples[[k in pairs for k in zip(samples["case_id"], samples["attempt_id"])]]
        _write_lines(writer.dir / store.SAMPLES_LOG, samples.to_dict("records"))
        _write_lines(writer.dir / store.ROWS_LOG, rows.to_dict("records"))
        rounds = store.read_rounds_log(part.path)
        if not rounds.empty and "attempt_id" in rounds.columns:
            rounds = rounds[[k in pairs for k in zip(rounds["case_id"], rounds["attempt_id"])]]
            _write_lines(writer.dir / store.ROUNDS_LOG, rounds.to_dict("records"))
    total = max(len(planned), shard_total or 0)
    status = "complete" if not missing else f"partial ({total - len(kept)} of {total} cases missing)"
    walls = [wall for p in parts if isinstance(wall := p.meta.get("wall_s"), (int, float))]
    rows = writer.finalize(status=status, wall_s=max(walls) if walls else None)
    return Merged(writer.dir, rows, missing, duplicates, len({m["fingerprint"] for m in machines}))
