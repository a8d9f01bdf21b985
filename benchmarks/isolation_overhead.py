"""What running cases in a worker process costs, measured in one run.

    python benchmarks/isolation_overhead.py [suites/quick.toml] [--json [DIR]]

Every case of the suite is run twice, once in this process and once through the reusable
worker (harness.engine.executors.WorkerPool), alternating which goes first, and the wall time of
each is recorded. Prints the worker's start-up time, the total of each way, and the median
per-case overhead (isolated minus in-process); ``--json`` also writes them as the ``isolation`` table
for the docs (``benchmarks/docdata.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run_tables import add_json_option, write_tables  # noqa: E402
from harness.engine.executors import InProcess, WorkerPool  # noqa: E402
from harness.engine.lifecycle import default_memory_budget, run_settings  # noqa: E402
from harness.engine.suite import (
    expand_cases,  # noqa: E402
    load_suite,  # noqa: E402
)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", nargs="?", default="suites/quick.toml")
    add_json_option(p)
    args = p.parse_args(argv)
    suite = load_suite(args.suite)
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
    if args.json:
        rows = [["worker start-up (Python, torch, the registry), once per worker", round(startup, 2), "s"],
                ["cases, each run both ways", len(cases), ""],
                ["total in-process", round(sum(inproc), 1), "s"], ["total isolated", round(sum(isolated), 1), "s"],
                ["per-case overhead, median", round(statistics.median(overhead) * 1e3, 1), "ms"],
                ["per-case overhead, mean", round(statistics.mean(overhead) * 1e3, 1), "ms"]]
        title = f"Cost of running cases in a worker process ({suite.name})"
        write_tables(args.json, [{"name": "isolation", "title": title,
                                  "columns": ["what", "value", "unit"], "rows": rows,
                                  "notes": ["Every case run in-process and through the reusable worker, alternating "
                                            "which goes first; overhead is isolated minus in-process wall time."]}])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
