"""A fake of the pieces of ``torch.cuda`` the timing code uses, so its CUDA paths run on a CPU.

:class:`FakeCuda` keeps two clocks: the host's (what ``time.perf_counter`` would say, passed to
``time_call`` as ``clock``) and the GPU's (what CUDA events record). A fake kernel,
:meth:`FakeCuda.kernel`, advances both by the amounts it is given. Events record the GPU clock;
``synchronize`` does nothing (the fake GPU is always done); streams, graphs and the current stream
are tracked so tests can check what capture leaves behind. ``install(monkeypatch)`` puts it in
place of ``torch.cuda``'s functions for the test.
"""

from __future__ import annotations

import gc

import torch


class FakeCuda:
    def __init__(self, capture_fails: bool = False):
        self.host_t = 0.0
        self.gpu_t = 0.0
        self.capture_fails = capture_fails
        self.default = FakeStream(self, "default")
        self.current = self.default
        self.captures = 0
        self.replays = 0
        self.gc_during_capture = None
        self.capturing = None  # the graph being captured: kernels are recorded into it, not run

    # -- clocks ---------------------------------------------------------------------------------
    def clock(self) -> float:
        return self.host_t

    def kernel(self, gpu_s: float, host_s: float = 0.0):
        """A callable that costs ``host_s`` on the host and ``gpu_s`` on the GPU per call."""

        def call():
            if self.capturing is not None:
                self.capturing.calls.append(call)
                return
            self.host_t += host_s
            self.gpu_t += gpu_s

        return call

    # -- torch.cuda -----------------------------------------------------------------------------
    def install(self, monkeypatch) -> FakeCuda:
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = fake.gpu_t

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        class CUDAGraph:
            def __init__(self):
                self.calls = []

            def replay(self):
                fake.replays += 1
                for call in self.calls:
                    call()

        class graph:  # torch.cuda.graph: on a failed capture_end it leaves its stream context open
            def __init__(self, cuda_graph, pool=None, stream=None, **kw):
                self.g, self.stream = cuda_graph, stream or FakeStream(fake, "capture")

            def __enter__(self):
                fake.captures += 1
                fake.gc_during_capture = gc.isenabled()
                self.prev, fake.current = fake.current, self.stream
                fake.capturing = self.g
                return self

            def __exit__(self, *exc):
                fake.capturing = None
                if fake.capture_fails:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
                fake.current = self.prev
                return False

        class stream_ctx:
            def __init__(self, s):
                self.s = s

            def __enter__(self):
                self.prev, fake.current = fake.current, self.s

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
        monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: FakeStream(fake, "side"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: fake.current)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(fake, "current", s))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        return self


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str):
        self.fake, self.name = fake, name

    def wait_stream(self, other) -> None:
        pass

    def __repr__(self) -> str:
        return f"<stream {self.name}>"
