"""Measuring a whole attention LAYER (``level = "layer"`` variants, e.g. variants/layers.py) on hidden
states, with harness.engine.runner's measurer contract: fill ``row``, return (samples, restart).

The variant's function is a module factory ``fn(*, d_model, heads, kv_heads, head_dim, causal,
**params)`` (d_model: heads · head_dim, or the hidden size of the catalogue model the case names,
which it then also receives as ``model=NAME``: harness.core.models); it is called with torch seeded
from the run's seed (inside ``fork_rng``, so the weights are reproducible and nobody else's random
state moves), then moved to the case's device and dtype.
Inputs: hidden states x (B, Lq, d_model) drawn from a unit Gaussian (Lq = ``q_len`` or ``seq_len``);
with ``q_len`` set, the module's ``make_cache`` builds the cache of the ``seq_len − q_len`` earlier
tokens (random hidden states through the module's own projections), and the new tokens attend to it
and to themselves (causal: bottom-right aligned). Forward only (``fwd``, under ``no_grad``): layers
declare no backward.

Steps, shared with the kernel measurer (harness.engine.steps): timing in the telemetry sampler,
rotating over deep copies of the module and inputs when one set fits in the cache; peak memory;
FLOPs counted by FlopCounterMode against the analytic ``flops=``; roofline. ``param_count`` comes
from the module itself. Accuracy: the same module (deep copy, same weights) in float64 with its
attention as plain dense softmax math (``dense = True``), on the same x and cache upcast; every
row of the output is checked (harness.measure.reference.correctness_problems), with the same
module in the case's dtype and dense attention as the rounding baseline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from harness.core.cases import Case
from harness.core.config import RunSettings
from harness.core.models import d_model
from harness.core.registry import Variant
from harness.engine.steps import accuracy_columns, after_timing, cost_columns, timed
from harness.measure import profile as profiling
from harness.measure.inputs import TORCH_DTYPES as DTYPES
from harness.measure.inputs import aligned_copy
from harness.measure.reference import correctness_problems, errors
from harness.measure.timing import input_set_count


def build_layer(case: Case, variant: Variant, seed: int = 0) -> torch.nn.Module:
    """The case's layer module, its weights drawn from ``seed``, on the case's device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        named = {"model": case.model} if getattr(case, "model", None) else {}  # a catalogue model's layer
        module = variant.fn(d_model=d_model(case), heads=case.heads, kv_heads=case.kv_heads,
                            head_dim=case.head_dim, causal=case.causal, **case.params, **named)
    return module.to(device=case.device, dtype=DTYPES[case.dtype]).eval()


def layer_inputs(case: Case, module: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, tuple | None]:
    """(x (B, Lq, d_model), the cache of the earlier ``seq_len − q_len`` tokens or None)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.batch, case.query_len, d_model(case), generator=gen)
    x = aligned_copy(x.to(device=case.device, dtype=dtype))
    if case.q_len is None:
        return x, None
    # preallocated for the new tokens, which each call writes in place (a serving engine's static cache);
    # make_cache is the layer's own method, which torch's stubs can only type as a Tensor | Module attribute
    cache = module.make_cache(  # type: ignore[operator]
        case.batch, case.seq_len - case.q_len, generator=gen, dtype=dtype, device=case.device, room=case.q_len)
    return x, _map_cache(cache, aligned_copy)


def _map_cache(cache, fn):
    """``fn`` applied to every tensor of ``cache``, keeping its kind (a static cache's ``map``)."""
    if cache is None:
        return None
    return cache.map(fn) if hasattr(cache, "map") else tuple(fn(t) for t in cache)


def _forward(module: torch.nn.Module, case: Case, x: torch.Tensor, cache):
    def forward():
        with torch.no_grad():
            return module(x, causal=case.causal, cache=cache)

    return forward


def _nbytes(module: torch.nn.Module, x: torch.Tensor, cache) -> int:
    tensors = [*module.parameters(), x, *(cache or ())]
    return sum(t.numel() * t.element_size() for t in tensors)


def _copy(module: torch.nn.Module, dtype: torch.dtype, dense: bool) -> torch.nn.Module:
    twin = copy.deepcopy(module).to(dtype)
    twin.dense = dense  # type: ignore[assignment]  # a plain attribute: torch's stubs allow only Tensor | Module
    return twin


def layer_accuracy(module: torch.nn.Module, case: Case, variant: Variant, x: torch.Tensor, cache) -> dict[str, Any]:
    """The accuracy columns against the float64 dense copy of the same module on the same inputs;
    ``status = "incorrect"`` with the reason when the answer is wrong."""
    f64 = torch.float64
    with torch.no_grad():
        out = module(x, causal=case.causal, cache=cache).unsqueeze(1)  # (B, 1, Lq, d): "head" 0
        ref = _copy(module, f64, True)(x.to(f64), causal=case.causal,
                                       cache=_map_cache(cache, lambda t: t.to(f64))).unsqueeze(1)
    if out.shape != ref.shape:
        raise ValueError(f"layer output has shape {tuple(out.shape[0:1] + out.shape[2:])}, "
                         f"expected {tuple(ref.shape[0:1] + ref.shape[2:])}")
    max_abs, rel = errors(out, ref)

    def baseline():
        with torch.no_grad():
            return _copy(module, x.dtype, True)(x, causal=case.causal, cache=cache).unsqueeze(1)

    rows = torch.arange(out.shape[2])
    problems = correctness_problems(out, ref, rows, dtype=case.dtype, exact=variant.exact,
                                    tolerance=variant.tolerance, baseline=baseline)
    return accuracy_columns(max_abs, rel, problems)


def measure_layer(case: Case, variant: Variant, settings: RunSettings, row: dict[str, Any], phase,
                  time_only: bool) -> tuple[list[float], str]:
    """A layer-level variant (harness.engine.runner.Measurer): time the layer's forward call, then
    (unless ``time_only``) memory, FLOPs and accuracy, into ``row``; returns (samples, why the worker
    should be replaced or '')."""
    timing, seed = settings.timing, settings.seed
    if case.mode != "fwd":
        raise ValueError(f"attention layers are measured forward only, not mode {case.mode}")
    phase("inputs")
    module = build_layer(case, variant, seed)
    row["param_count"] = sum(p.numel() for p in module.parameters())
    x, cache = layer_inputs(case, module, seed)
    call = _forward(module, case, x, cache)
    sets = input_set_count(_nbytes(module, x, cache), case.device, timing)
    copies = [(copy.deepcopy(module), aligned_copy(x), _map_cache(cache, aligned_copy))
              for _ in range(sets - 1)]
    calls = [call] + [_forward(m, case, xc, cc) for m, xc, cc in copies]
    measured = timed(row, case, calls, timing, phase)
    del calls, copies
    if time_only:
        return measured.samples_s, measured.restart
    cost_columns(row, case, call, phase)
    phase("accuracy")
    after_timing(row, case, "accuracy", lambda: layer_accuracy(module, case, variant, x, cache))
    profiling.maybe_profile(settings.profile, case, lambda: _forward(module, case, x, cache), phase)
    return measured.samples_s, measured.restart
