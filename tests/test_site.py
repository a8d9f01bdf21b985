"""The results history and site: twelve simulated nights stored in a bench-results branch by the
nightly workflow's own script, then ``bench site`` over a checkout of that branch.

The nights are copies of one real ``bench run`` (the shared tiny run) with planted series: one case
exactly flat, one 20% slower from the seventh night (index 6) on, one with noise only (6%), the rest
with 1% noise. A scratch git repository plays the project (a commit per night, a baseline promoted
and committed on night 4) and a bare repository plays GitHub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

from tests.history_sim import night_run, planted_factors, timed_cases
from tests.scratch_repo import git
from tests.test_browser import browser, needs_chromium  # noqa: F401  (the module-scoped Chromium fixture)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".github" / "scripts" / "results-history.sh"
NIGHTS, STEP_AT, BASELINE_AT = 12, 6, 3
PROMOTED = f"2026-01-{BASELINE_AT + 1:02d}T09:00:00+00:00"
ATOM = "{http://www.w3.org/2005/Atom}"


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def workflow_night(work: Path, origin: Path, run_dir: Path) -> None:
    """What the nightly job does after its run: ensure the branch, check it out into history/, store."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    step = subprocess.run(["bash", str(SCRIPT), "ensure"], cwd=work, env=env, capture_output=True, text=True)
    assert step.returncode == 0, step.stderr
    shutil.rmtree(work / "history", ignore_errors=True)  # a fresh runner each night: actions/checkout
    git(work, "clone", "-q", "--branch", "bench-results", str(origin), "history")
    step = subprocess.run(["bash", str(SCRIPT), "store", str(run_dir.relative_to(work)), "history"], cwd=work,
                          env=env, capture_output=True, text=True)
    assert step.returncode == 0, step.stdout + step.stderr


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, tiny_run):
    src = tiny_run
    base = tmp_path_factory.mktemp("nightly")
    origin, work = base / "origin.git", base / "work"
    git(base, "init", "-q", "--bare", str(origin))
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", str(origin))
    (work / "README.md").write_text("the project\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "the project")
    cases = timed_cases(src)
    flat, step, noisy = cases[0], cases[1], cases[2]
    factors = planted_factors(cases, NIGHTS, flat=flat, step=step, noisy=noisy, step_at=STEP_AT)
    commits, run_ids, baseline_commit = [], [], None
    for night in range(NIGHTS):
        git(work, "commit", "-q", "--allow-empty", "-m", f"change {night}")
        commits.append(git(work, "rev-parse", "HEAD"))
        run_dir = work / "results" / "nightly-cpu"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_ids.append(f"202601{night + 1:02d}-031700-tiny-report-n{night:02d}")
        night_run(src, run_dir, run_id=run_ids[-1], started=f"2026-01-{night + 1:02d}T03:17:00+00:00",
                  commit=commits[-1], factors=factors[night])
        if night == BASELINE_AT:  # a speed-up was accepted: promote tonight's run and commit it
            proc = bench("baseline", "set", str(run_dir), "--root", "results", cwd=work)
            assert proc.returncode == 0, proc.stderr
            record = work / "results" / "baseline" / "tiny-report" / "baseline.json"  # promoted that morning
            record.write_text(json.dumps(dict(json.loads(record.read_text()), promoted=PROMOTED)))
            git(work, "add", "results/baseline")
            git(work, "commit", "-q", "-m", "baseline tiny-report")
            baseline_commit = git(work, "rev-parse", "HEAD")
        if night == NIGHTS - 1:
            proc = bench("compare", "baseline", str(run_dir), "--root", "results", "-o", str(run_dir / "compare.html"),
                         cwd=work)
            assert (run_dir / "compare.html").exists(), proc.stderr
        workflow_night(work, origin, run_dir)
        if night >= NIGHTS - 3:  # a second suite on another machine, steady
            other = work / "results" / "nightly-other"
            shutil.rmtree(other, ignore_errors=True)
            night_run(src, other, run_id=f"202601{night + 1:02d}-041700-a-other-n{night:02d}",
                      started=f"2026-01-{night + 1:02d}T04:17:00+00:00", commit=commits[-1], factors={},
                      suite="a-other", fingerprint="0ther0machine")
            workflow_night(work, origin, other)
    git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
    checkout = base / "site-job"
    checkout.mkdir()
    git(checkout, "clone", "-q", "--branch", "bench-results", str(origin), "history")
    site = base / "site"
    proc = bench("site", "--history", str(checkout / "history"), "--root", str(work / "results"), "-o", str(site),
                 cwd=work)
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(src=src, origin=origin, work=work, history=checkout / "history", site=site, out=proc.stdout,
                           commits=commits, run_ids=run_ids, flat=flat, step=step, noisy=noisy,
                           baseline_commit=baseline_commit, summary=json.loads((site / "site.json").read_text()))


def test_the_history_branch_holds_every_night_as_its_own_directory(nightly):
    files = git(nightly.origin, "ls-tree", "-r", "--name-only", "bench-results").splitlines()
    runs = {f.split("/")[1] for f in files}
    assert len(runs) == NIGHTS + 3 and set(nightly.run_ids) <= runs
    for run_id in nightly.run_ids:
        for name in ("run.json", "results.parquet", "samples.parquet", "report.html"):
            assert f"runs/{run_id}/{name}" in files
    assert f"runs/{nightly.run_ids[-1]}/compare.html" in files
    log = git(nightly.origin, "log", "--format=%s", "bench-results").splitlines()
    assert len(log) == NIGHTS + 3 + 1 and log[-1].startswith("bench-results:")  # one commit a run, on the orphan root
    assert f"tiny-report: {nightly.run_ids[0]}" in log
    # the branch shares no history with the project
    proc = subprocess.run(["git", "-C", str(nightly.origin), "merge-base", "main", "bench-results"],
                          capture_output=True)
    assert proc.returncode == 1


def test_bench_history_reads_a_checkout_of_the_branch(nightly):
    proc = bench("history", "--from", str(nightly.history), "--root", str(nightly.work / "results"), "--json",
                 cwd=nightly.work)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["run_id"] for r in listed if r["suite"] == "tiny-report"] == nightly.run_ids
    assert len(listed) == NIGHTS + 3
    missing = bench("history", "--from", str(nightly.work / "no-such-dir"), cwd=nightly.work)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "no-such-dir" in missing.stderr


