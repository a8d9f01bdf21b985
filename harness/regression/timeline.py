"""The results history as the site shows it: runs gathered from several places, one series per
suite and machine, every case's trend with its change points, and when each baseline changed.

Where runs come from. ``results/runs/`` of this checkout, and any number of other results roots
such as a checkout of the ``bench-results`` branch the nightly job appends to (its layout is a
results root: ``runs/<run_id>/``). A run found in several places is read once (the first root
given wins). Runs are grouped by suite and machine fingerprint, since timings compare only on
one machine.

When baselines changed. ``results/baseline/<suite>/baseline.json`` says which run was promoted
and when; it is committed to git, so the git log of those files is the record of every
promotion (:func:`baseline_events`). An uncommitted promotion in the working tree counts too.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.units import finite
from harness.regression.changepoint import case_trends
from harness.regression.history import BASELINE, BASELINE_INFO, HistoryError, RunInfo, list_runs, load_history

#: Statuses that mean a case did not run as it should (``skipped`` is a decision, not a failure).
FAILING = ("error", "oom", "crash", "cuda_error", "timeout")


@dataclass(frozen=True)
class BaselineEvent:
    """One promotion: ``run_id`` became the baseline of ``suite`` at ``promoted``."""

    suite: str
    run_id: str
    run_commit: str | None  # the project commit the run measured
    promoted: str  # ISO 8601 time of `bench baseline set`
    recorded_in: str | None  # the project commit that recorded it; None: not committed yet


@dataclass
class Group:
    """One suite on one machine: its runs (oldest first), its case trends and baseline changes."""

    suite: str
    fingerprint: str | None
    runs: list[RunInfo]
    trends: list[dict[str, Any]]
    counts: dict[str, dict[str, int]]  # run_id -> rows per status
    baselines: list[BaselineEvent] = field(default_factory=list)
    recent: int = 30

    @property
    def slug(self) -> str:
        return f"{self.suite}--{self.fingerprint or 'unknown'}"

    @property
    def latest(self) -> RunInfo:
        return self.runs[-1]

    @property
    def hostname(self) -> str:
        return self.latest.hostname or "?"

    @property
    def machine(self) -> dict[str, Any]:
        return (self.latest.meta.get("environment") or {}).get("machine") or {}

    def recent_steps(self) -> list[dict[str, Any]]:
        """Change points at one of the last ``recent`` runs: the case's label and the step."""
        first = {r.run_id for r in self.runs[-self.recent:]} if self.recent > 0 else set()
        steps = [dict(s, label=t["label"], case_id=t["case_id"], started=t["points"][s["index"]]["started"])
                 for t in self.trends for s in t["steps"] if s["run_id"] in first]
        return sorted(steps, key=lambda s: (s["ratio"] <= 1, -abs(math.log(s["ratio"]))))

    def regressions(self) -> list[dict[str, Any]]:
        return [s for s in self.recent_steps() if s["ratio"] > 1]

    def failing(self) -> int:
        """Cases of the latest run with a failing status."""
        counts = self.counts.get(self.latest.run_id, {})
        return sum(n for s, n in counts.items() if s in FAILING)

    @property
    def state(self) -> str:
        """``regressed`` (a step up in the recent runs), ``failing`` (latest run incomplete or cases
        failing) or ``ok``: the order the overview lists groups in."""
        if self.regressions():
            return "regressed"
        if self.failing() or self.latest.status != "complete":
            return "failing"
        return "ok"


def _roots(roots) -> list[Path]:
    out = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise HistoryError(f"{root}: no such directory (expected a results root or a checkout of the "
                               "bench-results branch, holding runs/<run_id>/)")
        out.append(root)
    return out


def list_runs_from(roots, suite: str | None = None) -> list[RunInfo]:
    """Every readable run under ``ROOT/runs`` of each root, oldest first, each run id once."""
    seen: dict[str, RunInfo] = {}
    for root in _roots(roots):
        for info in list_runs(root, suite):
            seen.setdefault(info.run_id, info)
    return sorted(seen.values(), key=lambda r: (r.started, r.run_id))


def load_history_from(roots) -> tuple[pd.DataFrame, list[RunInfo]]:
    """The rows of every run of every root (as :func:`history.load_history`), each run once."""
    frames, chosen = [], {}
    for root in _roots(roots):
        rows, kept = load_history(root)
        new = {r.run_id: r for r in kept if r.run_id not in chosen}
        chosen.update(new)
        if len(rows) and new:
            frames.append(rows[rows["run_id"].isin(list(new))])
    runs = sorted(chosen.values(), key=lambda r: (r.started, r.run_id))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table, runs


