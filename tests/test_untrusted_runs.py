"""Untrusted runs: what a received run directory names is never run, connected to or written
through, and every output format shows its text as text.

Each group of tests rebuilds, with hostile fixtures made here, one group of probes: ``--confirm``
runs only commits the user vouches for; ``resume`` imports only tracked, unmodified files of the
checkout; ``resume`` connects to nothing a run names; no write or copy through a symlink (resume,
trend, baseline); the site publishes no received HTML; Rich, terminal and Markdown output escaped;
the Atom feed stays well-formed; one line instead of a traceback; bounds on the work a run
directory can ask for. Bad input is one line and exit status 2; nothing here asserts how fast
anything is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from harness.cli.main import main
from harness.core import escape, safefs
from harness.engine import store
from tests.scratch_repo import git, make_scratch_repo
from tests.test_results_safety import write_run

BASE_ID, NEW_ID = "20260101-000000-crafted-aaaaaa", "20260102-000000-crafted-bbbbbb"
MARKER_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def environment_here():
    from harness.measure import environment

    return environment.capture()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = _lines(captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


def _pair(tmp_path: Path, env: dict) -> tuple[Path, Path, Path]:
    """``results/runs/{BASE,NEW}``: two complete runs of the crafted suite, NEW 1.5x slower."""
    root = tmp_path / "results"
    suite = tmp_path / "suites" / "crafted.toml"
    base = write_run(root / "runs" / BASE_ID, suite, [], env, run_id=BASE_ID)
    new = write_run(root / "runs" / NEW_ID, suite, [], env, run_id=NEW_ID, factor=1.5)
    return root, base, new


def _set_column(run: Path, column: str, value) -> None:
    rows = pd.read_parquet(run / "results.parquet")
    rows[column] = pd.Series([value] * len(rows), dtype=object)
    rows.to_parquet(run / "results.parquet", index=False)


def _edit_meta(run: Path, edit) -> None:
    meta = json.loads((run / "run.json").read_text())
    edit(meta)
    (run / "run.json").write_text(json.dumps(meta))


def _interrupted(tmp_path: Path, env: dict, *, suite_extra: str = "", name: str = "run") -> Path:
    """An interrupted run (one of its two cases finished) whose recorded suite text ends with ``suite_extra``."""
    run = write_run(tmp_path / name, tmp_path / "suites" / "crafted.toml", [], env,
                    run_id="20260101-000000-crafted-cccccc", finished=1, status="interrupted (SIGINT)")
    if suite_extra:
        def edit(meta):
            meta["suite"]["text"] += suite_extra
            meta["suite"]["definition"] = tomllib.loads(meta["suite"]["text"])
        _edit_meta(run, edit)
    return run


RESUME = ["--isolation", "none", "--quiet", "--no-report"]


# ----------------------------------------------------------------------------------------------
# --confirm runs only commits the user vouches for

EVIL_WORKER = "from pathlib import Path\nPath({marker!r}).write_text('ran')\nraise SystemExit(0)\n"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A git repository holding the project (its HEAD) and, only on an orphan ``bench-results``
    branch, a commit whose tree has its own ``harness/engine/worker.py`` that would leave a marker."""
    tmp = tmp_path_factory.mktemp("scratch")
    repo = make_scratch_repo(tmp / "repo")
    marker = tmp / "MARKER"
    head = git(repo, "rev-parse", "HEAD")
    branch = git(repo, "symbolic-ref", "--short", "HEAD")
    git(repo, "checkout", "-q", "--orphan", "bench-results")
    git(repo, "rm", "-rqf", ".")
    worker = repo / "harness" / "engine" / "worker.py"
    worker.parent.mkdir(parents=True, exist_ok=True)
    worker.write_text(EVIL_WORKER.format(marker=str(marker)))
    (repo / "harness" / "__init__.py").write_text("")
    (repo / "harness" / "engine" / "__init__.py").write_text("")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "results, and a worker of its own")
    foreign = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-qf", branch)
    return repo, head, foreign, marker


