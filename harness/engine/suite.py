"""Suite files (TOML): loading and validation, with every problem found at once.

A suite names what to sweep; :func:`expand_cases` turns it into
cases. See the README for the format. Every problem is reported as one line
``FILE:LINE: KEY: message`` (LINE where the key can be found in the file), all
problems together, before anything runs.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import lengths
from harness.core.cases import DEFAULTS, HEAD_GEOMETRY, SIZE_AXES, SWEEP_ALIASES, Case, sweep_defaults
from harness.core.config import COMPARE, RUN, SWEEP, TIMING, RunConfig, Table, closest, type_name
from harness.core.errors import UserError
from harness.core.names import name_problem
from harness.core.registry import RegistryError, get_variant
from harness.measure.timing import TimingConfig

TOP_KEYS = ("name", "description", "plugins", "seed", "defaults", "sweep", "timing", "run", "compare", "variant")


class SuiteError(UserError):
    """A suite file has problems; ``problems`` holds one printable line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return list(self.problems)


@dataclass
class VariantEntry:
    """One ``[[variant]]`` table: a variant, lists of its own parameters, and axis overrides."""

    name: str
    params: dict[str, list[Any]] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Suite:
    path: Path | None
    name: str
    description: str = ""
    plugins: list[str] = field(default_factory=list)
    seed: int = 0
    defaults: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    timing: TimingConfig = field(default_factory=TimingConfig)
    variants: list[VariantEntry] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


class _Locator:
    """Finds the line of ``key`` in a table of the TOML text (best effort; None if not found)."""

    header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def line(self, table: str | None, key: str | None = None, index: int | None = None) -> int | None:
        current: str | None = None
        seen: dict[str | None, int] = {}  # None: the top-level table, never counted
        header_line = None
        for number, line in enumerate(self.lines, 1):
            m = self.header.match(line)
            if m:
                current = m.group(2)
                seen[current] = seen.get(current, -1) + 1
                if current == table and (index is None or seen[current] == index):
                    header_line = number
                    if key is None:
                        return number
                continue
            in_table = current == table and (index is None or seen.get(current) == index)
            if in_table and key is not None and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
                return number
        return header_line


