"""Suite parsing, expansion into cases (with skips), and one clear line per suite error."""

import textwrap

import pytest

from harness.engine.suite import SuiteError, expand_cases, load_suite, parse_suite
from tests.runs import measured

GOOD = """
name = "t"
description = "test"
plugins = []
[defaults]
device = "cpu"
mode = "fwd"
[sweep]
batch = [1]
heads = [8]
kv_heads = [8, 2]
seq_len = [64, 128]
head_dim = [32]
dtype = ["float32", "bfloat16"]
causal = [false, true]
[timing]
warmup = 1
min_time_s = 0.01
max_reps = 5
[[variant]]
name = "sdpa"
backend = ["math", "flash", "efficient"]
[[variant]]
name = "sliding_window"
window = [16, 32]
seq_len = [128]
"""


def write(tmp_path, text, name="suite.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_suite_expands_to_the_cartesian_product(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    assert suite.name == "t" and suite.timing.max_reps == 5 and suite.timing.min_time_s == 0.01
    cases = expand_cases(suite)
    # sdpa: 3 backends x kv 2 x L 2 x dtype 2 x causal 2 ; sliding_window: 2 windows x kv 2 x L 1 x 2 x 2
    assert len(cases) == 3 * 16 + 2 * 8
    assert len({c.case_id for c in cases}) == len(cases)
    sw = [c for c in cases if c.variant == "sliding_window"]
    assert {c.seq_len for c in sw} == {128}  # per-variant override of an axis
    assert all(set(c.params) == {"window", "block"} for c in sw)  # defaults filled in
    assert {c.kv_heads for c in cases} == {8, 2}


def test_kv_heads_defaults_to_heads(tmp_path):
    suite = load_suite(write(tmp_path, '[sweep]\nheads = [4, 6]\n[[variant]]\nname = "naive"\n'))
    assert sorted((c.heads, c.kv_heads) for c in expand_cases(suite)) == [(4, 4), (6, 6)]


def test_case_ids_are_stable_and_distinct():
    from harness.core.cases import Case

    a = Case("naive", {}, seq_len=128)
    assert a.case_id == Case("naive", {}, seq_len=128).case_id
    assert a.case_id != Case("naive", {}, seq_len=256).case_id
    assert Case("sdpa", {"backend": "math"}).case_id != Case("sdpa", {"backend": "flash"}).case_id


def test_unsupported_cases_are_skipped_with_reasons(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    eff = [c for c in expand_cases(suite) if c.params.get("backend") == "efficient"]
    row = measured(eff[0], suite.timing)
    assert row["status"] == "skipped"
    assert "efficient" in row["reason"] and "CUDA" in row["reason"]
    cuda = eff[0].__class__(**{**eff[0].__dict__, "device": "cuda", "params": {"backend": "math"}})
    row = measured(cuda, suite.timing)
    assert row["status"] == "skipped" and "CUDA is not available" in row["reason"]


BAD = [
    ("name = \n", "invalid TOML", "line 1"),
    ("[sweep]\nseq_lenn = [1]\n[[variant]]\nname='naive'\n", "sweep.seq_lenn", "did you mean 'seq_len'"),
    ("[sweep]\nseq_len = [128, -4]\n[[variant]]\nname='naive'\n", "sweep.seq_len", "positive integer"),
    ("[sweep]\nseq_len = [0]\n[[variant]]\nname='naive'\n", "sweep.seq_len", "positive integer"),
    ("[sweep]\nseq_len = []\n[[variant]]\nname='naive'\n", "sweep.seq_len", "empty"),
    ("[sweep]\nseq_len = ['long']\n[[variant]]\nname='naive'\n", "sweep.seq_len", "got string"),
    ("[sweep]\nheads = [8]\nkv_heads = [3]\n[[variant]]\nname='naive'\n", "kv_heads", "does not divide"),
    ("[sweep]\ndtype = ['float33']\n[[variant]]\nname='naive'\n", "sweep.dtype", "did you mean 'float32'"),
    ("[defaults]\ndevice = 'tpu'\n[[variant]]\nname='naive'\n", "defaults.device", "unknown device"),
    ("[defaults]\nmode = 'backward'\n[[variant]]\nname='naive'\n", "defaults.mode", "unknown mode"),
    ("[defaults]\ncausal = 'yes'\n[[variant]]\nname='naive'\n", "defaults.causal", "true or false"),
    ("[[variant]]\nname = 'sdpaa'\n", "name", "did you mean sdpa"),
    ("[[variant]]\nname = 'sdpa'\nbackend = 'fast'\n", "backend", "not one of"),
    ("[[variant]]\nname = 'sliding_window'\nwindow = -1\n", "window", "must be >= 0"),
    ("[[variant]]\nname = 'sliding_window'\nwindw = 3\n", "windw", "did you mean 'window'"),
    ("[[variant]]\nname = 'naive'\n[[variant]]\nname = 'naive'\n", "name", "duplicate"),
    ("[timing]\nwarmup = -1\n[[variant]]\nname='naive'\n", "timing.warmup", ">= 0"),
    ("[timing]\nmax_reps = 'many'\n[[variant]]\nname='naive'\n", "timing.max_reps", "expected int"),
    ("nme = 'x'\n[[variant]]\nname='naive'\n", "nme", "did you mean 'name'"),
    ("plugins = ['missing_plugin.py']\n[[variant]]\nname='naive'\n", "plugins", "does not exist"),
    ("name = 'x'\n", "variant", "nothing to run"),
]


@pytest.mark.parametrize("text,key,message", BAD)
def test_suite_errors_name_file_key_and_reason(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    lines = err.value.problems
    assert any(str(path) in line and key in line and message in line for line in lines), lines


def test_errors_carry_line_numbers(tmp_path):
    path = write(tmp_path, 'name = "x"\n\n[sweep]\nbatch = [1]\nseq_len = [128, -4]\n[[variant]]\nname = "naive"\n')
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert err.value.problems == [f"{path}:5: sweep.seq_len: must be a positive integer, got -4"]


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "[sweep]\nseq_len = [-1]\ndtype = ['f8']\n[[variant]]\nname = 'nope'\n")
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert len(err.value.problems) == 3


def test_missing_file(tmp_path):
    with pytest.raises(SuiteError, match="no such suite file"):
        load_suite(tmp_path / "absent.toml")


def test_shipped_suites_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("suites").glob("*.toml")):
        assert expand_cases(load_suite(path)), path


def test_parse_suite_from_text():
    suite = parse_suite('[[variant]]\nname = "naive"\n')
    assert [c.variant for c in expand_cases(suite)] == ["naive"]


# --------------------------------------------------------------------------------------------
# The settings' declarations (harness.core.config) and the one validator


MORE_BAD = [
    ("[run]\nisolaton = 'none'\n", "run.isolaton", "did you mean 'isolation'"),
    ("[run]\nisolation = 'proces'\n", "run.isolation", "did you mean 'process'"),
    ("[run]\ncase_timeout_s = -1\n", "run.case_timeout_s", "must be > 0"),
    ("[run]\nmemory_budget_gib = inf\n", "run.memory_budget_gib", "finite"),
    ("[timing]\nmin_time_s = nan\n", "timing.min_time_s", "finite"),
    ("[timing]\nconfidence = 1.0\n", "timing.confidence", "> 0 and < 1"),
    ("[timing]\nmin_reps = 9\nmax_reps = 3\n", "timing.min_reps", "must be <= max_reps (3)"),
    ("[compare]\ntime_threshold = 5\n", "compare.time_threshold", "> 0 and < 1"),
    ("[compare]\ntime_treshold = 0.1\n", "compare.time_treshold", "did you mean 'time_threshold'"),
    ("[compare]\naccuracy_tolerance = { f8 = 1e-3 }\n", "compare.accuracy_tolerance", "unknown dtype 'f8'"),
    ("compare = 3\n", "compare", "expected a table [compare], got integer"),
    ("[defaults]\nbatch = true\n", "defaults.batch", "expected integer, got boolean"),
    ("[sweep]\ninputs = ['gausian']\n", "sweep.inputs", "did you mean 'gaussian'"),
]


@pytest.mark.parametrize("text,key,message", MORE_BAD)
def test_every_table_reports_file_line_key_and_reason(tmp_path, text, key, message):
    text += "[[variant]]\nname = 'naive'\n"
    with pytest.raises(SuiteError) as err:
        parse_suite(text, tmp_path / "s.toml")
    [line] = err.value.problems
    number = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(key.split(".")[-1]))
    assert line.startswith(f"{tmp_path / 's.toml'}:{number}: {key}: ") and message in line, line


