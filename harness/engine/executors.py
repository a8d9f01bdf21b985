"""Running cases in a worker process, so a crash, hang or OOM costs one case, not the run.

:class:`WorkerPool` keeps one worker (``python -m harness.engine.worker``) alive across
cases while it is healthy. Per case it sends the case and waits for the row, up
to the case timeout:

* the worker answers: the row is returned as is (``ok``, ``skipped``, ``error``, ``oom``);
* the worker dies (segfault, ``abort()``, the kernel's OOM killer, ``os._exit``):
  a ``crash`` row naming the signal or exit code, with the tail of its stderr
  (made from :func:`harness.core.schema.base_row`: the parent needs no torch for it);
  the next case starts a fresh worker;
* no answer before the timeout (a hang, a deadlock): the worker's process group
  is killed and the row is ``timeout``.

The worker runs in its own session, so a Ctrl-C at the terminal reaches only the
parent, which decides what to do with the case in flight; and it is killed if
the parent dies (Linux ``PR_SET_PDEATHSIG``), so no orphan keeps running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core import schema
from harness.core.cases import Case
from harness.core.schema import CaseResult
from harness.measure.environment import ALLOCATOR_ENV

if TYPE_CHECKING:
    from harness.measure.timing import TimingConfig

STDERR_TAIL_CHARS = 1500
START_TIMEOUT_S = 300.0


def worker_module(code_root: Path) -> str:
    """The worker's module in the project tree at ``code_root`` (older commits kept it at ``harness/worker.py``)."""
    return "harness.worker" if (Path(code_root) / "harness" / "worker.py").is_file() else "harness.engine.worker"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def describe_exit(returncode: int) -> str:
    """'killed by SIGSEGV (signal 11)' or 'exited with status 3'."""
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        text = f"killed by {name} (signal {sig})"
        if sig == signal.SIGKILL:
            text += ", not sent by the harness: most likely the kernel's out-of-memory killer"
        return text
    return f"exited with status {returncode}"


class WorkerPool:
    """Runs cases one at a time in a reusable worker process."""

    def __init__(
        self,
        timing: TimingConfig | dict[str, Any],
        *,
        seed: int = 0,
        memory_budget: int | None = None,
        plugins: list[str] | None = None,
        base_dir: Path | str = ".",
        threads: int | None = None,
        case_timeout_s: float = 900.0,
        log_dir: Path | None = None,
        code_root: Path | str | None = None,
    ):
        self.config = {
            "timing": timing if isinstance(timing, dict) else dataclasses.asdict(timing),
            "seed": seed,
            "memory_budget": memory_budget,
            "plugins": list(plugins or []),
            "base_dir": str(Path(base_dir).resolve()),
            "threads": threads,
        }
        self.case_timeout_s = case_timeout_s
        #: the project tree the worker imports harness and variants from (default: this one; another
        #: one, such as an older commit's, also becomes the worker's working directory)
        self.own_tree = code_root is None
        self.code_root = Path(__file__).resolve().parents[2] if code_root is None else Path(code_root)
        self.log_dir = Path(log_dir) if log_dir else None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._buffer = b""
        self.started = 0  # workers started so far

    # -- worker lifecycle ---------------------------------------------------------------------
    def _start(self) -> None:
        self.started += 1
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.log_dir / f"worker-{self.started}.log"
        else:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="bench-worker-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.setdefault(ALLOCATOR_ENV, "1")  # as harness.measure.environment.pin_allocator; reaches older workers too
        root = str(self.code_root)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", worker_module(self.code_root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            env=env,
            cwd=None if self.own_tree else root,
        )
        log.close()
        self._buffer = b""
        self._send(self.config)
        reply = self._receive(START_TIMEOUT_S)
        if reply is None or "ready" not in reply:
            detail = self._stderr_tail()
            self.kill()
            raise RuntimeError(f"the worker process failed to start: {detail}")

    def _send(self, message: dict[str, Any]) -> None:
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message, or None on timeout or end of output (worker died)."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stderr_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        text = text.strip()
        return ("…" + text[-STDERR_TAIL_CHARS:]) if len(text) > STDERR_TAIL_CHARS else text

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, BrokenPipeError):
                pass
        self.proc = None

    def close(self) -> None:
        """Ask the worker to finish (end of input), kill it if it does not."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired, BrokenPipeError):
            pass
        self.kill()

    # -- cases --------------------------------------------------------------------------------
    def run(self, case: Case, on_phase=None, time_only: bool = False) -> CaseResult:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self._start()
        try:
            self._send({"case": dataclasses.asdict(case), **({"time_only": True} if time_only else {})})
            deadline = time.monotonic() + self.case_timeout_s
            while True:
                reply = self._receive(max(0.0, deadline - time.monotonic()))
                if reply is None or "phase" not in reply:
                    break
                if on_phase is not None:
                    on_phase(reply["phase"])
        except TimeoutError:
            self.kill()
            return self._failed(case, "timeout", f"no result within the case timeout of {self.case_timeout_s:g} s; "
                                                 "the worker was killed")
        except BrokenPipeError:
            reply = None
        if reply is None:
            returncode = self.proc.wait()
            tail = self._stderr_tail()
            self.kill()
            reason = f"worker {describe_exit(returncode)}"
            if tail:
                reason += f"; stderr: {tail}"
            return self._failed(case, "crash", reason)
        return CaseResult(reply["row"], reply["samples_s"])

    def _failed(self, case: Case, status: str, reason: str) -> CaseResult:
        """The row of a case the worker gave none for: its identity and what happened (no torch here:
        the variant's description, FLOPs and estimates come only from a worker)."""
        row = schema.base_row(case, threads=self.config["threads"])
        row.update(status=status, reason=reason)
        return CaseResult(row, [])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class InProcess:
    """Runs cases in this process (``isolation = "none"``): no protection, no overhead."""

    def __init__(self, timing: TimingConfig, *, seed: int = 0, memory_budget: int | None = None, **_: Any):
        self.timing, self.seed, self.memory_budget = timing, seed, memory_budget

    def run(self, case: Case, on_phase=None) -> CaseResult:
        from harness.engine.runner import run_case

        return run_case(case, self.timing, seed=self.seed, memory_budget=self.memory_budget, on_phase=on_phase)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