class _Checker:
    def __init__(self, path: Path | None, text: str):
        self.where = str(path) if path else "<suite>"
        self.locate = _Locator(text)
        self.problems: list[str] = []

    def add(self, table: str | None, key: str | None, message: str, index: int | None = None, label: str | None = None):
        line = self.locate.line(table, key, index)
        pos = f"{self.where}:{line}" if line else self.where
        name = label or ".".join(p for p in (table, key) if p)
        self.problems.append(f"{pos}: {name}: {message}" if name else f"{pos}: {message}")


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; raises SuiteError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SuiteError([f"{path}: no such suite file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError([f"{path}: cannot read suite file: {exc}"]) from None
    return parse_suite(text, path)


def parse_suite(text: str, path: Path | None = None) -> Suite:
    """Validate suite ``text`` (from ``path``, used in messages and for relative plugin paths)."""
    check = _Checker(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError([f"{check.where}: invalid TOML: {exc}"]) from None

    for key in raw:
        if key not in TOP_KEYS:
            check.add(None, key, f"unknown key{closest(key, TOP_KEYS)}")

    name = raw.get("name", path.stem if path else "suite")
    if (problem := name_problem(name)) is not None:  # it becomes run ids and results/baseline/<name>/
        check.add(None, "name", problem)
        name = "suite"
    description = raw.get("description", "")
    if not isinstance(description, str):
        check.add(None, "description", f"expected a string, got {type_name(description)}")
        description = ""
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        check.add(None, "seed", f"expected an integer, got {type_name(seed)} {seed!r}")
        seed = 0

    suite = Suite(path=path, name=name, description=description, seed=seed, raw=raw, text=text)
    suite.plugins = _plugins(raw.get("plugins", []), check, suite.base_dir)
    suite.defaults = _defaults(raw.get("defaults", {}), check)
    suite.sweep = _sweep(raw.get("sweep", {}), check, suite.defaults)
    suite.timing = TimingConfig(**_settings(TIMING, raw.get("timing", {}), check))
    suite.run = RunConfig(**_settings(RUN, raw.get("run", {}), check))
    _settings(COMPARE, raw.get("compare", {}), check)  # bench compare reads it from run.json

    plugin_problems = _load_plugins(suite, check)
    if not plugin_problems:
        suite.variants = _variants(raw.get("variant"), check)
    _check_head_combinations(suite, check)
    _check_inference_axes(suite, check)
    named = {v.name for v in suite.variants}
    for name in (suite.run.profile if isinstance(suite.run.profile, list) and named else []):
        if name not in named:  # [run] profile = ["variant", ...] names variants of this suite
            check.add("run", "profile", f"variant {name!r} is not in this suite{closest(name, named)}")
    if check.problems:
        raise SuiteError(check.problems)
    return suite


def _plugins(value: Any, check: _Checker, base: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        check.add(None, "plugins", "expected an array of strings (python files or module names)")
        return []
    from harness.engine.plugins import looks_like_path

    for plugin in value:
        if looks_like_path(plugin) and not (base / plugin).is_file():
            check.add(None, "plugins", f"plugin file {plugin!r} does not exist (looked in {base})")
    return list(value)


def _load_plugins(suite: Suite, check: _Checker) -> bool:
    from harness.engine.plugins import PluginError, load_plugin

    failed = False
    for plugin in suite.plugins:
        try:
            load_plugin(plugin, suite.base_dir)
        except PluginError as exc:
            check.add(None, "plugins", str(exc))
            failed = True
    return failed


def _settings(table: Table, value: Any, check: _Checker) -> dict[str, Any]:
    """The settings a ``[timing]``, ``[run]`` or ``[compare]`` table gives; its problems to ``check``."""
    settings, problems = table.check(value)
    for key, message in problems:
        check.add(table.name if key else None, key or table.name, message)
    return settings


def _table(value: Any, check: _Checker, table: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        check.add(None, table, f"expected a table [{table}], got {type_name(value)}")
        return {}
    return value


def _unknown_axis(key: str) -> str:
    return f"unknown key{closest(key, SWEEP.names)}; sweepable keys: {', '.join(SWEEP.names)}"


def _defaults(value: Any, check: _Checker) -> dict[str, Any]:
    out = {}
    for key, v in _table(value, check, "defaults").items():
        if key not in SWEEP:
            check.add("defaults", key, _unknown_axis(key))
        elif isinstance(v, list) and not SWEEP[key].list_value:
            check.add("defaults", key, "[defaults] takes single values; put lists under [sweep]")
        elif (problem := SWEEP[key].check(v)[1]) is not None:
            check.add("defaults", key, problem)
        else:
            out[key] = SWEEP[key].check(v)[0]  # as the key reads it (lengths = [1, 7]: "1,7")
    return out


def _axis_list(table: str, key: str, v: Any, check: _Checker, index: int | None = None, label: str | None = None):
    values = v if isinstance(v, list) else [v]
    if SWEEP[key].list_value and values and all(isinstance(x, int) for x in values):
        values = [v]  # one list value (lengths = [100, 7, 512]), not a sweep of integers
    if not values:
        check.add(table, key, "empty list: nothing to sweep", index, label)
        return None
    ok = True
    for item in values:
        if (problem := SWEEP[key].check(item)[1]) is not None:
            check.add(table, key, problem, index, label)
            ok = False
    if ok and len(set(map(repr, values))) != len(values):
        check.add(table, key, f"repeated values in {values}", index, label)
        ok = False
    return [SWEEP[key].check(x)[0] for x in values] if ok else None


def _sweep(value: Any, check: _Checker, defaults: dict[str, Any]) -> dict[str, list[Any]]:
    out = {}
    for key, v in _table(value, check, "sweep").items():
        if key not in SWEEP:
            check.add("sweep", key, _unknown_axis(key))
            continue
        if key in defaults:
            check.add("sweep", key, "set in both [defaults] and [sweep]; keep one")
        if (values := _axis_list("sweep", key, v, check)) is not None:
            out[key] = values
    return out


def _variants(value: Any, check: _Checker) -> list[VariantEntry]:
    if value is None:
        check.add(None, None, "no [[variant]] entries: nothing to run")
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        check.add(None, "variant", "expected [[variant]] tables")
        return []
    entries: list[VariantEntry] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(value):
        name = table.get("name")
        label = f"variant[{index}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(name, str):
            check.add("variant", "name" if "name" in table else None, "every [[variant]] needs name = \"...\"", index,
                      label)
            continue
        try:
            variant = get_variant(name)
        except RegistryError as exc:
            check.add("variant", "name", str(exc), index, f"{label}.name")
            continue
        entry = VariantEntry(name=name)
        ok = True
        for key, v in table.items():
            if key == "name":
                continue
            if key in variant.params:
                spec = variant.params[key]
                values = v if isinstance(v, list) else [v]
                if not values:
                    check.add("variant", key, "empty list: nothing to sweep", index, f"{label}.{key}")
                    ok = False
                for item in values:
                    if (problem := spec.problem(item)) is not None:
                        check.add("variant", key, problem, index, f"{label}.{key}")
                        ok = False
                entry.params[key] = [float(x) if spec.kind is float else x for x in values]
            elif key in SWEEP:
                values = _axis_list("variant", key, v, check, index, f"{label}.{key}")
                if values is None:
                    ok = False
                else:
                    entry.axes[key] = values
            else:
                options = list(variant.params) + list(SWEEP.names)
                known = ", ".join(variant.params) or "none"
                check.add(
                    "variant", key, f"unknown key{closest(key, options)}; {name}'s parameters: {known}",
                    index, f"{label}.{key}",
                )
                ok = False
        identity = repr((name, sorted(entry.params.items()), sorted(entry.axes.items())))
        if identity in seen:
            check.add("variant", "name", f"duplicate of variant[{seen[identity]}]", index, label)
            ok = False
        seen[identity] = index
        if ok:
            entries.append(entry)
    return entries


def _check_head_combinations(suite: Suite, check: _Checker) -> None:
    """kv_heads must divide heads for every combination the suite will run."""
    bad: set[tuple[int, int]] = set()
    for entry in suite.variants or [VariantEntry(name="")]:
        axes = {**{k: [v] for k, v in suite.defaults.items()}, **suite.sweep, **entry.axes}
        heads = axes.get("heads", [SWEEP["heads"].default])
        kv = axes.get("kv_heads", [None])
        for h, g in itertools.product(heads, kv):
            if g is not None and (g > h or h % g):
                bad.add((h, g))
    for h, g in sorted(bad):
        table = "sweep" if "kv_heads" in suite.sweep else "defaults"
        check.add(table, "kv_heads", f"kv_heads={g} does not divide heads={h}")


def _check_inference_axes(suite: Suite, check: _Checker) -> None:
    """seq_len, or q_len with kv_len; no causal q_len > kv_len; paged needs page_size; listed lengths fit."""
    found: dict[tuple, None] = {}  # (key, message), in order, once each
    for entry in suite.variants or [VariantEntry(name="")]:
        axes = {**{k: [v] for k, v in suite.defaults.items()}, **suite.sweep, **entry.axes}
        for key, message in inference_axes_problems(axes):
            found[(key, message)] = None
    for key, message in found:
        check.add("sweep" if key in suite.sweep else "defaults" if key in suite.defaults else "variant", key, message)


def inference_axes_problems(axes: dict[str, list[Any]]) -> list[tuple[str, str]]:
    """(key, message) for each rule the inference axes of one variant entry's sweep break."""
    out = []
    if "seq_len" in axes and ({"q_len", "kv_len"} & set(axes)):
        key = "q_len" if "q_len" in axes else "kv_len"
        out.append((key, "set together with seq_len: use seq_len (queries and keys of one length), "
                    "or q_len and kv_len"))
    if "q_len" in axes and "kv_len" not in axes:
        out.append(("q_len", "needs kv_len (the key/value length; seq_len means both)"))
    maxima = axes.get("kv_len") or axes.get("seq_len") or [DEFAULTS["seq_len"]]
    causal, q_lens = True in axes.get("causal", [False]), axes.get("q_len", [])
    for q, kv in itertools.product(q_lens, axes.get("kv_len", [])):
        if causal and q > kv:
            out.append(("q_len", f"q_len {q} > kv_len {kv} with causal: refused (bottom-right alignment would "
                        f"leave the first {q - kv} queries no key to see); keep q_len <= kv_len, or causal = false"))
    layouts, pages = axes.get("kv_layout", ["contiguous"]), axes.get("page_size")
    if "paged" in layouts and not pages:
        out.append(("kv_layout", 'kv_layout = "paged" needs page_size (tokens per page)'))
    if pages and "paged" not in layouts:
        out.append(("page_size", 'page_size applies to kv_layout = "paged" only'))
    for value in axes.get("lengths", []):
        listed = lengths.explicit(value) if value not in lengths.KINDS else None
        if not listed:
            continue
        for batch in axes.get("batch", [DEFAULTS["batch"]]):
            if len(listed) > batch:
                out.append(("lengths", f"{len(listed)} lengths listed for batch {batch}: at most one per sequence"))
        for top in maxima:
            if max(listed) > top:
                out.append(("lengths", f"length {max(listed)} is longer than the maximum (kv_len/seq_len {top})"))
        for q in q_lens if causal else ():
            if min(listed) < q:
                out.append(("lengths", f"length {min(listed)} is shorter than q_len {q}: with causal bottom-right "
                            "alignment its first queries would see no key"))
    return out + workload_axes_problems(axes)


def workload_axes_problems(axes: dict[str, list[Any]]) -> list[tuple[str, str]]:
    """(key, message) for each rule a model, a serving batch or a shared prefix breaks in one variant
    entry's sweep: a model fills the head geometry, a serving batch the batch and lengths (neither beside
    keys that set them), and a shared prefix leaves room for the queries in every sequence."""
    out = []
    if any(axes.get("model", [])) and (given := [k for k in HEAD_GEOMETRY if k in axes]):
        out.append(("model", f"model fills heads, kv_heads and head_dim from the catalogue: leave out "
                    f"{', '.join(given)} (or the model)"))
    mixes = [v for v in axes.get("lengths", []) if lengths.mix(v)]
    if mixes and (given := [k for k in ("batch", *SWEEP_ALIASES, *SIZE_AXES) if k in axes]):
        out.append(("lengths", f"a serving batch ({mixes[0]!r}) sets batch, q_len and kv_len itself: leave out "
                    f"{', '.join(dict.fromkeys(given))}"))
    for p in (p for p in axes.get("shared_prefix", []) if p):
        for value in axes.get("lengths", ["fixed"]):
            seqs = lengths.mix(value)
            if value in ("uniform", "zipf"):
                out.append(("shared_prefix",
                            f"a shared prefix needs lengths fixed, listed or a serving batch, not {value!r}"))
            elif seqs is not None and any(p + q > kv for q, kv in seqs):
                out.append(("shared_prefix", f"shared_prefix {p} leaves no room for the new tokens of every sequence "
                            f"of {value!r} (prefix + q_len must be <= kv_len)"))
            elif seqs is None and not axes.get("q_len"):
                out.append(("shared_prefix",
                            "a shared prefix needs q_len and kv_len: the queries are new tokens after it"))
            elif seqs is None:
                shortest = min(lengths.explicit(value) or axes.get("kv_len", [DEFAULTS["seq_len"]]))
                if p + max(axes["q_len"]) > shortest:
                    out.append(("shared_prefix",
                                f"shared_prefix {p} + q_len {max(axes['q_len'])} exceeds the context {shortest}"))
    return out


def _product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def expand_cases(suite) -> list[Case]:
    """Every case of a validated suite, in a stable order (variant entry, then params, then axes)."""
    cases: list[Case] = []
    seen: set[str] = set()
    for entry in suite.variants:
        variant = get_variant(entry.name)
        axes = {name: [default] for name, default in sweep_defaults().items()}
        axes.update({k: [v] for k, v in suite.defaults.items()})
        axes.update(suite.sweep)
        axes.update(entry.axes)
        param_lists = {name: [spec.default] for name, spec in variant.params.items()}
        param_lists.update(entry.params)
        for params in _product(param_lists):
            for point in _product(axes):
                case = Case.from_point(entry.name, params, point)
                if case.case_id not in seen:
                    seen.add(case.case_id)
                    cases.append(case)
    return cases
