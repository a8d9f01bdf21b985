"""The CUDA paths, exercised on a CPU with fakes before they ever meet a GPU.

Timing (warm-up by GPU time, host-bound rows, CUDA-graph capture that fails), the worker's
handling of sticky CUDA errors and the circuit breaker, per-phase failures, the CUDA memory
budget and the math backend's estimate, the GPU record, SDPA's backend choice, the GPU
validation suite, graph replays that amortise their launch and kernels behind the L2 flush that
are not host-bound, and paged flex on CUDA. benchmarks/gpu_check.py itself is tested in
tests/test_gpu_check.py, telemetry's
windows in tests/test_telemetry.py, the do_bench cross-check in tests/test_calibrate.py, GPU rows
in report/compare/export in tests/test_gpu_rows.py.
"""

import gc
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from harness.core.cases import Case
from harness.core.config import RunSettings
from harness.engine import runner
from harness.engine.executors import CircuitBreaker
from harness.measure import cudatime
from harness.measure.timing import TimingConfig, time_call
from tests.fake_cuda import FakeCuda

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "tests" / "plugins" / "cuda_faults.py"


def bench(*args, **kw):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, **kw)


@pytest.fixture
def fake_gpu(monkeypatch):
    return FakeCuda().install(monkeypatch)


NO_FLUSH = dict(flush_l2=False, rotate_inputs=False)


# -- timing: warm-up, host-bound rows, capture --------------------------------------------------------


def test_cuda_warm_up_runs_25_ms_of_gpu_time_not_just_the_count(fake_gpu):
    call = fake_gpu.kernel(gpu_s=1e-3, host_s=1e-5)
    t = time_call(call, TimingConfig(warmup=3, min_time_s=0.0, max_reps=20, **NO_FLUSH), device="cuda",
                  clock=fake_gpu.clock)
    assert t.warmup_calls >= 25  # 25 ms of 1 ms calls, though warmup = 3 asked for 2
    assert t.method == "cuda_events" and t.samples_s == pytest.approx([1e-3] * len(t.samples_s))


def test_cuda_warm_up_keeps_the_count_when_calls_are_long(fake_gpu):
    call = fake_gpu.kernel(gpu_s=0.04, host_s=1e-5)
    t = time_call(call, TimingConfig(warmup=4, min_time_s=1.0, max_reps=5, **NO_FLUSH), device="cuda",
                  clock=fake_gpu.clock)
    assert t.warmup_calls == 3  # 25 ms after the first, but the count says 3


def test_gpu_bound_and_host_bound_rows(fake_gpu):
    gpu_bound = time_call(fake_gpu.kernel(gpu_s=2e-3, host_s=2e-5), TimingConfig(warmup=1, max_reps=10, **NO_FLUSH),
                          device="cuda", clock=fake_gpu.clock)
    assert gpu_bound.host_bound is False and "host-bound" not in gpu_bound.note
    assert gpu_bound.row_columns()["host_ms"] == pytest.approx(0.02)
    host_bound = time_call(fake_gpu.kernel(gpu_s=1e-5, host_s=3e-4), TimingConfig(warmup=1, max_reps=10, **NO_FLUSH),
                           device="cuda", clock=fake_gpu.clock)
    cols = host_bound.row_columns()
    assert cols["host_bound"] is True and "host-bound" in cols["timing_note"] and "cuda_graph" in cols["timing_note"]
    cpu = time_call(lambda: None, TimingConfig(warmup=1, max_reps=3, min_time_s=0.0))
    assert cpu.row_columns()["host_bound"] is None  # not a CUDA question


def test_l2_flush_runs_before_every_sample_outside_the_events(fake_gpu, monkeypatch):
    flushes = []

    class Flusher:
        def __init__(self, device):
            self.flush = fake_gpu.kernel(gpu_s=5e-4)

        def __call__(self):
            flushes.append(1)
            self.flush()

    monkeypatch.setattr(cudatime, "L2Flusher", Flusher)
    t = time_call(fake_gpu.kernel(gpu_s=1e-3), TimingConfig(warmup=1, max_reps=7, flush_l2=True), device="cuda",
                  clock=fake_gpu.clock)
    # one flush before every sample, and 3 more timed once (the flush's own GPU time, for host_bound)
    assert t.l2_flush and len(t.samples_s) == 7 and len(flushes) == 7 + 3
    assert max(t.samples_s) == pytest.approx(1e-3)  # the flush's 0.5 ms is not in any sample


