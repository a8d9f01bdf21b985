"""Running ``bench`` as a user would, for the tests: one subprocess helper and the shared tiny suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: A small suite that still exercises every report section: two lengths, causal and not, an exact
#: dense variant, a CUDA-only backend (a skip on CPU), a local variant and an approximate one.
TINY_SUITE = """
name = "tiny-report"
description = "tiny run for the report tests"
[defaults]
heads = 2
head_dim = 16
[sweep]
seq_len = [32, 64]
causal = [false, true]
[timing]
warmup = 1
min_time_s = 0.0
min_reps = 2
max_reps = 3
[[variant]]
name = "naive"
[[variant]]
name = "sdpa"
backend = ["flash", "efficient"]
[[variant]]
name = "sliding_window"
window = 8
[[variant]]
name = "linear"
"""


def bench(*args, cwd=None, env=None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` in a fresh process (text output captured)."""
    proc = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def bench_run(tmp: Path, suite_text: str, *extra) -> Path:
    """``bench run`` of ``suite_text`` into ``tmp/run``; returns the run directory."""
    return bench_run_process(tmp, suite_text, *extra)[1]


def bench_run_process(tmp: Path, suite_text: str, *extra) -> tuple[subprocess.CompletedProcess, Path]:
    """``bench run`` of ``suite_text`` into ``tmp/run`` (must succeed): the process and the run directory."""
    suite = tmp / "suite.toml"
    suite.write_text(suite_text)
    out = tmp / "run"
    return bench("run", suite, "-o", out, "--quiet", *extra, check=True), out
