"""Running at scale: ``bench run --shard i/n``, ``--executor process|ray``, ``--ray-address``, and
``bench merge RUN... -o DIR``.

Listed in :data:`harness.cli.main.COMMAND_MODULES` (it adds ``merge``); :mod:`harness.cli.run`
calls :func:`add_run_arguments`, :func:`with_executor` and :func:`chosen_cases`. The work is in
:mod:`harness.engine.shard`, :mod:`harness.engine.merge` and :mod:`harness.engine.rayexec`; this
module imports only the standard library and the CLI's common parts at import.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cli.common import EXIT_OK


def add_run_arguments(run, resume) -> None:
    """``--executor`` and ``--ray-address`` on ``bench run`` and ``bench resume``; ``--shard`` on run."""
    from harness.core.config import RUN

    for p in (run, resume):
        p.add_argument("--executor", choices=RUN["executor"].choices, help=RUN["executor"].help)
        p.add_argument("--ray-address", metavar="ADDR", help=RUN["ray_address"].help + " (implies --executor ray)")
    run.add_argument("--shard", metavar="I/N", help="run only shard I of N (1..N): a deterministic partition of "
                     "the suite's cases balanced by estimated cost, the same on every machine; bench merge puts "
                     "the shards' runs back together (see docs/how-to/scale-out.md)")


def with_executor(suite, args):
    """``suite`` with the command line's ``--executor`` and ``--ray-address`` in its ``[run]`` table."""
    executor = getattr(args, "executor", None)
    address = getattr(args, "ray_address", None)
    if address and executor is None:
        executor = "ray"
    changes = {k: v for k, v in (("executor", executor), ("ray_address", address)) if v is not None}
    return dataclasses.replace(suite, run=dataclasses.replace(suite.run, **changes)) if changes else suite


def chosen_cases(suite, args, select: Callable[[Any, str | None], list]) -> tuple[list, dict[str, Any] | None]:
    """The cases ``bench run`` runs (``select(suite, --only)``, then ``--shard``'s part of them) and
    what run.json records of the shard (None without ``--shard``). ShardError for a bad ``--shard``
    or one combined with ``--only`` or ``--resume``."""
    from harness.engine import shard as sharding

    text = getattr(args, "shard", None)
    if text is None:
        return select(suite, args.only), None
    part = sharding.parse_shard(text)
    if args.only or args.resume:
        raise sharding.ShardError(f"--shard cannot be combined with {'--only' if args.only else '--resume'} "
                                  "(a shard is a fixed part of the whole suite; bench resume a shard's run directory)")
    cases = select(suite, None)
    mine = sharding.select(cases, part)
    record = sharding.record(part, cases, mine)
    share = record["cost_s"] / record["suite_cost_s"] if record["suite_cost_s"] else 0.0
    print(f"shard {part}: {len(mine)} of {len(cases)} cases, {share:.0%} of the suite's estimated cost",
          file=sys.stderr)
    return mine, record


def record_shard(writer, record: dict[str, Any] | None) -> None:
    """Write the shard into the new run's run.json (nothing without ``--shard``)."""
    if record is not None:
        writer.meta["shard"] = record
        writer.write_meta()


def register(sub) -> None:
    merge = sub.add_parser("merge", help="merge runs (the shards of one suite) into one run with its report")
    merge.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or ids, latest, …) to merge")
    merge.add_argument("-o", "--output", metavar="DIR", required=True, help="the merged run's directory (new)")
    merge.add_argument("--allow-partial", action="store_true",
                       help="merge even with duplicate or missing cases (a duplicate keeps the first run's row)")
    merge.add_argument("--no-report", action="store_true", help="skip writing report.html")
    merge.set_defaults(handler=cmd_merge)


def cmd_merge(args) -> int:
    from harness.engine.merge import merge_runs
    from harness.regression.history import resolve_run

    paths = [resolve_run(spec) for spec in args.runs]
    merged = merge_runs(paths, Path(args.output), allow_partial=args.allow_partial)
    from harness.core.escape import terminal  # case ids and names come from the runs

    for what, items in (("duplicate", merged.duplicates), ("missing", merged.missing)):
        if items:
            more = f" … and {len(items) - 10} more" if len(items) > 10 else ""
            print(terminal(f"bench merge: {what} (merged anyway, --allow-partial): {'; '.join(items[:10])}{more}"),
                  file=sys.stderr)
    print(f"merged {len(paths)} runs: {len(merged.rows)} cases from {merged.machines} machine(s) → {merged.path}",
          file=sys.stderr)
    if not args.no_report and not merged.rows.empty:
        from reports.render import render_report

        try:
            print(f"report: {render_report(merged.path)}")
        except Exception as exc:  # the merged results are on disk already
            print(terminal(f"bench merge: no report ({type(exc).__name__}: {exc}); retry with  bench report "
                           f"{merged.path}"), file=sys.stderr)
    print(f"results: {merged.path / 'results.parquet'}")
    return EXIT_OK
