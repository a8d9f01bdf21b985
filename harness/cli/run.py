"""Running suites: ``run`` (with ``--dry-run``, ``--resume``), ``resume``, ``list``, ``report``.

Listed in :data:`harness.cli.main.COMMAND_MODULES`; :func:`register` adds the parsers. The
handlers parse nothing further and call the engine (:mod:`harness.engine.lifecycle`), showing
progress and printing what happened; everything heavy is imported inside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.cli.common import EXIT_FAILED, EXIT_OK, positive_number


def register(sub) -> None:
    from harness.core.config import RUN

    run = sub.add_parser("run", help="run a suite file and write results and a report")
    run.add_argument("suite", help="suite TOML file")
    run.add_argument("-o", "--output", metavar="DIR", help="run directory (default results/runs/<run_id>)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (same suite)")
    run.add_argument("--dry-run", action="store_true", help="check the suite and list its cases; run nothing")
    run.set_defaults(handler=cmd_run)

    res = sub.add_parser("resume", help="continue an interrupted run with the suite it started with")
    res.add_argument("run_dir", help="run directory")
    res.set_defaults(handler=cmd_resume)

    for p in (run, res):
        p.add_argument("--memory-budget-gib", type=positive_number, metavar="GIB",
                       help=RUN["memory_budget_gib"].help.replace("%", "%%"))
        p.add_argument("--isolation", choices=RUN["isolation"].choices, help=RUN["isolation"].help)
        p.add_argument("--case-timeout", type=positive_number, metavar="S",
                       help="per-case timeout in seconds (isolation only)")
        p.add_argument("-v", "--verbose", action="store_true", help="one line per finished case")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="plain progress lines (every 10%% of cases) instead of the bar")
        p.add_argument("--no-report", action="store_true", help="skip writing report.html")

    ls = sub.add_parser("list", help="list registered variants and their capabilities")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--plugin", action="append", default=[], metavar="PLUGIN",
                    help="also load this plugin (python file or module); repeatable")
    ls.set_defaults(handler=cmd_list)

    rep = sub.add_parser("report", help="re-render a run's report.html from its results")
    rep.add_argument("run_dir", help="run directory")
    rep.add_argument("-o", "--output", metavar="FILE", help="where to write the HTML (default RUN_DIR/report.html)")
    rep.set_defaults(handler=cmd_report)


def cmd_run(args) -> int:
    from harness.engine.suite import expand_cases
    from harness.engine import lifecycle
    from harness.engine.suite import load_suite

    suite = load_suite(args.suite)
    if args.dry_run:
        cases = expand_cases(suite)
        for case in cases:
            print(case.label())
        print(f"suite {suite.name}: {len(cases)} cases (dry run: nothing was run)", file=sys.stderr)
        return EXIT_OK
    if args.resume:
        suite, todo, writer = lifecycle.resume_run(Path(args.resume), suite)
        return _execute(suite, todo, writer, args, resumed=True)
    cases = expand_cases(suite)
    writer = lifecycle.start_run(suite, Path(args.output) if args.output else None, cases)
    return _execute(suite, cases, writer, args)


def cmd_resume(args) -> int:
    from harness.engine.lifecycle import resume_run

    suite, todo, writer = resume_run(Path(args.run_dir))
    return _execute(suite, todo, writer, args, resumed=True)


def _execute(suite, cases, writer, args, resumed: bool = False) -> int:
    """Run ``cases`` with a progress display, then print the summary and write the report."""
    from harness.engine.lifecycle import execute
    from harness.engine.progress import make_progress

    verb = "resuming" if resumed else "running"
    total = len(writer.meta.get("case_ids", cases))
    print(f"suite {suite.name}: {verb} {len(cases)} of {total} cases → {writer.dir}", file=sys.stderr)
    with make_progress(len(cases), verbose=args.verbose, quiet=args.quiet) as progress:
        outcome = execute(suite, cases, writer, progress=progress, isolation=args.isolation,
                          case_timeout_s=args.case_timeout, memory_budget_gib=args.memory_budget_gib)
    _print_summary(outcome.rows)
    if not args.quiet:  # the headline numbers: variants × lengths per configuration
        from reports.terminal import print_headline
        print_headline(outcome.rows, verbose=args.verbose, suite_definition=suite.raw)
    failed = False
    if not args.no_report and not outcome.rows.empty:
        failed = not _write_report(writer.dir)
    print(f"results: {writer.dir / 'results.parquet'}")
    if outcome.interrupted is not None:
        print(f"interrupted: resume with  bench resume {writer.dir}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failed else EXIT_OK


def _write_report(run_dir: Path) -> bool:
    """Render the report; a failure is one line (the results are already safe on disk)."""
    from reports.render import render_report

    try:
        print(f"report: {render_report(run_dir)}")
        return True
    except Exception as exc:
        print(f"bench: could not write the report ({type(exc).__name__}: {exc}); the results are saved, "
              f"retry with  bench report {run_dir}", file=sys.stderr)
        return False


def _print_summary(rows) -> None:
    if rows.empty:
        print("no cases finished", file=sys.stderr)
        return
    counts = rows["status"].value_counts()
    print("cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()), file=sys.stderr)


def cmd_list(args) -> int:
    from harness.core.registry import list_variants
    from harness.engine.plugins import load_plugin

    for plugin in args.plugin:
        load_plugin(plugin, Path.cwd())
    variants = [v.describe() for v in list_variants()]
    if args.json:
        print(json.dumps(variants, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(variants)} attention variants", show_lines=False)
    for col in ("name", "family", "exact", "devices", "dtypes", "causal", "GQA", "backward", "head_dim", "params"):
        table.add_column(col)
    for v in variants:
        causal = "both" if v["causal"] and v["non_causal"] else ("only" if v["causal"] else "no")
        params = ", ".join(f"{k}={val}" for k, val in v["params"].items())
        table.add_row(
            v["name"], v["family"], "yes" if v["exact"] else "approx", ",".join(v["devices"]),
            ",".join(d.replace("float", "f") for d in v["dtypes"]), causal,
            "yes" if v["gqa"] else "no", "yes" if v["backward"] else "no", v["head_dim"], params,
        )
    Console(width=200).print(table)
    return EXIT_OK


def cmd_report(args) -> int:
    from reports.render import render_report

    path = render_report(Path(args.run_dir), args.output)
    print(f"report: {path}")
    return EXIT_OK
