"""The one Jinja environment of every page (run report, comparison, trend, site): the shared
templates folder, autoescaping, and the number-with-unit filters of :mod:`harness.core.units`."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.core import units

TEMPLATES = Path(__file__).parent / "templates"

#: Filters every template may use; a page adds its own with ``environment(extra=...)``.
FILTERS = {
    "ms": units.duration_ms,
    "bytes": units.size_bytes,
    "tflops": units.rate_tflops,
    "err": units.error,
    "num": units.count,
    "percent": units.percent,
    "ratio": units.ratio,
    "flopcount": units.flop_count,
    "ci": units.ci_percent,
    "change": units.change,
}


def environment(filters: dict | None = None, globals: dict | None = None) -> Environment:
    """A Jinja environment over ``reports/templates`` with :data:`FILTERS` plus ``filters``."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters.update(FILTERS)
    env.filters.update(filters or {})
    env.globals.update(globals or {})
    return env
