"""One row, one truth: a case's fields are declared once, and every derived column of a row is
computed once, from the row's own combined time, by one function (harness.measure.derive) — for a
fresh run, for rounds planted at random, and for every run directory this repository ships."""

from __future__ import annotations

import ast
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.core import schema
from harness.core.cases import AXES, SWEEP_ALIASES, Case, axis_names, label
from harness.engine import store
from harness.engine.suite import expand_cases, load_suite
from harness.measure.derive import FORMULAS, final_row
from tests.runs import bench

ROOT = Path(__file__).resolve().parents[1]


# -- the derived columns: one formula each, applied to the final time ----------------------------


def expected(row: dict) -> dict:
    """Each derived column by its formula, written out here independently of harness.measure.derive."""
    t = row["time_ms"] / 1e3
    tflops = row["flops"] / t / 1e12
    tokens = row["batch"] * (row["q_len"] if row.get("q_len") else row["seq_len"])
    return {
        "tflops_per_s": tflops,
        "flops_counted_ratio": row["flops_counted"] / row["flops"],
        "useful_fraction": row["useful_flops"] / row["flops"],
        "tokens_per_s": tokens / t if row.get("q_len") else math.nan,  # inference-shaped rows only
        "arith_intensity": row["flops"] / row["min_bytes"],
        "pct_of_peak": 100 * tflops / row["peak_tflops_per_s"],
        "attainable_tflops_per_s": min(row["peak_tflops_per_s"],
                                       row["flops"] / row["min_bytes"] * row["peak_gb_per_s"] / 1e3),
        "achieved_bandwidth": row["kv_bytes"] / t,
        "pct_of_bandwidth": 100 * row["kv_bytes"] / t / (row["peak_gb_per_s"] * 1e9),
        "tokens_per_joule": tokens / row["energy_j"],
    }


def test_every_derived_column_has_one_formula():
    assert set(FORMULAS) == set(schema.DERIVED) and len(schema.DERIVED) >= 10
    assert all(schema.BY_NAME[name].derived for name in FORMULAS)


@settings(max_examples=60, deadline=None)
@given(medians=st.lists(st.floats(0.05, 500.0), min_size=1, max_size=4),
       spread=st.floats(0.0, 0.2), reps=st.integers(3, 12), q_len=st.sampled_from([None, 1, 7]),
       seed=st.integers(0, 2**16))
def test_derived_columns_follow_the_final_time_for_planted_rounds(medians, spread, reps, q_len, seed):
    rng = np.random.default_rng(seed)
    case = Case("naive", {}, batch=3, heads=4, kv_heads=2, seq_len=64, head_dim=16, q_len=q_len)
    facts = dict(schema.base_row(case, "dense", True, 2), flops=3.7e9, min_bytes=1.9e6, kv_bytes=6.5e5,
                 flops_counted=7.4e9, useful_flops=2.1e9, peak_tflops_per_s=0.31, peak_gb_per_s=11.5,
                 energy_j=0.042)
    samples = [list(m * (1 + spread * rng.uniform(-1, 1, reps))) for m in medians]
    rounds = []
    for i, s in enumerate(samples):  # each process's own statistics of its samples, and what it measured
        own = dict(facts, time_ms=float(np.median(s)), time_ms_ci_low=min(s), time_ms_ci_high=max(s))
        if i:  # a later round only timed the case; its own rate columns, if any, must not leak through
            own.update(tflops_per_s=123.0, pct_of_peak=99.0, achieved_bandwidth=1.0)
        rounds.append(own)
    row = final_row(rounds, samples)
    assert row["time_ms"] == pytest.approx(float(np.median([np.median(s) for s in samples])), rel=1e-12)
    assert row["processes"] == len(medians)
    for name, value in expected(row).items():
        assert row[name] == pytest.approx(value, rel=1e-12, nan_ok=True), name


def _run_dirs() -> list[Path]:
    """Every run directory the repository ships: baselines, reference runs, test data."""
    found = [p.parent for base in ("results", "tests/data") for p in (ROOT / base).rglob("run.json")]
    return sorted({p for p in found if (p / store.RESULTS).exists() or (p / store.ROWS_LOG).exists()})


def test_the_repository_ships_run_directories():
    assert any("baseline" in p.parts for p in _run_dirs())


