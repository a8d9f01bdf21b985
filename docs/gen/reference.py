"""The reference pages, generated from the code's own declarations at every docs build.

Nothing here is typed twice: suite keys come from :data:`harness.core.config.TABLES` (each
:class:`~harness.core.config.Key` with its type, default, range or choices and help; the sweep
keys are the case fields of :mod:`harness.core.cases`), result columns from
:data:`harness.core.schema.COLUMNS`, variants from the registry (:func:`harness.list_variants`,
:meth:`Variant.describe` and each :class:`~harness.core.registry.Param`), commands from the
parser (:func:`harness.cli.main.build_parser`). :data:`PAGES` maps each generated page to its
function; ``docs/gen/hooks.py`` adds them to the site and ``tests/test_docs.py`` checks that they
list everything and that everything has its help text (:func:`missing_help`).

:data:`SNIPPETS` are smaller tables computed from the code (tolerances, families, the GPU check's
plan) that a hand-written page embeds with ``{{ generated("<name>") }}`` on a line of its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

def with_root_on_path() -> None:
    """Put the repository root on sys.path (for ``benchmarks``, which is not installed): MkDocs restores
    sys.path after loading a hook, so a hook's modules ensure it when they import, not at load time."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


GENERATED_NOTE = ("*Generated from {source} at every docs build (`docs/gen/reference.py`): "
                  "edit the declaration, not this page.*")


def cell(value: Any) -> str:
    """Plain text as a Markdown table cell: pipes, angle brackets and asterisks escaped, lines folded."""
    text = "" if value is None else str(value)
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;"), ("\n", " ")):
        text = text.replace(a, b)
    return text.strip()


def code(value: Any) -> str:
    """``value`` as inline code in a table cell (empty stays empty)."""
    if value is None or value == "":
        return ""
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def sentence(text: str) -> str:
    """``text`` as a sentence: its first letter upper case, a full stop at the end."""
    text = cell(text)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".") if text else ""


