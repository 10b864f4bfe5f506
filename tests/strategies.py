"""Shared hypothesis strategies. They draw a config, shapes and a seed, never large arrays: tensors are
filled from np.random.default_rng(seed). Router inputs are redrawn token by token until the gap between
the k-th and (k+1)-th router logit is at least `margin`, so that float error cannot flip a selection
(testing-notes.md: "Router-logit strategies must enforce a margin explicitly")."""

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