def test_the_step_is_found_at_its_commit_and_nothing_in_flat_or_noisy_series(nightly):
    (tiny,) = [g for g in nightly.summary["groups"] if g["suite"] == "tiny-report"]
    assert tiny["runs"] == nightly.run_ids and tiny["state"] == "regressed"
    (step,) = tiny["steps"]
    assert step["case_id"] == nightly.step
    assert step["run_id"] == nightly.run_ids[STEP_AT] and step["commit"] == nightly.commits[STEP_AT][:10]
    assert step["ratio"] == pytest.approx(1.2, abs=0.03)
    stepped = {s["case_id"] for g in nightly.summary["groups"] for s in g["steps"]}
    assert nightly.flat not in stepped and nightly.noisy not in stepped
    (other,) = [g for g in nightly.summary["groups"] if g["suite"] == "a-other"]
    assert other["steps"] == [] and other["state"] == "ok" and other["fingerprint"] == "0ther0machine"
    assert nightly.summary["regressions"] == 1
    assert "1 regression(s)" in nightly.out


def test_the_atom_feed_has_exactly_the_regression(nightly):
    feed = ET.parse(nightly.site / "feed.xml").getroot()
    assert feed.tag == f"{ATOM}feed"
    for tag in ("id", "title", "updated"):
        assert feed.find(f"{ATOM}{tag}").text
    assert feed.find(f"{ATOM}author/{ATOM}name").text
    (entry,) = feed.findall(f"{ATOM}entry")
    assert entry.find(f"{ATOM}id").text.startswith("urn:uuid:")
    assert nightly.commits[STEP_AT][:10] in entry.find(f"{ATOM}title").text
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", entry.find(f"{ATOM}updated").text)
    href = entry.find(f"{ATOM}link").get("href")
    page, anchor = href.split("#")
    assert f'id="{anchor}"' in (nightly.site / page).read_text()


def _links(page: Path) -> list[str]:
    return re.findall(r'href="([^"]+)"', page.read_text())


