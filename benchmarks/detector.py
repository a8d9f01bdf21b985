"""How honest is ``bench compare``? False alarms with no change (A/A) and detection of a 10% slowdown.

    python benchmarks/detector.py --aa 20 --slow 20

Sets up what a nightly job sees, in a scratch git repository holding this
project's working tree (``tests/scratch_repo.py``), with the nightly suite
(``suites/nightly-cpu.toml`` unless ``--suite``) plus probe variants from the
test-only plugin ``tests/plugins/slow_sdpa.py``, at ``--probe-lengths`` (default
512, 1024 and 2048), causal and not as the suite sweeps: ``--probe`` names which,
any of ``flash`` (``slow_sdpa``, SDPA's flash backend), ``math`` (``slow_sdpa``,
SDPA's math backend) and ``naive`` (``slow_naive``: the dense ``naive`` variant,
the one whose time moved most from process to process). Two commits: **A**, the
project as it is, and **B**, which changes one line of the plugin so that every
probe does 10% more attention work (``--extra``) under an unchanged case key: a
real regression, arriving the way real ones do. Then, each run a fresh ``bench run`` process exactly as the
nightly job runs it:

* one baseline run at A;
* ``--aa N`` runs at A again (no change at all), each compared with the baseline;
* ``--slow N`` runs at B, each compared with the baseline; the A/A and slowdown
  runs alternate, so a drift of the machine over the session affects both alike.

Each comparison is made twice, as ``bench compare`` makes it: from the stored
samples alone (the screen), and then with ``--confirm`` (what the nightly job
uses: the suspect cases are re-run, BASE's commit and NEW's interleaved in fresh
processes, and the re-run decides their verdicts). For both it prints

* the false-alarm rate: A/A comparisons that reported any regression (the
  nightly job would have failed), and the share of all unchanged case
  comparisons called regressed or improved;
* the detection rate: slowed probe cases called ``regressed`` in time, and the
  slowdown measured for the probe (median ratio), so "10%" is checked rather
  than assumed.

Goal: no false alarm in 20 A/A comparisons, and at least 95% of the
10% slowdowns detected. A suite run takes about 30 s on 2 cores, and a
confirmation a few seconds per case it re-runs plus 16 worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLUGIN = "tests/plugins/slow_sdpa.py"
#: ``--probe`` choices: (variant, its parameters).
PROBES = {"flash": ("slow_sdpa", {"backend": "flash"}), "math": ("slow_sdpa", {"backend": "math"}),
          "naive": ("slow_naive", {})}
PROBE_VARIANTS = frozenset(name for name, _ in PROBES.values())
FLAGGED = ("regressed", "improved", "now failing")


def derived_suite(suite: Path, probe_lengths: list[int], probes: list[str] = ("flash",)) -> str:
    """The suite's text plus the plugin and the probe variants (``probes``: keys of :data:`PROBES`)
    at the given lengths.

    The result lives at the scratch repository's top, so the plugin path is relative to it."""
    import tomllib

    text = suite.read_text()
    raw = tomllib.loads(text)
    plugins = list(raw.get("plugins", [])) + [PLUGIN]
    # top-level keys come before the first table: drop the suite's own name and plugins lines there
    first_table = re.search(r"(?m)^\s*\[", text)
    split = first_table.start() if first_table else len(text)
    top, rest = text[:split], text[split:]
    if "plugins" in raw and re.search(r"(?m)^\s*plugins\s*=\s*\[[^\]]*$", top):
        raise SystemExit(f"{suite}: write its plugins list on one line for the detector")
    top = re.sub(r"(?m)^\s*(plugins|name)\s*=.*$", "", top)
    head = f'name = "detector-{raw.get("name", suite.stem)}"\nplugins = {json.dumps(plugins)}\n'
    probe = ""
    for key in probes:
        name, params = PROBES[key]
        probe += f'\n[[variant]]\nname = "{name}"\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in params.items())
        probe += f"seq_len = {json.dumps(probe_lengths)}\n"
    return head + top + rest + probe


