"""The reference run and the error bound of every output of an export, inputs with controlled routing margins,
and the comparison against a bound: export.verify's method (its module docstring says why the bound has these
two terms, and what was measured).

Notation as conformance/tolerances.py: u_D the unit roundoff of the export dtype D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

import ref
from ref import HyperMoEConfig
from ref.tolerances import UNIT_ROUNDOFF, logit_error_bound, magnitude, router_scales
from ref.tolerances import round_to as round_to_dtype

YARDSTICK = 4.0  # × the measured deviation of ref in float32 from ref in float64 (export/verify.py's docstring)
K = 16  # the floor K u_D S; conformance's K = 64 has no measured term beside it (export/verify.py's docstring)
MARGIN_FACTOR = 4.0  # inputs: routing margin ≥ 4 ε_t (2 ε_t already rules out a flip; 2× headroom)


# ---------------------------------------------------------------------------------------------
# The reference run and the error bound of every output
# ---------------------------------------------------------------------------------------------


class Expected(NamedTuple):
    values: dict[str, np.ndarray]  # output name → ref (float64)
    bounds: dict[str, float]  # output name → bound on max |onnx - ref| (selected_experts: 0, compared exactly)
    margins: np.ndarray  # (B, S) routing margin of each token in units of its logit-error bound ε_t, min over layers


def measured_run(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, x: np.ndarray, dtype: str,
                 layer_index: int = 0, attention_mask: np.ndarray | None = None) -> dict:
    """ref run in float32 on the export's parameters (rounded to `dtype`) and the same input: what an honest
    implementation's rounding does to every output and router logit, measured (the yardstick term)."""
    p32 = {name: round_to_dtype(dtype, v).astype(np.float32) for name, v in params.items()}  # exact: rounded to ≤ 24 bits
    if kind == "model":
        from ref import model as ref_model

        logits, _, results = ref_model.forward(cfg, p32, x, attention_mask)
        return {"logits": logits, "router": [r.logits for r in results.values()]}
    x32 = x.astype(np.float32)  # x is already rounded to the export's input dtype: exact
    if kind == "layer":
        r = ref.layer(cfg, p32, x32, layer_index)
        return {"output": r.output, "gates": r.gates, "router": [r.logits]}
    final, results = ref.stack(cfg, p32, x32)
    return {"output": final, "router": [r.logits for r in results]}


def expected(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, x: np.ndarray, dtype: str,
             layer_index: int = 0, attention_mask: np.ndarray | None = None) -> Expected:
    """ref (float64) on x (B, S, d), or token ids (B, S) for a model, the bound on every output's error for an
    export in `dtype`, and each token's routing margin in units of its logit-error bound (export/verify.py's docstring).
    A model's attention_mask (B, S) (0 = padding, default positions: ref.model.forward's): padding positions'
    outputs are meaningless, so they count neither in the bound's measured term nor in the margins (+inf)."""
    u = UNIT_ROUNDOFF[dtype]
    measured = measured_run(cfg, params, kind, x, dtype, layer_index, attention_mask)
    lead = x.shape if kind == "model" else x.shape[:-1]
    if kind == "model":
        from ref import model as ref_model

        logits, _, results = ref_model.forward(cfg, params, x, attention_mask)
        layers = []  # (layer params, router scale R (the router's input is LayerNorm ln2's output), result)
        for i, r in results.items():
            lp = ref_model.block_moe_params(params, i)
            layers.append((lp, _after_norm(cfg, params, f"blocks.{i}.ln2", lp["router.weight"]), r))
        values, scales = {"logits": logits}, {"logits": _logit_scale(cfg, params)}
    elif kind == "layer":
        r = ref.layer(cfg, params, x, layer_index)
        layers = [(params, router_scales(cfg, params, x, {}), r)]
        values = {"output": r.output, "selected_experts": r.selected, "gates": r.gates}
        scales = {"output": magnitude(cfg, params, x, r, with_input=False), "gates": 1.0}
    else:
        final, results = ref.stack(cfg, params, x)
        layers, h, S = [], x, 0.0
        for i, r in zip(ref.stack_layers(cfg), results):  # S: every layer's own scale and every residual sum h
            lp = ref.layer_params(params, i)
            layers.append((lp, router_scales(cfg, lp, h, {}), r))
            S = max(S, magnitude(cfg, lp, h, r, with_input=False))
            h = h + r.output  # the next layer's input (ref.stack's residual)
            S = max(S, float(np.abs(h).max(initial=0.0)))
        values, scales = {"output": final}, {"output": S}
    margins = np.full(lead, np.inf)
    for (lp, R, r), logits_d in zip(layers, measured["router"]):
        logits = r.logits.reshape(-1, cfg.n_experts)  # (T, N)
        drift = np.abs(logits_d.reshape(logits.shape) - logits).max(axis=-1, initial=0.0)  # (T,) measured
        eps = logit_error_bound(cfg, lp, R, dtype) + YARDSTICK * drift  # (T,) ε_t
        margins = np.minimum(margins, (ref.routing_margins(logits, cfg.top_k) / eps).reshape(lead))
    real = np.ones(lead, dtype=bool) if attention_mask is None else attention_mask != 0  # (B, S) positions that count
    margins[~real] = np.inf
    deviation = {name: float(np.abs(measured[name] - values[name])[real].max(initial=0.0)) for name in scales}
    bounds = {name: YARDSTICK * deviation[name] + K * u * scales[name] for name in scales}
    if "selected_experts" in values:
        bounds["selected_experts"] = 0.0  # compared exactly
    return Expected(values, bounds, margins)


