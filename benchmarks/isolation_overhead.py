"""What running cases in a worker process costs, measured in one run.

    python benchmarks/isolation_overhead.py [suites/quick.toml]

Every case of the suite is run twice, once in this process and once through the reusable
worker (harness.engine.executors.WorkerPool), alternating which goes first, and the wall time of
each is recorded. Prints the worker's start-up time, the total of each way, and the median
per-case overhead (isolated minus in-process).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.engine.suite import expand_cases  # noqa: E402
from harness.engine.executors import InProcess, WorkerPool  # noqa: E402
from harness.engine.lifecycle import default_memory_budget, run_settings  # noqa: E402
from harness.engine.suite import load_suite  # noqa: E402


def main(argv: list[str]) -> int:
    suite = load_suite(argv[0] if argv else "suites/quick.toml")
    cases = expand_cases(suite)
    settings = run_settings(suite, memory_budget_gib=default_memory_budget() / 2**30)
    local = InProcess(settings)
    t0 = time.perf_counter()
    pool = WorkerPool(settings)
    pool._start()
    startup = time.perf_counter() - t0
    inproc, isolated = [], []
    with pool:
        for i, case in enumerate(cases):
            order = [(local, inproc), (pool, isolated)]
            if i % 2:
                order.reverse()
            for executor, times in order:
                t = time.perf_counter()
                executor.run(case)
                times.append(time.perf_counter() - t)
    overhead = [b - a for a, b in zip(inproc, isolated)]
    print(f"suite {suite.name}: {len(cases)} cases, each run in-process and isolated (alternating order)")
    print(f"worker start-up (python, torch, registry): {startup:.2f} s, once per worker")
    print(f"total in-process {sum(inproc):.1f} s, isolated {sum(isolated):.1f} s "
          f"({sum(isolated) / sum(inproc) - 1:+.1%})")
    print(f"per-case overhead: median {statistics.median(overhead) * 1e3:+.1f} ms, "
          f"mean {statistics.mean(overhead) * 1e3:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
