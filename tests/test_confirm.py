"""bench compare --confirm: interleaved re-runs of both sides, each from its own commit.

Verdict logic on fake runners with known answers; then real worker processes; then end to
end in a scratch git repository where a commit really slows a plugin variant down, also with
BASE recorded at a commit of the flat layout from before the layers (harness/worker.py)."""

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness.core.cases import Case
from harness.core.stats import time_test
from harness.engine.trust import UntrustedPlugin
from harness.measure.environment import PROJECT_ROOT, git_commit
from harness.regression.compare import Comparison, compare_frames
from harness.regression.confirm import (
    Side,
    confirm,
    extract_commit,
    interleaved_rounds,
    runnable_reasons,
    worker_runners,
)
from harness.regression.history import run_info
from harness.regression.verdicts import Thresholds
from tests.runs import bench as run_bench
from tests.scratch_repo import commit_change, git, make_scratch_repo, project_files
from tests.test_compare import IDENT, frames, real_id, samples
from tests.test_history import fake_run

IN_GIT = git_commit().get("commit") is not None
needs_git = pytest.mark.skipif(not IN_GIT, reason="the project is not a git checkout here, and --confirm needs git")


def _meta(commit="c" * 40, dirty=False, fingerprint="fp", torch="2.13.0"):
    return {"environment": {"machine": {"fingerprint": fingerprint}, "git": {"commit": commit, "dirty": dirty},
                            "versions": {"python": "3.11", "torch": torch, "cuda": None, "triton": None,
                                         "harness": "0.1.0"},
                            "threads": 1},
            "suite": {"name": "s", "definition": {}},
            "timing": {"warmup": 1, "min_time_s": 0.0, "min_reps": 3, "max_reps": 3},
            "seed": 0}


def test_runnable_means_clean_known_code_and_same_packages():
    here = _meta()["environment"]
    assert runnable_reasons(_meta(), here, check_repo=False) == []
    # another machine is fine: the re-run measures both sides here
    assert runnable_reasons(_meta(fingerprint="other"), here, check_repo=False) == []
    assert "uncommitted changes" in runnable_reasons(_meta(dirty=True), here, check_repo=False)[0]
    assert "commit is unknown" in runnable_reasons(_meta(commit=None), here, check_repo=False)[0]
    assert "torch 2.12.0" in runnable_reasons(_meta(torch="2.12.0"), here, check_repo=False)[0]
    assert "eeeeeeeeee is not in the repository" in runnable_reasons(_meta(commit="e" * 40), here)[0]


class FakeSides:
    """Stands in for worker_runners: records the order of calls; B is ``slowdown`` times A.

    Each call gets its own random level (``between`` log-sd: the process-and-minute state a
    real round has) and ten samples around it (``within`` log-sd)."""

    def __init__(self, slowdown, between=0.01, within=0.01, seed=0):
        self.calls, self.slowdown, self.between, self.within = [], slowdown, between, within
        self.rng = np.random.default_rng(seed)
        self.sides, self.rounds = None, 0

    @contextlib.contextmanager
    def __call__(self, sides):
        self.sides = sides
        yield self

    def new_round(self):
        self.rounds += 1

    def run(self, name, case):
        self.calls.append(name)
        level = (self.slowdown if name == "B" else 1.0) * np.exp(self.rng.normal(0, self.between))
        s = list(1e-3 * level * np.exp(self.rng.normal(0, self.within, 10)))

        class R:
            row = {"status": "ok"}
            samples_s = s
        return R()


def _suspect_comparison(tmp_path, factor=1.3):
    c, d = real_id(0), real_id(1)  # confirmation rebuilds the case from its row: real ids
    base = {c: {"samples": samples(30, 1.0, 0.01, 1)}, d: {"samples": samples(30, 1.0, 0.01, 3)}}
    new = {c: {"samples": samples(30, factor, 0.01, 2)}, d: {"samples": samples(30, 1.0, 0.01, 4)}}
    table = compare_frames(*frames(base), *frames(new))
    a, b = run_info(fake_run(tmp_path, "a")), run_info(fake_run(tmp_path, "b"))
    a.meta.update(_meta(), seed=1)
    b.meta.update(_meta(), seed=2)
    return Comparison(base=a, new=b, cases=table, thresholds=Thresholds())


