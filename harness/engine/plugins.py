"""Third-party variants: python files or modules named by a suite, and installed entry points.

A plugin is ordinary Python that calls :func:`harness.register_variant`. It is
loaded either from a suite's ``plugins = [...]`` list (a ``.py`` path relative to
the suite file, or an importable module name) or, when installed as a package,
from the entry-point group ``attention_bench.variants``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from harness.core.registry import PluginError, RegistryError, load_builtins, registering_from

_LOADED: dict[str, str] = {}


def looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def load_plugin(spec: str, base_dir: Path | str = ".") -> None:
    """Import plugin ``spec`` once (a file relative to ``base_dir``, or a module name)."""
    if looks_like_path(spec):
        path = (Path(base_dir) / spec).resolve()
        key = str(path)
        if key in _LOADED:
            return
        if not path.is_file():
            raise PluginError(f"plugin file {spec!r} does not exist (looked in {Path(base_dir)})")
        module_name = f"attention_bench_plugin_{path.stem}_{abs(hash(key)) % 10**8}"
        _import(spec, lambda: _import_file(module_name, path))
    else:
        key = spec
        if key in _LOADED:
            return
        _import(spec, lambda: importlib.import_module(spec))
    _LOADED[key] = spec


def loaded() -> list[str]:
    """The plugins imported in this process, as :func:`load_plugin` takes them (files as absolute paths)."""
    return list(_LOADED)


def _import_file(module_name: str, path: Path):
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:  # a name Python cannot import (not .py)
        raise ImportError(f"{path.name} is not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _import(spec: str, do_import) -> None:
    load_builtins()  # so a plugin that reuses a built-in name is caught as a duplicate
    try:
        with registering_from(f"plugin {spec}"):
            do_import()
    except RegistryError as exc:
        raise PluginError(f"plugin {spec!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        raise PluginError(f"plugin {spec!r} failed to import: {exc}") from None
    except Exception as exc:  # a plugin's own bug: one clear line naming it
        raise PluginError(f"plugin {spec!r} failed to import: {type(exc).__name__}: {exc}") from None
