"""Results are data, never code: a run directory from elsewhere cannot make ``bench`` run anything.

A crafted run directory names, in its ``run.json``, a plugin outside the project: a file that
writes a marker when imported. No reading command imports it; ``resume`` and ``compare --confirm``
refuse it in one line unless ``--trust-plugins`` is given; a plugin inside the checkout still
works; names that become paths cannot escape the results tree; and malformed ``run.json`` files
are one line and exit 2, never a traceback.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli.main import main
from harness.core import names, schema
from harness.engine import runmeta, store
from harness.engine.store import RunWriter, StoreError
from harness.engine.trust import UntrustedPlugin
from harness.measure.environment import PROJECT_ROOT
from harness.regression.confirm import Side
from harness.regression.history import HistoryError, baseline_dir, resolve_run
from tests.runs import record_case

SUITE = """
name = "crafted"
plugins = [{plugins}]
timing = {{ warmup = 1, min_time_s = 0.0, min_reps = 2, max_reps = 3 }}
defaults = {{ heads = 2, head_dim = 16 }}
sweep = {{ seq_len = [16, 32] }}
variant = [{{ name = "naive" }}]
"""

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")
"""


def _head() -> str | None:
    proc = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def environment_here():
    from harness.measure import environment

    return environment.capture()


def write_run(run_dir: Path, suite_path: Path, plugins: list[str], env: dict, *, run_id: str, factor: float = 1.0,
              finished: int | None = None, status: str = "complete") -> Path:
    """A run directory made by hand, as a colleague or a CI artifact could hand one over: its suite
    names ``plugins``; its commit is this checkout's HEAD, clean, so that --confirm would re-run it."""
    from harness.engine.suite import expand_cases, parse_suite

    text = SUITE.format(plugins=", ".join(json.dumps(p) for p in plugins))
    cases = expand_cases(parse_suite(SUITE.format(plugins=""), suite_path))  # imports no plugin
    env = copy.deepcopy(env)
    env["git"] = {"commit": _head(), "dirty": False, "root": str(PROJECT_ROOT)}
    meta = {
        "run_id": run_id,
        "suite": {"name": "crafted", "description": "", "path": str(suite_path), "resolved_path": str(suite_path),
                  "definition": tomllib.loads(text), "text": text},
        "timing": {"warmup": 1, "min_time_s": 0.0, "min_reps": 2, "max_reps": 3, "threads": 1},
        "seed": 0, "cases": len(cases), "case_ids": [c.case_id for c in cases],
        "started": "2026-01-01T00:00:00+00:00", "finished": None, "status": "running", "environment": env,
    }
    writer = RunWriter(run_dir, meta)
    for i, case in enumerate(cases[:finished]):
        row = schema.base_row(case, family="dense", exact=True, threads=1)
        ms = [factor * (1.0 + 0.001 * k + 0.01 * i) for k in range(8)]
        row.update(run_id=run_id, suite="crafted", status="ok", time_ms=sorted(ms)[4], reps=8,
                   peak_mem_bytes=1000.0, rel_err=1e-7)
        record_case(writer, row, [m / 1e3 for m in ms])
    writer.finalize(finished="2026-01-01T00:01:00+00:00", status=status, wall_s=60.0)
    return run_dir


@pytest.fixture
def evil(tmp_path):
    """A plugin file outside the project, and the marker its import would write."""
    marker = tmp_path / "MARKER"
    plugin = tmp_path / "elsewhere" / "evil.py"
    plugin.parent.mkdir()
    plugin.write_text(EVIL.format(marker=str(marker)))
    return plugin, marker


