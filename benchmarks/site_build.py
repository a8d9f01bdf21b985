"""How long ``bench site`` takes on a long history.

Generates a history of N nightly runs (default 100) from one real run directory (default: the
committed nightly baseline, results/baseline/nightly-cpu, 20 cases), with the planted series of
tests/history_sim.py (one case flat, one 20% step ten runs before the end, one noisy, the rest with 1%
noise), then times ``bench site`` on it end to end in a fresh process, several times.

    python benchmarks/site_build.py [--runs 100] [--source RUN_DIR] [--repeat 3] [--keep DIR] [--json [DIR]]

``--json`` also writes the ``site-build`` table for the docs (``benchmarks/docdata.py``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run_tables import add_json_option, write_tables  # noqa: E402


def make_history(source: Path, root: Path, runs: int) -> list[str]:
    """``runs`` nights under ``root/runs/`` made from ``source``; returns their run ids."""
    from tests.history_sim import night_run, planted_factors, timed_cases

    cases = timed_cases(source)
    factors = planted_factors(cases, runs, flat=cases[0], step=cases[1], noisy=cases[2], step_at=runs - 10)
    start = datetime(2026, 1, 1, 3, 17, tzinfo=UTC)
    ids = []
    for night, f in enumerate(factors):
        when = start + timedelta(days=night)
        run_id = f"{when:%Y%m%d-%H%M%S}-sim-{night:04d}"
        night_run(source, root / "runs" / run_id, run_id=run_id, started=when.isoformat(), commit=f"{night:040x}",
                  factors=f)
        ids.append(run_id)
    return ids


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--source", type=Path, default=ROOT / "results" / "baseline" / "nightly-cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", type=Path, help="build the history and site here and keep them")
    add_json_option(p)
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="site-build-"))
    t0 = time.perf_counter()
    make_history(args.source, work, args.runs)
    print(f"history: {args.runs} runs from {args.source} in {time.perf_counter() - t0:.1f} s → {work}", file=sys.stderr)
    times = []
    for i in range(args.repeat):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "harness", "site", "--root", str(work), "-o", str(work / "site")],
                              capture_output=True, text=True, cwd=work)
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        print(f"build {i + 1}: {times[-1]:.1f} s wall (process start included); {proc.stdout.strip()}")
    size = sum(f.stat().st_size for f in (work / "site").rglob("*") if f.is_file())
    pages = sorted(f.name for f in (work / "site").glob("*.html"))
    print(f"bench site on {args.runs} runs: median {statistics.median(times):.1f} s, min {min(times):.1f} s "
          f"over {len(times)} builds; site {size / 2**20:.1f} MiB, pages {', '.join(pages)}")
    if args.json:
        rows = [["nightly runs in the history", args.runs], ["cases per run", len(timed_cases_of(args.source))],
                ["builds timed", len(times)],
                ["median build, s (process start included)", round(statistics.median(times), 1)],
                ["fastest build, s", round(min(times), 1)], ["slowest build, s", round(max(times), 1)],
                ["site size, MiB", round(size / 2**20, 1)]]
        write_tables(args.json, [{"name": "site-build", "title": "bench site on a long history",
                                  "columns": ["", "value"], "rows": rows,
                                  "notes": ["A history made from one real run with one planted regression "
                                            "(tests/history_sim.py); each build is a fresh bench site process."]}])
    if args.keep is None:
        shutil.rmtree(work)
    return 0


def timed_cases_of(source: Path) -> list:
    from tests.history_sim import timed_cases

    return timed_cases(source)


if __name__ == "__main__":
    sys.exit(main())
