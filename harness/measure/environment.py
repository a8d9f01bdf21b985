"""What the run ran on: machine, library versions, project commit, a machine fingerprint, and how it
measured (allocator and threading variables, threads, CPU affinity and governor; :func:`measurement`)."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.core.config import ALLOCATOR_ENV  # PyTorch's switch for page-aligned, huge-page CPU allocations

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that matter to attention kernels (AVX2, AVX-512, AMX, BF16...)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _size_bytes(text: str) -> int | None:
    """'32768K' / '1M' / '512' (sysfs cache sizes) in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]


def cpu_caches(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, int]:
    """Sizes of the CPU's data and unified caches as seen by one core, e.g. {'L1d': ..., 'L2': ..., 'L3': ...}.

    Linux sysfs only; an empty dict elsewhere. (The last level is usually shared by
    several cores; sysfs reports its full size.)
    """
    caches: dict[str, int] = {}
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = (index / "level").read_text().strip()
            size = _size_bytes((index / "size").read_text())
            if size:
                caches[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    except OSError:
        pass
    return caches


def llc_bytes() -> int | None:
    """Size of the CPU's last-level cache, or None when unknown."""
    caches = cpu_caches()
    if not caches:
        return None
    return caches[max(caches, key=lambda name: (int(name[1]), name))]


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_memory_bytes()


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The project's commit and whether its tree was dirty (None when not a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty, "root": str(root) if commit is not None else None}


def gpu_info() -> dict[str, Any] | None:
    import torch  # here, not above: allocator_env and ALLOCATOR_ENV are read by torch-free callers

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_bytes": props.total_memory,
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "sm_count": props.multi_processor_count,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVML missing or unusable: say so rather than fail
        info["driver"] = f"unknown ({type(exc).__name__})"
        return info
    try:
        for key, query in (
            ("driver", pynvml.nvmlSystemGetDriverVersion),
            ("nvml", pynvml.nvmlSystemGetNVMLVersion),
            ("cuda_driver_api", pynvml.nvmlSystemGetCudaDriverVersion),
        ):
            try:
                value = query()
                info[key] = value if isinstance(value, int) else _text(value)
            except Exception as exc:
                info[key] = f"unknown ({type(exc).__name__})"
    finally:
        pynvml.nvmlShutdown()
    try:
        info["record"] = gpu_record()
    except Exception as exc:  # never let the record break a run
        info["record"] = {"unavailable": [f"{type(exc).__name__}: {exc}"]}
    return info


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cudnn_version() -> int | None:
    import torch

    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        return None


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def fingerprint(machine: dict[str, Any]) -> str:
    """A short hash of what makes two machines comparable (CPU, cores, memory, GPU)."""
    gpu = machine.get("gpu") or {}
    key = "|".join(
        str(x)
        for x in (machine["cpu_model"], machine["cpu_count"], machine["memory_bytes"], gpu.get("name"),
                  gpu.get("count"))
    )
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def machine() -> dict[str, Any]:
    """The machine part of :func:`capture` (CPU, caches, memory, GPU) with its fingerprint."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cpu_caches": cpu_caches(),
        "memory_bytes": total_memory_bytes(),
        "gpu": gpu_info(),
    }
    info["fingerprint"] = fingerprint(info)
    return info


_HOST: dict[str, str] = {}


def host_identity() -> dict[str, str]:
    """The ``host`` and ``machine_fingerprint`` columns of the rows this process records (this
    machine as :func:`machine` sees it; computed once per process)."""
    if not _HOST:
        info = machine()
        _HOST.update(host=str(info["hostname"]), machine_fingerprint=str(info["fingerprint"]))
    return dict(_HOST)


#: ``[run] allocator``: what each choice sets in the worker processes (nothing, by default).
ALLOCATORS: dict[str, dict[str, str]] = {"default": {}, "thp": {ALLOCATOR_ENV: "1"}}
#: Variables that change how CPU kernels run (allocator, threading): recorded when present.
MEASUREMENT_PREFIXES = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "MALLOC_")
MEASUREMENT_VARIABLES = ("LD_PRELOAD", ALLOCATOR_ENV)


def allocator_env(choice: str) -> dict[str, str]:
    """The variables ``[run] allocator = choice`` sets in the worker processes.

    ``default`` sets none: the workers measure in the user's environment, as
    ``torch.utils.benchmark`` and ``triton.testing.do_bench`` measure in their caller's.
    ``thp`` sets ``THP_MEM_ALLOC_ENABLE=1``: PyTorch then aligns every CPU allocation of 2 MiB
    or more to a page and advises huge pages for it. That takes the luck out of where the large
    temporaries land (CPU BLAS speed depends on where in a page its operands start: on this
    project's 2-core VM ``sdpa`` (math) at L=1024 took 22.5 or 41-44 ms from one process to the
    next), but it is not what a user's program gets: with it, on a 2-core VM, ``sdpa`` (math) at
    L=2048, H=8 measured 118-125 ms where ``torch.utils.benchmark`` in a plain process measured
    170-182 ms (issue 12). Hence an option, recorded in run.json, never a default; the variation
    from process to process that it hid is now measured instead (``[timing] processes``)."""
    return dict(ALLOCATORS[choice])


def is_measurement_variable(name: str) -> bool:
    """Whether environment variable ``name`` changes how CPU kernels run (see :func:`measurement`)."""
    return name in MEASUREMENT_VARIABLES or name.startswith(MEASUREMENT_PREFIXES)


def cpu_governors(root: Path = Path("/sys/devices/system/cpu")) -> list[str] | None:
    """The CPU frequency governors in use (each distinct one once), or None where not readable."""
    found = set()
    for path in root.glob("cpu[0-9]*/cpufreq/scaling_governor"):
        try:
            found.add(path.read_text().strip())
        except OSError:
            continue
    return sorted(found) or None


def measurement(allocator: str = "default", environ: dict[str, str] | None = None) -> dict[str, Any]:
    """How the workers measure (run.json's ``environment.measurement``): the allocator choice and
    the effective ``THP_MEM_ALLOC_ENABLE`` (None: unset), every allocator or threading variable
    present (``LD_PRELOAD``, ``MALLOC_*``, ``OMP_*``, ``MKL_*``, ``KMP_*``, ``OPENBLAS_*``,
    ``GOMP_*``), torch's intra-op thread count, this process's CPU affinity, and the CPU frequency
    governors where readable."""
    import torch

    env = dict(os.environ if environ is None else environ)
    env.update(allocator_env(allocator))
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "allocator": allocator,
        ALLOCATOR_ENV: env.get(ALLOCATOR_ENV),
        "variables": {k: env[k] for k in sorted(env) if is_measurement_variable(k) and k != ALLOCATOR_ENV},
        "threads": torch.get_num_threads(),
        "cpu_affinity": affinity,
        "cpu_governor": cpu_governors(),
    }


def recorded_allocator_env(environment: dict[str, Any]) -> dict[str, str]:
    """The allocator variable a run's workers had (from its run.json ``environment``), to set it
    again when the run is re-measured; empty when it was unset. Runs from before
    ``environment.measurement`` recorded it under ``allocator``."""
    record = environment.get("measurement")
    if isinstance(record, dict):
        value = record.get(ALLOCATOR_ENV)
    else:
        value = (environment.get("allocator") or {}).get(ALLOCATOR_ENV)
    return {ALLOCATOR_ENV: str(value)} if value is not None else {}


def capture(allocator: str = "default") -> dict[str, Any]:
    """Everything run.json records about the environment (``allocator``: the run's ``[run] allocator``)."""
    import torch

    machine_info = machine()
    return {
        "machine": machine_info,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": cudnn_version(),
            "triton": triton_version(),
            "harness": __import__("harness").__version__,
        },
        "threads": torch.get_num_threads(),
        "measurement": measurement(allocator),
        "git": git_commit(),
        "telemetry": _telemetry_availability(machine_info),
    }


def _telemetry_availability(machine_info: dict[str, Any]) -> dict[str, Any]:
    """Whether NVML telemetry (power, clocks, energy) can be recorded, and why not."""
    try:
        from harness.measure.telemetry import availability

        return availability("cuda" if machine_info.get("gpu") else "cpu")
    except Exception as exc:  # never let telemetry break a run
        return {"available": False, "reason": f"telemetry check failed: {type(exc).__name__}: {exc}"}


# -- the GPU's settings: what a GPU figure means ---------------------------------------------------


def precision_flags() -> dict[str, Any]:
    """PyTorch's settings that change what a float32 or half-precision matmul computes: TF32 for
    float32 matmuls and cuDNN, ``torch.get_float32_matmul_precision()``, and reduced-precision
    reductions in float16/bfloat16 GEMMs (a float32 TFLOP/s figure means nothing without them).
    Recorded in the ``bench`` process; a plugin that changes them in the worker changes its own."""
    import torch

    flags: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    matmul = torch.backends.cuda.matmul
    for key, get in (("cuda_matmul_allow_tf32", lambda: matmul.allow_tf32),
                     ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                     ("fp16_reduced_precision_reduction", lambda: matmul.allow_fp16_reduced_precision_reduction),
                     ("bf16_reduced_precision_reduction", lambda: matmul.allow_bf16_reduced_precision_reduction)):
        try:
            flags[key] = bool(get())
        except Exception:  # a torch without the switch
            flags[key] = None
    return flags


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gpu_record(nvml=None, handle=None, warn=_warn) -> dict[str, Any]:
    """What is needed to interpret a GPU's numbers, beyond its name: :func:`precision_flags`, and from
    NVML the GPU's UUID, enforced power limit, application clocks (the default and the maximum
    beside them: clocks set or locked below the maximum show here and as the ``app_clocks``
    clock-event reason), persistence, ECC and MIG modes, and the other processes using it — with a
    one-line warning through ``warn`` when there are any, since their load is in every timing.
    ``nvml`` (a pynvml-like module) and ``handle`` are injectable for tests; a query NVML cannot
    answer is left out and listed under ``unavailable``."""
    record: dict[str, Any] = {"precision": precision_flags()}
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            record["unavailable"] = ["nvidia-ml-py is not installed"]
            return record
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as exc:
        record["unavailable"] = [f"NVML ({type(exc).__name__})"]
        return record
    try:
        if handle is None:
            import torch

            from harness.measure.telemetry import _nvml_handle

            handle = _nvml_handle(nvml, torch.cuda.current_device())
        _nvml_settings(nvml, handle, record)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    others = record.get("other_processes")
    if others:
        pids = ", ".join(f"{p['pid']} ({(p['used_memory_bytes'] or 0) / 2**30:.1f} GiB)" for p in others)
        warn(f"warning: another process uses this GPU ({record.get('uuid', '?')}): pid {pids}; "
             "its load is in every timing of this run")
    return record


def _nvml_settings(nv, h, record: dict[str, Any]) -> None:
    unavailable: list[str] = []

    def ask(name, fn):
        try:
            return fn()
        except Exception:
            unavailable.append(name)
            return None

    sm, mem = getattr(nv, "NVML_CLOCK_SM", 1), getattr(nv, "NVML_CLOCK_MEM", 2)
    uuid = ask("uuid", lambda: nv.nvmlDeviceGetUUID(h))
    limit = ask("power_limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    persistence = ask("persistence_mode", lambda: nv.nvmlDeviceGetPersistenceMode(h))
    ecc = ask("ecc_mode", lambda: nv.nvmlDeviceGetEccMode(h))
    mig = ask("mig_mode", lambda: nv.nvmlDeviceGetMigMode(h))
    record.update(
        uuid=_text(uuid) if uuid is not None else None,
        power_limit_w=limit / 1000.0 if limit is not None else None,
        persistence_mode=bool(persistence) if persistence is not None else None,
        ecc_mode=bool(ecc[0]) if ecc is not None else None,
        mig_mode=bool(mig[0]) if mig is not None else None,
    )
    for key, fn in (("applications_clocks_mhz", "nvmlDeviceGetApplicationsClock"),
                    ("default_applications_clocks_mhz", "nvmlDeviceGetDefaultApplicationsClock"),
                    ("max_clocks_mhz", "nvmlDeviceGetMaxClockInfo")):
        query = getattr(nv, fn, None)
        if query is None:
            continue
        clocks = {"sm": ask(key, lambda q=query: q(h, sm)), "mem": ask(key, lambda q=query: q(h, mem))}
        record[key] = clocks if None not in clocks.values() else None
    me = os.getpid()
    procs = []
    for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        got = ask("processes", lambda f=fn: getattr(nv, f)(h)) or []
        procs += [{"pid": int(p.pid), "used_memory_bytes": getattr(p, "usedGpuMemory", None)}
                  for p in got if int(p.pid) != me]
    record["other_processes"] = list({p["pid"]: p for p in procs}.values())
    if unavailable:
        record["unavailable"] = sorted(set(unavailable))
