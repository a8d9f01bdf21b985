"""Property test: any suite file either loads or is refused with exit 2 and one line per problem."""

import io
import string
from contextlib import redirect_stderr, redirect_stdout

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import list_variants
from harness.cli.main import main

list_variants()  # load the registry once, outside the timed examples

KEYS = ["name", "description", "plugins", "seed", "defaults", "sweep", "timing", "run", "variant", "nme", "x"]
AXES = ["device", "mode", "batch", "heads", "kv_heads", "seq_len", "head_dim", "dtype", "causal", "inputs", "sq_len"]
VARIANTS = ["naive", "sdpa", "sliding_window", "linear", "nope", ""]
PARAMS = ["backend", "window", "block", "chunk", "name", "seq_len", "windw"]

scalars = st.one_of(
    st.integers(-3, 70000), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.sampled_from(["cpu", "cuda", "fwd", "bwd", "float32", "bfloat16", "math", "flash", "x", "", "gaussian"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from(AXES), scalars, max_size=2))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def suite_texts(draw):
    lines = []
    for key in draw(st.lists(st.sampled_from(["name", "seed", "plugins", "description", "nme"]), max_size=2,
                             unique=True)):
        lines.append(f"{key} = {toml_value(draw(values))}")
    for table in draw(st.lists(st.sampled_from(["defaults", "sweep", "timing", "run", "extra"]), max_size=3,
                               unique=True)):
        lines.append(f"[{table}]")
        keys = AXES if table in ("defaults", "sweep") else ["warmup", "min_time_s", "max_reps", "isolation", "threads"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {toml_value(draw(values))}")
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[variant]]")
        lines.append(f'name = "{draw(st.sampled_from(VARIANTS))}"')
        for key in draw(st.lists(st.sampled_from(PARAMS), max_size=2, unique=True)):
            lines.append(f"{key} = {toml_value(draw(values))}")
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):  # mutate: cut, duplicate or garble a piece of the text
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + draw(st.sampled_from(["", "=", "[", "]]", "\n[[variant]]\n", '"', text[i:j] * 2])) + text[j:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=suite_texts())
def test_any_suite_loads_or_is_refused_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "suite.toml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["run", str(path), "--dry-run"])  # an exception here fails the test: a traceback
    if code == 0:
        assert "cases (dry run" in err.getvalue()
    else:
        assert code == 2
        lines = err.getvalue().strip().splitlines()
        assert lines and all(line.startswith(str(path)) for line in lines), lines


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=string.printable, max_size=200))
def test_arbitrary_text_is_refused_or_loaded(text):
    from harness.engine.suite import SuiteError, parse_suite

    try:
        parse_suite(text)
    except SuiteError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
