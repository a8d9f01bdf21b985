"""Attention benchmarks under pytest-benchmark run only when asked for.

``pytest tests/benchmarks --benchmark-only`` (or ``--benchmark-enable``) runs them; a plain
``pytest`` run collects one skipped placeholder without reading any suite, so the normal test
run stays fast (and unaffected by the suite file) whether or not ``--benchmark-skip`` is in the
project's ``addopts``.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).parent
SKIP_REASON = "attention benchmarks run with: pytest tests/benchmarks --benchmark-only"


def benchmarks_requested(config) -> bool:
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


def pytest_collection_modifyitems(config, items):
    if benchmarks_requested(config):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)
