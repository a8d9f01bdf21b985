"""bench compare: statistics and verdicts on synthetic samples with known answers, then end to end
on two tiny real runs (CLI exit codes, formats, compare.html, trend.html, --confirm)."""

import itertools
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from harness.core import schema
from harness.core.stats import bh_adjust, time_test, u_null_cdf
from harness.engine import store
from harness.regression.compare import compare_frames, compare_runs
from harness.regression.envdiff import comparison_warnings
from harness.regression.history import run_info
from harness.regression.verdicts import (
    CompareError,
    Thresholds,
    resolve_thresholds,
    time_verdict,
    validate_compare_table,
)
from tests.test_history import fake_run, tiny_real_runs

IDENT = {"variant": "naive", "family": "dense", "exact": True, "params": "{}", "device": "cpu", "dtype": "float32",
         "mode": "fwd", "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 16, "causal": False, "inputs": "gaussian"}


def samples(n, median, cv, seed):
    rng = np.random.default_rng(seed)
    return median * np.exp(rng.normal(0, cv, n))


def quantile_samples(n, median, cv):
    """Deterministic 'ideal' samples: the n quantiles of a log-normal, in a fixed shuffled order."""
    from scipy.stats import norm

    q = median * np.exp(cv * norm.ppf((np.arange(n) + 0.5) / n))
    return q[np.random.default_rng(0).permutation(n)]


def real_id(i):
    """The case id of the i-th case that frames() builds (naive, L = 64 + i)."""
    from harness.core.cases import Case

    return Case("naive", {}, heads=2, kv_heads=2, seq_len=64 + i, head_dim=16).case_id


def frames(cases):
    """rows and samples tables from {case_id: dict(samples=..., status=..., mem=..., rel_err=..., ...)}."""
    rows, sample_rows = [], []
    for i, (cid, c) in enumerate(cases.items()):
        s = np.asarray(c.get("samples", []), dtype=float)
        row = dict(IDENT, case_id=cid, seq_len=64 + i, status=c.get("status", "ok"), reason=c.get("reason", ""),
                   time_ms=float(np.median(s)) if len(s) else math.nan, peak_mem_bytes=c.get("mem", 1 << 20),
                   rel_err=c.get("rel_err", 1.2e-7), grad_rel_err=math.nan, exact=c.get("exact", True),
                   dtype=c.get("dtype", "float32"))
        rows.append(row)
        sample_rows += [{"case_id": cid, "rep": r, "time_ms": float(t)} for r, t in enumerate(s)]
    return pd.DataFrame(rows), pd.DataFrame(sample_rows, columns=["case_id", "rep", "time_ms"])


def verdicts(base, new, thresholds=None):
    table = compare_frames(*frames(base)[:1], frames(base)[1], *frames(new), thresholds)
    return {r["case_id"]: r for r in table.to_dict("records")}


# ----------------------------------------------------------------------------------------------
# statistics


def test_u_distribution_matches_enumeration():
    for n, m in [(1, 1), (2, 3), (3, 3), (4, 5), (3, 7)]:
        counts = np.zeros(n * m + 1)
        for pos in itertools.combinations(range(n + m), n):
            u = sum(sum(1 for j in range(p) if j not in pos) for p in pos)  # pairs (a > b)
            counts[u] += 1
        assert np.allclose(u_null_cdf(n, m), np.cumsum(counts) / counts.sum())


def test_interval_and_test_agree_and_cover():
    """Exact small-sample path: significant at alpha exactly when the interval excludes 1; and
    the 95% interval covers a true 10% shift about 95% of the time, even with heavy-tailed noise."""
    rng = np.random.default_rng(0)
    disagree, covered, trials = 0, 0, 400
    for _ in range(trials):
        n, m = rng.integers(4, 16, 2)
        a = np.exp(rng.standard_t(3, n) * 0.05)
        b = 1.1 * np.exp(rng.standard_t(3, m) * 0.05)
        t = time_test(a, b)
        disagree += (t.p_value < 0.05) != (t.ci_low > 1 or t.ci_high < 1)
        covered += t.ci_low <= 1.1 <= t.ci_high
    assert disagree == 0
    assert 0.92 <= covered / trials <= 0.99


def test_large_samples_use_the_normal_approximation():
    a, b = samples(120, 1.0, 0.02, 1), samples(150, 1.1, 0.02, 2)
    t = time_test(a, b)
    assert t.n_base == 120 and t.n_new == 150
    assert t.ci_low < 1.1 < t.ci_high and t.ci_high / t.ci_low < 1.02 and t.p_value < 1e-20
    assert t.ratio == pytest.approx(np.median(b) / np.median(a))


def test_too_few_samples_give_no_interval():
    t = time_test([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])  # 3 vs 3: the smallest two-sided p is 0.1
    assert math.isnan(t.ci_low) and t.p_value == pytest.approx(0.1)
    t = time_test([1.0], [2.0])
    assert t.ratio == 2.0 and math.isnan(t.p_value)


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    q = bh_adjust(p)
    # sorted 0.01, 0.03, 0.04, 0.2 -> p*m/rank 0.04, 0.0533, 0.0533, 0.2, then running minimum from the top
    assert q[:4] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert math.isnan(q[4])


# ----------------------------------------------------------------------------------------------
# verdicts on synthetic samples


@pytest.mark.parametrize(
    "shift, cv, n, expected",
    [
        (1.00, 0.01, 30, "unchanged"),  # same distribution, quiet
        (1.00, 0.20, 30, "inconclusive"),  # same distribution, noisy: the interval cannot rule out 5%
        (1.03, 0.003, 30, "unchanged"),  # a real 3% change: significant, but under the 5% threshold
        (1.10, 0.01, 30, "regressed"),  # 10% slower, quiet
        (1.50, 0.01, 30, "regressed"),
        (1.50, 0.20, 30, "regressed"),  # 50% slower is found through heavy noise
        (0.90, 0.01, 30, "improved"),
    ],
)
def test_time_verdicts(shift, cv, n, expected):
    v = verdicts({"c": {"samples": samples(n, 2.0, cv, 10)}}, {"c": {"samples": samples(n, 2.0 * shift, cv, 11)}})["c"]
    assert v["verdict"] == expected and v["time_verdict"] == expected
    if expected == "regressed":
        assert v["ci_low"] > 1.05 and v["q_value"] < 0.05
    if shift == 1.03:
        assert v["q_value"] < 0.05  # it was significant: the threshold is what kept it unchanged


def test_small_noisy_samples_rarely_call_a_10_percent_change():
    """10% in 30% noise with 5 samples a side: the test has little power, so it almost never fires."""
    called = 0
    for seed in range(50):
        v = verdicts({"c": {"samples": samples(5, 2.0, 0.3, seed)}},
                     {"c": {"samples": samples(5, 2.2, 0.3, 100 + seed)}})
        called += v["c"]["verdict"] in ("regressed", "improved")
    assert called <= 10


def test_beyond_threshold_but_not_significant_is_explained():
    v = verdicts({"c": {"samples": quantile_samples(5, 2.0, 0.3)}},
                 {"c": {"samples": quantile_samples(5, 2.6, 0.3)}})["c"]
    assert v["time_ratio"] == pytest.approx(1.3)
    assert v["verdict"] == "inconclusive" and "time +30.0% ×" in v["note"] and "straddles the threshold" in v["note"]


def test_false_discovery_control_across_many_null_cases():
    """200 cases with no change and a tiny threshold: nominal p < 0.05 flags some, BH none."""
    base = {f"c{i}": {"samples": samples(12, 1.0, 0.05, 1000 + i)} for i in range(200)}
    new = {f"c{i}": {"samples": samples(12, 1.0, 0.05, 5000 + i)} for i in range(200)}
    table = compare_frames(*frames(base), *frames(new), Thresholds(time=0.001))
    assert (table["p_value"] < 0.05).sum() >= 3  # per-case testing would raise false alarms...
    assert table["verdict"].isin(["unchanged", "inconclusive"]).all()  # ...the FDR-controlled verdicts do not


def test_memory_verdicts():
    base = {"up": {"samples": samples(20, 1.0, 0.01, 1), "mem": 1 << 20},
            "small": {"samples": samples(20, 1.0, 0.01, 2), "mem": 1 << 20},
            "tiny": {"samples": samples(20, 1.0, 0.01, 3), "mem": 1000},
            "down": {"samples": samples(20, 1.0, 0.01, 4), "mem": 1 << 20}}
    new = {"up": {"samples": samples(20, 1.0, 0.01, 5), "mem": 1.2 * (1 << 20)},
           "small": {"samples": samples(20, 1.0, 0.01, 6), "mem": 1.05 * (1 << 20)},
           "tiny": {"samples": samples(20, 1.0, 0.01, 7), "mem": 2000},  # +100% but 1000 bytes
           "down": {"samples": samples(20, 1.0, 0.01, 8), "mem": 0.5 * (1 << 20)}}
    v = verdicts(base, new)
    assert (v["up"]["verdict"] == "regressed" and v["up"]["memory_verdict"] == "regressed"
            and "memory +20.0%" in v["up"]["note"])
    assert v["small"]["verdict"] == "unchanged"
    assert v["tiny"]["verdict"] == "unchanged"
    assert v["down"]["verdict"] == "improved"
    assert verdicts(base, new, Thresholds(memory=0.25))["up"]["verdict"] == "unchanged"


def test_accuracy_of_exact_variants_is_always_a_regression():
    s = samples(20, 1.0, 0.01, 1)
    base = {"exact": {"samples": s, "rel_err": 1e-7}, "approx": {"samples": s, "rel_err": 1e-2, "exact": False},
            "bf16": {"samples": s, "rel_err": 3e-3, "dtype": "bfloat16"}, "nan": {"samples": s, "rel_err": 1e-7}}
    new = {"exact": {"samples": s * 0.8, "rel_err": 1e-4}, "approx": {"samples": s, "rel_err": 5e-2, "exact": False},
           "bf16": {"samples": s, "rel_err": 5e-3, "dtype": "bfloat16"}, "nan": {"samples": s, "rel_err": float("nan")}}
    v = verdicts(base, new)
    assert v["exact"]["verdict"] == "regressed" and v["exact"]["accuracy_verdict"] == "regressed"
    assert v["exact"]["time_verdict"] == "improved"  # faster, but wrong: still regressed
    assert "rel_err 1.00e-07 → 1.00e-04" in v["exact"]["note"]
    assert v["approx"]["verdict"] == "unchanged"  # approximation error is not held to exactness
    assert v["bf16"]["verdict"] == "unchanged"  # within bfloat16's tolerance
    assert v["nan"]["verdict"] == "regressed"


def test_status_transitions_and_unpaired_cases():
    s = samples(10, 1.0, 0.01, 1)
    base = {"gone": {"samples": s}, "breaks": {"samples": s}, "fixed": {"status": "error", "reason": "boom"},
            "skipped_now": {"samples": s}, "runs_now": {"status": "skipped"}, "both_skipped": {"status": "skipped"},
            "both_fail": {"status": "error"}}
    new = {"breaks": {"status": "error", "reason": "RuntimeError: x"}, "fixed": {"samples": s},
           "skipped_now": {"status": "skipped"}, "runs_now": {"samples": s}, "both_skipped": {"status": "skipped"},
           "both_fail": {"status": "error"}, "added": {"samples": s}}
    table = compare_frames(*frames(base), *frames(new))
    v = dict(zip(table["case_id"], table["verdict"]))
    assert v == {"gone": "missing", "breaks": "now failing", "fixed": "now passing", "skipped_now": "missing",
                 "runs_now": "new", "both_skipped": "not compared", "both_fail": "not compared", "added": "new"}
    # sorted by severity: failures first, then regressions, missing, new, ...
    order = list(table["verdict"])
    assert order[0] == "now failing" and order.index("missing") < order.index("new") < order.index("now passing")
    notes = dict(zip(table["case_id"], table["note"]))
    assert notes["gone"] == "only in BASE" and notes["added"] == "only in NEW"  # not "nan in NEW"
    assert notes["skipped_now"] == "skipped in NEW" and notes["breaks"] == "ok → error"


def test_one_time_rule_symmetric_in_log_space():
    th = Thresholds(time=0.1, alpha=0.05)
    assert time_verdict(1.1, 0.01, th)[0] == "regressed" and time_verdict(1 / 1.1, 0.01, th)[0] == "improved"
    # unchanged is a claim: the interval must lie inside the band [1/1.1, 1.1]
    assert time_verdict(1.09, 0.01, th, 1.02, 1.095) == ("unchanged", "")
    assert time_verdict(1 / 1.09, 0.01, th, 1 / 1.095, 1 / 1.02) == ("unchanged", "")
    assert time_verdict(1.09, 0.01, th) == ("inconclusive", "interval")  # no interval: undecided
    assert time_verdict(1.5, 0.06, th, 0.98, 1.9) == ("inconclusive", "interval")  # not significant, straddles
    assert time_verdict(1.5, math.nan, th) == ("inconclusive", "interval")
    assert time_verdict(math.nan, 0.01, th) == ("inconclusive", "interval")


@pytest.mark.parametrize("ratio, q, lo, hi, contended, unstable, verdict", [
    (1.30, 0.001, 1.25, 1.35, False, False, ("regressed", "")),          # a clear regression
    (1.00, 0.60, 0.98, 1.02, False, False, ("unchanged", "")),           # clear equivalence
    (1.08, 0.20, 0.97, 1.21, False, False, ("inconclusive", "interval")),  # straddles the 5% band
    (1.30, 0.001, 1.25, 1.35, True, False, ("inconclusive", "contended")),  # a neighbour's time
    (1.00, 0.60, 0.98, 1.02, True, False, ("inconclusive", "contended")),
    (1.30, 0.001, 1.02, 1.60, False, True, ("inconclusive", "unstable")),  # unstable: the whole interval beyond
    (1.30, 0.001, 1.10, 1.60, False, True, ("regressed", "")),
    (1.00, 0.60, 0.98, 1.02, False, True, ("unchanged", "")),
])
def test_verdicts_say_when_they_could_not_decide(ratio, q, lo, hi, contended, unstable, verdict):
    assert time_verdict(ratio, q, Thresholds(time=0.05), lo, hi, contended, unstable) == verdict


def test_planted_samples_give_each_verdict():
    """Real samples through the whole rule: a clear slowdown, a clear equivalence, one that straddles."""
    rng = np.random.default_rng(7)
    base = 10 * (1 + 0.01 * rng.standard_normal(60))

    def verdict(new, **flags):
        b, n = schema.empty_row(), schema.empty_row()
        b.update(case_id="c", variant="naive", status="ok", time_ms=float(np.median(base)), **flags)
        n.update(case_id="c", variant="naive", status="ok", time_ms=float(np.median(new)))
        samples = lambda ms: pd.DataFrame({"case_id": "c", "time_ms": ms})  # noqa: E731
        table = compare_frames(pd.DataFrame([b]), samples(base), pd.DataFrame([n]), samples(new),
                               Thresholds(time=0.05))
        return table.iloc[0]["verdict"], table.iloc[0]["doubt"]

    assert verdict(10 * 1.3 * (1 + 0.01 * rng.standard_normal(60))) == ("regressed", "")
    assert verdict(10 * (1 + 0.01 * rng.standard_normal(60))) == ("unchanged", "")
    wide = 10 * 1.05 * (1 + 0.3 * rng.standard_normal(8)).clip(0.3)
    assert verdict(wide) == ("inconclusive", "interval")
    assert verdict(10 * (1 + 0.01 * rng.standard_normal(60)), contended=True) == ("inconclusive", "contended")


def test_comparison_rows_hold_the_declared_identity_columns():
    """A comparison row copies the case's identity columns from the schema, so --confirm can
    rebuild the case from it; the columns it judges are declared there too."""
    from dataclasses import fields

    from harness.core import schema
    from harness.core.cases import Case
    from harness.regression.compare import AXES, DESCRIPTION
    from harness.regression.verdicts import ACCURACY_COLUMNS

    assert {f.name for f in fields(Case)} <= set(DESCRIPTION + AXES) <= set(schema.IDENTITY)
    assert set(ACCURACY_COLUMNS) <= set(schema.names("accuracy"))
    assert {"time_ms", "peak_mem_bytes", "status"} <= set(schema.BY_NAME)
    table = compare_frames(*frames({real_id(0): {"samples": [1.0, 1.1]}}), *frames({real_id(0): {"samples": [1.0]}}))
    assert Case.from_row(table.iloc[0].to_dict()).case_id == real_id(0)


def test_thresholds_from_command_line_then_new_suite_then_base_suite():
    def meta(table):
        return {"suite": {"name": "x", "definition": {"compare": table}}}

    t = resolve_thresholds(meta({"time_threshold": 0.08, "alpha": 0.01}), meta({"time_threshold": 0.03}))
    assert (t.time, t.memory, t.alpha) == (0.03, 0.10, 0.01)
    assert t.sources["time_threshold"] == "suite x (NEW)" and t.sources["alpha"] == "suite x (BASE)"
    t = resolve_thresholds(meta({"time_threshold": 0.08}), {}, time=0.2, memory=0.3)
    assert (t.time, t.memory) == (0.2, 0.3) and t.sources["time_threshold"] == "command line"
    t = resolve_thresholds({}, meta({"accuracy_tolerance": {"bfloat16": 1e-2}}))
    assert t.accuracy["bfloat16"] == 1e-2 and t.accuracy["float32"] == 1e-6
    with pytest.raises(CompareError, match="time_threshold"):
        resolve_thresholds({}, meta({"time_threshold": 5}))
    assert validate_compare_table({"time_threshold": 0.05, "memory_threshold": 0.1, "alpha": 0.05}) == []
    assert [k for k, _ in validate_compare_table({"time": 0.05, "alpha": 2, "accuracy_tolerance": {"f8": 1}})] == [
        "time", "alpha", "accuracy_tolerance"]
    # a per-command threshold changes the verdict
    v = verdicts({"c": {"samples": samples(30, 1.0, 0.01, 1)}}, {"c": {"samples": samples(30, 1.1, 0.01, 2)}},
                 Thresholds(time=0.15))
    assert v["c"]["verdict"] == "unchanged"


def test_fingerprint_and_setting_differences_warn(tmp_path):
    a = run_info(fake_run(tmp_path, "a", fingerprint="fp1"))
    b = run_info(fake_run(tmp_path, "b", fingerprint="fp2", status="interrupted (SIGTERM)"))
    warnings = comparison_warnings(a, b)
    assert any("machine fingerprints differ" in w and "fp1" in w and "fp2" in w for w in warnings)
    assert any("NEW run b is 'interrupted (SIGTERM)'" in w for w in warnings)
    assert comparison_warnings(a, a) == []


# ----------------------------------------------------------------------------------------------
# end to end on two tiny real runs


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return tiny_real_runs(tmp_path_factory)


@pytest.fixture
def bench(capsys):
    import harness.cli.main as cli

    assert "harness.cli.regression" in cli.COMMAND_MODULES

    def run(*args):
        status = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_compare_two_real_runs_end_to_end(real, bench, tmp_path):
    html = tmp_path / "compare.html"
    status, out, err = bench("compare", "latest~1", "latest", "--root", real, "--format", "json", "-o", html)
    assert status == 0 and "Traceback" not in err
    data = json.loads(out)
    assert len(data["cases"]) == 4 and sum(data["counts"].values()) == 4
    assert {c["n_base"] for c in data["cases"]} == {10} and data["warnings"] == []  # 5 samples from each of 2 processes
    assert all(c["verdict"] in ("unchanged", "inconclusive", "regressed", "improved") for c in data["cases"])
    assert all(c["mem_ratio"] == pytest.approx(1.0) for c in data["cases"])  # peak memory is deterministic
    page = html.read_text()
    assert "Attention Bench — comparison" in page and page.count("<svg") == 1
    assert page.count("<tr") >= 4 + 1 + 10  # case rows, header, environment rows
    assert "machine.fingerprint" in page and "Median time ratio" in page
    for external in ('src="http', 'href="http', "url(http", "<link"):
        assert external not in page

    status, out, _ = bench("compare", "latest~1", "latest", "--root", real, "--format", "markdown", "--no-html")
    assert status == 0 and out.startswith("### Attention Bench:")
    status, out, _ = bench("compare", "latest~1", "latest", "--root", real, "--all", "--no-html")
    assert status == 0 and "naive cpu float32 fwd B1 H2 L32 D16" in out


def _doctored(real, tmp_path, name, factor):
    """A copy of the first real run with its samples replaced by seeded ones (times factor)."""
    src = real / "runs" / "first"
    dst = tmp_path / name
    shutil.copytree(src, dst)
    meta = json.loads((dst / "run.json").read_text())
    meta["run_id"] = name
    # doctored numbers come from no code: record a commit that no repository holds, so --confirm
    # declines to re-run them
    meta["environment"]["git"] = {"commit": "0" * 40, "dirty": False}
    (dst / "run.json").write_text(json.dumps(meta))
    rows = store.read_results(dst)
    rng = np.random.default_rng(7)
    recs = []
    for cid in rows["case_id"]:
        recs += [{"case_id": cid, "rep": r, "time_ms": factor * (1 + 0.01 * x)}
                 for r, x in enumerate(rng.normal(size=8))]
    pd.DataFrame(recs).to_parquet(dst / "samples.parquet", index=False)
    rows["time_ms"] = factor
    rows.to_parquet(dst / "results.parquet", index=False)
    return dst


def test_exit_codes(real, bench, tmp_path):
    base, slow = _doctored(real, tmp_path, "base", 1.0), _doctored(real, tmp_path, "slow", 1.5)
    status, out, _ = bench("compare", base, slow, "--no-html")
    assert status == 0 and "REGRESSED" in out  # reported, but no gate without the flag
    status, out, _ = bench("compare", base, slow, "--no-html", "--fail-on-regression")
    assert status == 1 and out.count("regressed") >= 4
    status, _, _ = bench("compare", base, slow, "--no-html", "--fail-on-regression", "--time-threshold", "60%")
    assert status == 0
    status, _, _ = bench("compare", slow, base, "--no-html", "--fail-on-regression")
    assert status == 0  # faster is not a regression
    status, _, err = bench("compare", base, tmp_path / "nowhere", "--no-html")
    assert status == 2 and "nowhere" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        bench("compare", base, slow, "--time-threshold", "5")
    assert exc.value.code == 2
    # --confirm against doctored runs declines (their recorded commit is in no repository), verdicts stand
    status, _, err = bench("compare", base, slow, "--no-html", "--fail-on-regression", "--confirm")
    assert status == 1 and "confirm: not re-run" in err and "0000000000 is not in the repository" in err


def test_history_show_baseline_and_trend_commands(real, bench, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(real, root)
    status, out, _ = bench("history", "--root", root)
    assert status == 0 and "2 run(s)" in out and out.count("│ tiny-regress │") == 2
    status, out, _ = bench("history", "--root", root, "--json")
    assert [r["suite"] for r in json.loads(out)] == ["tiny-regress"] * 2
    status, out, _ = bench("show", "latest", "--root", root)
    assert status == 0 and "sdpa(backend=flash) cpu float32 fwd B1 H2 L64 D16" in out
    status, _, err = bench("baseline", "set", "latest~1", "--root", root)
    assert status == 0 and (root / "baseline" / "tiny-regress" / "run.json").exists()
    status, out, _ = bench("compare", "baseline", "latest", "--root", root, "--format", "json", "--no-html")
    assert status == 0 and json.loads(out)["base"]["path"].endswith("baseline/tiny-regress")
    status, _, err = bench("compare", "latest", "baseline", "--root", root)
    assert status == 0 and (root / "compare.html").exists()  # not written into the committed baseline
    assert not (root / "baseline" / "tiny-regress" / "compare.html").exists()
    status, _, err = bench("show", "missing-run", "--root", root)
    assert status == 2 and "missing-run" in err
    status, out, err = bench("trend", "--root", root)
    assert status == 0 and (root / "trend.html").exists()
    page = (root / "trend.html").read_text()
    assert page.count("<svg") == 4 and "trend of tiny-regress" in page


def test_suite_compare_table_in_run_json_sets_the_thresholds(tmp_path):
    definition = {"name": "s", "compare": {"time_threshold": 0.2, "memory_threshold": 0.3}}
    a = fake_run(tmp_path, "a", definition=definition)
    b = fake_run(tmp_path, "b", definition=definition, times=(1.0, 1.1, 0.9, 5.0))
    c = compare_runs(a, b)
    assert (c.thresholds.time, c.thresholds.memory) == (0.2, 0.3)
    assert c.thresholds.sources["time_threshold"] == "suite s (NEW)"
    assert compare_runs(a, b, time_threshold=0.07).thresholds.time == 0.07
    # three samples a side give no interval: not "unchanged", which would claim what was not measured
    assert c.counts["new"] == 1 and c.counts["inconclusive"] == 3 and not c.has_regression


def test_a_change_of_shape_is_pointed_out():
    """Two modes (1.0 and 0.5) whose weights tip from 16:14 to 14:16: the medians jump by half,
    but the distribution barely moved; the verdict follows the test, and the note says why."""
    base = np.concatenate([quantile_samples(16, 1.0, 0.01), quantile_samples(14, 0.5, 0.01)])
    new = np.concatenate([quantile_samples(14, 1.0, 0.01), quantile_samples(16, 0.5, 0.01)])
    v = verdicts({"c": {"samples": base}}, {"c": {"samples": new}})["c"]
    assert v["time_ratio"] < 0.55 and v["ci_low"] < 1 < v["ci_high"]
    assert v["verdict"] == "unchanged" and "distribution changed shape" in v["note"]  # the shift interval is inside


def test_baseline_set_warns_when_confirm_could_not_rerun_it(bench, tmp_path):
    root = tmp_path / "results"
    fake_run(root, "20260101-000000-s-aaaaaa", started="2026-01-01T00:00:00+00:00", dirty=True)
    fake_run(root, "20260102-000000-s-bbbbbb", started="2026-01-02T00:00:00+00:00", dirty=False)
    status, _, err = bench("baseline", "set", "20260101-000000-s-aaaaaa", "--root", root)
    assert status == 0 and "not recorded from a clean commit" in err
    status, _, err = bench("baseline", "set", "20260102-000000-s-bbbbbb", "--root", root)
    assert status == 0 and "not recorded from a clean commit" not in err
