"""Shared hypothesis strategies and float-comparison bounds.

Strategies draw a config, shapes and a seed, never large arrays: tensors are filled from
np.random.default_rng(seed). Router inputs are redrawn token by token until the gap between the k-th and
(k+1)-th router logit is at least `margin`, so that float error cannot flip a selection
(testing-notes.md: "Router-logit strategies must enforce a margin explicitly").

Bounds. A float comparison's absolute tolerance is a multiple of the magnitude S of what was computed
(`magnitude`, `layer_magnitude`), never a bare constant: rounding errors are relative to the values a
computation handles, and the same layer with other weights or inputs handles values 100× larger.
`reorder_atol` is the bound for two evaluations of the same formula that differ only in how sums are
grouped (BLAS kernels and blocking, threads, rows in another order or another batch, a cached table
instead of a per-call GEMM), derived at REORDER_K.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

import ref
from ref import HyperMoEConfig


@st.composite
def configs(draw, *, max_experts: int = 8, capacity: bool | None = None, hyper_expert: bool | None = None,
            noisy_gating: bool = False, **fixed) -> HyperMoEConfig:
    """Random small configs: N 1–8, k 1–N, both gates, capacity on/off (switch), biases, activations."""
    n = draw(st.integers(1, max_experts))
    gate = draw(st.sampled_from(ref.GATES))
    k = 1 if gate == "switch" else draw(st.integers(1, n))
    cap = None
    if gate == "switch" and (capacity is None and draw(st.booleans()) or capacity):
        cap = draw(st.integers(1, 4))
    values = dict(
        d_model=draw(st.integers(1, 12)), d_ff=draw(st.integers(1, 12)), n_experts=n, top_k=k, gate=gate,
        capacity=cap, expert_bias=draw(st.booleans()), router_bias=draw(st.booleans()),
        activation=draw(st.sampled_from(ref.ACTIVATIONS)),
        hyper_expert=draw(st.booleans()) if hyper_expert is None else hyper_expert,
        noisy_gating=noisy_gating,
        d_expert_embed=draw(st.integers(1, 6)), d_process=draw(st.integers(1, 6)), d_hyper=draw(st.integers(1, 6)),
        d_layer_embed=draw(st.integers(1, 4)), d_generator=draw(st.integers(1, 6)), d_adapter=draw(st.integers(1, 6)),
        n_layers=draw(st.integers(1, 3)), n_heads=1,
    )
    values.update(fixed)
    return HyperMoEConfig(**values)


U64 = 2.0**-53  # unit roundoff of float64
U32 = 2.0**-24  # unit roundoff of float32

# REORDER_K. Each of the two evaluations differs from the exact value by at most Σ over its dependent
# stages of γ_n · M (γ_n = n u / (1 - n u): a sum of n products; M: the stage's Σ|terms| times the gain of the
# stages after it). A HyperMoE layer has ≤ 12 dependent stages (router, softmax and gates, expert W1, its
# activation, W2, the unselected-embedding sum, process ×2, trunk, the generator heads, the adapter ×2), each a
# sum of n ≤ 33 terms (widths ≤ 32 plus a bias); with the reference init every stage is O(1)–O(10)
# (ref.params.init_std), and M ≤ 4 S allows for sums of |terms| above the result and gains above 1. So one
# evaluation errs by ≤ 12 · 33 · 4 u S ≈ 1600 u S, two differ by ≤ 3200 u S ≤ 4096 u S: in float64
# 4.5e-13 · S, in float32 2.4e-4 · S, still ≥ 20× below what a wrong formula, a stale cache or a flipped
# selection moves an output by (≥ 1e-2 S at these sizes). Measured with 100 examples per hypothesis test
# (tests/test_layer.py, test_ref.py, test_model.py, test_convert.py, float64 and float32): outputs ≤ 6 u S,
# gradients (compared at 4 × the bound of their own magnitude) ≤ 17 u S: the bound is never within 100× of use.
REORDER_K = 4096


def magnitude(*values) -> float:
    """S = max(1, max |v|) over numpy arrays, torch tensors or numbers (empty ones count as 0)."""
    S = 1.0
    for v in values:
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().abs().max().item() if v.numel() else 0.0
        S = max(S, float(np.max(np.abs(np.asarray(v, dtype=np.float64)), initial=0.0)))
    return S


def layer_magnitude(cfg: HyperMoEConfig, params, x, layer_index: int = 0, **draws) -> float:
    """S of one HyperMoE layer on x: the largest magnitude among its input, every expert's FFN output, the
    routed part, the HyperExpert and the output (ref in float64; conformance/tolerances.py uses the same S).
    `draws`: the jitter / gate_noise the compared runs used (ref.layer's keywords)."""
    x = np.asarray(x.detach().double().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    params = {n: np.asarray(v, dtype=np.float64) for n, v in params.items()}
    result = ref.layer(cfg, params, x, layer_index, **{k: v for k, v in draws.items() if v is not None})
    xt = x.reshape(-1, cfg.d_model)
    ffn = [ref.expert_ffn(cfg, params, i, xt) for i in range(cfg.n_experts)]
    return magnitude(x, *ffn, result.routed, result.hyper, result.output)


def reorder_atol(S: float, u: float = U64) -> float:
    """The absolute bound REORDER_K · u · S for two evaluations of one formula in a different order."""
    return REORDER_K * u * S


class Case(NamedTuple):
    cfg: HyperMoEConfig
    params: dict[str, np.ndarray]  # float64
    x: np.ndarray  # (*batch, S, d) float64
    layer_index: int
    seed: int


def inputs_with_margin(cfg: HyperMoEConfig, params, shape: tuple[int, ...], rng: np.random.Generator,
                       margin: float, scale: float = 1.0, attempts: int = 200) -> np.ndarray:
    """x of `shape` (..., d) whose every token has routing margin ≥ `margin` (SPEC.md §3.2)."""
    x = rng.standard_normal(shape) * scale
    flat = x.reshape(-1, cfg.d_model)
    for _ in range(attempts):
        logits = ref.router_logits(cfg, params, flat)
        bad = ref.routing_margins(logits, cfg.top_k) < margin
        if not bad.any():
            return x
        flat[bad] = rng.standard_normal((int(bad.sum()), cfg.d_model)) * scale
    raise RuntimeError(f"could not draw inputs with routing margin {margin} for {cfg}")


@st.composite
def cases(draw, cfg_strategy=None, *, max_tokens: int = 10, margin: float = 1e-3) -> Case:
    """A config, float64 parameters, an input (*batch, S, d) with routing margin ≥ `margin`, a layer."""
    cfg = draw(cfg_strategy if cfg_strategy is not None else configs())
    seed = draw(st.integers(0, 2**32 - 1))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    seq = draw(st.integers(0, max_tokens))
    rng = np.random.default_rng(seed)
    params = ref.init(cfg, seed=seed)
    x = inputs_with_margin(cfg, params, (*batch, seq, cfg.d_model), rng, margin)
    layer_index = draw(st.integers(0, cfg.n_layers - 1))
    return Case(cfg, params, x, layer_index, seed)
