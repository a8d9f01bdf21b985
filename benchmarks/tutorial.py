"""Follow the tutorial (docs/tutorial.md) in a fresh clone and time every step.

    python benchmarks/tutorial.py [--keep DIR] [--json [DIR]]

Reads the tutorial's ```bash blocks in order and runs each in a fresh clone of this repository's
committed HEAD (the tutorial's own ``git clone`` block is replaced by that clone), in one directory,
each block in its own ``bash -e`` with the clone's virtual environment activated once it exists.
Prints each step's wall time and the total; ``--json`` writes them as the ``tutorial`` table for the
docs (``benchmarks/docdata.py``). The install step downloads packages unless pip's cache has them:
say which in the notes you keep (the script records whether pip's cache directory was non-empty).
A step that fails stops the run with its output.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run_tables import add_json_option, write_tables  # noqa: E402

TUTORIAL = ROOT / "docs" / "tutorial.md"


def steps(text: str) -> list[tuple[str, str]]:
    """(the section heading it is under, the block's commands) for each ```bash block, in order."""
    out, heading = [], ""
    for m in re.finditer(r"(?ms)^(#{1,3} [^\n]*)$|^```bash\n(.*?)^```", text):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            out.append((heading, m.group(2).strip()))
    return out


def pip_cache_used() -> bool:
    cache = Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip")
    return cache.is_dir() and any(cache.iterdir())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=Path, help="clone into this (new) directory and keep it")
    add_json_option(p)
    args = p.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="tutorial-"))
    clone = work / "attention-bench"
    cached = pip_cache_used()
    rows, total = [], 0.0
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    rows.append(["1. Install", "git clone (local)", round(time.perf_counter() - t0, 1)])
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for heading, block in steps(TUTORIAL.read_text()):
        if block.startswith("git clone"):
            continue
        script = "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi\n" + block
        t = time.perf_counter()
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        first = block.splitlines()[0]
        print(f"{wall:7.1f} s  {heading}: {first[:90]}", flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"step failed (exit {proc.returncode}): {first}", file=sys.stderr)
            return 1
        rows.append([heading, first if len(block.splitlines()) == 1 else first + " …", round(wall, 1)])
    total = sum(r[2] for r in rows)
    rows.append(["total", "", round(total, 1)])
    print(f"{total:7.1f} s  total ({os.cpu_count()} cores)")
    if args.json:
        notes = [f"Every bash block of docs/tutorial.md, in order, in a fresh clone; {os.cpu_count()} cores.",
                 "pip's cache held packages before the run (downloads were partly cached)." if cached else
                 "pip's cache was empty: the install step includes downloading torch and the dependencies."]
        write_tables(args.json, [{"name": "tutorial", "title": "The tutorial, followed in a fresh clone",
                                  "columns": ["step", "command", "wall s"], "rows": rows, "notes": notes}])
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
