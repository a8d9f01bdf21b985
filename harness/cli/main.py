"""The ``bench`` command line: the parser, dispatch to a command's handler, and exit codes.

Each command group is a module with ``register(subparsers)``, which adds its parsers and sets
``handler=function(args) -> exit status`` on them (:data:`COMMAND_MODULES`). A handler lets a
:class:`harness.core.errors.UserError` propagate: :func:`main` prints its lines and exits 2. Registering
imports nothing heavy: torch, pandas, scipy and rich are imported by the handlers that need
them, so ``bench --help`` is quick. Exit codes: :mod:`harness.cli.common`.
"""

from __future__ import annotations

import importlib
import sys

from harness import __version__
from harness.cli.common import EXIT_USAGE, Parser

#: Modules that add subcommands, in the order ``bench --help`` lists them.
COMMAND_MODULES: list[str] = [
    "harness.cli.run",
    "harness.cli.profile",
    "harness.cli.measure",
    "harness.cli.regression",
    "harness.cli.export",
    "harness.cli.site",
    "harness.cli.scale",
    "harness.cli.winners",
]


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
    from harness.core.errors import UserError
    from harness.core.escape import terminal

    try:
        return args.handler(args)
    except UserError as exc:  # the user's to fix: one line per problem, status 2, no traceback
        from harness.engine.suite import SuiteError

        prefix = "" if isinstance(exc, SuiteError) else f"bench {args.command}: "  # a suite's lines name their file
        for line in exc.lines():  # escaped and cut: whatever a run directory put in it
            print(terminal(prefix + line), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
