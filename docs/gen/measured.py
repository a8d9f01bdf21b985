"""Measured tables in the docs: ``{{ measured("<name>") }}`` on a line of its own.

A page never types a measured figure: it names a table, and the docs build renders
``docs/data/<name>.json`` (written by a benchmark script through ``benchmarks/docdata.py``) as a
Markdown table followed by the machine, the date and the command that produced it, and the
script's notes. :data:`PRODUCERS` says which command writes each table the pages use, so that a
table not yet measured is reported with the command to run.

A table whose file is absent fails the strict build (the hook logs a warning naming the file and
the command), unless the build is told otherwise with ``ATTENTION_BENCH_DOCS_UNMEASURED=1``: then
the page says "not yet measured: run ..." where the table would be. ``tests/test_docs.py`` builds
with that flag; CI (``.ci/run``) builds without it.

``{{ generated("<name>") }}`` embeds a table computed from the code at build time instead
(``docs/gen/reference.py``, :data:`SNIPPETS`): no machine, nothing measured.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from reference import SNIPPETS, cell, md_table, with_root_on_path  # noqa: E402  (docs/gen/reference.py)

#: Set to 1 to build with absent measured tables (the page says what to run instead of failing).
ALLOW_ENV = "ATTENTION_BENCH_DOCS_UNMEASURED"
DATA_DIR = ROOT / "docs" / "data"

#: ``{{ measured("name") }}`` or ``{{ generated("name") }}``, alone on its line.
PLACEHOLDER = re.compile(r'^[ \t]*\{\{\s*(measured|generated)\(\s*"([A-Za-z0-9_.-]+)"\s*\)\s*\}\}[ \t]*$', re.M)
#: Anything else between double braces (a typo of the above).
STRAY = re.compile(r"\{\{.*?\}\}")

#: Where the run directories the run-table commands read are kept (git-ignored under results/).
RUNS = "results/docs"
_RT = "python benchmarks/run_tables.py"

#: The command that writes each measured table the pages use. One command may write several tables.
PRODUCERS: dict[str, str] = {
    "tutorial": "python benchmarks/tutorial.py --json",
    "fidelity": "python benchmarks/fidelity.py --rounds 3 --threads 1,2 --spread-suite suites/quick.toml "
                "--spread-runs 2 --json",
    "fidelity-spread": "python benchmarks/fidelity.py --rounds 3 --threads 1,2 --spread-suite suites/quick.toml "
                       "--spread-runs 2 --json",
    "processes": f"for p in 1 2 3; do bench run suites/quick.toml --processes $p -o {RUNS}/processes/p$p-1; done "
                 f"&& for p in 3 2 1; do bench run suites/quick.toml --processes $p -o {RUNS}/processes/p$p-2; done "
                 f"&& {_RT} " + " ".join(f"{RUNS}/processes/p{p}-{i}" for i, p in ((1, 1), (1, 2), (1, 3), (2, 3),
                                                                                  (2, 2), (2, 1)))
                 + " --table processes --json",
    "isolation": "python benchmarks/isolation_overhead.py suites/quick.toml --json",
    "decode": f"bench calibrate --threads 1 && bench run suites/decode.toml --only Lkv16384 -o {RUNS}/decode && "
              f"{_RT} {RUNS}/decode --table decode --table paged --table calibration --json",
    "paged": f"bench calibrate --threads 1 && bench run suites/decode.toml --only Lkv16384 -o {RUNS}/decode && "
             f"{_RT} {RUNS}/decode --table decode --table paged --table calibration --json",
    "calibration": f"bench calibrate --threads 1 && bench run suites/decode.toml --only Lkv16384 -o {RUNS}/decode && "
                   f"{_RT} {RUNS}/decode --table decode --table paged --table calibration --json",
    "varlen": f"bench run suites/varlen.toml --only lengths=zipf -o {RUNS}/varlen && "
              f"{_RT} {RUNS}/varlen --table varlen --json",
    "layers": f"bench run suites/layers-4096.toml -o {RUNS}/layers-4096 && "
              f"{_RT} {RUNS}/layers-4096 --table layers --json",
    "profile": f"bench run suites/quick.toml --profile -o {RUNS}/profile && "
               f"{_RT} {RUNS}/profile --table profile --json",
    "site-build": "python benchmarks/site_build.py --json",
    "detector": "python benchmarks/detector.py --aa 1 --slow 1 --extra 0.15 --probe naive,flash --docs-json",
    "executors": f"pip install -e '.[ray]' && bench run suites/quick.toml -o {RUNS}/executor-process-1 && "
                 f"bench run suites/quick.toml --executor ray -o {RUNS}/executor-ray && "
                 f"bench run suites/quick.toml -o {RUNS}/executor-process-2 && {_RT} {RUNS}/executor-process-1 "
                 f"{RUNS}/executor-ray {RUNS}/executor-process-2 --table executors --json",
    "targets": "python benchmarks/targets.py --json",
    "feature-cost": f"bench run suites/features.toml --processes 3 -o {RUNS}/features && "
                    f"python benchmarks/feature_cost.py {RUNS}/features --json docs/data/feature-cost.json",
    "contention": "python benchmarks/contention.py --json",
    "contention-overhead": "python benchmarks/contention.py --json",
    "winners-llama-decode": f"bench run --model llama-3.1-8b --workload decode -o {RUNS}/llama-decode && "
                            f"python benchmarks/winners_table.py {RUNS}/llama-decode --json",
    "cascade-crossover": f"python benchmarks/cascade_crossover.py -o {RUNS}/cascade-crossover --json",
}


def allow_missing() -> bool:
    return os.environ.get(ALLOW_ENV, "") not in ("", "0")


def placeholders(text: str) -> Iterator[tuple[str, str]]:
    """(kind, name) of every placeholder in a page's Markdown, outside fenced code blocks."""
    for m in PLACEHOLDER.finditer(_without_fences(text)):
        yield m.group(1), m.group(2)


