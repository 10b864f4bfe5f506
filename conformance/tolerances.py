"""Routing margins, the skip rule and the per-dtype tolerances of a golden case, computed once by the
generator from the case's own magnitudes and written into the manifest (the runner only reads them). The bounds
ε_D and S themselves (router_scales, logit_error_bound, magnitude) are ref/tolerances.py's, shared with export/verify.py.

    u_D    unit roundoff of the dtype under test D (float64 2^-53, float32 2^-24, float16 2^-11,
           bfloat16 2^-8); u_acc that of the router's accumulation (float32; float64 for D = float64)
    ε_D    bound on the router-logit error of a conforming implementation (inputs and parameters rounded
           to D, logits accumulated in float32 at least, SPEC.md §3.1):
           ε_D = (4 u_D + (d + 2) u_acc) · R + max|b - round_D(b)| + u_acc · max|b|,
           R = max over tokens and experts of Σ_i |x̃_i W_ij| (+ |ε| (Σ_i |x_i Wn_ij| + 1.01), noisy gating):
           4 u_D covers rounding x, the jitter, their product and W to D, (d + 2) u_acc the float32
           dot product (the standard γ_n bound). Cases with exact dyadic router inputs (the tie cases)
           have ε_D = 0: every product and partial sum is exact in float32.
    skip   a case runs in D only if its order margin (the smallest non-zero gap between consecutive logits
           among each token's top k+1) exceeds 2 ε_D: then no selection and no order can flip
           (ref.routing_margins); otherwise it is skipped in D, "routing margin below dtype resolution".
    values |actual - expected| ≤ atol + rtol |expected| elementwise:
           logits atol 2 ε_D; probs and gates atol 4 ε_D + 8 u_D (the softmax moves p_j by ≤ 2 ε_D p_j,
           renormalisation doubles it; 8 u_D: the softmax's own rounding and a final cast to D);
           output (routed, hyper) atol K u_D S + 4 ε_D S (the gate error times the expert outputs), rtol
           K u_D, S ≥ 1 the case's largest intermediate magnitude (input, any expert's FFN output, routed,
           HyperExpert, output), K = 64 (measured: the torch layer in float64/float32/bfloat16 and ref in
           float32 stay below 5 u_D S on every case without large logits, whose error is the 4 ε_D S term);
           aux losses: first-order bounds from the gate error (`_aux_tolerances`).
           A stack's layers are each checked on the reference's input to that layer (teacher forcing: one
           layer's rounding cannot move the next layer's routing); its final output x + Σ outputs gets
           the sum of the layers' output atol.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import ref
from conformance.suite import AUX_NAMES
from ref import HyperMoEConfig
from ref.tolerances import (  # noqa: F401 (router_scales, logit_error_bound, magnitude: conformance.tolerances names)
    UNIT_ROUNDOFF, logit_error_bound, magnitude, representable, round_to, router_scales,
)

K_VALUES = 64  # the output tolerance factor K


def order_gaps(logits: np.ndarray, k: int) -> np.ndarray:
    """(T, N) logits → (T, m - 1) gaps between consecutive logits among each token's top m = min(k+1, N)."""
    ordered = -np.sort(-logits, axis=-1)  # (T, N) descending
    m = min(k + 1, logits.shape[-1])
    return ordered[:, : m - 1] - ordered[:, 1:m]


def margins(cfg: HyperMoEConfig, per_layer) -> dict[str, Any]:
    """routing_margin (ref.routing_margins, min over tokens and layers), order_margin (smallest non-zero
    gap among each token's top k+1), tokens_with_exact_ties. None where there is no gap (k = N, T = 0)."""
    routing, order, ties = math.inf, math.inf, 0
    for _, result in per_layer:
        logits = result.logits.reshape(-1, cfg.n_experts)  # (T, N)
        if logits.shape[0] == 0:
            continue
        routing = min(routing, float(ref.routing_margins(logits, cfg.top_k).min()))
        gaps = order_gaps(logits, cfg.top_k)
        ties += int((gaps == 0).any(axis=-1).sum())
        nonzero = gaps[gaps > 0]
        if nonzero.size:
            order = min(order, float(nonzero.min()))
    fin = lambda v: v if math.isfinite(v) else None  # noqa: E731  (JSON has no infinity: null = no boundary)
    return {"routing_margin": fin(routing), "order_margin": fin(order), "tokens_with_exact_ties": ties}


