"""How two runs' conditions differ: machine, versions, commit, timing rule, threads, status.

:func:`environment_table` lists every recorded setting side by side (the HTML comparison's
environment table); :func:`comparison_warnings` says, one line each, which differences make
the two runs' timings hard to compare.
"""

from __future__ import annotations

from typing import Any

from harness.regression.history import RunInfo

#: Settings that differ by construction: shown, never flagged.
VOLATILE = ("started",)


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list):
        out[prefix] = ", ".join(map(str, d))
    else:
        out[prefix] = "" if d is None else str(d)
    return out


def _settings(meta: dict[str, Any]) -> dict[str, str]:
    env = meta.get("environment") or {}
    flat = _flatten({"machine": env.get("machine"), "versions": env.get("versions"), "git": env.get("git"),
                     "measurement": env.get("measurement")})
    flat["threads"] = str(env.get("threads"))
    flat.update(_flatten({"timing": meta.get("timing")}))
    flat["seed"] = str(meta.get("seed"))
    flat["suite"] = str((meta.get("suite") or {}).get("name"))
    flat["started"] = str(meta.get("started"))
    flat["status"] = str(meta.get("status"))
    return flat


def _allocator(env: dict[str, Any]) -> str:
    """The workers' THP_MEM_ALLOC_ENABLE as run.json recorded it (``environment.measurement``, or
    ``environment.allocator`` for runs from before it), e.g. ``THP_MEM_ALLOC_ENABLE=1`` or ``… unset``."""
    from harness.measure.environment import ALLOCATOR_ENV, recorded_allocator_env

    value = recorded_allocator_env(env).get(ALLOCATOR_ENV)
    return f"{ALLOCATOR_ENV}={value}" if value is not None else f"{ALLOCATOR_ENV} unset"


def environment_table(base_meta: dict[str, Any], new_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The two runs' environments side by side: ``{key, base, new, differs}`` per setting."""
    a, b = _settings(base_meta), _settings(new_meta)
    keys = list(a) + [k for k in b if k not in a]
    return [
        {"key": k, "base": a.get(k, ""), "new": b.get(k, ""),
         "differs": k not in VOLATILE and a.get(k, "") != b.get(k, "")}
        for k in keys
    ]


def comparison_warnings(base: RunInfo, new: RunInfo) -> list[str]:
    """Differences between the runs that a reader of their comparison must know, one line each."""
    warnings = []
    if base.fingerprint != new.fingerprint:
        bm = ((base.meta.get("environment") or {}).get("machine")) or {}
        nm = ((new.meta.get("environment") or {}).get("machine")) or {}
        warnings.append(
            f"machine fingerprints differ: BASE {base.fingerprint} ({bm.get('hostname')}, {bm.get('cpu_model')}) vs "
            f"NEW {new.fingerprint} ({nm.get('hostname')}, {nm.get('cpu_model')}); "
            "timings from different machines are not comparable"
        )
    if base.suite != new.suite:
        warnings.append(f"different suites: BASE {base.suite!r}, NEW {new.suite!r}; only cases present in both are "
                        "compared")
    bt, nt = base.meta.get("timing") or {}, new.meta.get("timing") or {}
    if bt != nt:
        diff = ", ".join(f"{k} {bt.get(k)}→{nt.get(k)}" for k in sorted(set(bt) | set(nt)) if bt.get(k) != nt.get(k))
        warnings.append(f"timing settings differ ({diff})")
    be, ne = base.meta.get("environment") or {}, new.meta.get("environment") or {}
    if be.get("threads") != ne.get("threads"):
        warnings.append(f"thread counts differ: BASE {be.get('threads')}, NEW {ne.get('threads')}")
    ba, na = _allocator(be), _allocator(ne)
    if ba != na:
        warnings.append(f"allocator settings differ: BASE {ba}, NEW {na} (CPU timings depend on it)")
    for side, info in (("BASE", base), ("NEW", new)):
        if info.status != "complete":
            warnings.append(f"{side} run {info.run_id} is {info.status!r}: cases it did not finish count as "
                            "missing/new")
    return warnings
