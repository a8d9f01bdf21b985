"""NVML telemetry: empty columns with a stated reason where NVML is absent; a mocked NVML for the rest."""

import sys
import types

import pytest

from harness.measure import telemetry
from harness.measure.derive import derive


class FakeNVMLError(Exception):
    pass


def fake_nvml(*, power_mw=250_000, reasons=0, energy=True, init_fails=False):
    """A pynvml stand-in: constant readings (``state["power_mw"]`` may be changed), an energy counter
    that advances 1000 mJ per call(), cumulative violation counters (``state["violation_ns"]``, per
    policy), and the settings the GPU record reads."""
    nv = types.SimpleNamespace()
    state = {"energy_mj": 5_000_000, "inits": 0, "shutdowns": 0, "power_mw": power_mw,
             "violation_ns": {0: 10**9, 1: 0, 3: 0, 5: 0}}
    nv.state = state
    nv.NVMLError = FakeNVMLError
    nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM, nv.NVML_TEMPERATURE_GPU = 1, 2, 0
    nv.nvmlClocksEventReasonHwThermalSlowdown = 0x40
    nv.nvmlClocksEventReasonGpuIdle = 0x1

    def init():
        if init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")
        state["inits"] += 1

    def energy_counter(h):
        if not energy:
            raise FakeNVMLError("Not Supported")
        return state["energy_mj"]

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: state.__setitem__("shutdowns", state["shutdowns"] + 1)
    nv.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nv.nvmlDeviceGetPowerUsage = lambda h: state["power_mw"]
    nv.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1980, 2: 2619}[kind]
    nv.nvmlDeviceGetTemperature = lambda h, kind: 61
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97, memory=40)
    nv.nvmlDeviceGetCurrentClocksEventReasons = lambda h: reasons
    nv.nvmlDeviceGetTotalEnergyConsumption = energy_counter
    nv.nvmlDeviceGetViolationStatus = lambda h, policy: types.SimpleNamespace(
        referenceTime=0, violationTime=state["violation_ns"][policy])
    nv.nvmlDeviceGetUUID = lambda h: b"GPU-fake"
    nv.nvmlDeviceGetPowerManagementLimit = lambda h: 700_000
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    nv.nvmlDeviceGetPersistenceMode = lambda h: 1
    nv.nvmlDeviceGetEccMode = lambda h: (1, 1)
    nv.nvmlDeviceGetMigMode = lambda h: (0, 0)
    nv.nvmlDeviceGetApplicationsClock = lambda h, kind: {1: 1980, 2: 2619}[kind]
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: []
    nv.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []

    def call():  # a "kernel" that uses exactly 1 J
        state["energy_mj"] += 1000

    nv.call = call
    return nv


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_cpu_case_gives_empty_columns_and_a_reason():
    with telemetry.Sampler("cpu") as s:
        assert s.measure_energy(lambda: None, tokens=1024) is None
    cols = s.columns
    assert set(cols) == set(telemetry.COLUMNS)
    assert all(cols[c] is None for c in telemetry.COLUMNS if c != "telemetry_note")
    assert "NVIDIA GPUs only" in cols["telemetry_note"]


def test_nvml_missing_gives_empty_columns_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with telemetry.Sampler("cuda") as s:
        s.measure_energy(lambda: None, tokens=1)
    assert s.columns["energy_j"] is None and s.columns["throttled"] is None
    assert "nvidia-ml-py is not installed" in s.columns["telemetry_note"]
    info = telemetry.availability("cuda")
    assert info["available"] is False and "columns are empty" in info["reason"]


def test_nvml_that_cannot_initialise_gives_empty_columns():
    nv = fake_nvml(init_fails=True)
    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None) as s:
        s.measure_energy(nv.call, tokens=1)
    assert s.columns["power_w"] is None
    assert "NVML could not be initialised" in s.columns["telemetry_note"]


def clocked_kernel(nv, seconds: float):
    """(fake clock, a kernel that uses 1 J of ``nv``'s counter and ``seconds`` of that clock)."""
    clock = Clock()

    def kernel():
        nv.call()
        clock.t += seconds

    return clock, kernel


def test_mocked_nvml_gives_power_clocks_and_energy_from_the_counter():
    nv = fake_nvml()
    clock, kernel = clocked_kernel(nv, 0.25)
    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None, clock=clock, interval_s=0.001) as s:
        with s.window("timing"):
            kernel()
        energy = s.measure_energy(kernel, tokens=4096, min_time_s=1.0)
    cols = s.columns
    assert energy == pytest.approx(1.0)  # 1000 mJ per call
    assert cols["energy_j"] == pytest.approx(1.0) and cols["energy_source"] == "counter"
    assert derive({"batch": 1, "seq_len": 4096, **cols})["tokens_per_joule"] == pytest.approx(4096.0)
    assert cols["power_w"] == 250.0 and cols["power_w_max"] == 250.0
    assert cols["sm_clock_mhz"] == 1980 and cols["sm_clock_mhz_min"] == 1980 and cols["mem_clock_mhz"] == 2619
    assert cols["temp_c_max"] == 61 and cols["gpu_util_pct"] == 97 and cols["mem_util_pct"] == 40
    assert cols["throttled"] is False and cols["throttle_reasons"] == ""
    assert cols["telemetry_samples"] >= 2 and cols["telemetry_note"] == ""
    assert cols["energy_power_w"] == 250.0 and cols["energy_throttled"] is False
    assert cols["throttle_time_ms"] == 0.0  # the counters were read, and did not move
    assert nv.state["inits"] == nv.state["shutdowns"] >= 1