class TimedFlusher:
    """A fake L2 flush that costs ``gpu_s`` of the fake GPU's time."""

    def __init__(self, fake, gpu_s):
        self.flush = fake.kernel(gpu_s=gpu_s, host_s=2e-6)

    def __call__(self):
        self.flush()


def test_short_kernels_behind_the_flush_are_not_host_bound(fake_gpu, monkeypatch):
    """A 35 µs kernel issued in 40 µs is not host-bound when an 80 µs flush ran
    before its start event (the host issued it while the GPU flushed); a 300 µs issue still is."""
    monkeypatch.setattr(cudatime, "L2Flusher", lambda device: TimedFlusher(fake_gpu, 80e-6))
    config = TimingConfig(warmup=1, max_reps=20, flush_l2=True, rotate_inputs=False)
    short = time_call(fake_gpu.kernel(gpu_s=35e-6, host_s=40e-6), config, device="cuda", clock=fake_gpu.clock)
    assert short.host_bound is False and "host-bound" not in short.note
    assert 40e-6 >= cudatime.HOST_BOUND_RATIO * 35e-6  # the old rule (events alone) called it host-bound
    slow = time_call(fake_gpu.kernel(gpu_s=35e-6, host_s=300e-6), config, device="cuda", clock=fake_gpu.clock)
    assert slow.host_bound is True and "L2 flush" in slow.note
    unflushed = time_call(fake_gpu.kernel(gpu_s=35e-6, host_s=40e-6), TimingConfig(warmup=1, max_reps=20, **NO_FLUSH),
                          device="cuda", clock=fake_gpu.clock)
    assert unflushed.host_bound is True  # nothing queued ahead of it: the GPU did wait


def test_graph_samples_amortise_the_replay_launch_like_do_bench_cudagraph(fake_gpu, monkeypatch):
    """A graph replay costs a launch gap (3 µs here) on top of its kernels. One call per
    replay put it into every sample (+7.5% for a 40 µs kernel, outside the ±3% goal); several calls per replay
    spread it, as do_bench_cudagraph does, and the result is within 0.5%."""
    real_graph = torch.cuda.CUDAGraph

    class GappedGraph(real_graph):
        def replay(self):
            fake_gpu.gpu_t += 3e-6
            super().replay()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", GappedGraph)
    kernel = fake_gpu.kernel(gpu_s=40e-6, host_s=5e-6)
    t = time_call(kernel, TimingConfig(warmup=1, max_reps=20, cuda_graph=True, **NO_FLUSH), device="cuda",
                  clock=fake_gpu.clock)
    assert cudatime.graph_calls(40e-6, flush_l2=False) == 50  # 2 ms of GPU time per replay
    assert t.method == "cuda_graph" and "50 calls per replay" in t.note
    assert t.median_s == pytest.approx(40e-6, rel=0.005)
    one = (3e-6 + 40e-6) / 40e-6 - 1
    assert one > 0.03  # what one call per replay measured: outside the cross-check's goal
    # with the L2 flush every call must start cold: one call per replay, the gap stays (and the note says nothing)
    assert cudatime.graph_calls(40e-6, flush_l2=True) == 1
    assert cudatime.graph_calls(0.05, flush_l2=False) == 1 and cudatime.graph_calls(1e-7, flush_l2=False) == 100


def test_graph_capture_replays_and_restores_the_stream(fake_gpu):
    call = fake_gpu.kernel(gpu_s=1e-3, host_s=1e-4)
    t = time_call(call, TimingConfig(warmup=1, max_reps=8, cuda_graph=True, **NO_FLUSH), device="cuda",
                  clock=fake_gpu.clock)
    assert t.method == "cuda_graph" and fake_gpu.replays == 8 and not t.restart
    assert fake_gpu.current is fake_gpu.default and fake_gpu.gc_during_capture is False and gc.isenabled()


def test_failed_capture_restores_the_stream_and_asks_for_a_fresh_worker(monkeypatch):
    fake = FakeCuda(capture_fails=True).install(monkeypatch)
    t = time_call(fake.kernel(gpu_s=1e-3), TimingConfig(warmup=1, max_reps=5, cuda_graph=True, **NO_FLUSH),
                  device="cuda", clock=fake.clock)
    assert fake.current is fake.default  # torch.cuda.graph alone would have left the capture stream current
    assert gc.isenabled() and fake.gc_during_capture is False
    assert t.method == "cuda_events" and "capture failed" in t.note and len(t.samples_s) == 5
    assert "capture failed" in t.restart