def test_confirm_refuses_a_commit_only_a_results_branch_holds(scratch, tmp_path, environment_here):
    repo, head, foreign, marker = scratch
    root, base, new = _pair(tmp_path, environment_here)
    for run, commit in ((base, foreign), (new, head)):
        _edit_meta(run, lambda m, c=commit: m["environment"].update(git={"commit": c, "dirty": False,
                                                                         "root": str(repo)}))
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-m", "harness", "compare", str(base), str(new), "--confirm",
                           "--confirm-rounds", "1", "--no-html", "--format", "json"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert foreign[:12] in lines[0] and "--confirm-branch" in lines[0]
    assert not marker.exists()


def test_vouched_commits_are_heads_ancestors_or_a_named_branchs(scratch):
    from harness.engine.trust import UntrustedCommit, vouched_commit
    from harness.regression.confirm import extract_commit

    repo, head, foreign, _ = scratch
    vouched_commit(repo, head)
    vouched_commit(repo, head[:10])
    with pytest.raises(UntrustedCommit, match=f"{foreign[:12]}.*--confirm-branch"):
        vouched_commit(repo, foreign)
    vouched_commit(repo, foreign, ["bench-results"])  # the user names the branch: vouched
    with pytest.raises(UntrustedCommit, match="no such branch"):
        vouched_commit(repo, foreign, ["--upload-pack=touch /tmp/x"])
    for bad in ("--output=/tmp/x", "HEAD", "main", "0" * 3):
        with pytest.raises(UntrustedCommit):
            vouched_commit(repo, bad)
    # the same rule for anything that extracts a recorded commit to run it
    with pytest.raises(UntrustedCommit):
        extract_commit(repo, foreign, repo.parent / "tree")


def test_confirm_extraction_refuses_links_out_of_the_tree_in_one_line(tmp_path):
    """An absolute symlink in a (vouched) commit's tree: one CompareError line, never AbsoluteLinkError."""
    from harness.regression.confirm import extract_commit
    from harness.regression.verdicts import CompareError

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("")
    (repo / "evil").symlink_to("/etc/passwd")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a link out")
    with pytest.raises(CompareError, match="cannot be extracted safely"):
        extract_commit(repo, git(repo, "rev-parse", "HEAD"), tmp_path / "tree")


def test_confirm_rounds_are_bounded_whatever_the_run_recorded():
    from harness.regression.confirm import (
        ROUND_MAX_REPS,
        ROUND_MAX_TIME_S,
        ROUND_MAX_WARMUP,
        ROUND_MIN_REPS,
        ROUND_MIN_TIME_S,
        round_timing,
    )

    huge = {"warmup": 10**9, "min_time_s": 1e9, "min_reps": 10**9, "max_reps": 10**9, "max_time_s": 1e9,
            "processes": 1000, "threads": 1}
    t = round_timing(huge)
    assert t["warmup"] == ROUND_MAX_WARMUP and t["max_reps"] == ROUND_MAX_REPS and t["max_time_s"] == ROUND_MAX_TIME_S
    assert t["min_time_s"] == ROUND_MIN_TIME_S and t["min_reps"] == ROUND_MIN_REPS and t["processes"] == 1
    small = {"warmup": 2, "min_time_s": 0.05, "min_reps": 3, "max_reps": 20, "max_time_s": 0.3}
    assert round_timing(small) == small  # what the suites use stays as recorded


def test_confirm_rounds_stop_at_their_minimum_not_at_a_precision_target():
    """A round's median is one replicate: sampling on to a 1% target (up to the 5 s budget on a noisy
    machine) would buy precision the test over rounds does not use."""
    from harness.core.config import TimingConfig
    from harness.measure.timing import stop_reason
    from harness.regression.confirm import ROUND_MIN_REPS, ROUND_MIN_TIME_S, round_timing

    recorded = {"warmup": 3, "min_time_s": 0.3, "min_reps": 15, "max_reps": 200, "max_time_s": 5.0,
                "target_precision": 0.01}
    t = round_timing(recorded)
    assert t["target_precision"] == 0.0 and recorded["target_precision"] == 0.01  # the run's rule is not changed
    config = TimingConfig(**t)
    noisy = [1e-3 * (1 + 0.5 * (i % 2)) for i in range(ROUND_MIN_REPS)]  # far from 1%, past the round's minimum
    assert sum(noisy) < ROUND_MIN_TIME_S and stop_reason(noisy, 0.05, config) is None
    enough = noisy * int(ROUND_MIN_TIME_S / sum(noisy) + 1)
    assert stop_reason(enough, 0.2, config) == "min_time"
    assert stop_reason(enough, 0.2, TimingConfig(**recorded)) is None  # the recorded rule would go on
    assert "target_precision" not in round_timing({"min_time_s": 0.3})  # an older commit's rule gains no key


