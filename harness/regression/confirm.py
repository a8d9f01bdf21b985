"""Confirming suspect time verdicts by re-running both sides, interleaved (``bench compare --confirm``).

Why. A run's stored samples are many repetitions inside one process, minutes
long: they tell how precisely that process measured, not how far the same case
moves between processes and hours. On a shared machine the second is much the
larger (on this project's 2-core cloud VM whole runs came out 10-30% faster or
slower than the run before, with no change at all), so a per-case test on stored
samples is a screen, not proof: it flags anything that moved, and the nightly
job would fail most nights.

How. The suspects are all the cases the stored samples gave a time verdict: those called
``regressed``, ``improved`` or ``inconclusive``, and those called ``unchanged`` too, because
the stored samples cannot rule a change out (on this project's 2-core VM two probes slowed by
9-15%, as their re-runs measured, had stored ratios of ×0.99 and ×1.00; an earlier rule that
re-ran an ``unchanged`` case only beyond half the threshold let them pass as ``unchanged``). Each is
measured again, ``rounds`` times per side, alternately A B B A A B …
(counterbalanced, so a drift of the machine favours neither side). A round is
one fresh measurement of every suspect on both sides (new inputs, warm-up,
timing; :func:`harness.engine.runner.run_case`) in new worker processes, one per side,
so each round also draws a new process (memory layout, thread placement) and a
case's rounds are spread over the whole re-run. A side's code is the project
commit its run was recorded at, extracted from git (``git archive``) into a
temporary directory, so last month's baseline runs its own code beside
tonight's, on the spot, under the same conditions; its recorded seed, timing
rule (with at most ``ROUND_MIN_TIME_S`` of timing and ``ROUND_MIN_REPS`` samples
a round: the rounds are the replicates), thread count and allocator variable (set only where
the run recorded one: ``[run] allocator = "thp"``, or a run from before that option, whose
workers pinned it) are reused; only the
time is measured (no memory, FLOP count or accuracy, which the stored runs
already have; a worker of a commit older than this option measures them too,
and ignores them). The unit of replication is the round: the test (Mann–Whitney,
with the Moses interval for the ratio; :func:`harness.core.stats.time_test`)
compares the rounds' medians, because the samples within one round share their
process's and their minute's state and would overstate the certainty.
Benjamini–Hochberg adjusts the p-values across the re-run cases. The re-run
decides a suspect's time verdict by the rule stored samples are judged by
(:func:`harness.regression.verdicts.time_verdict`: ``regressed`` (``improved``) when
q < alpha and the ratio is beyond the threshold, else ``unchanged``); the note says what
the re-run found (ratio, interval, q) and whether it confirmed, cleared or
found the change.

Runnable here. Each side must have been recorded from a clean tree at a known
commit that this repository holds, with the same Python, torch, CUDA and Triton
as this process (the installed packages are shared; only the project's own code
comes from the commit, so a re-run cannot see a change of torch, and declines
rather than clear it). The machine may differ: the re-run measures both sides
here, so it answers "is NEW's code slower than BASE's on this machine", which is
what a nightly job whose baseline was recorded elsewhere needs (the comparison
still warns that the stored figures came from different machines). A plugin
given as a file inside the recorded checkout is taken from the extracted tree;
a plugin module must be one of that tree; any other plugin (a file elsewhere, a
symlink out of the tree, an installed module) is refused, one line, unless
``--trust-plugins`` (:mod:`harness.engine.trust`). When a side is not runnable,
confirmation declines, says why, and the verdicts stand as computed from the
stored samples.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.cases import Case
from harness.core.stats import TimeTest, bh_adjust, time_test
from harness.measure import contention
from harness.measure.environment import PROJECT_ROOT
from harness.regression.compare import Comparison, sort_by_severity
from harness.regression.verdicts import CompareError, interval_text, overall_verdict, time_verdict

#: Interleaved rounds per side, by default. Eight rounds allow a two-sided exact p-value as
#: small as 2/C(16,8) = 0.00016, enough to survive the FDR adjustment across many suspects.
DEFAULT_ROUNDS = 8
#: Cases still inconclusive after their rounds get this many more, up to ``MAX_ROUNDS`` in all.
EXTRA_ROUNDS, MAX_ROUNDS = 8, 24
#: A case whose re-run rounds were contended more often than this share is inconclusive (contended).
CONTENDED_SHARE = 0.25
#: Versions that must match: the packages both sides' workers import from this environment.
SHARED_VERSIONS = ("python", "torch", "cuda", "triton")


# --------------------------------------------------------------------------------------------
# where a side's code comes from


def git(repo: Path, *args: str, binary: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=not binary, timeout=120)


def has_commit(repo: Path, commit: str) -> bool:
    try:
        return git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def recorded_repo(meta: dict[str, Any]) -> Path:
    """The repository a run's code is taken from: this checkout's, always. A run directory may come
    from anyone, so the checkout its run.json names (``environment.git.root``) only places the
    suite's plugin files (:meth:`Side.in_tree`), never gives code: the commit must be in this one."""
    return PROJECT_ROOT