def setup_repo(work: Path, suite: Path, probe_lengths: list[int], extra: float,
               probes: list[str] = ("flash",)) -> tuple[Path, str, str]:
    """The scratch repository and its two commits (A: as is; B: the probe does ``extra`` more work)."""
    from tests.scratch_repo import commit_change, git, make_scratch_repo

    repo = work / "repo"
    if (repo / ".git").is_dir():
        return repo, git(repo, "rev-parse", "fast"), git(repo, "rev-parse", "slow")
    make_scratch_repo(repo)
    (repo / "detector.toml").write_text(derived_suite(suite, probe_lengths, probes))
    git(repo, "add", "detector.toml")
    git(repo, "commit", "-q", "-m", "detector suite")
    a = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "fast")
    b = commit_change(repo, PLUGIN, r"^EXTRA_WORK = 0\.0$", f"EXTRA_WORK = {extra!r}",
                      f"probes: {extra:.0%} more work")
    git(repo, "tag", "slow")
    return repo, a, b


def bench_run(repo: Path, commit: str, out: Path) -> float:
    from tests.scratch_repo import git

    git(repo, "checkout", "-q", commit)
    env = dict(os.environ, PYTHONPATH=str(repo))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "detector.toml", "-o", str(out), "--quiet", "--no-report"],
        cwd=repo, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"bench run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def compare(repo: Path, base: Path, new: Path, confirm_rounds: int | None = None):
    """(cases table, confirm result) of ``bench compare BASE NEW`` run as the nightly job runs it, in
    the scratch repository (whose commits ``--confirm`` re-runs), from the stored samples alone or
    with ``--confirm`` (``confirm_rounds`` rounds per side)."""
    import pandas as pd

    args = [sys.executable, "-m", "harness", "compare", str(base), str(new), "--format", "json", "--no-html"]
    if confirm_rounds:
        # the checkout may be at A while a run was made at B (its descendant): vouch for B's history
        args += ["--confirm", "--confirm-rounds", str(confirm_rounds), "--confirm-branch", "slow"]
    # the confirmation's progress (its rounds) goes to this script's stderr as it happens
    proc = subprocess.run(args, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), stdout=subprocess.PIPE,
                          stderr=None if confirm_rounds else subprocess.PIPE, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"bench compare failed ({proc.returncode})" + (f":\n{proc.stderr[-2000:]}" if proc.stderr else ""))
    data = json.loads(proc.stdout)
    return pd.DataFrame(data["cases"]), data.get("confirm") or {}


def tally(table, slowed: bool) -> dict:
    """What one comparison's verdicts say: alarms, flagged unchanged cases, probe detections."""
    import pandas as pd

    is_probe = table["variant"].isin(PROBE_VARIANTS)
    flagged = table["verdict"].isin(FLAGGED)
    unchanged = ~is_probe if slowed else pd.Series(True, index=table.index)
    probes = table[is_probe]
    return {
        "alarm": bool((table.loc[unchanged, "verdict"].isin(["regressed", "now failing"])).any()),
        "unchanged_cases": int(unchanged.sum()),
        "unchanged_flagged": int((flagged & unchanged).sum()),
        "probe_cases": int(len(probes)) if slowed else 0,
        "probe_detected": int((probes["time_verdict"] == "regressed").sum()) if slowed else 0,
        # the worst miss: a slowed probe called faster (goal: never)
        "probe_improved": int((probes["time_verdict"] == "improved").sum()) if slowed else 0,
        # the measurement could not decide (said so), or called a slowed probe unchanged (a miss)
        "probe_inconclusive": int((probes["time_verdict"] == "inconclusive").sum()) if slowed else 0,
        "probe_unchanged": int((probes["time_verdict"] == "unchanged").sum()) if slowed else 0,
        "unchanged_inconclusive": int(((table["verdict"] == "inconclusive") & unchanged).sum()),
        "probe_ratios": probes["time_ratio"].dropna().tolist(),
        "flagged": table.loc[flagged, ["label", "verdict", "time_ratio"]].to_dict("records"),
        # each probe's verdict and, after --confirm, what the re-run measured (to explain a miss)
        "probes": probes.reindex(columns=["label", "time_verdict", "time_ratio", "confirm_ratio", "confirm_ci_low",
                                          "confirm_ci_high", "confirm_rounds"]).to_dict("records"),
    }