def _git(cwd: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _event(text: str, recorded_in: str | None) -> BaselineEvent | None:
    try:
        info = json.loads(text)
        return BaselineEvent(suite=str(info["suite"]), run_id=str(info["run_id"]), run_commit=info.get("commit"),
                             promoted=str(info.get("promoted") or ""), recorded_in=recorded_in)
    except (ValueError, KeyError, TypeError):
        return None  # a damaged record is no promotion


def baseline_events(root: str | Path = "results") -> list[BaselineEvent]:
    """Every promotion of a baseline under ``ROOT/baseline/``, oldest first: from the git log of the
    ``baseline.json`` files (each commit that changed one) and the working tree's current files."""
    base = Path(root) / BASELINE
    events: dict[tuple, BaselineEvent] = {}
    top = _git(base if base.is_dir() else Path(root), "rev-parse", "--show-toplevel") if Path(root).is_dir() else None
    if top and base.is_dir():
        top_dir = Path(top.strip())
        rel = base.resolve().relative_to(top_dir.resolve()).as_posix()
        log = _git(top_dir, "log", "--format=commit %H", "--name-only", "--diff-filter=AM", "--", rel) or ""
        commit = None
        for line in log.splitlines():
            if line.startswith("commit "):
                commit = line.split()[1]
            elif commit and line.endswith("/" + BASELINE_INFO):
                event = _event(_git(top_dir, "show", f"{commit}:{line}") or "", commit)
                if event:
                    events.setdefault((event.suite, event.run_id, event.promoted), event)
    for path in sorted(base.glob(f"*/{BASELINE_INFO}")) if base.is_dir() else []:
        event = _event(path.read_text(), None)
        if event:
            events.setdefault((event.suite, event.run_id, event.promoted), event)
    return sorted(events.values(), key=lambda e: (e.promoted, e.suite))


def _with_intervals(trends: list[dict[str, Any]], rows: pd.DataFrame) -> None:
    """Each point gains ``low``/``high``: the 95% interval of the median where the run has one, else
    the p10–p90 of its samples; ``interval`` says which."""
    have_ci = {"time_ms_ci_low", "time_ms_ci_high"} <= set(rows.columns)
    cols = ["run_id", "case_id"] + (["time_ms_ci_low", "time_ms_ci_high"] if have_ci else [])
    ci = {(r["run_id"], r["case_id"]): r for r in rows[cols].to_dict("records")} if have_ci else {}
    for t in trends:
        for p in t["points"]:
            r = ci.get((p["run_id"], t["case_id"]), {})
            lo, hi = r.get("time_ms_ci_low"), r.get("time_ms_ci_high")
            if finite(lo) and finite(hi):
                p.update(low=float(lo), high=float(hi), interval="95% CI")
            else:
                p.update(low=p["time_ms_p10"], high=p["time_ms_p90"], interval="p10–p90")


def collect(
    roots,
    results_root: str | Path = "results",
    *,
    last: int | None = None,
    recent: int = 30,
    min_step: float = 0.05,
) -> list[Group]:
    """The site's model: one :class:`Group` per suite and machine over the runs of ``roots``
    (``last``: only each group's last N runs), change points of at least ``min_step``, and the
    baseline changes recorded under ``results_root``."""
    rows, runs = load_history_from(roots)
    events = baseline_events(results_root)
    by_key: dict[tuple, list[RunInfo]] = {}
    for info in runs:
        by_key.setdefault((info.suite, info.fingerprint), []).append(info)
    groups = []
    for (suite, fingerprint), group_runs in sorted(by_key.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if last is not None and last > 0:
            group_runs = group_runs[-last:]
        order = {r.run_id: i for i, r in enumerate(group_runs)}
        part = rows[rows["run_id"].isin(list(order))].copy() if len(rows) else rows
        counts: dict[str, dict[str, int]] = {r.run_id: {} for r in group_runs}
        trends: list[dict[str, Any]] = []
        if len(part):
            part["run_index"] = part["run_id"].map(order)
            for (run_id, status), n in part.groupby(["run_id", "status"]).size().items():
                counts[run_id][str(status)] = int(n)
            trends = case_trends(part, group_runs, min_step=min_step)
            _with_intervals(trends, part)
        groups.append(Group(suite=suite, fingerprint=fingerprint, runs=group_runs, trends=trends, counts=counts,
                            baselines=[e for e in events if e.suite == suite], recent=recent))
    order = {"regressed": 0, "failing": 1, "ok": 2}
    return sorted(groups, key=lambda g: (order[g.state], g.suite, str(g.fingerprint)))