def extract_commit(repo: Path, commit: str, dest: Path, branches: Sequence[str] = ()) -> Path:
    """The project's tree at ``commit``, written under ``dest`` (``git archive``; the repository is not
    touched). Only a commit the user vouches for — an ancestor of ``repo``'s HEAD or of one of
    ``branches`` (:func:`harness.engine.trust.vouched_commit`; :class:`UntrustedCommit` otherwise) —
    is extracted, and no member may be a link or a path out of ``dest`` (CompareError, one line)."""
    from harness.engine.trust import vouched_commit

    if not re.fullmatch(r"[0-9a-f]{7,64}", str(commit)):  # never an option or a ref name from a run.json
        raise CompareError(f"not a commit id: {str(commit)[:60]!r}")
    vouched_commit(repo, commit, branches)
    proc = git(repo, "archive", "--format=tar", commit, binary=True)
    if proc.returncode != 0:
        raise CompareError(f"git archive {commit[:10]} failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later: refuse links and paths out of dest
                tar.extractall(dest, filter="data")
            else:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if member.issym() or member.islnk() or name.is_absolute() or ".." in name.parts:
                        raise tarfile.TarError(f"{member.name[:200]!r} is a link or leaves the tree")
                tar.extractall(dest)
    except tarfile.TarError as exc:  # AbsoluteLinkError, OutsideDestinationError, a damaged archive …
        raise CompareError(f"the tree of commit {commit[:10]} cannot be extracted safely "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return dest


def runnable_reasons(meta: dict[str, Any], here: dict[str, Any], check_repo: bool = True) -> list[str]:
    """Why the run described by ``meta`` cannot be re-run here (empty: it can).

    ``here`` is :func:`harness.measure.environment.capture` of this process. ``check_repo``: also
    require that the recorded commit is in the repository (:func:`recorded_repo`).
    """
    reasons = []
    env = meta.get("environment") or {}
    git_info = env.get("git") or {}
    commit = git_info.get("commit")
    if not commit:
        reasons.append("its project commit is unknown")
    elif git_info.get("dirty") is not False:
        reasons.append(f"recorded from a tree with uncommitted changes (at {commit[:10]}), so its code is not in git")
    elif check_repo and not has_commit(recorded_repo(meta), commit):
        reasons.append(f"its commit {commit[:10]} is not in the repository {recorded_repo(meta)} (fetch it first)")
    versions, versions_here = env.get("versions") or {}, here.get("versions") or {}
    for key in SHARED_VERSIONS:
        if versions.get(key) != versions_here.get(key):
            reasons.append(f"recorded with {key} {versions.get(key)}, this process has {versions_here.get(key)}")
    return reasons


@dataclass
class Side:
    """How one side ran: its commit and checkout, suite plugins, timing rule, seed and threads."""

    commit: str | None
    repo: Path
    timing: dict[str, Any]
    seed: int
    threads: int | None
    plugins: list[str] = field(default_factory=list)
    suite_dir: Path = field(default_factory=Path.cwd)
    #: the checkout's path when the run was recorded (perhaps on another machine)
    recorded_root: Path | None = None
    #: the allocator variable its workers had (``[run] allocator``; empty: unset, nothing is set)
    env: dict[str, str] = field(default_factory=dict)
    #: which run this side is, in messages
    run: str = "the run"

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Side:
        from harness.measure.environment import recorded_allocator_env

        env = meta.get("environment") or {}
        timing = dict(meta.get("timing") or {})
        suite = meta.get("suite") or {}
        path = suite.get("resolved_path") or suite.get("path")
        suite_dir = Path(os.path.abspath(path)).parent if path else Path.cwd()  # as recorded: no symlinks here
        return cls(
            commit=(env.get("git") or {}).get("commit"),
            repo=recorded_repo(meta),
            timing=timing,
            seed=int(meta.get("seed") or 0),
            threads=timing.get("threads") or env.get("threads"),
            plugins=list((suite.get("definition") or {}).get("plugins") or []),
            suite_dir=suite_dir,
            recorded_root=Path(root) if (root := (env.get("git") or {}).get("root")) else None,
            env=recorded_allocator_env(env),
            run=f"run {meta.get('run_id') or '?'}",
        )

    @property
    def known_commit(self) -> str:
        """``commit``, of a side that is re-run (one whose commit is unknown is declined: :func:`runnable_reasons`)."""
        assert self.commit is not None
        return self.commit

    def in_tree(self, tree: Path, trust: bool = False,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[Path, list[str]]:
        """(base_dir, plugins) to run this side from ``tree`` (its commit extracted): plugin files
        inside the recorded checkout moved into ``tree``, modules from ``tree``; any other plugin is
        refused unless ``trust`` (:func:`harness.engine.trust.plugins_for_tree`)."""
        from harness.engine.trust import plugins_for_tree

        return plugins_for_tree(self.plugins, self.suite_dir, [self.recorded_root, self.repo], tree,
                                source=self.run, trust=trust, log=log)


#: A round's timing rule: the side's own, with at most this much timing and this many samples,
#: and no precision target (a round's median needs less precision than a stored run's: the rounds
#: are the replicates; :func:`round_timing`).
ROUND_MIN_TIME_S = 0.1
ROUND_MIN_REPS = 10
#: ... and at most this many warm-up calls, samples and seconds of sampling (``max_time_s``, the
#: harness's default) per round: whatever a run directory's timing rule says, a round's work is
#: bounded (every suite of this project is within these, so its rounds run as recorded).
ROUND_MAX_WARMUP = 10
ROUND_MAX_REPS = 300
ROUND_MAX_TIME_S = 5.0


def round_timing(timing: dict[str, Any]) -> dict[str, Any]:
    """The timing rule of one round of a side: its recorded rule (``timing``, from its run.json),
    bounded (:data:`ROUND_MIN_TIME_S`, :data:`ROUND_MIN_REPS`, :data:`ROUND_MAX_WARMUP`,
    :data:`ROUND_MAX_REPS`, :data:`ROUND_MAX_TIME_S`), one process (the rounds are the processes)."""
    t = dict(timing)
    caps = {"min_time_s": ROUND_MIN_TIME_S, "min_reps": ROUND_MIN_REPS, "warmup": ROUND_MAX_WARMUP,
            "max_reps": ROUND_MAX_REPS, "max_time_s": ROUND_MAX_TIME_S}
    for key, cap in caps.items():
        if key in t and t[key] is not None:
            t[key] = min(type(cap)(t[key]), cap)
    if "min_reps" in t and "max_reps" in t and t["min_reps"] is not None and t["max_reps"] is not None:
        t["min_reps"] = min(t["min_reps"], t["max_reps"])
    if "max_time_s" in t and "min_time_s" in t and t["max_time_s"] is not None and t["min_time_s"] is not None:
        t["min_time_s"] = min(t["min_time_s"], t["max_time_s"])
    if "processes" in t:
        t["processes"] = 1
    if "target_precision" in t:  # a worker of a commit before the precision rule stops at min_time anyway
        # no sampling on towards a precise median within one process: the spread between rounds is
        # what the test weighs, so the time a precise round would take buys more rounds instead
        t["target_precision"] = 0.0
    return t


class Workers:
    """Worker processes for the sides, each running its side's commit extracted from git.

    :meth:`new_round` replaces them with fresh ones, so that each round also draws a new
    process (its memory layout, its thread placement): the rounds are then independent
    replicates of everything that differs from one process to the next."""

    def __init__(self, sides: dict[str, Side], tmp: Path, log_dir: Path | None = None, trust: bool = False,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), branches: Sequence[str] = ()):
        self.sides, self.log_dir = sides, log_dir
        self.trees: dict[str, Path] = {}  # by commit
        for side in sides.values():
            commit = side.known_commit
            if commit not in self.trees:
                self.trees[commit] = extract_commit(side.repo, commit, tmp / commit[:12], branches)
        # before any worker starts: each side's plugins, refused unless they are its commit's code
        self.plans = {name: side.in_tree(self.trees[side.known_commit], trust, log) for name, side in sides.items()}
        self.pools: dict[str, Any] = {}
        self.rounds = 0

    def new_round(self) -> None:
        from harness.core.config import RunSettings
        from harness.engine.executors import WorkerPool

        self.close()
        self.rounds += 1
        for name, side in self.sides.items():
            tree = self.trees[side.known_commit]
            base_dir, plugins = self.plans[name]
            log_dir = self.log_dir / f"round-{self.rounds}-{name}" if self.log_dir else None
            settings = RunSettings(seed=side.seed, plugins=tuple(plugins), base_dir=str(base_dir),
                                   threads=side.threads)
            self.pools[name] = WorkerPool(settings, code_root=tree, log_dir=log_dir, env=side.env,
                                          recorded_timing=round_timing(side.timing))

    def run(self, name: str, case):
        return self.pools[name].run(case, time_only=True)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools = {}


@contextlib.contextmanager
def worker_runners(sides: dict[str, Side], log_dir: Path | None = None, trust: bool = False,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                   branches: Sequence[str] = ()) -> Iterator[Workers]:
    with tempfile.TemporaryDirectory(prefix="bench-confirm-") as tmp:
        workers = Workers(sides, Path(tmp), log_dir, trust, log, branches)
        try:
            yield workers
        finally:
            workers.close()


# --------------------------------------------------------------------------------------------
# interleaved rounds


@dataclass
class Rounds:
    """Per side: each round's median (ms) and all its samples (ms)."""

    medians: dict[str, list[float]] = field(default_factory=lambda: {"A": [], "B": []})
    samples: dict[str, list[float]] = field(default_factory=lambda: {"A": [], "B": []})
    problems: list[str] = field(default_factory=list)
    #: rounds (either side) that other processes contended (harness.measure.contention)
    contended: int = 0
    notes: set[str] = field(default_factory=set)

    def extend(self, more: Rounds) -> None:
        for side in ("A", "B"):
            self.medians[side] += more.medians[side]
            self.samples[side] += more.samples[side]
        self.problems += more.problems
        self.contended += more.contended
        self.notes |= more.notes


def interleaved_rounds(cases: dict[Any, Any], workers, rounds: int,
                       log: Callable[[str], None] = lambda s: None) -> dict[Any, Rounds]:
    """Every case on side A and side B, ``rounds`` times each, A B B A A B … per case.

    Rounds are the outer loop: each starts with fresh processes (``workers.new_round()``) and
    runs every case once per side, so a case's rounds are spread over the whole re-run."""
    out = {key: Rounds() for key in cases}
    for r in range(rounds):
        log(f"confirm: round {r + 1} of {rounds} ({len(cases)} case(s), both sides)")
        workers.new_round()
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for key, case in cases.items():
            got = out[key]
            if got.problems:
                continue
            for name in order:
                result = workers.run(name, case)
                if result.row.get("status") != "ok" or not result.samples_s:
                    got.problems.append(f"{name}: {result.row.get('status')} ({result.row.get('reason')})")
                    break
                ms = [x * 1e3 for x in result.samples_s]
                got.medians[name].append(float(np.median(ms)))
                got.samples[name].extend(ms)
                busy, why = contention.judge(result.row)  # a worker of an older commit records none: None
                if busy:
                    got.contended += 1
                    got.notes.add(why)
    return out


# --------------------------------------------------------------------------------------------
# confirmation


def suspects_of(table) -> list:
    """Cases to re-run: every time verdict of regressed, improved or inconclusive, and every
    ``unchanged`` one with a stored ratio: between runs a case moves by more than its stored samples
    can see, so a stored ratio near 1 does not rule a real change out."""
    if table.empty:
        return []
    changed = table["time_verdict"].isin(["regressed", "improved", "inconclusive"])
    ratio = pd.to_numeric(table["time_ratio"], errors="coerce")
    compared = (table["time_verdict"] == "unchanged") & np.isfinite(ratio)
    return table.index[changed | compared].tolist()


def confirm(
    comparison: Comparison,
    rounds: int = DEFAULT_ROUNDS,
    here: dict[str, Any] | None = None,
    max_rounds: int = MAX_ROUNDS,
    runners: Callable[[dict[str, Side]], contextlib.AbstractContextManager] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    trust_plugins: bool = False,
    branches: Sequence[str] = (),
) -> dict[str, Any]:
    """Re-run the suspect cases (:func:`suspects_of`), interleaved, when both sides are runnable here;
    the re-run decides their time verdicts.

    Updates ``comparison.cases`` in place and sets and returns ``comparison.confirm``.
    ``runners(sides)`` is a context manager giving an object with ``new_round()`` and
    ``run(side, case)`` (sides "A" = BASE, "B" = NEW); by default :func:`worker_runners`, which refuses
    plugins that are not the sides' commits' code unless ``trust_plugins`` (:mod:`harness.engine.trust`).
    Only commits the user vouches for are run: ancestors of HEAD or of one of ``branches``
    (:func:`harness.engine.trust.vouched_commit`); another is :class:`UntrustedCommit` (one line).
    """
    table = comparison.cases
    th = comparison.thresholds
    suspects = suspects_of(table)
    if not suspects:
        comparison.confirm = {"status": "nothing to confirm", "message": "no case changed in time; nothing to re-run"}
        return comparison.confirm
    if here is None:
        from harness.measure import environment

        here = environment.capture()
    check_repo = runners is None
    reasons = [f"BASE {r}" for r in runnable_reasons(comparison.base.meta, here, check_repo)]
    reasons += [f"NEW {r}" for r in runnable_reasons(comparison.new.meta, here, check_repo)]
    if reasons:
        comparison.confirm = {
            "status": "declined",
            "reasons": reasons,
            "message": "not re-run (both sides must be runnable here): " + "; ".join(reasons)
                       + "; verdicts stand as computed from the stored samples",
        }
        return comparison.confirm
    sides = {"A": Side.from_meta(comparison.base.meta), "B": Side.from_meta(comparison.new.meta)}
    if check_repo:  # before anything is extracted or started: only commits the user vouches for
        from harness.engine.trust import vouched_commit

        for name, side in (("BASE", sides["A"]), ("NEW", sides["B"])):
            vouched_commit(side.repo, side.known_commit, branches, what=f"{name} ({side.run})")
    log(f"confirm: re-running {len(suspects)} case(s), {rounds} interleaved rounds per side")
    try:
        # the case each row measured (ValueError: its fields no longer give its case_id)
        cases = {i: Case.from_row(table.loc[i].to_dict()) for i in suspects}
        with (runners or (lambda s: worker_runners(s, trust=trust_plugins, log=log, branches=branches)))(sides) \
                as workers:
            measured = interleaved_rounds(cases, workers, rounds, log)
    except (CompareError, ValueError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        comparison.confirm = {
            "status": "failed",
            "message": f"could not re-run: {exc}; verdicts stand as computed from the stored samples",
        }
        return comparison.confirm
    total = rounds
    while True:
        failures = {i: "; ".join(m.problems) for i, m in measured.items() if m.problems}
        tests: dict[Any, TimeTest] = {i: time_test(m.medians["A"], m.medians["B"], th.alpha)
                                      for i, m in measured.items() if i not in failures}
        q = dict(zip(tests, bh_adjust([t.p_value for t in tests.values()]))) if tests else {}
        busy = {i: measured[i].contended > CONTENDED_SHARE * 2 * len(measured[i].medians["A"]) for i in tests}
        verdicts = {i: time_verdict(t.ratio, q[i], th, t.ci_low, t.ci_high, contended=busy[i])
                    for i, t in tests.items()}
        undecided = {i: cases[i] for i, (v, doubt) in verdicts.items() if v == "inconclusive" and doubt == "interval"}
        if not undecided or total >= max_rounds:
            break
        more = min(EXTRA_ROUNDS, max_rounds - total)
        log(f"confirm: {len(undecided)} case(s) still inconclusive after {total} rounds; {more} more rounds")
        try:
            with (runners or (lambda s: worker_runners(s, trust=trust_plugins, log=log, branches=branches)))(sides) \
                    as workers:
                extra = interleaved_rounds(undecided, workers, more, log)
        except (CompareError, ValueError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log(f"confirm: the extra rounds failed ({exc}); the verdicts stand as the first rounds found")
            break
        for i, m in extra.items():
            measured[i].extend(m)
        total += more
    for col in ("confirm_ratio", "confirm_ci_low", "confirm_ci_high", "confirm_q", "confirm_rounds"):
        if col not in table:
            table[col] = np.nan
    tally = {"confirmed": 0, "cleared": 0, "found": 0, "agreed": 0, "inconclusive": 0}
    for i in suspects:
        if i in failures:
            table.at[i, "note"] = f"{table.at[i, 'note']}; re-run failed ({failures[i]}), not confirmed either way"
            continue
        t, before = tests[i], table.at[i, "time_verdict"]
        n_rounds = len(measured[i].medians["A"])
        table.at[i, "confirm_ratio"] = t.ratio
        table.at[i, "confirm_ci_low"] = t.ci_low
        table.at[i, "confirm_ci_high"] = t.ci_high
        table.at[i, "confirm_q"] = q[i]
        table.at[i, "confirm_rounds"] = n_rounds
        after, doubt = verdicts[i]
        rerun = f"interleaved re-run ({n_rounds} rounds a side) ×{t.ratio:.3f} {interval_text(t.ci_low, t.ci_high)}, " \
                f"q={q[i]:.2g}"
        if after == "inconclusive":
            key = "inconclusive"
            load = f"; contended in {measured[i].contended} rounds: {'; '.join(sorted(measured[i].notes))[:200]}" \
                if doubt == "contended" else ""
            text = f"still inconclusive after the {rerun}{load}"
        elif before == after:
            key = "agreed" if after == "unchanged" else "confirmed"
            text = f"confirmed by {rerun}" if after != "unchanged" else f"{rerun}: unchanged"
        elif after == "unchanged":
            key, text = ("cleared", f"not confirmed by {rerun}") if before != "inconclusive" else \
                ("cleared", f"decided by {rerun}: unchanged")
        else:
            key, text = "found", f"{after} in {rerun} (the stored samples said {before})"
        tally[key] += 1
        table.at[i, "time_verdict"] = after
        table.at[i, "doubt"] = doubt
        table.at[i, "verdict"] = overall_verdict(table.loc[i, ["time_verdict", "memory_verdict", "accuracy_verdict"]])
        table.at[i, "note"] = f"{table.at[i, 'note']}; {text}" if table.at[i, "note"] else text
    comparison.cases = sort_by_severity(table)
    comparison.confirm = {
        "status": "done",
        "rounds": rounds,
        "suspects": len(suspects),
        **tally,
        "failed": len(failures),
        "message": f"re-ran {len(suspects)} case(s) interleaved, {rounds} rounds per side (up to {total} for the "
                   f"undecided): {tally['confirmed']} confirmed, {tally['cleared']} cleared, "
                   f"{tally['found']} changed beyond the threshold only in the re-run, {tally['agreed']} unchanged, "
                   f"{tally['inconclusive']} still inconclusive"
                   + (f", {len(failures)} could not be re-run" if failures else ""),
    }
    return comparison.confirm
