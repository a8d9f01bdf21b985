"""Tables for the docs from stored runs: the report's own summaries, as docs/data JSON.

    python benchmarks/run_tables.py RUN [RUN ...] --table NAME [--table NAME ...] [--json [DIR]]

Each table is computed from run directories (``bench run ... -o DIR``) with the same code the run's
report uses (``reports.render.build_context``: the decode, variable-length, layers and profile
sections), so a figure in the docs is the figure in the report. Without ``--json`` the tables are
printed; with it each is written through ``benchmarks/docdata.py`` to ``DIR/<name>.json`` (default
``docs/data/``), with this machine, today's date and this command line. The commands that produce
every table the docs use are listed in ``docs/gen/measured.py`` (``PRODUCERS``).

Tables (one RUN unless said):

* ``decode`` — per decode shape (``q_len`` set, fixed lengths) at its longest cache: the fastest
  variant, its time and share of the measured copy bandwidth, and ``sdpa``'s (``suites/decode.toml``,
  after ``bench calibrate``);
* ``paged`` — each paged variant's time over the fastest contiguous case of the same shape, summarised
  over the shapes (target: at most ×1.3);
* ``calibration`` — the measured matmul peak and copy bandwidth the run's rows were rated against;
* ``varlen`` — per variable-length batch: its padding, ``padded``'s time and every other variant's
  speed-up over it (``suites/varlen.toml``);
* ``layers`` — per attention layer: parameters, KV-cache bytes per token, prefill and decode time per
  token, tokens of context that fit in the memory budget (``suites/layers-4096.toml``);
* ``profile`` — per variant (its largest profiled case): where the time goes, by operator group, and
  what profiling cost (a run made with ``--profile``);
* ``processes`` (several RUNs of one suite with different ``--processes``) — per process count: wall
  time, how far the median case moved between two runs, and how many moved cases were flagged unstable;
* ``executors`` (several RUNs of one suite, e.g. the default executor, ``--executor ray``, the default
  again) — each run's wall time and per-case median time over the first run's.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def command_line(argv: list[str] | None = None) -> str:
    """This process's command line as a reader would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = script.relative_to(ROOT).as_posix()
    except ValueError:
        pass
    return " ".join(["python", *(shlex.quote(a) for a in argv)])


def add_json_option(parser: argparse.ArgumentParser, flag: str = "--json") -> None:
    """The ``--json [DIR]`` option every docs-table script shares."""
    parser.add_argument(flag, nargs="?", type=Path, const=ROOT / "docs" / "data", default=None, metavar="DIR",
                        help="write the tables for the docs through benchmarks/docdata.py into DIR "
                             "(default docs/data/), one <name>.json each")


def write_tables(directory: Path, tables: list[dict[str, Any]], command: str | None = None) -> list[Path]:
    """Write each ``{"name", "title", "columns", "rows", "notes"?, "source"?}`` to ``directory/<name>.json``."""
    from benchmarks import docdata

    paths = []
    for t in tables:
        paths.append(docdata.write(directory / f"{t['name']}.json", t["name"], t["title"], command or command_line(),
                                   t["columns"], t["rows"], t.get("notes", ()), t.get("source")))
        print(f"wrote {paths[-1]}", file=sys.stderr)
    return paths


def print_table(t: dict[str, Any]) -> None:
    print(f"\n{t['title']} ({t['name']})")
    cells = [[str(c) for c in t["columns"]]] + [[_fmt(c) for c in r] for r in t["rows"]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(t["columns"]))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for n in t.get("notes", ()):
        print(f"  note: {n}")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.4g}"
    return "–" if x is None else str(x)