# ----------------------------------------------------------------------------------------------
# resume imports only tracked, unmodified files of the checkout


def test_resume_refuses_an_untracked_plugin_unpacked_inside_the_checkout(tmp_path, environment_here):
    """A downloaded run unpacked as ``incoming/run/`` inside the checkout, naming
    ``../helper.py`` that came with it."""
    repo = make_scratch_repo(tmp_path / "repo")
    marker = tmp_path / "MARKER"
    (repo / "incoming").mkdir()
    (repo / "incoming" / "helper.py").write_text(MARKER_CODE.format(marker=str(marker)))
    run = write_run(repo / "incoming" / "run", repo / "incoming" / "run" / "suite.toml", ["../helper.py"],
                    environment_here, run_id="20260101-000000-crafted-dddddd", finished=1,
                    status="interrupted (SIGINT)")
    proc = subprocess.run([sys.executable, "-m", "harness", "resume", str(run), *RESUME], cwd=repo,
                          env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=300)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "helper.py" in lines[0] and "not tracked" in lines[0] and "--trust-plugins" in lines[0]
    assert not marker.exists()


def test_only_committed_files_of_the_checkout_are_the_projects(tmp_path):
    from harness.engine.trust import plugin_problem

    repo = tmp_path / "repo"
    (repo / "plugins").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "plugins" / "clean.py").write_text("X = 1\n")
    (repo / "plugins" / "changed.py").write_text("X = 1\n")
    (repo / "plugins" / "staged.py").write_text("X = 1\n")
    git(repo, "add", "plugins/clean.py", "plugins/changed.py")
    git(repo, "commit", "-q", "-m", "plugins")
    (repo / "plugins" / "changed.py").write_text("X = 2  # not committed\n")
    git(repo, "add", "plugins/staged.py")  # in the index, never committed
    (repo / "plugins" / "new.py").write_text("")

    def problem(spec):
        return plugin_problem(spec, repo / "suites", repo, in_process=False, committed=True)

    assert problem("../plugins/clean.py") is None
    assert "not tracked" in problem("../plugins/new.py")
    assert "not committed" in problem("../plugins/changed.py")
    assert "not committed" in problem("../plugins/staged.py")
    assert problem("plugins.clean") is None and "not tracked" in problem("plugins.new")
    # without committed (a tree extracted from a commit), the file's place is what counts
    assert plugin_problem("../plugins/new.py", repo / "suites", repo, in_process=False) is None
    # not a git checkout: nothing can be told apart, so nothing is taken
    plain = tmp_path / "plain"
    (plain / "p.py").parent.mkdir()
    (plain / "p.py").write_text("")
    assert "not a git checkout" in plugin_problem("p.py", plain, plain, in_process=False, committed=True)


# ----------------------------------------------------------------------------------------------
# resume connects to nothing a run names


def test_resume_takes_no_executor_or_cluster_address_from_the_run(tmp_path, environment_here, capsys, monkeypatch):
    from harness.engine.lifecycle import resume_run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = _interrupted(tmp_path, environment_here,
                       suite_extra='\n[run]\nexecutor = "ray"\nray_address = "ray://203.0.113.7:10001"\n')
    suite, todo, _ = resume_run(run)
    assert suite.run.executor == "process" and suite.run.ray_address is None and len(todo) == 1
    imported = "ray" in sys.modules
    assert main(["resume", str(run), *RESUME]) == 0, capsys.readouterr().err
    assert ("ray" in sys.modules) == imported  # no Ray was even imported for it
    assert len(store.read_results(run)) == 2
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete"