@pytest.fixture
def crafted(tmp_path, evil, environment_here):
    """``ROOT/runs/<id>`` for two runs naming the outside plugin, NEW 1.5x slower than BASE."""
    plugin, marker = evil
    root = tmp_path / "results"
    suite_path = tmp_path / "suites" / "crafted.toml"
    base = write_run(root / "runs" / "20260101-000000-crafted-aaaaaa", suite_path, [str(plugin)], environment_here,
                     run_id="20260101-000000-crafted-aaaaaa")
    new = write_run(root / "runs" / "20260102-000000-crafted-bbbbbb", suite_path, ["../elsewhere/evil.py"],
                    environment_here, run_id="20260102-000000-crafted-bbbbbb", factor=1.5)
    return root, base, new, marker


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_reading_commands_never_import_a_plugin_a_run_names(crafted, tmp_path, capsys):
    root, base, new, marker = crafted
    commands = [
        ["report", str(new), "-o", str(tmp_path / "report.html")],
        ["compare", str(base), str(new), "--no-html", "--format", "json"],
        ["show", str(new), "--root", str(root)],
        ["history", "--root", str(root), "--json"],
        ["trend", "--root", str(root), "-o", str(tmp_path / "trend.html")],
        ["export", str(new), "-o", str(tmp_path / "pb.json")],
        ["site", "--root", str(root), "-o", str(tmp_path / "site")],
    ]
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        assert not marker.exists(), f"bench {argv[0]} imported the plugin"
    assert (tmp_path / "site" / "index.html").is_file()


def test_reading_commands_never_write_through_or_publish_a_symlink(crafted, tmp_path, capsys):
    """A run directory can hold symlinks: report.html pointing at a file of yours. Writing the
    report replaces the link (the file is untouched); the site never copies what it points at."""
    root, base, new, _ = crafted
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    for run, name in ((new, "report.html"), (new, "compare.html"), (new, "pytest-benchmark.json")):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(secret)
    assert main(["report", str(new)]) == 0
    assert main(["compare", str(base), str(new), "--format", "json"]) == 0
    assert main(["export", str(new)]) == 0
    assert secret.read_text() == "private"
    assert not any((new / n).is_symlink() for n in ("report.html", "compare.html", "pytest-benchmark.json"))
    (base / "report.html").unlink(missing_ok=True)
    (base / "report.html").symlink_to(secret)
    assert main(["site", "--root", str(root), "-o", str(tmp_path / "site")]) == 0
    published = [f.read_text(errors="replace") for f in (tmp_path / "site").rglob("*") if f.is_file()]
    assert published and not any("private" in text for text in published)
    capsys.readouterr()


@pytest.mark.skipif(_head() is None, reason="the project is not a git checkout here; --confirm needs git")
def test_compare_confirm_refuses_a_plugin_outside_the_project(crafted, capsys):
    root, base, new, marker = crafted
    status = main(["compare", str(base), str(new), "--confirm", "--confirm-rounds", "1", "--no-html"])
    err = capsys.readouterr().err
    assert status == 2 and not marker.exists(), err
    refusal = [line for line in err.splitlines() if "--trust-plugins" in line]
    assert len(refusal) == 1 and "evil.py" in refusal[0] and "Traceback" not in err


def test_resume_refuses_a_plugin_outside_the_project_unless_trusted(tmp_path, evil, environment_here, capsys):
    plugin, marker = evil
    (tmp_path / "suites").mkdir()
    for spec in (str(plugin), "../elsewhere/evil.py"):
        run = write_run(tmp_path / f"run-{len(spec)}", tmp_path / "suites" / "crafted.toml", [spec], environment_here,
                        run_id="20260101-000000-crafted-cccccc", finished=1, status="interrupted (SIGINT)")
        assert main(["resume", str(run), "--isolation", "none", "--quiet", "--no-report"]) == 2
        line = _one_line(capsys)
        assert "evil.py" in line and "--trust-plugins" in line and not marker.exists()
    assert main(["resume", str(run), "--isolation", "none", "--quiet", "--no-report", "--trust-plugins"]) == 0
    assert marker.read_text() == "imported"
    err = capsys.readouterr().err
    assert "--trust-plugins: importing plugin ../elsewhere/evil.py" in err
    assert len(store.read_results(run)) == 2  # the missing case ran


