"""Running at scale: shards (a deterministic, cost-balanced partition), bench merge, the Ray
executor (its logic with tests/fake_ray.py; one run through a real local Ray when Ray is
installed), and the per-machine report groups and comparisons of runs that span machines."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.cli.main import main
from harness.core import schema
from harness.core.cases import Case
from harness.engine import lifecycle, rayexec, shard, store
from harness.engine.suite import expand_cases, parse_suite
from tests import fake_ray
from tests.test_history import TINY

#: Four quick cases (naive and sdpa at L = 32, 64), one process each.
SMALL = (TINY.replace('name = "tiny-regress"', 'name = "scale-small"')
         .replace("threads = 1", "threads = 1\nprocesses = 1"))

# -- the partition ---------------------------------------------------------------------------------

case_strategy = st.builds(
    Case, variant=st.sampled_from(["naive", "sdpa", "tiled"]), device=st.sampled_from(["cpu", "cuda"]),
    mode=st.sampled_from(["fwd", "bwd", "fwd_bwd"]), batch=st.integers(1, 4), heads=st.sampled_from([1, 2, 8]),
    kv_heads=st.just(1), seq_len=st.sampled_from([16, 128, 1024, 4096, 16384]),
    head_dim=st.sampled_from([16, 64, 128]), causal=st.booleans(),
)


@given(st.lists(case_strategy, max_size=60, unique_by=lambda c: c.case_id), st.integers(1, 9), st.randoms())
def test_partition_is_complete_disjoint_deterministic_and_balanced(cases, n, rnd):
    shards = shard.assign(cases, n)
    ids = [[c.case_id for c in s] for s in shards]
    assert len(shards) == n
    assert sorted(i for s in ids for i in s) == sorted(c.case_id for c in cases)  # every case exactly once
    for s in shards:  # each shard keeps the order the cases came in
        positions = [cases.index(c) for c in s]
        assert positions == sorted(positions)
    shuffled = list(cases)
    rnd.shuffle(shuffled)  # another machine, another discovery order: the same shards
    assert [sorted(c.case_id for c in s) for s in shard.assign(shuffled, n)] == [sorted(s) for s in ids]
    if cases:  # greedy bound: no shard costs more than the mean plus the costliest case
        loads = [sum(map(shard.case_cost, s)) for s in shards]
        costs = [shard.case_cost(c) for c in cases]
        assert max(loads) <= sum(costs) / n + max(costs) + 1e-9


def test_partition_balances_cost_not_count():
    """One huge case and many small ones: the huge one gets a shard to itself."""
    big = Case("naive", seq_len=16384, heads=16, batch=4)
    small = [Case("naive", seq_len=64 + i) for i in range(9)]
    first, second = shard.assign([*small, big], 2)
    assert [c.case_id for c in first] == [big.case_id] and len(second) == 9


def test_parse_shard():
    assert shard.parse_shard("2/8") == shard.Shard(2, 8)
    for bad in ("0/4", "5/4", "a/b", "3", "1/0"):
        with pytest.raises(shard.ShardError):
            shard.parse_shard(bad)


# -- shard runs and merge (in this process, isolation none: quick) ------------------------------------


def _bench(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory):
    """SMALL run whole and as two shards: {name: run directory}, and the suite file."""
    tmp = tmp_path_factory.mktemp("shards")
    suite = tmp / "small.toml"
    suite.write_text(SMALL)
    runs = {}
    for name, extra in (("whole", []), ("s1", ["--shard", "1/2"]), ("s2", ["--shard", "2/2"])):
        assert main(["run", str(suite), "-o", str(tmp / name), "-q", "--isolation", "none", "--no-report", *extra]) == 0
        runs[name] = tmp / name
    return runs, suite


def _ids(run_dir) -> set[str]:
    return set(store.read_results(run_dir)["case_id"])


def test_shard_runs_only_its_cases_and_merges_into_the_whole_run(shard_runs, tmp_path, capsys):
    runs, suite_path = shard_runs
    cases = expand_cases(parse_suite(SMALL, suite_path))
    for i, name in ((1, "s1"), (2, "s2")):
        meta = store.read_meta(runs[name])
        assert meta["shard"]["index"] == i and meta["shard"]["count"] == 2 and meta["shard"]["suite_cases"] == 4
        assert _ids(runs[name]) == {c.case_id for c in shard.select(cases, shard.Shard(i, 2))}
    assert _ids(runs["s1"]).isdisjoint(_ids(runs["s2"]))
    code, err = _bench(capsys, "merge", runs["s2"], runs["s1"], "-o", tmp_path / "merged")
    assert code == 0, err
    merged = store.read_results(tmp_path / "merged")
    assert set(merged["case_id"]) == _ids(runs["whole"]) and len(merged) == 4
    assert (merged["status"] == "ok").all() and merged["host"].notna().all()
    meta = store.read_meta(tmp_path / "merged")
    assert meta["status"] == "complete" and [p["shard"]["index"] for p in meta["merged_from"]] == [1, 2]
    samples = store.read_samples(tmp_path / "merged")
    assert set(samples["case_id"]) == set(merged["case_id"])
    assert (tmp_path / "merged" / "report.html").exists()
    with pytest.raises(shard.ShardError, match="merged"):  # a merged run is not resumed: its parts are
        lifecycle.resume_run(tmp_path / "merged", parse_suite(SMALL, suite_path))


def _copy(run_dir, dest, **changes):
    shutil.copytree(run_dir, dest)
    meta = json.loads((dest / "run.json").read_text())
    for path, value in changes.items():
        *outer, last = path.split(".")
        target = meta
        for key in outer:
            target = target[key]
        target[last] = value
    (dest / "run.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.parametrize("field, value, says", [
    ("seed", 7, "seed"), ("environment.git.commit", "f" * 40, "commit"),
    ("environment.versions.torch", "0.0.1", "versions differ"), ("suite.text", SMALL + "\n# edited\n", "suite text"),
])
def test_merge_refuses_runs_of_other_code_or_settings(shard_runs, tmp_path, capsys, field, value, says):
    runs, _ = shard_runs
    other = _copy(runs["s2"], tmp_path / "other", **{field: value})
    code, err = _bench(capsys, "merge", runs["s1"], other, "-o", tmp_path / "m")
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "m").exists()


def test_merge_refuses_duplicates_and_missing_unless_allow_partial(shard_runs, tmp_path, capsys):
    runs, _ = shard_runs
    code, err = _bench(capsys, "merge", runs["s1"], "-o", tmp_path / "m1")
    assert code == 2 and "missing: shard 2/2" in err
    code, err = _bench(capsys, "merge", runs["s1"], "--allow-partial", "-o", tmp_path / "m1")
    assert code == 0, err
    meta = store.read_meta(tmp_path / "m1")
    assert meta["status"] == "partial (2 of 4 cases missing)" and len(store.read_results(tmp_path / "m1")) == 2
    again = _copy(runs["s1"], tmp_path / "s1-again")
    code, err = _bench(capsys, "merge", runs["s1"], again, runs["s2"], "-o", tmp_path / "m2")
    assert code == 2 and "duplicate" in err and "shard 1/2" in err
    code, err = _bench(capsys, "merge", runs["s1"], again, runs["s2"], "--allow-partial", "-o", tmp_path / "m2")
    assert code == 0, err
    rows = store.read_results(tmp_path / "m2")
    assert sorted(rows["case_id"]) == sorted(_ids(runs["whole"]))  # each case once


def test_merge_refuses_an_interrupted_part(shard_runs, tmp_path, capsys):
    runs, _ = shard_runs
    cut = _copy(runs["s2"], tmp_path / "cut", status="interrupted (SIGINT)")
    (cut / store.RESULTS).unlink()
    lines = (cut / store.ROWS_LOG).read_text().splitlines()
    (cut / store.ROWS_LOG).write_text(lines[0] + "\n")
    code, err = _bench(capsys, "merge", runs["s1"], cut, "-o", tmp_path / "m")
    assert code == 2 and "1 planned case(s) without a row" in err


def test_a_shard_resumes_its_own_cases(shard_runs, tmp_path):
    runs, suite_path = shard_runs
    cut = _copy(runs["s1"], tmp_path / "cut", status="interrupted (SIGINT)")
    (cut / store.RESULTS).unlink()
    first = (cut / store.ROWS_LOG).read_text().splitlines()[0]
    (cut / store.ROWS_LOG).write_text(first + "\n")
    _, todo, _ = lifecycle.resume_run(cut, parse_suite(SMALL, suite_path))
    assert [c.case_id for c in todo] == sorted(_ids(runs["s1"]) - {json.loads(first)["case_id"]})


def test_bad_shard_arguments_are_one_line(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(SMALL)
    for extra in (["--shard", "3/2"], ["--shard", "1/2", "--only", "naive"]):
        code, err = _bench(capsys, "run", suite, "--dry-run", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err


# -- the Ray executor, with a fake Ray --------------------------------------------------------------

TWO_NODES = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerHostname": "node-a", "Resources": {"CPU": 2.0}},
             {"NodeID": "b" * 56, "Alive": True, "NodeManagerHostname": "node-b",
              "Resources": {"CPU": 2.0, "GPU": 1.0}}]


@pytest.fixture
def fake(monkeypatch):
    """A fake Ray in sys.modules, and run_on_node replaced by a quick one that fails as planned:
    ``plan[case_id]`` lists, per attempt, "died" (NodeDiedError) or "crashed" (WorkerCrashedError)."""
    ray = fake_ray.FakeRay(TWO_NODES)
    monkeypatch.setitem(sys.modules, "ray", ray)
    ray.plan, ray.ran = {}, []

    def run_on_node(pool, case, processes, expected=None):
        c = Case(**case)
        node = ray.current_node
        ray.ran.append((c.case_id, node["NodeID"]))
        step = ray.plan.get(c.case_id) and ray.plan[c.case_id].pop(0)
        if step == "died":
            raise fake_ray.NodeDiedError(f"node {node['NodeManagerHostname']} died")
        if step == "crashed":
            raise fake_ray.WorkerCrashedError("the worker died unexpectedly")
        identity = {"host": node["NodeManagerHostname"], "machine_fingerprint": "fp-" + node["NodeID"][:4]}
        row = dict(schema.base_row(c, threads=pool["settings"]["threads"]), **identity, time_ms=1.0, flops=1e6)
        return {"rounds": [{"row": dict(row), "samples_s": [1e-3, 1.05e-3, 0.95e-3]} for _ in range(processes)],
                "node": identity}

    monkeypatch.setattr(rayexec, "run_on_node", run_on_node)
    return ray


def ray_suite(timing: str = "threads = 1", lengths="[16, 32, 48, 64, 80, 96, 112, 128]", processes=2):
    return parse_suite(f"""
