"""The triton variant's kernel against the float64 reference, without a GPU: Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported (``triton.jit`` reads it when the
kernel is defined), and by the time this module runs the registry has long imported the kernel
compiled for a GPU. So the interpreted cases run in one child process (this file run as
``python -m tests.test_variant_triton``) whose environment alone carries the variable; each
case is then its own test here, asserting on the child's measured errors. The test process's
environment, and every other test's, never sees the variable.

The interpreter runs float16 only: its bfloat16 ``tl.dot`` gives garbage (Triton 3.7), so
bfloat16 is checked on CUDA. Autotuning, compiled kernels and bfloat16 have GPU-only tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = HAS_TRITON and torch.cuda.is_available()
ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")

# (heads, kv_heads, seq_len, head_dim, causal, config): config None is the autotuned launch (under the
# interpreter: its one 32×16 config); a name picks that GPU candidate, so its tile shapes are checked too.
CASES = [
    (4, 4, 67, 64, False, None),
    (4, 4, 67, 64, True, None),
    (4, 2, 70, 64, True, None),  # grouped-query
    (4, 1, 33, 16, False, None),  # multi-query, head_dim 16
    (2, 1, 33, 16, True, None),
    (2, 2, 65, 128, False, None),
    (4, 2, 65, 128, True, None),
    (2, 1, 49, 256, True, None),
    (2, 1, 49, 256, False, None),
    (2, 2, 1, 64, True, None),  # one row
    (2, 2, 16, 32, True, None),  # exactly one tile of keys
    (4, 2, 67, 64, True, "64x32"),
    (4, 2, 67, 64, True, "128x64"),
    (2, 1, 70, 128, False, "64x64"),
    (2, 1, 70, 128, True, "128x128"),
]
GPU_LIKE = {"64x32": (64, 32), "64x64": (64, 64), "128x64": (128, 64), "128x128": (128, 128)}


def _case_id(case) -> str:
    H, Hkv, L, D, causal, config = case
    return f"H{H}kv{Hkv}-L{L}-D{D}-{'causal' if causal else 'full'}-{config or 'tuned'}"


def run_cases(cases) -> dict:
    """In the interpreted child: each case's (max abs, rel) error against float64, or its exception."""
    from harness import masks
    from harness.measure.inputs import make_qkv
    from harness.measure.reference import errors, reference_attention
    from tests.variant_checks import make_case
    from variants import triton_fused

    results = {}
    for case in cases:
        H, Hkv, L, D, causal, config = case
        q, k, v = make_qkv(make_case("triton", dtype="float16", batch=1, heads=H, kv_heads=Hkv, seq_len=L,
                                     head_dim=D, causal=causal))
        cfg = None
        if config:
            bm, bn = GPU_LIKE[config]
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2)
        try:
            out = triton_fused.launch(q, k, v, causal=causal, config=cfg)
            max_abs, rel = errors(out, reference_attention(q, k, v, masks.causal if causal else None))
            results[_case_id(case)] = dict(
                max_abs=max_abs, rel=rel, shape=list(out.shape), dtype=str(out.dtype),
                finite=bool(torch.isfinite(out).all()),
            )
        except Exception as e:  # reported per case by the parent
            results[_case_id(case)] = dict(error=f"{type(e).__name__}: {e}")
    tuner = triton_fused._attention_fwd_tuned
    return dict(interpreted=triton_fused.INTERPRETED, tuned_configs=len(tuner.configs), cases=results)


@pytest.fixture(scope="module")
def interpreted():
    """Run every case once, in a child process with TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install -e '.[test]' installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_variant_triton"],
        input=json.dumps(CASES), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_child_ran_the_interpreter_with_one_config(interpreted):
    assert interpreted["interpreted"] is True
    assert interpreted["tuned_configs"] == 1


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_float64_reference_in_interpreter(interpreted, case):
    from harness.measure.reference import TOLERANCE

    got = interpreted["cases"][_case_id(case)]
    assert "error" not in got, got.get("error")
    H, Hkv, L, D, causal, config = case
    assert got["shape"] == [1, H, L, D] and got["dtype"] == "torch.float16" and got["finite"]
    tol_abs, tol_rel = TOLERANCE["float16"]
    assert got["max_abs"] <= tol_abs and got["rel"] <= tol_rel, got


def test_environment_variable_does_not_leak(interpreted):
    """The interpreter flag lived only in the child: this process's environment is as it was."""
    from variants import triton_fused

    assert os.environ.get("TRITON_INTERPRET") == ENV_AT_IMPORT
    assert triton_fused.INTERPRETED == ((ENV_AT_IMPORT or "0").lower() in ("1", "true", "on"))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_cpu_tensors_are_refused_outside_the_interpreter():
    from variants import triton_fused

    if triton_fused.INTERPRETED:
        pytest.skip("this process runs under TRITON_INTERPRET=1, where CPU tensors are the point")
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_fused.launch(q, q, q, causal=False)