@pytest.mark.parametrize("factor, slowdown, expected", [
    (1.3, 1.0, "unchanged"), (1.3, 1.3, "regressed"), (1 / 1.3, 1 / 1.3, "improved"), (1 / 1.3, 1.0, "unchanged"),
])
def test_confirm_reruns_changed_cases_interleaved(tmp_path, factor, slowdown, expected):
    comparison = _suspect_comparison(tmp_path, factor)
    assert comparison.counts["regressed" if factor > 1 else "improved"] == 1
    fake = FakeSides(slowdown)
    result = confirm(comparison, rounds=4, here=_meta()["environment"], runners=fake, log=lambda s: None)
    # counterbalanced interleaving; both cases are re-run (the unchanged one too: stored samples rule nothing out)
    assert fake.calls == ["A", "B", "A", "B", "B", "A", "B", "A"] * 2 and result["suspects"] == 2
    assert fake.rounds == 4  # fresh processes every round
    assert fake.sides["A"].seed == 1 and fake.sides["B"].seed == 2  # each side as it was recorded
    assert result["status"] == "done" and result["confirmed"] == (0 if expected == "unchanged" else 1)
    row = comparison.cases.set_index("case_id").loc[real_id(0)]
    assert row["verdict"] == expected
    assert ("not confirmed" if expected == "unchanged" else "confirmed by interleaved re-run") in row["note"]
    assert np.isfinite(row["confirm_ratio"]) and row["confirm_ratio"] == pytest.approx(slowdown, rel=0.05)


def test_confirm_reruns_cases_the_stored_samples_call_unchanged_and_the_rerun_decides(tmp_path):
    """Stored ×1.03 and ×1.00 are both under the 5% threshold (unchanged): both are re-run, and a
    real ×1.3 found there makes them regressed (the detector measured probes slowed 9-15% whose stored
    ratios were ×0.99 and ×1.00). Only a case with no stored ratio is left alone."""
    comparison = _suspect_comparison(tmp_path, 1.03)
    assert comparison.counts["regressed"] == 0
    result = confirm(comparison, rounds=6, here=_meta()["environment"], runners=FakeSides(1.3), log=lambda s: None)
    assert result["found"] == 2 and result["suspects"] == 2
    rows = comparison.cases.set_index("case_id")
    for cid in (real_id(0), real_id(1)):
        assert rows.at[cid, "verdict"] == "regressed" and "the stored samples said unchanged" in rows.at[cid, "note"]
    assert comparison.has_regression
    empty = _suspect_comparison(tmp_path / "q", 1.01)
    empty.cases["time_ratio"] = np.nan  # no ratio: nothing to re-run
    fake = FakeSides(1.3)
    assert (confirm(empty, here=_meta()["environment"], runners=fake, log=lambda s: None)["status"]
            == "nothing to confirm")
    assert fake.calls == []


def test_confirm_tests_rounds_not_pooled_samples(tmp_path):
    """A/A where rounds differ by ~8% (process and minute) and samples within a round by 0.1%:
    pooled samples would call the difference certain; the rounds, the real replicates, do not."""
    comparison = _suspect_comparison(tmp_path)
    fake = FakeSides(1.0, between=0.08, within=0.001, seed=3)
    confirm(comparison, rounds=8, here=_meta()["environment"], runners=fake, log=lambda s: None)
    row = comparison.cases.set_index("case_id").loc[real_id(0)]
    # not a regression; and with rounds 8% apart, 5% cannot be ruled out either: more rounds, then honest doubt
    assert row["verdict"] == "inconclusive" and row["confirm_q"] > 0.05 and row["confirm_rounds"] == 24
    pooled = FakeSides(1.0, between=0.08, within=0.001, seed=3)
    with pooled({}) as workers:
        r = interleaved_rounds({"case": None}, workers, 8)["case"]
    assert time_test(r.samples["A"], r.samples["B"]).p_value < 0.01  # what pooling would have said
    assert time_test(r.medians["A"], r.medians["B"]).p_value > 0.05


