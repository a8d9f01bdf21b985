"""Running suites: ``run`` (with ``--dry-run``, ``--resume``), ``resume``, ``list``, ``report``.

Listed in :data:`harness.cli.main.COMMAND_MODULES`; :func:`register` adds the parsers. The
handlers parse nothing further and call the engine (:mod:`harness.engine.lifecycle`), showing
progress and printing what happened; everything heavy is imported inside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.cli.common import EXIT_FAILED, EXIT_INCORRECT, EXIT_OK, EXIT_USAGE, positive_int, positive_number


def register(sub) -> None:
    from harness.core.config import RUN, TIMING
    from harness.core.models import NAMES as MODEL_NAMES  # the catalogue: plain data, no torch

    run = sub.add_parser("run",
                         help="run a suite file (or a catalogue model's workload) and write results and a report")
    run.add_argument("suite", nargs="?", help="suite TOML file (or --model instead)")
    model = run.add_argument_group("a model's workload instead of a suite file (harness.core.models)")
    model.add_argument("--model", metavar="NAME", help=f"a catalogue model ({', '.join(MODEL_NAMES)}): build a suite "
                       "of its attention geometry and print what it chose")
    model.add_argument("--workload", choices=("prefill", "decode", "serve"), default="decode",
                       help="prefill 1K-8K tokens, decode against 4K-128K cached tokens (as memory allows), or serving "
                            "batches and shared-prefix decoding (default decode)")
    model.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model's cases run")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="default float32 on cpu, bfloat16 on cuda")
    model.add_argument("--batch", type=positive_int, default=1, help="sequences of a prefill or decode case")
    model.add_argument("--threads", type=positive_int, help="torch threads per case (default 1 on cpu: far steadier "
                       "on a machine with other load; unset on cuda)")
    run.add_argument("-o", "--output", metavar="DIR", help="run directory (default results/runs/<run_id>)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (same suite)")
    run.add_argument("--dry-run", action="store_true", help="check the suite and list its cases; run nothing")
    run.add_argument("--only", metavar="PATTERN", help="run only the cases whose label (as --dry-run lists them) "
                     "has every word of PATTERN (globs allowed), or whose case id starts with it")
    run.set_defaults(handler=cmd_run)

    res = sub.add_parser("resume", help="continue an interrupted run with the suite it started with")
    res.add_argument("run_dir", help="run directory")
    res.add_argument("--trust-plugins", action="store_true",
                     help="also import plugins the recorded suite names that are not this checkout's code "
                          "(listed first; see docs/how-to/sharing-results.md)")
    res.set_defaults(handler=cmd_resume)

    for p in (run, res):
        p.add_argument("--memory-budget-gib", type=positive_number, metavar="GIB",
                       help=RUN["memory_budget_gib"].help.replace("%", "%%"))
        p.add_argument("--isolation", choices=RUN["isolation"].choices, help=RUN["isolation"].help)
        p.add_argument("--case-timeout", type=positive_number, metavar="S",
                       help="per-case timeout in seconds (isolation only)")
        p.add_argument("--processes", type=positive_int, metavar="N",
                       help=TIMING["processes"].help + f" (default: the suite's [timing] processes, else "
                            f"{TIMING['processes'].default})")
        p.add_argument("--allocator", choices=RUN["allocator"].choices, help=RUN["allocator"].help)
        p.add_argument("--contention", choices=RUN["contention"].choices, help=RUN["contention"].help)
        p.add_argument("--fail-on-incorrect", action="store_true",
                       help=f"exit status {EXIT_INCORRECT} when any case gives a wrong answer (status incorrect)")
        p.add_argument("-v", "--verbose", action="store_true", help="one line per finished case")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="plain progress lines (every 10%% of cases) instead of the bar")
        p.add_argument("--no-report", action="store_true", help="skip writing report.html")
        p.add_argument("--profile", action="store_true", default=None,
                       help="also profile every case: one more call under torch.profiler after its timing "
                            "(RUN/profile.parquet, RUN/traces/; see bench profile)")

    from harness.cli.scale import add_run_arguments

    add_run_arguments(run, res)  # --executor, --ray-address; --shard (harness.cli.scale)

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
    from harness.cli.scale import chosen_cases, record_shard
    from harness.engine import lifecycle

    suite = _with_options(_suite_of(args), args)
    if (problem := lifecycle.option_problem(suite, args.isolation)) is not None:
        print(problem, file=sys.stderr)
        return EXIT_USAGE
    if args.only and args.resume:
        print("bench run: --only cannot be combined with --resume (a run resumes the cases it started with)",
              file=sys.stderr)
        return EXIT_USAGE
    cases, shard = chosen_cases(suite, args, select_cases)  # --only, --shard (harness.cli.scale)
    if args.dry_run:
        for case in cases:
            print(case.label())
        print(f"suite {suite.name}: {len(cases)} cases (dry run: nothing was run)", file=sys.stderr)
        return EXIT_OK
    if args.resume:
        suite, todo, writer = lifecycle.resume_run(Path(args.resume), suite, processes=args.processes,
                                                   allocator=args.allocator)
        return _execute(_with_options(suite, args), todo, writer, args, resumed=True)
    writer = lifecycle.start_run(suite, Path(args.output) if args.output else None, cases)
    record_shard(writer, shard)
    return _execute(suite, cases, writer, args)


def _suite_of(args):
    """The suite file's suite, or the one ``--model`` builds (harness.engine.modelsuite; what it chose is
    printed); a UserError when neither or both are given."""
    from harness.core.errors import UserError
    from harness.engine.suite import load_suite, parse_suite

    if getattr(args, "model", None) is None:
        if args.suite is None:
            raise UserError("give a suite file, or --model NAME (bench run --model llama-3.1-8b --workload decode)")
        return load_suite(args.suite)
    if args.suite is not None:
        raise UserError(f"give a suite file or --model, not both ({args.suite}, --model {args.model})")
    from harness.engine.lifecycle import default_memory_budget
    from harness.engine.modelsuite import model_suite

    budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else default_memory_budget()
    plan = model_suite(args.model, args.workload, device=args.device, dtype=args.dtype, batch=args.batch,
                       memory_budget=budget, threads=args.threads)
    for line in plan.chosen:
        print(f"bench run --model: {line}", file=sys.stderr)
    for line in plan.notes:
        print(f"bench run --model: note: {line}", file=sys.stderr)
    return parse_suite(plan.text)


def select_cases(suite, pattern: str | None):
    """The suite's cases, or those matching ``pattern`` (:mod:`harness.core.patterns`); a SuiteError
    (one line, exit status 2) when none does."""
    from harness.core.patterns import select_cases as matching
    from harness.engine.suite import SuiteError, expand_cases

    cases = expand_cases(suite)
    if pattern is None:
        return cases
    chosen = matching(cases, pattern)
    if not chosen:
        where = suite.path or suite.name
        raise SuiteError([f"{where}: no case matches {pattern!r} (list them: bench run {where} --dry-run)"])
    return chosen


def cmd_resume(args) -> int:
    from harness.engine.lifecycle import resume_run

    suite, todo, writer = resume_run(Path(args.run_dir), trust_plugins=args.trust_plugins,
                                     processes=args.processes, allocator=args.allocator)
    return _execute(_with_options(suite, args), todo, writer, args, resumed=True)


def _with_options(suite, args):
    """The suite with the command line's ``--processes`` and ``--allocator``, where given."""
    from harness.cli.scale import with_executor
    from harness.engine.lifecycle import with_options

    suite = with_options(suite, processes=getattr(args, "processes", None), allocator=getattr(args, "allocator", None))
    return with_executor(suite, args)  # --executor, --ray-address


