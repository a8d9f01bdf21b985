"""A stand-in for the parts of Ray's API that :mod:`harness.engine.rayexec` uses, for tests that
must not need Ray (too heavy for CI): ``ray.init``/``is_initialized``/``shutdown``,
``ray.remote(f).options(num_cpus=, num_gpus=, max_retries=, label_selector=).remote(...)`` returning
a streaming generator, ``ray.wait``, ``ray.get``, ``ray.cancel``, ``ray.nodes``,
``ray.cluster_resources``, ``ray.get_runtime_context().get_node_id()`` and
``ray.exceptions.NodeDiedError``/``WorkerCrashedError``/``RayTaskError``.

Tasks run in this process, one item at a time, when :func:`wait` picks them: ``order = "lifo"``
(default) advances the most recently submitted task first, so cases finish in another order than
they were sent. Each task is placed, like Ray, on a live node with the resources it asks for that
its label selector allows (the first such node in the list, round-robin); ``submitted`` records
every task's options and node.
"""

from __future__ import annotations

import itertools
import types
from typing import Any


class RayError(Exception):
    pass


class NodeDiedError(RayError):
    pass


class WorkerCrashedError(RayError):
    pass


class RayTaskError(RayError):
    pass


class _Ref:
    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error


class _Generator:
    """A submitted task: a Python generator advanced one item at a time."""

    def __init__(self, ray: FakeRay, fn, args, options: dict[str, Any], node: dict[str, Any]):
        self.ray, self.options, self.node = ray, options, node
        self._gen = fn(*args)
        self._ready: _Ref | None = None
        self.done = False

    def advance(self) -> None:
        self.ray.current_node = self.node
        try:
            self._ready = _Ref(next(self._gen))
        except StopIteration:
            self.done = True
        except (NodeDiedError, WorkerCrashedError) as exc:
            self._ready, self.done = _Ref(error=exc), True
        except Exception as exc:  # the task's own exception, as Ray wraps it
            self._ready, self.done = _Ref(error=RayTaskError(f"{type(exc).__name__}: {exc}")), True
        finally:
            self.ray.current_node = None

    def __next__(self) -> _Ref:
        if self._ready is None:
            raise StopIteration
        ref, self._ready = self._ready, None
        return ref


class _Remote:
    def __init__(self, ray: FakeRay, fn, options: dict[str, Any]):
        self.ray, self.fn, self._options = ray, fn, options

    def options(self, **options: Any) -> _Remote:
        return _Remote(self.ray, self.fn, {**self._options, **options})

    def remote(self, *args: Any) -> _Generator:
        node = self.ray.place(self._options)
        task = _Generator(self.ray, self.fn, args, self._options, node)
        self.ray.submitted.append({"options": dict(self._options), "node": node["NodeID"], "args": args})
        self.ray.pending.append(task)
        return task


class FakeRay(types.ModuleType):
    def __init__(self, nodes: list[dict[str, Any]] | None = None, order: str = "lifo"):
        super().__init__("ray")
        self.exceptions = types.SimpleNamespace(NodeDiedError=NodeDiedError, WorkerCrashedError=WorkerCrashedError,
                                                RayTaskError=RayTaskError, RayError=RayError)
        self.node_list = nodes or [{"NodeID": "a" * 56, "Alive": True, "NodeManagerHostname": "node-a",
                                    "Resources": {"CPU": 4.0, "GPU": 1.0}}]
        self.order = order
        self.initialized = False
        self.init_calls: list[dict[str, Any]] = []
        self.submitted: list[dict[str, Any]] = []
        self.pending: list[_Generator] = []
        self.cancelled: list[Any] = []
        self.current_node: dict[str, Any] | None = None
        self._turn = itertools.count()

    # -- lifecycle ---------------------------------------------------------------------------------
    def init(self, address: str | None = None, **kw: Any) -> None:
        self.init_calls.append({"address": address, **kw})
        self.initialized = True

    def is_initialized(self) -> bool:
        return self.initialized

    def shutdown(self) -> None:
        self.initialized = False

    # -- cluster -----------------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        return [dict(n) for n in self.node_list]

    def cluster_resources(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for node in self.node_list:
            if node["Alive"]:
                for k, v in node["Resources"].items():
                    total[k] = total.get(k, 0.0) + v
        return total

    def get_runtime_context(self):
        node = self.current_node
        return types.SimpleNamespace(get_node_id=lambda: node["NodeID"])

    def place(self, options: dict[str, Any]) -> dict[str, Any]:
        """A live node with the resources and labels the task asks for (round-robin among them)."""
        selector = options.get("label_selector") or {}
        fits = []
        for node in self.node_list:
            res = node["Resources"]
            if not node["Alive"] or res.get("GPU", 0) < options.get("num_gpus", 0) or \
                    res.get("CPU", 0) < options.get("num_cpus", 1):
                continue
            wanted = selector.get("ray.io/node-id")
            if wanted is not None and (node["NodeID"] == wanted[1:] if wanted.startswith("!")
                                       else node["NodeID"] != wanted):
                continue
            fits.append(node)
        if not fits:
            raise AssertionError(f"fake ray: no node can run a task with {options} (Ray would wait forever)")
        return fits[next(self._turn) % len(fits)]

    # -- tasks -------------------------------------------------------------------------------------
    def remote(self, fn) -> _Remote:
        return _Remote(self, fn, {})

    def wait(self, refs: list[_Generator], num_returns: int = 1, timeout: float | None = None):
        waiting = [r for r in (reversed(refs) if self.order == "lifo" else refs)]
        ready = []
        for task in waiting[:num_returns]:
            task.advance()
            ready.append(task)
        return ready, [r for r in refs if r not in ready]

    def get(self, ref: _Ref) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref: Any, force: bool = False) -> None:
        self.cancelled.append(ref)