def summarise(results: list[dict], stage: str) -> dict:
    aa = [r[stage] for r in results if r["kind"] == "aa"]
    slow = [r[stage] for r in results if r["kind"] == "slow"]
    out = {
        "aa_comparisons": len(aa),
        "aa_comparisons_with_a_regression": sum(t["alarm"] for t in aa),
        "aa_case_comparisons": sum(t["unchanged_cases"] for t in aa),
        "aa_cases_flagged": sum(t["unchanged_flagged"] for t in aa),
        "slow_comparisons": len(slow),
        "slow_comparisons_with_a_false_regression": sum(t["alarm"] for t in slow),
        "unchanged_cases_in_slow_runs": sum(t["unchanged_cases"] for t in slow),
        "unchanged_cases_in_slow_runs_flagged": sum(t["unchanged_flagged"] for t in slow),
        "slow_probe_cases": sum(t["probe_cases"] for t in slow),
        "slow_probe_cases_detected": sum(t["probe_detected"] for t in slow),
        "slow_probe_cases_called_improved": sum(t["probe_improved"] for t in slow),
        "slow_probe_cases_inconclusive": sum(t.get("probe_inconclusive", 0) for t in slow),
        "slow_probe_cases_called_unchanged": sum(t.get("probe_unchanged", 0) for t in slow),
        "aa_cases_inconclusive": sum(t.get("unchanged_inconclusive", 0) for t in aa),
        "unchanged_cases_in_slow_runs_inconclusive": sum(t.get("unchanged_inconclusive", 0) for t in slow),
    }
    out["aa_false_alarm_rate"] = out["aa_comparisons_with_a_regression"] / len(aa) if aa else None
    out["detection_rate"] = (out["slow_probe_cases_detected"] / out["slow_probe_cases"]
                             if out["slow_probe_cases"] else None)
    return out