# --------------------------------------------------------------------------------------------
# launch configs: the pruning that decides which candidates the autotuner times (no Triton needed)

SHARED_MEMORY = {"sm80": 166912, "sm86": 101376, "sm90": 232448}


@pytest.mark.parametrize("gpu", sorted(SHARED_MEMORY))
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("seq_len", [1, 67, 4096])
@pytest.mark.parametrize("causal", [False, True])
def test_feasible_configs_fit_the_gpu_and_the_kernel(gpu, head_dim, seq_len, causal):
    from variants.triton_fused import CONFIG_SPACE, MAX_ACC_REGISTERS, feasible_configs, shared_memory_bytes

    smem = SHARED_MEMORY[gpu]
    kept = feasible_configs(CONFIG_SPACE, seq_len=seq_len, head_dim=head_dim, causal=causal,
                            element_bytes=2, shared_memory=smem)
    assert kept, "the autotuner needs at least one config"
    for c in kept:
        assert c in CONFIG_SPACE
        assert shared_memory_bytes(c, head_dim, 2) <= smem
        assert c["BLOCK_M"] * head_dim <= MAX_ACC_REGISTERS * 32 * c["num_warps"]
        if causal:
            assert c["BLOCK_M"] % c["BLOCK_N"] == 0
        if seq_len == 1:
            assert (c["BLOCK_M"], c["BLOCK_N"]) == (64, 32)  # no tile larger than the smallest is useful
    if seq_len == 4096 and head_dim <= 128:
        assert len({(c["BLOCK_M"], c["BLOCK_N"]) for c in kept}) >= 3, "long sequences get a real choice"


def test_head_dim_256_drops_what_does_not_fit():
    """D=256 float16 on H100: 128×64 tiles with 3 stages need 256 KiB of shared memory; they go."""
    from variants.triton_fused import CONFIG_SPACE, feasible_configs

    kept = feasible_configs(CONFIG_SPACE, seq_len=4096, head_dim=256, causal=True, element_bytes=2,
                            shared_memory=SHARED_MEMORY["sm90"])
    shapes = {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in kept}
    assert (128, 64, 3) not in shapes and (64, 32, 2) in shapes
    assert len(kept) < len(CONFIG_SPACE) // 2


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_autotuner_prunes_with_the_launch_shape(monkeypatch):
    """The autotuner's hook turns the launch's arguments into feasible_configs' question."""
    from variants import triton_fused

    if triton_fused.INTERPRETED:
        pytest.skip("under TRITON_INTERPRET=1 the autotuner holds one config")
    monkeypatch.setattr(triton_fused, "_shared_memory", lambda device: SHARED_MEMORY["sm86"])
    configs = triton_fused._attention_fwd_tuned.configs
    q = torch.empty(1, 1, 1, 128, dtype=torch.float16)
    kept = triton_fused._prune(configs, {"Q": q, "seq_len": 1000}, HEAD_DIM=128, CAUSAL=True, grid=None, warmup=False)
    want = triton_fused.feasible_configs(triton_fused.CONFIG_SPACE, seq_len=1000, head_dim=128, causal=True,
                                         element_bytes=2, shared_memory=SHARED_MEMORY["sm86"])
    assert 0 < len(kept) < len(configs) and all(any(c is k for c in configs) for k in kept)
    assert [triton_fused._config_dict(c) for c in kept] == want


def test_tuning_key_is_the_length_rounded_up_to_a_power_of_two(monkeypatch):
    """The autotuner's key holds seq_len rounded up to a power of two, so the lengths of
    a bucket share one tuning (each tuning compiles every candidate), and pruning sees the bucket."""
    from variants import triton_fused

    assert triton_fused.tune_length(1) == 16 and triton_fused.tune_length(16) == 16
    assert triton_fused.tune_length(17) == 32 and triton_fused.tune_length(9000) == 16384
    if not triton_fused.HAS_TRITON:
        pytest.skip("Triton is not installed")
    assert triton_fused._attention_fwd_tuned.keys == ["tune_len", "HEAD_DIM", "CAUSAL"]
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((args, kw))

    monkeypatch.setattr(triton_fused, "INTERPRETED", True)  # accept CPU tensors; nothing is compiled
    monkeypatch.setattr(triton_fused, "_attention_fwd_tuned", Recorder())
    for L in (9000, 16000, 16384):
        q = torch.empty(1, 2, L, 64, dtype=torch.float16)
        triton_fused.launch(q, q, q, causal=False)
    assert [args[-1] for args, _ in launched] == [16384] * 3  # one tuning key for the three lengths
    assert [args[-2] for args, _ in launched] == [9000, 16000, 16384]  # the kernel still masks the real length
    named = {"Q": torch.empty(1, 1, 1, 64, dtype=torch.float16), "seq_len": 9000, "tune_len": 16384}
    monkeypatch.setattr(triton_fused, "_shared_memory", lambda device: SHARED_MEMORY["sm90"])
    configs = [triton_fused._triton_config(c) for c in triton_fused.CONFIG_SPACE]
    kept = triton_fused._prune(configs, named, HEAD_DIM=64, CAUSAL=False)
    assert len(kept) == len(triton_fused.feasible_configs(triton_fused.CONFIG_SPACE, seq_len=16384, head_dim=64,
                                                          causal=False, element_bytes=2,
                                                          shared_memory=SHARED_MEMORY["sm90"]))


