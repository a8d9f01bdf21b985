"""The ``bench`` command line: the parser, dispatch to a command's handler, and exit codes.

Each command group is a module with ``register(subparsers)``, which adds its parsers and sets
``handler=function(args) -> exit status`` on them (:data:`COMMAND_MODULES`). Registering
imports nothing heavy: torch, pandas, scipy and rich are imported by the handlers that need
them, so ``bench --help`` is quick. Exit codes: :mod:`harness.cli.common`.
"""

from __future__ import annotations

import importlib
import sys

from harness import __version__
from harness.cli.common import EXIT_USAGE, Parser

#: Modules that add subcommands, in the order ``bench --help`` lists them.
COMMAND_MODULES: list[str] = ["harness.cli.run", "harness.cli.profile", "harness.cli.measure", "harness.cli.regression", "harness.cli.export",
                             "harness.cli.site", "harness.cli.scale"]


def build_parser() -> Parser:
    p = Parser(prog="bench", description="Attention Bench: measure attention implementations on this machine.")
    p.add_argument("--version", action="version", version=f"attention-bench {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from harness.core.escape import terminal
    from harness.core.registry import RegistryError
    from harness.core.safefs import UnsafePath
    from harness.engine.lifecycle import ResumeError
    from harness.engine.merge import MergeError
    from harness.engine.shard import ShardError
    from harness.engine.store import StoreError
    from harness.engine.suite import SuiteError

    try:
        return args.handler(args)
    except SuiteError as exc:
        for line in exc.problems:
            print(terminal(line), file=sys.stderr)
        return EXIT_USAGE
    except (RegistryError, StoreError, ResumeError, FileExistsError, MergeError, ShardError, UnsafePath) as exc:
        print(terminal(f"bench: {exc}"), file=sys.stderr)  # one line, whatever a run directory put in it
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