def test_resume_uses_the_command_lines_executor(tmp_path, environment_here):
    import argparse

    from harness.cli.run import _with_options
    from harness.engine.lifecycle import resume_run

    run = _interrupted(tmp_path, environment_here, suite_extra='\n[run]\nray_address = "ray://203.0.113.7:10001"\n')
    suite, _, _ = resume_run(run)
    args = argparse.Namespace(processes=None, allocator=None, executor=None, ray_address="ray://mine:10001")
    chosen = _with_options(suite, args)
    assert chosen.run.executor == "ray" and chosen.run.ray_address == "ray://mine:10001"


# ----------------------------------------------------------------------------------------------
# no write or copy through a symlink


def test_resume_never_writes_through_the_runs_symlinks(tmp_path, environment_here, capsys):
    run = _interrupted(tmp_path, environment_here)
    victims = {name: tmp_path / f"victim-{name}" for name in ("run.json.tmp", "results.parquet", "samples.parquet",
                                                              "report.html")}
    for name, victim in victims.items():
        victim.write_text("mine")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    assert main(["resume", str(run), "--isolation", "none", "--quiet"]) == 0, capsys.readouterr().err
    assert all(v.read_text() == "mine" for v in victims.values())
    for name in ("results.parquet", "samples.parquet", "report.html"):
        assert (run / name).is_file() and not (run / name).is_symlink()
    assert len(store.read_results(run)) == 2


@pytest.mark.parametrize("name", ["rows.jsonl", "samples.jsonl", "rounds.jsonl", "logs", "profile.jsonl"])
def test_resume_refuses_a_symlink_it_would_append_to(tmp_path, environment_here, capsys, name):
    run = _interrupted(tmp_path, environment_here)
    victim = tmp_path / "victim"
    if name == "logs":
        victim.mkdir()
    else:
        victim.write_text("mine")
    if (run / name).exists():
        (run / name).unlink()
    (run / name).symlink_to(victim)
    before = json.loads((run / "run.json").read_text())
    assert main(["resume", str(run), *RESUME]) == 2
    line = _one_line(capsys)
    assert name in line and "symlink" in line
    assert (victim.is_dir() and not any(victim.iterdir())) or victim.read_text() == "mine"
    assert json.loads((run / "run.json").read_text()) == before  # nothing written


def test_trend_replaces_a_symlink_rather_than_writing_through_it(tmp_path, environment_here, capsys):
    root, _, _ = _pair(tmp_path, environment_here)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (root / "trend.html").symlink_to(victim)
    assert main(["trend", "--root", str(root)]) == 0, capsys.readouterr().err
    assert victim.read_text() == "mine"
    assert (root / "trend.html").is_file() and not (root / "trend.html").is_symlink()


def test_baseline_set_refuses_to_copy_a_symlink(tmp_path, environment_here, capsys):
    root, _, new = _pair(tmp_path, environment_here)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (new / "report.html").unlink(missing_ok=True)
    (new / "report.html").symlink_to(secret)
    assert main(["baseline", "set", str(new), "--root", str(root)]) == 2
    line = _one_line(capsys)
    assert "report.html" in line and "symlink" in line
    copied = [p for p in (root / "baseline").rglob("*") if p.is_file()] if (root / "baseline").exists() else []
    assert not any("private" in p.read_text(errors="replace") for p in copied)
    assert not (root / "baseline" / "crafted").exists()


def test_baseline_set_writes_no_file_through_a_symlinked_baseline_directory(tmp_path, environment_here, capsys):
    root, base, _ = _pair(tmp_path, environment_here)
    elsewhere = root / "baseline" / "other"  # inside baseline/: only the symlink is wrong
    elsewhere.mkdir(parents=True)
    (root / "baseline" / "crafted").symlink_to(elsewhere)
    assert main(["baseline", "set", str(base), "--root", str(root)]) == 2
    assert "symlink" in _one_line(capsys)
    assert not any(elsewhere.iterdir())
    (root / "baseline" / "crafted").unlink()
    assert main(["baseline", "set", str(base), "--root", str(root)]) == 0  # and as usual otherwise
    assert (root / "baseline" / "crafted" / "results.parquet").is_file()


