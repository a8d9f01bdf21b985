"""The GPU check's summary (its last step) and the import of a GPU run's files into the repository.

    python benchmarks/gpu_summary.py --work DIR --out OUT [--rehearse]   # run by gpu_check.py, last
    python benchmarks/gpu_check.py --import FILES_DIR                      # here, after the GPU run

The summary reads what the steps left in the work directory (``check.json`` from the checker, the steps'
``steps/*.json``, the validation run, the calibration), rebuilds the validation run's
``results.parquet``/``samples.parquet`` from its logs when a timeout cut the run before it wrote
them, and writes ``gpu_check.md`` and ``gpu_check.json`` into OUT and the work directory. The
markdown ends with the comparison a reader wants: sdpa-flash forward TFLOP/s at FlashAttention-2's
H100 shape against its published 335 TFLOP/s, the % of the measured bf16 matmul peak, flex ÷
sdpa-flash against FlexAttention's published ~90% (forward) / ~85% (backward), our Triton kernel ÷
sdpa-flash, harness ÷ do_bench for three cases, and every check's pass/fail. Published figures are
labelled as published, with their source; everything else was measured by the run (or, in a
rehearsal, comes from the cost model and says so).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gpu_plan  # noqa: E402

PUBLISHED = {
    "fa2_fwd": (335.0, "FlashAttention-2 on H100 SXM5, forward, head_dim 128, 16K tokens: up to 335 TFLOP/s "
                       "(published: Dao 2023, FlashAttention-2 paper, H100 benchmarks)"),
    "flex_fwd": (0.90, "FlexAttention ≈ 90% of FlashAttention-2 forward (published: PyTorch blog, "
                       "'FlexAttention: The Flexibility of PyTorch with the Performance of FlashAttention', 2024)"),
    "flex_bwd": (0.85, "FlexAttention ≈ 85% of FlashAttention-2 backward (published: same blog post)"),
}
FA2 = dict(batch=1, heads=16, seq_len=16384, head_dim=128)
S2 = dict(batch=4, heads=32, seq_len=4096, head_dim=64)
CROSSCHECK_GOAL = 0.03


def gpu_dir_name(name: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-") or "unknown-gpu"


def _num(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return math.nan
    return x


def materialise(run: Path):
    """The validation run's rows (results.parquet, else its rows log); writes results.parquet and
    samples.parquet from the logs when the run was cut before writing them. None when there are no rows."""
    from harness.core import schema
    from harness.engine.store import StoreError, read_results, read_samples

    if not (run / "results.parquet").exists() and not (run / "rows.jsonl").exists():
        return None
    try:
        rows = read_results(run)
    except StoreError as exc:  # killed before its first row
        print(f"no validation rows: {exc}", file=sys.stderr)
        return None
    if not (run / "results.parquet").exists() and len(rows):
        try:
            rows.to_parquet(run / "results.parquet", index=False, schema=schema.arrow_schema(rows))
        except Exception:  # a column the log left empty that the schema types: let pyarrow infer it
            rows.to_parquet(run / "results.parquet", index=False)
    if not (run / "samples.parquet").exists():
        try:
            read_samples(run).reset_index(drop=True).to_parquet(run / "samples.parquet", index=False)
        except Exception as exc:  # no samples (every case skipped): say so, and go on
            print(f"samples.parquet not written: {type(exc).__name__}: {exc}", file=sys.stderr)
    return rows


def calibration_path(work: Path, rehearse: bool, fingerprint: str | None, since: float = 0.0) -> Path | None:
    """The calibration the check measured: the rehearsal's, else results/calibration/<fingerprint>.json,
    else (the environment step did not say) the newest one written since the check started."""
    if rehearse:
        return work / "calibration" / "rehearsal.json"
    root = ROOT / "results" / "calibration"
    if fingerprint and (root / f"{fingerprint}.json").is_file():
        return root / f"{fingerprint}.json"
    fresh = sorted((p for p in root.glob("*.json") if p.stat().st_mtime >= since), key=lambda p: p.stat().st_mtime)
    return fresh[-1] if fresh else None


def peak(calibration: dict | None, dtype: str) -> float:
    entry = ((calibration or {}).get("entries") or {}).get("cuda") or {}
    return _num(((entry.get("matmul") or {}).get(dtype) or {}).get("tflops_per_s_best"))


def find(rows, variant: str, shape: dict, backend: str | None = None, mode: str = "fwd", dtype: str = "bfloat16",
         causal: bool = False):
    """The row of one validation case (a dict), or None."""
    if rows is None or not len(rows):
        return None
    for _, r in rows.iterrows():
        params = json.loads(r["params"]) if isinstance(r.get("params"), str) and r["params"] else {}
        if (r["variant"] == variant and params.get("backend") == backend and r["mode"] == mode and r["dtype"] == dtype
                and bool(r["causal"]) == causal and all(int(r[k]) == v for k, v in shape.items())
                and (r.get("q_len") is None or _num(r.get("q_len")) != _num(r.get("q_len")))):
            return r.to_dict()
    return None


def tflops(row) -> float:
    """TFLOP/s of an ok row: its column, else FLOPs over the median time (whichever process derived it)."""
    if not row or row.get("status") != "ok":
        return math.nan
    t = _num(row.get("tflops_per_s"))
    if math.isfinite(t):
        return t
    return _num(row.get("flops")) / (_num(row.get("time_ms")) / 1e3) / 1e12


def _state(row) -> str:
    if row is None:
        return "no row (not reached)"
    return f"{row.get('status')}: {str(row.get('reason') or '')[:90]}"


def comparison(rows, calibration: dict | None, steps: list[dict]) -> list[dict]:
    """The figures a reader wants, each with ours, the published figure or goal, and a verdict."""
    out = []

    def add(figure, ours, published="", verdict="", note=""):
        out.append({"figure": figure, "ours": ours, "published": published, "verdict": verdict, "note": note})

    flash = find(rows, "sdpa", FA2, "flash")
    t = tflops(flash)
    pub, src = PUBLISHED["fa2_fwd"]
    add("sdpa-flash fwd bf16 TFLOP/s, B1 H16 L16384 D128", f"{t:.1f}" if t == t else _state(flash),
        f"{pub:.0f} (FA2, published)", f"{t / pub:.0%} of FA2's figure" if t == t else "", src)
    bf16 = peak(calibration, "bfloat16")
    pct = _num((flash or {}).get("pct_of_peak"))
    pct = pct if math.isfinite(pct) else (100 * t / bf16 if t == t and bf16 == bf16 else math.nan)
    fake = (((calibration or {}).get("entries") or {}).get("cuda") or {}).get("rehearsal")
    source = "REHEARSAL: cost model" if fake else "measured: bench calibrate"
    add("sdpa-flash fwd bf16, % of the measured bf16 matmul peak", f"{pct:.1f}%" if pct == pct else "not measured",
        f"peak {bf16:.0f} TFLOP/s ({source})" if bf16 == bf16 else "no calibration", "")
    for backend in ("cudnn", "efficient"):
        row = find(rows, "sdpa", FA2, backend)
        x = tflops(row)
        add(f"sdpa-{backend} fwd bf16 TFLOP/s, FA2 shape", f"{x:.1f}" if x == x else _state(row), "", "")
    for label, shape, mode, key in (("FA2 shape fwd", FA2, "fwd", "flex_fwd"),
                                    ("B4 L4096 D64 fwd", S2, "fwd", "flex_fwd"),
                                    ("FA2 shape fwd+bwd", FA2, "fwd_bwd", "flex_bwd")):
        f, s = tflops(find(rows, "flex", shape, mode=mode)), tflops(find(rows, "sdpa", shape, "flash", mode=mode))
        pub, src = PUBLISHED[key]
        ratio = f / s if f == f and s == s and s > 0 else math.nan
        add(f"flex ÷ sdpa-flash, {label}", f"{ratio:.0%}" if ratio == ratio else "not measured",
            f"~{pub:.0%} (published, {'backward' if key == 'flex_bwd' else 'forward'})",
            ("at or above" if ratio >= pub else "below") + " the published ratio" if ratio == ratio else "",
            src + (" — ours times forward+backward together" if key == "flex_bwd" else ""))
    for label, shape in (("FA2 shape", FA2), ("B4 L4096 D64", S2)):
        tr, s = tflops(find(rows, "triton", shape)), tflops(find(rows, "sdpa", shape, "flash"))
        ratio = tr / s if tr == tr and s == s and s > 0 else math.nan
        add(f"our Triton kernel ÷ sdpa-flash, {label} fwd bf16", f"{ratio:.0%}" if ratio == ratio else "not measured",
            "", "")
    cross = next((st for st in steps if st.get("step") == "crosscheck"), {})
    for v in (cross.get("figures") or {}).get("crosscheck", []):
        add(f"harness ÷ {v['reference']}: {v['case']} ({v['method']})", f"{v['ratio']:.3f}",
            f"goal 1 ± {CROSSCHECK_GOAL:.0%}", "within" if v["within_goal"] else "OUTSIDE", "")
    if not (cross.get("figures") or {}).get("crosscheck"):
        add("harness ÷ do_bench (3 cases)", f"not measured ({cross.get('status', 'not run')})",
            f"goal 1 ± {CROSSCHECK_GOAL:.0%}")
    for st in steps:
        if st.get("step") != "summary":
            add(f"check: {st.get('title')}", st.get("status", "?").upper(), "",
                str(st.get("summary", "")).replace("|", "/")[:160])
    return out


def _row_table(rows) -> list[str]:
    if rows is None or not len(rows):
        return ["(no validation rows)"]
    lines = ["| case | status | ms | TFLOP/s | % peak | host-bound | throttled | note |",
             "|---|---|---|---|---|---|---|---|"]
    from harness.core.cases import Case

    for _, r in rows.iterrows():
        d = r.to_dict()
        try:
            label = Case.from_row(d).label()
        except Exception:
            label = f"{d.get('variant')} {d.get('mode')} L{d.get('seq_len')}"
        t = tflops(d)
        ms, pct = _num(d.get("time_ms")), _num(d.get("pct_of_peak"))
        note = str(d.get("reason") or d.get("timing_note") or "")[:80].replace("|", "/")
        lines.append(f"| {label} | {d.get('status')} | {ms:.3f} | {t:.1f} | {pct:.1f} | {d.get('host_bound')} | "
                     f"{d.get('throttled')} | {note} |".replace("nan", "–"))
    return lines


def render(data: dict) -> str:
    lines = [f"# GPU check: {data['gpu']}", ""]
    if data["rehearsal"]:
        lines += ["**REHEARSAL on a CPU against a fake GPU: every figure below comes from the cost model or a fake "
                  "timer; none is a measurement.**", ""]
    pre = data.get("preflight") or {}
    lines += [f"started {data.get('started')}, {data.get('elapsed_s')} s; Python {pre.get('python')}; "
              + ", ".join(f"{k} {v}" for k, v in (pre.get("versions") or {}).items() if v),
              f"C compiler: {(pre.get('compiler') or {}).get('path')}; not installed: "
              + ", ".join(k for k, v in (pre.get("absent_expected") or {}).items() if not v), ""]
    predicted = {s["key"]: s for s in (data.get("plan") or {}).get("steps", [])}
    lines += ["## Steps", "", "| step | result | seconds | timeout | predicted | summary |",
              "|---|---|---|---|---|---|"]
    for st in data["steps"]:
        p = predicted.get(st.get("step"), {})
        lines.append(f"| {st.get('title')} | {st.get('status')} | {st.get('seconds')} | {st.get('timeout_s', 0):.0f} | "
                     f"{p.get('predicted_s', '')} | {str(st.get('summary', '')).replace('|', '/')} |")
    lines += ["", "## Validation rows", ""] + _row_table(data.pop("_rows", None))
    for st in data["steps"]:
        if st.get("lines"):
            lines += ["", f"## {st.get('title')}", "", "```", *[str(x) for x in st["lines"]], "```"]
    lines += ["", "## Files that come back", ""] + [f"- {n}" for n in data.get("files", [])]
    lines += ["", "## The comparison", "", "| figure | ours | published / goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['figure']} | {c['ours']} | {c['published']} | {c['verdict']} |" for c in data["comparison"]]
    notes = sorted({c["note"] for c in data["comparison"] if c["note"] and not c["figure"].startswith("check:")})
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def summarise(work: Path, out: Path, rehearse: bool) -> dict:
    check = json.loads((work / "check.json").read_text())
    if (work / "plan.json").exists():
        check["plan"] = json.loads((work / "plan.json").read_text())
    steps = check["steps"]
    env = next((s for s in steps if s.get("step") == "env"), {})
    rows = materialise(work / "validate")
    cal_path = calibration_path(work, rehearse, env.get("fingerprint"), check.get("started_epoch", 0.0))
    calibration = json.loads(cal_path.read_text()) if cal_path and cal_path.exists() else None
    files = [n for n in gpu_plan.FILES if n.startswith("gpu_check") or
             (work / "validate" / n).exists() or (n == "calibration.json" and calibration is not None)]
    try:
        compared = comparison(rows, calibration, steps)
    except Exception as exc:  # a summary without its comparison beats no summary
        compared = [{"figure": "comparison", "ours": f"failed: {type(exc).__name__}: {exc}", "published": "",
                     "verdict": "", "note": ""}]
    data = {**check, "gpu": env.get("gpu") or "unknown GPU", "gpu_dir": gpu_dir_name(env.get("gpu")),
            "rehearsal": rehearse, "files": files, "comparison": compared}
    try:
        text = render({**data, "_rows": rows})
    except Exception as exc:  # the rows' table is the likeliest to trip on an odd row: leave it out
        print(f"the validation rows could not be tabulated: {type(exc).__name__}: {exc}", file=sys.stderr)
        text = render({**data, "_rows": None})

    for d in (work, out):
        d.mkdir(parents=True, exist_ok=True)
        (d / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
        (d / "gpu_check.md").write_text(text)
    return data


def import_files(src: Path, dest_root: Path, allow_rehearsal: bool = False) -> int:
    """``gpu_check.py --import``: the files of a GPU run (``src``) into ``dest_root/<gpu>/``, the validation
    run under ``run/``, and its report rendered there. One line and exit status 2 on bad input."""
    summary = src / "gpu_check.json"
    if not src.is_dir() or not summary.is_file():
        print(f"gpu_check --import: {src} holds no gpu_check.json (give the folder the GPU run's files came back to)")
        return 2
    try:
        data = json.loads(summary.read_text())
    except ValueError as exc:
        print(f"gpu_check --import: {summary} is not JSON ({exc})")
        return 2
    if data.get("rehearsal") and not allow_rehearsal:
        print(f"gpu_check --import: {src} is a rehearsal (fake GPU), not a measurement: not imported")
        return 2
    dest = dest_root / (data.get("gpu_dir") or gpu_dir_name(data.get("gpu")))
    run = dest / "run"
    run.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in gpu_plan.FILES:
        if (src / name).is_file():
            target = run / name if name in ("results.parquet", "samples.parquet", "run.json") else dest / name
            shutil.copyfile(src / name, target)
            copied.append(str(target.relative_to(dest)))
    print(f"imported {len(copied)} files into {dest}: {', '.join(copied)}")
    if not (run / "results.parquet").is_file() or not (run / "run.json").is_file():
        print("gpu_check --import: no validation run among the files: no report rendered")
        return 1
    proc = subprocess.run([sys.executable, "-m", "harness", "report", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    print((proc.stdout + proc.stderr).strip().splitlines()[-1] if (proc.stdout + proc.stderr).strip() else "")
    if proc.returncode != 0:
        return 1
    print(f"report: {run / 'report.html'}; commit {dest} as the reference for this GPU")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rehearse", action="store_true")
    args = parser.parse_args(argv)
    data = summarise(Path(args.work), Path(args.out), args.rehearse)
    verdicts = [c for c in data["comparison"] if c["figure"].startswith("check:")]
    print(f"summary: {data['gpu']}: " + ", ".join(f"{c['figure'][7:].split(' (')[0]} {c['ours']}" for c in verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
