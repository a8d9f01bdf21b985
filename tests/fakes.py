"""Test doubles shared by the timing tests."""


class FakeClock:
    """A clock that advances only when the timed function runs, by the next duration of the list."""

    def __init__(self, durations):
        self.t = 0.0
        self.durations = list(durations)
        self.calls = 0

    def __call__(self):
        return self.t

    def fn(self):
        self.t += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1
