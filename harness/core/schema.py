"""The result row's schema: every column of ``results.parquet``, declared once.

Each :class:`Column` has a name, a dtype (``string``, ``int64``, ``float64``, ``bool``: numpy
and pyarrow both have them), a unit (``""`` when it has none), a group and a one-line
description. Everything that makes, writes or reads rows takes its column names from here:
the runner's rows (:func:`base_row`, :func:`empty_row`), the store's Parquet types
(:func:`arrow_schema`), the report's table and the pytest-benchmark export.

Groups: ``identity`` (what was measured; :class:`harness.core.cases.Case` and the run),
``outcome``, ``time``, ``stability`` (the case timed in several processes: do they agree?),
``contention`` (other processes while it was timed), ``work``, ``roofline``, ``telemetry``, ``memory``, ``accuracy``,
``environment``, ``record`` (bookkeeping of the store). A variant may add columns of its own
(``columns(case)`` of ``register_variant``, e.g. ``density``); those are not declared here
(group ``extra``, see :func:`group_of`) and keep the types they are written with.

Missing values: NaN in float columns, None in the others. This module imports neither torch
nor pandas, so a parent process can make a row (a crashed worker's) without the measurement stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.core.cases import AXES, is_missing

if TYPE_CHECKING:
    from harness.core.cases import Case

DTYPES = ("string", "int64", "float64", "bool")
GROUPS = ("identity", "outcome", "time", "stability", "contention", "work", "roofline", "telemetry", "memory",
          "accuracy",
          "environment", "record")
#: The group of a column this schema does not declare (a variant's own).
EXTRA = "extra"


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    unit: str
    group: str
    doc: str
    #: False for columns added when the row is recorded (run, suite, attempt), not by measuring the case
    per_case: bool = True
    #: True: the report's results table has no cell of its own for it and shows it after the others
    #: (with its unit) when it holds numbers
    report_extra: bool = False
    #: computed from the row's measured columns by harness.measure.derive (the one place), once, after
    #: the processes are combined, and again whenever a stored run is read; never by a worker
    derived: bool = False

    @property
    def missing(self) -> Any:
        """The value of this column when nothing was measured: NaN for floats, else None."""
        return math.nan if self.dtype == "float64" else None


def _c(name, dtype, unit, group, doc, **kw) -> Column:
    return Column(name, dtype, unit, group, doc, **kw)


_TELEMETRY = "NVML, NVIDIA GPUs only; empty elsewhere"

#: Every declared column, in the order a row holds them.
COLUMNS: tuple[Column, ...] = (
    # identity: the case's fields (declared in harness.core.cases) and the variant's declared facts
    _c("case_id", "string", "", "identity", "stable hash of the Case: variant, params and every axis below"),
    *(_c(name, ax.dtype, ax.unit, "identity", ax.help) for name, ax in AXES.items() if name == "variant"),
    _c("family", "string", "", "identity", "the variant's family (dense, local, sparse, linear …)"),
    _c("exact", "bool", "", "identity", "whether the variant computes exact softmax attention"),
    _c("baseline", "bool", "", "identity", "whether the variant declared itself a baseline the report compares "
       "others with (register_variant(..., baseline=True))"),
    *(_c(name, ax.dtype, ax.unit, "identity", ax.help) for name, ax in AXES.items() if name != "variant"),
    # outcome
    _c("status", "string", "", "outcome",
       "ok, incorrect (a wrong answer; its time is kept), skipped, error, oom, cuda_error, crash or timeout"),
    _c("reason", "string", "", "outcome", "why the case is not ok (empty when ok)"),
    _c("phase_note", "string", "", "outcome",
       "a step after timing (memory, flops, accuracy) that failed, and why: its columns are empty"),
    # time
    _c("time_ms", "float64", "ms", "time", "median time of one call (several processes: the median of their medians)"),
    _c("time_ms_p10", "float64", "ms", "time", "10th percentile of the samples"),
    _c("time_ms_p90", "float64", "ms", "time", "90th percentile of the samples"),
    _c("reps", "int64", "", "time", "timing samples taken"),
    _c("first_call_ms", "float64", "ms", "time", "the first call alone (compilation, autotuning); not in the median"),
    _c("time_ms_ci_low", "float64", "ms", "time", "lower end of the confidence interval of the median"),
    _c("time_ms_ci_high", "float64", "ms", "time", "upper end of the confidence interval of the median"),
    _c("time_ci_rel", "float64", "", "time", "half-width of that interval over the median (the precision reached)"),
    _c("timing_stop", "string", "", "time", "why sampling stopped (precision, time_budget, max_reps …)"),
    _c("input_sets", "int64", "", "time", "copies of the inputs the calls rotated through"),
    _c("timing_method", "string", "", "time", "perf_counter, cuda_events or cuda_graph"),
    _c("timing_note", "string", "", "time", "anything the timing's reader should know"),
    _c("host_ms", "float64", "ms", "time", "CUDA: CPU time spent issuing one call", report_extra=True),
    _c("host_bound", "bool", "", "time",
       "CUDA: issuing took about as long as the GPU work, so the events include host overhead"),
    # stability (harness.measure.stability)
    _c("processes", "int64", "", "stability", "fresh worker processes that timed the case, one round each"),
    _c("time_ms_process_min", "float64", "ms", "stability", "smallest per-process median"),
    _c("time_ms_process_max", "float64", "ms", "stability", "largest per-process median"),
    _c("time_process_spread", "float64", "", "stability",
       "(largest − smallest per-process median) / time_ms; empty with one process"),
    _c("stable", "bool", "", "stability",
       "whether the processes' intervals of the median (at least ±2.5%) all overlap; empty with one process"),
    _c("stability_note", "string", "", "stability", "why not stable: the modes, e.g. two modes: 8.4 ms (2 processes) "
       "and 41.4 ms (1 process); or the contention that made it so"),
    # contention (harness.measure.contention): other processes while the case was sampled; the largest
    # figure of the rounds kept
    _c("other_cpu_cores", "float64", "cores", "contention", "CPU time other processes used while the case was "
       "sampled, in cores' worth (system busy time less this worker's and its children's)", report_extra=True),
    _c("steal_pct", "float64", "%", "contention", "share of the machine's CPU time the hypervisor gave to other "
       "guests while the case was sampled", report_extra=True),
    _c("involuntary_switches_per_s", "float64", "1/s", "contention", "involuntary context switches of the "
       "worker's threads per second of sampling (preemptions)", report_extra=True),
    _c("cpu_cores", "int64", "", "contention", "cores the worker process may run on (its affinity)"),
    _c("gpu_other_processes", "int64", "", "contention", "CUDA: other processes with a context on the GPU while "
       "the case was sampled (NVML)"),
    _c("contended", "bool", "", "contention", "other processes took cores the worker's threads needed (or the "
       "hypervisor stole time, or another process used the GPU) in a round that was kept: the time is not the "
       "machine's; stable is false"),
    _c("contention_note", "string", "", "contention", "why contended, with the figures, e.g. other processes used "
       "0.98 of 2 cores while this case ran on 2 threads"),
    _c("discarded_rounds", "int64", "", "contention", "rounds re-run because they were contended ([run] contention = "
       "\"retry\"); each is kept in rounds.jsonl"),
    # work
    _c("flops", "float64", "FLOP", "work", "analytic FLOPs of one call (FlashAttention's convention)"),
    _c("tflops_per_s", "float64", "TFLOP/s", "work", "flops over the median time", derived=True),
    _c("flops_counted", "float64", "FLOP", "work", "FLOPs counted by FlopCounterMode (empty when it cannot)"),
    _c("flops_counted_ratio", "float64", "", "work", "flops_counted / flops", report_extra=True, derived=True),
    _c("flops_counted_note", "string", "", "work", "why flops_counted is empty or differs from the convention"),
    _c("useful_flops", "float64", "FLOP", "work", "FLOPs of the real (query, key) pairs, where flops counts "
       "padding (padded variable-length variants)", report_extra=True),
    _c("useful_fraction", "float64", "", "work", "useful_flops / flops", report_extra=True, derived=True),
    _c("tokens_per_s", "float64", "tokens/s", "work", "query tokens (all sequences) per second, for "
       "inference-shaped cases (decode: batch·q_len / time)", report_extra=True, derived=True),
    # layers (level = "layer": a whole attention layer on hidden states, harness.engine.layerrun)
    _c("d_model", "int64", "", "work",
       "layer width of an attention layer: heads · head_dim, or a model's hidden size (model = ...)",
       report_extra=True),
    _c("param_count", "int64", "", "work", "parameters of the layer module (exact, from the module)",
       report_extra=True),
    _c("projection_flops", "float64", "FLOP", "work", "the layer's projection FLOPs (part of flops)",
       report_extra=True),
    # distributed (level = "distributed": ranks of a process group, harness.engine.ranks)
    _c("world_size", "int64", "", "work", "ranks the case ran on (distributed variants)", report_extra=True),
    _c("comm_ms", "float64", "ms", "time", "the variant's communication alone, timed separately (median, "
       "slowest rank)", report_extra=True),
    _c("comm_bytes", "float64", "bytes", "work", "bytes sent between ranks in one call, all ranks together",
       report_extra=True),
    # roofline
    _c("min_bytes", "float64", "bytes", "roofline", "least traffic of a call: inputs read once, outputs written once"),
    _c("arith_intensity", "float64", "FLOP/byte", "roofline", "flops / min_bytes", derived=True),
    _c("peak_tflops_per_s", "float64", "TFLOP/s", "roofline", "measured matmul peak of its device and dtype"),
    _c("peak_gb_per_s", "float64", "GB/s", "roofline", "measured copy bandwidth of its device"),
    _c("pct_of_peak", "float64", "%", "roofline", "tflops_per_s as a percentage of peak_tflops_per_s", derived=True),
    _c("attainable_tflops_per_s", "float64", "TFLOP/s", "roofline", "min(peak, intensity · bandwidth)", derived=True),
    _c("roofline_note", "string", "", "roofline", "why the roofline columns are empty or approximate"),
    _c("kv_bytes", "float64", "bytes", "roofline", "bytes of the K/V cache a call must read (real tokens)",
       report_extra=True),
    _c("achieved_bandwidth", "float64", "bytes/s", "roofline", "kv_bytes over the median time",
       report_extra=True, derived=True),
    _c("pct_of_bandwidth", "float64", "%", "roofline", "achieved_bandwidth as a percentage of the measured "
       "copy bandwidth (peak_gb_per_s)", report_extra=True, derived=True),
    # telemetry
    _c("power_w", "float64", "W", "telemetry", f"mean board power during the case ({_TELEMETRY})", report_extra=True),
    _c("power_w_max", "float64", "W", "telemetry", "highest sampled board power", report_extra=True),
    _c("sm_clock_mhz", "float64", "MHz", "telemetry", "mean SM clock", report_extra=True),
    _c("sm_clock_mhz_min", "float64", "MHz", "telemetry", "lowest sampled SM clock", report_extra=True),
    _c("mem_clock_mhz", "float64", "MHz", "telemetry", "mean memory clock", report_extra=True),
    _c("temp_c_max", "float64", "°C", "telemetry", "highest sampled GPU temperature", report_extra=True),
    _c("gpu_util_pct", "float64", "%", "telemetry", "mean GPU utilisation", report_extra=True),
    _c("mem_util_pct", "float64", "%", "telemetry", "mean memory-controller utilisation", report_extra=True),
    _c("throttle_reasons", "string", "", "telemetry", "comma-separated NVML clock-event reasons seen"),
    _c("throttled", "bool", "", "telemetry", "a reason that makes the timing suspect was seen (samples or counters)"),
    _c("throttle_time_ms", "float64", "ms", "telemetry", "time NVML's violation counters grew during the timing",
       report_extra=True),
    _c("energy_j", "float64", "J", "telemetry", "energy of one call", report_extra=True),
    _c("tokens_per_joule", "float64", "tokens/J", "telemetry", "B·L / energy_j", report_extra=True, derived=True),
    _c("energy_source", "string", "", "telemetry", "energy_counter or power_integral"),
    _c("energy_power_w", "float64", "W", "telemetry", "mean board power during the energy loop", report_extra=True),
    _c("energy_throttled", "bool", "", "telemetry", "the energy loop (not the timing) was throttled"),
    _c("telemetry_samples", "int64", "", "telemetry", "NVML samples taken during the case"),
    _c("telemetry_note", "string", "", "telemetry", "why telemetry is empty or partial"),
    # memory
    _c("peak_mem_bytes", "float64", "bytes", "memory", "peak memory of one call beyond what existed before it"),
    _c("working_set_bytes", "float64", "bytes", "memory", "the variant's own estimate of its working set"),
    _c("kv_cache_bytes_per_token", "float64", "bytes", "memory", "KV-cache bytes one token adds to one layer "
       "(attention layers), in the cache dtype", report_extra=True),
    _c("peak_mem_bytes_rank_min", "float64", "bytes", "memory", "distributed: the smallest rank's peak memory "
       "(peak_mem_bytes is the largest rank's)", report_extra=True),
    # accuracy
    _c("max_abs_err", "float64", "", "accuracy", "largest absolute error against the float64 reference"),
    _c("rel_err", "float64", "", "accuracy", "‖out − ref‖_F / ‖ref‖_F"),
    _c("grad_rel_err", "float64", "", "accuracy", "largest rel_err of dq, dk, dv (backward modes, L ≤ 2048)"),
    # environment
    _c("threads", "int64", "", "environment", "torch intra-op threads"),
    _c("host", "string", "", "environment", "host name of the machine the case ran on"),
    _c("machine_fingerprint", "string", "", "environment", "fingerprint of that machine (CPU, cores, memory, "
       "GPU; as run.json's): a run across several machines is reported and compared per machine"),
    # added when the row is recorded
    _c("run_id", "string", "", "identity", "the run the row belongs to", per_case=False),
    _c("suite", "string", "", "identity", "the suite's name", per_case=False),
    _c("attempt_id", "string", "", "record", "pairs a row with its samples in the logs", per_case=False),
)

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
#: The columns that say which case a row is (``Case`` fields, ``case_id``, the variant's description).
IDENTITY: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.group == "identity" and c.per_case)
#: The columns harness.measure.derive computes from the others (:attr:`Column.derived`).
DERIVED: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.derived)

#: Values a row starts with that are not its column's missing value.
_START = {"status": "ok", "reason": "", "reps": 0}

_PY_TYPES = {"string": (str,), "int64": (int,), "float64": (int, float), "bool": (bool,)}


def names(group: str | None = None, *, per_case: bool | None = None) -> tuple[str, ...]:
    """Declared column names, in row order; of one ``group`` and/or only per-case ones if asked."""
    return tuple(c.name for c in columns(group, per_case=per_case))


def columns(group: str | None = None, *, per_case: bool | None = None) -> tuple[Column, ...]:
    """Declared columns, in row order; of one ``group`` and/or only per-case ones if asked."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown column group {group!r} (one of {', '.join(GROUPS)})")
    return tuple(c for c in COLUMNS if (group is None or c.group == group)
                 and (per_case is None or c.per_case == per_case))