def _execute(suite, cases, writer, args, resumed: bool = False) -> int:
    """Run ``cases`` with a progress display, then print the summary and write the report."""
    from harness.engine.lifecycle import execute, option_problem
    from harness.engine.progress import make_progress

    if (problem := option_problem(suite, args.isolation)) is not None:
        print(problem, file=sys.stderr)
        return EXIT_USAGE
    verb = "resuming" if resumed else "running"
    total = len(writer.meta.get("case_ids", cases))
    print(f"suite {suite.name}: {verb} {len(cases)} of {total} cases → {writer.dir}", file=sys.stderr)
    with make_progress(len(cases), verbose=args.verbose, quiet=args.quiet) as progress:
        outcome = execute(suite, cases, writer, progress=progress, isolation=args.isolation,
                          case_timeout_s=args.case_timeout, memory_budget_gib=args.memory_budget_gib,
                          profile=getattr(args, "profile", None), contention=getattr(args, "contention", None))
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
    if getattr(args, "fail_on_incorrect", False) and _incorrect(outcome.rows):
        return EXIT_INCORRECT
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
    from harness.core.escape import terminal  # rows of a resumed run came from its directory

    counts = rows["status"].value_counts()
    print(terminal("cases: " + ", ".join(f"{n} {s}" for s, n in counts.items())), file=sys.stderr)
    if "contended" in rows:
        import pandas as pd

        busy = int(rows["contended"].map(lambda v: not pd.isna(v) and bool(v)).sum())
        retried = int(pd.to_numeric(rows.get("discarded_rounds"), errors="coerce").fillna(0).sum()) \
            if "discarded_rounds" in rows else 0
        if busy or retried:
            print(f"contended: {busy} case(s) timed while other processes took their cores (contended = true, stable "
                  f"= false; see contention_note); {retried} contended round(s) re-run", file=sys.stderr)
    wrong = _incorrect(rows)
    for label, reason in wrong[:MAX_INCORRECT_LINES]:
        print(terminal(f"incorrect: {label}: {reason}"), file=sys.stderr)
    if len(wrong) > MAX_INCORRECT_LINES:
        print(f"incorrect: … and {len(wrong) - MAX_INCORRECT_LINES} more (status incorrect in the results)",
              file=sys.stderr)