@pytest.mark.parametrize("gpu", sorted(SHARED_MEMORY))
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_fixed_config_is_feasible_everywhere(gpu, head_dim, causal):
    """The config a correctness sweep uses without tuning fits the shape and the GPU."""
    from variants.triton_fused import CONFIG_SPACE, FIXED_CONFIGS, feasible_configs, fixed_config, tune_length

    cc = 9 if gpu == "sm90" else 8
    shape = dict(head_dim=head_dim, causal=causal, element_bytes=2, shared_memory=SHARED_MEMORY[gpu],
                 compute_capability=cc)
    for L in (1, 777, 16384):
        got = fixed_config(seq_len=L, **shape)
        assert got in feasible_configs(CONFIG_SPACE, seq_len=tune_length(L), **shape)
        if gpu == "sm90" and head_dim <= 128 and L > 64:
            assert got == FIXED_CONFIGS[0]


def test_hopper_keeps_8_warps_only_for_128x128_tiles():
    """Triton's fused-attention tutorial's rule on compute capability 9: fewer candidates to compile."""
    from variants.triton_fused import CONFIG_SPACE, feasible_configs

    shape = dict(seq_len=16384, head_dim=128, causal=False, element_bytes=2, shared_memory=SHARED_MEMORY["sm90"])
    hopper = feasible_configs(CONFIG_SPACE, compute_capability=9, **shape)
    assert all(c["num_warps"] == 4 or c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128 for c in hopper)
    assert len(hopper) == 18 and len(feasible_configs(CONFIG_SPACE, **shape)) == 32


def test_fixed_mode_makes_the_variant_skip_tuning(monkeypatch):
    from variants import triton_fused

    calls = []
    monkeypatch.setattr(triton_fused, "launch", lambda q, k, v, causal, config=None: calls.append(config))
    monkeypatch.delenv(triton_fused.TUNE_ENV, raising=False)
    triton_fused.triton_attention.fn(None, None, None, causal=True)
    monkeypatch.setenv(triton_fused.TUNE_ENV, "fixed")
    triton_fused.triton_attention.fn(None, None, None, causal=True)
    assert calls == [None, "fixed"] and triton_fused.tune_mode() == "fixed"


# --------------------------------------------------------------------------------------------
# GPU only: compiled kernel, autotuning once per key, bfloat16


@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and Triton")
def test_autotunes_on_the_first_call_of_a_key_only(monkeypatch):
    from variants import triton_fused

    tuner = triton_fused._attention_fwd_tuned
    benched = []
    real_bench = tuner._bench
    monkeypatch.setattr(tuner, "_bench", lambda *a, **kw: benched.append(kw["config"]) or real_bench(*a, **kw))
    tuner.cache.clear()
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    triton_fused.launch(q, k, v, causal=True)
    first = len(benched)
    assert first >= 1
    for _ in range(3):
        triton_fused.launch(q, k, v, causal=True)
    assert len(benched) == first  # timed calls reuse the tuned config
    triton_fused.launch(q, k, v, causal=False)  # a new key tunes again
    assert len(benched) > first


@pytest.mark.skipif(
    not HAS_GPU,
    reason="GPU only: Triton's interpreter computes bfloat16 tl.dot wrongly (Triton 3.7), so bfloat16 runs on CUDA",
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads,seq_len,head_dim", [(4, 131, 64), (2, 1024, 128), (1, 257, 256)])
def test_bfloat16_on_gpu(causal, kv_heads, seq_len, head_dim):
    from tests.variant_checks import assert_exact, make_case

    assert_exact(make_case("triton", device="cuda", dtype="bfloat16", causal=causal, kv_heads=kv_heads,
                           seq_len=seq_len, head_dim=head_dim))


if __name__ == "__main__":  # the interpreted child: cases on stdin, results on the last line of stdout
    print(json.dumps(run_cases([tuple(c) for c in json.load(sys.stdin)])))
