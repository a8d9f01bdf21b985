"""Where cascade attention starts beating plain attention as a shared prefix grows.

    python benchmarks/cascade_crossover.py [--model llama-3.1-8b] [--batch 16] [--suffix 256]
        [--prefixes 64,256,1024,4096,16384] [--device cpu] [--threads 1] [-o RUN_DIR] [--json [FILE|DIR]]
    python benchmarks/cascade_crossover.py --run RUN_DIR --json    # docs/data/cascade-crossover.json

``--batch`` requests decode one token each after one shared prompt of P tokens (``--prefixes``), each
with ``--suffix`` tokens of its own (``shared_prefix = P``, ``kv_len = P + suffix``, ``q_len = 1``; the model's
geometry). Plain attention (sdpa, flash-decoding) reads the prefix once per request; ``cascade`` reads
it once for all (variants/cascade.py). The script writes that suite, runs it with ``bench run`` (or
reads ``--run``), and for every P tabulates cascade's time, the best plain time and variant (stable,
correct rows only), and plain / cascade; the **crossover** is where that ratio rises above 1 for good,
interpolated on log-log between the measured prefixes (reports.analysis.crossover_length), or "before
the first" / "not in this sweep". ``--json`` writes the table for the docs (benchmarks/docdata.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLAIN = ("sdpa", "decode_split_k")


def suite_text(model: str, batch: int, suffix: int, prefixes: list[int], device: str, threads: int | None,
               quick: bool = False) -> str:
    """The sweep as a suite file: one [[variant]] per prefix length and variant (prefix and kv_len go together)."""
    from harness.engine.modelsuite import to_toml

    timing = {"warmup": 0, "min_time_s": 0.0, "min_reps": 2, "max_reps": 3, "processes": 1} if quick else \
        {"warmup": 2, "min_time_s": 0.2, "max_time_s": 3.0}
    if threads:
        timing["threads"] = threads
    variants = [dict(name=v, shared_prefix=p, kv_len=p + suffix) for p in prefixes for v in (*PLAIN, "cascade")]
    defaults = dict(device=device, dtype="float32" if device == "cpu" else "bfloat16", model=model, causal=True,
                    batch=batch, q_len=1)
    top = {"name": "cascade-crossover", "description": f"{batch} requests decoding after a shared prompt, "
           f"{suffix} tokens each of their own: plain attention against cascade ({model})"}
    return to_toml(top, {"defaults": defaults, "timing": timing}, variants)


def table(rows) -> tuple[list[list], dict]:
    """([prefix, kv_len, cascade ms, best plain ms, best plain variant, plain / cascade] per prefix, crossover)."""
    from reports.analysis import crossover_length
    from reports.winners import _prepared

    rows = _prepared(rows)
    good = rows[rows["is_candidate"]]
    out, lengths, ratios = [], [], []
    for p, g in sorted(good.groupby("shared_prefix"), key=lambda kv: kv[0]):
        cascade = g[g["variant"] == "cascade"]
        plain = g[g["variant"].isin(PLAIN)].sort_values("time_ms")
        if cascade.empty or plain.empty:
            continue
        c, best = float(cascade["time_ms"].iloc[0]), plain.iloc[0]
        ratio = float(best["time_ms"]) / c
        out.append([int(p), int(best["seq_len"]), round(c, 3), round(float(best["time_ms"]), 3), best["label"],
                    round(ratio, 3)])
        lengths.append(int(p))
        ratios.append(c / float(best["time_ms"]))  # cascade over plain: below 1 once cascade wins
    cross = crossover_length(lengths, ratios) if lengths else {"kind": "none", "length": None}
    cross["left_out"] = left_out(rows, lengths)
    return out, cross


def left_out(rows, kept: list[int]) -> list[str]:
    """The prefixes the table has no line for, each with why (e.g. "64: cascade unstable; sdpa unstable")."""
    out = []
    for p, g in sorted(rows.groupby("shared_prefix"), key=lambda kv: kv[0]):
        if int(p) in kept:
            continue
        why = []
        for _, r in g.iterrows():
            if bool(r["is_candidate"]):
                continue
            if r.get("status") != "ok":
                why.append(f"{r['variant']} {r.get('status')}")
            elif r.get("stable") is not None and not bool(r.get("stable")):
                why.append(f"{r['variant']} unstable")
            else:
                why.append(f"{r['variant']} not a candidate")
        out.append(f"{int(p)}: " + ("; ".join(why) or "no cascade or no plain row"))
    return out


def crossover_text(cross: dict) -> str:
    kind, length = cross.get("kind"), cross.get("length")
    gone = cross.get("left_out") or []
    if kind == "always":
        first = "the first kept" if gone else "the first"
        return f"cascade is faster at every prefix in the table (the crossover is at or before {first})"
    if kind == "at" and length:
        return f"cascade beats the best plain attention from a shared prefix of about {length:.0f} tokens"
    if kind == "never":
        return "cascade does not beat plain attention at the largest prefix measured"
    return "no prefix length has both a stable cascade time and a stable plain one"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--suffix", type=int, default=256)
    ap.add_argument("--prefixes", default="64,256,1024,4096,16384")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: PyTorch's choice)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one process, two samples per case")
    ap.add_argument("-o", "--output", default="results/docs/cascade-crossover", help="run directory")
    ap.add_argument("--run", help="read this run instead of running the sweep")
    ap.add_argument("--json", nargs="?", const="", default=None, metavar="FILE|DIR",
                    help="write the table for the docs (benchmarks/docdata.py): to FILE.json, into DIR, or (no "
                         "value) into docs/data/")
    args = ap.parse_args(argv)
    from harness.engine import store

    run = Path(args.run) if args.run else Path(args.output)
    if not args.run:
        prefixes = [int(x) for x in args.prefixes.split(",")]
        threads = args.threads if args.device == "cpu" and args.threads else None
        text = suite_text(args.model, args.batch, args.suffix, prefixes, args.device, threads, args.quick)
        run.mkdir(parents=True, exist_ok=True)
        suite = run.parent / f"{run.name}.toml"
        suite.write_text(text)
        subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "-o", str(run), "-q", "--no-report"],
                       check=True, cwd=ROOT)
    rows = store.read_results(run)
    body, cross = table(rows)
    columns = ["shared prefix (tokens)", "context (tokens)", "cascade ms", "best plain ms", "best plain",
               "plain / cascade"]
    print(" | ".join(columns))
    for r in body:
        print(" | ".join(str(x) for x in r))
    summary = crossover_text(cross)
    print(summary)
    if cross.get("left_out"):
        print("left out (no stable, correct pair): " + ", ".join(cross["left_out"]))
    if args.json is not None:
        from benchmarks import docdata

        meta = store.read_meta(run)
        defaults = (((meta.get("suite") or {}).get("definition") or {}).get("defaults") or {})
        notes = [summary,
                 f"{defaults.get('batch')} requests of model {defaults.get('model')} decode one token each; every "
                 "context is the shared prefix plus the request's own tokens.",
                 "Times are medians of stable, correct rows; plain is the faster of sdpa and flash-decoding "
                 "(decode_split_k), which read the prefix once per request."]
        if cross.get("left_out"):
            notes.append("Prefixes without a stable, correct cascade and plain time are left out of the table "
                         "(measured, not hidden): " + ", ".join(cross["left_out"]) + ".")
        command = "python benchmarks/cascade_crossover.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = docdata.write(docdata.json_path(args.json, "cascade-crossover"), "cascade-crossover",
                             "Cascade attention against plain attention as a shared prefix grows", command, columns,
                             body, notes, source=str(run))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
