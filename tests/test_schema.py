"""The result schema: every column a real run writes is declared, with the type it is written as."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness.core import schema
from harness.core.cases import Case
from tests.runs import TINY_SUITE, bench_run

ROOT = Path(__file__).resolve().parents[1]

BOOM = '''
from harness import attention_flops, register_variant

@register_variant("boom", family="dense", exact=True, flops=attention_flops)
def boom(q, k, v, *, causal):
    raise RuntimeError("boom")
'''

#: The report tests' tiny suite, plus a variant with a column of its own and one that raises.
SUITE = 'plugins = ["boom.py"]\n' + TINY_SUITE + """
[[variant]]
name = "block_sparse"
seq_len = [64]
[[variant]]
name = "boom"
seq_len = [32]
causal = [false]
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("schema-run")
    (tmp / "boom.py").write_text(BOOM)
    return bench_run(tmp, SUITE)


def _variant_columns(rows: pd.DataFrame) -> set[str]:
    """The columns the run's variants add of their own (``columns(case)`` of register_variant)."""
    from harness import get_variant

    extra: set[str] = set()
    for row in rows.to_dict("records"):
        if row["variant"] == "boom":
            continue
        variant = get_variant(row["variant"])
        if variant.columns is not None:
            extra |= set(variant.columns(Case.from_row(row)))
    return extra


def test_a_real_runs_columns_are_all_declared_with_their_types(run_dir):
    written = pq.read_schema(run_dir / "results.parquet")
    rows = pd.read_parquet(run_dir / "results.parquet")
    assert set(rows["status"]) == {"ok", "skipped", "error"}  # the run exercised every kind of row
    undeclared = {f.name for f in written if f.name not in schema.BY_NAME}
    assert undeclared == _variant_columns(rows) and "density" in undeclared
    assert all(schema.group_of(name) == schema.EXTRA for name in undeclared)
    assert set(schema.names()) <= set(written.names)  # every declared column is written, measured or not
    wrong = {f.name: str(f.type) for f in written
             if f.name in schema.BY_NAME and f.type != schema.arrow_type(schema.BY_NAME[f.name].dtype)}
    assert wrong == {}


def test_a_real_runs_rows_hold_values_of_the_declared_types(run_dir):
    lines = (run_dir / "rows.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 5 * 4 + 2 + 1  # the tiny suite's 5 entries × 4, block_sparse's 2, boom's 1
    problems = {r["variant"] + " " + r["status"]: schema.row_problems(r) for r in rows}
    assert all(p == [] for p in problems.values()), problems
    for r in rows:  # the identity columns rebuild the case the row measured
        assert Case.from_row(r).case_id == r["case_id"]


def test_row_problems_finds_wrong_types_and_missing_columns():
    row = schema.base_row(Case("naive", {}), "dense", True, 2)
    assert schema.row_problems(row) == []
    bad = dict(row, reps="3", exact=1.0, seq_len=True, time_ms="fast")
    found = " ".join(schema.row_problems(bad))
    assert all(name in found for name in ("reps", "exact", "seq_len", "time_ms"))
    del row["rel_err"]
    assert schema.row_problems(row) == ["rel_err: missing"]


def test_base_row_is_the_case_and_nothing_measured():
    case = Case("sdpa", {"backend": "flash"}, heads=8, kv_heads=2, seq_len=128, dtype="bfloat16", causal=True)
    row = schema.base_row(case, "dense", True, 4)
    assert list(row) == list(schema.names(per_case=True))
    assert Case.from_row(row) == case
    assert row["status"] == "ok" and row["reason"] == "" and row["reps"] == 0 and row["threads"] == 4
    assert math.isnan(row["time_ms"]) and row["timing_stop"] is None and row["throttled"] is None
    assert set(schema.empty_row()) == set(row)
    assert schema.IDENTITY == tuple(n for n in schema.names("identity") if n not in ("run_id", "suite"))


def test_declarations_are_complete_and_groups_checked():
    assert len(schema.BY_NAME) == len(schema.COLUMNS)  # no name declared twice
    for c in schema.COLUMNS:
        assert c.dtype in schema.DTYPES and c.group in schema.GROUPS and c.doc, c
    assert [c.name for c in schema.columns("outcome")] == ["status", "reason", "phase_note"]
    with pytest.raises(ValueError, match="unknown column group"):
        schema.columns("nope")
    assert schema.unit("time_ms") == "ms" and schema.unit("density") == "" and schema.group_of("density") == "extra"


def test_schema_imports_neither_torch_nor_pandas():
    code = "import sys, harness.core.schema; print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_arrow_schema_keeps_an_unconvertible_column_as_inferred():
    frame = pd.DataFrame({"reps": ["three", "four"], "input_sets": [1.0, math.nan], "density": [0.5, 0.25]})
    types = {f.name: str(f.type) for f in schema.arrow_schema(frame)}
    assert types == {"reps": "large_string", "input_sets": "int64", "density": "double"}


def test_run_directory_page_names_only_declared_columns():
    text = (ROOT / "docs" / "reference" / "run-directory.md").read_text()
    bullet = text[text.index("- `results.parquet`"):text.index("- `samples.parquet`")]
    named = {t for t in re.findall(r"`([a-z_0-9]+)`", bullet)} - {"results.parquet"}
    undeclared = named - set(schema.BY_NAME)
    assert undeclared == {"density"}  # the example of a variant's own column
