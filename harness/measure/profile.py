"""Profiling a case: where one call spends its time and memory, operator by operator.

``bench run --profile`` (or ``[run] profile = true`` / ``profile = ["variant", ...]``) makes
:func:`maybe_profile` run, for every selected case, ONE extra call under ``torch.profiler``
(CPU activities, CUDA too on a GPU; ``record_shapes``, ``profile_memory``, ``with_flops``) after
the case's timing, memory and accuracy phases, so the timed samples never run under the profiler.
It writes, in the run directory:

* ``traces/<case_id>.json`` — the call's Chrome/Perfetto trace (open it in ``ui.perfetto.dev``
  or ``chrome://tracing``);
* ``profile.jsonl`` — one line per profiled case, appended and fsync'ed as the case finishes:
  its operators (name, group, calls, self and total time, share of the call's self time, FLOPs
  and, on CUDA, device time), its memory timeline (bytes allocated over the call, from the
  allocation events :mod:`harness.measure.memory` walks for the peak), how long profiling took
  (``profile_s``), or the error that stopped it (the case's row is unaffected);
* ``profile.parquet`` — one row per (case, operator), :data:`COLUMNS`, written when the run
  finishes (:func:`write_table`; :func:`read_profile` rebuilds it from the log of a run that did not).

Operators are put in named groups by :func:`classify`, from the one table :data:`OP_GROUPS`.
This module imports only the standard library at import time (torch and pandas where used).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from harness.core.cases import Case

PROFILE_LOG = "profile.jsonl"
PROFILE = "profile.parquet"
TRACES = "traces"
#: Columns of profile.parquet (``cuda_self_time_ms`` is added when a case ran on CUDA).
COLUMNS = ("case_id", "op", "group", "calls", "self_time_ms", "total_time_ms", "self_share", "flops")
CUDA_COLUMN = "cuda_self_time_ms"
#: At most this many points of a case's memory timeline are kept (every peak is kept).
TIMELINE_POINTS = 240

#: The one table that names what an operator does. Per group: exact ATen operator names (without
#: ``aten::`` and leading/trailing underscores, so ``aten::_softmax`` and ``aten::copy_`` match
#: ``softmax`` and ``copy``), and substrings that identify a kernel that is not an ATen operator
#: (CUDA kernel names, library ops). Groups are tried in this order; anything else is "other".
OP_GROUPS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    # the kernels that do the work (``aten::scaled_dot_product_attention`` itself only dispatches: other)
    "fused attention": (frozenset({
        "scaled_dot_product_flash_attention_for_cpu", "flex_attention",
        "scaled_dot_product_flash_attention", "scaled_dot_product_efficient_attention",
        "scaled_dot_product_cudnn_attention", "flash_attention_forward", "efficient_attention_forward",
        "scaled_dot_product_fused_attention_overrideable",
    }), ("attention", "flash", "fmha", "attn")),
    "matmul": (frozenset({
        "mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "einsum", "int_mm", "scaled_mm", "dot",
        "mv", "addmv", "tensordot", "vdot",
    }), ("gemm", "cutlass", "cublas", "matmul", "wgmma", "mma")),
    "softmax/exp": (frozenset({
        "softmax", "log_softmax", "safe_softmax", "masked_softmax", "exp", "exp2", "expm1", "logsumexp", "sigmoid",
        "softmax_backward_data", "log_softmax_backward_data",
    }), ("softmax", "logsumexp")),
    "masking/where": (frozenset({
        "where", "masked_fill", "masked_scatter", "masked_select", "triu", "tril", "ge", "gt", "le", "lt", "eq", "ne",
        "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "isin", "isneginf",
        "isposinf", "isinf", "isnan",
    }), ("mask", "where", "triu", "tril")),
    "copies/gathers/cat": (frozenset({
        "copy", "clone", "contiguous", "to", "to_copy", "cat", "stack", "gather", "index", "index_select", "index_put",
        "index_add", "index_copy", "scatter", "scatter_add", "scatter_reduce", "take", "take_along_dim", "repeat",
        "repeat_interleave", "flip", "roll", "constant_pad_nd", "pad", "unfold", "narrow_copy", "slice_scatter",
        "select_scatter", "as_strided_scatter", "expand_copy", "embedding",
    }), ("copy", "cat", "gather", "scatter", "index", "transpose")),
    "reductions": (frozenset({
        "sum", "mean", "amax", "amin", "max", "min", "aminmax", "cumsum", "cumprod", "logcumsumexp", "norm",
        "linalg_vector_norm", "var", "std", "var_mean", "std_mean", "prod", "argmax", "argmin", "topk", "sort",
        "all", "any", "count_nonzero",
    }), ("reduce", "reduction")),
}
OTHER = "other"
#: Every group, in the order reports stack them.
GROUPS: tuple[str, ...] = (*OP_GROUPS, OTHER)


def classify(op: str) -> str:
    """The group of an operator or kernel name (:data:`OP_GROUPS`; :data:`OTHER` when none matches).

    ATen operators (``aten::…``) are matched by exact name only (``aten::maximum`` is not a
    reduction); other names (kernels, library ops) by exact name, then by substring."""
    namespace, _, name = op.rpartition("::")
    base = name.strip("_").lower()
    for group, (names, _) in OP_GROUPS.items():
        if base in names:
            return group
    if namespace.endswith("aten"):
        return OTHER
    text = op.lower()
    for group, (_, parts) in OP_GROUPS.items():
        if any(part in text for part in parts):
            return group
    return OTHER


# -- the request: which cases, and where to write ---------------------------------------------


def request(setting: bool | list[str] | None, run_dir: str | Path | None) -> dict[str, Any] | None:
    """What a worker needs to profile cases (JSON-able), from ``[run] profile`` or ``--profile``:
    None (no profiling) for false/None/an empty list or without a run directory."""
    if not setting or run_dir is None:
        return None
    return {"run_dir": str(Path(run_dir).resolve()), "variants": None if setting is True else sorted(setting)}


def wanted(profile: Mapping[str, Any] | None, case: Case) -> bool:
    if not profile:
        return False
    return profile.get("variants") is None or case.variant in profile["variants"]


def maybe_profile(profile: Mapping[str, Any] | None, case: Case, make_call: Callable[[], Callable[[], Any]],
                  phase: Callable[[str], None]) -> None:
    """If ``profile`` (:func:`request`) selects ``case``: phase ``profile``, then :func:`profile_case`
    on a fresh call from ``make_call()``. Called once per case, after its other phases."""
    if profile is not None and wanted(profile, case):
        phase("profile")
        profile_case(make_call, case, Path(profile["run_dir"]))


def profile_case(make_call: Callable[[], Callable[[], Any]], case: Case, run_dir: Path) -> dict[str, Any]:
    """Profile one call; write its trace and append its record to ``profile.jsonl``; returns the record.

    Never raises for a failure of the call or of the profiler: the record then carries ``error``
    (the case's timing, memory and accuracy were measured before and stand)."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"case_id": case.case_id, "attempt": uuid.uuid4().hex[:12], "device": case.device}
    trace = Path(TRACES) / f"{case.case_id}.json"
    try:
        ops, timeline = _profile(make_call(), case.device, run_dir / trace)
        record.update(ops=ops, memory=timeline, trace=trace.as_posix())
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, and the run goes on
        lines = str(exc).strip().splitlines()
        record["error"] = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
    record["profile_s"] = round(time.perf_counter() - t0, 4)
    run_dir.mkdir(parents=True, exist_ok=True)
    from harness.core import safefs  # never through a symlink the run directory holds

    safefs.append(run_dir / PROFILE_LOG, json.dumps(record) + "\n")
    return record


def _profile(call: Callable[[], Any], device: str, trace_path: Path) -> tuple[list[dict], dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from harness.measure.memory import allocation_events, quiet_stderr

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with quiet_stderr():
        with profile(activities=activities, record_shapes=True, profile_memory=True, with_flops=True) as prof:
            result = call()
            if cuda:
                torch.cuda.synchronize()
        del result
    from harness.core import safefs  # traces/ and the trace: never through a symlink the run directory holds

    safefs.makedirs(trace_path.parent)
    tmp = trace_path.with_name(f".{trace_path.name}.{uuid.uuid4().hex}.tmp")
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, trace_path)
    return operator_rows(prof.key_averages(), cuda), memory_timeline(allocation_events(prof, "cuda" if cuda else "cpu"))


def operator_rows(averages, cuda: bool = False) -> list[dict[str, Any]]:
    """One dict per operator of ``prof.key_averages()``, heaviest first; ``self_share`` is its share of
    the summed self time (device time on CUDA), so a case's shares add up to 1."""
    rows = []
    for e in averages:
        if e.key.startswith("["):  # [memory]: the profiler's allocation bookkeeping, not an operator
            continue
        row = {"op": e.key, "group": classify(e.key), "calls": int(e.count),
               "self_time_ms": e.self_cpu_time_total / 1e3, "total_time_ms": e.cpu_time_total / 1e3,
               "flops": int(e.flops or 0)}
        if cuda:
            device_us = getattr(e, "self_device_time_total", None)
            row[CUDA_COLUMN] = (device_us if device_us is not None else getattr(e, "self_cuda_time_total", 0)) / 1e3
        rows.append(row)
    basis = CUDA_COLUMN if cuda else "self_time_ms"
    total = sum(r[basis] for r in rows)
    for r in rows:
        r["self_share"] = r[basis] / total if total > 0 else 0.0
    return sorted(rows, key=lambda r: -r[basis])


def memory_timeline(events: list[tuple[int, int]], points: int = TIMELINE_POINTS) -> dict[str, Any]:
    """Bytes allocated over the call from (time_ns, ±bytes) allocation events: times in ms from the
    first event; at most ``points`` points, keeping the highest of each stretch (so the peak stays)."""
    from harness.measure.memory import peak_from_events

    times, held, current = [], [], 0
    for t, size in events:
        current += size
        times.append((t - events[0][0]) / 1e6)
        held.append(current)
    if len(times) > points:
        step = -(-len(times) // (points - 1))
        keep = [max(range(i, min(i + step, len(times))), key=held.__getitem__) for i in range(0, len(times), step)]
        if keep[-1] != len(times) - 1:
            keep.append(len(times) - 1)  # the last point: what the call left allocated (its output)
        times, held = [times[i] for i in keep], [held[i] for i in keep]
    return {"t_ms": [round(t, 6) for t in times], "bytes": held, "peak_bytes": peak_from_events(events)}


# -- reading and writing the run's profile -----------------------------------------------------
#
# The run directory's files are read by harness.engine.store (which guards against files that are
# not regular or too large), and checked here: a run directory may come from anyone.

_CASE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NUMBERS = ("calls", "self_time_ms", "total_time_ms", "self_share", "flops", CUDA_COLUMN)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _clean_ops(ops: Any) -> list[dict[str, Any]] | None:
    if not isinstance(ops, list):
        return None
    out = []
    for op in ops:
        if not (isinstance(op, dict) and isinstance(op.get("op"), str) and isinstance(op.get("group"), str)
                and all(_number(op.get(k)) for k in _NUMBERS if k != CUDA_COLUMN or k in op)):
            return None
        out.append({k: op[k] for k in ("op", "group", *_NUMBERS) if k in op})
    return out


def _clean_memory(memory: Any) -> dict[str, Any] | None:
    if not isinstance(memory, dict) or not _number(memory.get("peak_bytes")):
        return None
    t, held = memory.get("t_ms"), memory.get("bytes")
    if not (isinstance(t, list) and isinstance(held, list) and len(t) == len(held) and all(map(_number, t + held))):
        return None
    return {"t_ms": t, "bytes": held, "peak_bytes": memory["peak_bytes"]}


def records(lines: list[Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """The last record of each profiled case among ``profile.jsonl``'s ``lines`` (a resumed case's
    last attempt), checked: ``ops`` and ``memory`` that do not have their shape are dropped (with an
    ``error`` saying so), ``trace`` is the case's trace file when it exists."""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not isinstance(line, dict) or not isinstance(line.get("case_id"), str) or not _CASE_ID.fullmatch(
                line["case_id"]):
            continue
        cid = line["case_id"]
        record = {"case_id": cid, "profile_s": line["profile_s"] if _number(line.get("profile_s")) else None}
        if isinstance(line.get("error"), str):
            record["error"] = line["error"][:500]
        elif (ops := _clean_ops(line.get("ops"))) is None:
            record["error"] = "the profile log's record of this case is malformed"
        else:
            record["ops"] = ops
            record["memory"] = _clean_memory(line.get("memory"))
            trace = Path(TRACES) / f"{cid}.json"
            record["trace"] = trace.as_posix() if (Path(run_dir) / trace).is_file() else None
        out[cid] = record
    return out


def table(records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """profile.parquet's rows (:data:`COLUMNS`) from the log's records."""
    import pandas as pd

    rows = [{"case_id": cid, **op} for cid, r in records.items() for op in r.get("ops") or []]
    columns = list(COLUMNS) + ([CUDA_COLUMN] if any(CUDA_COLUMN in r for r in rows) else [])
    return pd.DataFrame(rows, columns=columns)


def write_table(run_dir: Path, records: dict[str, dict[str, Any]]) -> Path | None:
    """Write ``profile.parquet`` from the log's :func:`records` (nothing when the run profiled nothing)."""
    if not records:
        return None
    from harness.core import safefs

    path = Path(run_dir) / PROFILE
    with safefs.atomic(path, "wb") as f:  # a symlink there is replaced, not written through
        table(records).to_parquet(f, index=False)
    return path


@dataclass
class RunProfile:
    """A run's profile: the operator table, and per case its log record (``trace`` path relative
    to the run directory or None, ``memory`` timeline or None, ``profile_s``, or ``error``)."""

    table: pd.DataFrame
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_profile(lines: list[Any], frame: pd.DataFrame | None, run_dir: Path) -> RunProfile | None:
    """The run's profile from the lines of its ``profile.jsonl`` and its ``profile.parquet`` (None
    when absent: the table is made from the lines); None when it has neither. ValueError when the
    table is not a profile table."""
    import pandas as pd

    cases = records(lines, run_dir)
    if frame is None:
        if not cases:
            return None
        frame = table(cases)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"not a profile table: no column {', '.join(missing)}")
    frame = frame.copy()
    for c in _NUMBERS:
        if c in frame.columns:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    for c in ("case_id", "op", "group"):
        frame[c] = frame[c].astype(str)
    if not cases:  # a table without its log (copied alone): its cases, with their traces where present
        cases = records([{"case_id": cid, "ops": []} for cid in frame["case_id"].unique()], run_dir)
    frame = frame[frame["case_id"].isin(cases.keys())]
    return RunProfile(frame.reset_index(drop=True), cases)
