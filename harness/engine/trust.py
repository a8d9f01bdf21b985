"""Which plugins a run directory may make ``bench`` import: only the project's own code.

A run's ``run.json`` keeps its suite, plugins list included, and two commands run code for a run:
``bench resume`` (the suite as recorded) and ``bench compare --confirm`` (each side's recorded
commit, extracted from this repository). Run directories travel (a colleague's results, a CI
artifact, a committed baseline), so a plugin they name is imported only when it belongs to the
project:

* a plugin file that resolves — ``..`` and symlinks followed — inside the project's tree: this
  checkout for ``resume``, the recorded commit's extracted tree for ``--confirm``; but not under
  its ``results/`` or the run directory (results, not code: a run directory may ship a ``.py``);
* a plugin module that is a module file of that tree (``pkg.mod`` → ``pkg/mod.py`` or
  ``pkg/mod/__init__.py``), and, when imported in this process, the one Python would import.

Anything else (``/tmp/anything.py``, ``../../elsewhere.py``, a symlink out of the tree, an
installed module that is not the project's) is refused with one line naming it, unless the user
passes ``--trust-plugins``; then every plugin is listed, one line each, before it is imported.
Installed entry-point plugins are the environment's own choice and are not affected.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable

from harness.core.registry import PluginError
from harness.engine.plugins import looks_like_path
from harness.measure.environment import PROJECT_ROOT

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
HINT = "pass --trust-plugins to import it anyway"


class UntrustedPlugin(PluginError):
    """A plugin named by a results directory that is not the project's code (one line)."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def within(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` lies under ``root``, both with ``..`` and symlinks resolved."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def module_file(name: str, root: Path) -> Path | None:
    """The file of module ``name`` in the tree ``root`` (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``,
    resolving inside ``root``), or None when ``root`` has no such module."""
    if not isinstance(name, str) or not _MODULE.fullmatch(name):
        return None
    *packages, last = name.split(".")
    base = Path(root, *packages)
    for candidate in (base / f"{last}.py", base / last / "__init__.py"):
        if candidate.is_file() and within(candidate, root):
            return candidate
    return None


def _found_elsewhere(name: str, root: Path) -> str | None:
    """Where this process would import module ``name``'s top-level package from, when that is
    outside ``root`` (None: inside, or nowhere, so the import fails). Found without importing."""
    try:
        spec = importlib.util.find_spec(name.split(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not spec.has_location and not spec.submodule_search_locations:
        return f"{spec.origin or 'nowhere'} (not a file)"  # built-in, frozen
    places = [str(p) for p in spec.submodule_search_locations or []] + ([spec.origin] if spec.has_location else [])
    outside = [p for p in places if not within(p, root)]
    return outside[0] if outside else None


#: Directories of a project tree that hold results, never code: a plugin there is a results
#: directory's own file (a run directory may ship one beside its run.json).
DATA_DIRS = ("results",)


def plugin_problem(spec: str, base_dir: Path, root: Path = PROJECT_ROOT, *, in_process: bool = True,
                   data: tuple[Path, ...] = ()) -> str | None:
    """Why plugin ``spec`` (a suite's entry: a file relative to ``base_dir``, or a module) is not
    code of the project tree ``root`` (None: it is). Files under :data:`DATA_DIRS` of ``root`` or
    under ``data`` (say, the run directory being resumed) are not code. ``in_process``: the module
    is imported in this process, so it must also be the one Python finds first."""
    data = tuple(Path(root, d) for d in DATA_DIRS) + tuple(data)
    if looks_like_path(spec):
        path = Path(base_dir) / spec
        where = os.path.realpath(path)
        if not within(path, root):
            return f"the file {where} is outside this project ({root})"
        if any(within(path, d) for d in data):
            return f"the file {where} is in a results directory, not in the project's code"
        return None
    found = module_file(spec, root)
    if found is None or any(within(found, d) for d in data):
        return f"module {spec!r} is not a module of this project ({root})"
    if in_process and (elsewhere := _found_elsewhere(spec, root)) is not None:
        return f"module {spec!r} would be imported from {elsewhere}, outside this project ({root})"
    return None


def allow(plugins: list[tuple[str, str | None]], *, source: str, trust: bool,
          log: Callable[[str], None] = _stderr) -> None:
    """``plugins``: (plugin, why it is not the project's code, or None). Refuse the first foreign one
    (:class:`UntrustedPlugin`, one line) unless ``trust``; with ``trust``, first list every plugin
    that will be imported, one line each."""
    foreign = [(spec, why) for spec, why in plugins if why is not None]
    if foreign and not trust:
        spec, why = foreign[0]
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UntrustedPlugin(f"{source} names plugin {spec!r}, which is not this project's code: {why}{more}; {HINT}")
    if trust:
        for spec, why in plugins:
            log(f"--trust-plugins: importing plugin {spec}" + (f" ({why})" if why else ""))


def check_recorded_suite(text: str, path: Path | None, run_dir: Path, *, trust: bool = False,
                         log: Callable[[str], None] = _stderr) -> None:
    """Before the suite recorded in the run ``run_dir`` (its TOML ``text``, first read from ``path``)
    is parsed, which imports its plugins: refuse those that are not this checkout's code (:func:`allow`)."""
    try:
        plugins = tomllib.loads(text).get("plugins", [])
    except tomllib.TOMLDecodeError:
        return  # parsing reports it, and imports nothing
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        return  # likewise
    base_dir = Path(path).parent if path else Path.cwd()
    allow([(p, plugin_problem(p, base_dir, data=(Path(run_dir),))) for p in plugins],
          source=f"{Path(run_dir) / 'run.json'}", trust=trust, log=log)


def plugins_for_tree(plugins: list[str], suite_dir: Path, recorded_roots: list[Path | None], tree: Path, *,
                     source: str, trust: bool = False, log: Callable[[str], None] = _stderr) -> tuple[Path, list[str]]:
    """(base_dir, plugins) to re-run a recorded suite from ``tree``, its commit of the project
    extracted (``bench compare --confirm``): the suite's directory and its plugin files inside the
    checkout it was recorded in (``recorded_roots``, compared as text: perhaps another machine's)
    are moved into ``tree``; modules are looked up in ``tree``. A plugin that is not the commit's
    code — a file elsewhere, one escaping ``tree`` through a symlink, a module ``tree`` does not
    hold — is refused (:func:`allow`) unless ``trust``; then it is used as recorded."""
    roots = [Path(os.path.normpath(r)) for r in recorded_roots if r is not None]

    def move(p: Path) -> Path | None:
        p = Path(os.path.normpath(p))
        for root in roots:
            if p.is_relative_to(root):
                return Path(tree) / p.relative_to(root)
        return None

    checked, out = [], []
    for spec in plugins:
        if looks_like_path(spec):
            recorded = Path(os.path.normpath(Path(suite_dir) / spec))
            moved = move(recorded)
            why = (plugin_problem(str(moved), tree, Path(tree), in_process=False) if moved is not None
                   else f"the file {recorded} is outside the checkout the run was recorded in")
            out.append(str(moved if moved is not None else recorded))
        else:
            why = plugin_problem(spec, tree, Path(tree), in_process=False)
            out.append(spec)
        checked.append((spec, why))
    allow(checked, source=source, trust=trust, log=log)
    return move(suite_dir) or Path(tree), out
