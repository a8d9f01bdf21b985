"""Session fixtures shared by the test files."""

from __future__ import annotations

import pytest
from hypothesis import settings

from tests.runs import TINY_SUITE, bench_run_process

# This machine is shared and loaded: hypothesis must judge inputs, never how long an example took.
settings.register_profile("attention-bench", deadline=None)
settings.load_profile("attention-bench")


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """One ``bench run`` of :data:`tests.runs.TINY_SUITE` per session: (the process, its run directory)."""
    return bench_run_process(tmp_path_factory.mktemp("tiny-run"), TINY_SUITE)


@pytest.fixture(scope="session")
def tiny_run(tiny_bench):
    """The shared tiny run's directory, for the CLI, report, export, browser, schema, site and terminal
    tests (read it; copy it before changing anything)."""
    return tiny_bench[1]