def test_a_timing_default_gives_way_to_the_setting_it_would_contradict(tmp_path):
    suite = load_suite(write(tmp_path, "[timing]\nmax_reps = 2\nmin_time_s = 9\n[[variant]]\nname = 'naive'\n"))
    assert (suite.timing.min_reps, suite.timing.max_time_s) == (2, 9.0)
    suite = load_suite(write(tmp_path, "[run]\nisolation = 'none'\nmemory_budget_gib = 2\n"
                                       "[[variant]]\nname = 'naive'\n"))
    assert (suite.run.isolation, suite.run.memory_budget_gib, suite.run.case_timeout_s) == ("none", 2.0, 900.0)


def test_a_key_is_one_declaration():
    """A key declared as a field of a settings dataclass is validated, has its default, and is a key of its table."""
    from dataclasses import dataclass, fields

    from harness.core.config import RunConfig, Table, setting

    @dataclass(frozen=True)
    class Config(RunConfig):
        placement: str = setting("default", "test key", choices=("default", "pinned"))

    table = Table.of("run", Config)
    assert Config().placement == "default" and [f.name for f in fields(Config)] == list(table.names)
    assert table["placement"].help == "test key" and table["ray_address"].type is str
    assert table.check({"placement": "pinned"}) == ({"placement": "pinned"}, [])
    settings, problems = table.check({"placement": "pined", "isolation": "none"})
    assert settings == {"isolation": "none"}
    assert problems == [("placement", "unknown placement 'pined' (did you mean 'pinned'?); one of default, pinned")]


def test_declarations_match_what_uses_them():
    from dataclasses import asdict

    from harness.core.cases import sweep_defaults
    from harness.core.config import COMPARE, SWEEP, TIMING
    from harness.measure.timing import TimingConfig
    from harness.regression import compare

    assert asdict(TimingConfig()) == TIMING.defaults()
    assert {k: SWEEP[k].default for k in SWEEP.names} == sweep_defaults()
    th = compare.Thresholds()
    assert COMPARE.defaults() == {"time_threshold": th.time, "memory_threshold": th.memory, "alpha": th.alpha,
                                  "accuracy_tolerance": th.accuracy}
    for key in TIMING.keys + SWEEP.keys + COMPARE.keys:
        assert key.help, key.name


def test_suite_loading_imports_no_regression_code():
    import subprocess
    import sys

    code = ("import sys; from harness.engine.suite import parse_suite; "
            "parse_suite('[compare]\\ntime_threshold = 0.1\\n[[variant]]\\nname = \"naive\"\\n'); "
            "print(sorted(m for m in sys.modules if m.startswith('harness.regression')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out
