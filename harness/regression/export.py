"""Exporting a run to pytest-benchmark's JSON format, and the names both sides share.

Every ``ok`` row of a run becomes one pytest-benchmark benchmark whose statistics are
computed by pytest-benchmark's own :class:`pytest_benchmark.stats.Stats` from the run's raw
timing samples (seconds, one call per sample, ``iterations = 1``). The benchmark is named
exactly as ``tests/benchmarks/test_attention.py`` names the same case
(:func:`benchmark_id`, :func:`benchmark_group`), so an exported run and a
``pytest --benchmark-only`` run can be compared case by case with
``pytest-benchmark compare`` or ``--benchmark-compare``.

Rows without samples (skipped, error, crash …) have no timing to export and are left out;
:func:`export_pytest_benchmark` says how many.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from harness.core import schema
from harness.core.cases import decode_params
from harness.core.errors import UserError
from harness.engine import store

#: The test that runs the same cases under pytest-benchmark (``tests/benchmarks``).
BENCHMARK_MODULE = "tests/benchmarks/test_attention.py"
BENCHMARK_TEST = "test_attention"

#: Row fields copied into each benchmark's ``extra_info``: the case's identity (with its run) and the
#: figures pytest-benchmark's statistics of the samples do not give (:mod:`harness.core.schema`).
EXTRA_FIELDS = (
    *schema.names("identity"), "first_call_ms", "flops", "tflops_per_s", *schema.names("memory"),
    *schema.names("accuracy"), "pct_of_peak", "arith_intensity", *schema.names("environment"),
)


class ExportError(UserError):
    """A run cannot be exported (one line for the user)."""


def _params(params) -> dict[str, Any]:
    return decode_params(params)


def _get(case, key):
    return case[key] if isinstance(case, dict) else getattr(case, key)


def benchmark_id(case) -> str:
    """The pytest parameter id of a case (a :class:`~harness.core.cases.Case` or a result row).

    ``sdpa(backend=flash)-cpu-float32-fwd-B1-H8-L256-D64-causal``: variant and its parameters,
    device, dtype, mode, shape (``H8/2`` for grouped-query), causal, and the inputs when not gaussian.
    """
    params = _params(_get(case, "params"))
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    variant = _get(case, "variant")
    head = f"{variant}({inner})" if inner else variant
    heads, kv = int(_get(case, "heads")), int(_get(case, "kv_heads"))
    parts = [head, _get(case, "device"), _get(case, "dtype"), _get(case, "mode"), f"B{int(_get(case, 'batch'))}",
             f"H{heads}" + (f"/{kv}" if kv != heads else ""), f"L{int(_get(case, 'seq_len'))}",
             f"D{int(_get(case, 'head_dim'))}"]
    if bool(_get(case, "causal")):
        parts.append("causal")
    if _get(case, "inputs") != "gaussian":
        parts.append(str(_get(case, "inputs")))
    return re.sub(r"\s+", "", "-".join(str(p) for p in parts))


def benchmark_group(case) -> str:
    """The pytest-benchmark group of a case: everything but the variant, so variants line up."""
    heads, kv = int(_get(case, "heads")), int(_get(case, "kv_heads"))
    text = (f"{_get(case, 'device')} {_get(case, 'dtype')} {_get(case, 'mode')} B{int(_get(case, 'batch'))} "
            f"H{heads}{'/' + str(kv) if kv != heads else ''} L{int(_get(case, 'seq_len'))} "
            f"D{int(_get(case, 'head_dim'))}"
            f"{' causal' if bool(_get(case, 'causal')) else ''}")
    if _get(case, "inputs") != "gaussian":
        text += f" {_get(case, 'inputs')}"
    return text


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _machine_info(meta: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's machine_info for the run's machine (its own generator when run here)."""
    env = meta.get("environment") or {}
    machine = env.get("machine") or {}
    versions = env.get("versions") or {}
    info: dict[str, Any] = {}
    try:
        from harness.measure.environment import fingerprint
        from harness.measure.environment import machine as this_machine

        here = this_machine()
        if machine.get("fingerprint") and fingerprint(here) == machine.get("fingerprint"):
            from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info

            info = pytest_benchmark_generate_machine_info()
    except Exception:
        info = {}
    if not info:
        plat = machine.get("platform") or ""
        info = {
            "node": machine.get("hostname"),
            "processor": machine.get("cpu_model"),
            "machine": "x86_64" if "x86_64" in plat else (plat.split("-")[-2] if plat.count("-") >= 2 else None),
            "python_implementation": "CPython",
            "python_version": versions.get("python"),
            "system": plat.split("-")[0] if plat else None,
            "release": plat.split("-")[1] if plat.count("-") >= 1 else None,
            "cpu": {"brand_raw": machine.get("cpu_model"), "count": machine.get("cpu_count"),
                    "flags": machine.get("cpu_flags") or []},
        }
    return info


