"""Fidelity: does `bench` report the time a user would measure, and does it repeat?

    python benchmarks/fidelity.py [--rounds 3] [--min-run-time 2] [--threads N[,N...]]
        [--spread-suite suites/quick.toml --spread-runs 3] [--json [DIR]]

Part 1, against the reference timer. For each case below, every round runs, in fresh processes
and in alternating order, (a) ``bench run`` on a one-case suite (the harness as a user runs it,
default settings, nothing exported) and (b) a plain Python process that builds the same inputs the
way a user would (``torch.randn``, no alignment, no harness code on the timed path beyond the
variant function itself) and times the same call with ``torch.utils.benchmark.Timer
.blocked_autorange``. Both inherit this process's environment unchanged. It prints, per case,
the median of each method's per-process medians, their ratio (goal: within 5%), and each method's
own spread across its processes ((max - min) / median).

Part 2, run to run: ``--spread-suite`` is run ``--spread-runs`` times in fresh ``bench run``
processes; per case, the spread of the medians across runs (goal: within 10%, or flagged
unstable by the run itself: the ``stable`` column).

Nothing here asserts; it prints what it measured. Run it on a quiet machine. ``--json`` also writes
the tables for the docs (``fidelity``: part 1, one row per case and thread count; ``fidelity-spread``:
part 2) through ``benchmarks/docdata.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run_tables import add_json_option, write_tables  # noqa: E402

#: (label, variant, params, seq_len, heads, causal)
CASES = [
    ("sdpa math L=2048", "sdpa", {"backend": "math"}, 2048, 8, False),
    ("sdpa flash L=2048", "sdpa", {"backend": "flash"}, 2048, 8, False),
    ("naive L=1024", "naive", {}, 1024, 4, False),
    ("block_sparse local_global L=2048", "block_sparse", {"pattern": "local_global"}, 2048, 8, False),
]

TIMER_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import torch.utils.benchmark as tb
    from harness import get_variant
    name, params, L, H, causal, min_run_time, threads = json.loads(sys.argv[1])
    threads = threads or torch.get_num_threads()  # the process's default unless asked
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, 64, generator=g) for _ in range(3))
    fn = get_variant(name)
    def call():
        with torch.no_grad():
            return fn(q, k, v, causal=causal, **params)
    call()  # first call (lazy initialisation) kept out, as the harness does
    m = tb.Timer(stmt="call()", globals={"call": call},
                 num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    print(json.dumps({"median_ms": m.median * 1e3, "threads": threads}))
""")


def suite_text(variant: str, params: dict, seq_len: int, heads: int, causal: bool, threads: int | None = None) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in params.items())
    timing = f"[timing]\nthreads = {threads}\n" if threads else ""
    return (f'name = "fidelity"\n{timing}[sweep]\nseq_len = [{seq_len}]\nheads = [{heads}]\nhead_dim = [64]\n'
            f"causal = [{str(causal).lower()}]\n[[variant]]\nname = \"{variant}\"\n{extra}")


def bench_bin() -> list[str]:
    return [sys.executable, "-m", "harness"]


