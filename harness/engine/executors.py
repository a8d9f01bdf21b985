"""Running cases in a worker process, so a crash, hang or OOM costs one case, not the run.

:class:`WorkerPool` keeps one worker (``python -m harness.engine.worker``) alive across
cases while it is healthy. Per case it sends the case and waits for the row, up
to the case timeout:

* the worker answers: the row is returned as is (``ok``, ``skipped``, ``error``, ``oom``,
  ``cuda_error``); when the answer says the worker's CUDA state is poisoned (``restart``: a sticky
  CUDA error, a failed CUDA-graph capture) the worker is closed and the next case starts a fresh one;
* the worker dies (segfault, ``abort()``, the kernel's OOM killer, ``os._exit``):
  a ``crash`` row naming the signal or exit code, with the tail of its stderr
  (made from :func:`harness.core.schema.base_row`: the parent needs no torch for it);
  the next case starts a fresh worker;
* no answer before the timeout (a hang, a deadlock): the worker's process group
  is killed and the row is ``timeout``.

Every executor feeds its rows to a :class:`CircuitBreaker`: after a few consecutive ``crash`` or
``cuda_error`` rows (a lost GPU) it trips, and the run loop stops with its message instead of
turning every remaining case into one more such row.

The worker runs in its own session, so a Ctrl-C at the terminal reaches only the
parent, which decides what to do with the case in flight; and it is killed if
the parent dies (Linux ``PR_SET_PDEATHSIG``), so no orphan keeps running.

The worker inherits this process's environment as it is, plus ``env`` when given (e.g.
``THP_MEM_ALLOC_ENABLE=1`` for ``[run] allocator = "thp"``): nothing else is set for it.
:meth:`WorkerPool.new_process` retires the worker so that the next case starts a fresh one (a
new round of :func:`harness.engine.lifecycle.run_cases`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harness.core import schema
from harness.core.cases import Case
from harness.core.config import RunSettings
from harness.core.schema import CaseResult

if TYPE_CHECKING:
    from harness.engine.rounds import Rounds

STDERR_TAIL_CHARS = 1500
START_TIMEOUT_S = 300.0


class CircuitBreaker:
    """Ends a run only when the device is really gone. After ``limit`` consecutive rows whose status
    says the worker died (:data:`STATUSES`) — an ``ok`` row (or any other outcome) resets the count, a
    ``skipped`` one (nothing ran) neither counts nor resets — it asks: were any of them CUDA cases (or
    CUDA errors)? If none were, a plugin's kernels are crashing their own cases (they are quarantined,
    harness.engine.rounds.Quarantine) and the run goes on: a CPU run never aborts for crashes. If some
    were, it runs ``probe()`` (a tiny sdpa case in a fresh worker: None when it passes, else why not):
    a passing probe means the GPU is fine and the run goes on; a failing one trips the breaker.
    ``tripped`` holds the message once it has tripped."""

    STATUSES = ("crash", "cuda_error")

    def __init__(self, limit: int = 3, probe: Callable[[], str | None] | None = None,
                 log: Callable[[str], None] | None = None):
        self.limit = limit
        self.probe = probe
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.streak: list[dict[str, Any]] = []
        self.tripped: str | None = None
        self.probes = 0

    def record(self, row: dict[str, Any]) -> str | None:
        """Count one finished row; the message when this row trips the breaker, else None."""
        status = row.get("status")
        if status in self.STATUSES:
            self.streak.append(row)
        elif status != "skipped":
            self.streak = []
        if self.tripped is not None or len(self.streak) < self.limit:
            return None
        streak, self.streak = self.streak, []
        kinds = "/".join(sorted({r["status"] for r in streak}))
        last = str(streak[-1].get("reason", ""))[:300]
        if not any(r.get("status") == "cuda_error" or str(r.get("device", "")).startswith("cuda") for r in streak):
            return None  # no device to lose: the crashing variants are quarantined, the others go on
        self.probes += 1
        problem = self.probe() if self.probe is not None else "no health probe for this executor"
        if problem is None:
            self.log(f"{len(streak)} consecutive cases ended in {kinds}; a health probe (a small sdpa case in a "
                     "fresh worker) passed, so the GPU is fine and the run goes on")
            return None
        self.trip(f"{len(streak)} consecutive cases ended in {kinds} (the last: {last}) and a health probe failed "
                  f"({problem[:300]}): the GPU looks lost, so the run stops here; once it is fixed, bench resume the "
                  "run")
        return self.tripped

    def trip(self, message: str) -> None:
        self.tripped = self.tripped or message


def case_message(case: Case) -> dict[str, Any]:
    """``case`` as the worker protocol sends it (:meth:`harness.core.cases.Case.message`)."""
    return case.message()


class Executor(Protocol):
    """What :func:`harness.engine.lifecycle.execute` needs of an executor: run the cases' rounds into a
    :class:`harness.engine.rounds.Rounds` (one at a time or in parallel, as the executor does it), and
    a circuit breaker the run loop watches. Executors are context managers."""

    breaker: CircuitBreaker

    def run_cases(self, cases: list[Case], rounds: Rounds, progress: Any = None,
                  stop: Callable[[], bool] = ...) -> int: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: Any) -> bool: ...


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

    def __init__(self, settings: RunSettings, *, log_dir: Path | None = None, code_root: Path | str | None = None,
                 env: dict[str, str] | None = None, recorded_timing: dict[str, Any] | None = None):
        self.settings = settings
        #: the worker's first message: the settings (plugins resolved against the suite's directory);
        #: ``recorded_timing``: the ``[timing]`` table as another commit's run recorded it, sent as it is
        #: to that commit's worker (``code_root``), whose settings may have other keys than ours
        self.config = dict(settings.to_json(), base_dir=str(Path(settings.base_dir).resolve()))
        if recorded_timing is not None:
            self.config["timing"] = dict(recorded_timing)
        self.case_timeout_s = settings.case_timeout_s
        #: variables set in the workers' environment on top of this process's (none by default)
        self.env = dict(env or {})
        #: the project tree the worker imports harness and variants from (default: this one; another
        #: one, such as an older commit's, also becomes the worker's working directory)
        self.own_tree = code_root is None
        self.code_root = Path(__file__).resolve().parents[2] if code_root is None else Path(code_root)
        self.log_dir = Path(log_dir) if log_dir else None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.temp_log = False  # log_path is a temporary file of ours (no log_dir)
        self._buffer = b""
        self.started = 0  # workers started so far
        self.breaker = CircuitBreaker(probe=self.health_probe)
        #: the rows' host and machine_fingerprint columns (harness.engine.lifecycle.make_executor sets this
        #: machine's, harness.engine.rayexec its node's; None: left empty, and the parent needs no torch)
        self.identity: dict[str, str] | None = None

    # -- worker lifecycle ---------------------------------------------------------------------
    def _start(self) -> None:
        self.started += 1
        from harness.core import safefs  # the run directory's logs/: never through a symlink it holds

        self.temp_log = False
        if self.log_dir is not None:
            safefs.makedirs(self.log_dir)
            self.log_path = self.log_dir / f"worker-{self.started}.log"
            log = safefs.open_new(self.log_path)
        else:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="bench-worker-", suffix=".log")  # private (0600), removed on success
            self.log_path, self.temp_log = Path(name), True
            log = os.fdopen(fd, "wb")
        env = dict(os.environ, **self.env)
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
        assert self.proc is not None and self.proc.stdin is not None  # a started worker, its stdin a pipe
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message, or None on timeout or end of output (worker died)."""
        assert self.proc is not None and self.proc.stdout is not None  # a started worker, its stdout a pipe
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
                if stream is not None:  # always: both are pipes
                    stream.close()
            except (OSError, BrokenPipeError):
                pass
        self.proc = None

    def close(self) -> None:
        """Ask the worker to finish (end of input), kill it if it does not. A temporary log (no
        ``log_dir``) of a worker that ended cleanly is removed; a failed worker's stays."""
        if self.proc is None:
            return
        clean = False
        try:
            if self.proc.stdin is not None:  # always: a pipe
                self.proc.stdin.close()
            clean = self.proc.wait(timeout=10) == 0
        except (OSError, subprocess.TimeoutExpired, BrokenPipeError):
            pass
        self.kill()
        if clean:
            self._remove_temp_log()

    def _remove_temp_log(self) -> None:
        if self.temp_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        self.temp_log = False

    def new_process(self) -> None:
        """Retire the worker: the next case starts a fresh process."""
        self.close()

    # -- cases --------------------------------------------------------------------------------
    def run_cases(self, cases: list[Case], rounds: Rounds, progress: Any = None,
                  stop: Callable[[], bool] = lambda: False) -> int:
        """The cases one at a time, round after round (:func:`harness.engine.rounds.run_sequential`)."""
        from harness.engine.rounds import run_sequential

        return run_sequential(self, cases, rounds, progress=progress, stop=stop)

    def run(self, case: Case, on_phase=None, time_only: bool = False) -> CaseResult:
        """One case in the worker (started if needed); its result, seen by the circuit breaker."""
        return self._observed(self._run(case, on_phase, time_only))

    def _run(self, case: Case, on_phase, time_only: bool) -> CaseResult:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self._start()
        try:
            self._send({"case": case_message(case), **({"time_only": True} if time_only else {})})
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
            assert self.proc is not None  # started above; only a timeout kills it, and that returned
            returncode = self.proc.wait()
            tail = self._stderr_tail()
            self.kill()
            reason = f"worker {describe_exit(returncode)}"
            if tail:
                reason += f"; stderr: {tail}"
            return self._failed(case, "crash", reason)
        result = CaseResult(reply["row"], reply["samples_s"], restart=reply.get("restart", ""))
        if result.restart:  # the worker said its CUDA state is poisoned (and exits): the next case gets a fresh one
            self.close()
        return result

    def health_probe(self) -> str | None:
        """Whether the GPU still works: a tiny sdpa case in a fresh worker (None: it ran ``ok``; else why not)."""
        self.close()
        probe = Case("sdpa", {"backend": "math"}, device="cuda", batch=1, heads=1, kv_heads=1, seq_len=16, head_dim=16)
        try:
            result = self._run(probe, None, True)
        except Exception as exc:  # the worker could not even start
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.close()
        row = result.row
        return None if row.get("status") == "ok" else f"{row.get('status')}: {row.get('reason')}"

    def _observed(self, result: CaseResult) -> CaseResult:
        result.row.update(self.identity or {})
        self.breaker.record(result.row)
        return result

    def _failed(self, case: Case, status: str, reason: str) -> CaseResult:
        """The row of a case the worker gave none for: its identity and what happened (no torch here:
        the variant's description, FLOPs and estimates come only from a worker)."""
        row = schema.base_row(case, threads=self.settings.threads)
        row.update(status=status, reason=reason)
        return CaseResult(row, [])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class InProcess:
    """Runs cases in this process (``isolation = "none"``): no protection, no overhead."""

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.breaker = CircuitBreaker()

    def run_cases(self, cases: list[Case], rounds: Rounds, progress: Any = None,
                  stop: Callable[[], bool] = lambda: False) -> int:
        from harness.engine.rounds import run_sequential

        return run_sequential(self, cases, rounds, progress=progress, stop=stop)

    def run(self, case: Case, on_phase=None, time_only: bool = False) -> CaseResult:
        from harness.engine.runner import run_case
        from harness.measure.environment import host_identity

        result = run_case(case, self.settings, on_phase=on_phase, time_only=time_only)
        result.row.update(host_identity())
        self.breaker.record(result.row)
        if result.restart:  # this process's CUDA context cannot be replaced: end the run cleanly
            self.breaker.trip(f"{case.label()}: {result.row['reason']}; this process's CUDA context is unusable "
                              "after it (--isolation none), so the run stops here; --isolation process replaces "
                              "the worker instead")
        return result

    def new_process(self) -> None:
        """There is only this process (``processes`` is 1 without isolation)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
