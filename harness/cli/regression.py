"""Regression-tracking subcommands: ``compare``, ``history``, ``show``, ``trend``, ``baseline``.

Listed in :data:`harness.cli.main.COMMAND_MODULES`; :func:`register` adds the parsers.
Exit status: 0 fine; 1 ``compare --fail-on-regression`` found a regression
(``regressed`` or ``now failing``); 2 bad input (a run that cannot be found or
read, a bad threshold), as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.cli.common import EXIT_OK, EXIT_REGRESSED, EXIT_USAGE
from harness.core.escape import rich as markup
from harness.core.escape import terminal


def fraction(text: str) -> float:
    """'0.05' or '5%' → 0.05 (argparse type)."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction like 0.05 or a percentage like 5%, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (or a percentage), got {text!r}")
    return value


def register(sub) -> None:
    root_help = "results root holding runs/ and baseline/ (default: results)"

    cmp = sub.add_parser("compare", help="compare two runs case by case and say what regressed")
    cmp.add_argument("base", metavar="BASE", help="run directory, run id, latest[~N][@SUITE] or baseline[@SUITE]")
    cmp.add_argument("new", metavar="NEW", help="run directory, run id, latest[~N][@SUITE] or baseline[@SUITE]")
    cmp.add_argument("--format", choices=("table", "markdown", "json"), default="table",
                     help="what to print (default table)")
    cmp.add_argument("--fail-on-regression", action="store_true",
                     help="exit 1 when any case regressed or now fails (for CI)")
    cmp.add_argument("--confirm", action="store_true",
                     help="re-run cases that look slower or faster, BASE's commit and NEW's interleaved, "
                          "when both are runnable here; keep only the verdicts the re-run shows again")
    cmp.add_argument("--confirm-rounds", type=int, default=8, metavar="N",
                     help="interleaved rounds per side for --confirm (default 8)")
    cmp.add_argument("--trust-plugins", action="store_true",
                     help="with --confirm: also import plugins the runs' suites name that are not their commits' "
                          "code (listed first; see docs/how-to/sharing-results.md)")
    cmp.add_argument("--confirm-branch", action="append", default=[], metavar="BRANCH",
                     help="with --confirm: also re-run commits of BRANCH's history (by default only ancestors of "
                          "HEAD are run; a commit only a fetched results branch holds is refused); repeatable")
    cmp.add_argument("--time-threshold", type=fraction, metavar="F",
                     help="smallest time change that counts (default 5%%)")
    cmp.add_argument("--memory-threshold", type=fraction, metavar="F",
                     help="smallest memory change that counts (default 10%%)")
    cmp.add_argument("--alpha", type=fraction, metavar="F", help="false-discovery rate across the cases (default 0.05)")
    cmp.add_argument("-o", "--output", metavar="FILE", help="write the HTML comparison here (default NEW/compare.html)")
    cmp.add_argument("--no-html", action="store_true", help="do not write compare.html")
    cmp.add_argument("--all", action="store_true", help="list unchanged cases too")
    cmp.add_argument("--root", default="results", metavar="DIR", help=root_help)
    cmp.set_defaults(handler=cmd_compare)

    hist = sub.add_parser("history", help="list the runs in the history")
    hist.add_argument("--suite", help="only this suite's runs")
    hist.add_argument("--last", type=int, metavar="N", help="only the last N runs")
    hist.add_argument("--json", action="store_true", help="machine-readable output")
    hist.add_argument("--from", dest="history", action="append", default=[], metavar="DIR",
                      help="also list the runs under DIR/runs/ (a checkout of the bench-results branch); repeatable")
    hist.add_argument("--root", default="results", metavar="DIR", help=root_help)
    hist.set_defaults(handler=cmd_history)

    show = sub.add_parser("show", help="print one run: its environment and its rows")
    show.add_argument("run", metavar="RUN", help="run directory, run id, latest[~N][@SUITE] or baseline[@SUITE]")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--root", default="results", metavar="DIR", help=root_help)
    show.set_defaults(handler=cmd_show)

    trend = sub.add_parser("trend", help="per-case time across runs, with change points; writes trend.html")
    trend.add_argument("--suite", help="suite to follow (default: the suite of the latest run)")
    trend.add_argument("--last", type=int, default=100, metavar="N", help="the last N runs (default 100)")
    trend.add_argument("--all-machines", action="store_true",
                       help="keep runs from every machine (default: only the latest run's machine)")
    trend.add_argument("--min-step", type=fraction, default=0.05, metavar="F",
                       help="smallest step reported (default 5%%)")
    trend.add_argument("--case", metavar="TEXT", help="only cases whose label contains TEXT")
    trend.add_argument("-o", "--output", metavar="FILE", help="where to write the HTML (default ROOT/trend.html)")
    trend.add_argument("--root", default="results", metavar="DIR", help=root_help)
    trend.set_defaults(handler=cmd_trend)

    base = sub.add_parser("baseline", help="promote a run to baseline, or list the baselines")
    bsub = base.add_subparsers(dest="baseline_command", metavar="ACTION", parser_class=type(cmp))
    bset = bsub.add_parser("set", help="copy RUN into ROOT/baseline/<suite>/ (commit that directory)")
    bset.add_argument("run", metavar="RUN", help="run directory, run id or latest[~N][@SUITE]")
    bset.add_argument("--force", action="store_true", help="promote a run that did not complete")
    bset.add_argument("--root", default="results", metavar="DIR", help=root_help)
    bset.set_defaults(handler=cmd_baseline_set)
    blist = bsub.add_parser("list", help="list the baselines")
    blist.add_argument("--root", default="results", metavar="DIR", help=root_help)
    blist.set_defaults(handler=cmd_baseline_list)
    base.set_defaults(handler=lambda args: _usage("bench baseline: say set RUN or list"))