name = "scale-ray"
[defaults]
heads = 2
head_dim = 16
[sweep]
seq_len = {lengths}
[timing]
{timing}
processes = {processes}
[run]
executor = "ray"
[[variant]]
name = "naive"
""")


def _run(suite, cases, out, stop=lambda: False):
    writer = lifecycle.start_run(suite, out, cases)
    with lifecycle.make_executor(suite) as executor:
        lifecycle.run_cases(cases, writer, executor, stop=stop, processes=suite.timing.processes)
    return writer


def test_ray_streams_rows_in_completion_order_and_resumes(fake, tmp_path):
    suite = ray_suite(lengths=str(list(range(16, 16 * 17, 16))))  # 16 cases; 5 slots (4 CPUs by 1 thread, 1 GPU)
    cases = expand_cases(suite)
    writer = _run(suite, cases, tmp_path / "run", stop=lambda: len(store.read_rows_log(tmp_path / "run")) >= 5)
    first = store.read_rows_log(writer.dir)
    assert len(first) >= 5 and len(first) < len(cases)  # stopped: the cases in flight finished, no more were sent
    order = [c.case_id for c in cases]
    assert list(first["case_id"]) != order[:len(first)]  # recorded as they finished, not in suite order
    assert fake.init_calls and not fake.initialized  # a local Ray started for the run, and shut down
    suite2, todo, writer2 = lifecycle.resume_run(writer.dir, suite)
    assert {c.case_id for c in todo} == set(order) - set(first["case_id"])
    with lifecycle.make_executor(suite2) as executor:
        lifecycle.run_cases(todo, writer2, executor, processes=2)
    rows = lifecycle.finish_run(writer2, "complete", 1.0)
    assert sorted(rows["case_id"]) == sorted(order) and (rows["status"] == "ok").all()
    assert (rows["processes"] == 2).all() and set(rows["host"]) <= {"node-a", "node-b"}
    samples = store.read_samples(writer.dir)
    assert set(samples["process"]) == {0, 1} and set(samples["case_id"]) == set(order)


def test_ray_resources_per_case(fake, tmp_path):
    suite = ray_suite()
    cpu, gpu = Case("naive", heads=2, kv_heads=2, head_dim=16, seq_len=32), \
        Case("naive", heads=2, kv_heads=2, head_dim=16, seq_len=32, device="cuda")
    _run(suite, [cpu, gpu], tmp_path / "run")
    options = {Case(**s["args"][1]).device: s["options"] for s in fake.submitted}
    assert options["cuda"]["num_gpus"] == 1 and options["cpu"]["num_cpus"] == 1 and options["cpu"]["num_gpus"] == 0
    assert all(s["options"]["max_retries"] == 0 for s in fake.submitted)  # our retry, not Ray's
    assert rayexec.resources(cpu, None, 48.0) == {"num_cpus": 48, "num_gpus": 0}  # no threads: a node to itself


def test_ray_lost_node_gets_one_retry_elsewhere_then_a_crash_row(fake, tmp_path):
    suite = ray_suite(lengths="[16, 32, 48]", processes=1)
    once, twice, fine = expand_cases(suite)
    fake.plan = {once.case_id: ["died"], twice.case_id: ["died", "crashed"]}
    writer = _run(suite, [once, twice, fine], tmp_path / "run")
    rows = {r["case_id"]: r for r in store.read_rows_log(writer.dir).to_dict("records")}
    assert rows[once.case_id]["status"] == "ok" and rows[fine.case_id]["status"] == "ok"
    assert rows[twice.case_id]["status"] == "crash" and rows[twice.case_id]["reason"].startswith("node lost: ")
    assert "retried on another node" in rows[twice.case_id]["reason"]
    for case in (once, twice):
        nodes = [node for cid, node in fake.ran if cid == case.case_id]
        assert len(nodes) == 2 and nodes[0] != nodes[1]  # the retry ran on the other node
        retry = [s for s in fake.submitted if Case(**s["args"][1]).case_id == case.case_id][1]
        assert retry["options"]["label_selector"] == {"ray.io/node-id": "!" + nodes[0]}


def test_ray_single_node_retries_where_it_can(fake, tmp_path):
    fake.node_list = TWO_NODES[:1]
    suite = ray_suite(lengths="[16]", processes=1)
    (case,) = expand_cases(suite)
    fake.plan = {case.case_id: ["crashed", "crashed"]}
    writer = _run(suite, [case], tmp_path / "run")
    (row,) = store.read_rows_log(writer.dir).to_dict("records")
    assert row["status"] == "crash" and "no other node" in row["reason"]


def test_ray_missing_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    suite = tmp_path / "s.toml"
    suite.write_text(SMALL)
    code, err = _bench(capsys, "run", suite, "--executor", "ray", "-o", tmp_path / "run")
    assert code == 2 and err.strip().splitlines() == [
        "--executor ray needs Ray, which is not installed here: pip install -e '.[ray]'"]
    assert not (tmp_path / "run").exists()


def test_ray_task_runs_the_case_in_worker_isolation_on_its_node(monkeypatch, tmp_path):
    """The real node side (a WorkerPool of its own) under the fake Ray: ok rows with the node's identity."""
    ray = fake_ray.FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    suite = ray_suite(timing="min_reps = 2\nmax_reps = 3\nmin_time_s = 0.0\nwarmup = 1", lengths="[16, 32]",
                      processes=1)
    cases = expand_cases(suite)
    try:
        writer = _run(suite, cases, tmp_path / "run")
        (pools,) = rayexec._POOLS.values()  # one pool per round, kept for the next task of this Ray worker
        assert len(pools) == 1 and pools[0].started == 1  # both cases through one worker process
    finally:
        rayexec.close_pools()
    rows = lifecycle.finish_run(writer, "complete", 1.0)
    from harness.measure.environment import host_identity

    assert (rows["status"] == "ok").all() and len(rows) == 2
    assert set(rows["machine_fingerprint"]) == {host_identity()["machine_fingerprint"]}
    assert ray.submitted[0]["options"]["num_cpus"] >= 1