def harness_run(suite: Path, out: Path) -> pandas.DataFrame:  # noqa: F821
    import pandas as pd

    proc = subprocess.run(bench_bin() + ["run", str(suite), "-o", str(out), "-q", "--no-report"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench run {suite} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return pd.read_parquet(out / "results.parquet")


def timer_run(variant, params, seq_len, heads, causal, min_run_time, threads=None) -> dict:
    arg = json.dumps([variant, params, seq_len, heads, causal, min_run_time, threads])
    proc = subprocess.run([sys.executable, "-c", TIMER_SCRIPT, arg], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


def against_timer(rounds: int, min_run_time: float, tmp: Path, threads: int | None = None) -> list[list]:
    print(f"Part 1: harness vs torch.utils.benchmark, {rounds} fresh processes each, alternating "
          f"(threads: {threads or 'PyTorch default'}; {os.cpu_count()} cores)")
    print(f"{'case':36s} {'harness ms':>11s} {'Timer ms':>10s} {'ratio':>7s} {'h spread':>9s} {'T spread':>9s}  stable")
    table = []
    for index, (label, variant, params, L, H, causal) in enumerate(CASES):
        suite = tmp / f"case{index}-t{threads or 0}.toml"
        suite.write_text(suite_text(variant, params, L, H, causal, threads))
        ours, ref, stable, used = [], [], [], set()
        for r in range(rounds):
            order = ("h", "t") if r % 2 == 0 else ("t", "h")
            for who in order:
                if who == "h":
                    row = harness_run(suite, tmp / f"run-case{index}-t{threads or 0}-{r}").iloc[0]
                    ours.append(float(row["time_ms"]))
                    stable.append(row.get("stable", None))
                    used.add(("bench", int(row["threads"])))
                else:
                    got = timer_run(variant, params, L, H, causal, min_run_time, threads)
                    ref.append(got["median_ms"])
                    used.add(("Timer", int(got["threads"])))
        mo, mr = statistics.median(ours), statistics.median(ref)
        print(f"{label:36s} {mo:11.2f} {mr:10.2f} {mo / mr:7.3f} {spread(ours):9.1%} {spread(ref):9.1%}  "
              f"{[bool(x) if x is not None else None for x in stable]}")
        print(f"{'':36s} harness {[f'{x:.2f}' for x in ours]}  Timer {[f'{x:.2f}' for x in ref]}  "
              f"threads {sorted(used)}")
        flagged = sum(x is not None and not bool(x) for x in stable)
        table.append([label, ", ".join(sorted({str(n) for _, n in used})), round(mo, 3), round(mr, 3),
                      round(mo / mr, 3), round(spread(ours), 3), round(spread(ref), 3), f"{flagged} of {len(stable)}"])
    return table


def run_to_run(suite: Path, runs: int, tmp: Path) -> dict:
    import pandas as pd

    print(f"\nPart 2: {suite} in {runs} fresh bench runs")
    frames = []
    for r in range(runs):
        rows = harness_run(suite, tmp / f"spread-{r}")
        rows["run"] = r
        frames.append(rows[rows["status"] == "ok"])
    rows = pd.concat(frames)
    key = ["case_id"]
    within = flagged = over = 0
    worst = []
    for _, g in rows.groupby(key):
        s = spread(list(g["time_ms"]))
        unstable = "stable" in g and (g["stable"] == False).any()  # noqa: E712
        if s <= 0.10:
            within += 1
        elif unstable:
            flagged += 1
        else:
            over += 1
        worst.append((s, g.iloc[0]["variant"], int(g.iloc[0]["seq_len"]), bool(g.iloc[0]["causal"]),
                      g.iloc[0]["dtype"], [round(x, 2) for x in g["time_ms"]], unstable))
    print(f"cases within 10% across runs: {within}; beyond 10% but flagged unstable: {flagged}; "
          f"beyond 10% and not flagged: {over}")
    for s, variant, L, causal, dtype, times, unstable in sorted(worst, reverse=True)[:12]:
        print(f"  {s:6.1%} {variant:16s} L={L:<6d} {'causal' if causal else 'non-causal':10s} {dtype:9s} "
              f"{times} {'(flagged unstable)' if unstable else ''}")
    rows = [["cases within 10% across runs", within], ["beyond 10%, flagged unstable by a run", flagged],
            ["beyond 10%, not flagged", over]]
    rows += [[f"worst not flagged: {variant} L={L} {'causal' if causal else 'non-causal'} {dtype}", round(s, 3)]
             for s, variant, L, causal, dtype, times, unstable in sorted(worst, reverse=True) if not unstable
             and s > 0.10][:5]
    return {"name": "fidelity-spread", "title": f"Run to run: {suite.name} in {runs} fresh bench runs",
            "columns": ["cases", "count (or spread)"], "rows": rows,
            "notes": ["Spread: (largest − smallest median) / median of a case's times across the runs; ok cases only."]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=2.0, help="Timer.blocked_autorange's min_run_time (s)")
    p.add_argument("--spread-suite", type=Path, help="a suite to run several times (e.g. suites/quick.toml)")
    p.add_argument("--spread-runs", type=int, default=3)
    p.add_argument("--skip-timer", action="store_true", help="only part 2")
    p.add_argument("--threads", type=_thread_counts, default=[None],
                   help="intra-op threads for both sides, or several comma-separated (1,2): part 1 runs at each "
                        "(default: PyTorch's default)")
    add_json_option(p)
    args = p.parse_args()
    tables = []
    with tempfile.TemporaryDirectory(prefix="fidelity-") as d:
        if not args.skip_timer:
            rows = []
            for threads in args.threads:
                rows += against_timer(args.rounds, args.min_run_time, Path(d), threads)
            tables.append({"name": "fidelity", "title": "Harness against torch.utils.benchmark.Timer, fresh processes",
                           "columns": ["case", "threads", "harness ms", "Timer ms", "harness ÷ Timer",
                                       "harness spread", "Timer spread", "harness runs flagged unstable"],
                           "rows": rows,
                           "notes": [f"Medians of {args.rounds} fresh processes each, alternating; spread: (largest − "
                                     "smallest per-process median) / median."]})
        if args.spread_suite:
            tables.append(run_to_run(args.spread_suite.resolve(), args.spread_runs, Path(d)))
    if args.json:
        write_tables(args.json, tables)
    return 0


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,..., got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


if __name__ == "__main__":
    sys.exit(main())