def _usage(message: str) -> int:
    print(terminal(message), file=sys.stderr)  # one line, whatever a run directory put in it
    return EXIT_USAGE


def _console():
    from harness.regression.output import console

    return console()


# ----------------------------------------------------------------------------------------------
# compare


def _resolve_pair(base: str, new: str, root: str) -> tuple[Path, Path]:
    from harness.regression.history import resolve_run, run_info

    def is_baseline(spec: str) -> bool:
        return spec == "baseline" or spec.startswith("baseline@")

    if is_baseline(base) and not is_baseline(new):
        new_dir = resolve_run(new, root)
        return resolve_run(base, root, suite_hint=run_info(new_dir).suite), new_dir
    base_dir = resolve_run(base, root)
    return base_dir, resolve_run(new, root, suite_hint=run_info(base_dir).suite)


def cmd_compare(args) -> int:
    from harness.regression import output
    from harness.regression.compare import compare_runs
    from harness.regression.confirm import confirm

    base_dir, new_dir = _resolve_pair(args.base, args.new, args.root)
    comparison = compare_runs(base_dir, new_dir, args.time_threshold, args.memory_threshold, args.alpha)
    for w in comparison.warnings:
        print(terminal(f"warning: {w}"), file=sys.stderr)
    if args.confirm:
        if args.confirm_rounds < 1:
            return _usage("bench compare: --confirm-rounds must be at least 1")
        result = confirm(comparison, rounds=args.confirm_rounds, trust_plugins=args.trust_plugins,
                         branches=args.confirm_branch)
        print(terminal(f"confirm: {result['message']}"), file=sys.stderr)

    if args.format == "json":
        print(output.to_json(comparison))
    elif args.format == "markdown":
        print(output.to_markdown(comparison, all_cases=args.all), end="")
    else:
        output.print_table(comparison, all_cases=args.all)

    if not args.no_html:
        from reports.compare import render_compare

        out = Path(args.output) if args.output else _default_html(Path(new_dir), Path(args.root))
        try:
            path = render_compare(comparison, out)
            print(f"compare report: {path}", file=sys.stderr)
        except OSError as exc:
            print(f"warning: could not write {out}: {exc}", file=sys.stderr)
    if args.fail_on_regression and comparison.has_regression:
        return EXIT_REGRESSED
    return EXIT_OK


def _default_html(new_dir: Path, root: Path) -> Path:
    """NEW's run directory, except for a baseline (a committed copy is left as it is): ROOT then."""
    if new_dir.resolve().parent == (root / "baseline").resolve():
        return root / "compare.html"
    return new_dir / "compare.html"