def test_safefs_helpers(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    d = tmp_path / "d"
    d.mkdir()
    (d / "link").symlink_to(victim)
    safefs.write_text(d / "link", "new")  # replaced, not written through
    assert victim.read_text() == "mine" and (d / "link").read_text() == "new" and not (d / "link").is_symlink()
    (d / "append").symlink_to(victim)
    with pytest.raises(safefs.UnsafePath, match="symlink"):
        safefs.append(d / "append", "x\n")
    with pytest.raises(safefs.UnsafePath, match="symlink"):
        safefs.copy_file(d / "append", tmp_path / "copy")
    (d / "sub").symlink_to(tmp_path)
    with pytest.raises(safefs.UnsafePath, match="symlink"):
        safefs.write_text(d / "sub" / "f", "x", root=d)
    with pytest.raises(safefs.UnsafePath):
        safefs.makedirs(d / "sub" / "deeper", root=d)
    os.mkfifo(d / "fifo")
    with pytest.raises(safefs.UnsafePath, match="regular"):
        safefs.copy_file(d / "fifo", tmp_path / "copy")
    safefs.remove(d / "sub")  # the link, not what it points at
    assert victim.exists() and not (d / "sub").exists()
    assert not list(d.glob(".*.tmp"))  # no temporary file left behind


# ----------------------------------------------------------------------------------------------
# the site never republishes a received run's HTML

PAYLOAD = "<script>alert('pwned')</script>"


def test_site_regenerates_reports_and_publishes_no_received_html(tmp_path, environment_here, capsys):
    root, base, new = _pair(tmp_path, environment_here)
    for run in (base, new):
        (run / "report.html").write_text(f"<html>{PAYLOAD}</html>")
        (run / "compare.html").write_text(f"<html>{PAYLOAD}</html>")
    _set_column(new, "variant", "<img src=x onerror=alert('pwned')>")
    site = tmp_path / "site"
    assert main(["site", "--root", str(root), "-o", str(site)]) == 0, capsys.readouterr().err
    published = {p.relative_to(site).as_posix(): p.read_text(errors="replace") for p in site.rglob("*") if p.is_file()}
    assert not any(PAYLOAD in text or "alert('pwned')</script>" in text for text in published.values())
    assert not any("<img src=x" in text for text in published.values())
    report = published[f"runs/{NEW_ID}/report.html"]  # the latest run's report, drawn from its data
    assert NEW_ID in report and "&lt;img src=x" in report
    assert not any(name.endswith("compare.html") for name in published)
    index = published["index.html"]
    assert f'href="runs/{NEW_ID}/report.html"' in index and "compare.html" not in index


# ----------------------------------------------------------------------------------------------
# Rich, terminal and Markdown output escaped

CONTROL = "\x1b[2J\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07\x1b]0;title\x07"


@pytest.fixture
def hostile_names(tmp_path, environment_here):
    """NEW's variant holds Rich markup and terminal control sequences; its status ``[/]``; a profile
    of its first case without a trace; BASE's status holds markup too."""
    root, base, new = _pair(tmp_path, environment_here)
    _set_column(new, "variant", f"x[/][link=http://evil.example]{CONTROL}")
    _set_column(new, "status", "[/]")
    _set_column(new, "reason", "[bold red]boom[/] \x1b[31m")
    _set_column(base, "status", "[red]ok[/red][/]")
    cid = pd.read_parquet(new / "results.parquet")["case_id"][0]
    op = {"op": f"aten::[/]{CONTROL}", "group": "[/]", "calls": 1, "self_time_ms": 1.0, "total_time_ms": 1.0,
          "self_share": 1.0, "flops": 0}
    (new / "profile.jsonl").write_text(json.dumps({"case_id": cid, "ops": [op], "profile_s": 0.5}) + "\n")
    return root, base, new


def _clean_output(capsys, status, expected=0):
    out, err = capsys.readouterr()
    assert status == expected and "Traceback" not in out + err, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    return out, err


def test_rich_and_terminal_output_show_markup_and_control_characters_as_text(hostile_names, capsys):
    root, base, new = hostile_names
    for argv in (["compare", str(base), str(new), "--no-html", "--all"], ["show", str(new)],
                 ["history", "--root", str(root)], ["profile", str(new)]):
        out, _ = _clean_output(capsys, main(argv))
        assert "[/]" in out, argv  # shown as text


def test_markdown_cannot_gain_headings_images_html_or_cells(tmp_path, environment_here, capsys):
    _, base, new = _pair(tmp_path, environment_here)
    evil = "host\n# Pwned\n![x](http://evil.example/x.png) <img src=x> `code` *em* $x$"
    _edit_meta(new, lambda m: m["environment"]["machine"].update(hostname=evil, fingerprint="other"))
    _set_column(new, "variant", "a|b|c\n## heading ![i](http://evil.example/i.png)")
    out, _ = _clean_output(capsys, main(["compare", str(base), str(new), "--no-html", "--format", "markdown"]))
    assert [line for line in out.splitlines() if line.startswith("#")] == [out.splitlines()[0]]
    assert "![" not in out and "<img" not in out and "](http" not in out.replace("\\](http", "")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 1 and all(len(re.findall(r"(?<!\\)\|", line)) == 9 for line in rows), rows
    assert "Pwned" in out  # the text is there, as text


def test_escape_functions():
    assert escape.terminal("a\x1b[2Jb\nc\x7f\x9b") == "a\\x1b[2Jb\\x0ac\\x7f\\x9b"
    assert escape.terminal("a\nb", newlines=True) == "a\nb"
    assert escape.terminal("x" * 5000).startswith("x" * 2000) and len(escape.terminal("x" * 5000)) < 2100
    assert escape.rich("[/]") == "\\[/]" and escape.rich("[bold]") == "\\[bold]"
    assert escape.markdown("a|b\n# h ![i](u) <b>\x1b") == "a\\|b \\# h \\!\\[i\\](u) &lt;b&gt;\\\\x1b"
    assert escape.xml("a\x0b\x1bb\x00\ufffe") == "ab"
    assert escape.markdown_code("x`y") == "`x'y`"
    assert re.sub("x", escape.literal("\\1\\g<0>"), "x") == "\\1\\g<0>"


# ----------------------------------------------------------------------------------------------
# the Atom feed stays well-formed


def test_atom_feed_drops_characters_xml_forbids():
    from reports.site import atom_feed

    nasty = "v\x0b\x1b[2J\x00\x08\ufffe<&>"
    regression = {"suite": "s", "fingerprint": nasty, "case_id": "c", "run_id": "r", "label": nasty, "ratio": 1.3,
                  "commit": nasty, "started": "2026-01-01T00:00:00+00:00", "slug": "s", "before": 1.0, "after": 1.3,
                  "hostname": nasty}
    feed = atom_feed([regression], f"title {nasty}", "2026-01-02T00:00:00+00:00", base_url=f"https://x.example/{nasty}")
    root = ET.fromstring(feed.encode())  # well-formed
    title = root.find("{http://www.w3.org/2005/Atom}entry/{http://www.w3.org/2005/Atom}title").text
    assert "v[2J" in title and "<&>" in title


# ----------------------------------------------------------------------------------------------
# one line, never a traceback


def test_backslashes_and_dollars_in_names_draw_as_text(tmp_path, environment_here, capsys):
    root, base, new = _pair(tmp_path, environment_here)
    for run in (base, new):
        _set_column(run, "variant", "a\\1 \\g<0> $x^2$ $\\frac{1}{$ \\")
    for argv in (["report", str(new), "-o", str(tmp_path / "r.html")],
                 ["compare", str(base), str(new), "-o", str(tmp_path / "c.html")],
                 ["trend", "--root", str(root), "-o", str(tmp_path / "t.html")],
                 ["site", "--root", str(root), "-o", str(tmp_path / "site")]):
        status = main(argv)
        out, err = capsys.readouterr()
        assert status == 0 and "Traceback" not in err, (argv, err)
    assert "$x^2$" in (tmp_path / "r.html").read_text()


def test_to_svg_takes_a_title_with_backslashes():
    import matplotlib.pyplot as plt

    from reports.plots import to_svg

    fig, ax = plt.subplots()
    ax.set_title("$\\alpha$ \\1")
    svg = to_svg(fig, "t \\1 \\g<0> $x$")
    assert 'aria-label="t \\1 \\g&lt;0&gt; $x$"' in svg


def test_missing_identity_in_rows_log_is_one_line(tmp_path, environment_here, capsys):
    _, base, new = _pair(tmp_path, environment_here)
    for name in ("results.parquet", "samples.parquet"):
        (new / name).unlink()
    lines = [json.loads(line) for line in (new / "rows.jsonl").read_text().splitlines()]
    del lines[0]["params"]
    (new / "rows.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for argv in (["report", str(new), "-o", str(tmp_path / "r.html")], ["show", str(new)],
                 ["compare", str(base), str(new), "--no-html"], ["export", str(new), "-o", str(tmp_path / "p.json")]):
        assert main(argv) == 2, argv
        assert "params" in _one_line(capsys)


def test_nan_samples_and_huge_values_are_one_line(tmp_path, environment_here, capsys):
    root, base, new = _pair(tmp_path, environment_here)
    samples = pd.read_parquet(new / "samples.parquet")
    samples.loc[0, "time_ms"] = float("nan")
    samples.to_parquet(new / "samples.parquet", index=False)
    assert main(["export", str(new), "-o", str(tmp_path / "p.json")]) == 2
    assert "time_ms" in _one_line(capsys)
    _set_column(base, "time_ms", 1e308)
    for argv in (["report", str(base), "-o", str(tmp_path / "r.html")], ["compare", str(base), str(new), "--no-html"],
                 ["show", str(base)]):
        assert main(argv) == 2, argv
        assert "time_ms" in _one_line(capsys)
    assert main(["trend", "--root", str(root), "-o", str(tmp_path / "t.html")]) in (0, 2)  # the bad run is skipped
    assert "Traceback" not in capsys.readouterr().err


def test_merge_of_columns_of_different_kinds_is_one_line(tmp_path, environment_here, capsys):
    env = environment_here
    a = write_run(tmp_path / "a", tmp_path / "s.toml", [], env, run_id="20260101-000000-crafted-aaaaaa", finished=1)
    b = write_run(tmp_path / "b", tmp_path / "s.toml", [], env, run_id="20260101-000000-crafted-bbbbbb")
    rows = pd.read_parquet(b / "results.parquet").iloc[1:]
    rows["extra"] = 1.5
    rows.to_parquet(b / "results.parquet", index=False)
    rows = pd.read_parquet(a / "results.parquet")
    rows["extra"] = "text"
    rows.to_parquet(a / "results.parquet", index=False)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--allow-partial"]) == 2
    assert "extra" in _one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_an_unknown_recorded_allocator_unless_given(tmp_path, environment_here, capsys):
    run = _interrupted(tmp_path, environment_here)
    _edit_meta(run, lambda m: m["environment"].setdefault("measurement", {}).update(allocator="jemalloc;rm -rf"))
    assert main(["resume", str(run), *RESUME]) == 2
    line = _one_line(capsys)
    assert "allocator" in line and "--allocator" in line
    assert main(["resume", str(run), *RESUME, "--allocator", "default"]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bounds on the work a run directory can ask for


@pytest.mark.parametrize("field, value, flag", [
    ("warmup", 10**7, "bench run SUITE --resume"),
    ("max_time_s", 1e9, "bench run SUITE --resume"),
])
def test_resume_refuses_recorded_timing_beyond_its_bounds(tmp_path, environment_here, capsys, field, value, flag):
    run = _interrupted(tmp_path, environment_here)

    def edit(meta):
        text = meta["suite"]["text"].replace("timing = { warmup = 1,", f"timing = {{ {field} = {value}, warmup = 1,"
                                             if field != "warmup" else f"timing = {{ warmup = {value},")
        meta["suite"]["text"] = text
        meta["suite"]["definition"] = tomllib.loads(text)
    _edit_meta(run, edit)
    assert main(["resume", str(run), *RESUME]) == 2
    line = _one_line(capsys)
    assert field in line and flag in line


def test_resume_refuses_recorded_processes_beyond_its_bound_unless_given(tmp_path, environment_here, capsys):
    run = _interrupted(tmp_path, environment_here)
    _edit_meta(run, lambda m: m["timing"].update(processes=100_000))
    assert main(["resume", str(run), *RESUME]) == 2
    line = _one_line(capsys)
    assert "processes" in line and "--processes" in line
    assert main(["resume", str(run), *RESUME, "--processes", "1"]) == 0, capsys.readouterr().err


def test_shard_counts_are_bounded_and_missing_shards_are_one_short_line(tmp_path, environment_here, capsys):
    from harness.engine.runmeta import MAX_SHARDS

    env = environment_here
    run = write_run(tmp_path / "s1", tmp_path / "s.toml", [], env, run_id="20260101-000000-crafted-aaaaaa")
    _edit_meta(run, lambda m: m.update(shard={"index": 1, "count": 10**6, "cases": 2, "suite_cases": 2}))
    assert main(["merge", str(run), "-o", str(tmp_path / "out")]) == 2
    assert "shard" in _one_line(capsys)
    _edit_meta(run, lambda m: m.update(shard={"index": 1, "count": MAX_SHARDS, "cases": 2, "suite_cases": 2}))
    assert main(["merge", str(run), "-o", str(tmp_path / "out")]) == 2
    line = _one_line(capsys)
    assert len(line) < 600 and f"2-{MAX_SHARDS} of {MAX_SHARDS}" in line
    from harness.engine.shard import ShardError, parse_shard

    for text in (f"1/{10**12}", f"1/{MAX_SHARDS + 1}", "1/" + "9" * 5000):
        with pytest.raises(ShardError, match=f"at most {MAX_SHARDS}"):
            parse_shard(text)


def test_one_line_errors_are_bounded_and_escaped(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"schema_version": 1, "run_id": "x\x1b[2J" + "y" * 100_000}))
    assert main(["show", str(run)]) == 2
    line = _one_line(capsys)
    assert "\x1b" not in line and len(line) < 2500