def describe(name: str, s: dict) -> str:
    lines = [f"{name}:"]
    if s["aa_comparisons"]:
        lines.append(f"  A/A: {s['aa_comparisons_with_a_regression']} of {s['aa_comparisons']} comparisons reported a "
                     f"regression (false-alarm rate {s['aa_false_alarm_rate']:.0%}); {s['aa_cases_flagged']} of "
                     f"{s['aa_case_comparisons']} case comparisons flagged regressed/improved, "
                     f"{s['aa_cases_inconclusive']} inconclusive")
    if s["slow_comparisons"]:
        lines.append(f"  slowdown: {s['slow_probe_cases_detected']} of {s['slow_probe_cases']} slowed probe cases "
                     f"detected (detection rate {s['detection_rate']:.0%}), "
                     f"{s['slow_probe_cases_called_improved']} called improved, "
                     f"{s['slow_probe_cases_inconclusive']} inconclusive, "
                     f"{s['slow_probe_cases_called_unchanged']} called unchanged (missed); "
                     f"{s['slow_comparisons_with_a_false_regression']} of {s['slow_comparisons']} comparisons also "
                     f"called an unchanged case regressed; {s['unchanged_cases_in_slow_runs_flagged']} of "
                     f"{s['unchanged_cases_in_slow_runs']} unchanged cases flagged")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aa", type=int, default=20, metavar="N", help="A/A comparisons (default 20)")
    p.add_argument("--slow", type=int, default=20, metavar="N", help="slowdown comparisons (default 20)")
    p.add_argument("--extra", type=float, default=0.10, help="extra work of the slowed probe (default 0.10 = 10%%)")
    p.add_argument("--suite", type=Path, default=ROOT / "suites" / "nightly-cpu.toml", help="suite to run")
    p.add_argument("--probe-lengths", default="512,1024,2048",
                   help="sequence lengths of the probes (default 512,1024,2048)")
    p.add_argument("--probe", default="flash,math,naive",
                   help=f"comma-separated probes, of {', '.join(PROBES)} (default all)")
    p.add_argument("--rounds", type=int, default=8, help="--confirm rounds per side (default 8, as bench compare)")
    p.add_argument("--work", type=Path, help="directory for the repository and runs (default: a temporary one, "
                                             "removed); runs already there are reused")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON (after each comparison)")
    from benchmarks.run_tables import add_json_option
    add_json_option(p, "--docs-json")
    args = p.parse_args(argv)
    if args.aa < 0 or args.slow < 0 or args.aa + args.slow == 0:
        p.error("--aa and --slow must be >= 0 and not both 0")
    probes = [x.strip() for x in args.probe.split(",") if x.strip()]
    if not probes or any(x not in PROBES for x in probes):
        p.error(f"--probe: choose from {', '.join(PROBES)}, got {args.probe!r}")

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="detector-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    repo, fast, slow = setup_repo(work, args.suite, [int(x) for x in args.probe_lengths.split(",")], args.extra,
                                  probes)
    plan = [("base", "base", fast)]
    for i in range(max(args.aa, args.slow)):
        if i < args.aa:
            plan.append((f"aa-{i:02d}", "aa", fast))
        if i < args.slow:
            plan.append((f"slow-{i:02d}", "slow", slow))
    print(f"{len(plan)} runs of {args.suite.name} + probes {', '.join(probes)} in {repo}", file=sys.stderr)
    results: list[dict] = []
    for n, (name, kind, commit) in enumerate(plan, 1):
        out = work / "runs" / name
        if (out / "run.json").exists():
            print(f"[{n}/{len(plan)}] {name}: reusing {out}", file=sys.stderr)
        else:
            wall = bench_run(repo, commit, out)
            print(f"[{n}/{len(plan)}] {name} (commit {'B, slowed' if commit == slow else 'A'}): {wall:.0f} s",
                  file=sys.stderr)
        if kind == "base":
            continue
        cases, _ = compare(repo, work / "runs" / "base", out)
        screen = tally(cases, kind == "slow")
        t0 = time.monotonic()
        cases, result = compare(repo, work / "runs" / "base", out, confirm_rounds=args.rounds)
        confirmed = tally(cases, kind == "slow")
        print(f"    screen flagged {len(screen['flagged'])}; confirm ({time.monotonic() - t0:.0f} s): "
              f"{result.get('message', 'nothing to confirm')}", file=sys.stderr)
        results.append({"run": name, "kind": kind, "screen": screen, "confirm": confirmed,
                        "confirm_result": result, "confirm_s": time.monotonic() - t0})
        figures = {
            "suite": str(args.suite), "extra_work": args.extra, "rounds": args.rounds,
            "screen": summarise(results, "screen"), "confirm": summarise(results, "confirm"),
            "probe_ratio_slow_median": statistics.median(
                [x for r in results if r["kind"] == "slow" for x in r["screen"]["probe_ratios"]] or [float("nan")]),
            "probe_ratio_aa_median": statistics.median(
                [x for r in results if r["kind"] == "aa" for x in r["screen"]["probe_ratios"]] or [float("nan")]),
            "confirm_seconds": [r["confirm_s"] for r in results],
            "confirm_suspects": [r["confirm_result"].get("suspects", 0) for r in results],
            "details": results,
        }
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=str))

    print()
    print(f"probe slowdown measured (median ratio of the stored runs): ×{figures['probe_ratio_slow_median']:.3f} "
          f"with {args.extra:.0%} extra work; ×{figures['probe_ratio_aa_median']:.3f} with none")
    print(describe("from the stored samples alone (the screen)", figures["screen"]))
    print(describe(f"with --confirm ({args.rounds} interleaved rounds per side; what the nightly job uses)",
                   figures["confirm"]))
    for r in results:
        for f in r["confirm"]["flagged"]:
            if r["kind"] == "aa" or not f["label"].startswith(tuple(PROBE_VARIANTS)):
                print(f"  left flagged after --confirm in {r['run']}: {f['verdict']} {f['label']} "
                      f"×{f['time_ratio']:.3f}")
        for probe in r["confirm"]["probes"] if r["kind"] == "slow" else []:
            if probe["time_verdict"] == "unchanged":
                print(f"  slowed probe called unchanged after --confirm in {r['run']}: {probe['label']}, re-run "
                      f"×{probe['confirm_ratio']:.3f} (×{probe['confirm_ci_low']:.3f}–×{probe['confirm_ci_high']:.3f}, "
                      f"{probe['confirm_rounds']:.0f} rounds a side)")
    if args.docs_json:
        write_docs_table(args.docs_json, figures, args, probes)
    if tmp is not None:
        tmp.cleanup()
    return 0


