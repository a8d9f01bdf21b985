"""Session fixtures shared by the test files."""

from __future__ import annotations

import pytest
from hypothesis import settings

from tests.runs import TINY_SUITE, bench_run

# This machine is shared and loaded: hypothesis must judge inputs, never how long an example took.
settings.register_profile("attention-bench", deadline=None)
settings.load_profile("attention-bench")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One ``bench run`` of :data:`tests.runs.TINY_SUITE` per session, for the report, export, browser,
    schema, site and terminal tests (read it; copy it before changing anything)."""
    return bench_run(tmp_path_factory.mktemp("tiny-run"), TINY_SUITE)