def test_confirm_declines_when_a_side_is_not_runnable(tmp_path):
    comparison = _suspect_comparison(tmp_path)
    comparison.base.meta["environment"]["git"]["dirty"] = True
    fake = FakeSides(1.0)
    result = confirm(comparison, here=_meta()["environment"], runners=fake, log=lambda s: None)
    assert result["status"] == "declined" and fake.calls == []
    assert "BASE recorded from a tree with uncommitted changes" in result["message"]
    assert comparison.counts["regressed"] == 1  # the verdict stands


def test_confirm_reports_a_failed_rerun(tmp_path):
    comparison = _suspect_comparison(tmp_path)

    class Failing(FakeSides):
        def run(self, name, case):
            class R:
                row = {"status": "error", "reason": "RuntimeError: boom"}
                samples_s = []
            return R()

    failing = Failing(1.0)

    result = confirm(comparison, here=_meta()["environment"], runners=failing, log=lambda s: None)
    assert result["failed"] == 2 and "2 could not be re-run" in result["message"]  # the regressed and the unchanged
    rows = comparison.cases.set_index("case_id")
    row = rows.loc[real_id(0)]
    assert row["verdict"] == "regressed" and "not confirmed either way" in row["note"] and "boom" in row["note"]
    assert rows.at[real_id(1), "verdict"] == "unchanged"  # the stored verdict stands where the re-run failed


@needs_git
def test_extract_commit_and_side_paths(tmp_path):
    head = git_commit()["commit"]
    tree = extract_commit(PROJECT_ROOT, head, tmp_path / "tree")
    assert (tree / "harness" / "regression" / "confirm.py").is_file() or (tree / "harness" / "confirm.py").is_file()
    side = Side(commit=head, repo=PROJECT_ROOT, timing={}, seed=0, threads=1,
                plugins=["../tests/plugins/slow_sdpa.py", "tests.plugins.slow_sdpa"], suite_dir=PROJECT_ROOT / "suites")
    base_dir, plugins = side.in_tree(tree)
    assert base_dir == tree / "suites"
    assert plugins == [str(tree / "tests" / "plugins" / "slow_sdpa.py"), "tests.plugins.slow_sdpa"]
    # recorded in a checkout elsewhere (a baseline from another machine): moved all the same
    elsewhere = Side(commit=head, repo=PROJECT_ROOT, timing={}, seed=0, threads=1, plugins=["p.py"],
                     suite_dir=Path("/home/ci/bench/suites"), recorded_root=Path("/home/ci/bench"))
    assert elsewhere.in_tree(tree) == (tree / "suites", [str(tree / "suites" / "p.py")])
    # a plugin that is not the commit's code (a file elsewhere, a module it does not hold) is refused
    # (tests/test_results_safety.py has the rest)
    for foreign in ("/opt/x.py", "some.module"):
        with pytest.raises(UntrustedPlugin, match="--trust-plugins"):
            Side(commit=head, repo=PROJECT_ROOT, timing={}, seed=0, threads=1, plugins=[foreign],
                 suite_dir=PROJECT_ROOT / "suites").in_tree(tree)


def test_a_side_is_re_run_with_the_allocator_its_run_recorded():
    from harness.measure.environment import ALLOCATOR_ENV

    def side(environment):
        return Side.from_meta({"environment": environment, "timing": {}, "suite": {}})

    assert side({"measurement": {"allocator": "default", ALLOCATOR_ENV: None}}).env == {}  # nothing set
    assert side({"measurement": {"allocator": "thp", ALLOCATOR_ENV: "1"}}).env == {ALLOCATOR_ENV: "1"}
    assert side({"allocator": {ALLOCATOR_ENV: "1"}}).env == {ALLOCATOR_ENV: "1"}  # before the option: pinned
    assert side({}).env == {}


