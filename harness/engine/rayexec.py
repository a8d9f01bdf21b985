"""The Ray executor (``--executor ray``, ``[run] executor = "ray"``): each case a Ray task, on any
node of a Ray cluster (``--ray-address``, else ``RAY_ADDRESS``, else a local Ray started for the run).

We do not schedule: Ray places each task where its resources are free — ``num_gpus = 1`` (and one
CPU) for a CUDA case, ``num_cpus = [timing] threads`` for a CPU case (without ``threads`` a CPU
case uses every core, so it asks for as many CPUs as the largest node has: a node to itself). On its
node the task runs the case in our own worker isolation: through
:class:`harness.engine.executors.WorkerPool` s of that node, one per round (``[timing] processes``),
so each round runs in another worker process (one case's rounds run back to back on one node,
rather than interleaved with other cases' as on one machine), and crash, timeout, OOM and
CUDA-error rows are made exactly as by the process executor. The pools stay up from one task to
the next in the same Ray worker (:func:`node_pools`), as the process executor keeps one worker per
round from case to case, so a case costs a task dispatch, not a process start. The task first yields its node (id
and host), then the case's rounds; the run keeps about as many tasks in flight as the cluster has
slots, and records each case's rounds and final row (:class:`harness.engine.rounds.Rounds`:
appended and fsync'ed) as soon as it comes back, in whatever order cases finish. So ``bench
resume``, the SIGINT handling (the first signal: the cases already sent finish, no more are sent;
a second: the run stops at once, in-flight cases are cancelled and resume re-runs them), the
circuit breaker and the report work as with the process executor.

A node lost, or the task's Ray worker dying, mid-case (``NodeDiedError``, ``WorkerCrashedError``,
``ObjectLostError`` …) gives the case one retry, sent away from the node it was on (a label
selector on ``ray.io/node-id``) when another live node has the resources, else wherever Ray can
place it; if that attempt is lost too, the case gets a ``crash`` row, "node lost: …".

Rows carry the ``host`` and ``machine_fingerprint`` of the node (:func:`node_identity`: the
machine as run.json would record it, not as the task's restricted device view shows it). A node
whose torch, Python or project commit differs from the run's gives its cases an ``error`` row
instead of measuring them with other code. Every node must have the project and its plugins at
the same paths (a shared file system or one image). ``--profile`` is not available with this executor.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from harness.core import schema
from harness.core.cases import Case
from harness.core.config import RunSettings
from harness.core.schema import CaseResult
from harness.engine.executors import CircuitBreaker

if TYPE_CHECKING:
    from harness.engine.suite import Suite

#: Ray's exceptions that mean the node or the task's worker was lost (not the case's own failure).
LOST = ("NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError",
        "NodeLostError")
#: The label every Ray node carries with its id (used to send a retry elsewhere).
NODE_LABEL = "ray.io/node-id"
INSTALL_HINT = "pip install -e '.[ray]'"


def option_problem(suite: Suite, isolation: str | None = None) -> str | None:
    """Why ``suite``'s ``[run] executor`` cannot be used here (one line), or None."""
    if suite.run.executor != "ray":
        return None
    if (isolation or suite.run.isolation) == "none":
        return ("run.executor = \"ray\" runs every case in a worker process on its node; it does not combine "
                "with isolation = \"none\"")
    try:
        import ray  # noqa: F401
    except ImportError:
        return f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}"
    return None


def node_identity() -> dict[str, str]:
    """This node's ``host`` and ``machine_fingerprint`` as :func:`harness.measure.environment.machine`
    sees it in a plain process: computed in a fresh interpreter without the device restriction Ray
    sets on a task (``CUDA_VISIBLE_DEVICES``), once per node and boot, cached in a private per-user
    directory (:func:`cache_dir`; a cached file that is not exactly such an identity is ignored)."""
    if _NODE:
        return dict(_NODE)
    cache = _cache_file()
    cached = _read_identity(cache) if cache is not None else None
    _NODE.update(cached or _probe_identity())
    if cached is None and cache is not None:
        from harness.core import safefs

        try:
            safefs.write_text(cache, json.dumps({k: _NODE.get(k) for k in IDENTITY_KEYS}), root=cache.parent)
        except OSError:
            pass  # no cache: the next task probes again
    return dict(_NODE)


_NODE: dict[str, str] = {}
IDENTITY_KEYS = ("host", "machine_fingerprint")
_BOOT_ID = re.compile(r"[0-9a-fA-F-]{8,64}")