def _up2(v: float) -> float:
    """v rounded up to two significant digits (tolerances stay readable and stable across platforms)."""
    if v <= 0 or not math.isfinite(v):
        return float(v)
    e = math.floor(math.log10(v)) - 1
    return float(f"{math.ceil(v / 10.0**e - 1e-9)}e{e}")


def _aux_tolerances(cfg: HyperMoEConfig, result, dp: float, u_r: float, K: float) -> dict[str, list[float]]:
    """First-order bounds on the aux losses given a probability/gate error ≤ dp (selection exact)."""
    logits = result.logits.reshape(-1, cfg.n_experts)  # (T, N)
    T, N = logits.shape
    if T == 0:
        return {f"aux.{n}": [K * u_r, 0.0] for n in AUX_NAMES}
    lse = np.abs(ref.logsumexp(logits)).max()
    sb = N * cfg.top_k * dp  # switch_balance = N Σ f_i P_i, Σ f_i = k: |Δ| ≤ N k max|ΔP|
    zl = 2 * lse * (dp + u_r * lse)  # z_loss = mean lse²: |Δ| ≤ 2 max|lse| (|Δlse| ≤ dp + u_r max|lse|)
    cv = 0.0  # cv_balance: importance_i = Σ_t g_ti moves by ≤ T dp; |Δcv²| ≤ Σ_i |∂cv²/∂imp_i| T dp
    if N > 1:
        importance = np.zeros(N)  # (N,)
        np.add.at(importance, result.selected.reshape(T, cfg.top_k), result.gates.reshape(T, cfg.top_k))
        mean, var = importance.mean(), importance.var(ddof=1)
        denom = mean**2 + ref.semantics.CV_EPS
        grad = 2 * (importance - mean) / ((N - 1) * denom) - 2 * var * mean / (N * denom**2)  # (N,)
        cv = float(np.abs(grad).sum() * T * dp)
    return {"aux.switch_balance": [sb + K * u_r, K * u_r], "aux.z_loss": [zl + K * u_r, K * u_r],
            "aux.cv_balance": [cv + K * u_r, K * u_r]}


def dtype_entry(cfg: HyperMoEConfig, layers, inputs: dict[str, np.ndarray], margin: dict[str, Any], dtype: str,
                *, exact_router: bool = False, stack: bool = False) -> dict[str, Any]:
    """The manifest's entry for one dtype: {"skip": reason} or the tolerances of every checked quantity.

    `layers`: [(layer input h, ref LayerResult, that layer's parameters)], one per layer (one for a layer
    case); `exact_router`: the router inputs are dyadic by construction (checked here to be representable)."""
    u = UNIT_ROUNDOFF[dtype]
    u_acc = UNIT_ROUNDOFF["float64" if dtype == "float64" else "float32"]
    K = K_VALUES
    carried, per_layer, bounds = 0.0, [], []  # carried: the final output's atol, Σ over a stack's layers
    for h, result, lp in layers:
        W = lp["router.weight"]
        b = lp.get("router.bias", np.zeros(cfg.n_experts))
        if exact_router and all(representable(dtype, a) for a in (W, b, h)):
            eps = 0.0  # dyadic router inputs: every product and partial sum is exact in float32
        else:
            eps = float(logit_error_bound(cfg, lp, float(router_scales(cfg, lp, h, inputs).max(initial=0.0)), dtype))
        bounds.append(eps)
        S = max(1.0, magnitude(cfg, lp, h, result))
        out_atol = K * u * S + 4 * eps * S  # Σ_i |Δg_i| |FFN_i| ≤ 4 ε Σ_i g_i S, Σ g ≤ 1
        dp = 4 * eps + 8 * u  # gates and probabilities
        tol = {"output": [out_atol, K * u], "logits": [2 * eps, 0.0], "probs": [dp, 0.0], "gates": [dp, 0.0],
               **_aux_tolerances(cfg, result, dp, max(u, u_acc), K)}
        per_layer.append({name: [_up2(v) for v in pair] for name, pair in tol.items()})
        carried += out_atol
    order, worst = margin["order_margin"], max(bounds)
    if order is not None and order <= 2 * worst:
        return {"skip": f"routing margin below dtype resolution: order margin {order:.3g} ≤ 2 × logit error "
                        f"bound {worst:.3g} in {dtype}", "logit_error_bound": _up2(worst)}
    final = [_up2(carried), _up2(K * u)] if stack else per_layer[-1]["output"]
    return {"skip": None, "logit_error_bound": _up2(worst), "output": final, "layers": per_layer}
