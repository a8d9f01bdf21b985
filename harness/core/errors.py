"""The one base of every error that is the user's to fix: a suite file, an argument, a results directory.

Each such error says what is wrong in one line (or one line per problem, :meth:`UserError.lines`);
the command line catches :class:`UserError` once (:func:`harness.cli.main.main`), prints its lines
and exits with status 2, never a traceback. Errors of the harness itself are not UserErrors.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, in words; ``lines()`` are what the command line prints."""

    def lines(self) -> list[str]:
        return [str(self)]


class RunExistsError(UserError, FileExistsError):
    """The output directory already holds a run."""