def test_backward_is_never_captured():
    timing, note = runner.timing_for(Case("naive", {}, mode="bwd"), TimingConfig(cuda_graph=True))
    assert timing.cuda_graph is False and "not captured" in note
    same, none = runner.timing_for(Case("naive", {}, mode="fwd"), TimingConfig(cuda_graph=True))
    assert same.cuda_graph is True and none == ""


# -- sticky CUDA errors, the worker and the circuit breaker ------------------------------------------


def _run(variant, **axes):
    from harness.engine.plugins import load_plugin

    load_plugin(str(PLUGIN), ROOT)  # registers the fault variants

    case = Case(variant, {}, heads=2, kv_heads=2, seq_len=32, head_dim=16, **axes)
    return runner.run_case(case, RunSettings(TimingConfig(warmup=1, min_time_s=0.0, max_reps=3)))


@pytest.mark.parametrize("variant, text", [
    ("fault_fake_illegal_access", "illegal memory access"),
    ("fault_fake_cudnn_failure", "CUDNN_STATUS_EXECUTION_FAILED"),
])
def test_a_cuda_error_is_its_own_status_and_replaces_the_worker(variant, text):
    result = _run(variant)
    assert result.row["status"] == "cuda_error" and text in result.row["reason"]
    assert result.restart and result.samples_s == []


def test_ordinary_errors_and_ooms_keep_the_worker():
    assert not runner._is_cuda_error(ValueError("CUDA-like words, but a ValueError"))
    assert runner._is_cuda_error(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert runner._is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not runner._is_cuda_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))


def test_a_failing_empty_cache_is_caught_and_named(monkeypatch):
    def broken():
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    assert "illegal memory access" in runner._release(Case("naive", {}, device="cuda"))
    assert runner._release(Case("naive", {}, device="cpu")) == ""


def test_circuit_breaker_trips_on_consecutive_crashes_only():
    breaker = CircuitBreaker(limit=3)
    for status in ("crash", "cuda_error", "ok", "crash", "skipped", "cuda_error"):
        assert breaker.record({"status": status, "reason": "x"}) is None  # ok resets; skipped neither counts nor resets
    message = breaker.record({"status": "crash", "reason": "worker killed by SIGSEGV (signal 11)"})
    assert message and "3 consecutive" in message and "SIGSEGV" in message and "bench resume" in message
    assert breaker.tripped == message and breaker.record({"status": "crash", "reason": "again"}) is None


def _suite(tmp_path, variants, isolation="process"):
    entries = "\n".join(f'[[variant]]\nname = "{v}"\nseq_len = [{16 * (i + 1)}]\n' for i, v in enumerate(variants))
    path = tmp_path / "s.toml"
    path.write_text(f'plugins = ["{PLUGIN}"]\n[defaults]\nheads = 2\nhead_dim = 16\n[timing]\nwarmup = 1\n'
                    f'min_time_s = 0.0\nmax_reps = 3\nprocesses = 1\n[run]\nisolation = "{isolation}"\n'
                    f'contention = "flag"\n\n{entries}')  # workers counted: no contended round re-run
    return path


def test_worker_pool_replaces_the_worker_after_a_cuda_error_and_the_run_goes_on(tmp_path):
    suite = _suite(tmp_path, ["fault_fake_ok", "fault_fake_illegal_access", "fault_fake_ok", "fault_fake_ok"])
    proc = bench("run", str(suite), "-o", str(tmp_path / "out"), "--quiet", "--no-report")
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "out" / "results.parquet").sort_values("seq_len")
    assert list(rows["status"]) == ["ok", "cuda_error", "ok", "ok"]
    logs = sorted((tmp_path / "out" / "logs").glob("worker-*.log"))
    assert len(logs) == 2  # the worker that saw the error was replaced before the next case


def test_three_consecutive_cuda_errors_end_the_run_with_a_clear_message(tmp_path):
    suite = _suite(tmp_path, ["fault_fake_ok"] + ["fault_fake_illegal_access"] * 4 + ["fault_fake_ok"])
    proc = bench("run", str(suite), "-o", str(tmp_path / "out"), "--quiet", "--no-report")
    assert proc.returncode == 1
    assert "3 consecutive" in proc.stderr and "resume" in proc.stderr
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["status"].startswith("aborted") and len(meta["case_ids"]) == 6
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "out" / "results.parquet").sort_values("seq_len")
    assert list(rows["status"]) == ["ok"] + ["cuda_error"] * 3


