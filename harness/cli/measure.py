"""``bench calibrate``: measure this machine's ceilings; ``--check``: the timing cross-check."""

from __future__ import annotations

import sys

from harness.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, positive_int, positive_number


def register(sub) -> None:
    from harness.core.cases import DTYPES

    p = sub.add_parser(
        "calibrate",
        help="measure this machine's matmul peak and memory bandwidth (cached per machine); "
             "--check: timing cross-check",
        description="Measure matmul throughput per dtype and copy bandwidth per device, cached in "
        "results/calibration/<machine fingerprint>.json; rows then get pct_of_peak. With --check, time SDPA "
        "cases with the harness, torch.utils.benchmark and (CUDA) triton.testing.do_bench and print the ratios.",
    )
    p.add_argument("--device", action="append", choices=("cpu", "cuda"),
                   help="device to calibrate or check (repeatable; default: cpu, and cuda when available)")
    p.add_argument("--dtype", action="append", choices=DTYPES,
                   help="dtype (repeatable; calibration default: all; --check default: float32)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (CPU figures depend on it)")
    p.add_argument("--force", action="store_true", help="measure again even if this machine's figures are cached")
    p.add_argument("--quick", action="store_true", help="small sizes and short times (a smoke test; underestimates)")
    p.add_argument("--dir", metavar="DIR", help="calibration cache directory (default results/calibration)")
    p.add_argument("--check", action="store_true", help="run the timing cross-check instead of calibrating")
    p.add_argument("--seq-len", type=positive_int, nargs="+", default=[1024, 4096], metavar="L",
                   help="--check: sequence lengths (default 1024 4096)")
    p.add_argument("--batch", type=positive_int, default=1, help="--check: batch (default 1)")
    p.add_argument("--heads", type=positive_int, default=8, help="--check: heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="--check: head_dim (default 64)")
    p.add_argument("--causal", action="store_true", help="--check: causal attention")
    p.add_argument("--runs", type=positive_int, default=3, help="--check: runs of each method (default 3)")
    p.add_argument("--min-time-s", type=positive_number, default=1.0,
                   help="--check: minimum sampling time of each method per run (default 1.0)")
    p.add_argument("--max-time-s", type=positive_number,
                   help="--check: the harness's per-case sampling budget (default: TimingConfig's, 5 s)")
    p.set_defaults(handler=cmd_calibrate)


def _devices(args) -> list[str] | None:
    import torch

    if args.device:
        devices = list(dict.fromkeys(args.device))
        if "cuda" in devices and not torch.cuda.is_available():
            print("bench calibrate: --device cuda: CUDA is not available on this machine", file=sys.stderr)
            return None
        return devices
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cmd_calibrate(args) -> int:
    from pathlib import Path

    import torch

    from harness.core.cases import DTYPES
    from harness.measure import calibrate

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = _devices(args)
    if devices is None:
        return EXIT_USAGE
    if not torch.cuda.is_available() and not args.device:
        print("note: no CUDA device here; CUDA calibration, do_bench and L2 flushing are skipped", file=sys.stderr)
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    if args.check:
        from harness.core.cases import Case
        from harness.measure import crosscheck

        dtypes = args.dtype or ["float32"]
        cases = [
            Case("sdpa", {}, device=d, batch=args.batch, heads=args.heads, kv_heads=args.heads, seq_len=n,
                 head_dim=args.head_dim, dtype=t, causal=args.causal)
            for d in devices for t in dtypes for n in args.seq_len
        ]
        print(f"cross-check: {len(cases)} SDPA cases, {args.runs} interleaved runs per method, "
              f"threads={torch.get_num_threads()}", file=sys.stderr)
        try:
            records = crosscheck.cross_check(
                cases, runs=args.runs, min_time_s=args.min_time_s, max_time_s=args.max_time_s, log=log
            )
        except RuntimeError as exc:
            print(f"bench calibrate --check: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED
        print(crosscheck.format_cross_check(records))
        return EXIT_OK
    root = Path(args.dir) if args.dir else None
    dtypes = args.dtype or list(DTYPES)
    try:
        calibration, measured = calibrate.calibrate(
            devices, dtypes, force=args.force, quick=args.quick, root=root, log=log
        )
    except (RuntimeError, OSError) as exc:
        print(f"bench calibrate: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return EXIT_FAILED
    path = calibrate.cache_path(calibration["fingerprint"], root)
    print(calibrate.format_calibration(calibration, path))
    print(f"measured now: {', '.join(measured) if measured else 'nothing (cached; --force to measure again)'}")
    return EXIT_OK