def _logit_scale(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray]) -> float:
    """S of a model's logits: the largest sum a logit can be formed from, max_v Σ_i (|w_i| sqrt(d-1) + |b_i|) |E_iv|
    (w, b the final LayerNorm's, E the output projection; |(h - mean)/σ| ≤ sqrt(d - 1))."""
    head = params["token_embed"].T if cfg.tie_embeddings else params["lm_head.weight"]  # (d, V)
    return _after_norm(cfg, params, "ln_f", head)


def _after_norm(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], prefix: str, W: np.ndarray) -> float:
    """max_j Σ_i |y_i W_ij| over every y = LayerNorm `prefix`(h)."""
    w, b = np.abs(params[prefix + ".weight"]), np.abs(params[prefix + ".bias"])  # (d,)
    return float(((w * math.sqrt(cfg.d_model - 1) + b) @ np.abs(W)).max())


# ---------------------------------------------------------------------------------------------
# Inputs with controlled routing margins (the library version of tests/strategies.inputs_with_margin)
# ---------------------------------------------------------------------------------------------


def layer_margins(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, dtype: str, layer_index: int = 0
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """x (B, S, d) or token ids (B, S) → each token's routing margin (B, S) in units of its logit-error bound
    ε_t in `dtype`, the smallest over the HyperMoE layers x goes through (+inf where nothing is routed)."""
    return lambda x: expected(cfg, params, kind, x, dtype, layer_index).margins


def inputs_with_margin(margins: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], rng: np.random.Generator,
                       margin: float, *, round_fn: Callable[[np.ndarray], np.ndarray] = lambda v: v,
                       vocab_size: int | None = None, attempts: int = 200) -> np.ndarray:
    """x of `shape` (float64 (B, S, d), already rounded by `round_fn`; or token ids (B, S) in
    [0, vocab_size) when vocab_size is given) whose every token has margin ≥ `margin`. Tokens below it are
    redrawn (whole tokens; capacity and attention interactions are re-evaluated each round)."""
    def draw(n_tokens: int) -> np.ndarray:
        if vocab_size is not None:
            return rng.integers(0, vocab_size, n_tokens)
        return round_fn(rng.standard_normal((n_tokens, shape[-1])))

    x = draw(int(np.prod(shape[:-1] if vocab_size is None else shape))).reshape(shape)
    for _ in range(attempts):
        bad = margins(x) < margin  # (B, S)
        if not bad.any():
            return x
        x[bad] = draw(int(bad.sum()))
    raise ValueError(f"could not draw inputs with routing margin ≥ {margin} in {attempts} rounds "
                     "(degenerate router? use a model whose router separates the experts)")


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |onnx - ref| / max |ref|
    bound: float  # the error bound of this output on these inputs (export/verify.py's docstring); max_abs > bound fails
    ok: bool


def compare(name: str, actual: np.ndarray, expected: np.ndarray, bound: float) -> Comparison:
    """max |actual - expected| against `bound` (exact equality for integer outputs: bound 0)."""
    if actual.shape != expected.shape:
        return Comparison(name, tuple(actual.shape), float("inf"), float("inf"), bound, False)
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if a.size == 0:
        return Comparison(name, a.shape, 0.0, 0.0, bound, True)
    if not np.all(np.isfinite(a)):
        return Comparison(name, a.shape, float("inf"), float("inf"), bound, False)
    err = float(np.abs(a - e).max())
    scale = float(np.abs(e).max())
    return Comparison(name, a.shape, err, err / scale if scale else err, bound, err <= bound)