def test_ray_node_with_other_code_measures_nothing():
    case = Case("naive", heads=2, kv_heads=2, head_dim=16, seq_len=32)
    pool = {"threads": 1, "memory_budget": None, "memory_budget_fraction": 0.6}
    out = rayexec.run_on_node(pool, dataclasses.asdict(case), 2, {"torch": "0.0.1", "commit": None})
    (only,) = out["rounds"]
    assert only["row"]["status"] == "error" and "this node runs other code: torch" in only["row"]["reason"]
    assert only["row"]["host"] == out["node"]["host"] and not only["samples_s"]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is not installed (pip install -e '.[ray]'); the fake covers the logic")
def test_two_cases_through_a_real_local_ray(tmp_path):
    from tests.runs import bench

    suite = tmp_path / "s.toml"
    suite.write_text(SMALL.replace('seq_len = [32, 64]', 'seq_len = [32]'))
    proc = bench("run", suite, "-o", tmp_path / "run", "-q", "--executor", "ray", "--no-report", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = store.read_results(tmp_path / "run")
    assert len(rows) == 2 and (rows["status"] == "ok").all() and rows["host"].notna().all()


# -- runs across machines: the report and bench compare keep machines apart ---------------------------


def _rows(machines):
    out = []
    for i, (host, fp) in enumerate(machines):
        c = Case("naive", heads=2, kv_heads=2, head_dim=16, seq_len=64 + 64 * i)
        out.append(dict(schema.base_row(c, "dense", True, 1), host=host, machine_fingerprint=fp, time_ms=1.0 + i,
                        peak_mem_bytes=1e6, rel_err=1e-7, run_id="r", suite="s"))
    return pd.DataFrame(out)


def test_report_groups_by_machine_only_when_a_run_spans_several():
    from reports.analysis import GROUP_KEYS, group_title, with_labels

    one = with_labels(_rows([("h1", "fa"), ("h1", "fa")]))
    assert set(one["machine"]) == {""}
    two = with_labels(_rows([("h1", "fa"), ("h2", "fb")]))
    titles = {group_title(tuple(r[k] for k in GROUP_KEYS)) for r in two.to_dict("records")}
    assert titles == {t for t in titles if " · on h" in t} and len(titles) == 2


def test_compare_never_pairs_timings_of_different_machines():
    from harness.regression.compare import compare_frames

    base = _rows([("h1", "fa"), ("h1", "fa")])
    new = _rows([("h1", "fa"), ("h2", "fb")])

    def samples(rows, t):
        return pd.DataFrame([{"case_id": c, "rep": r, "time_ms": t * (1 + 0.01 * r)}
                             for c in rows["case_id"] for r in range(5)])

    table = compare_frames(base, samples(base, 1.0), new, samples(new, 2.0)).set_index("case_id")
    same, other = base["case_id"]
    assert table.loc[same, "verdict"] == "regressed" and math.isfinite(table.loc[same, "time_ratio"])
    assert table.loc[other, "verdict"] == "not compared" and "different machines" in table.loc[other, "note"]
    assert not math.isfinite(table.loc[other, "time_ratio"])
