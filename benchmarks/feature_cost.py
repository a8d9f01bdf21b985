"""The measured cost of attention features, for the docs: a table computed from a run of suites/features.toml.

    bench run suites/features.toml --processes 3 -o results/docs/features     # on a quiet machine
    python benchmarks/feature_cost.py results/docs/features --json docs/data/feature-cost.json

RUN is a run directory, a run id or ``latest@features`` (as ``bench compare`` takes them). Each row is
one feature on one variant and case against the same case without it (the report's "Cost of
features", :func:`reports.features.feature_cost`): both median times, their ratio, the FLOPs' ratio,
and the kernel path the variant recorded when the feature changed it. Without ``--json`` it prints
the table; with it, it writes ``docs/data/feature-cost.json`` through :mod:`benchmarks.docdata`
(which records this machine and the date: run it on the machine that made the run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = ["configuration", "variant", "feature", "time without (ms)", "time with (ms)", "× time", "× FLOPs", "path"]
NOTES = [
    "Each row: the median time of a variant with one attention feature over the same case without it, in one run.",
    "× FLOPs: score modifiers (softcap, ALiBi) and sinks add none by the FLOP convention counted (the two matmuls); "
    "a sliding window or documents attend fewer pairs.",
    "path: a column the variant recorded of the kernel it ran that the feature changed (e.g. sdpa_backend_used).",
]


def rows_of(run_dir: Path) -> list[list]:
    """The table's rows from a run directory."""
    from harness.engine import store
    from reports.analysis import with_labels
    from reports.features import feature_cost

    meta = store.read_meta(run_dir)
    rows = with_labels(store.read_results(run_dir), (meta.get("suite") or {}).get("definition") or {})
    return [[t["group"], t["label"], t["feature"], round(t["time_off"], 4), round(t["time_on"], 4),
             round(t["ratio"], 3), None if t["flops_ratio"] is None else round(t["flops_ratio"], 3),
             t["path"] or ""] for t in feature_cost(rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run of suites/features.toml: directory, run id, latest@features")
    parser.add_argument("--json", metavar="PATH", help="write the docs table here (docs/data/feature-cost.json)")
    args = parser.parse_args(argv)
    from harness.core.errors import UserError
    from harness.regression.history import resolve_run

    try:
        run_dir = resolve_run(args.run)
    except UserError as exc:
        print(f"feature_cost: {exc}", file=sys.stderr)
        return 2
    table = rows_of(run_dir)
    if not table:
        print(f"feature_cost: {run_dir} has no feature case with its plain twin (run suites/features.toml)",
              file=sys.stderr)
        return 2
    if args.json:
        from benchmarks import docdata

        command = f"python benchmarks/feature_cost.py {args.run} --json {args.json}"
        path = docdata.write(args.json, "feature-cost", "Cost of features", command, COLUMNS, table, NOTES,
                             source=str(run_dir))
        print(f"feature_cost: {len(table)} rows -> {path}")
        return 0
    widths = [max(len(str(r[i])) for r in [COLUMNS, *table]) for i in range(len(COLUMNS))]
    for r in [COLUMNS, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
