"""What every ``bench`` command module shares: the exit codes, the parser class, argument types.

Exit status: :data:`EXIT_OK` (0) success; :data:`EXIT_FAILED` (1) a run was interrupted or could
not write its report, or ``compare --fail-on-regression`` found a regression; :data:`EXIT_USAGE`
(2) bad input (a suite file, arguments, a results directory), one line per problem, no traceback;
:data:`EXIT_INCORRECT` (3) ``run --fail-on-incorrect`` and a case gave a wrong answer.

This module imports only the standard library, so building the parser for ``bench --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import math
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCORRECT = 0, 1, 2, 3
#: ``bench compare --fail-on-regression``: something regressed or now fails.
EXIT_REGRESSED = EXIT_FAILED


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2, instead of argparse's usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def positive_number(text: str) -> float:
    """argparse type: a number > 0, with a one-line message otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a one-line message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value