#: At most this many wrong answers are listed after a run (all are in the results).
MAX_INCORRECT_LINES = 10


def _incorrect(rows) -> list[tuple[str, str]]:
    """(label, reason) of every row whose answer was wrong (status ``incorrect``)."""
    from harness.core.cases import label as case_label

    if rows.empty or "status" not in rows:
        return []
    return [(case_label(r), str(r.get("reason") or "")) for r in rows[rows["status"] == "incorrect"].to_dict("records")]


def cmd_list(args) -> int:
    from harness.core.cases import FEATURES
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
    for col in ("name", "family", "exact", "devices", "dtypes", "causal", "GQA", "backward", "head_dim", "features",
                "params"):
        table.add_column(col)
    for v in variants:
        causal = "both" if v["causal"] and v["non_causal"] else ("only" if v["causal"] else "no")
        params = ", ".join(f"{k}={val}" for k, val in v["params"].items())
        table.add_row(
            v["name"], v["family"], "yes" if v["exact"] else "approx", ",".join(v["devices"]),
            ",".join(d.replace("float", "f") for d in v["dtypes"]), causal,
            "yes" if v["gqa"] else "no", "yes" if v["backward"] else "no", v["head_dim"],
            ("all" if set(v["features"]) == set(FEATURES) else ",".join(v["features"]))
            + (" +score_mod" if v["score_mod"] else ""), params,
        )
    Console(width=200).print(table)
    return EXIT_OK


def cmd_report(args) -> int:
    from reports.render import render_report

    path = render_report(Path(args.run_dir), args.output)
    print(f"report: {path}")
    return EXIT_OK