def test_in_process_a_cuda_error_ends_the_run_cleanly(tmp_path):
    suite = _suite(tmp_path, ["fault_fake_ok", "fault_fake_illegal_access", "fault_fake_ok"], isolation="none")
    proc = bench("run", str(suite), "-o", str(tmp_path / "out"), "--quiet", "--no-report")
    assert proc.returncode == 1 and "--isolation process" in proc.stderr
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["status"].startswith("aborted")  # not left "running"
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "out" / "results.parquet").sort_values("seq_len")
    assert list(rows["status"]) == ["ok", "cuda_error"]


# -- phases after timing -----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["memory", "accuracy"])
def test_an_oom_after_timing_keeps_the_timing(monkeypatch, phase):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    from harness.engine import steps

    monkeypatch.setattr(*(steps, "peak_memory_bytes") if phase == "memory" else (runner, "_accuracy"), oom)
    row = runner.run_case(Case("naive", {}, heads=2, kv_heads=2, seq_len=32, head_dim=16),
                          RunSettings(TimingConfig(warmup=1, min_time_s=0.0, max_reps=3))).row
    assert row["status"] == "ok" and row["time_ms"] > 0 and row["reps"] == 3
    assert f"{phase}: oom" in row["phase_note"] and "20.00 GiB" in row["phase_note"]
    if phase == "memory":
        assert row["peak_mem_bytes"] != row["peak_mem_bytes"] and row["rel_err"] < 1e-5  # NaN, then accuracy ran
    else:
        assert row["peak_mem_bytes"] > 0 and row["rel_err"] != row["rel_err"]


# -- memory budget and estimates ---------------------------------------------------------------------


def test_cuda_cases_are_budgeted_from_the_device_not_host_ram(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2**30)
    budget = runner.cuda_memory_budget("cuda")
    assert budget == int(runner.CUDA_MEMORY_FRACTION * (40 + 3) * 2**30)
    from harness import get_variant

    math_case = Case("sdpa", {"backend": "math"}, device="cuda", batch=4, heads=16, kv_heads=16, seq_len=16384,
                     head_dim=64, dtype="float16")
    host_default = 10**15  # a host-RAM budget must not decide a CUDA case
    reasons = runner.skip_reasons(math_case, get_variant("sdpa"), host_default)
    assert reasons and "GPU memory budget" in reasons[0] and "GiB" in reasons[0]
    assert runner.skip_reasons(math_case, get_variant("sdpa"), host_default, explicit=True) == []  # the user's word
    small = Case("sdpa", {"backend": "math"}, device="cuda", seq_len=1024, dtype="float16")
    assert runner.skip_reasons(small, get_variant("sdpa"), host_default) == []


def test_math_estimate_upcasts_half_precision_and_is_never_below_the_measured_peak():
    from harness import get_variant
    from harness.measure.inputs import make_qkv
    from harness.measure.memory import cpu_peak_bytes

    sdpa = get_variant("sdpa")
    big = Case("sdpa", {"backend": "math"}, device="cuda", batch=4, heads=16, kv_heads=16, seq_len=16384,
               head_dim=64, dtype="float16")
    assert sdpa.working_set(big) >= 2 * 4 * 16 * 16384**2 * 4  # two float32 L² matrices per head: 128 GiB
    for dtype in ("bfloat16", "float32"):
        for causal in (False, True):
            case = Case("sdpa", {"backend": "math"}, heads=4, kv_heads=4, seq_len=512, head_dim=32, dtype=dtype,
                        causal=causal)
            q, k, v = make_qkv(case)

            def call(q=q, k=k, v=v, causal=causal):  # called within this iteration
                with torch.no_grad():
                    return sdpa(q, k, v, causal=causal, backend="math")

            call()
            peak = cpu_peak_bytes(call)
            estimate = runner.estimated_bytes(case, sdpa)
            assert peak <= estimate <= 1.25 * peak, (dtype, causal, peak, estimate)


def test_nightly_gpu_suite_has_no_math_case_at_16k():
    from harness.engine.suite import expand_cases, load_suite

    cases = expand_cases(load_suite(ROOT / "suites" / "nightly-gpu.toml"))
    math = [c for c in cases if c.variant == "sdpa" and c.params.get("backend") == "math"]
    assert math and max(c.seq_len for c in math) == 4096
    assert max(c.seq_len for c in cases if c.variant == "sdpa") == 16384  # the fused backends keep 16K


# -- records and the SDPA backend --------------------------------------------------------------------