def test_energy_falls_back_to_integrated_power_without_a_counter():
    nv = fake_nvml(energy=False, power_mw=300_000)
    clock = Clock()

    def kernel():
        clock.t += 0.5

    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None, clock=clock, interval_s=10) as s:
        s.measure_energy(kernel, tokens=100, min_time_s=1.0)
    cols = s.columns
    # 2 calls of 0.5 s at 300 W -> 150 J each
    assert cols["energy_source"] == "power_integral"
    assert cols["energy_j"] == pytest.approx(150.0)
    assert derive({"batch": 1, "seq_len": 100, **cols})["tokens_per_joule"] == pytest.approx(100 / 150)
    assert "energy" in cols["telemetry_note"]  # the unsupported counter is stated


def test_energy_loop_is_short_and_counts_whole_counter_steps():
    """The energy loop was a fixed second of every case. It now stops once the counter's
    steps span ENERGY_MIN_TIME_S (0.2 s), and takes the energy between steps: a counter that steps every
    100 ms (A100/H100) would otherwise put up to a whole step of error at each end of a short loop."""
    nv = fake_nvml()
    clock = Clock()
    watts, period = 500.0, 0.1
    # the counter steps every 100 ms of the (fake) clock: the energy up to the last step, in mJ
    nv.nvmlDeviceGetTotalEnergyConsumption = lambda h: 7_000_000 + int(clock.t / period) * period * watts * 1000

    def kernel():  # 1.3 ms at 500 W: 0.65 J
        clock.t += 0.0013

    clock.t = 0.037  # start between two steps
    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None, clock=clock, interval_s=10) as s:
        start = clock.t
        energy = s.measure_energy(kernel, tokens=1)
        took = clock.t - start
    assert telemetry.ENERGY_MIN_TIME_S < 1.0 and took <= telemetry.ENERGY_MIN_TIME_S + 2 * period + 0.02
    assert energy == pytest.approx(0.65, rel=0.05) and s.columns["energy_source"] == "counter"
    naive = (nv.nvmlDeviceGetTotalEnergyConsumption(None) - 7_000_000 - int(start / period) * period * watts * 1000)
    assert abs(naive / 1000 / round(took / 0.0013) - 0.65) > 0.05 * 0.65  # what end-to-end differencing gives


def test_timing_window_and_energy_loop_are_reported_apart():
    nv = fake_nvml(power_mw=200_000)
    clock, kernel = clocked_kernel(nv, 0.25)
    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None, clock=clock, interval_s=10) as s:
        with s.window("timing"):
            kernel()
        nv.state["power_mw"] = 450_000  # the energy loop runs hotter (a second of back-to-back calls)
        nv.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4  # ...and hits the power cap
        s.measure_energy(kernel, tokens=1, min_time_s=1.0)
    cols = s.columns
    assert cols["power_w"] == 200.0 and cols["power_w_max"] == 200.0  # the timing window alone
    assert cols["throttled"] is False and cols["throttle_reasons"] == ""
    assert cols["energy_power_w"] == 450.0 and cols["energy_throttled"] is True
    assert cols["telemetry_samples"] == 2  # the window's two ends; the energy loop's samples are not counted


def test_violation_counters_catch_throttling_that_sampling_missed():
    nv = fake_nvml()

    def throttled_kernel():  # held by the power policy for 3 ms, between two 50 ms samples
        nv.state["violation_ns"][0] += 3_000_000

    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None, interval_s=10) as s:
        with s.window("timing"):
            throttled_kernel()
    cols = s.columns
    assert cols["throttled"] is True and cols["throttle_time_ms"] == pytest.approx(3.0)
    assert cols["throttle_reasons"] == "power_violation"  # no sample saw a clock-event reason


def test_thermal_slowdown_flags_the_row_but_idle_does_not():
    hot = fake_nvml(reasons=0x40 | 0x1)
    with telemetry.Sampler("cuda", nvml=hot, index=0, sync=lambda: None, interval_s=10) as s:
        pass
    assert s.columns["throttled"] is True
    assert s.columns["throttle_reasons"] == "gpu_idle,hw_thermal"

    idle = fake_nvml(reasons=0x1)
    with telemetry.Sampler("cuda", nvml=idle, index=0, sync=lambda: None, interval_s=10) as s:
        pass
    assert s.columns["throttled"] is False and s.columns["throttle_reasons"] == "gpu_idle"


def test_unsupported_queries_leave_their_columns_empty():
    nv = fake_nvml()

    def no_temperature(h, kind):
        raise FakeNVMLError("Not Supported")

    nv.nvmlDeviceGetTemperature = no_temperature
    with telemetry.Sampler("cuda", nvml=nv, index=0, sync=lambda: None, interval_s=10) as s:
        pass
    assert s.columns["temp_c_max"] is None and s.columns["power_w"] == 250.0
    assert "temp" in s.columns["telemetry_note"]


def test_run_json_states_absence_on_this_machine():
    from harness.measure.environment import capture

    info = capture()["telemetry"]
    assert set(info) >= {"available", "reason"}
    if not info["available"]:
        assert info["reason"]


@pytest.mark.skipif(telemetry.unavailable_reason("cuda") is not None, reason="needs an NVIDIA GPU with NVML")
def test_real_nvml_on_a_gpu_reads_power_energy_and_counters():
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with telemetry.Sampler("cuda", interval_s=0.01) as s:
        with s.window("timing"):
            for _ in range(50):
                a @ a
        s.measure_energy(lambda: a @ a, tokens=4096, min_time_s=0.5)
    cols = s.columns
    assert cols["power_w"] > 0 and cols["energy_j"] > 0 and cols["energy_power_w"] > 0
    assert cols["sm_clock_mhz"] > 0 and cols["telemetry_samples"] >= 2
    assert cols["throttle_time_ms"] is not None  # the violation counters were readable
