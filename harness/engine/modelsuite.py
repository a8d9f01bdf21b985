"""Suites built from a catalogue model: ``bench run --model llama-3.1-8b --workload decode``.

A model of the catalogue (:mod:`harness.core.models`) and a workload give a suite without a file:

* ``prefill``: causal self-attention of 1K, 2K, 4K and 8K tokens (up to the model's context), the
  exact kernels that take it (sdpa's backends, the tiled FlashAttention in PyTorch, FlexAttention on
  CUDA, the Triton kernel on CUDA in half precision) and the model's attention layer(s);
* ``decode``: one new token against caches of 4K to 128K tokens (up to the model's context, and only
  those whose inputs and float64 check fit the memory budget), sdpa (its math backend on the CPU up to
  :data:`CPU_MATH_CONTEXT`) against flash-decoding (``decode_split_k``), ``naive`` too for a model with
  attention features (the dense baseline that takes them all, where sdpa may not), and the model's layer(s)
  attending through each (on the CPU up to :data:`CPU_LAYER_CONTEXT` tokens: building a longer cache by
  projecting random hidden states takes minutes there);
* ``serve``: two serving batches (a chunked-prefill mix and ragged decodes, :data:`SERVING_MIXES`, up to
  :data:`SERVE_CONTEXT` tokens of context) with the variants that take per-sequence lengths (``padded``,
  the declared baseline; ``packed`` one call per sequence, and its FlexAttention document mask on CUDA;
  ``decode_split_k``; ``paged`` over 16-token pages, gathered a chunk at a time), and shared-prefix
  decoding: :data:`PREFIX_BATCH` requests after one prompt (a quarter of the context, or nearly all of
  it), plain (sdpa, split-K) and with ``cascade``.

Every case names the model (``model = NAME``: its heads, key/value heads and head width, and the
features a case field carries: a soft-cap, sinks, a value width of its own, a window on every layer).
A variant that does not take one of them is left out of the suite; what is left out, and the features
no case carries (a window on alternate layers, biases), are listed in :attr:`Plan.notes`. On the CPU
every case runs on :data:`CPU_THREADS` thread unless ``threads`` says otherwise. The suite is TOML
text (:attr:`Plan.text`), validated like any suite file and recorded in the run's ``run.json``
(``bench resume`` reads it back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness.core import models
from harness.core.cases import AXES, DTYPE_BYTES

WORKLOADS = ("prefill", "decode", "serve")
PREFILL_LENGTHS = (1024, 2048, 4096, 8192)
DECODE_CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
#: On the CPU, the layer is measured at decode contexts up to this (its cache is built by projecting
#: random hidden states of every earlier token, in each worker process).
CPU_LAYER_CONTEXT = 16384
#: On the CPU, sdpa's math backend is measured at decode contexts up to this (it repeats K and V for
#: every query head and materialises the scores: seconds per call and GiB at 128K).
CPU_MATH_CONTEXT = 16384
#: Torch threads per case on the CPU unless asked otherwise: one thread is far less sensitive to other
#: load on the machine than all cores (as suites/decode.toml measures); ``--threads`` to change.
CPU_THREADS = 1
#: The longest context of a ``serve`` workload (C), on the CPU and on CUDA, and at most the model's.
SERVE_CONTEXT = {"cpu": 4096, "cuda": 32768}
#: Serving batches (harness.core.lengths grammar) for a longest context C: two chunks of C/16 new tokens
#: in C/4 of context beside 14 decodes in C/2, and decodes against ragged caches of C/8 … C.
SERVING_MIXES = ("2q{c16}kv{c4}_14q1kv{c2}", "4q1kv{c8}_4q1kv{c4}_4q1kv{c2}_4q1kv{c}")
#: Shared-prefix decoding: this many requests, each with C/16 tokens of its own after a prompt of C/4 or
#: C − C/16 tokens.
PREFIX_BATCH = 16


@dataclass
class Plan:
    """A generated suite: its TOML text, what was chosen (one line each) and what was left out and why."""

    name: str
    text: str
    chosen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def to_toml(top: dict[str, Any], tables: dict[str, dict[str, Any]], variants: list[dict[str, Any]]) -> str:
    """A suite file's text from its top-level keys, tables and ``[[variant]]`` entries."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        if table:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for entry in variants:
        lines += ["", "[[variant]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def _fits(contexts, batch: int, kv_heads: int, width: int, element_bytes: int,
          budget: int) -> tuple[list[int], list[tuple[int, float]]]:
    """(contexts whose case fits ``budget``, [(context, estimate)] of those that do not): the keys and
    values in the case dtype and their float64 copies for the reference check."""
    keep: list[int] = []
    drop: list[tuple[int, float]] = []
    for n in contexts:
        estimate = 2 * batch * kv_heads * n * width * (element_bytes + 8) * 1.25
        if estimate <= budget:
            keep.append(n)
        else:
            drop.append((n, estimate))
    return keep, drop