@needs_git
def test_worker_runners_really_run_the_case():
    case = Case("naive", {}, heads=2, kv_heads=2, seq_len=32, head_dim=16)
    row = dict(IDENT, case_id=case.case_id, seq_len=32)
    assert Case.from_row(row) == case
    side = Side(commit=git_commit()["commit"], repo=PROJECT_ROOT, seed=0, threads=1,
                timing={"warmup": 1, "min_time_s": 0.0, "min_reps": 3, "max_reps": 3})
    with worker_runners({"A": side, "B": side}) as workers:
        r = interleaved_rounds({"c": case}, workers, rounds=2)["c"]
        pids = {name: pool.proc.pid for name, pool in workers.pools.items()}
        workers.new_round()
        workers.run("A", case)
        assert workers.pools["A"].proc.pid != pids["A"]  # a new round, a new process
    assert r.problems == [] and len(r.medians["A"]) == len(r.medians["B"]) == 2
    assert len(r.samples["A"]) == 6 and min(r.samples["A"] + r.samples["B"]) > 0


# ----------------------------------------------------------------------------------------------
# end to end: a commit that doubles a plugin variant's work, found and confirmed across commits

PROBE_PLUGIN = '''
from harness import attention_flops, get_variant, register_variant

REPEAT = 1
_sdpa = get_variant("sdpa")


@register_variant("probe", family="dense", exact=True, flops=attention_flops, supports=_sdpa.supports)
def probe(q, k, v, *, causal):
    for _ in range(REPEAT - 1):
        _sdpa(q, k, v, causal=causal, backend="math")
    return _sdpa(q, k, v, causal=causal, backend="math")
'''

PROBE_SUITE = '''
name = "probe"
plugins = ["probe_plugin.py"]

[defaults]
device = "cpu"
dtype = "float32"
batch = 1
heads = 2
head_dim = 32
seq_len = 256

[timing]
warmup = 2
min_time_s = 0.05
min_reps = 8
max_reps = 50
threads = 1

[[variant]]
name = "probe"
'''


@needs_git
def test_confirm_across_commits_end_to_end(tmp_path):
    repo = make_scratch_repo(tmp_path / "repo")
    (repo / "probe_plugin.py").write_text(PROBE_PLUGIN)
    (repo / "probe.toml").write_text(PROBE_SUITE)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "probe")
    fast = git(repo, "rev-parse", "HEAD")
    env = dict(os.environ, PYTHONPATH=str(repo))

    def bench(*args):
        return run_bench(*args, cwd=repo, env=env, timeout=600)

    runs = tmp_path / "runs"
    assert bench("run", "probe.toml", "-o", runs / "fast", "--quiet", "--no-report").returncode == 0
    slow = commit_change(repo, "probe_plugin.py", r"^REPEAT = 1$", "REPEAT = 2", "probe: twice the work")
    assert bench("run", "probe.toml", "-o", runs / "slow", "--quiet", "--no-report").returncode == 0
    for name, commit in (("fast", fast), ("slow", slow)):
        assert json.loads((runs / name / "run.json").read_text())["environment"]["git"]["commit"] == commit

    # from the slow commit's checkout, compare the fast run (BASE, an older commit) with the slow one
    proc = bench("compare", runs / "fast", runs / "slow", "--confirm", "--confirm-rounds", "4",
                 "--fail-on-regression", "--format", "json", "--no-html")
    assert proc.returncode == 1, proc.stderr
    case = json.loads(proc.stdout)["cases"][0]
    # the re-run decides: it confirms the stored verdict (or, when the stored runs were contended on a busy
    # machine and so inconclusive, it finds the regression itself)
    assert case["verdict"] == "regressed" and re.search(r"(confirmed by|regressed in) interleaved re-run", case["note"])
    # BASE's worker really ran BASE's code: twice the work shows as about twice the time
    assert 1.6 < case["confirm_ratio"] < 2.5
    # and the other way round (NEW older than BASE) it is an improvement, also confirmed: with the
    # older commit checked out, the slow one is not in HEAD's history, so its branch must be named
    branch = git(repo, "symbolic-ref", "--short", "HEAD")
    git(repo, "checkout", "-q", fast)
    args = ("compare", runs / "slow", runs / "fast", "--confirm", "--confirm-rounds", "4", "--fail-on-regression",
            "--format", "json", "--no-html")
    proc = bench(*args)
    assert proc.returncode == 2 and "--confirm-branch" in proc.stderr and slow[:12] in proc.stderr, proc.stderr
    proc = bench(*args, "--confirm-branch", branch)
    assert proc.returncode == 0, proc.stderr
    case = json.loads(proc.stdout)["cases"][0]
    assert case["verdict"] == "improved" and 0.4 < case["confirm_ratio"] < 0.63