def write_docs_table(directory: Path, figures: dict, args, probes: list[str]) -> None:
    """The ``detector`` table for the docs (benchmarks/docdata.py): one row per way of reaching verdicts."""
    from benchmarks.run_tables import write_tables
    from harness.regression.confirm import MAX_ROUNDS

    rows = []
    for stage, name in (("screen", "the stored samples alone"),
                        ("confirm", f"--confirm, {args.rounds} rounds a side (up to {MAX_ROUNDS} for the undecided)")):
        s = figures[stage]
        rows.append([name, f"{s['aa_comparisons_with_a_regression']} of {s['aa_comparisons']}",
                     f"{s['aa_cases_flagged']} of {s['aa_case_comparisons']}",
                     s.get("aa_cases_inconclusive", 0),
                     f"{s['slow_probe_cases_detected']} of {s['slow_probe_cases']}",
                     s.get("slow_probe_cases_inconclusive", 0),
                     s.get("slow_probe_cases_called_unchanged", 0),
                     s["slow_probe_cases_called_improved"],
                     f"{s['unchanged_cases_in_slow_runs_flagged']} of {s['unchanged_cases_in_slow_runs']}"])
    notes = [f"Suite {Path(args.suite).name} plus probes {', '.join(probes)} at L = {args.probe_lengths}; "
             f"{args.extra:.0%} extra work at B.",
             f"Probe slowdown measured (median stored ratio): ×{figures['probe_ratio_slow_median']:.3f} slowed, "
             f"×{figures['probe_ratio_aa_median']:.3f} in the A/A runs."]
    if figures.get("confirm_seconds"):
        seconds, suspects = figures["confirm_seconds"], figures.get("confirm_suspects") or []
        notes.append(f"What --confirm cost: {min(seconds):.0f}–{max(seconds):.0f} s a comparison, re-running "
                     f"{min(suspects, default=0)}–{max(suspects, default=0)} suspect cases of "
                     f"{figures['screen']['aa_case_comparisons'] // max(figures['screen']['aa_comparisons'], 1)}.")
    write_tables(directory, [{"name": "detector", "title": "False alarms and detections of bench compare",
                              "columns": ["verdicts from", "A/A comparisons with a case called regressed",
                                          "A/A case comparisons flagged", "A/A cases inconclusive",
                                          "slowed probe cases called regressed", "slowed probe cases inconclusive",
                                          "slowed probe cases called unchanged (missed)",
                                          "slowed probe cases called improved",
                                          "unchanged cases in slowed runs flagged"],
                              "rows": rows, "notes": notes}])


if __name__ == "__main__":
    sys.exit(main())
