"""``bench export``: a run's results in another tool's format (pytest-benchmark's JSON).

Added to the CLI by listing ``harness.cli.export`` in ``harness.cli.main.COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import EXIT_OK, EXIT_USAGE

FORMATS = ("pytest-benchmark",)

EPILOG = """examples:
  bench export RUN_DIR                       writes RUN_DIR/pytest-benchmark.json
  bench export RUN_DIR -o run.json           then: pytest-benchmark compare run.json other.json
  bench export RUN_DIR --storage .benchmarks then: pytest tests/benchmarks --benchmark-only --benchmark-compare
"""


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's results in another tool's format (pytest-benchmark JSON)",
                       description="Write a run's timings, with every raw sample, as a file pytest-benchmark reads: "
                                   "its `compare` command, --benchmark-compare and its loader.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="run directory, run id, latest[~N][@SUITE] or baseline[@SUITE]")
    p.add_argument("--root", default="results", metavar="DIR", help="results root for run ids (default: results)")
    p.add_argument("--format", choices=FORMATS, default="pytest-benchmark", help="output format (default %(default)s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="FILE", help="output file, '-' for stdout "
                                                              "(default RUN/pytest-benchmark.json)")
    where.add_argument("--storage", metavar="DIR", help="save as the next numbered run in pytest-benchmark's "
                                                        "storage folder (e.g. .benchmarks)")
    p.set_defaults(handler=cmd_export)


def _resolve(run: str, root: str) -> Path:
    """A run directory as given, else a run id, ``latest`` or ``baseline`` from the run history."""
    path = Path(run)
    if path.exists():
        return path
    try:
        from harness.regression.history import resolve_run
    except ImportError:  # no run history in this version: run ids under ROOT/runs only
        candidate = Path(root) / "runs" / run
        return candidate if candidate.is_dir() else path
    return resolve_run(run, root)


def cmd_export(args) -> int:
    from harness.regression.export import export_pytest_benchmark

    try:
        path, written, left_out = export_pytest_benchmark(_resolve(args.run_dir, args.root), args.output, args.storage)
    except OSError as exc:
        print(f"bench export: cannot write: {exc}", file=sys.stderr)
        return EXIT_USAGE
    note = f" ({left_out} rows without timing samples left out)" if left_out else ""
    where = "stdout" if path is None else str(path)
    print(f"{written} benchmarks → {where}{note}", file=sys.stderr)
    return EXIT_OK