@pytest.mark.parametrize("run_dir", _run_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_runs_read_consistent(run_dir):
    """As stored, the committed baseline's rate columns came from the first process alone; read back,
    every derived column agrees with the row's own (combined) time."""
    rows = store.read_results(run_dir)
    ok = rows[rows["status"] == "ok"].to_dict("records")
    assert ok
    checked = 0
    for r in ok:
        t = r["time_ms"] / 1e3
        assert r["tflops_per_s"] == pytest.approx(r["flops"] / t / 1e12, rel=1e-12)
        if math.isfinite(r.get("kv_bytes", math.nan)):
            assert r["achieved_bandwidth"] == pytest.approx(r["kv_bytes"] / t, rel=1e-12)
        if math.isfinite(r.get("peak_tflops_per_s", math.nan)):
            assert r["pct_of_peak"] == pytest.approx(100 * r["tflops_per_s"] / r["peak_tflops_per_s"], rel=1e-12)
            checked += 1
        if math.isfinite(r.get("peak_gb_per_s", math.nan)) and math.isfinite(r.get("kv_bytes", math.nan)):
            assert r["pct_of_bandwidth"] == pytest.approx(100 * r["kv_bytes"] / t / r["peak_gb_per_s"] / 1e9,
                                                          rel=1e-12)
    if "baseline" in run_dir.parts:
        assert checked == len(ok)  # the baseline was calibrated: every row has its peak


# -- labels -----------------------------------------------------------------------------------------


def _suites() -> list[Path]:
    return sorted((ROOT / "suites").glob("*.toml")) + sorted((ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", _suites(), ids=lambda p: p.name)
def test_labels_are_unique_per_case_in_every_shipped_suite(path):
    cases = expand_cases(load_suite(path))
    labels = {}
    for c in cases:
        assert labels.setdefault(c.label(), c.case_id) == c.case_id, f"{c.label()} names two cases"
        assert label(c.key | {"params": c.params_json}) == c.label()  # a row reads as its case does


def test_a_row_is_labelled_as_its_case_even_old_or_partial():
    case = Case("sdpa", {"backend": "flash"}, heads=8, kv_heads=2, seq_len=4096, q_len=1, causal=True,
                kv_layout="paged", page_size=16, inputs="structured")
    text = "sdpa(backend=flash) cpu float32 fwd B1 H8/2 Lq1 Lkv4096 D64 causal structured paged/16"
    assert case.label() == text
    row = dict(schema.base_row(case), q_len=1.0, page_size=16.0)  # nullable ints read back as floats
    assert label(row) == text
    old = {k: v for k, v in schema.base_row(Case("naive")).items() if not (k in AXES and AXES[k].later)}
    assert label(old) == "naive cpu float32 fwd B1 H8 L1024 D64"
    decodes = {Case("naive", q_len=q, seq_len=64).label() for q in (1, 2, 4)}
    assert len(decodes) == 3  # decode cases that differ only in q_len are told apart


# -- one declaration --------------------------------------------------------------------------------


def test_the_tables_are_generated_from_the_case_declaration():
    from harness.core.config import SWEEP
    from harness.engine import runmeta

    assert set(SWEEP.names) == {n for n, ax in AXES.items() if ax.sweep} | set(SWEEP_ALIASES)
    assert set(schema.IDENTITY) == set(AXES) | {"case_id", "family", "exact", "baseline"}
    assert {n for n, ax in AXES.items() if not ax.later} | {"case_id", "status"} == set(runmeta.REQUIRED)
    for name, ax in AXES.items():
        assert schema.BY_NAME[name].dtype == ax.dtype and schema.BY_NAME[name].doc == ax.help


#: Names every case axis can be told by (the sweep aliases too; not ``variant`` and ``params``, which
#: name far more than a case field).
FIELD_NAMES = set(axis_names()) | set(SWEEP_ALIASES)
DECLARING = ROOT / "harness" / "core" / "cases.py"


def _hand_lists(path: Path) -> list[str]:
    """Literal lists, tuples, sets and dict keys in ``path`` naming three or more case fields, other
    than an exclusion handed to ``axis_names``."""
    tree = ast.parse(path.read_text())
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "axis_names":
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                exempt.update(id(n) for n in ast.walk(arg))
    found = []
    for node in ast.walk(tree):
        items = node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else \
            node.keys if isinstance(node, ast.Dict) else None
        if items is None or id(node) in exempt:
            continue
        named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in FIELD_NAMES}
        if len(named) >= 3:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {sorted(named)}")
    return found


def test_no_module_lists_case_fields_by_hand():
    modules = [p for d in ("harness", "reports", "variants", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    found = [hit for p in modules if p != DECLARING for hit in _hand_lists(p)]
    assert not found, "case fields listed by hand (declare them in harness/core/cases.py):\n" + "\n".join(found)


def test_adding_a_field_is_one_declaration(tmp_path):
    """A copy of the code with one more field declared in cases.py, and nothing else changed: the new
    field is a suite key, a result column, in the worker protocol and the label when set, read back
    from rows, in the report's configuration keys, and optional in older tables."""
    for d in ("harness", "reports"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    cases = tmp_path / "harness" / "core" / "cases.py"
    text = cases.read_text()
    anchor = "\n    @classmethod\n    def from_point("
    field = ('\n    dummy: int = axis(0, help="a test field", dtype="int64", ge=0, later=True,\n'
             '                      label=lambda c: f"dummy={c[\'dummy\']}" if c["dummy"] else "")\n')
    cases.write_text(text.replace(anchor, field + anchor, 1))
    check = textwrap.dedent("""
        from harness.core import schema
        from harness.core.cases import Case, label
        from harness.core.config import SWEEP
        from harness.engine import runmeta
        from harness.engine.suite import expand_cases, parse_suite
        from reports.analysis import GROUP_KEYS
        suite = parse_suite("[sweep]\\ndummy = [0, 3]\\n[[variant]]\\nname = 'naive'\\n")
        a, b = expand_cases(suite)
        assert a.case_id == Case("naive").case_id and b.dummy == 3 and a.case_id != b.case_id
        assert "dummy" in SWEEP.names and schema.BY_NAME["dummy"].group == "identity"
        assert "dummy" not in a.message() and b.message()["dummy"] == 3
        assert b.label().endswith("dummy=3") and "dummy" not in a.label()
        row = schema.base_row(b)
        assert row["dummy"] == 3 and Case.from_row(row) == b and label(row) == b.label()
        old = {k: v for k, v in schema.base_row(a).items() if k != "dummy"}
        assert Case.from_row(old) == a and "dummy" not in runmeta.REQUIRED
        assert "dummy" in GROUP_KEYS
        print("one declaration")
    """)
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "one declaration" in proc.stdout, proc.stderr[-2000:]


# -- rows carry their facts -------------------------------------------------------------------------


PLUGIN = '''
from harness import get_variant, register_variant

@register_variant("house_dense", family="dense", exact=True, baseline=True)
def house_dense(q, k, v, *, causal):
    return get_variant("naive")(q, k, v, causal=causal)
'''

SUITE = '''
name = "facts"
plugins = ["house.py"]
[defaults]
heads = 2
head_dim = 16
[sweep]
seq_len = [64, 256]
[timing]
warmup = 0
min_time_s = 0.0
min_reps = 1
max_reps = 2
processes = 1
[[variant]]
name = "naive"
[[variant]]
name = "house_dense"
[[variant]]
name = "sliding_window"
window = 8
'''


def _crossover_baselines(html: str) -> list[str]:
    table = html.split('id="crossover-table"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<td title="([^"]*)">([^<]*)</td>', table)


def test_a_report_rendered_later_without_the_plugins_chooses_the_same_baseline(tmp_path):
    (tmp_path / "house.py").write_text(PLUGIN)
    (tmp_path / "facts.toml").write_text(SUITE)
    out = tmp_path / "run"
    proc = bench("run", tmp_path / "facts.toml", "-o", out, "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = store.read_results(out)
    assert rows.set_index("variant")["baseline"].to_dict() == {"naive": False, "house_dense": True,
                                                               "sliding_window": False}
    again = tmp_path / "again.html"
    proc = bench("report", out, "-o", again)  # a fresh process: house.py is not loaded
    assert proc.returncode == 0, proc.stderr
    first, later = _crossover_baselines((out / "report.html").read_text()), _crossover_baselines(again.read_text())
    assert first == later and first and all(name == "house_dense" for _, name in first)
    assert all("declared baseline" in why for why, _ in first)