def _bench_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What pytest-benchmark's machine_info has no place for (kept apart, so that on the same machine
    machine_info equals pytest-benchmark's own and ``--benchmark-compare`` does not warn)."""
    env = meta.get("environment") or {}
    machine = env.get("machine") or {}
    versions = env.get("versions") or {}
    return {"run_id": meta.get("run_id"), "suite": (meta.get("suite") or {}).get("name"), "status": meta.get("status"),
            "fingerprint": machine.get("fingerprint"), "cpu_model": machine.get("cpu_model"), "gpu": machine.get("gpu"),
            "torch": versions.get("torch"), "cuda": versions.get("cuda"), "threads": env.get("threads")}


def _commit_info(meta: dict[str, Any]) -> dict[str, Any]:
    git = (meta.get("environment") or {}).get("git") or {}
    return {"id": git.get("commit"), "time": None, "author_time": None, "dirty": bool(git.get("dirty")),
            "project": "attention-bench", "branch": git.get("branch")}


def run_to_pytest_benchmark(run_dir: str | Path) -> tuple[dict[str, Any], int]:
    """The pytest-benchmark JSON document of a run, and how many rows had no samples to export."""
    try:
        from pytest_benchmark import __version__ as pb_version
        from pytest_benchmark.stats import Stats
    except ImportError:
        raise ExportError("the pytest-benchmark format needs the pytest-benchmark package "
                          "(pip install pytest-benchmark)") from None
    run_dir = Path(run_dir)
    meta = store.read_meta(run_dir)
    rows = store.read_results(run_dir)
    samples = store.read_samples(run_dir)
    order = [c for c in ("process", "rep") if c in samples]  # samples of several worker processes, in turn
    by_case = {cid: g.sort_values(order, kind="stable")["time_ms"].to_numpy() / 1e3
               for cid, g in samples.groupby("case_id")}
    timing = meta.get("timing") or {}
    benchmarks = []
    left_out = 0
    for row in rows.sort_values(["variant", "params", "seq_len"], kind="stable").to_dict("records"):
        data = by_case.get(row["case_id"])
        if row.get("status") != "ok" or data is None or len(data) == 0:
            left_out += 1
            continue
        stats = Stats()
        for s in data:
            stats.update(float(s))
        stats_dict = {k: _clean(v) for k, v in stats.as_dict().items()}
        stats_dict["data"] = [float(s) for s in data]
        stats_dict["iterations"] = 1
        pid = benchmark_id(row)
        params = {"case": pid}
        benchmarks.append(
            {
                "group": benchmark_group(row),
                "name": f"{BENCHMARK_TEST}[{pid}]",
                "fullname": f"{BENCHMARK_MODULE}::{BENCHMARK_TEST}[{pid}]",
                "params": params,
                "param": pid,
                "extra_info": {k: _clean(row.get(k)) for k in EXTRA_FIELDS if k in row},
                "options": {
                    "disable_gc": False,
                    "timer": "cuda_event" if str(row.get("device", "")).startswith("cuda") else "perf_counter",
                    "min_rounds": timing.get("min_reps"),
                    "max_time": timing.get("min_time_s"),
                    "min_time": None,
                    "warmup": bool(timing.get("warmup")),
                },
                "stats": stats_dict,
            }
        )
    document = {
        "machine_info": _machine_info(meta),
        "commit_info": _commit_info(meta),
        "benchmarks": benchmarks,
        "datetime": meta.get("started"),
        "version": pb_version,
        "attention_bench": _bench_info(meta),
    }
    return document, left_out


def storage_path(storage: str | Path, run_id: str) -> Path:
    """Where pytest-benchmark's file storage keeps the next run: ``STORAGE/<machine id>/NNNN_<run_id>.json``.

    ``pytest --benchmark-compare`` (no number: the latest) and ``--benchmark-compare=NNNN`` find it there.
    """
    from pytest_benchmark.utils import get_machine_id

    folder = Path(storage) / get_machine_id()
    numbers = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")] if folder.is_dir() else []
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id or "run")
    return folder / f"{max(numbers, default=0) + 1:04d}_{safe}.json"


def export_pytest_benchmark(run_dir: str | Path, out: str | Path | None = None,
                            storage: str | Path | None = None) -> tuple[Path | None, int, int]:
    """Write the run as pytest-benchmark JSON to ``out`` (``-``: stdout), into pytest-benchmark's
    ``storage`` folder, or by default to ``RUN_DIR/pytest-benchmark.json``.

    Returns ``(path or None for stdout, benchmarks written, rows left out)``.
    """
    document, left_out = run_to_pytest_benchmark(run_dir)
    text = json.dumps(document, indent=2, allow_nan=False)
    if str(out) == "-":
        import sys

        sys.stdout.write(text + "\n")
        return None, len(document["benchmarks"]), left_out
    if storage is not None:
        path = storage_path(storage, document["attention_bench"]["run_id"])
    else:
        path = Path(out) if out else Path(run_dir) / "pytest-benchmark.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(path, text + "\n")  # never through a symlink the run directory holds
    return path, len(document["benchmarks"]), left_out