def cache_dir() -> Path | None:
    """A directory only this user can write, for the node cache: ``$XDG_CACHE_HOME/attention-bench``,
    else ``~/.cache/attention-bench`` (created ``0700``); None when there is no such directory (not
    ours, a symlink, not a directory), and then nothing is cached."""
    base = os.environ.get("XDG_CACHE_HOME")
    try:
        root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
        path = root / "attention-bench"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return None
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)
        return path
    except (OSError, RuntimeError, KeyError):
        return None


def _cache_file() -> Path | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    directory = cache_dir() if _BOOT_ID.fullmatch(boot) else None
    return directory / f"host-{boot}.json" if directory is not None else None


def _read_identity(path: Path) -> dict[str, str] | None:
    """The identity cached at ``path``: a regular file (not a symlink) holding exactly ``host`` and
    ``machine_fingerprint`` as short strings; None for anything else."""
    from harness.core import safefs

    try:
        with safefs.open_regular(path) as f:
            data = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or set(data) != set(IDENTITY_KEYS):
        return None
    if not all(isinstance(v, str) and 0 < len(v) <= 256 and v.isprintable() for v in data.values()):
        return None
    return {k: data[k] for k in IDENTITY_KEYS}
_PROBE = "import json; from harness.measure.environment import host_identity; print(json.dumps(host_identity()))"


def _probe_identity() -> dict[str, str]:
    hidden = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        from harness.measure.environment import host_identity

        return host_identity()


def code_identity() -> dict[str, Any]:
    """What a node must share with the run: torch, Python, the project commit (None: not a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    from harness.measure.environment import git_commit

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = None
    return {"torch": torch, "python": sys.version.split()[0], "commit": git_commit()["commit"]}


def _mismatch(expected: dict[str, Any]) -> str | None:
    """How this node's code differs from ``expected`` (:func:`code_identity` of the run), or None. A
    commit this node cannot tell (its tree is not a git checkout, e.g. an image) is not a difference."""
    mine = code_identity()
    diffs = [f"{k} {mine.get(k)} (the run's: {v})" for k, v in expected.items()
             if v is not None and mine.get(k) != v and not (k == "commit" and mine.get(k) is None)]
    return "; ".join(diffs) or None


#: This Ray worker's worker pools, one per round, kept between its tasks: {key: [pool of round 0, 1, ...]}.
_POOLS: dict[str, list[Any]] = {}


def node_pools(pool: dict[str, Any], device: str, processes: int) -> list[Any]:
    """One :class:`WorkerPool` per round for this Ray worker, kept from task to task (as the process
    executor keeps one worker per round from case to case), so a case costs no process start once
    the pools run; new ones when the run's settings, the case's device kind or the GPU Ray gave this
    worker (``CUDA_VISIBLE_DEVICES``) change. Their memory budget: this node's (the share of its CPUs
    a CPU case holds), unless the run gave one."""
    from harness.engine.executors import WorkerPool

    key = json.dumps([pool, device, os.environ.get("CUDA_VISIBLE_DEVICES")], sort_keys=True, default=str)
    if key not in _POOLS:
        close_pools()
        _POOLS[key] = []
    pools = _POOLS[key]
    settings = RunSettings.from_json(pool["settings"])
    while len(pools) < processes:
        if settings.memory_budget is None:
            from harness.measure.environment import available_memory_bytes

            share = min(1.0, (settings.threads or os.cpu_count() or 1) / (os.cpu_count() or 1))
            available = available_memory_bytes() or 8 * 2**30
            fraction = pool["memory_budget_fraction"]
            settings = dataclasses.replace(
                settings, memory_budget=int(available * fraction * (share if device == "cpu" else 1.0)))
        pools.append(WorkerPool(settings, env=pool.get("env")))
    return pools


def close_pools() -> None:
    """Close this Ray worker's worker pools (their processes end)."""
    for pools in _POOLS.values():
        for workers in pools:
            workers.close()
    _POOLS.clear()


atexit.register(close_pools)


