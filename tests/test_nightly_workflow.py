"""The nightly workflow: valid against GitHub's workflow schema, and runs what a user would run."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (test extra) is needed to read the workflow")

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"


@pytest.fixture(scope="module")
def workflow():
    return yaml.safe_load(WORKFLOW.read_text())


def _schema_check(path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test extra) validates the workflow schema")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True, text=True, timeout=120,
    )


def test_workflow_matches_the_github_workflow_schema(tmp_path, workflow):
    proc = _schema_check(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the same check rejects a broken workflow (so the check above can fail)
    broken = copy.deepcopy(workflow)
    broken[True if True in broken else "on"] = {"schedule": "nightly"}  # schedule must be a list of crons
    del broken["jobs"]["cpu"]["runs-on"]
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert _schema_check(bad).returncode != 0


def _triggers(workflow):
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true


def _script(job):
    """The job's shell lines, with backslash continuations joined."""
    text = "\n".join(step.get("run", "") for step in job["steps"])
    return re.sub(r"\\\n\s*", " ", text)


def test_scheduled_and_manual(workflow):
    on = _triggers(workflow)
    assert "workflow_dispatch" in on
    (cron,) = [s["cron"] for s in on["schedule"]]
    assert len(cron.split()) == 5


def test_cpu_job_installs_like_the_readme_runs_compares_and_uploads(workflow):
    job = workflow["jobs"]["cpu"]
    script = _script(job)
    readme = (ROOT / "README.md").read_text()
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ."
    assert install in readme and install in script
    assert "bench run suites/nightly-cpu.toml -o results/nightly-cpu" in script
    compare = re.search(r"bench compare baseline results/nightly-cpu[^\n]*", script).group(0)
    assert "--fail-on-regression" in compare and "-o results/nightly-cpu/compare.html" in compare
    assert "--confirm" in compare  # re-runs the changed cases, the baseline's commit beside tonight's...
    checkout = [s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout")]
    assert checkout[0]["with"]["fetch-depth"] == 0  # ...which needs the history, not a shallow clone
    assert "set -o pipefail" in script  # the exit status survives the tee into the job summary
    upload = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert len(upload) == 1 and upload[0]["if"] == "always()"
    paths = upload[0]["with"]["path"]
    assert "results/nightly-cpu/report.html" in paths and "results/nightly-cpu/compare.html" in paths


def test_gpu_job_runs_on_a_self_hosted_label_only_when_one_exists(workflow):
    job = workflow["jobs"]["gpu"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert "HAS_GPU_RUNNER" in job["if"]
    script = _script(job)
    assert "bench run suites/nightly-gpu.toml" in script
    assert "bench compare baseline results/nightly-gpu --confirm --fail-on-regression" in script
    checkout = [s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout")]
    assert checkout[0]["with"]["fetch-depth"] == 0


def test_the_suites_it_runs_exist_and_load():
    from harness.engine.suite import expand_cases, load_suite

    cpu = load_suite(ROOT / "suites" / "nightly-cpu.toml")
    gpu = load_suite(ROOT / "suites" / "nightly-gpu.toml")
    assert cpu.name == "nightly-cpu" and gpu.name == "nightly-gpu"
    cpu_cases = expand_cases(cpu)
    assert {c.device for c in cpu_cases} == {"cpu"} and {c.device for c in expand_cases(gpu)} == {"cuda"}
    assert {c.variant for c in cpu_cases} == {"naive", "sdpa", "sliding_window", "linear"}
    assert {c.params.get("backend") for c in cpu_cases if c.variant == "sdpa"} == {"math", "flash"}
    assert cpu.timing.min_reps >= 10  # enough samples a case for the test and its interval to mean something


def _index(steps, predicate) -> int:
    (i,) = [i for i, s in enumerate(steps) if predicate(s)]
    return i


def _checks_out_history(step) -> bool:
    return step.get("uses", "").startswith("actions/checkout") and step.get("with", {}).get("ref") == "bench-results" \
        and step["with"].get("path") == "history"


@pytest.mark.parametrize("name, suite", [("cpu", "nightly-cpu"), ("gpu", "nightly-gpu")])
def test_each_job_pushes_its_run_to_the_history_branch(workflow, name, suite):
    job = workflow["jobs"][name]
    assert job["permissions"]["contents"] == "write"
    steps = job["steps"]
    compare = _index(steps, lambda s: "bench compare baseline" in s.get("run", ""))
    ensure = _index(steps, lambda s: s.get("run", "").strip() == ".github/scripts/results-history.sh ensure")
    checkout = _index(steps, _checks_out_history)
    store = _index(steps, lambda s: s.get("run", "").strip()
                   == f".github/scripts/results-history.sh store results/{suite} history")
    assert compare < ensure < checkout < store
    for i in (ensure, checkout, store):  # also on a night the comparison fails the job
        assert steps[i]["if"] == "${{ !cancelled() }}"
    script = ROOT / ".github" / "scripts" / "results-history.sh"
    assert os.access(script, os.X_OK) and "git push" in script.read_text()  # tests/test_site.py runs it


def test_site_job_builds_uploads_and_publishes_only_when_asked(workflow):
    site = workflow["jobs"]["site"]
    assert set(site["needs"]) == {"cpu", "gpu"} and site["if"] == "${{ !cancelled() }}"
    steps = site["steps"]
    assert steps[0]["uses"].startswith("actions/checkout") and steps[0]["with"]["fetch-depth"] == 0
    _index(steps, _checks_out_history)
    assert "bench site --history history -o site" in _script(site)
    docs = steps[_index(steps, lambda s: "mkdocs build" in s.get("run", ""))]
    assert "--strict --site-dir site/docs" in docs["run"] and docs["continue-on-error"] is True  # beside the results
    upload = _index(steps, lambda s: s.get("uses", "").startswith("actions/upload-artifact"))
    assert steps[upload]["with"]["path"] == "site"
    pages = steps[_index(steps, lambda s: s.get("uses", "").startswith("actions/upload-pages-artifact"))]
    assert pages["if"] == "${{ vars.PUBLISH_SITE == 'true' }}" and pages["with"]["path"] == "site"
    publish = workflow["jobs"]["publish"]
    assert publish["needs"] == "site" and "vars.PUBLISH_SITE == 'true'" in publish["if"]
    assert publish["permissions"] == {"pages": "write", "id-token": "write"}
    assert publish["environment"]["name"] == "github-pages"
    deploy = publish["steps"][_index(publish["steps"], lambda s: s.get("uses", "").startswith("actions/deploy-pages"))]
    assert "deployment.outputs.page_url" in publish["environment"]["url"] and deploy["id"] == "deployment"


@pytest.mark.parametrize("name, suite, device", [("cpu", "nightly-cpu", "cpu"), ("gpu", "nightly-gpu", "cuda")])
def test_each_job_calibrates_before_it_runs_with_a_cache_per_runner(workflow, name, suite, device):
    """A fresh checkout has no results/calibration: without this every nightly row's pct_of_peak is empty."""
    from harness.engine.suite import load_suite

    steps = workflow["jobs"][name]["steps"]
    fingerprint = _index(steps, lambda s: s.get("id") == "machine")
    cache = _index(steps, lambda s: s.get("uses", "").startswith("actions/cache"))
    calibrate = _index(steps, lambda s: "bench calibrate" in s.get("run", ""))
    run = _index(steps, lambda s: f"bench run suites/{suite}.toml" in s.get("run", ""))
    assert fingerprint < cache < calibrate < run
    assert "current_fingerprint" in steps[fingerprint]["run"] and "GITHUB_OUTPUT" in steps[fingerprint]["run"]
    with_ = steps[cache]["with"]
    assert with_["path"] == "results/calibration"
    assert "runner.name" in with_["key"] and "steps.machine.outputs.fingerprint" in with_["key"]
    command = re.search(r"bench calibrate[^\n#]*", steps[calibrate]["run"]).group(0).split()
    assert "--device" in command and command[command.index("--device") + 1] == device
    threads = load_suite(ROOT / "suites" / f"{suite}.toml").timing.threads
    if threads:  # CPU figures are kept per thread count: calibrate at the suite's
        assert command[command.index("--threads") + 1] == str(threads)
