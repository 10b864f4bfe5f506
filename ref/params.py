"""The reference's parameters: their names and shapes for a config (a standalone layer, a stack sharing one
hypernetwork), the checks of a parameter mapping, and the deterministic init. NumPy only.

Names and layouts are the ones every implementation uses (x @ W, W: (in, out); experts stacked on a leading N
axis), so weights move between ref/, hypermoe/ and export/ by name, without transposes. The semantics that use
them are ref/semantics.py's. Axis legend as ref/semantics.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ref.config import HyperMoEConfig


# ---------------------------------------------------------------------------------------------
# Names, shapes, checks
# ---------------------------------------------------------------------------------------------


def layer_param_shapes(cfg: HyperMoEConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer parameters, x @ W layout (W: (in, out)), experts stacked on a leading N axis."""
    d, f, N = cfg.d_model, cfg.d_ff, cfg.n_experts
    shapes: dict[str, tuple[int, ...]] = {"router.weight": (d, N)}
    if cfg.router_bias:
        shapes["router.bias"] = (N,)
    if cfg.noisy_gating:
        shapes["router.noise_weight"] = (d, N)
    shapes["experts.w1"] = (N, d, f)
    if cfg.expert_bias:
        shapes["experts.b1"] = (N, f)
    shapes["experts.w2"] = (N, f, d)
    if cfg.expert_bias:
        shapes["experts.b2"] = (N, d)
    if cfg.hyper_expert:
        e, p, h = cfg.d_expert_embed, cfg.d_process, cfg.d_hyper
        shapes.update({"expert_embed": (N, e), "process.w1": (e, p), "process.b1": (p,),
                       "process.w2": (p, h), "process.b2": (h,)})
    return shapes


def hyper_param_shapes(cfg: HyperMoEConfig) -> dict[str, tuple[int, ...]]:
    """The hypernetwork shared by the L layers of a stack (empty when hyper_expert is False)."""
    if not cfg.hyper_expert:
        return {}
    d, a, h, l, g = cfg.d_model, cfg.d_adapter, cfg.d_hyper, cfg.d_layer_embed, cfg.d_generator
    return {
        "hyper.layer_embed": (cfg.n_layers, l),
        "hyper.trunk.weight": (h + l, g), "hyper.trunk.bias": (g,),
        "hyper.w_down.weight": (g, d * a), "hyper.w_down.bias": (d * a,),  # row-major (d, a)
        "hyper.w_up.weight": (g, a * d), "hyper.w_up.bias": (a * d,),  # row-major (a, d)
        "hyper.b_down.weight": (g, a), "hyper.b_down.bias": (a,),
        "hyper.b_up.weight": (g, d), "hyper.b_up.bias": (d,),
    }


def param_shapes(cfg: HyperMoEConfig) -> dict[str, tuple[int, ...]]:
    """Everything one standalone layer needs: its own parameters plus the hypernetwork's."""
    return {**layer_param_shapes(cfg), **hyper_param_shapes(cfg)}


def stack_layers(cfg: HyperMoEConfig) -> list[int]:
    """The layer indices ℓ of a stack that hold a HyperMoE layer: those with cfg.is_moe_block(ℓ)
    (every ℓ < n_layers when moe_every = 1; the odd ones when moe_every = 2, as the official Switch code)."""
    return [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]


def stack_param_shapes(cfg: HyperMoEConfig) -> dict[str, tuple[int, ...]]:
    """A stack: `layers.{ℓ}.<name>` for each ℓ in stack_layers(cfg), one shared `hyper.*`."""
    shapes = {f"layers.{i}.{name}": s for i in stack_layers(cfg) for name, s in layer_param_shapes(cfg).items()}
    return {**shapes, **hyper_param_shapes(cfg)}