def run_on_node(pool: dict[str, Any], case: dict[str, Any], processes: int,
                expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """One case on this node (the body of the Ray task): round 0 fully and, while the case stays
    ``ok``, rounds 1.. timing only, each in its own worker process (:func:`node_pools`). Returns
    ``{"rounds": [{"row", "samples_s"}, ...], "node": identity}``."""
    identity = node_identity()
    the_case = Case(**case)
    problem = _mismatch(expected or {})
    if problem is None:
        try:
            rounds = []
            for index, workers in enumerate(node_pools(pool, the_case.device, processes)[:processes]):
                workers.identity = identity
                result = workers.run(the_case, time_only=index > 0)
                rounds.append({"row": result.row, "samples_s": result.samples_s})
                if result.row.get("status") != "ok" or not result.samples_s:
                    break
            return {"rounds": rounds, "node": identity}
        except Exception as exc:  # a worker could not start here: this case's row says so
            problem = f"{type(exc).__name__}: {exc}"
    else:
        problem = f"this node runs other code: {problem}"
    row = schema.base_row(the_case, threads=(pool.get("settings") or {}).get("threads"))
    row.update(identity, status="error", reason=f"on {identity.get('host')}: {problem}")
    return {"rounds": [{"row": row, "samples_s": []}], "node": identity}


def _node_task(pool: dict[str, Any], case: dict[str, Any], processes: int, expected: dict[str, Any]):
    """The Ray task: yields where it runs (node id, host), then :func:`run_on_node`'s result."""
    import socket

    import ray

    yield {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}
    yield run_on_node(pool, case, processes, expected)


def resources(case: Case, threads: int | None, largest_node_cpus: float) -> dict[str, float]:
    """What the Ray task of ``case`` asks for: a GPU (and a CPU) for a CUDA case; ``threads`` CPUs
    for a CPU case, or, without ``threads`` (torch uses every core), the largest node's CPUs."""
    if case.device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": threads or max(1, int(largest_node_cpus)), "num_gpus": 0}


@dataclass
class _Attempt:
    case: Case
    resources: dict[str, float]
    node: dict[str, Any] | None = None
    lost: str = ""  # why the first attempt was lost (set on the retry)
    retry_where: str = ""


class RayExecutor:
    """Sends each case to a Ray task (see the module doc); :meth:`run_cases` is the run loop."""

    def __init__(self, settings: RunSettings, *, address: str | None = None, env: dict[str, str] | None = None,
                 budget_fraction: float = 0.6, log: Callable[[str], None] | None = None):
        self.log = log or (lambda message: print(message, file=sys.stderr))
        if settings.profile:
            self.log("--profile: not available with the Ray executor; the cases are not profiled")
        # settings.memory_budget: the user's, else None (each node budgets its own memory: node_pools)
        settings = dataclasses.replace(settings, profile=None,
                                       memory_budget_explicit=settings.memory_budget is not None,
                                       base_dir=str(Path(settings.base_dir).resolve()))
        self.pool = dict(settings=settings.to_json(), env=dict(env or {}), memory_budget_fraction=budget_fraction)
        self.threads = settings.threads
        self.address = address
        self.breaker = CircuitBreaker()
        self.ray: Any = None
        self._started = False
        self._flight: dict[Any, _Attempt] = {}

    # -- Ray --------------------------------------------------------------------------------------
    def __enter__(self) -> RayExecutor:
        import ray

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="warning", log_to_driver=False)
            self._started = True
        self._task = ray.remote(_node_task)
        self._lost = tuple(getattr(ray.exceptions, name) for name in LOST if hasattr(ray.exceptions, name))
        total = ray.cluster_resources()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        self.log(f"ray: {len(alive)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
                 f"{' (' + self.address + ')' if self.address else ''}")
        return self

    def close(self) -> None:
        for ref in list(self._flight):  # only left after a second signal: the cases resume later
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        self._flight.clear()
        if self._started:
            self.ray.shutdown()
            self._started = False

    def __exit__(self, *exc) -> Literal[False]:
        self.close()
        return False

    def _nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def _slots(self) -> int:
        """Tasks to keep in flight: as many as the cluster can run at once."""
        total = self.ray.cluster_resources()
        per_case = self.threads or max([n.get("Resources", {}).get("CPU", 1) for n in self._nodes()] or [1])
        return max(1, int(total.get("CPU", 0) // max(per_case, 1)) + int(total.get("GPU", 0)))

    def _submit(self, attempt: _Attempt, expected: dict[str, Any], processes: int, **placement: Any) -> None:
        options = dict(attempt.resources, max_retries=0, **placement)
        ref = self._task.options(**options).remote(self.pool, dataclasses.asdict(attempt.case), processes, expected)
        self._flight[ref] = attempt

    def _elsewhere(self, attempt: _Attempt) -> tuple[dict[str, Any], str]:
        """Placement of a retry: away from the node the lost attempt ran on when another live node has
        the resources ((options, where in words)); else anywhere."""
        node = (attempt.node or {}).get("node_id")
        need_gpu, need_cpu = attempt.resources.get("num_gpus", 0), attempt.resources.get("num_cpus", 0)
        others = [n for n in self._nodes() if n.get("NodeID") != node
                  and n.get("Resources", {}).get("GPU", 0) >= need_gpu
                  and n.get("Resources", {}).get("CPU", 0) >= need_cpu]
        if node and others:
            return {"label_selector": {NODE_LABEL: f"!{node}"}}, "on another node"
        return {}, "wherever Ray could place it (no other node had the resources)" if node else "on any node"

    # -- the run loop ------------------------------------------------------------------------------
    def run_cases(self, cases: list[Case], rounds: Any, progress: Any = None,
                  stop: Callable[[], bool] = lambda: False) -> int:
        """Run ``cases`` on the cluster, recording each case's rounds and final row through ``rounds``
        (:class:`harness.engine.rounds.Rounds`: its writer and process count) as it comes back;
        until ``stop()`` says so (then the cases in flight finish). Returns how many cases got their
        final row."""
        processes = rounds.processes
        env = rounds.writer.meta.get("environment") or {}
        expected = {"torch": (env.get("versions") or {}).get("torch"),
                    "python": (env.get("versions") or {}).get("python"), "commit": (env.get("git") or {}).get("commit")}
        largest = max([n.get("Resources", {}).get("CPU", 1) for n in self._nodes()] or [1])
        queue = collections.deque(_Attempt(c, resources(c, self.threads, largest)) for c in cases)
        done = 0
        while queue or self._flight:
            if queue and not stop():
                slots = self._slots()
                while queue and len(self._flight) < slots:
                    self._submit(queue.popleft(), expected, processes)
            if not self._flight:
                break
            ready, _ = self.ray.wait(list(self._flight), num_returns=1, timeout=1.0)
            for ref in ready:
                attempt = self._flight.pop(ref)
                kind, value = self._next(ref)
                if kind == "node":
                    attempt.node = value
                    self._flight[ref] = attempt
                    if progress is not None:
                        progress.start(attempt.case)
                elif kind == "lost" and not attempt.lost:
                    attempt.lost = value
                    placement, attempt.retry_where = self._elsewhere(attempt)
                    self.log(f"ray: {attempt.case.label()}: node lost ({value}); retrying {attempt.retry_where}")
                    attempt.node = None
                    self._submit(attempt, expected, processes, **placement)
                else:
                    final = self._record(rounds, attempt, kind, value)
                    done += final is not None
                    if progress is not None and final is not None:
                        progress.finish(attempt.case, final)
        return done

    def _next(self, ref: Any) -> tuple[str, Any]:
        """The task's next item: ("node", where it runs), ("result", run_on_node's), ("lost", why) or
        ("error", why: the task itself failed)."""
        ray = self.ray
        try:
            item = ray.get(next(ref))
        except StopIteration:
            return "lost", "the task ended without a result"
        except self._lost as exc:
            return "lost", f"{type(exc).__name__}: {_first_line(exc)}"
        except Exception as exc:  # RayTaskError and the like: a failure of the task, not of the node
            return "error", f"{type(exc).__name__}: {_first_line(exc)}"
        return ("node", item) if "node_id" in item else ("result", item)

    def _record(self, rounds: Any, attempt: _Attempt, kind: str, value: Any) -> dict[str, Any] | None:
        case = attempt.case
        if kind == "result":
            final = None
            for index, r in enumerate(value["rounds"]):
                final = rounds.record(case, index, CaseResult(r["row"], r["samples_s"]))
            if final is not None:
                self.breaker.record(final)
                return final
            kind, value = "error", f"the node returned {len(value['rounds'])} of the case's rounds"
        row = schema.base_row(case, threads=self.threads)
        host = (attempt.node or {}).get("host")
        row.update(host=host, machine_fingerprint=None)
        if kind == "lost":
            again = "the same way" if value == attempt.lost else f"({value})"
            row.update(status="crash",
                       reason=f"node lost: {attempt.lost}; retried {attempt.retry_where}: lost again {again}")
        else:
            row.update(status="error", reason=f"the Ray task failed{' on ' + host if host else ''}: {value}")
        final = rounds.record(case, 0, CaseResult(row, []))
        self.breaker.record(final)
        return final


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
