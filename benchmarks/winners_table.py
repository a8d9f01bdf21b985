"""The "Best per workload" table of a run, for the docs.

    bench run --model llama-3.1-8b --workload decode -o results/docs/llama-decode
    python benchmarks/winners_table.py results/docs/llama-decode --json   # docs/data/winners-llama-decode.json

One row per workload of the run (reports.winners): kernel or layer, its context length, the fastest
correct, stable variant, its median time and interval, its speed-up
over the declared baseline (sdpa's flash backend; for layers the layer attending with sdpa), and the
variants within noise of it (and those faster but unstable); then fast_p per variant in the notes.
``--json [FILE|DIR]`` writes it with benchmarks/docdata.py (the machine and date recorded); ``--name``
for another table than ``winners-llama-decode``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = ["workload", "context (tokens)", "best variant", "median ms", "interval ms", "speed-up", "baseline",
           "within noise", "faster but unstable"]


def rows_of(run: Path) -> tuple[list[list], list[str]]:
    """The table's rows and its notes (fast_p per variant, and workloads with no winner)."""
    from harness.engine import store
    from reports import winners

    results = store.read_results(run)
    body, notes = [], []
    for w in winners.winners(results):
        kind = "layer" if w["workload"].get("level") == "layer" else "kernel"
        if not w["label"]:
            notes.append(f"{w['workload_label']}: {w['why']}")
            continue
        body.append([kind, w["workload"]["seq_len"], w["label"], round(w["time_ms"], 3),
                     f"{w['ci_low']:.3g}–{w['ci_high']:.3g}", round(w["speedup"], 2) if w["speedup"] else None,
                     w["baseline"] or w["baseline_why"], ", ".join(w["ties"]), ", ".join(w["faster_unstable"])])
    for f in winners.fast_p(results):
        shares = ", ".join(f"fast_{p:g} {100 * f['fast'][p]:.0f}%" for p in winners.P_VALUES)
        notes.append(f"{f['label']}: {shares} of {f['n']} workloads")
    return body, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory")
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="FILE|DIR",
                    help="write the table for the docs (benchmarks/docdata.py): to FILE.json, into DIR, or (no "
                         "value) into docs/data/")
    ap.add_argument("--name", default="winners-llama-decode", help="the table's name (docs/data/<name>.json)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    body, notes = rows_of(run)
    print(" | ".join(COLUMNS))
    for r in body:
        print(" | ".join("" if x is None else str(x) for x in r))
    for n in notes:
        print(n)
    if args.json is not None:
        from benchmarks import docdata
        from harness.engine import store

        suite = (store.read_meta(run).get("suite") or {}).get("name") or run.name
        notes = [f"Best per workload of the run of {suite}: the fastest variant whose answer is correct and whose "
                 "time is stable (its worker processes agreed); speed-up is the baseline's median over the "
                 "winner's.", *notes]
        command = "python benchmarks/winners_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = docdata.write(docdata.json_path(args.json, args.name), args.name, f"Best per workload: {suite}", command,
                             COLUMNS, body, notes, source=str(run))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
