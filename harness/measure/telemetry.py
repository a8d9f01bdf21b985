"""NVML telemetry of a case: power, clocks, temperature, utilisation, throttling, energy.

On an NVIDIA GPU, :class:`Sampler` is a context manager that samples NVML
(``nvidia-ml-py``) from a background thread while a case runs and, with
:meth:`Sampler.measure_energy`, measures the energy of one call. Afterwards
``sampler.columns`` holds the row's telemetry columns (:data:`COLUMNS`).

Energy per call comes from the GPU's total-energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver loaded;
Volta and later), read after every short batch of back-to-back calls. The counter
does not move continuously: it steps when the driver's power reading updates (every
100 ms on A100 and H100, Yang et al., "Part-time Power Measurements", arXiv:2312.02741),
so a loop timed from its own start and end would carry up to one step of error at
each end (±40% for a 0.25 s loop). Instead the energy is taken between the first and
the last steps the loop sees, divided by the calls made between them: whole update
periods, however short the loop. The loop runs until those steps span ``min_time_s``
(:data:`ENERGY_MIN_TIME_S`, 0.2 s by default: a fixed cost of every case, so kept short)
or ``max_time_s`` has passed. Where the counter is not supported (or never stepped) the
counter's difference over the loop, or the sampled power integrated over it, is used
instead (``energy_source = "power_integral"``). ``tokens_per_joule`` (B·L / ``energy_j``) is
derived from it in the parent (harness.measure.derive).

**Two windows.** The timing and the energy loop are separate windows
(:meth:`Sampler.window`; :meth:`Sampler.measure_energy` opens its own): the power,
clock, temperature, utilisation and throttle columns describe the timing window
alone; the energy loop (back-to-back calls, which may heat the GPU more than the
timing did) gives ``energy_j`` (and so ``tokens_per_joule``), its own mean
power (``energy_power_w``) and whether it throttled (``energy_throttled``).

A case is ``throttled`` when NVML reported, during the timing window, a clock
reduction for a reason that makes its timing suspect: software power cap, hardware
slowdown, hardware or software thermal slowdown, or power brake (GPU idle,
application clock settings and sync boost are reported in ``throttle_reasons`` but
do not set the flag) — either in a sample (every ``interval_s``, 50 ms by default,
which misses short cases) or in NVML's cumulative violation counters
(``nvmlDeviceGetViolationStatus``: nanoseconds spent held below the requested clocks
by power, thermal, board-limit or reliability policies), read when the timing window
opens and closes, whose growth is ``throttle_time_ms`` and names the policy in
``throttle_reasons`` (``power_violation``, ...).

Everywhere else (a CPU case, no GPU, NVML missing or failing) the columns are
empty (None) and ``telemetry_note`` says why; nothing here raises because
telemetry is unavailable. :func:`availability` gives the same answer for
``run.json``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from harness.core import schema

#: The telemetry columns every row gets (None where not measured): the schema's ``telemetry`` group.
COLUMNS = schema.names("telemetry")

#: The energy loop: counter steps spanning at least this long (s) end it; it never runs past
#: ENERGY_MAX_TIME_S; its batches grow until one takes ENERGY_BATCH_S (the error at each step).
ENERGY_MIN_TIME_S = 0.2
ENERGY_MAX_TIME_S = 1.0
ENERGY_BATCH_S = 0.005

#: NVML clock-event reason bits (stable values of nvml.h), with our names.
REASON_BITS = {
    "gpu_idle": ("nvmlClocksEventReasonGpuIdle", 0x1),
    "app_clocks": ("nvmlClocksEventReasonApplicationsClocksSetting", 0x2),
    "sw_power_cap": ("nvmlClocksEventReasonSwPowerCap", 0x4),
    "hw_slowdown": ("nvmlClocksEventReasonHwSlowdown", 0x8),
    "sync_boost": ("nvmlClocksEventReasonSyncBoost", 0x10),
    "sw_thermal": ("nvmlClocksEventReasonSwThermalSlowdown", 0x20),
    "hw_thermal": ("nvmlClocksEventReasonHwThermalSlowdown", 0x40),
    "hw_power_brake": ("nvmlClocksEventReasonHwPowerBrakeSlowdown", 0x80),
    "display_clock": ("nvmlClocksEventReasonDisplayClockSetting", 0x100),
}
#: Reasons that make a timing suspect.
THROTTLING = ("sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")
#: NVML performance policies whose cumulative violation time means the clocks were held down:
#: our name -> (nvml.h constant, its stable value).
VIOLATION_POLICIES = {
    "power_violation": ("NVML_PERF_POLICY_POWER", 0),
    "thermal_violation": ("NVML_PERF_POLICY_THERMAL", 1),
    "board_limit_violation": ("NVML_PERF_POLICY_BOARD_LIMIT", 3),
    "reliability_violation": ("NVML_PERF_POLICY_RELIABILITY", 5),
}


def empty_columns(note: str) -> dict[str, Any]:
    cols: dict[str, Any] = {c: None for c in COLUMNS}
    cols["telemetry_note"] = note
    return cols


def _import_nvml():
    """(pynvml module, None) or (None, reason)."""
    try:
        import pynvml
    except ImportError as exc:
        return None, f"nvidia-ml-py is not installed ({exc})"
    return pynvml, None


def unavailable_reason(device: str, nvml=None) -> str | None:
    """Why NVML telemetry cannot be recorded for ``device`` (None when it can)."""
    if not device.startswith("cuda"):
        return f"no NVML telemetry for {device} cases (NVIDIA GPUs only)"
    if nvml is None:
        nvml, why = _import_nvml()
        if nvml is None:
            return why
        try:
            import torch

            if not torch.cuda.is_available():
                return "CUDA is not available on this machine"
        except Exception as exc:
            return f"torch.cuda unusable ({type(exc).__name__})"
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return f"NVML could not be initialised ({type(exc).__name__}: {exc})"
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass
    return None


def availability(device: str = "cuda") -> dict[str, Any]:
    """For run.json: whether telemetry is recorded, and why not (``device="cpu"``: a machine
    without a CUDA GPU)."""
    if device.startswith("cuda"):
        why = unavailable_reason(device)
    else:
        why = "no NVIDIA GPU on this machine (NVML telemetry is GPU-only)"
    info: dict[str, Any] = {"available": why is None, "reason": why or ""}
    if why is None:
        nvml, _ = _import_nvml()
        try:
            nvml.nvmlInit()
            info["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
            nvml.nvmlShutdown()
        except Exception:
            pass
    else:
        info["reason"] = f"{why}; telemetry columns are empty"
    return info


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(nvml, index: int):
    """NVML's handle for torch's CUDA device ``index`` (NVML numbers all GPUs, ignoring
    CUDA_VISIBLE_DEVICES; match by PCI bus id when torch gives one, else by the visible list)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
        bus = getattr(props, "pci_bus_id", None)
        domain = getattr(props, "pci_domain_id", 0)
        device = getattr(props, "pci_device_id", 0)
        if bus is not None:
            return nvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{device:02x}.0")
    except Exception:
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(index)


