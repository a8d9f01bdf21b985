"""The run history: listing runs, naming them (dir, id, latest, baseline), promoting a baseline.

Also home of :func:`tiny_real_runs`, two real ``bench run``s of a tiny suite shared with
tests/test_compare.py (made once per test session).
"""

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.engine import store
from harness.regression.history import (
    HistoryError,
    list_baselines,
    list_runs,
    load_history,
    resolve_run,
    run_info,
    set_baseline,
)
from tests.runs import record_case

ROW = {"variant": "naive", "family": "dense", "exact": True, "params": "{}", "device": "cpu", "dtype": "float32",
       "mode": "fwd", "batch": 1, "heads": 2, "kv_heads": 2, "seq_len": 64, "head_dim": 16, "causal": False,
       "inputs": "gaussian", "status": "ok", "reason": "", "peak_mem_bytes": 81920.0, "rel_err": 1e-7}


def fake_run(root, run_id, suite="s", started="2026-01-01T00:00:00+00:00", status="complete", commit="a" * 40,
             dirty=False, fingerprint="fp1", times=(1.0, 1.1, 0.9), definition=None, finalize=True):
    """A run directory written through the store's own writer, with one case per entry of ``times``."""
    meta = {
        "run_id": run_id, "started": started, "status": "running", "cases": len(times), "seed": 0,
        "suite": {"name": suite, "description": "", "path": None, "definition": definition or {"name": suite}},
        "timing": {"warmup": 1, "min_time_s": 0.0, "max_reps": 5, "min_reps": 3, "threads": 1},
        "environment": {"machine": {"hostname": "h", "cpu_model": "cpu", "cpu_count": 2, "fingerprint": fingerprint},
                        "versions": {"torch": "2.13.0", "python": "3.11"}, "threads": 1,
                        "git": {"commit": commit, "dirty": dirty}},
    }
    writer = store.RunWriter(Path(root) / "runs" / run_id, meta)
    for i, t in enumerate(times):
        row = dict(ROW, case_id=f"case{i}", seq_len=64 + i, time_ms=t, run_id=run_id, suite=suite)
        record_case(writer, row, [t * 1e-3 * f for f in (0.98, 1.0, 1.02)])
    if finalize:
        writer.finalize(status=status, finished=started)
    return writer.dir


@pytest.fixture
def history(tmp_path):
    root = tmp_path / "results"
    fake_run(root, "20260101-000000-s-aaaaaa", started="2026-01-01T00:00:00+00:00", times=(1.0, 2.0))
    fake_run(root, "20260102-000000-s-bbbbbb", started="2026-01-02T00:00:00+00:00", times=(1.0, 2.0))
    fake_run(root, "20260103-000000-g-cccccc", suite="g", started="2026-01-03T00:00:00+00:00", fingerprint="fp2")
    fake_run(root, "20260104-000000-s-dddddd", started="2026-01-04T00:00:00+00:00", status="interrupted (SIGINT)",
             times=(1.0,))
    (root / "runs" / "not-a-run").mkdir()
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "run.json").write_text("{nope")
    return root


def test_lists_runs_oldest_first_skipping_what_is_not_a_run(history):
    runs = list_runs(history)
    assert [r.run_id[-6:] for r in runs] == ["aaaaaa", "bbbbbb", "cccccc", "dddddd"]
    assert [r.run_id[-6:] for r in list_runs(history, "s")] == ["aaaaaa", "bbbbbb", "dddddd"]
    first = runs[0]
    assert first.suite == "s" and first.commit == "a" * 40 and first.fingerprint == "fp1" and first.status == "complete"
    assert first.status_counts() == {"ok": 2}
    assert first.short_commit == "aaaaaaaaaa"


def test_resolves_directories_ids_latest_and_errors(history):
    runs = history / "runs"
    assert resolve_run(str(runs / "20260102-000000-s-bbbbbb"), history) == runs / "20260102-000000-s-bbbbbb"
    assert resolve_run("20260102-000000-s-bbbbbb", history).name.endswith("bbbbbb")
    assert resolve_run("cccccc", history).name.endswith("cccccc")  # any unique part of an id
    assert resolve_run("latest", history).name.endswith("dddddd")
    assert resolve_run("latest~1", history).name.endswith("cccccc")
    assert resolve_run("latest@s", history).name.endswith("dddddd")
    assert resolve_run("latest~2@s", history).name.endswith("aaaaaa")
    with pytest.raises(HistoryError, match="only 3 run"):
        resolve_run("latest~3@s", history)
    with pytest.raises(HistoryError, match="matches 3 runs"):
        resolve_run("-s-", history)
    with pytest.raises(HistoryError, match="no run directory, run id"):
        resolve_run("zzz", history)
    with pytest.raises(HistoryError, match="no runs for suite 'x'"):
        resolve_run("latest@x", history)
    with pytest.raises(HistoryError, match="not a run directory"):
        resolve_run(str(runs / "not-a-run"), history)