def _layers(model: models.Model, kernels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The model's attention layer(s), a kernel-choosing layer once per kernel."""
    out = []
    for variant, params in model.layers:
        if "kernel" in params and variant != "mla":
            out.append({"name": variant, **{k: v for k, v in params.items() if k != "kernel"}, "kernel": list(kernels)})
        else:
            out.append({"name": variant, **params})
    return out


def _taking(variants: list[dict[str, Any]], features: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The entries whose variant takes every feature the model's cases carry (the others would only be
    skipped rows); each variant left out is noted with the features it does not take."""
    from harness.core.registry import get_variant

    carried = [f for f in features if f in AXES]
    kept: list[dict[str, Any]] = []
    left: dict[str, list[str]] = {}
    for entry in variants:
        missing = [f for f in carried if not getattr(get_variant(entry["name"]).supports, f, False)]
        if missing:
            left.setdefault(entry["name"], missing)
        else:
            kept.append(entry)
    for name, missing in left.items():
        plan.notes.append(f"{name} left out: it does not take the model's {', '.join(missing)}")
    return kept


def model_suite(name: str, workload: str = "decode", *, device: str = "cpu", dtype: str | None = None,
                batch: int = 1, memory_budget: int = 8 << 30, threads: int | None = None) -> Plan:
    """The suite of ``workload`` for catalogue model ``name`` on ``device`` (see the module doc)."""
    model = models.get(name)
    if workload not in WORKLOADS:
        raise models.ModelError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    g = model.geometry
    cuda = device == "cuda"
    dtype = dtype or ("bfloat16" if cuda else "float32")
    e = DTYPE_BYTES[dtype]
    suite_name = f"{model.name}-{workload}"
    defaults: dict[str, Any] = dict(device=device, dtype=dtype, model=model.name, causal=True)
    sweep: dict[str, Any] = {}
    variants: list[dict[str, Any]] = []
    plan = Plan(suite_name, "")
    sdpa_backends = ["flash", "efficient", "cudnn", "math"] if cuda else ["flash", "math"]
    if workload == "prefill":
        lengths = [n for n in PREFILL_LENGTHS if n <= g.max_context] or [g.max_context]
        defaults["batch"] = batch
        sweep["seq_len"] = lengths
        variants = [{"name": "sdpa", "backend": sdpa_backends}, {"name": "tiled"}]
        if models.case_features(model):  # sdpa may not take them: naive, the dense baseline that takes every one
            variants.append({"name": "naive"})
        if cuda:
            variants += [{"name": "flex"}] + ([{"name": "triton"}] if dtype != "float32" else [])
        variants += _layers(model, ("sdpa",))
        plan.chosen.append(f"prefill: causal self-attention of {', '.join(map(str, lengths))} tokens, batch {batch}")
    elif workload == "decode":
        wanted = [n for n in DECODE_CONTEXTS if n <= g.max_context] or [g.max_context // 4, g.max_context // 2,
                                                                          g.max_context]  # GPT-2: 1024 tokens
        contexts, dropped = _fits(wanted, batch, g.kv_heads, g.head_dim, e, memory_budget)
        if not contexts:
            raise models.ModelError(f"{model.name}: no decode context of {', '.join(map(str, wanted))} fits the "
                                    f"memory budget of {memory_budget / 2**30:.1f} GiB (--memory-budget-gib)")
        defaults.update(batch=batch, q_len=1)
        sweep["kv_len"] = contexts
        variants = [{"name": "sdpa", "backend": [b for b in sdpa_backends if b != "math"]}, {"name": "decode_split_k"}]
        if models.case_features(model):  # sdpa may not take them: naive, the dense baseline that takes every one
            variants.append({"name": "naive"})
        math_contexts = contexts if cuda else [n for n in contexts if n <= CPU_MATH_CONTEXT] or contexts[:1]
        variants.insert(1, {"name": "sdpa", "backend": "math", "kv_len": math_contexts})
        if math_contexts != contexts:
            plan.notes.append(f"sdpa's math backend is measured up to {math_contexts[-1]} tokens of context on the "
                              "CPU (it repeats K and V per query head and holds every score: seconds and GiB beyond)")
        layer_contexts = contexts if cuda else [n for n in contexts if n <= CPU_LAYER_CONTEXT] or contexts[:1]
        for layer in _layers(model, ("sdpa", "decode_split_k")):
            variants.append({**layer, "kv_len": layer_contexts})
        plan.chosen.append(f"decode: 1 new token against {', '.join(map(str, contexts))} cached tokens, batch {batch}")
        if not cuda and layer_contexts != contexts:
            plan.notes.append(f"the attention layer is measured up to {CPU_LAYER_CONTEXT} tokens of context on the "
                              "CPU (each worker builds its cache by projecting every earlier token)")
        for n, estimate in dropped:
            plan.notes.append(f"context {n} left out: its keys, values and float64 check need ~{estimate / 2**30:.1f} "
                              f"GiB, over the memory budget of {memory_budget / 2**30:.1f} GiB")
    else:
        c = min(SERVE_CONTEXT[device], g.max_context)
        mixes = tuple(m.format(c=c, c2=c // 2, c4=c // 4, c8=c // 8, c16=c // 16) for m in SERVING_MIXES)
        suffix, prefixes = c // 16, (c // 4, c - c // 16)
        packed_paths = ["loop", "flex"] if cuda else ["loop"]
        variants = [{"name": "padded", "lengths": list(mixes)},
                    {"name": "packed", "path": packed_paths, "lengths": list(mixes)},
                    {"name": "decode_split_k", "lengths": list(mixes)},
                    dict(name="paged", path="gather", kv_layout="paged", page_size=16, lengths=list(mixes))]
        variants += [dict(name=v, batch=PREFIX_BATCH, q_len=1, shared_prefix=p, kv_len=p + suffix)
                     for p in prefixes for v in ("sdpa", "decode_split_k", "cascade")]
        plan.chosen.append(f"serving batches: {', '.join(mixes)} ([count]q<new tokens>kv<context>, _ between)")
        plan.chosen.append(f"shared prefix: {PREFIX_BATCH} requests decoding after a prompt of "
                           f"{' or '.join(map(str, prefixes))} tokens, {suffix} tokens each of their own")
    variants = _taking(variants, models.case_features(model), plan)
    plan.chosen.insert(0, models.describe(model))
    plan.chosen.append("variants: " + ", ".join(dict.fromkeys(v["name"] for v in variants)) + f"; {device} {dtype}")
    skipped = models.unapplied_features(model, frozenset(AXES))
    if skipped:
        plan.notes.append("features of the model these cases leave out: "
                          + ", ".join(f"{k} = {v}" for k, v in skipped.items()))
    top = {"name": suite_name, "description": f"{model.name} {workload}: the model's attention geometry "
           f"({model.source}), generated by bench run --model"}
    timing: dict[str, Any] = {"warmup": 2, "min_time_s": 0.2, "max_time_s": 3.0}
    threads = threads if threads is not None else (None if cuda else CPU_THREADS)
    if threads is not None:
        timing["threads"] = threads
        plan.chosen.append(f"{threads} thread{'s' if threads != 1 else ''} per case (--threads)")
    plan.text = to_toml(top, {"defaults": defaults, "sweep": sweep, "timing": timing}, variants)
    return plan