def check_params(params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype) -> None:
    """ValueError naming the first missing, unexpected, misshapen or wrongly typed parameter."""
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise ValueError(f"missing parameter(s): {', '.join(missing)}")
    unexpected = sorted(set(params) - set(shapes))
    if unexpected:
        raise ValueError(f"unexpected parameter(s) for this config: {', '.join(unexpected)}")
    for name, shape in shapes.items():
        value = params[name]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"parameter {name!r} must be a numpy array, got {type(value).__name__}")
        if value.shape != tuple(shape):
            raise ValueError(f"parameter {name!r} has shape {value.shape}, expected {tuple(shape)}")
        if value.dtype != dtype:
            raise ValueError(f"parameter {name!r} has dtype {value.dtype}, the input has {dtype}")


def check_finite_params(params: Mapping[str, np.ndarray], what: str = "parameter") -> None:
    """ValueError naming the first tensor (in name order) that holds NaN or ±Inf, with the count of bad values.
    Checked where weights enter (ref.io.load_dir, hypermoe convert, export), not on every layer call."""
    for name in sorted(params):
        value = np.asarray(params[name])
        if np.issubdtype(value.dtype, np.floating):
            bad = value.size - int(np.count_nonzero(np.isfinite(value)))
            if bad:
                raise ValueError(f"{what} {name!r} holds {bad} NaN/Inf value(s) of {value.size}; "
                                 "weights must be finite")


def layer_params(params: Mapping[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """The standalone-layer view of layer `layer` of a stack's parameters."""
    prefix = f"layers.{layer}."
    view = {name[len(prefix):]: v for name, v in params.items() if name.startswith(prefix)}
    view.update({name: v for name, v in params.items() if name.startswith("hyper.")})
    return view


# ---------------------------------------------------------------------------------------------
# Deterministic init
# ---------------------------------------------------------------------------------------------


def init_params(cfg: HyperMoEConfig, shapes: Mapping[str, tuple[int, ...]], seed: int, dtype=np.float64) -> dict[str, np.ndarray]:
    """Draw every parameter of `shapes` from N(0, σ²), σ from `init_std`, in sorted-name order from one
    `np.random.default_rng(seed)` stream (float64, then cast to `dtype`)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shapes[name]) * init_std(cfg, name, shapes[name])).astype(dtype)
            for name in sorted(shapes)}


def init_std(cfg: HyperMoEConfig, name: str, shape: tuple[int, ...]) -> float:
    """Scales that keep every stage O(1) for x ~ N(0, 1), so that the HyperExpert is about as large as
    the routed output (the official init makes it ~1e-3 of it, which would hide a wrong HyperExpert in
    tests) and its set-dependent part dominates its constant part."""
    leaf = name.split(".", 2)[2] if name.startswith("layers.") else name  # drop "layers.{i}."
    g, d, a = cfg.d_generator, cfg.d_model, cfg.d_adapter
    special = {
        "expert_embed": 1.0, "hyper.layer_embed": 1.0,
        # generated entries ≈ r · column, r of g entries O(1): W_down ~ 1/sqrt(d), W_up ~ 1/sqrt(a), halved
        # because r is larger than 1 (z sums N - k embeddings)
        "hyper.w_down.weight": 0.5 / math.sqrt(g * d), "hyper.w_down.bias": 0.1 / math.sqrt(d),
        "hyper.w_up.weight": 0.5 / math.sqrt(g * a), "hyper.w_up.bias": 0.1 / math.sqrt(a),
        "hyper.b_down.weight": 0.3 / math.sqrt(g), "hyper.b_up.weight": 0.3 / math.sqrt(g),
    }
    if leaf in special:
        return special[leaf]
    if leaf.endswith(("bias", "b1", "b2")):
        return 0.1
    fan_in = shape[-2]
    relu_follows = leaf in ("process.w1", "hyper.trunk.weight", "experts.w1")
    return math.sqrt(2.0 / fan_in) if relu_follows else 1.0 / math.sqrt(fan_in)


def init(cfg: HyperMoEConfig, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Parameters of one standalone layer (its own + the hypernetwork's), deterministic in (cfg, seed)."""
    return init_params(cfg, param_shapes(cfg), seed, dtype)


def init_stack(cfg: HyperMoEConfig, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Parameters of a stack of cfg.n_layers layers sharing one hypernetwork."""
    return init_params(cfg, stack_param_shapes(cfg), seed, dtype)