def group_of(name: str) -> str:
    """The group of a column; ``extra`` for a column this schema does not declare (a variant's)."""
    col = BY_NAME.get(name)
    return col.group if col else EXTRA


def unit(name: str) -> str:
    """The unit of a declared column (``""`` for none or for an undeclared column)."""
    col = BY_NAME.get(name)
    return col.unit if col else ""


def missing(group: str) -> dict[str, Any]:
    """Every per-case column of ``group`` with its missing value (NaN or None)."""
    return {c.name: c.missing for c in columns(group, per_case=True)}


def empty_row() -> dict[str, Any]:
    """Every per-case column, unmeasured: status ``ok``, no reason, no samples, the rest missing."""
    return {c.name: _START.get(c.name, c.missing) for c in COLUMNS if c.per_case}


def base_row(case: Case, family: str | None = None, exact: bool | None = None, threads: int | None = None, *,
             baseline: bool | None = None) -> dict[str, Any]:
    """The row of ``case`` before anything is measured: its identity filled in, the rest empty."""
    row = empty_row()
    row.update(case.values(), case_id=case.case_id, params=case.params_json, family=family, exact=exact,
               baseline=baseline, threads=threads)
    return row


def row_problems(row: dict[str, Any]) -> list[str]:
    """Values of declared columns whose type is not the declared dtype (missing values are fine),
    and per-case columns the row lacks; one line each (empty: the row fits the schema)."""
    problems = [f"{c.name}: missing" for c in COLUMNS if c.per_case and c.name not in row]
    for name, value in row.items():
        col = BY_NAME.get(name)
        if col is None or is_missing(value):
            continue
        ok = isinstance(value, _PY_TYPES[col.dtype]) and not (col.dtype in ("int64", "float64")
                                                             and isinstance(value, bool))
        if not ok:
            problems.append(f"{name}: {type(value).__name__} {value!r} is not {col.dtype}")
    return problems


def arrow_type(dtype: str):
    """The pyarrow type of a declared dtype (strings as ``large_string``, as pandas writes them)."""
    import pyarrow as pa

    return {"string": pa.large_string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}[dtype]


def arrow_schema(frame) -> Any:
    """The pyarrow schema to write a pandas frame of rows with: declared columns with their declared
    types (missing values as nulls), any other column (a variant's) with the type pyarrow infers.

    A declared column whose values do not convert keeps its inferred type too, so that writing a
    run's table never fails on one odd value (:func:`row_problems` is the check that finds it)."""
    import pyarrow as pa

    fields = []
    for name in frame.columns:
        col = BY_NAME.get(name)
        kind = None
        if col is not None:
            try:
                kind = pa.Array.from_pandas(frame[name], type=arrow_type(col.dtype)).type
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                kind = None
        fields.append(pa.field(name, kind if kind is not None else pa.Array.from_pandas(frame[name]).type))
    return pa.schema(fields)


@dataclass
class CaseResult:
    """What running one case gives: its result row and its raw timing samples (seconds)."""

    row: dict[str, Any]
    samples_s: list[float]
    #: why the process that ran it must not run another case (a poisoned CUDA context); "" when it may
    restart: str = ""