class Sampler:
    """Samples NVML in a background thread while the ``with`` block runs.

    ``nvml`` (a pynvml-like module), ``index`` (the NVML handle's index), ``sync``
    and ``clock`` are injectable for tests; by default they are pynvml, the device's
    own index, ``torch.cuda.synchronize`` and ``time.perf_counter``.
    """

    def __init__(
        self,
        device: str = "cpu",
        interval_s: float = 0.05,
        nvml=None,
        index: int | None = None,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.device = device
        self.interval_s = interval_s
        self.clock = clock
        self._nvml = nvml
        self._index = index
        self._sync = sync
        self._handle = None
        self._unsupported: set[str] = set()
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy: dict[str, Any] = {}
        self._window: str | None = None
        self._violations: dict[str, float] = {}
        self.note = ""
        self.columns: dict[str, Any] = empty_columns("telemetry not collected yet")

    @property
    def active(self) -> bool:
        return self._handle is not None

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Sampler:
        why = unavailable_reason(self.device, self._nvml)
        if why is not None:
            self.note = why
            return self
        if self._nvml is None:
            self._nvml, _ = _import_nvml()
        try:
            self._nvml.nvmlInit()
            if self._index is not None:
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self._index)
            else:
                import torch

                idx = torch.device(self.device).index
                self._handle = _nvml_handle(self._nvml, torch.cuda.current_device() if idx is None else idx)
        except Exception as exc:
            self.note = f"NVML device handle unavailable ({type(exc).__name__}: {exc})"
            self._handle = None
            self._shutdown()
            return self
        if self._sync is None:
            import torch

            self._sync = torch.cuda.synchronize
        self.sample_once()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.active:
            self.sample_once()
            self.columns = self._summarise()
            self._handle = None
            self._shutdown()
        else:
            self.columns = empty_columns(self.note)

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    @contextmanager
    def window(self, name: str):
        """Tag the samples taken inside the block as window ``name`` ("timing": the row's telemetry
        columns; "energy": the energy loop's). The timing window also reads the violation counters
        when it opens and closes. A sample is taken at both ends, so a short window has two."""
        if not self.active:
            yield self
            return
        sync = self._sync
        assert sync is not None  # an active sampler's __enter__ set it
        sync()
        self._window = name
        self.sample_once()
        before = self._violation_ns() if name == "timing" else {}
        try:
            yield self
        finally:
            sync()
            self.sample_once()
            self._window = None
            if name == "timing":
                after = self._violation_ns()
                self._violations = {k: (after[k] - before[k]) / 1e6 for k in after if k in before}

    def _violation_ns(self) -> dict[str, int]:
        """Cumulative violation time (ns) per policy of :data:`VIOLATION_POLICIES` that NVML answers."""
        fn = getattr(self._nvml, "nvmlDeviceGetViolationStatus", None)
        if fn is None:
            self._unsupported.add("violation counters")
            return {}
        counts = {}
        for name, (attr, value) in VIOLATION_POLICIES.items():
            def status(a: str = attr, v: int = value) -> Any:  # a def: mypy cannot type a lambda's defaults
                return fn(self._handle, int(getattr(self._nvml, a, v)))

            got = self._query(name, status)
            if got is not None:
                counts[name] = int(got.violationTime)
        return counts

    # -- sampling --------------------------------------------------------------------------

    def _query(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self._unsupported:
            return None
        try:
            return fn()
        except Exception:  # NVMLError_NotSupported and friends: stop asking
            self._unsupported.add(name)
            return None

    def sample_once(self) -> dict[str, Any] | None:
        """Take one sample now (also called by the background thread)."""
        if not self.active:
            return None
        nv, h = self._nvml, self._handle
        power_mw = self._query("power", lambda: nv.nvmlDeviceGetPowerUsage(h))
        util = self._query("util", lambda: nv.nvmlDeviceGetUtilizationRates(h))
        reasons_fn = (getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                      or nv.nvmlDeviceGetCurrentClocksThrottleReasons)
        record = {
            "t": self.clock(),
            "window": self._window,
            "power_w": power_mw / 1000.0 if power_mw is not None else None,
            "sm_clock_mhz": self._query("sm", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "mem_clock_mhz": self._query("mem", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            "temp_c": self._query("temp", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "gpu_util_pct": getattr(util, "gpu", None),
            "mem_util_pct": getattr(util, "memory", None),
            "reasons": self._query("reasons", lambda: reasons_fn(h)),
        }
        with self._lock:
            self._records.append(record)
        return record

    def _energy_mj(self) -> float | None:
        return self._query("energy", lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def measure_energy(self, fn: Callable[[], Any], tokens: float, min_time_s: float = ENERGY_MIN_TIME_S,
                       max_calls: int = 100000, max_time_s: float = ENERGY_MAX_TIME_S):
        """Energy of one call of ``fn``: back-to-back calls until the energy counter's steps span
        ``min_time_s`` (see the module docstring), or ``max_time_s`` has passed.

        Does nothing when telemetry is not active. The result goes into ``columns``
        (``energy_j`` per call, ``tokens_per_joule``, ``energy_source``) on exit.
        """
        if not self.active:
            return None
        sync = self._sync
        assert sync is not None  # an active sampler's __enter__ set it
        with self.window("energy"):
            e0 = last = self._energy_mj()
            t0 = self.clock()
            steps: list[tuple[int, float, float]] = []  # (calls made, counter, clock) where it stepped
            calls, batch = 0, 1
            while calls < max_calls:
                b0 = self.clock()
                for _ in range(batch):
                    fn()
                calls += batch
                sync()
                now = self.clock()
                e = self._energy_mj() if e0 is not None else None
                if e is not None and e != last:
                    steps.append((calls, e, now))
                    last = e
                if now - t0 >= max(max_time_s, min_time_s):
                    break
                if e0 is None:  # no counter: a plain loop of min_time_s, its sampled power integrated
                    if now - t0 >= min_time_s:
                        break
                elif len(steps) >= 2 and steps[-1][2] - steps[0][2] >= min_time_s:
                    break
                if now - b0 < ENERGY_BATCH_S:
                    batch = min(batch * 2, max_calls - calls) or 1
            t1 = self.clock()
            e1 = self._energy_mj()
        if len(steps) >= 2 and steps[-1][0] > steps[0][0]:
            energy, source = (steps[-1][1] - steps[0][1]) / 1000.0 / (steps[-1][0] - steps[0][0]), "counter"
        elif e0 is not None and e1 is not None and e1 > e0:
            energy, source = (e1 - e0) / 1000.0 / calls, "counter"
        else:
            powers = [r["power_w"] for r in self._in_window("energy") if r["power_w"] is not None]
            if not powers:
                self._energy = {"energy_note": "no energy counter and no power samples"}
                return None
            energy, source = sum(powers) / len(powers) * (t1 - t0) / calls, "power_integral"
        self._energy = {"energy_j": energy, "energy_source": source}  # tokens_per_joule: derived from it
        return energy

    # -- summary ---------------------------------------------------------------------------

    def _in_window(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._records if r["window"] == name]

    def other_processes(self, exclude: set[int]) -> int | None:
        """How many processes other than ``exclude`` hold a compute or graphics context on the device
        now (NVML); None when telemetry is not active or NVML cannot say."""
        if not self.active:
            return None
        pids: set[int] = set()
        known = False
        for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            fn = getattr(self._nvml, name, None)
            if fn is None:
                continue
            try:
                pids.update(int(getattr(p, "pid", -1)) for p in fn(self._handle))
                known = True
            except Exception:
                continue
        return len(pids - set(exclude) - {-1}) if known else None

    def _summarise(self) -> dict[str, Any]:
        records = self._in_window("timing")
        if not records:  # no timing window was opened: everything but the energy loop
            with self._lock:
                records = [r for r in self._records if r["window"] != "energy"]
        cols = empty_columns("")

        def values(key, rows=records):
            return [r[key] for r in rows if r[key] is not None]

        def mean(xs):
            return sum(xs) / len(xs) if xs else None

        power = values("power_w")
        sm = values("sm_clock_mhz")
        cols.update(
            power_w=mean(power),
            power_w_max=max(power) if power else None,
            sm_clock_mhz=mean(sm),
            sm_clock_mhz_min=min(sm) if sm else None,
            mem_clock_mhz=mean(values("mem_clock_mhz")),
            temp_c_max=max(values("temp_c")) if values("temp_c") else None,
            gpu_util_pct=mean(values("gpu_util_pct")),
            mem_util_pct=mean(values("mem_util_pct")),
            telemetry_samples=len(records),
        )
        seen = self._reasons_seen(values("reasons"))
        violated = [name for name, ms in self._violations.items() if ms > 0]
        if self._violations:
            cols["throttle_time_ms"] = sum(self._violations.values())
        if values("reasons") or self._violations:
            cols["throttle_reasons"] = ",".join(seen + violated)
            cols["throttled"] = any(name in THROTTLING for name in seen) or bool(violated)
        energy_rows = self._in_window("energy")
        if energy_rows and self._energy:
            cols["energy_power_w"] = mean(values("power_w", energy_rows))
            cols["energy_throttled"] = any(n in THROTTLING for n in self._reasons_seen(values("reasons", energy_rows)))
        cols.update({k: v for k, v in self._energy.items() if k in COLUMNS})
        notes = []
        if self._unsupported:
            notes.append("not supported by this GPU/driver: " + ", ".join(sorted(self._unsupported)))
        if "energy_note" in self._energy:
            notes.append(self._energy["energy_note"])
        cols["telemetry_note"] = "; ".join(notes)
        return cols

    def _reasons_seen(self, masks: list[int]) -> list[str]:
        return [name for name, bit in self._reason_bits().items() if any(m & bit for m in masks)]

    def _reason_bits(self) -> dict[str, int]:
        return {name: int(getattr(self._nvml, attr, bit)) for name, (attr, bit) in REASON_BITS.items()}