def test_gpu_record_names_settings_and_other_processes(monkeypatch, capsys):
    from harness.measure import environment
    from tests.test_telemetry import fake_nvml

    nv = fake_nvml()
    me = __import__("os").getpid()
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=me, usedGpuMemory=2**30),
                                                        types.SimpleNamespace(pid=4242, usedGpuMemory=3 * 2**30)]
    nv.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    record = environment.gpu_record(nvml=nv, handle=("gpu", 0))
    assert record["uuid"] == "GPU-fake" and record["power_limit_w"] == 700.0 and record["persistence_mode"] is True
    assert record["ecc_mode"] is True and record["mig_mode"] is False
    assert record["applications_clocks_mhz"] == {"sm": 1980, "mem": 2619}
    assert record["other_processes"] == [{"pid": 4242, "used_memory_bytes": 3 * 2**30}]
    assert "another process" in capsys.readouterr().err  # warned, in one line
    flags = environment.precision_flags()
    assert flags["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert set(flags) >= {"cuda_matmul_allow_tf32", "cudnn_allow_tf32", "fp16_reduced_precision_reduction",
                          "bf16_reduced_precision_reduction"}


def test_sdpa_backend_used_is_recorded():
    from harness import get_variant

    sdpa = get_variant("sdpa")
    assert sdpa.columns(Case("sdpa", {"backend": "math"}))["sdpa_backend_used"] == "math"
    used = sdpa.columns(Case("sdpa", {"backend": "auto"}, seq_len=64, head_dim=16))["sdpa_backend_used"]
    assert used in ("flash", "math")  # the CPU's dispatcher answers one of its two
    if not torch.cuda.is_available():
        assert sdpa.columns(Case("sdpa", {"backend": "auto"}, device="cuda"))["sdpa_backend_used"] is None


def test_sdpa_backend_used_maps_the_dispatchers_answer(monkeypatch):
    from variants import dense

    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: 3)
    q = torch.empty(1, 2, 8, 16)
    assert dense.sdpa_backend_used(q, q, q, causal=False) == "cudnn"


def test_efficient_backend_skips_grouped_query_with_the_reason():
    from harness import get_variant

    reasons = get_variant("sdpa").not_supported_reasons(
        Case("sdpa", {"backend": "efficient"}, device="cuda", heads=8, kv_heads=2, dtype="float16"))
    assert any("No available kernel" in r and "grouped-query" in r for r in reasons)


# -- the validation suite and script ---------------------------------------------------------------


def test_gpu_validate_suite_dry_run_lists_flashattentions_grid():
    proc = bench("run", "suites/gpu-validate.toml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    # 12 shapes (6 (batch, seq_len) pairs × 2 head dims) × dtype × causal × mode; sdpa has 3 backends, 7 others
    assert len(lines) == 12 * 2 * 2 * 2 * (3 + 7) and "960 cases" in proc.stderr
    assert lines.count("sdpa(backend=cudnn) cuda bfloat16 fwd B1 H16 L16384 D128") == 1
    assert sum(" B32 H32 L512 D64" in ln for ln in lines) == 80


# benchmarks/gpu_check.py itself (its plan, rehearsal, crash drill, steps): tests/test_gpu_check.py


# -- paged flex on CUDA ------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size, refused", [(16, True), (64, True), (128, False), (256, False)])
def test_paged_flex_on_cuda_needs_pages_of_a_multiple_of_128(page_size, refused, monkeypatch):
    """The page is the flex path's KV block: on CUDA it must be a multiple of 128, as flex's own tile
    (variants/flex.py); a 16-token page would have been an error row, now it is a skipped one that says why."""
    from harness import get_variant
    from variants import flex

    monkeypatch.setattr(flex, "unavailable", lambda device: None)  # as if FlexAttention compiled here

    case = Case("paged", {"path": "flex"}, device="cuda", batch=1, heads=8, kv_heads=2, q_len=1, seq_len=4096,
                head_dim=64, dtype="bfloat16", causal=True, kv_layout="paged", page_size=page_size)
    reasons = get_variant("paged").not_supported_reasons(case)
    assert any("multiple of 128" in r for r in reasons) == refused
    cpu = Case("paged", {"path": "flex"}, batch=1, heads=8, kv_heads=2, q_len=1, seq_len=4096, head_dim=64,
               causal=True, kv_layout="paged", page_size=16)
    assert not any("multiple of 128" in r for r in get_variant("paged").not_supported_reasons(cpu))
