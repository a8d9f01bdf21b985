"""What the run ran on: machine, library versions, project commit, and a machine fingerprint."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    import torch  # here, not above: pin_allocator and ALLOCATOR_ENV are read by torch-free callers

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
        for x in (machine["cpu_model"], machine["cpu_count"], machine["memory_bytes"], gpu.get("name"), gpu.get("count"))
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


#: PyTorch's switch for page-aligned (and transparent-huge-page) CPU allocations of 2 MiB and more.
ALLOCATOR_ENV = "THP_MEM_ALLOC_ENABLE"


def pin_allocator() -> None:
    """Make large CPU allocations page-aligned in this process and its workers, unless the user chose.

    CPU BLAS speed depends on where in a page its operands start, and glibc places a large
    temporary wherever its heap has room: on this project's 2-core EPYC test VM, ``sdpa``
    (math backend) at L=1024 took 22.5 or 41-44 ms per round of the same case, and ``naive``
    16.5 or 33 ms, by the luck of where the score matrices landed, changing from round to
    round and process to process. With ``THP_MEM_ALLOC_ENABLE=1`` PyTorch aligns every CPU
    allocation of 2 MiB or more to a page and advises huge pages for it; the same cases then
    took 26.8-27.8 and 20.2-21.7 ms in each of 16 rounds, with the heap deliberately shuffled.
    An explicit setting in the environment (``THP_MEM_ALLOC_ENABLE=0`` to measure the lottery)
    is left alone; run.json records it.
    """
    os.environ.setdefault(ALLOCATOR_ENV, "1")


def capture() -> dict[str, Any]:
    """Everything run.json records about the environment."""
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
        "allocator": {ALLOCATOR_ENV: os.environ.get(ALLOCATOR_ENV)},
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