# ----------------------------------------------------------------------------------------------
# history, show


def cmd_history(args) -> int:
    from harness.regression.history import list_baselines, list_runs

    runs = list_runs(args.root, args.suite)
    if args.history:  # --from: runs of other results roots (a bench-results checkout) too
        from harness.regression.timeline import list_runs_from
        runs = list_runs_from([r for r in [args.root] if Path(r).is_dir()] + args.history, args.suite)
    if args.last is not None:
        runs = runs[-args.last:] if args.last > 0 else []
    baselines = {b.run_id: b.suite for b in list_baselines(args.root)}
    if args.json:
        out = []
        for r in runs:
            out.append({"run_id": r.run_id, "path": str(r.path), "suite": r.suite, "started": r.started,
                        "finished": r.finished, "status": r.status, "commit": r.commit, "dirty": r.dirty,
                        "fingerprint": r.fingerprint, "hostname": r.hostname, "cases": r.cases,
                        "statuses": r.status_counts(), "versions": r.versions, "baseline": r.run_id in baselines})
        print(json.dumps(out, indent=2))
        return EXIT_OK
    if not runs:
        print(f"no runs under {Path(args.root) / 'runs'}" + (f" for suite {args.suite!r}" if args.suite else ""),
              file=sys.stderr)
        return EXIT_OK
    from rich.table import Table

    where = ", ".join(str(Path(r) / "runs") for r in [args.root, *args.history])
    table = Table(title=f"{len(runs)} run(s) under {markup(where)}")
    for col in ("run id", "suite", "started", "status", "cases", "commit", "torch", "machine", "wall"):
        table.add_column(col, overflow="fold")
    for r in runs:
        counts = r.status_counts()
        cases = ", ".join(f"{n} {s}" for s, n in counts.items()) or str(r.cases or "")
        mark = " [bold](baseline)[/]" if r.run_id in baselines else ""
        table.add_row(
            markup(r.run_id) + mark, markup(r.suite), markup(r.started.replace("T", " ").replace("+00:00", "Z")),
            markup(r.status), markup(cases), markup(r.short_commit), markup(r.versions.get("torch") or ""),
            markup(f"{r.hostname or ''} {r.fingerprint or ''}".strip()),
            f"{r.wall_s:.0f} s" if isinstance(r.wall_s, (int, float)) else "",
        )
    _console().print(table)
    return EXIT_OK


