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

For ``resume`` the file must also be the checkout's committed code: tracked by git (``git
ls-files``) and unmodified (a clean ``git diff HEAD`` for it), so a downloaded run unpacked inside
the checkout (``incoming/run/`` naming ``../helper.py``) cannot bring its own plugin; a module
that an installed ``attention_bench.variants`` entry point names is the environment's own and is
allowed too.

Anything else (``/tmp/anything.py``, ``../../elsewhere.py``, a symlink out of the tree, an
untracked or modified file, an installed module that is not the project's) is refused with one
line naming it, unless the user passes ``--trust-plugins``; then every plugin is listed, one line
each, before it is imported. Installed entry-point plugins are the environment's own choice and
are not affected.

Two more rules for what a run directory may make ``bench`` run or connect to:

* :func:`vouched_commit` — ``bench compare --confirm`` (and any command that runs a recorded
  commit) runs only a commit the user vouches for: an ancestor of the checkout's ``HEAD``, or of a
  branch the user names (``--confirm-branch``); never one reachable only from a fetched results
  branch or another ref (:class:`UntrustedCommit`, one line naming the commit and the flag);
* :func:`received_suite` and :func:`recorded_options` — ``bench resume`` of the suite recorded in
  ``run.json`` takes no executor, cluster address or other connection target from it (those come
  from the command line or the user's own environment), and only numbers within
  :data:`harness.engine.runmeta.RECEIVED_LIMITS` (:class:`Refused`, one line naming the field and
  the flag or the way around it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.registry import PluginError
from harness.engine.plugins import looks_like_path
from harness.engine.store import StoreError
from harness.measure.environment import PROJECT_ROOT

if TYPE_CHECKING:
    from harness.engine.suite import Suite

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
HINT = "pass --trust-plugins to import it anyway"


class UntrustedPlugin(PluginError):
    """A plugin named by a results directory that is not the project's code (one line)."""


class Refused(StoreError):
    """Something a run directory asks for that ``bench`` will not do for it (one line, exit status 2)."""


class UntrustedCommit(Refused):
    """A recorded commit that is not in the history the user vouches for (one line naming it and the flag)."""


#: The flag that names a branch whose commits ``--confirm`` may run besides HEAD's ancestors.
BRANCH_FLAG = "--confirm-branch"


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
    places = [str(p) for p in spec.submodule_search_locations or []]
    if spec.has_location and spec.origin is not None:
        places.append(spec.origin)
    outside = [p for p in places if not within(p, root)]
    return outside[0] if outside else None


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    """``git -C root ARGS`` (no fsmonitor hook; no input), or None when git cannot run."""
    try:
        return subprocess.run(["git", "-c", "core.fsmonitor=false", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


def tracked_problem(path: str | Path, root: Path = PROJECT_ROOT) -> str | None:
    """Why the file ``path`` (inside the checkout ``root``) is not the checkout's committed code:
    not tracked by git (``git ls-files``), or changed since ``HEAD`` (``git diff``); None when it is."""
    real = os.path.realpath(path)
    rel = Path(real).relative_to(os.path.realpath(root)).as_posix()
    spec = f":(literal){rel}"
    listed = _git(root, "ls-files", "-z", "--", spec)
    if listed is None or listed.returncode != 0:
        return (f"the file {real} cannot be checked against git ({root} is not a git checkout here), "
                "so it cannot be told from a file that came with the run")
    if rel not in listed.stdout.split("\0"):
        return (f"the file {real} is not tracked by git in this checkout (git ls-files), so it may have come with "
                "the run")
    diff = _git(root, "diff", "--quiet", "--no-ext-diff", "--no-textconv", "HEAD", "--", spec)
    if diff is None or diff.returncode != 0:
        return f"the file {real} has changes not committed to git (git diff HEAD), so it is not the checkout's code"
    return None


def entry_point_modules() -> set[str]:
    """The modules the installed ``attention_bench.variants`` entry points name."""
    import importlib.metadata

    from harness.core.registry import ENTRY_POINT_GROUP

    out: set[str] = set()
    try:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            out.add(ep.module)
    except Exception:  # noqa: BLE001 - a broken distribution lists nothing
        pass
    return out


#: Directories of a project tree that hold results, never code: a plugin there is a results
#: directory's own file (a run directory may ship one beside its run.json).
DATA_DIRS = ("results",)


def plugin_problem(spec: str, base_dir: Path, root: Path = PROJECT_ROOT, *, in_process: bool = True,
                   data: tuple[Path, ...] = (), committed: bool = False) -> str | None:
    """Why plugin ``spec`` (a suite's entry: a file relative to ``base_dir``, or a module) is not
    code of the project tree ``root`` (None: it is). Files under :data:`DATA_DIRS` of ``root`` or
    under ``data`` (say, the run directory being resumed) are not code. ``in_process``: the module
    is imported in this process, so it must also be the one Python finds first. ``committed``
    (``resume``): the file must also be tracked and unmodified in the git checkout ``root``
    (:func:`tracked_problem`), and a module an installed entry point names is allowed."""
    data = tuple(Path(root, d) for d in DATA_DIRS) + tuple(data)
    if looks_like_path(spec):
        path = Path(base_dir) / spec
        where = os.path.realpath(path)
        if not within(path, root):
            return f"the file {where} is outside this project ({root})"
        if any(within(path, d) for d in data):
            return f"the file {where} is in a results directory, not in the project's code"
        return tracked_problem(path, root) if committed else None
    if committed and isinstance(spec, str) and spec in entry_point_modules():
        return None  # an installed entry point's module: the environment's own choice
    found = module_file(spec, root)
    if found is None or any(within(found, d) for d in data):
        return f"module {spec!r} is not a module of this project ({root})"
    if in_process and (elsewhere := _found_elsewhere(spec, root)) is not None:
        return f"module {spec!r} would be imported from {elsewhere}, outside this project ({root})"
    return tracked_problem(found, root) if committed else None


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
        for spec, note in plugins:  # note: why it is foreign, or None
            log(f"--trust-plugins: importing plugin {spec}" + (f" ({note})" if note else ""))


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
    allow([(p, plugin_problem(p, base_dir, data=(Path(run_dir),), committed=True)) for p in plugins],
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


# ----------------------------------------------------------------------------------------------
# recorded commits: only those the user vouches for are run


def _ref_commit(repo: Path, ref: str) -> str | None:
    """The commit ``ref`` (a name the user gave) names in ``repo``, or None."""
    if not isinstance(ref, str) or not ref or ref.startswith("-") or "\0" in ref:
        return None
    proc = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    return proc.stdout.strip() if proc is not None and proc.returncode == 0 and proc.stdout.strip() else None


def vouched_commit(repo: Path, commit: str, branches: Sequence[str] = (), *, what: str = "the run's") -> None:
    """Nothing when ``commit`` is one the user vouches for: an ancestor of (or equal to) ``repo``'s
    ``HEAD`` or of one of ``branches`` (named by the user, ``--confirm-branch``); else
    :class:`UntrustedCommit`, one line naming the commit and the flag. A commit reachable only from
    another ref (a fetched ``bench-results`` branch, a tag, a stash) is never run for a run directory."""
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{7,64}", commit):
        raise UntrustedCommit(f"{what} commit {str(commit)[:60]!r} is not a commit id")
    heads = [("HEAD", "HEAD")] + [(b, b) for b in branches]
    unknown = []
    for name, ref in heads:
        tip = _ref_commit(repo, ref)
        if tip is None:
            if name != "HEAD":
                unknown.append(name)
            continue
        proc = _git(repo, "merge-base", "--is-ancestor", commit, tip)  # both hexadecimal: never an option
        if proc is not None and proc.returncode == 0:
            return
    if unknown:
        raise UntrustedCommit(f"{BRANCH_FLAG} {unknown[0]!r}: no such branch or commit in {repo}")
    names = "HEAD" + "".join(f" or {b}" for b in branches)
    raise UntrustedCommit(
        f"{what} commit {commit[:12]} is not in the history of {names} of {repo} (it may be reachable only "
        f"from a fetched results branch or another ref), so its code is not run; check out or merge a branch "
        f"that holds it, or name such a branch with {BRANCH_FLAG} BRANCH if you trust its code")


# ----------------------------------------------------------------------------------------------
# resume: what the recorded suite may set


def received_suite(suite: Suite, processes: int | None = None) -> Suite:
    """The suite recorded in a run directory as ``bench resume`` runs it: its ``[run] executor`` and
    ``ray_address`` are not taken from the run (the process executor and no address, unless the
    command line gives ``--executor``/``--ray-address``, or the environment ``RAY_ADDRESS`` for Ray),
    and its numbers must be within :data:`harness.engine.runmeta.RECEIVED_LIMITS` (:class:`Refused`;
    ``processes``: the command line's ``--processes``, which replaces the suite's)."""
    from harness.core.config import RUN

    timing = dataclasses.asdict(suite.timing)
    if processes is None:
        _bounded("timing.processes", timing.get("processes"), "pass --processes N")
    for key in ("warmup", "min_reps", "max_reps", "min_time_s", "max_time_s", "threads"):
        _bounded(f"timing.{key}", timing.get(key), "resume it with your suite file: bench run SUITE --resume DIR")
    _bounded("run.case_timeout_s", suite.run.case_timeout_s,
             "resume it with your suite file: bench run SUITE --resume DIR")
    _bounded_cases(suite)
    run = dataclasses.replace(suite.run, executor=RUN["executor"].default, ray_address=None)
    return dataclasses.replace(suite, run=run)


def recorded_options(meta: dict[str, Any], *, processes: int | None = None,
                     allocator: str | None = None) -> dict[str, Any]:
    """``processes`` and ``allocator`` to resume the run of ``meta`` with: the command line's where
    given, else what the run recorded, checked (an allocator this harness knows; a process count
    within :data:`harness.engine.runmeta.RECEIVED_LIMITS`) — :class:`Refused` naming the flag otherwise."""
    from harness.core.config import RUN

    if processes is None:
        processes = (meta.get("timing") or {}).get("processes")
        _bounded("timing.processes", processes, "pass --processes N")
    if allocator is None:
        allocator = ((meta.get("environment") or {}).get("measurement") or {}).get("allocator")
        choices = RUN["allocator"].choices
        if allocator is not None and allocator not in choices:
            raise Refused(f"run.json: environment.measurement.allocator: {str(allocator)[:60]!r} is not an allocator "
                          f"this harness knows ({', '.join(choices)}); pass --allocator {choices[0]}")
    return {"processes": processes, "allocator": allocator}


def _bounded(field: str, value: Any, hint: str) -> None:
    from harness.engine.runmeta import RECEIVED_LIMITS

    limit = RECEIVED_LIMITS.get(field.split(".")[-1])
    if value is None or limit is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value <= limit):
        raise Refused(f"run.json: {field} = {str(value)[:40]} is more than bench resume takes from a run "
                      f"directory (at most {limit:g}); {hint}")


def _bounded_cases(suite: Suite) -> None:
    """Refuse a recorded suite that would expand to more cases than a run directory may plan."""
    from math import prod

    from harness.engine.runmeta import RECEIVED_LIMITS

    limit = RECEIVED_LIMITS["cases"]
    total = 0
    for entry in suite.variants:
        axes = dict(suite.sweep)
        axes.update(entry.axes)
        total += prod(max(len(v), 1) for v in axes.values()) * prod(max(len(v), 1) for v in entry.params.values())
        if total > limit:
            raise Refused(f"run.json: the recorded suite expands to more than {limit} cases, more than bench resume "
                          "takes from a run directory; resume it with your suite file: bench run SUITE --resume DIR")
