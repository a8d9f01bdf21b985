"""``bench site``: the results site (static pages) from the run history.

Listed in :data:`harness.cli.main.COMMAND_MODULES`. Registering the parser imports nothing heavy;
the handler imports pandas and matplotlib. Exit status: 0 written; 2 bad input (a history
directory that does not exist, an output directory that is not a site), one line.
"""

from __future__ import annotations

import argparse
import sys
import time

from harness.cli.common import EXIT_OK, positive_int


def _share(text: str) -> float:
    """'0.05' or '5%' → 0.05, strictly between 0 and 1."""
    scale = 100.0 if text.strip().endswith("%") else 1.0
    try:
        value = float(text.strip().rstrip("%")) / scale
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.05 or a percentage like 5%, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "site", help="build the static results site (trends, change points, regressions, Atom feed)",
        description="Build a self-contained static site from the run history: index.html (every suite and machine "
                    "with its latest status), a page per suite with every case's trend and change points, "
                    "regressions.html, feed.xml (Atom) and the latest run's report of each suite and machine, "
                    "regenerated from its data (a run directory's own HTML is never published). Opens from the file "
                    "system.")
    p.add_argument("--history", action="append", default=[], metavar="DIR",
                   help="also read runs from DIR/runs/ (a checkout of the bench-results branch); repeatable")
    p.add_argument("--root", default="results", metavar="DIR",
                   help="results root: its runs/ are read too and its baseline/ (with the git log) gives the "
                        "baseline changes (default: results)")
    p.add_argument("-o", "--output", default="site", metavar="SITE", help="site directory (default: site)")
    p.add_argument("--recent", type=positive_int, default=30, metavar="N",
                   help="regressions are change points in the last N runs of a suite on a machine (default 30)")
    p.add_argument("--last", type=positive_int, metavar="N", help="trend charts show the last N runs (default: all)")
    p.add_argument("--min-step", type=_share, default=0.05, metavar="F", help="smallest step marked (default 5%%)")
    p.add_argument("--title", default="Attention Bench results", help="the site's title")
    p.add_argument("--base-url", metavar="URL", help="address the site is published at (absolute links in feed.xml)")
    p.set_defaults(handler=cmd_site)


def cmd_site(args) -> int:
    from pathlib import Path

    from harness.regression.timeline import collect
    from reports.site import build_site

    t0 = time.perf_counter()
    roots = [args.root] if Path(args.root).is_dir() else []
    groups = collect(roots + args.history, args.root, last=args.last, recent=args.recent, min_step=args.min_step)
    summary = build_site(groups, args.output, title=args.title, base_url=args.base_url, recent=args.recent,
                         min_step=args.min_step)
    if not groups:
        print(f"warning: no runs under {', '.join(str(Path(r) / 'runs') for r in [args.root, *args.history])}: "
              "the site is empty", file=sys.stderr)
    from harness.core.escape import terminal

    states = ", ".join(f"{g.suite} on {g.hostname}: {g.state}" for g in groups)
    print(terminal(f"site: {summary['runs']} run(s), {len(groups)} suite/machine series ({states or 'none'}), "
                   f"{summary['regressions']} regression(s) in the last {args.recent} runs; "
                   f"{time.perf_counter() - t0:.1f} s → {Path(args.output) / 'index.html'}", limit=None))
    return EXIT_OK