def md_table(columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _number(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------------------------------------- suite keys


def _default_text(key) -> str:
    d = key.default
    if d is None:
        return "(none)"
    if isinstance(d, bool):
        return code(str(d).lower())
    if isinstance(d, str):
        return code(f'"{d}"')
    if isinstance(d, dict) or hasattr(d, "items"):
        return code("{ " + ", ".join(f"{k} = {_number(v)}" for k, v in d.items()) + " }")
    if isinstance(d, list):
        return code(d)
    return code(_number(d))


def _type_text(key) -> str:
    if key.parse is not None and key.type is object:
        return "see help"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "table", object: "any"}
    text = names.get(key.type, key.type.__name__)
    if key.list_value:
        text += " or array of integers"
    return text


def _range_text(key) -> str:
    if key.choices:
        head = f"{key.names}s: " if key.type is dict else ""
        return head + ", ".join(code(c) for c in key.choices) + (f"; each {key.range_text()}" if
                                                                 key.type is dict and key.range_text() else "")
    return cell(key.range_text())


def suite_key_rows(table) -> list[list[str]]:
    return [[code(k.name), _type_text(k), _default_text(k), _range_text(k), cell(k.help)] for k in table.keys]


#: What each table of a suite file is for (the tables themselves are declared in harness.core.config).
TABLE_INTRO = {
    "sweep": ("`[defaults]` (one value each), `[sweep]` (lists: the cartesian product) and overrides inside a "
              "`[[variant]]` table. Generated from the case fields declared in `harness/core/cases.py`."),
    "timing": "`[timing]`: how one case is timed (`harness/measure/timing.py`).",
    "run": "`[run]`: how cases are executed (`harness/engine/lifecycle.py`, `harness/engine/executors.py`).",
    "compare": "`[compare]`: what `bench compare` counts as a change for runs of this suite.",
}
TABLE_TITLES = {"sweep": "Sweep keys", "timing": "[timing]", "run": "[run]", "compare": "[compare]"}


def suite_keys_page() -> str:
    from harness.core.config import TABLES
    from harness.engine.suite import TOP_KEYS

    out = ["# Suite keys", "", GENERATED_NOTE.format(source="`harness/core/config.py` and `harness/core/cases.py`"),
           "",
           "A suite file is TOML. Its top level takes " + ", ".join(code(k) for k in TOP_KEYS) +
           " (see [Write a suite](../how-to/suites.md) for the file as a whole); every key of its tables is "
           "below, with its type, default, allowed values and meaning. `bench run --dry-run SUITE` checks a file "
           "against exactly these declarations.", ""]
    for name in ("sweep", "timing", "run", "compare"):
        table = TABLES[name]
        out += [f"## {TABLE_TITLES[name]}", "", TABLE_INTRO[name], ""]
        out.append(md_table(["key", "type", "default", "allowed", "meaning"], suite_key_rows(table)))
        if table.orders:
            out += ["", "Constraints: " + "; ".join(
                f"{code(o.key)} {o.op} {code(o.other)} (when only {code(o.other)} is given, {code(o.key)}'s "
                f"default gives way)" for o in table.orders) + "."]
        out.append("")
    out += ["## A variant's own parameters", "",
            "Each `[[variant]]` table also takes that variant's parameters (a list sweeps them): see "
            "[Variants](variants.md).", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- columns

GROUP_INTRO = {
    "identity": "what was measured: the case's fields (declared in `harness/core/cases.py`) and the variant's facts",
    "outcome": "whether the case gave a result, and why not",
    "time": "the time of one call and how it was sampled",
    "stability": "the case timed in several fresh processes: do they agree?",
    "work": "FLOPs and rates",
    "roofline": "against this machine's measured peak and bandwidth (after `bench calibrate`)",
    "telemetry": "power, clocks and energy (NVML, NVIDIA GPUs)",
    "memory": "measured and estimated memory",
    "accuracy": "against the float64 reference",
    "environment": "where the case ran",
    "record": "bookkeeping of the store",
}


def columns_page() -> str:
    from harness.core import schema

    out = ["# Result columns", "", GENERATED_NOTE.format(source="`harness/core/schema.py`"), "",
           "Every column of a run's `results.parquet`, by group. *derived* columns are computed from the measured "
           "ones by one function (`harness/measure/derive.py`) whenever a run is written or read, so every run "
           "reads with rates that agree with its own times. A variant may add columns of its own (for example "
           "`density` of a sparse pattern); those are not declared here and keep the type they are written with.",
           "", "```python", "import pandas as pd",
           'rows = pd.read_parquet("results/runs/<run_id>/results.parquet")', "```", ""]
    for group in schema.GROUPS:
        cols = schema.columns(group)
        if not cols:
            continue
        out += [f"## {group}", "", sentence(GROUP_INTRO.get(group, "")), ""]
        rows = [[code(c.name), c.dtype, cell(c.unit), "derived" if c.derived else "", cell(c.doc)] for c in cols]
        out += [md_table(["column", "dtype", "unit", "derived", "meaning"], rows), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- variants


def _param_text(p) -> str:
    bits = [f"default {code(repr(p.default) if isinstance(p.default, str) else p.default)}"]
    if p.choices:
        bits.append("one of " + ", ".join(code(c) for c in p.choices))
    if p.min is not None:
        bits.append(f"≥ {_number(p.min)}")
    return "; ".join(bits)


def _supports_text(d: dict) -> list[tuple[str, str]]:
    yes_no = lambda b: "yes" if b else "no"  # noqa: E731
    masks = [m for m, ok in (("causal", d["causal"]), ("non-causal", d["non_causal"])) if ok]
    return [
        ("devices", ", ".join(d["devices"])), ("dtypes", ", ".join(d["dtypes"])), ("masking", ", ".join(masks)),
        ("grouped-query (kv_heads < heads)", yes_no(d["gqa"])), ("backward", yes_no(d["backward"])),
        ("head_dim", d["head_dim"]), ("q_len ≠ kv_len", yes_no(d["non_square"])),
        ("variable lengths", yes_no(d["varlen"])), ("KV layouts", ", ".join(d["kv_layouts"])),
    ]


def variants_page() -> str:
    import harness
    from harness.core.registry import FAMILIES

    variants = harness.list_variants()
    out = ["# Variants", "", GENERATED_NOTE.format(source="the variant registry (`harness.list_variants()`)"), "",
           "Every registered variant, by family, with what it supports and its own parameters (a `[[variant]]` "
           "table of a suite sets or sweeps them). `bench list` prints the same; `bench list --json` for machines, "
           "`bench list --plugin FILE` with a plugin's variants. What each one computes and costs: "
           "[The variants](../explanation/variants.md).", ""]
    rows = [[f"[{code(v.name)}](#{v.name})", code(v.family), "yes" if v.exact else "approx.",
             v.level, cell(v.describe()["description"])] for v in variants]
    out += [md_table(["variant", "family", "exact", "level", "what it is"], rows), ""]
    for family in dict.fromkeys(v.family for v in variants):
        fam = FAMILIES.get(family)
        out += [f"## {family}", "", sentence(fam.help) if fam else "", ""]
        for v in (v for v in variants if v.family == family):
            d = v.describe()
            out += [f"### {v.name}", "", sentence(d["description"]), ""]
            facts = [("exact", "yes" if d["exact"] else "no (its error is measured: `rel_err`)"),
                     ("level", d["level"]), ("baseline", "yes" if d["baseline"] else "no")]
            facts += _supports_text(d)
            out += [md_table(["", ""], [[k, cell(val)] for k, val in facts]), ""]
            if v.params:
                prow = [[code(n), _param_text(p), cell(p.help)] for n, p in v.params.items()]
                out += ["Parameters:", "", md_table(["parameter", "values", "meaning"], prow), ""]
            else:
                out += ["No parameters of its own.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- CLI


def commands(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Every command and subcommand: (``bench run``, its help line, its parser), depth first."""
    from harness.cli.main import build_parser

    found: list[tuple[str, str, argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in action._choices_actions}
                for name, sub in action.choices.items():
                    found.append((f"{prefix} {name}", helps.get(name) or "", sub))
                    walk(sub, f"{prefix} {name}")

    walk(parser or build_parser(), "bench")
    return found


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _exit_status(doc: str) -> str:
    """The "Exit status" paragraph of harness/cli/common.py's docstring, as Markdown."""
    import re

    para = next((p for p in doc.split("\n\n") if p.startswith("Exit status")), "")
    para = re.sub(r":data:`(\w+)`", r"`\1`", " ".join(para.split()))
    return para.replace("``", "`")


def _usage(p: argparse.ArgumentParser) -> str:
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps the usage to the terminal: the same on every machine
    try:
        text = p.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return text[len("usage: "):] if text.startswith("usage: ") else text


def _option_name(a: argparse.Action) -> str:
    if not a.option_strings:
        return code(a.metavar or a.dest.upper())
    metavar = ""
    if a.nargs != 0:
        metavar = " " + (a.metavar if isinstance(a.metavar, str) else a.dest.upper())
    return ", ".join(code(o + metavar) for o in a.option_strings)


def _option_default(a: argparse.Action) -> str:
    if a.nargs == 0 or a.default in (None, argparse.SUPPRESS) or a.default == []:
        return ""
    return code(a.default)


def cli_page() -> str:
    from harness.cli import common

    found = commands()
    source = "the argument parser (`harness.cli.main.build_parser()`)"
    out = ["# Command line", "", GENERATED_NOTE.format(source=source),
           "", "`bench COMMAND ...` and `python -m harness COMMAND ...` are the same program. "
           "`bench --version` prints the version.", ""]
    out += [_exit_status(common.__doc__ or ""), ""]
    out += [md_table(["command", "what it does"], [[f"[{code(n)}](#{n.replace(' ', '-')})", cell(h)]
                                                    for n, h, _ in found]), ""]
    out += ["A `RUN` argument may be a run directory, a run id (or a unique part of one), `latest`, `latest~N`, "
            "`latest@SUITE`, `baseline` or `baseline@SUITE`.", ""]
    for name, help_text, p in found:
        out += [f"## {name}", "", sentence(help_text), ""]
        if p.description:
            out += [cell(p.description), ""]
        out += ["```", _usage(p), "```", ""]
        opts = _options(p)
        if opts:
            fmt = p.formatter_class(prog=p.prog)
            rows = [[_option_name(a), cell(fmt._expand_help(a) if a.help else ""), _option_default(a)] for a in opts]
            out += [md_table(["argument", "meaning", "default"], rows), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- checks


def missing_help() -> list[str]:
    """Every suite key, result column, command, option and variant parameter without its help text."""
    import harness
    from harness.core import schema
    from harness.core.config import TABLES

    missing = [f"suite key [{t.name}] {k.name}" for t in TABLES.values() for k in t.keys if not k.help.strip()]
    missing += [f"column {c.name}" for c in schema.COLUMNS if not c.doc.strip()]
    for name, help_text, p in commands():
        if not help_text.strip():
            missing.append(f"command {name}")
        missing += [f"option {name} {a.option_strings or a.dest}" for a in _options(p)
                    if not (a.help or "").strip() and a.help != argparse.SUPPRESS]
    missing += [f"parameter {v.name}.{n}" for v in harness.list_variants() for n, p in v.params.items()
                if not p.help.strip()]
    return missing


# ---------------------------------------------------------------------------------------------- snippets


def tolerances_snippet() -> str:
    from harness.measure import reference as ref

    rows = []
    for dtype, (a, r) in ref.TOLERANCE.items():
        grad = ref.GRAD_TOLERANCE_FACTOR.get(dtype, ref.DEFAULT_GRAD_TOLERANCE_FACTOR)
        rows.append([code(dtype), _number(a), _number(r), f"×{_number(grad)}"])
    return (md_table(["dtype", "max abs error", "relative error", "gradients' relative error"], rows) +
            "\n\n*The tolerances of `harness/measure/reference.py`, generated at every docs build.*")


def families_snippet() -> str:
    from harness.core.registry import FAMILIES

    rows = [[code(f.name), cell(f.help)] for f in FAMILIES.values()]
    return md_table(["family", "what it means"], rows)


def gpu_plan_snippet() -> str:
    with_root_on_path()
    from benchmarks import gpu_plan

    p = gpu_plan.plan()
    steps = p["steps"]
    rows = [[i, cell(s.title), f"{s.timeout_s:.0f} s", f"{s.predicted_s:.0f} s"] for i, s in enumerate(steps, 1)]
    rows.append(["", "total", f"{p['timeouts_s']:.0f} s", f"{p['predicted_s']:.0f} s"])
    return (md_table(["#", "step", "timeout", "predicted (cost model)"], rows) +
            "\n\n*Computed from `benchmarks/gpu_plan.py` at every docs build: the timeouts are the plan's, the "
            "predictions its cost model's (`python benchmarks/gpu_plan.py --costs` lists every figure of the model "
            "with its source). They are predictions, not measurements.*")


def run_size_snippet() -> str:
    """The files of the committed nightly baseline and their sizes (what one night adds to the history)."""
    run = ROOT / "results" / "baseline" / "nightly-cpu"
    files = sorted(f for f in run.iterdir() if f.is_file())
    rows = [[code(f.name), f"{f.stat().st_size / 1024:.0f} KiB"] for f in files]
    total = sum(f.stat().st_size for f in files)
    rows.append(["total", f"{total / 1024:.0f} KiB"])
    return (md_table(["file", "size"], rows) +
            "\n\n*The files of `results/baseline/nightly-cpu/` (the committed baseline), sized at every docs build.*")


#: Generated pages: path under docs/ -> function returning its Markdown.
PAGES: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_page,
    "reference/suite-keys.md": suite_keys_page,
    "reference/columns.md": columns_page,
    "reference/variants.md": variants_page,
}

#: Tables computed from the code that hand-written pages embed with ``{{ generated("<name>") }}``.
SNIPPETS: dict[str, Callable[[], str]] = {
    "tolerances": tolerances_snippet,
    "families": families_snippet,
    "gpu-plan": gpu_plan_snippet,
    "run-size": run_size_snippet,
}


if __name__ == "__main__":  # print one page: python docs/gen/reference.py reference/cli.md
    print(PAGES[sys.argv[1]]() if sys.argv[1] in PAGES else SNIPPETS[sys.argv[1]]())
