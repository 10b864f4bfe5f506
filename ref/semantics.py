"""The reference HyperMoE layer in pure NumPy: the definition every other implementation is checked
against. One function per semantic step of SPEC.md §3, in the order a token goes through them, then the
layer and the stack of layers sharing one hypernetwork. The parameter table and the deterministic init are
ref/params.py's.

Axis legend (the same letters in SPEC.md, hypermoe/ and export/):
    T tokens (all leading dims flattened)   d model width         N experts       k selected experts
    f expert hidden width                   a adapter width       e = d_e expert-embedding width
    p = d_p process hidden width            h = d_h width of z    l = d_l layer-embedding width
    g = d_g generator width                 L layers sharing the hypernetwork

Dtype rule: the compute dtype is the input's, float32 or float64; parameters must have the same dtype.
Router logits, probabilities and gates are computed in float32 at least (here: the compute dtype, which
is never narrower than float32). Every random draw of the training-only paths is an explicit input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ref.config import HyperMoEConfig
from ref.params import (  # the parameter table and init: re-exported, they were defined here before the split
    check_finite_params, check_params, hyper_param_shapes, init, init_params, init_stack, init_std, layer_param_shapes,
    layer_params, param_shapes, stack_layers, stack_param_shapes,
)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
CV_EPS = 1e-10  # the official cv² denominator guard


# ---------------------------------------------------------------------------------------------
# The input
# ---------------------------------------------------------------------------------------------


def check_input(cfg: HyperMoEConfig, x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"input must be a numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"input dtype must be float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"input must have shape (..., S, d) with at least 2 dims, got shape {x.shape}")
    if x.shape[-1] != cfg.d_model:
        raise ValueError(f"input's last dim is {x.shape[-1]}, config d_model is {cfg.d_model}")
    if not np.all(np.isfinite(x)):
        raise ValueError("input contains NaN or Inf (SPEC.md §3.9: the reference accepts finite inputs only)")


# ---------------------------------------------------------------------------------------------
# The semantic steps (SPEC.md §3.1 – §3.8)
# ---------------------------------------------------------------------------------------------


def activation(name: str, u: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(u, 0)
    if name == "gelu":  # exact: u · Φ(u), Φ the standard normal CDF
        erf = np.vectorize(math.erf, otypes=[u.dtype]) if u.size else (lambda v: v)
        return 0.5 * u * (1 + erf(u / math.sqrt(2)))
    if name == "gelu_tanh":  # GPT-2's "gelu_new"
        return 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    if name == "silu":
        with np.errstate(over="ignore"):  # exp(-u) = inf for u ≪ 0 gives u / inf = -0, the right limit
            return u / (1 + np.exp(-u))
    raise ValueError(f"unknown activation {name!r}")


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable: subtract the row maximum before exp."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


def router_logits(
    cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], x: np.ndarray,
    jitter: np.ndarray | None = None, gate_noise: np.ndarray | None = None,
) -> np.ndarray:
    """§3.1  logits = (x ⊙ u) W_r + b_r [+ ε ⊙ (softplus(x W_noise) + 0.01)]  → (T, N).

    `jitter` u (T, d): the Switch router-jitter factors, applied to the router's input only.
    `gate_noise` ε (T, N): standard-normal draws of noisy gating (needs cfg.noisy_gating).
    """
    router_in = x if jitter is None else x * jitter  # (T, d); the experts and HyperExpert see plain x
    logits = router_in @ params["router.weight"]  # (T, N)
    if cfg.router_bias:
        logits = logits + params["router.bias"]
    if gate_noise is not None:
        raw = x @ params["router.noise_weight"]  # (T, N)
        softplus = np.logaddexp(0, raw)
        logits = logits + gate_noise * (softplus + 0.01)
    return logits


def select(logits: np.ndarray, k: int) -> np.ndarray:
    """§3.2  The k largest logits per token, largest first → (T, k) expert indices.

    Ties: the lower expert index wins (the ONNX TopK rule), by a stable sort of -logits.
    """
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


def gates(cfg: HyperMoEConfig, probs: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """§3.3  Gate of each selected expert → (T, k), same order as `selected`.

    "topk": renormalised over the k selected, g_i = p_i / Σ_{j∈S} p_j (k = 1 gives exactly 1);
    "switch": the unrenormalised probability p_{i*}.
    """
    chosen = np.take_along_axis(probs, selected, axis=-1)  # (T, k)
    if cfg.gate == "topk":
        return chosen / chosen.sum(axis=-1, keepdims=True)
    return chosen


def capacity_keep(cfg: HyperMoEConfig, selected: np.ndarray, seq_len: int) -> np.ndarray:
    """§3.4  Whether each token keeps its expert under capacity C → (T,) bool.

    Groups are sequences: the T tokens are rows of `seq_len` consecutive tokens. Within a sequence,
    tokens are counted per expert in sequence order (position 1, 2, ...); a token whose position
    exceeds C is dropped. No capacity: every token is kept.
    """
    T = selected.shape[0]
    if cfg.capacity is None or T == 0:
        return np.ones(T, dtype=bool)
    expert = selected[:, 0]  # (T,) top-1 ("switch" only)
    keep = np.empty(T, dtype=bool)
    for start in range(0, T, seq_len):
        counts = np.zeros(cfg.n_experts, dtype=np.int64)
        for t in range(start, start + seq_len):
            counts[expert[t]] += 1
            keep[t] = counts[expert[t]] <= cfg.capacity
    return keep


def expert_ffn(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], i: int, x: np.ndarray) -> np.ndarray:
    """FFN_i(x) = act(x W1_i + b1_i) W2_i + b2_i → (T, d)."""
    u = x @ params["experts.w1"][i]  # (T, f)
    if cfg.expert_bias:
        u = u + params["experts.b1"][i]
    y = activation(cfg.activation, u) @ params["experts.w2"][i]  # (T, d)
    if cfg.expert_bias:
        y = y + params["experts.b2"][i]
    return y


def routed_output(
    cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], x: np.ndarray,
    selected: np.ndarray, gate: np.ndarray, keep: np.ndarray,
) -> np.ndarray:
    """§3.5  y = Σ_{i∈S} g_i FFN_i(x) → (T, d). A token dropped by capacity passes through: y = g · x."""
    y = np.zeros_like(x)  # (T, d)
    for i in range(cfg.n_experts):
        for slot in range(selected.shape[1]):
            rows = np.nonzero((selected[:, slot] == i) & keep)[0]
            if rows.size:
                y[rows] += gate[rows, slot, None] * expert_ffn(cfg, params, i, x[rows])
    dropped = ~keep
    y[dropped] += gate[dropped, 0, None] * x[dropped]  # capacity drop rule (HF SwitchTransformers)
    return y


def selection_embedding(params: Mapping[str, np.ndarray], selected: np.ndarray) -> np.ndarray:
    """§3.6  s = Σ_{j∉S} E_j, the plain (unweighted) sum over the unselected experts → (T, e).

    With k = N nothing is unselected and s = 0. Computed before any capacity drop.
    """
    E = params["expert_embed"]  # (N, e)
    unselected = np.ones((selected.shape[0], E.shape[0]), dtype=bool)  # (T, N)
    np.put_along_axis(unselected, selected, False, axis=-1)
    return unselected.astype(E.dtype) @ E  # (T, e)


def process(params: Mapping[str, np.ndarray], s: np.ndarray) -> np.ndarray:
    """§3.6  z = relu(s Wp1 + cp1) Wp2 + cp2 → (T, h)."""
    hidden = np.maximum(s @ params["process.w1"] + params["process.b1"], 0)  # (T, p)
    return hidden @ params["process.w2"] + params["process.b2"]  # (T, h)


def generate(
    cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], z: np.ndarray, layer: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """§3.7  The shared hypernetwork: r = relu([z ; L_ℓ] Wg + cg), then four linear heads.

    Returns W_down (T, d, a), b_down (T, a), W_up (T, a, d), b_up (T, d). The flat head outputs are
    reshaped row-major: W_down[i, j] = out[i·a + j], W_up[j, i] = out[j·d + i].
    """
    T, d, a = z.shape[0], cfg.d_model, cfg.d_adapter
    layer_embed = np.broadcast_to(params["hyper.layer_embed"][layer], (T, cfg.d_layer_embed))  # (T, l)
    trunk_in = np.concatenate([z, layer_embed], axis=-1)  # (T, h + l): z first
    r = np.maximum(trunk_in @ params["hyper.trunk.weight"] + params["hyper.trunk.bias"], 0)  # (T, g)
    w_down = (r @ params["hyper.w_down.weight"] + params["hyper.w_down.bias"]).reshape(T, d, a)
    w_up = (r @ params["hyper.w_up.weight"] + params["hyper.w_up.bias"]).reshape(T, a, d)
    b_down = r @ params["hyper.b_down.weight"] + params["hyper.b_down.bias"]  # (T, a)
    b_up = r @ params["hyper.b_up.weight"] + params["hyper.b_up.bias"]  # (T, d)
    return w_down, b_down, w_up, b_up


def hyper_expert(x: np.ndarray, w_down: np.ndarray, b_down: np.ndarray, w_up: np.ndarray, b_up: np.ndarray) -> np.ndarray:
    """§3.7  ê = relu(x W_down + b_down) W_up + b_up, per token → (T, d). No residual, no scale."""
    hidden = np.maximum(np.einsum("td,tda->ta", x, w_down) + b_down, 0)  # (T, a)
    return np.einsum("ta,tad->td", hidden, w_up) + b_up  # (T, d)


def cv_squared(v: np.ndarray) -> float:
    """cv²(v) = var(v) / (mean(v)² + 1e-10), unbiased variance (N - 1), 0 for a single expert."""
    if v.shape[0] == 1:
        return 0.0
    return float(v.var(ddof=1) / (v.mean() ** 2 + CV_EPS))


def aux_losses(
    cfg: HyperMoEConfig, logits: np.ndarray, probs: np.ndarray, selected: np.ndarray, gate: np.ndarray,
) -> dict[str, float]:
    """§3.8  Auxiliary losses over all T tokens, returned (never added to the output). 0 when T = 0.

    switch_balance = N Σ_i f_i P_i, f_i = fraction of tokens with i ∈ S, P_i = mean probability;
    z_loss = mean_t logsumexp(logits_t)²;  cv_balance = cv²(importance) + cv²(load) (unscaled;
    the official GPT-2 code multiplies it by 1e-2). Selection before any capacity drop.
    """
    T, N = probs.shape
    if T == 0:
        return {"switch_balance": 0.0, "z_loss": 0.0, "cv_balance": 0.0}
    chosen = np.zeros((T, N), dtype=probs.dtype)  # (T, N): 1 where selected
    np.put_along_axis(chosen, selected, 1.0, axis=-1)
    dense_gates = np.zeros((T, N), dtype=probs.dtype)  # (T, N)
    np.put_along_axis(dense_gates, selected, gate, axis=-1)
    f, P = chosen.mean(axis=0), probs.mean(axis=0)  # (N,), (N,)
    importance, load = dense_gates.sum(axis=0), chosen.sum(axis=0)  # (N,), (N,)
    return {
        "switch_balance": float(N * np.sum(f * P)),
        "z_loss": float(np.mean(logsumexp(logits) ** 2)),
        "cv_balance": cv_squared(importance) + cv_squared(load),
    }


# ---------------------------------------------------------------------------------------------
# The layer and the stack
# ---------------------------------------------------------------------------------------------


class LayerResult(NamedTuple):
    output: np.ndarray  # (..., d) routed + HyperExpert
    selected: np.ndarray  # (..., k) int64 expert indices, largest logit first
    gates: np.ndarray  # (..., k) gate of each selected expert
    probs: np.ndarray  # (..., N) router probabilities
    logits: np.ndarray  # (..., N) router logits (after jitter / noise)
    kept: np.ndarray  # (...,) bool, False where capacity dropped the token
    routed: np.ndarray  # (..., d) y, the routed part of the output
    hyper: np.ndarray  # (..., d) ê, the HyperExpert part (zeros when disabled)
    aux: dict[str, float]  # switch_balance, z_loss, cv_balance


def layer(
    cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], x: np.ndarray, layer_index: int = 0,
    *, jitter: np.ndarray | None = None, gate_noise: np.ndarray | None = None,
) -> LayerResult:
    """One HyperMoE layer: x (..., S, d) → LayerResult. `layer_index` picks the layer embedding ℓ.

    `jitter` (..., S, d) and `gate_noise` (..., S, N) are the training-only random draws (SPEC.md §3.1);
    leave them None for inference.
    """
    check_input(cfg, x)
    check_params(params, param_shapes(cfg), x.dtype)
    if isinstance(layer_index, bool) or not (isinstance(layer_index, (int, np.integer)) and 0 <= layer_index < cfg.n_layers):
        raise ValueError(f"layer_index must be an int in [0, n_layers={cfg.n_layers}), got {layer_index!r}")
    lead, d, N = x.shape[:-1], cfg.d_model, cfg.n_experts
    xt = x.reshape(-1, d)  # (T, d)
    T = xt.shape[0]
    for name, draw in (("jitter", jitter), ("gate_noise", gate_noise)):
        if draw is not None and not (isinstance(draw, np.ndarray) and np.all(np.isfinite(draw))):
            raise ValueError(f"{name} must be a finite numpy array (SPEC.md §3.9)")
    if jitter is not None:
        if jitter.shape != x.shape or jitter.dtype != x.dtype:
            raise ValueError(f"jitter must have the input's shape {x.shape} and dtype {x.dtype}, got {jitter.shape} {jitter.dtype}")
        jitter = jitter.reshape(T, d)
    if gate_noise is not None:
        if not cfg.noisy_gating:
            raise ValueError("gate_noise given but config field 'noisy_gating' is False")
        if gate_noise.shape != (*lead, N) or gate_noise.dtype != x.dtype:
            raise ValueError(f"gate_noise must have shape {(*lead, N)} and dtype {x.dtype}, got {gate_noise.shape} {gate_noise.dtype}")
        gate_noise = gate_noise.reshape(T, N)

    logits = router_logits(cfg, params, xt, jitter, gate_noise)  # (T, N)
    probs = softmax(logits)  # (T, N)
    selected = select(logits, cfg.top_k)  # (T, k)
    gate = gates(cfg, probs, selected)  # (T, k)
    keep = capacity_keep(cfg, selected, seq_len=x.shape[-2])  # (T,)
    routed = routed_output(cfg, params, xt, selected, gate, keep)  # (T, d)
    if cfg.hyper_expert:
        s = selection_embedding(params, selected)  # (T, e)
        z = process(params, s)  # (T, h)
        w_down, b_down, w_up, b_up = generate(cfg, params, z, int(layer_index))
        hyper = hyper_expert(xt, w_down, b_down, w_up, b_up)  # (T, d)
    else:
        hyper = np.zeros_like(xt)
    return LayerResult(
        output=(routed + hyper).reshape(x.shape),  # §3.8: weight 1, the block adds its own residual
        selected=selected.astype(np.int64).reshape(*lead, cfg.top_k),
        gates=gate.reshape(*lead, cfg.top_k),
        probs=probs.reshape(*lead, N),
        logits=logits.reshape(*lead, N),
        kept=keep.reshape(lead),
        routed=routed.reshape(x.shape),
        hyper=hyper.reshape(x.shape),
        aux=aux_losses(cfg, logits, probs, selected, gate),
    )


def stack(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[LayerResult]]:
    """The HyperMoE layers ℓ ∈ stack_layers(cfg) sharing one hypernetwork, layer ℓ with layer embedding
    ℓ, residual between: h ← h + layer_ℓ(h). Returns the final h (..., S, d) and each layer's result."""
    check_input(cfg, x)
    check_params(params, stack_param_shapes(cfg), x.dtype)
    h, results = x, []
    for i in stack_layers(cfg):
        result = layer(cfg, layer_params(params, i), h, i)
        results.append(result)
        h = h + result.output
    return h, results


# ---------------------------------------------------------------------------------------------
# Routing margin (for tests and conformance cases, not part of the semantics)
# ---------------------------------------------------------------------------------------------


def routing_margins(logits: np.ndarray, k: int) -> np.ndarray:
    """Per token, the gap between the k-th and (k+1)-th largest logit → (...,); +inf when k = N.

    A perturbation of every logit by less than margin/2 cannot change the selected set."""
    if k >= logits.shape[-1]:
        return np.full(logits.shape[:-1], np.inf)
    ordered = -np.sort(-logits, axis=-1)  # (..., N) descending
    return ordered[..., k - 1] - ordered[..., k]
