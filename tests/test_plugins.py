"""Third-party variants: plugin files named by a suite, modules, entry points, and their errors."""

import textwrap
from pathlib import Path

import pandas as pd
import pytest

from harness.core import registry
from harness.core.registry import PluginError, load_entry_points
from harness.engine.plugins import load_plugin
from tests.runs import bench

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_plugin_runs_end_to_end_through_bench_run(tmp_path):
    out = tmp_path / "out"
    proc = bench("run", EXAMPLES / "plugin-suite.toml", "-o", out, "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(out / "results.parquet")
    chunked = rows[rows["variant"] == "chunked"]
    assert len(chunked) == 16 and (chunked["status"] == "ok").all()
    assert (chunked["rel_err"] < 1e-5).all()  # exact: checked against the float64 reference
    assert set(chunked["params"]) == {'{"chunk": 64}', '{"chunk": 256}'}


def test_example_plugin_is_short():
    lines = [ln for ln in (EXAMPLES / "chunked_attention.py").read_text().splitlines() if ln.strip()]
    assert len(lines) < 20


def test_plugin_that_fails_to_import_is_named(tmp_path):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(PluginError, match="plugin 'broken_plugin.py' failed to import.*not_a_module_anywhere"):
        load_plugin("broken_plugin.py", tmp_path)


def test_plugin_registering_an_existing_name_is_named(tmp_path):
    dup = tmp_path / "dup_plugin.py"
    dup.write_text(textwrap.dedent("""
        from harness import register_variant, attention_flops
        @register_variant("naive", family="dense", exact=True, flops=attention_flops)
        def naive(q, k, v, *, causal):
            return q
    """))
    with pytest.raises(PluginError, match=r"plugin 'dup_plugin.py'.*'naive'.*already registered \(by builtin\)"):
        load_plugin("dup_plugin.py", tmp_path)


def test_plugin_errors_in_a_suite_exit_2_naming_the_plugin(tmp_path):
    (tmp_path / "p.py").write_text("raise RuntimeError('boom')\n")
    suite = tmp_path / "s.toml"
    suite.write_text('plugins = ["p.py"]\n[[variant]]\nname = "naive"\n')
    proc = bench("run", suite, "--dry-run", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{suite}:1: plugins: plugin 'p.py' failed to import: RuntimeError: boom"


def test_module_plugin_and_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "thirdparty_attn").mkdir(parents=True)
    (pkg / "thirdparty_attn" / "__init__.py").write_text(textwrap.dedent("""
        from harness import register_variant, attention_flops, get_variant
        @register_variant("thirdparty_dense", family="dense", exact=True, flops=attention_flops)
        def thirdparty_dense(q, k, v, *, causal):
            return get_variant("naive")(q, k, v, causal=causal)
    """))
    dist = pkg / "thirdparty_attn-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-attn\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[attention_bench.variants]\ndense = thirdparty_attn\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(registry._REGISTRY, "thirdparty_dense", raising=False)
    assert "dense" in load_entry_points()
    variant = registry.get_variant("thirdparty_dense")
    assert variant.source == "entry point dense (thirdparty_attn)"
    registry._REGISTRY.pop("thirdparty_dense")