def cmd_show(args) -> int:
    from harness.core import units as fmt
    from harness.core.cases import label as case_label
    from harness.engine import store
    from harness.regression.history import resolve_run, run_info

    info = run_info(resolve_run(args.run, args.root))
    rows = store.read_results(info.path)
    if args.json:
        records = json.loads(rows.to_json(orient="records"))
        print(json.dumps({"meta": info.meta, "rows": records}, indent=2, default=str))
        return EXIT_OK
    from rich.table import Table

    console = _console()
    env = info.meta.get("environment") or {}
    machine = env.get("machine") or {}
    gpu = machine.get("gpu") or {}
    console.print(f"[bold]{markup(info.run_id)}[/]  suite {markup(info.suite)} · {markup(info.status)} · "
                  f"{markup(info.path)}")
    console.print(markup(f"started {info.started} · finished {info.finished or '—'}"
                         + (f" ({info.wall_s:.1f} s)" if isinstance(info.wall_s, (int, float)) else "")))
    console.print(markup(f"commit {info.short_commit} · machine {machine.get('hostname')} ({info.fingerprint}): "
                         f"{machine.get('cpu_model')}, {machine.get('cpu_count')} cores"
                         + (f", GPU {gpu.get('name')}" if gpu else "") + f" · threads {env.get('threads')}"))
    console.print(markup("versions " + " · ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)))
    table = Table()
    columns = ("case", "status", "time (median)", "p10–p90", "reps", "throughput", "peak memory", "rel. error",
               "reason")
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in rows.to_dict("records"):
        ok = r.get("status") == "ok"
        table.add_row(*map(markup, (
            case_label(r), str(r.get("status")), fmt.duration_ms(r.get("time_ms")) if ok else "",
            f"{fmt.duration_ms(r.get('time_ms_p10'))} – {fmt.duration_ms(r.get('time_ms_p90'))}" if ok else "",
            str(int(r.get("reps") or 0)) if ok else "", fmt.rate_tflops(r.get("tflops_per_s")) if ok else "",
            fmt.size_bytes(r.get("peak_mem_bytes")) if ok else "", fmt.error(r.get("rel_err")) if ok else "",
            str(r.get("reason") or ""),
        )))
    console.print(table)
    from reports.terminal import print_headline
    print_headline(rows, console, suite_definition=(info.meta.get("suite") or {}).get("definition"))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# trend


def cmd_trend(args) -> int:
    from harness.regression.changepoint import case_trends
    from harness.regression.history import list_runs, load_history
    from reports.compare import render_trend

    runs = list_runs(args.root, args.suite)
    if not runs:
        return _usage(f"bench trend: no runs under {Path(args.root) / 'runs'}"
                      + (f" for suite {args.suite!r}" if args.suite else ""))
    suite = args.suite or runs[-1].suite
    fingerprint = None if args.all_machines else runs[-1].fingerprint
    rows, kept = load_history(args.root, suite, fingerprint, args.last)
    all_of_suite = len(list_runs(args.root, suite))
    if fingerprint is not None and len(kept) < min(all_of_suite, args.last or all_of_suite):
        print(f"note: {min(all_of_suite, args.last) - len(kept)} run(s) from other machines left out "
              "(--all-machines keeps them)", file=sys.stderr)
    if not kept:
        return _usage(f"bench trend: no readable runs of suite {suite!r}")
    trends = case_trends(rows, kept, min_step=args.min_step)
    if args.case:
        trends = [t for t in trends if args.case in t["label"]]
    out = Path(args.output) if args.output else Path(args.root) / "trend.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    path = render_trend(trends, kept, suite, out, min_step=args.min_step)  # never through a symlink at out

    console = _console()
    steps = [(t, s) for t in trends for s in t["steps"]]
    console.print(markup(f"suite {suite}: {len(kept)} run(s), {len(trends)} case(s), {len(steps)} step(s) of "
                         f"at least {args.min_step:.0%}"))
    if steps:
        from rich.table import Table

        table = Table()
        for col in ("case", "change", "at run", "commit", "before", "after"):
            table.add_column(col, overflow="fold")
        from harness.core import units as fmt

        for t, s in sorted(steps, key=lambda ts: -abs(ts[1]["ratio"] - 1)):
            style = "red" if s["ratio"] > 1 else "green"
            table.add_row(markup(t["label"]), f"[{style}]{markup(fmt.change(s['ratio']))}[/]", markup(s["run_id"]),
                          markup(s["commit"] or ""), markup(fmt.duration_ms(s["before"])),
                          markup(fmt.duration_ms(s["after"])))
        console.print(table)
    print(f"trend report: {path}", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# baseline


def cmd_baseline_set(args) -> int:
    from harness.regression.history import run_info, set_baseline

    dest = set_baseline(args.run, args.root, force=args.force)
    info = run_info(dest)
    print(terminal(f"baseline of suite {info.suite}: {info.run_id} (commit {info.short_commit}) → {dest}"))
    if info.dirty is not False or not info.commit:
        print("warning: this run was not recorded from a clean commit, so bench compare --confirm cannot "
              "re-run its code; promote a run made from a committed tree", file=sys.stderr)
    print(terminal(f"commit it: git add {dest} && git commit -m 'baseline {info.suite}: {info.run_id}'"),
          file=sys.stderr)
    return EXIT_OK


def cmd_baseline_list(args) -> int:
    from harness.regression.history import list_baselines

    baselines = list_baselines(args.root)
    if not baselines:
        print(f"no baselines under {Path(args.root) / 'baseline'} (bench baseline set RUN)", file=sys.stderr)
        return EXIT_OK
    for b in baselines:
        print("\t".join(terminal(x) for x in (b.suite, b.run_id, b.short_commit, b.fingerprint, b.path)))
    return EXIT_OK
