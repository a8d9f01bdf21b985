"""The documentation: a short README, reference pages generated from the code's declarations, measured
tables rendered from docs/data, and a site that builds without a warning.

The reference must list every suite key, result column, variant and command, each with its help text;
a page's ``{{ measured("name") }}`` must name a table some command produces, and an absent table must
fail the strict build unless the build is told to render it as "not yet measured"; no page may type a
measured figure by hand.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "gen"))

import measured  # noqa: E402  (docs/gen/measured.py)
import reference  # noqa: E402  (docs/gen/reference.py)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "gen" not in p.relative_to(DOCS).parts)


# ------------------------------------------------------------------------------------------- reference


def test_every_key_column_command_option_and_parameter_has_help():
    assert reference.missing_help() == []


def test_suite_keys_page_lists_every_key_of_every_table():
    from harness.core.config import TABLES
    from harness.engine.suite import TOP_KEYS

    page = reference.suite_keys_page()
    for table in TABLES.values():
        for key in table.keys:
            assert re.search(rf"^\| `{re.escape(key.name)}` \|", page, re.M), f"[{table.name}] {key.name}"
            assert key.help.split()[0] in page
    for key in TOP_KEYS:
        assert f"`{key}`" in page


def test_columns_page_lists_every_column_with_its_doc():
    from harness.core import schema

    page = reference.columns_page()
    for column in schema.COLUMNS:
        row = re.search(rf"^\| `{re.escape(column.name)}` \|.*$", page, re.M)
        assert row, column.name
        assert ("derived" in row.group(0)) == column.derived, column.name


def test_variants_page_lists_every_variant_and_parameter():
    import harness

    page = reference.variants_page()
    for variant in harness.list_variants():
        section = page.split(f"\n### {variant.name}\n", 1)
        assert len(section) == 2, variant.name
        body = section[1].split("\n### ", 1)[0]
        for name in variant.params:
            assert f"| `{name}` |" in body, f"{variant.name}.{name}"


def test_cli_page_lists_every_command_and_option():
    page = reference.cli_page()
    found = reference.commands()
    assert {"bench run", "bench compare", "bench baseline set", "bench site"} <= {n for n, _, _ in found}
    for name, _, parser in found:
        assert f"\n## {name}\n" in page, name
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in reference._options(parser):
            for option in action.option_strings:
                assert f"`{option}" in section, f"{name} {option}"


def test_a_missing_help_text_is_reported(monkeypatch):
    from harness.core import config

    key = config.TIMING.keys[0]
    blank = config.Table("timing", (config.Key(key.name, key.type, key.default, "  "),) + config.TIMING.keys[1:])
    monkeypatch.setitem(config.TABLES, "timing", blank)
    assert reference.missing_help() == [f"suite key [timing] {key.name}"]


def test_cells_escape_what_markdown_would_eat():
    assert reference.cell("a | b <suite> *x*") == r"a \| b &lt;suite&gt; \*x\*"
    assert reference.md_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


# ------------------------------------------------------------------------------------------- measured tables


def test_every_measured_placeholder_names_a_table_a_command_produces():
    used = measured.scan(DOCS)
    assert used, "no page embeds a measured table"
    unknown = {name: pages for name, pages in used.items() if name not in measured.PRODUCERS
               and not (measured.DATA_DIR / f"{name}.json").is_file()}
    assert unknown == {}, "add the command that writes each to PRODUCERS in docs/gen/measured.py"
    for name in used:
        if (measured.DATA_DIR / f"{name}.json").is_file():
            measured.load(name)  # present: well formed, and named as the page names it


def test_every_present_table_is_valid_and_used():
    used = measured.scan(DOCS)
    for path in sorted(measured.DATA_DIR.glob("*.json")):
        doc = measured.load(path.stem)
        assert doc["machine"].get("cpu") and doc["command"] and doc["date"], path
        assert path.stem in used, f"{path} is on no page: embed it with {{{{ measured(\"{path.stem}\") }}}}"


def _doc(name="tiny"):
    sys.path.insert(0, str(ROOT))
    from benchmarks import docdata

    machine = {"cpu": "Test CPU", "cores": 2, "memory_gib": 4.0, "gpu": None, "fingerprint": "f", "torch": "2.13.0",
               "python": "3.11.7"}
    return docdata.table(name, "A tiny table", "python benchmarks/x.py --json", ["case", "ms", "ok"],
                         [["a|b", 1.23456, True], ["c", None, False]], notes=["one note"], machine=machine)


def test_a_measured_table_renders_with_its_machine_date_and_command(tmp_path, monkeypatch):
    import json

    monkeypatch.delenv(measured.ALLOW_ENV, raising=False)
    (tmp_path / "tiny.json").write_text(json.dumps(_doc()))
    text, problems = measured.expand('Before.\n\n{{ measured("tiny") }}\n\nAfter.\n', "how-to/x.md", tmp_path)
    assert problems == []
    assert "**A tiny table**" in text and "| a\\|b | 1.235 | yes |" in text and "| c | – | no |" in text
    assert "Measured on Test CPU, 2 cores, 4.0 GiB (torch 2.13.0, python 3.11.7)" in text
    assert f"{_doc()['date']}, by `python benchmarks/x.py --json`" in text and "([data](../data/tiny.json))" in text
    assert "- one note" in text and text.startswith("Before.") and text.rstrip().endswith("After.")


def test_an_absent_table_fails_the_build_unless_told_and_names_its_command(tmp_path, monkeypatch):
    page = 'Text.\n{{ measured("detector") }}\n'
    monkeypatch.delenv(measured.ALLOW_ENV, raising=False)
    text, problems = measured.expand(page, "explanation/detector.md", tmp_path)
    assert len(problems) == 1 and "docs/data/detector.json is absent" in problems[0]
    assert measured.PRODUCERS["detector"] in problems[0]
    monkeypatch.setenv(measured.ALLOW_ENV, "1")
    text, problems = measured.expand(page, "explanation/detector.md", tmp_path)
    assert problems == [] and f"not yet measured: run `{measured.PRODUCERS['detector']}`" in text


def test_malformed_tables_stray_braces_and_placeholders_in_code_blocks(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv(measured.ALLOW_ENV, "1")
    doc = _doc("other")
    (tmp_path / "tiny.json").write_text(json.dumps(doc))  # its name is not the file's
    _, problems = measured.expand('{{ measured("tiny") }}\n', "x.md", tmp_path)
    assert len(problems) == 1 and "malformed" in problems[0]
    _, problems = measured.expand('See {{ measured("tiny") }} inline, {{ measure("x") }}\n', "x.md", tmp_path)
    assert len(problems) == 2 and all("not a placeholder" in p for p in problems)
    shown = '```\n{{ measured("nothing") }}\n```\n`{{ measured("x") }}` in code\n'
    assert measured.expand(shown, "x.md", tmp_path) == (shown, [])
    _, problems = measured.expand('{{ generated("nope") }}\n', "x.md", tmp_path)
    assert "unknown generated table" in problems[0]


def test_generated_snippets_come_from_the_code():
    from harness.core.registry import FAMILIES
    from harness.measure.reference import TOLERANCE

    tolerances = reference.SNIPPETS["tolerances"]()
    assert all(f"`{dtype}`" in tolerances for dtype in TOLERANCE)
    assert all(f"`{name}`" in reference.SNIPPETS["families"]() for name in FAMILIES)
    assert "results.parquet" in reference.SNIPPETS["run-size"]()


#: Hand-typed measurements look like these: a date, the machine in prose, a decimal time or rate, a
#: measured range or ratio. Constants and targets are written as such (integers, "at most ×1.3").
MEASUREMENT = re.compile(
    r"\b20\d\d-\d\d-\d\d\b|-core VM|\bthis VM\b|quiet VM|load average"
    r"|\b\d+\.\d+\s?(?:ms|s|GB/s|GFLOP/s|TFLOP/s|MB|GB|MiB|GiB|min)\b"
    r"|\b\d+(?:\.\d+)?[–-]\d+(?:\.\d+)?\s?(?:ms|s|%|GB/s)\b|×\s?\d+\.\d\d|\b\d+\.\d\d+\s?×")
#: Conventions, not measurements (FlashAttention's FLOP convention for the backward pass).
ALLOWED = ("2.5×", "3.5×")


def test_no_measured_figure_is_typed_by_hand():
    hits = []
    for path in _pages() + [ROOT / "README.md"]:
        text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
        text = re.sub(r"`[^`\n]*`", "", text)
        for m in MEASUREMENT.finditer(text):
            if m.group(0) not in ALLOWED:
                hits.append(f"{path.relative_to(ROOT)}: {m.group(0)!r}")
    assert hits == [], "measured figures belong in docs/data (benchmarks/docdata.py), embedded with {{ measured() }}"


# ------------------------------------------------------------------------------------------- README and site


def test_readme_is_short_keeps_its_two_commands_and_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0"
    assert f"{install} && pip install -e . && bench run suites/quick.toml" in readme
    tests = re.search(r"pip install -e '\.\[test[^']*\]' && python -m pytest -q", readme)
    assert tests, "the README's test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install --quiet -e '\.\[test,docs[^']*\]'", ci) and "python -m pytest -q" in ci
    assert "ruff check ." in ci and "\nmypy\n" in ci  # lint and types, as pyproject.toml configures them
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_the_readme_picture_is_drawn_by_the_report_code():
    spec = importlib.util.spec_from_file_location("report_picture", DOCS / "gen" / "report_picture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (DOCS / "images" / "report-nightly-cpu.svg").read_text()
    assert committed.lstrip().startswith("<?xml") and "<svg" in committed
    drawn = module.picture()
    for variant in ("naive", "sdpa", "sliding_window", "linear"):
        assert variant in drawn and variant in committed


def test_every_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def leaves(items):
        for item in items:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from (leaves(value) if isinstance(value, list) else [value])

    listed = set(leaves(nav))
    on_disk = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert on_disk <= listed, on_disk - listed
    assert set(reference.PAGES) | {"reference/measured.md"} <= listed
    assert {"features.md", "workloads.md"} <= listed


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
def test_the_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", **{measured.ALLOW_ENV: "1"})
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "bench compare" in cli and "--fail-on-regression" in cli
    assert (tmp_path / "site" / "reference" / "measured" / "index.html").is_file()


def test_the_tutorial_script_runs_the_tutorials_blocks_and_installs_as_the_readme_does():
    sys.path.insert(0, str(ROOT))
    from benchmarks.tutorial import TUTORIAL, steps

    blocks = [block for _, block in steps(TUTORIAL.read_text())]
    assert blocks[0].startswith("git clone")  # replaced by a clone of this repository
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ."
    assert blocks[1] == install and install in (ROOT / "README.md").read_text()
    assert any(b.startswith("bench run suites/quick.toml") for b in blocks)
    assert any(b.startswith("bench compare") for b in blocks)


def test_the_detector_writes_its_docs_table(tmp_path):
    import argparse
    import json

    sys.path.insert(0, str(ROOT))
    from benchmarks import detector

    stage = {"aa_comparisons_with_a_regression": 1, "aa_comparisons": 3, "aa_cases_flagged": 4,
             "aa_case_comparisons": 96, "slow_probe_cases_detected": 30, "slow_probe_cases": 36,
             "slow_probe_cases_called_improved": 0, "unchanged_cases_in_slow_runs_flagged": 2,
             "unchanged_cases_in_slow_runs": 60, "aa_cases_inconclusive": 5, "slow_probe_cases_inconclusive": 6,
             "slow_probe_cases_called_unchanged": 0}
    figures = {"screen": stage, "confirm": dict(stage, aa_comparisons_with_a_regression=0),
               "probe_ratio_slow_median": 1.14, "probe_ratio_aa_median": 0.99,
               "confirm_seconds": [400.0, 650.4], "confirm_suspects": [28, 25]}
    args = argparse.Namespace(rounds=8, suite=ROOT / "suites" / "nightly-cpu.toml", probe_lengths="512,1024",
                              extra=0.15)
    detector.write_docs_table(tmp_path, figures, args, ["naive", "flash"])
    doc = json.loads((tmp_path / "detector.json").read_text())
    assert doc["name"] == "detector" and len(doc["rows"]) == 2 and doc["rows"][1][1] == "0 of 3"
    row = dict(zip(doc["columns"], doc["rows"][0]))
    assert row["slowed probe cases inconclusive"] == 6 and row["slowed probe cases called unchanged (missed)"] == 0
    assert row["A/A cases inconclusive"] == 5 and row["slowed probe cases called regressed"] == "30 of 36"
    assert doc["command"].startswith("python ")
    assert "What --confirm cost: 400–650 s a comparison, re-running 25–28 suspect cases of 32." in doc["notes"]
    assert doc["rows"][1][0] == "--confirm, 8 rounds a side (up to 24 for the undecided)"