def _r(x: Any, digits: int = 3) -> float | None:
    """A float rounded to ``digits`` significant digits (None when missing)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return 0.0 if x == 0 else round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)


def _int(x: Any) -> int | None:
    return int(x) if _r(x) is not None else None


def _context(run: Path) -> dict[str, Any]:
    from reports.render import build_context

    return build_context(run)


def _source(runs: list[Path]) -> str:
    out = []
    for r in runs:
        try:
            out.append(r.resolve().relative_to(ROOT).as_posix())
        except ValueError:
            out.append(str(r))
    return ", ".join(out)


def _suite_and_machine(ctx: dict[str, Any]) -> str:
    meta = ctx["meta"]
    threads = (meta.get("timing") or {}).get("threads")
    return (f"suite {ctx['suite_name']}, run {meta.get('run_id')}, {meta.get('cases')} cases, "
            f"{meta.get('wall_s', 0):.0f} s" + (f", {threads} thread(s)" if threads else ""))


# ------------------------------------------------------------------------------------------- tables


def decode_table(runs: list[Path]) -> dict[str, Any]:
    ctx = _context(runs[0])
    decode = (ctx.get("inference") or {}).get("decode")
    if not decode:
        raise SystemExit(f"{runs[0]}: no decode rows (q_len set, fixed lengths)")
    rows, met, shapes = [], 0, 0
    by_group: dict[str, list[dict]] = {}
    for r in decode["table"]:
        by_group.setdefault(r["group"], []).append(r)
    for group, rs in by_group.items():
        best = min(rs, key=lambda r: r["time_ms"] or math.inf)
        sdpa = next((r for r in sorted(rs, key=lambda r: r["time_ms"] or math.inf)
                     if r["series"].startswith("sdpa")), None)
        shapes += 1
        met += bool(best["pct"] is not None and best["pct"] >= 50)
        rows.append([group, best["kv_len"], best["series"], _r(best["time_ms"]), _r(best["gbs"]), _r(best["pct"]),
                     _r(sdpa["time_ms"]) if sdpa else None, _r(sdpa["pct"]) if sdpa else None,
                     _r(sdpa["time_ms"] / best["time_ms"]) if sdpa and best["time_ms"] else None])
    notes = [_suite_and_machine(ctx) + ".",
             "Percentages are of the copy bandwidth bench calibrate measured (bytes read + written); decoding only "
             "reads the cache, so a share above 100% is possible.",
             f"Target: the fastest variant reaches at least 50% of that bandwidth: met in {met} of {shapes} shapes."]
    if all(r[5] is None for r in rows):
        notes.append("No calibration: run bench calibrate --threads 1 before the suite for the % columns.")
    return {"name": "decode",
            "title": "Decoding against a KV cache: the fastest variant per shape, at the longest cache",
            "columns": ["shape", "kv_len", "fastest", "ms", "K/V GB/s", "% of copy bandwidth", "sdpa ms",
                        "sdpa % of bandwidth", "sdpa ÷ fastest"],
            "rows": rows, "notes": notes, "source": _source(runs)}


def paged_table(runs: list[Path]) -> dict[str, Any]:
    ctx = _context(runs[0])
    decode = (ctx.get("inference") or {}).get("decode")
    if not decode or not decode["paged"]:
        raise SystemExit(f"{runs[0]}: no paged decode rows with a contiguous case of the same shape")
    by_series: dict[str, list[float]] = {}
    for r in decode["paged"]:
        by_series.setdefault(r["series"], []).append(r["ratio"])
    rows = [[s, len(v), _r(statistics.median(v)), _r(min(v)), _r(max(v)), sum(x <= 1.3 for x in v)]
            for s, v in sorted(by_series.items())]
    return {"name": "paged", "title": "Paged KV cache: time over the fastest contiguous case of the same shape",
            "columns": ["paged variant", "shapes", "median ×", "best ×", "worst ×", "shapes ≤ ×1.3"], "rows": rows,
            "notes": [_suite_and_machine(ctx) + ".", "Pages are placed in the pool in a shuffled order, as in a "
                      "serving engine. Target: at most ×1.3 the contiguous time."], "source": _source(runs)}


def calibration_table(runs: list[Path]) -> dict[str, Any]:
    from harness.engine import store

    rows_ = store.read_results(runs[0])
    seen, rows = set(), []
    for r in rows_.to_dict("records"):
        peak, bw = _r(r.get("peak_tflops_per_s")), _r(r.get("peak_gb_per_s"))
        key = (r.get("device"), r.get("dtype"), r.get("threads"))
        if key in seen or (peak is None and bw is None):
            continue
        seen.add(key)
        ridge = _r(peak * 1e12 / (bw * 1e9)) if peak and bw else None
        rows.append([key[0], key[1], key[2], _r(peak * 1e3) if peak else None, bw, ridge])
    if not rows:
        raise SystemExit(f"{runs[0]}: its rows carry no calibration (run bench calibrate before the suite)")
    return {"name": "calibration", "title": "This machine's measured ceilings (bench calibrate)",
            "columns": ["device", "dtype", "threads", "matmul peak GFLOP/s", "copy GB/s (read + written)",
                        "ridge FLOP/byte"], "rows": sorted(rows, key=lambda r: tuple(map(str, r[:3]))),
            "notes": ["The matmul peak is a large GEMM through torch; the copy bandwidth counts bytes read and "
                      "written; a case whose arithmetic intensity is above the ridge is compute-bound."],
            "source": _source(runs)}


def varlen_table(runs: list[Path]) -> dict[str, Any]:
    ctx = _context(runs[0])
    varlen = (ctx.get("inference") or {}).get("varlen")
    if not varlen:
        raise SystemExit(f"{runs[0]}: no variable-length rows")
    others = sorted({r["series"] for r in varlen["table"]} - {"padded"})
    rows = []
    for (group, lengths), rs in itertools.groupby(varlen["table"], key=lambda r: (r["group"], str(r["lengths"]))):
        rs = list(rs)
        padded = next((r for r in rs if r["series"] == "padded"), None)
        speed = {r["series"]: r["speedup"] for r in rs}
        rows.append([group, lengths, _r(rs[0]["padding"], 2), _r(padded["time_ms"]) if padded else None,
                     *[_r(speed.get(s)) for s in others]])
    return {"name": "varlen", "title": "Variable-length batches: speed-up over padding to the longest sequence",
            "columns": ["batch", "lengths", "padding fraction", "padded ms", *[f"{s} ×" for s in others]],
            "rows": rows, "notes": [_suite_and_machine(ctx) + ".",
                                    "× is padded's time over the variant's (above 1: faster than padding). "
                                    "Target: a packed path is faster from about 30% padding."],
            "source": _source(runs)}


def layers_table(runs: list[Path]) -> dict[str, Any]:
    ctx = _context(runs[0])
    layers = ctx.get("layers")
    if not layers:
        raise SystemExit(f"{runs[0]}: no attention-layer rows")
    rows = []
    for table in layers["tables"]:
        for c in table["configs"]:
            rows.append([c["name"], _int(c["param_count"]), _int(c["kv_bytes_per_token"]),
                         _r((c["prefill"] or {}).get("ms")), _r((c["decode"] or {}).get("ms")), c["fit_model"],
                         _r(c["rel_err"], 2)])
    depth, budget = layers["depth"], layers["budget_bytes"] / 2**30
    return {"name": "layers", "title": "Attention layers: parameters, KV cache and time",
            "columns": ["layer", "parameters", "KV bytes/token/layer", "prefill ms/token", "decode ms/step",
                        f"tokens in {budget:g} GiB, {depth} layers", "max rel. error"],
            "rows": rows, "notes": [_suite_and_machine(ctx) + ".",
                                    "Parameters and KV bytes are counted from the modules; times are medians."],
            "source": _source(runs)}


def profile_table(runs: list[Path]) -> dict[str, Any]:
    ctx = _context(runs[0])
    prof = ctx.get("profile")
    if not prof:
        raise SystemExit(f"{runs[0]}: no profile (run the suite with --profile)")
    largest: dict[str, dict] = {}
    for config in prof["configs"]:
        for case in config["cases"]:
            name = case["name"].rsplit(" L=", 1)[0]
            if name not in largest or case["length"] > largest[name]["length"]:
                largest[name] = {**case, "config": config["title"]}
    groups = sorted({g for c in largest.values() for g in c["groups"]})
    rows = []
    for name, c in sorted(largest.items()):
        total = c["total_ms"] or math.nan
        rows.append([f"{c['config']} · {name}", c["length"], _r(c["timed_ms"]), _r(c["total_ms"]), _r(c["profile_s"]),
                     *[_r(100 * c["groups"].get(g, 0) / total, 2) for g in groups]])
    notes = [_suite_and_machine(ctx) + ".",
             f"Profiling took a median {_r(prof['profile_s_median'])} s per case ({_r(prof['profile_s_total'])} s "
             f"for {prof['cases']} cases), measured by the profile phase itself.",
             "Shares are of the profiled call's operator self time: one call under the profiler, not the timed "
             "median."]
    return {"name": "profile", "title": "Where the time goes: share of self time by operator group (%)",
            "columns": ["case", "L", "timed ms", "profiled ms", "profile s", *groups], "rows": rows, "notes": notes,
            "source": _source(runs)}


def processes_table(runs: list[Path]) -> dict[str, Any]:
    from harness.engine import store

    by_count: dict[int, list[tuple[Path, dict, Any]]] = {}
    for run in runs:
        meta = store.read_meta(run)
        rows = store.read_results(run)
        count = int((meta.get("timing") or {}).get("processes") or rows["processes"].dropna().max())
        by_count.setdefault(count, []).append((run, meta, rows[rows["status"] == "ok"].set_index("case_id")))
    out = []
    for count, items in sorted(by_count.items()):
        walls = [m.get("wall_s") for _, m, _ in items]
        moved, big, flagged = [], 0, 0
        for (_, _, a), (_, _, b) in itertools.combinations(items, 2):
            common = a.index.intersection(b.index)
            for cid in common:
                ta, tb = a.at[cid, "time_ms"], b.at[cid, "time_ms"]
                ratio = max(ta, tb) / min(ta, tb)
                moved.append(ratio)
                if ratio > 1.25:
                    big += 1
                    flagged += bool(a.at[cid, "stable"] is False or b.at[cid, "stable"] is False or
                                    str(a.at[cid, "stable"]) == "False" or str(b.at[cid, "stable"]) == "False")
        out.append([count, len(items), " / ".join(f"{w:.0f}" for w in walls if w is not None),
                    _r(statistics.median(moved)) if moved else None, len(moved), big, flagged])
    return {"name": "processes", "title": "Several processes per case: what they cost and what they catch",
            "columns": ["processes", "runs", "wall s (each run)", "median case moved ×", "case pairs",
                        "pairs moved > 25%", "of those flagged unstable"],
            "rows": out, "notes": ["Each pair of runs with the same process count is compared case by case: the ratio "
                                   "of the slower to the faster median time.",
                                   "Runs in the order given: alternate the counts (1 2 3 3 2 1) so drift of the "
                                   "machine "
                                   "affects each alike."], "source": _source(runs)}


def executors_table(runs: list[Path]) -> dict[str, Any]:
    from harness.engine import store

    first = None
    rows = []
    for run in runs:
        meta = store.read_meta(run)
        r = store.read_results(run)
        ok = r[r["status"] == "ok"].set_index("case_id")["time_ms"]
        if first is None:
            first = ok
        common = ok.index.intersection(first.index)
        ratio = statistics.median(ok[common] / first[common]) if len(common) else None
        statuses = ", ".join(f"{n} {s}" for s, n in r["status"].value_counts().items())
        rows.append([run.name, _r(meta.get("wall_s")), statuses, _r(ratio)])
    return {"name": "executors", "title": "The same suite through each executor",
            "columns": ["run", "wall s", "statuses", "median case time ÷ first run's"], "rows": rows,
            "notes": ["Runs in the order they were made; name each run directory after its executor."],
            "source": _source(runs)}


TABLES: dict[str, tuple[Callable[[list[Path]], dict[str, Any]], bool]] = {
    "decode": (decode_table, False), "paged": (paged_table, False), "calibration": (calibration_table, False),
    "varlen": (varlen_table, False), "layers": (layers_table, False), "profile": (profile_table, False),
    "processes": (processes_table, True), "executors": (executors_table, True),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    p.add_argument("--table", action="append", required=True, choices=sorted(TABLES),
                   help="a table to make (repeatable)")
    add_json_option(p)
    args = p.parse_args(argv)
    for run in args.runs:
        if not (run / "run.json").is_file():
            p.error(f"{run} is not a run directory (no run.json)")
    tables = []
    for name in args.table:
        fn, multi = TABLES[name]
        if not multi and len(args.runs) > 1:
            p.error(f"--table {name} reads one run, not {len(args.runs)}")
        tables.append(fn(args.runs))
    for t in tables:
        print_table(t)
    if args.json:
        write_tables(args.json, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
