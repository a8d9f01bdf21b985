"""Suite files (TOML): loading and validation, with every problem found at once.

A suite names what to sweep; :func:`harness.core.cases.expand_cases` turns it into
cases. See the README for the format. Every problem is reported as one line
``FILE:LINE: KEY: message`` (LINE where the key can be found in the file), all
problems together, before anything runs.
"""

from __future__ import annotations

import difflib
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.cases import AXES, DEVICES, DTYPES, INPUT_KINDS, MODES
from harness.core.registry import RegistryError, get_variant
from harness.measure.timing import SETTINGS as TIMING_SETTINGS, TimingConfig, check_setting, config_problems

TOP_KEYS = ("name", "description", "plugins", "seed", "defaults", "sweep", "timing", "run", "compare", "variant")
TIMING_KEYS = tuple(TIMING_SETTINGS)
POSITIVE_INT_AXES = ("batch", "heads", "kv_heads", "seq_len", "head_dim")
CHOICE_AXES = {"device": DEVICES, "mode": MODES, "dtype": DTYPES, "inputs": INPUT_KINDS}


class SuiteError(Exception):
    """A suite file has problems; ``problems`` holds one printable line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class VariantEntry:
    """One ``[[variant]]`` table: a variant, lists of its own parameters, and axis overrides."""

    name: str
    params: dict[str, list[Any]] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """The ``[run]`` table: how cases are executed."""

    isolation: str = "process"  # process | none
    case_timeout_s: float = 900.0
    memory_budget_gib: float | None = None  # None: 60% of available memory


ISOLATION_MODES = ("process", "none")


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
    run: RunConfig = field(default_factory=lambda: RunConfig())

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def _closest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


class _Locator:
    """Finds the line of ``key`` in a table of the TOML text (best effort; None if not found)."""

    header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def line(self, table: str | None, key: str | None = None, index: int | None = None) -> int | None:
        current: str | None = None
        seen: dict[str, int] = {}
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

    # -- value checks -------------------------------------------------------------------------
    def axis_value(self, axis: str, value: Any) -> str | None:
        if axis in POSITIVE_INT_AXES:
            if not isinstance(value, int) or isinstance(value, bool):
                return f"expected a positive integer, got {_type_name(value)} {value!r}"
            if value <= 0:
                return f"must be a positive integer, got {value}"
        elif axis == "causal":
            if not isinstance(value, bool):
                return f"expected true or false, got {_type_name(value)} {value!r}"
        elif axis in CHOICE_AXES:
            choices = CHOICE_AXES[axis]
            if not isinstance(value, str):
                return f"expected a string, got {_type_name(value)} {value!r}"
            if value not in choices:
                return f"unknown {axis} {value!r}{_closest(value, choices)}; one of {', '.join(choices)}"
        return None


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
            check.add(None, key, f"unknown key{_closest(key, TOP_KEYS)}")

    name = raw.get("name", path.stem if path else "suite")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        check.add(None, "name", f"expected a name of letters, digits, '-', '_' or '.', got {name!r}")
        name = "suite"
    description = raw.get("description", "")
    if not isinstance(description, str):
        check.add(None, "description", f"expected a string, got {_type_name(description)}")
        description = ""
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        check.add(None, "seed", f"expected an integer, got {_type_name(seed)} {seed!r}")
        seed = 0

    suite = Suite(path=path, name=name, description=description, seed=seed, raw=raw, text=text)
    suite.plugins = _plugins(raw.get("plugins", []), check, suite.base_dir)
    suite.defaults = _defaults(raw.get("defaults", {}), check)
    suite.sweep = _sweep(raw.get("sweep", {}), check, suite.defaults)
    suite.timing = _timing(raw.get("timing", {}), check)
    suite.run = _run(raw.get("run", {}), check)
    if "compare" in raw:
        from harness.regression.compare import validate_compare_table

        for key, message in validate_compare_table(raw["compare"]):
            check.add("compare", key, message)

    plugin_problems = _load_plugins(suite, check)
    if not plugin_problems:
        suite.variants = _variants(raw.get("variant"), check)
    _check_head_combinations(suite, check)
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


def _table(value: Any, check: _Checker, table: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        check.add(None, table, f"expected a table [{table}], got {_type_name(value)}")
        return {}
    return value


def _defaults(value: Any, check: _Checker) -> dict[str, Any]:
    out = {}
    for key, v in _table(value, check, "defaults").items():
        if key not in AXES:
            check.add("defaults", key, f"unknown key{_closest(key, AXES)}; sweepable keys: {', '.join(AXES)}")
        elif isinstance(v, list):
            check.add("defaults", key, "[defaults] takes single values; put lists under [sweep]")
        elif (problem := check.axis_value(key, v)) is not None:
            check.add("defaults", key, problem)
        else:
            out[key] = v
    return out


def _axis_list(table: str, key: str, v: Any, check: _Checker, index: int | None = None, label: str | None = None):
    values = v if isinstance(v, list) else [v]
    if not values:
        check.add(table, key, "empty list: nothing to sweep", index, label)
        return None
    ok = True
    for item in values:
        if (problem := check.axis_value(key, item)) is not None:
            check.add(table, key, problem, index, label)
            ok = False
    if ok and len(set(map(repr, values))) != len(values):
        check.add(table, key, f"repeated values in {values}", index, label)
        ok = False
    return list(values) if ok else None


def _sweep(value: Any, check: _Checker, defaults: dict[str, Any]) -> dict[str, list[Any]]:
    out = {}
    for key, v in _table(value, check, "sweep").items():
        if key not in AXES:
            check.add("sweep", key, f"unknown key{_closest(key, AXES)}; sweepable keys: {', '.join(AXES)}")
            continue
        if key in defaults:
            check.add("sweep", key, "set in both [defaults] and [sweep]; keep one")
        if (values := _axis_list("sweep", key, v, check)) is not None:
            out[key] = values
    return out


def _timing(value: Any, check: _Checker) -> TimingConfig:
    table = _table(value, check, "timing")
    settings = {}
    for key, v in table.items():
        if key not in TIMING_KEYS:
            check.add("timing", key, f"unknown key{_closest(key, TIMING_KEYS)}; one of {', '.join(TIMING_KEYS)}")
            continue
        v, problem = check_setting(key, v)
        if problem:
            check.add("timing", key, problem)
        else:
            settings[key] = v
    if "max_reps" in settings and "min_reps" not in settings:
        settings["min_reps"] = min(TimingConfig().min_reps, settings["max_reps"])
    if "min_time_s" in settings and "max_time_s" not in settings:
        settings["max_time_s"] = max(TimingConfig().max_time_s, settings["min_time_s"])
    config = TimingConfig(**settings)
    for key, problem in config_problems(config):
        check.add("timing", key, problem)
    return config


def _run(value: Any, check: _Checker) -> RunConfig:
    settings: dict[str, Any] = {}
    for key, v in _table(value, check, "run").items():
        if key == "isolation":
            if v not in ISOLATION_MODES:
                check.add("run", key, f"expected one of {', '.join(map(repr, ISOLATION_MODES))}, got {v!r}")
            else:
                settings[key] = v
        elif key in ("case_timeout_s", "memory_budget_gib"):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                check.add("run", key, f"expected a number, got {_type_name(v)} {v!r}")
            elif v <= 0:
                check.add("run", key, f"must be > 0, got {v}")
            else:
                settings[key] = float(v)
        else:
            options = ("isolation", "case_timeout_s", "memory_budget_gib")
            check.add("run", key, f"unknown key{_closest(key, options)}; one of {', '.join(options)}")
    return RunConfig(**settings)


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
            check.add("variant", "name" if "name" in table else None, "every [[variant]] needs name = \"...\"", index, label)
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
            elif key in AXES:
                values = _axis_list("variant", key, v, check, index, f"{label}.{key}")
                if values is None:
                    ok = False
                else:
                    entry.axes[key] = values
            else:
                options = list(variant.params) + list(AXES)
                known = ", ".join(variant.params) or "none"
                check.add(
                    "variant", key, f"unknown key{_closest(key, options)}; {name}'s parameters: {known}",
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
        heads = axes.get("heads", [AXES["heads"]])
        kv = axes.get("kv_heads", [None])
        for h, g in itertools.product(heads, kv):
            if g is not None and (g > h or h % g):
                bad.add((h, g))
    for h, g in sorted(bad):
        table = "sweep" if "kv_heads" in suite.sweep else "defaults"
        check.add(table, "kv_heads", f"kv_heads={g} does not divide heads={h}")
