"""``bench profile``: where a case's call spends its time, operator by operator (torch.profiler).

* ``bench profile RUN [--case PATTERN]`` — for each matching case of a run made with ``--profile``,
  its top operators as a table (group, calls, self and total time, share, FLOPs) and its time per
  group, from the run's ``profile.parquet`` (:mod:`harness.measure.profile`);
* ``bench profile SUITE.toml --case PATTERN`` — runs only the matching cases of the suite, profiled
  (what ``bench run SUITE --only PATTERN --profile`` does), into a new run directory, then prints
  the same.

PATTERN: :mod:`harness.core.patterns`. Listed in :data:`harness.cli.main.COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import EXIT_OK, EXIT_USAGE, positive_int

PATTERN_HELP = ("cases whose label (as bench run --dry-run lists them: 'naive cpu float32 fwd B1 H8 L1024 D64') has "
                "every word of PATTERN (a variant's name or parameter such as backend=math, globs allowed), or "
                "whose case id starts with it")


def register(sub) -> None:
    p = sub.add_parser("profile", help="where a case's time goes, operator by operator (torch.profiler)")
    p.add_argument("target", metavar="RUN|SUITE",
                   help="a run made with --profile (directory, run id, latest …), or a suite file to profile cases of")
    p.add_argument("--case", metavar="PATTERN", help=PATTERN_HELP + "; required with a suite")
    p.add_argument("--top", type=positive_int, default=12, metavar="N", help="operators shown per case (default 12)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="with a suite: the run directory (default results/runs/<run_id>)")
    p.add_argument("--root", default="results", metavar="DIR", help="results root to find RUN in (default: results)")
    p.set_defaults(handler=cmd_profile)


def _usage(message: str) -> int:
    from harness.core.escape import terminal

    print(terminal(f"bench profile: {message}"), file=sys.stderr)
    return EXIT_USAGE


def cmd_profile(args) -> int:
    target = Path(args.target)
    if target.suffix == ".toml" or target.is_file():
        if not args.case:
            return _usage(f"profiling cases of a suite needs --case PATTERN (every case: bench run {args.target} "
                          "--profile)")
        run_dir, status = _profile_suite(args)
    else:
        from harness.regression.history import resolve_run

        run_dir = resolve_run(args.target, args.root)
        status = EXIT_OK
    shown = print_profile(run_dir, args.case, args.top)
    return status if shown else EXIT_USAGE


def _profile_suite(args) -> tuple[Path, int]:
    """Run the suite's cases that match ``--case``, profiled and timed in one process, as
    ``bench run SUITE --only PATTERN --profile --processes 1`` would; (run directory, exit status)."""
    from harness.cli.run import _execute, select_cases
    from harness.engine import lifecycle
    from harness.engine.suite import load_suite

    suite = lifecycle.with_options(load_suite(args.target), processes=1)
    cases = select_cases(suite, args.case)
    writer = lifecycle.start_run(suite, Path(args.output) if args.output else None, cases)
    options = argparse.Namespace(verbose=True, quiet=True, isolation=None, case_timeout=None, memory_budget_gib=None,
                                 no_report=False, profile=True)
    return writer.dir, _execute(suite, cases, writer, options)


def _labels(run_dir: Path) -> dict[str, str]:
    """case_id → the case's label (what PATTERN is matched against)."""
    from harness.core.cases import Case
    from harness.core.cases import label as case_label
    from harness.engine.store import read_results

    labels = {}
    for row in read_results(run_dir).to_dict("records"):
        try:
            labels[row["case_id"]] = Case.from_row(row).label()
        except (ValueError, KeyError, TypeError):
            labels[row["case_id"]] = case_label(row)
    return labels


def print_profile(run_dir: Path, pattern: str | None, top: int) -> bool:
    """Print the profile of the cases of ``run_dir`` matching ``pattern`` (all when None); False
    (after saying why on stderr) when the run has no profile or no profiled case matches."""
    from rich.console import JustifyMethod
    from rich.table import Table

    from harness.core import units as fmt
    from harness.core.escape import rich as esc
    from harness.core.escape import terminal
    from harness.core.patterns import matches
    from harness.engine.store import read_profile
    from harness.regression.output import console

    profile = read_profile(run_dir)
    if profile is None:
        print(f"bench profile: {run_dir} has no profile (make one with: bench run SUITE --profile, "
              "or bench profile SUITE --case PATTERN)", file=sys.stderr)
        return False
    labels = _labels(run_dir)
    chosen = sorted((label, cid) for cid, label in labels.items() if pattern is None or matches(pattern, label, cid))
    profiled = [(label, cid) for label, cid in chosen if cid in profile.cases]
    if not profiled:
        what = f"matches {pattern!r}" if chosen or pattern else "was profiled"
        print(terminal(f"bench profile: no profiled case of {run_dir} {what}"
                       + (f" ({len(chosen)} cases match, none profiled: skipped, failed or not selected)"
                          if chosen else "")), file=sys.stderr)
        return False
    out = console()
    has_cuda = "cuda_self_time_ms" in profile.table.columns
    for label, cid in profiled:
        record = profile.cases[cid]
        if record.get("error"):
            out.print(f"[bold]{esc(label)}[/bold]  [red]profiling failed: {esc(record['error'])}[/red]")
            continue
        ops = profile.table[profile.table["case_id"] == cid]
        basis = "cuda_self_time_ms" if has_cuda and ops["cuda_self_time_ms"].notna().any() else "self_time_ms"
        ops = ops.sort_values(basis, ascending=False)
        total_ms = float(ops[basis].sum())
        profile_s = record.get("profile_s")
        trace = record.get("trace")  # a record may come without its trace
        table = Table(title=esc(f"{label}  ·  case {cid}"), title_justify="left", caption_justify="left",
                      caption=esc(f"self time of the profiled call {fmt.duration_ms(total_ms)} "
                                  f"({'CUDA kernels' if basis != 'self_time_ms' else 'CPU'}) · profiling took "
                                  + (f"{profile_s:.2f} s" if isinstance(profile_s, (int, float)) else "?")
                                  + (f" · trace {run_dir / str(trace)}" if isinstance(trace, str) else " · no trace")))
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("operator", "left"), ("group", "left"), ("calls", "right"), ("self", "right"), ("self %", "right"),
            ("total", "right"), ("FLOPs", "right"))
        for col, justify in columns:
            table.add_column(col, justify=justify)
        if has_cuda:
            table.add_column("CUDA self", justify="right")
        for r in ops.head(top).to_dict("records"):
            cells = [r["op"], r["group"], str(r["calls"]), fmt.duration_ms(r["self_time_ms"]),
                     f"{100 * r['self_share']:.1f}", fmt.duration_ms(r["total_time_ms"]),
                     fmt.flop_count(r["flops"]) if r["flops"] else ""]
            table.add_row(*map(esc, cells), *([fmt.duration_ms(r["cuda_self_time_ms"])] if has_cuda else []))
        out.print(table)
        groups = ops.groupby("group")["self_share"].sum().sort_values(ascending=False)
        out.print(esc("by group: " + " · ".join(f"{g} {100 * s:.1f}%" for g, s in groups.items() if s >= 0.0005))
                  + "\n")
    missing = len(chosen) - len(profiled)
    if missing:
        print(f"({missing} matching cases have no profile: skipped, failed or not selected for profiling)",
              file=sys.stderr)
    return True
