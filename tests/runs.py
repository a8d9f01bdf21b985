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


def record_case(writer, row: dict, samples_s: list) -> None:
    """Plant a finished case in a run directory as a run records it: its one round (samples and row),
    then its final row, under one attempt id."""
    import uuid

    attempt = uuid.uuid4().hex[:12]
    writer.append_round(row, samples_s, process=0, attempt_id=attempt)
    writer.append_final(row, attempt_id=attempt)


def measured(case, timing=None, *, time_only: bool = False, **settings) -> dict:
    """``case`` measured in this process with ``timing`` and the other run ``settings`` (seed, memory
    budget …), as the final row a run would record for it (derived columns included)."""
    from harness.core.config import RunSettings, TimingConfig
    from harness.engine.runner import final_row, run_case

    run = RunSettings(timing=timing or TimingConfig(), **settings)
    return final_row(run_case(case, run, time_only=time_only), run.timing.confidence)