def test_baseline_set_copies_and_replaces_and_resolves(history):
    with pytest.raises(HistoryError, match="no baseline"):
        resolve_run("baseline", history)
    dest = set_baseline("aaaaaa", history)
    assert dest == history / "baseline" / "s"
    assert sorted(p.name for p in dest.iterdir()) == ["baseline.json", "results.parquet", "run.json", "samples.parquet"]
    # the copy is the run, byte for byte, plus where it came from
    assert (dest / "run.json").read_bytes() == (history / "runs" / "20260101-000000-s-aaaaaa" / "run.json").read_bytes()
    assert json.loads((dest / "baseline.json").read_text())["run_id"] == "20260101-000000-s-aaaaaa"
    pd.testing.assert_frame_equal(store.read_samples(dest),
                                  store.read_samples(history / "runs" / "20260101-000000-s-aaaaaa"))
    assert resolve_run("baseline", history) == dest  # the only baseline
    assert resolve_run("baseline@s", history) == dest
    # promoting another run of the suite replaces it, leaving no temporary directories
    set_baseline("bbbbbb", history)
    assert run_info(dest).run_id.endswith("bbbbbb")
    assert sorted(p.name for p in (history / "baseline").iterdir()) == ["s"]
    # a second suite gets its own baseline; a bare 'baseline' then needs the suite
    set_baseline("cccccc", history)
    assert [b.suite for b in list_baselines(history)] == ["g", "s"]
    assert resolve_run("baseline", history, suite_hint="g") == history / "baseline" / "g"
    with pytest.raises(HistoryError, match="several baselines"):
        resolve_run("baseline", history)
    with pytest.raises(HistoryError, match="no baseline for suite 'x'"):
        resolve_run("baseline@x", history)
    # a run id names the run, not its baseline copy; the baseline is not listed as a run
    assert resolve_run("bbbbbb", history).parent.name == "runs"
    assert len(list_runs(history)) == 4


def test_baseline_refuses_an_incomplete_run_unless_forced(history):
    with pytest.raises(HistoryError, match="not complete; pass --force"):
        set_baseline("dddddd", history)
    dest = set_baseline("dddddd", history, force=True)
    assert run_info(dest).status.startswith("interrupted")


def test_baseline_of_a_run_that_never_finalised_gets_its_tables(tmp_path):
    root = tmp_path / "results"
    fake_run(root, "r-unfinished", times=(1.0, 2.0), finalize=False)
    dest = set_baseline("r-unfinished", root, force=True)
    assert len(pd.read_parquet(dest / "results.parquet")) == 2
    assert len(pd.read_parquet(dest / "samples.parquet")) == 6


def test_load_history_joins_runs_with_their_keys(history):
    rows, runs = load_history(history, suite="s")
    assert [r.run_id[-6:] for r in runs] == ["aaaaaa", "bbbbbb", "dddddd"]
    assert len(rows) == 5
    assert ({"run_id", "run_index", "started", "commit", "dirty", "fingerprint", "case_id", "time_ms"}
            <= set(rows.columns))
    assert rows.groupby("run_index")["run_id"].nunique().eq(1).all()
    rows, runs = load_history(history, fingerprint="fp2")
    assert [r.suite for r in runs] == ["g"]
    rows, runs = load_history(history, suite="s", last=1)
    assert len(runs) == 1 and rows["run_index"].eq(0).all()


# ----------------------------------------------------------------------------------------------
# two tiny real runs, shared with test_compare.py

TINY = """
name = "tiny-regress"
[defaults]
heads = 2
head_dim = 16
[sweep]
seq_len = [32, 64]
[timing]
warmup = 1
min_time_s = 0.0
min_reps = 5
max_reps = 5
threads = 1
[[variant]]
name = "naive"
[[variant]]
name = "sdpa"
backend = "flash"
"""

_RUNS: dict[str, Path] = {}


def tiny_real_runs(tmp_path_factory) -> Path:
    """A results root with two real runs of a 4-case suite (made once per session, in this process)."""
    if "root" not in _RUNS:
        import torch

        from harness.cli.main import main

        work = tmp_path_factory.mktemp("regress")
        (work / "tiny.toml").write_text(TINY)
        threads = torch.get_num_threads()
        try:
            for name in ("first", "second"):
                status = main(["run", str(work / "tiny.toml"), "-o", str(work / "results" / "runs" / name),
                               "--quiet", "--no-report"])
                assert status == 0
        finally:
            torch.set_num_threads(threads)  # the suite sets 1 thread; give the other tests theirs back
        _RUNS["root"] = work / "results"
    return _RUNS["root"]


def test_real_runs_are_in_the_history(tmp_path_factory):
    root = tiny_real_runs(tmp_path_factory)
    runs = list_runs(root)
    assert len(runs) == 2 and all(r.suite == "tiny-regress" and r.status == "complete" for r in runs)
    assert runs[0].started <= runs[1].started
    assert resolve_run("latest", root) == runs[1].path
    rows, kept = load_history(root)
    assert len(kept) == 2 and len(rows) == 8 and (rows["status"] == "ok").all()
    assert rows.groupby("case_id").size().eq(2).all()  # the same four cases in both runs
