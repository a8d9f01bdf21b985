"""``bench winners RUN``: the fastest correct variant per workload, its speed-up, fast_p; or a dispatch table.

Listed in :data:`harness.cli.main.COMMAND_MODULES`. The table and the JSON come from
:mod:`reports.winners`; :mod:`harness.dispatch` loads the JSON and picks the entry for a shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import EXIT_OK, EXIT_USAGE

EPILOG = """examples:
  bench winners latest                          which variant wins each workload, by how much; fast_p
  bench winners latest --format json -o winners.json
  python -c "from harness import dispatch; print(dispatch.load('winners.json').pick(q_len=1, kv_len=20000))"
"""


def register(sub) -> None:
    p = sub.add_parser("winners", help="the fastest correct, stable variant per workload and fast_p; or a dispatch "
                                       "table (JSON) that harness.dispatch loads",
                       description="Per workload (a case without its variant): the fastest variant whose answer is "
                                   "correct and whose time is stable and not emulated, its speed-up over the declared "
                                   "baseline and its runners-up within noise; per variant, fast_p for p = 1, 1.5, 2.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="run directory, run id, latest[~N][@SUITE] or baseline[@SUITE]")
    p.add_argument("--root", default="results", metavar="DIR", help="results root for run ids (default: results)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="text table, or the dispatch "
                   "table as JSON (default table)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(handler=cmd_winners)


def cmd_winners(args) -> int:
    from harness.cli.export import _resolve
    from harness.core.escape import terminal
    from harness.engine import store
    from reports import winners

    run_dir = _resolve(args.run_dir, args.root)
    rows = store.read_results(run_dir)
    if rows.empty:
        print(f"bench winners: {run_dir} holds no results", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        text = winners.to_json(rows, store.read_meta(run_dir)) + "\n"
    else:
        text = winners.table_text(rows) + "\n"
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            print(f"bench winners: cannot write {args.output}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"winners → {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text if args.format == "json" else "".join(terminal(line) + "\n"
                                                                    for line in text.splitlines()))
    return EXIT_OK
