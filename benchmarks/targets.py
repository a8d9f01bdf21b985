"""Speed and memory targets of our own implementations, measured as ratios in one process.

    python benchmarks/targets.py [--quick] [--json [DIR]]

Targets, CPU, float32:
* ``tiled`` forward within 2x of sdpa-flash time at L=8192, peak memory within 2x of sdpa-flash's;
* ``sliding_window`` within 1.5x of compiled ``flex`` with the same window (256, causal, L=4096).

Each pair is timed in rounds that alternate the two implementations (A, B, A, B, ...), so slow
drift of the machine affects both alike; the ratio of medians is printed with the spread of the
per-round ratios. Peak memory is the exact CPU peak (harness.measure.memory). ``--json`` also writes the
``targets`` table for the docs (``benchmarks/docdata.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run_tables import add_json_option, write_tables  # noqa: E402
from harness import get_variant  # noqa: E402
from harness.core.cases import Case  # noqa: E402
from harness.measure.inputs import make_qkv  # noqa: E402
from harness.measure.memory import peak_memory_bytes  # noqa: E402


def call(name: str, params: dict, case: Case, qkv):
    variant = get_variant(name)
    q, k, v = qkv

    def fn():
        with torch.no_grad():
            return variant(q, k, v, causal=case.causal, **params)

    return fn


def compare(label, a_name, a_params, b_name, b_params, case, rounds, limit):
    qkv = make_qkv(case)
    a, b = call(a_name, a_params, case, qkv), call(b_name, b_params, case, qkv)
    t0 = time.perf_counter()
    a()
    first_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    b()
    first_b = time.perf_counter() - t0
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    ratios = [x / y for x, y in zip(ta, tb)]
    ma, mb = statistics.median(ta), statistics.median(tb)
    pa, pb = peak_memory_bytes(a, "cpu"), peak_memory_bytes(b, "cpu")
    ok_time = ma / mb <= limit
    print(f"\n{label}  ({case.label()})")
    print(f"  {a_name:16s} {ma * 1e3:9.1f} ms   peak {pa / 2**20:8.1f} MiB   first call {first_a:.2f} s")
    print(f"  {b_name:16s} {mb * 1e3:9.1f} ms   peak {pb / 2**20:8.1f} MiB   first call {first_b:.2f} s")
    print(f"  time ratio {ma / mb:.2f}x (per-round ratios {min(ratios):.2f}–{max(ratios):.2f}, {rounds} rounds)"
          f"  target <= {limit}x: {'met' if ok_time else 'MISSED'}")
    print(f"  memory ratio {pa / pb:.2f}x")
    return ma / mb, pa / pb, {"label": label, "case": case.label(), "a_ms": ma * 1e3, "b_ms": mb * 1e3,
                              "ratios": (min(ratios), max(ratios)), "limit": limit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller lengths and fewer rounds (a smoke run)")
    p.add_argument("--rounds", type=int, default=7)
    add_json_option(p)
    args = p.parse_args(argv)
    rows = []
    L_tiled, L_window = (2048, 1024) if args.quick else (8192, 4096)
    rounds = 3 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for causal in (False, True):
        case = Case("tiled", {}, batch=1, heads=8, kv_heads=8, seq_len=L_tiled, head_dim=64, causal=causal)
        t, mem, info = compare("tiled vs sdpa-flash", "tiled", {}, "sdpa", {"backend": "flash"}, case, rounds, 2.0)
        print(f"  memory target <= 2x: {'met' if mem <= 2.0 else 'MISSED'}")
        rows.append(_row(info, t, mem, 2.0))
    case = Case("sliding_window", {}, batch=1, heads=8, kv_heads=8, seq_len=L_window, head_dim=64, causal=True)
    t, mem, info = compare("sliding_window vs flex (window 256)", "sliding_window", {"window": 256}, "flex",
                           {"mask": "sliding_window", "window": 256}, case, rounds, 1.5)
    rows.append(_row(info, t, mem, None))
    if args.json:
        write_tables(args.json, [{"name": "targets", "title": "Our implementations against their targets",
                                  "columns": ["pair", "case", "ms", "reference ms", "time ×", "per-round ×",
                                              "time target", "memory ×", "memory target"], "rows": rows,
                                  "notes": [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} "
                                            "alternating rounds per pair" + (" (--quick: smaller lengths)" if args.quick
                                                                             else "") + "."]}])
    return 0


def _row(info: dict, time_ratio: float, mem_ratio: float, mem_limit: float | None) -> list:
    lo, hi = info["ratios"]
    return [info["label"], info["case"], round(info["a_ms"], 2), round(info["b_ms"], 2), round(time_ratio, 3),
            f"{lo:.2f}–{hi:.2f}", f"≤ {info['limit']}× ({'met' if time_ratio <= info['limit'] else 'missed'})",
            round(mem_ratio, 3),
            f"≤ {mem_limit}× ({'met' if mem_ratio <= mem_limit else 'missed'})" if mem_limit else ""]


if __name__ == "__main__":
    sys.exit(main())