@pytest.mark.parametrize("plugin", ["../examples/chunked_attention.py", "../tests/plugins/slow_sdpa.py"])
def test_resume_with_a_plugin_inside_the_checkout_works_as_before(tmp_path, plugin, environment_here, capsys):
    suite_path = PROJECT_ROOT / "suites" / "crafted-in-checkout.toml"  # never written: its directory is what counts
    run = write_run(tmp_path / "run", suite_path, [plugin], environment_here, run_id="20260101-000000-crafted-dddddd",
                    finished=1, status="interrupted (SIGINT)")
    assert main(["resume", str(run), "--isolation", "none", "--quiet", "--no-report"]) == 0, capsys.readouterr().err
    assert "--trust-plugins" not in capsys.readouterr().err
    assert len(store.read_results(run)) == 2


def test_a_plugin_file_inside_a_results_directory_is_not_the_projects(tmp_path, environment_here, capsys):
    """A run directory that ships its own plugin file is refused even inside the checkout's results/."""
    from harness.engine.trust import plugin_problem

    assert plugin_problem("results/runs/x/evil.py", PROJECT_ROOT) is not None
    assert plugin_problem("results.runs.x.evil", PROJECT_ROOT) is not None
    assert plugin_problem("tests/plugins/slow_sdpa.py", PROJECT_ROOT) is None
    assert plugin_problem("antigravity", PROJECT_ROOT) is not None  # installed, not the project's


def _side(tmp_path: Path, plugins: list[str], suite_dir: Path | None = None) -> Side:
    return Side(commit="0" * 40, repo=PROJECT_ROOT, timing={}, seed=0, threads=1, plugins=plugins,
                suite_dir=suite_dir or PROJECT_ROOT / "suites", recorded_root=Path("/home/ci/bench"))


def test_confirm_sides_take_only_the_commits_own_plugins(tmp_path):
    tree = tmp_path / "tree"
    (tree / "tests" / "plugins").mkdir(parents=True)
    (tree / "tests" / "plugins" / "p.py").write_text("")
    (tree / "tests" / "__init__.py").write_text("")
    (tree / "tests" / "plugins" / "__init__.py").write_text("")
    outside = tmp_path / "outside.py"
    outside.write_text("")
    (tree / "tests" / "plugins" / "link.py").symlink_to(outside)
    recorded = _side(tmp_path, ["../tests/plugins/p.py", "tests.plugins.p"], Path("/home/ci/bench/suites"))
    assert recorded.in_tree(tree) == (tree / "suites", [str(tree / "tests" / "plugins" / "p.py"), "tests.plugins.p"])
    here = _side(tmp_path, ["../tests/plugins/p.py"])
    assert here.in_tree(tree) == (tree / "suites", [str(tree / "tests" / "plugins" / "p.py")])
    for plugins in (["/opt/x.py"], ["../../../../../../tmp/x.py"], ["../tests/plugins/link.py"], ["os"],
                    ["tests.plugins.nothere"]):
        with pytest.raises(UntrustedPlugin, match="--trust-plugins"):
            _side(tmp_path, plugins).in_tree(tree)
    said: list[str] = []
    base_dir, plugins = _side(tmp_path, ["/opt/x.py", "os"]).in_tree(tree, trust=True, log=said.append)
    assert plugins == ["/opt/x.py", "os"] and len(said) == 2 and all("--trust-plugins" in s for s in said)


# ----------------------------------------------------------------------------------------------
# names that become paths