def test_every_page_exists_and_every_link_resolves(nightly):
    site = nightly.site
    pages = ["index.html", "regressions.html", "suite-tiny-report.html", "suite-a-other.html"]
    for name in pages + ["feed.xml", "site.json"]:
        assert (site / name).is_file(), name
    # the latest run's report of each series, regenerated from its data; never a run directory's own
    # HTML (report.html, compare.html), which the history may have from anyone
    latest = site / "runs" / nightly.run_ids[-1] / "report.html"
    assert latest.is_file() and nightly.run_ids[-1] in latest.read_text()
    for run_id in nightly.run_ids[:-1]:
        assert not (site / "runs" / run_id).exists()
    assert not list(site.rglob("compare.html"))
    checked = 0
    for name in pages:
        for href in _links(site / name):
            parts = urlsplit(href)
            assert not parts.scheme and not parts.netloc, f"{name} links off the site: {href}"
            target = (site / name).parent / unquote(parts.path) if parts.path else site / name
            assert target.is_file(), f"{name}: {href}"
            if parts.fragment and target.suffix == ".html":
                assert f'id="{parts.fragment}"' in target.read_text(), f"{name}: {href}"
            checked += 1
    assert checked > 40
    index = (site / "index.html").read_text()
    table = index[index.index('id="suites-table"'):]
    assert table.index("suite-tiny-report.html") < table.index("suite-a-other.html")  # regressed first
    assert f'href="runs/{nightly.run_ids[-1]}/report.html"' in index and "compare.html" not in index


def test_suite_page_trends_hover_and_baseline_changes(nightly):
    page = (nightly.site / "suite-tiny-report.html").read_text()
    charts = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(charts) == len(timed_cases(nightly.src))
    for svg in charts:  # a hover text on every point: run, commit, median and interval
        points = re.findall(r"<use [^>]*><title>([^<]*)</title></use>", svg)
        assert len(points) == NIGHTS and all("median" in t and "commit" in t for t in points)
    step_chart = next(svg for svg in charts if nightly.commits[STEP_AT][:10] in svg)
    assert "+20" in step_chart or "+19" in step_chart
    (tiny,) = [g for g in nightly.summary["groups"] if g["suite"] == "tiny-report"]
    (event,) = tiny["baselines"]
    assert event["run_id"] == nightly.run_ids[BASELINE_AT] and event["recorded_in"] == nightly.baseline_commit
    assert f"run {nightly.run_ids[BASELINE_AT]} became the baseline" in page
    assert f"baseline → {nightly.run_ids[BASELINE_AT]} (promoted 2026-01-{BASELINE_AT + 1:02d} 09:00Z)" in page


def test_site_refuses_a_directory_it_did_not_build(nightly, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = bench("site", "--history", str(nightly.history), "-o", str(tmp_path), cwd=nightly.work)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bench site" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@needs_chromium
@pytest.mark.parametrize("name", ["index.html", "suite-tiny-report.html", "regressions.html"])
def test_site_pages_in_chromium(browser, nightly, name, tmp_path):  # noqa: F811
    page = nightly.site / name
    browser.open(page)
    assert browser.problems() == [], browser.problems()
    assert browser.requested_urls() == [page.resolve().as_uri()]  # nothing fetched: no network, no other file
    charts = browser.evaluate("Array.from(document.querySelectorAll('svg.chart')).map(s => {"
                              " const r = s.getBoundingClientRect(); return [r.width, r.height]; })")
    if name.startswith("suite-"):
        assert len(charts) == len(timed_cases(nightly.src))
        assert all(w > 500 and h > 100 for w, h in charts), charts
    assert browser.evaluate("document.querySelectorAll('nav.sitenav a').length") >= 4
    browser.screenshot(tmp_path / (page.stem + ".png"))
    assert browser.problems() == [], browser.problems()


def test_two_jobs_appending_the_same_night_both_land(tmp_path):
    """The CPU and GPU jobs push to the branch at about the same time: the later push is rebased."""
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    git(tmp_path, "clone", "-q", str(origin), "work")
    git(work, "commit", "-q", "--allow-empty", "-m", "the project")
    git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
    assert subprocess.run(["bash", str(SCRIPT), "ensure"], cwd=work, capture_output=True).returncode == 0
    for job in ("cpu", "gpu"):  # both check out the branch before either pushes
        git(work, "clone", "-q", "--branch", "bench-results", str(origin), f"history-{job}")
    for job in ("cpu", "gpu"):
        run = work / "results" / job
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"run_id": f"20260101-031700-{job}", "suite": {"name": job}}))
        (run / "results.parquet").write_bytes(b"stand-in")
        proc = subprocess.run(["bash", str(SCRIPT), "store", f"results/{job}", f"history-{job}"], cwd=work,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    files = git(origin, "ls-tree", "-r", "--name-only", "bench-results").splitlines()
    assert {"runs/20260101-031700-cpu/run.json", "runs/20260101-031700-gpu/run.json"} <= set(files)
    again = subprocess.run(["bash", str(SCRIPT), "store", "results/cpu", "history-gpu"], cwd=work, capture_output=True,
                           text=True)
    assert again.returncode == 0 and "already in bench-results" in again.stdout  # a run is never rewritten
