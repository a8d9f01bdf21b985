"""Does a busy machine show? The same 15-case suite with 0, 1 and 2 busy-looping neighbours.

    python benchmarks/contention.py [--neighbours 0,1,2,0] [--json [DIR]]

The suite (written to the output directory): ``sdpa`` math and flash, ``naive``, ``linear``,
``sliding_window`` (window 128); L = 512, 1024, 2048; float32, B=1, H=8, D=64; bench's defaults
otherwise (2 processes, ``[run] contention = "retry"``). For each entry of ``--neighbours`` the script
starts that many processes that busy-loop on one core each (``python -c "while True: pass"``), runs
``bench run`` in a fresh process exactly as a user would, and stops them. Then, against the first
quiet run, per loaded run: the cases whose median moved more than 20%, how many of those were flagged
``contended`` or were re-run until clean (their discarded rounds recorded), whether the warning line
appeared before the first case; for the quiet runs, how many cases were flagged at all.

The cost of the measurement itself: a probe (the reads of /proc at the start and the end of a
sampling window) timed over many repetitions in this process, times the rounds the quiet run took,
over that run's wall time (``contention-overhead``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SUITE = """
name = "contention"
description = "15 cases for benchmarks/contention.py"
[defaults]
batch = 1
heads = 8
head_dim = 64
dtype = "float32"
[sweep]
seq_len = [512, 1024, 2048]
[[variant]]
name = "sdpa"
backend = ["math", "flash"]
[[variant]]
name = "naive"
[[variant]]
name = "linear"
[[variant]]
name = "sliding_window"
window = 128
"""
MOVED = 0.20
WARNING = "warning: the machine is busy"


def neighbours(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0 if n else 0.0)
    return procs


def run_once(suite: Path, out: Path, n: int) -> dict:
    procs = neighbours(n)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "-o", str(out), "--quiet",
                               "--no-report"], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if proc.returncode != 0:
        raise SystemExit(f"bench run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"neighbours": n, "dir": out, "wall_s": wall, "warned": WARNING in proc.stderr}


def table(run: dict):
    from harness.engine.store import read_results

    rows = read_results(run["dir"])
    return rows.set_index("case_id")


def flagged(v) -> bool:
    return v is not None and v == v and bool(v)


def probe_cost(reps: int = 500) -> float:
    """Seconds one sampling window's probe costs (start and stop: two snapshots of /proc)."""
    from harness.measure.contention import Probe

    probe = Probe()
    t0 = time.perf_counter()
    for _ in range(reps):
        probe.start()
        probe.stop()
    return (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neighbours", default="0,1,2,0", help="busy neighbours per run, in order (default 0,1,2,0)")
    p.add_argument("--out", default="results/docs/contention", help="where the runs go")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="DIR",
                   help="write docs/data/contention.json and contention-overhead.json (or into DIR)")
    args = p.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    suite = out / "contention.toml"
    suite.write_text(SUITE)
    runs = []
    for i, n in enumerate(int(x) for x in args.neighbours.split(",")):
        print(f"run {i + 1}: {n} busy neighbour(s)", file=sys.stderr)
        runs.append(run_once(suite, out / f"run{i + 1}-n{n}", n))
    quiet = next(r for r in runs if r["neighbours"] == 0)
    base = table(quiet)
    rows_out = []
    for i, r in enumerate(runs):
        t = table(r)
        ok = t[t["status"] == "ok"]
        contended = ok["contended"].map(flagged)
        retried = ok["discarded_rounds"].fillna(0).astype(int) > 0
        if r is quiet:
            moved = caught = None
        else:
            both = ok.index.intersection(base[base["status"] == "ok"].index)
            ratio = ok.loc[both, "time_ms"] / base.loc[both, "time_ms"]
            moved_ids = ratio[(ratio - 1).abs() > MOVED].index
            moved = len(moved_ids)
            caught = int((contended.loc[moved_ids] | retried.loc[moved_ids]).sum())
        rows_out.append([i + 1, r["neighbours"], len(t), int(contended.sum()), int(retried.sum()),
                         int(ok["discarded_rounds"].fillna(0).sum()), moved, caught,
                         None if not moved else round(100 * caught / moved, 1), "yes" if r["warned"] else "no",
                         round(r["wall_s"], 1),
                         round(float(ok["other_cpu_cores"].max()), 2) if len(ok) else None])
        print(f"  run {i + 1} ({r['neighbours']} neighbours): {int(contended.sum())} contended, "
              f"{int(retried.sum())} retried; moved >{MOVED:.0%}: {moved}, of which caught {caught}; "
              f"warning: {r['warned']}; {r['wall_s']:.0f} s", file=sys.stderr)
    cost = probe_cost()
    rounds_log = (quiet["dir"] / "rounds.jsonl").read_text().splitlines()
    overhead = [[len(rounds_log), round(cost * 1e3, 3), round(quiet["wall_s"], 1),
                 round(100 * cost * len(rounds_log) / quiet["wall_s"], 3)]]
    print(f"probe: {cost * 1e3:.3f} ms per sampling window; {len(rounds_log)} rounds in the quiet run "
          f"({quiet['wall_s']:.0f} s): {overhead[0][3]:.3f}% of its wall time", file=sys.stderr)
    if args.json is not None:
        import docdata

        command = "python benchmarks/contention.py --json"
        where = Path(args.json) if args.json else docdata.DATA_DIR
        docdata.write(where / "contention.json", "contention",
                      "A 15-case suite with nothing else running and with busy-looping neighbours", command,
                      ["run", "busy neighbours", "cases", "contended", "re-run until clean or flagged",
                       "rounds re-run", f"moved >{MOVED:.0%} vs the first quiet run", "of those caught",
                       "caught %", "warning line", "wall s", "largest other_cpu_cores"], rows_out,
                      notes=["Caught: flagged contended, or re-run (discarded rounds recorded) in a fresh process.",
                             "Defaults: 2 processes per case, [run] contention = \"retry\" (2 retries; retrying "
                             "stops after 3 cases in a row stay contended).",
                             "A neighbour is a python process busy-looping on one core."])
        docdata.write(where / "contention-overhead.json", "contention-overhead",
                      "What measuring contention costs", command,
                      ["rounds in the quiet run", "ms per sampling window (two /proc snapshots)", "run wall s",
                       "% of the run's wall time"], overhead,
                      notes=["The probe's cost is timed over 500 start/stop pairs in one process; a run takes one "
                             "probe per round."])
    print(json.dumps({"runs": rows_out, "overhead": overhead}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