def _flat_layout_commit() -> str | None:
    """The newest commit of this repository whose tree has the flat layout of before the layers
    (``harness/worker.py``), when the clone holds one."""
    def git_out(*args):
        proc = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def flat(commit):
        return git_out("cat-file", "-e", f"{commit}:harness/worker.py") is not None

    if flat("HEAD"):
        return git_out("rev-parse", "HEAD")
    removed = git_out("rev-list", "-1", "HEAD", "--", "harness/worker.py")  # the commit that moved it
    parent = git_out("rev-parse", "--verify", "-q", f"{removed}^") if removed else None
    return parent if parent and flat(parent) else None


@needs_git
def test_confirm_reruns_a_baseline_recorded_with_the_flat_layout(tmp_path):
    """BASE recorded at a commit of the old flat layout (harness/worker.py, harness/runner.py ...),
    NEW at this tree's layers: --confirm re-runs each side with its own tree's worker, and the
    suite's plugin file is taken from each side's own tree."""
    old = _flat_layout_commit()
    if old is None:
        pytest.skip("this clone holds no commit of the flat layout (shallow?)")
    repo = tmp_path / "repo"
    extract_commit(PROJECT_ROOT, old, repo)
    assert (repo / "harness" / "worker.py").is_file() and not (repo / "harness" / "engine").exists()
    (repo / "probe_plugin.py").write_text(PROBE_PLUGIN)
    (repo / "probe.toml").write_text(PROBE_SUITE)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the flat layout, with the probe")
    env = dict(os.environ, PYTHONPATH=str(repo))

    def bench(*args):
        return run_bench(*args, cwd=repo, env=env, timeout=600)

    runs = tmp_path / "runs"
    proc = bench("run", "probe.toml", "-o", runs / "flat", "--quiet", "--no-report")
    assert proc.returncode == 0, proc.stderr
    # this project as it is now, with the probe doing twice the work
    git(repo, "rm", "-rq", ".")
    for f in project_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / f, repo / f)
    (repo / "probe_plugin.py").write_text(PROBE_PLUGIN.replace("REPEAT = 1", "REPEAT = 2"))
    (repo / "probe.toml").write_text(PROBE_SUITE)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the layers; the probe does twice the work")
    assert not (repo / "harness" / "worker.py").exists() and (repo / "harness" / "engine" / "worker.py").is_file()
    proc = bench("run", "probe.toml", "-o", runs / "layers", "--quiet", "--no-report")
    assert proc.returncode == 0, proc.stderr

    proc = bench("compare", runs / "flat", runs / "layers", "--confirm", "--confirm-rounds", "4",
                 "--fail-on-regression", "--format", "json", "--no-html")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["confirm"]["status"] == "done", data["confirm"]
    case = data["cases"][0]
    # the re-run decides: it confirms the stored verdict (or, when the stored runs were contended on a busy
    # machine and so inconclusive, it finds the regression itself)
    assert case["verdict"] == "regressed" and re.search(r"(confirmed by|regressed in) interleaved re-run", case["note"])
    assert 1.6 < case["confirm_ratio"] < 2.5  # each side ran its own commit's probe


def test_time_only_rounds_skip_memory_flops_and_accuracy():
    from harness.engine.runner import run_case
    from harness.measure.timing import TimingConfig

    case = Case("naive", {}, heads=2, kv_heads=2, seq_len=32, head_dim=16)
    timing = TimingConfig(warmup=1, min_time_s=0.0, min_reps=3, max_reps=3)
    from harness.core.config import RunSettings

    full, quick = run_case(case, RunSettings(timing)), run_case(case, RunSettings(timing), time_only=True)
    assert full.row["status"] == quick.row["status"] == "ok" and len(quick.samples_s) == 3
    assert quick.row["time_ms"] > 0 and full.row["peak_mem_bytes"] > 0 and full.row["rel_err"] < 1e-5
    assert "rel_err" not in quick.row or not np.isfinite(quick.row["rel_err"])
    assert "peak_mem_bytes" not in quick.row or not np.isfinite(quick.row["peak_mem_bytes"])
