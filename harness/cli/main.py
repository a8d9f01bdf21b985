"""The ``bench`` command line: run, list, report.

Exit status: 0 success; 1 the run finished but was interrupted or failed to
report; 2 bad input (suite file, arguments, results directory), with one line
per problem and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
from pathlib import Path

from harness import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of argparse's usage block
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


#: Modules that add subcommands: each has ``register(subparsers)`` which adds parsers and sets
#: ``handler=function(args) -> exit status`` on them with ``set_defaults``.
COMMAND_MODULES: list[str] = ["harness.cli.measure", "harness.cli.regression", "harness.cli.export"]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="Attention Bench: measure attention implementations on this machine.")
    p.add_argument("--version", action="version", version=f"attention-bench {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run a suite file and write results and a report")
    run.add_argument("suite", help="suite TOML file")
    run.add_argument("-o", "--output", metavar="DIR", help="run directory (default results/runs/<run_id>)")
    run.add_argument("--memory-budget-gib", type=positive_number, metavar="GIB",
                     help="skip cases whose estimated working set exceeds this (default: 60%% of available memory)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (same suite)")
    run.add_argument("--dry-run", action="store_true", help="check the suite and list its cases; run nothing")
    _add_execution_options(run)

    res = sub.add_parser("resume", help="continue an interrupted run with the suite it started with")
    res.add_argument("run_dir", help="run directory")
    res.add_argument("--memory-budget-gib", type=positive_number, metavar="GIB", help="as for bench run")
    _add_execution_options(res)

    ls = sub.add_parser("list", help="list registered variants and their capabilities")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--plugin", action="append", default=[], metavar="PLUGIN",
                    help="also load this plugin (python file or module); repeatable")

    rep = sub.add_parser("report", help="re-render a run's report.html from its results")
    rep.add_argument("run_dir", help="run directory")
    rep.add_argument("-o", "--output", metavar="FILE", help="where to write the HTML (default RUN_DIR/report.html)")

    run.set_defaults(handler=cmd_run)
    res.set_defaults(handler=cmd_resume)
    ls.set_defaults(handler=cmd_list)
    rep.set_defaults(handler=cmd_report)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def positive_number(text: str) -> float:
    """argparse type: a number > 0, with a one-line message otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--isolation", choices=("process", "none"),
                   help="run cases in a worker process (default, survives crashes) or in this one")
    p.add_argument("--case-timeout", type=positive_number, metavar="S", help="per-case timeout in seconds (isolation only)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per finished case")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="plain progress lines (every 10%% of cases) instead of the bar")
    p.add_argument("--no-report", action="store_true", help="skip writing report.html")


def main(argv: list[str] | None = None) -> int:
    from harness.measure.environment import pin_allocator

    pin_allocator()
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    from harness.core.registry import RegistryError
    from harness.engine.store import StoreError
    from harness.engine.runner import ResumeError
    from harness.engine.suite import SuiteError

    try:
        return args.handler(args)
    except SuiteError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except (RegistryError, StoreError, ResumeError, FileExistsError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_list(args) -> int:
    from harness.engine.plugins import load_plugin
    from harness.core.registry import list_variants

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
            ",".join(d.replace("float", "f").replace("bf", "bf") for d in v["dtypes"]), causal,
            "yes" if v["gqa"] else "no", "yes" if v["backward"] else "no", v["head_dim"], params,
        )
    Console(width=200).print(table)
    return EXIT_OK


def cmd_report(args) -> int:
    from reports.render import render_report

    path = render_report(Path(args.run_dir), args.output)
    print(f"report: {path}")
    return EXIT_OK


def cmd_run(args) -> int:
    from harness.core.cases import expand_cases
    from harness.engine.runner import remaining_cases, start_run
    from harness.engine.store import RunWriter, read_meta
    from harness.engine.suite import load_suite

    suite = load_suite(args.suite)
    cases = expand_cases(suite)
    if args.dry_run:
        for case in cases:
            print(case.label())
        print(f"suite {suite.name}: {len(cases)} cases (dry run: nothing was run)", file=sys.stderr)
        return EXIT_OK
    if args.resume:
        run_dir = Path(args.resume)
        todo = remaining_cases(run_dir, cases)
        writer = RunWriter.reopen(run_dir, read_meta(run_dir))
        return _execute(suite, todo, writer, args, resumed=True)
    writer = start_run(suite, Path(args.output) if args.output else None, cases)
    return _execute(suite, cases, writer, args)


def cmd_resume(args) -> int:
    from harness.core.cases import expand_cases
    from harness.engine.runner import remaining_cases
    from harness.engine.store import RunWriter, read_meta
    from harness.engine.suite import parse_suite

    run_dir = Path(args.run_dir)
    meta = read_meta(run_dir)
    path = meta["suite"].get("path")
    suite = parse_suite(meta["suite"].get("text", ""), Path(path) if path else None)
    todo = remaining_cases(run_dir, expand_cases(suite))
    return _execute(suite, todo, RunWriter.reopen(run_dir, meta), args, resumed=True)


def _executor(suite, args, writer):
    from harness.engine.executors import InProcess, WorkerPool
    from harness.engine.runner import default_memory_budget

    gib = args.memory_budget_gib or suite.run.memory_budget_gib
    budget = int(gib * 2**30) if gib else default_memory_budget()
    isolation = args.isolation or suite.run.isolation
    common = dict(seed=suite.seed, memory_budget=budget)
    if isolation == "none":
        return InProcess(suite.timing, **common)
    return WorkerPool(
        suite.timing, **common, plugins=suite.plugins, base_dir=suite.base_dir, threads=suite.timing.threads,
        case_timeout_s=args.case_timeout or suite.run.case_timeout_s, log_dir=writer.dir / "logs",
    )


def _execute(suite, cases, writer, args, resumed: bool = False) -> int:
    """Run ``cases`` into ``writer``'s directory, handling SIGINT/SIGTERM; write tables and report."""
    from harness.engine.progress import make_progress
    from harness.engine.runner import finish_run, run_cases

    verb = "resuming" if resumed else "running"
    total = len(writer.meta.get("case_ids", cases))
    print(f"suite {suite.name}: {verb} {len(cases)} of {total} cases → {writer.dir}", file=sys.stderr)

    interrupted = {"signal": None}

    def on_signal(signum, frame):
        if interrupted["signal"] is not None:  # second signal: abandon the case in flight
            raise KeyboardInterrupt
        interrupted["signal"] = signal.Signals(signum).name
        print(f"\n{interrupted['signal']}: finishing the current case, then writing what exists "
              "(send again to abandon it)", file=sys.stderr)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        with _executor(suite, args, writer) as executor, \
                make_progress(len(cases), verbose=args.verbose, quiet=args.quiet) as progress:
            run_cases(cases, writer, executor, progress=progress, stop=lambda: interrupted["signal"] is not None)
    except KeyboardInterrupt:
        interrupted["signal"] = interrupted["signal"] or "SIGINT"
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    status = "complete" if interrupted["signal"] is None else f"interrupted ({interrupted['signal']})"
    rows = finish_run(writer, status, time.monotonic() - t0)
    _print_summary(rows)
    failed = False
    if not args.no_report and not rows.empty:
        failed = not _write_report(writer.dir)
    print(f"results: {writer.dir / 'results.parquet'}")
    if interrupted["signal"] is not None:
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


if __name__ == "__main__":
    sys.exit(main())