BAD_NAMES = ["../x", "..", "../../etc/passwd", "/abs/path", "a/b", "a\0b", "x" * 10_000, ".hidden", "", "a b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_from_results_that_would_escape_are_refused(tmp_path, bad, environment_here, capsys):
    assert names.name_problem(bad) is not None
    with pytest.raises(ValueError):
        names.inside(tmp_path, bad)
    with pytest.raises(HistoryError):
        baseline_dir(tmp_path, bad)
    if "\0" not in bad and bad:
        with pytest.raises(HistoryError):
            resolve_run(f"latest@{bad}", tmp_path)
    run = write_run(tmp_path / "run", tmp_path / "s.toml", [], environment_here, run_id="20260101-000000-ok-eeeeee")
    for field in ("run_id", "suite.name"):
        meta = json.loads((run / "run.json").read_text())
        if field == "run_id":
            meta["run_id"] = bad
        else:
            meta["suite"]["name"] = bad
        (run / "run.json").write_text(json.dumps(meta))
        with pytest.raises(StoreError):
            store.read_meta(run)
        root = tmp_path / "results"
        assert main(["baseline", "set", str(run), "--root", str(root)]) == 2
        _one_line(capsys)
        assert not root.exists() and not (tmp_path / "x").exists()


def test_inside_follows_symlinks(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert names.inside(tmp_path / "root", "fine") == tmp_path / "root" / "fine"
    with pytest.raises(ValueError, match="outside"):
        names.inside(tmp_path / "root", "link")


def test_special_files_are_not_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "run.json")  # reading a FIFO would wait forever
    with pytest.raises(StoreError, match="not a regular file"):
        store.read_meta(run)


# ----------------------------------------------------------------------------------------------
# malformed run.json: one line and exit 2, or a reading that works; never a traceback

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.sampled_from(["../x", "/etc", "a\0b", "x" * 300, "0" * 40, "complete"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_meta(draw, base: dict):
    meta = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(meta) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return meta


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from harness.measure import environment

    tmp = tmp_path_factory.mktemp("fuzz")
    env = environment.capture()
    base = write_run(tmp / "results" / "runs" / "base", tmp / "s.toml", [], env,
                     run_id="20260101-000000-crafted-ffffff")
    new = write_run(tmp / "results" / "runs" / "new", tmp / "s.toml", [], env, run_id="20260102-000000-crafted-ffffff",
                    factor=1.2)
    return tmp, base, new, json.loads((new / "run.json").read_text())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_run_json_is_one_line_never_a_traceback(pair, capsys, data):
    tmp, base, new, good = pair
    meta = data.draw(st.one_of(mutated_meta(good), JSON), label="run.json")
    command = data.draw(st.sampled_from(["report", "compare", "show", "history"]), label="command")
    (new / "run.json").write_text(json.dumps(meta))
    capsys.readouterr()
    argv = {"report": ["report", str(new), "-o", str(tmp / "r.html")],
            "compare": ["compare", str(base), str(new), "--no-html", "--format", "json"],
            "show": ["show", str(new), "--json"],
            "history": ["history", "--root", str(tmp / "results"), "--json"]}[command]
    status = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert status in (0, 2), (status, err)
    if status == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_the_declared_shape_accepts_what_the_harness_writes(pair):
    _, base, _, _ = pair
    meta = store.read_meta(base)
    assert runmeta.meta_problem(meta) is None
    committed = PROJECT_ROOT / "results" / "baseline"
    for run in committed.glob("*/run.json") if committed.is_dir() else []:
        store.read_meta(run.parent)  # the committed baselines stay readable
        store.read_results(run.parent)
        store.read_samples(run.parent)


@pytest.mark.parametrize("change, problem", [
    ({"time_ms": "fast"}, "time_ms"),
    ({"seq_len": 0}, "seq_len"),
    ({"params": "[1, 2]"}, "params"),
    ({"time_ms": float("inf")}, "time_ms"),
])
def test_results_columns_are_checked_against_the_schema(pair, tmp_path, change, problem):
    import pandas as pd

    _, base, _, _ = pair
    run = tmp_path / "run"
    shutil.copytree(base, run)
    rows = pd.read_parquet(run / "results.parquet")
    for col, value in change.items():
        rows[col] = pd.Series([value] * len(rows), dtype=object)
    rows.to_parquet(run / "results.parquet", index=False)
    with pytest.raises(StoreError, match=problem):
        store.read_results(run)
