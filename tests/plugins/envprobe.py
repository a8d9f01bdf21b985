"""Test-only variant that records, in its rows, the environment of the process that ran it."""

import os

from harness import attention_flops, get_variant, register_variant

#: Variables whose value (or absence) the rows record, one column each (``env_`` + the name).
WATCHED = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "OMP_PROC_BIND", "MALLOC_ARENA_MAX")


def _environment(case) -> dict:
    return {f"env_{name}": os.environ.get(name, "<unset>") for name in WATCHED}


@register_variant("env_probe", family="dense", exact=True, flops=attention_flops, columns=_environment)
def env_probe(q, k, v, *, causal):
    return get_variant("naive")(q, k, v, causal=causal)