def test_ray_node_cache_is_private_and_validated(tmp_path, monkeypatch):
    from harness.engine import rayexec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = rayexec.cache_dir()
    assert directory == tmp_path / "cache" / "attention-bench"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    good = {"host": "node-a", "machine_fingerprint": "abc123"}
    (directory / "ok.json").write_text(json.dumps(good))
    assert rayexec._read_identity(directory / "ok.json") == good
    for bad in ({"host": "a", "machine_fingerprint": "b", "extra": "c"}, {"host": "a\x1b", "machine_fingerprint": "b"},
                {"host": "a" * 10_000, "machine_fingerprint": "b"}, ["a"], {"host": 1, "machine_fingerprint": "b"}):
        (directory / "bad.json").write_text(json.dumps(bad))
        assert rayexec._read_identity(directory / "bad.json") is None, bad
    (directory / "link.json").symlink_to(directory / "ok.json")
    assert rayexec._read_identity(directory / "link.json") is None
    os.chmod(directory, 0o755)
    assert stat.S_IMODE(rayexec.cache_dir().stat().st_mode) == 0o700
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(directory)
    directory.symlink_to(elsewhere)
    assert rayexec.cache_dir() is None  # not a private directory: nothing is cached


def test_node_identity_caches_in_the_private_directory(tmp_path, monkeypatch):
    from harness.engine import rayexec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(rayexec, "_NODE", {})
    monkeypatch.setattr(rayexec, "_probe_identity", lambda: {"host": "probed", "machine_fingerprint": "fp"})
    cache = rayexec._cache_file()
    if cache is None:
        pytest.skip("no boot id here")
    cache.write_text(json.dumps({"host": "planted", "machine_fingerprint": "fp", "evil": 1}))
    assert rayexec.node_identity()["host"] == "probed"  # a malformed cache is ignored, and replaced
    assert json.loads(cache.read_text()) == {"host": "probed", "machine_fingerprint": "fp"}


def test_worker_logs_in_the_temp_directory_are_removed_on_success():
    from harness.core.cases import Case
    from harness.core.config import RunSettings, TimingConfig
    from harness.engine.executors import WorkerPool

    pool = WorkerPool(RunSettings(TimingConfig(warmup=1, min_time_s=0.0, min_reps=2, max_reps=2), threads=1))
    result = pool.run(Case("naive", {}, heads=2, kv_heads=2, seq_len=16, head_dim=16), time_only=True)
    log = pool.log_path
    assert result.row["status"] == "ok" and log is not None and log.exists()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    pool.close()
    assert not log.exists()