def _without_fences(text: str) -> str:
    """The text with fenced code blocks blanked, of the same length (a placeholder shown in a code block is
    no placeholder)."""
    return re.sub(r"(?ms)^([ \t]*)(```|~~~).*?^\1\2[ \t]*$", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def scan(docs_dir: Path) -> dict[str, list[str]]:
    """Every measured table the pages under ``docs_dir`` use: name -> the pages (paths under docs_dir)."""
    used: dict[str, list[str]] = {}
    for page in sorted(docs_dir.rglob("*.md")):
        rel = page.relative_to(docs_dir).as_posix()
        if rel.startswith("gen/"):
            continue
        for kind, name in placeholders(page.read_text()):
            if kind == "measured":
                used.setdefault(name, []).append(rel)
    return used


def producer(name: str) -> str:
    """The command that writes table ``name``, or where to look for it."""
    if name in PRODUCERS:
        return PRODUCERS[name]
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py")
                     if f'"{name}"' in p.read_text())
    return f"the script that writes it ({', '.join(scripts)})" if scripts else "no known script writes it"


def load(name: str, data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """The table ``name``, checked (FileNotFoundError when absent, ValueError when malformed)."""
    with_root_on_path()
    from benchmarks import docdata

    path = data_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(path)
    doc = docdata.read(path)
    if doc["name"] != name:
        raise ValueError(f"{path}: its name is {doc['name']!r}, not {name!r}")
    return doc


def number(x: Any) -> str:
    """A measured cell as text: integers as they are, other numbers to 4 significant digits."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}".replace(",", " ") if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if x.is_integer() and abs(x) < 1e15:
            return number(int(x))
        return f"{x:.4g}"
    return cell(x)


def machine_text(m: dict[str, Any]) -> str:
    bits = [m.get("cpu") or "an unknown CPU"]
    if m.get("cores"):
        bits.append(f"{m['cores']} cores")
    if m.get("memory_gib"):
        bits.append(f"{m['memory_gib']} GiB")
    if m.get("gpu"):
        bits.append(str(m["gpu"]))
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "python") if m.get(k))
    return ", ".join(bits) + (f" ({versions})" if versions else "")


def render(doc: dict[str, Any], link: str | None = None) -> str:
    """A measured table as Markdown: title, table, where and how it was measured, notes."""
    rows = [[number(c) for c in r] for r in doc["rows"]]
    out = [f"**{cell(doc['title'])}**", "", md_table([cell(c) for c in doc["columns"]], rows), ""]
    source = f"; from `{doc['source']}`" if doc.get("source") else ""
    data = f" ([data]({link}))" if link else ""
    out.append(f"*Measured on {cell(machine_text(doc['machine']))}, {doc['date']}, by `{doc['command']}`"
               f"{source}.{data}*")
    notes = [n for n in doc.get("notes") or [] if n]
    if notes:
        out += [""] + [f"- {cell(n)}" for n in notes]
    return "\n".join(out)


def not_measured(name: str) -> str:
    return (f'!!! warning "Not yet measured: `docs/data/{name}.json`"\n\n'
            f"    not yet measured: run `{producer(name)}`")


def expand(markdown: str, page_path: str, data_dir: Path = DATA_DIR) -> tuple[str, list[str]]:
    """The page's Markdown with every placeholder replaced, and the problems found (absent or
    malformed tables, unknown generated tables, stray braces). ``page_path``: the page under docs/."""
    problems: list[str] = []
    allow = allow_missing()

    def one(m: re.Match) -> str:
        kind, name = m.group(1), m.group(2)
        if kind == "generated":
            if name not in SNIPPETS:
                problems.append(f"{page_path}: unknown generated table {name!r} (one of {', '.join(SNIPPETS)})")
                return ""
            return SNIPPETS[name]()
        try:
            doc = load(name, data_dir)
        except FileNotFoundError:
            if not allow:
                problems.append(f"{page_path}: measured table docs/data/{name}.json is absent: run "
                                f"`{producer(name)}` (or build with {ALLOW_ENV}=1 to render it as not yet measured)")
            return not_measured(name)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{page_path}: measured table docs/data/{name}.json is malformed: {exc}")
            return not_measured(name)
        link = posixpath.relpath(f"data/{name}.json", posixpath.dirname(page_path) or ".")
        return render(doc, link)

    fenced = _without_fences(markdown)
    out, last = [], 0
    for m in PLACEHOLDER.finditer(fenced):
        out.append(markdown[last:m.start()])
        out.append(one(m))
        last = m.end()
    out.append(markdown[last:])
    text = "".join(out)
    for m in STRAY.finditer(re.sub(r"`[^`\n]*`", "", _without_fences(text))):
        problems.append(f"{page_path}: {m.group(0)!r} is not a placeholder: write "
                        '{{ measured("name") }} or {{ generated("name") }} alone on its line')
    return text, problems


def index_page(docs_dir: Path, data_dir: Path = DATA_DIR) -> str:
    """The generated page listing every measured table the docs use: where, when, on what, by which command."""
    used = scan(docs_dir)
    rows = []
    for name in sorted(used):
        pages = ", ".join(f"[{p}](../{p})" for p in used[name])
        try:
            doc = load(name, data_dir)
            state = f"{doc['date']}, {cell(machine_text(doc['machine']))}"
            command = doc["command"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            state, command = "**not yet measured**", producer(name)
        rows.append([f"`{name}`", pages, state, f"`{command}`"])
    intro = ["# Measured results", "",
             "*Generated at every docs build (`docs/gen/measured.py`).*", "",
             "Every measured figure in these pages comes from one of the tables below: a JSON file under "
             "`docs/data/`, written by the command shown (through `benchmarks/docdata.py`, which records the "
             "machine and the date), and rendered where a page says `{{ measured(\"name\") }}`. To re-measure a "
             "table, run its command on a quiet machine and commit the file. Timings describe the machine they "
             "were taken on: run the same command on yours.", ""]
    return "\n".join(intro + [md_table(["table", "used on", "measured", "command"], rows), ""])
