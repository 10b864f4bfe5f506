"""The router in PyTorch (SPEC.md §3.1–3.4, §3.8): each token's logits, top-k selection, gates and capacity, and
the auxiliary losses of those decisions as sums that add over batches and ranks.

    logits = (x ⊙ u) W_r + b_r [+ ε ⊙ (softplus(x W_noise) + 0.01)]       router, float32 at least
    S = top-k(logits), ties → lower index;  g = gates(softmax(logits), S)   "topk" renormalised | "switch" p_{i*}

Free functions of the layer's config and its `Router`; hypermoe/layer.py and hypermoe/parallel.py call them.
Axis legend as hypermoe/layer.py: T tokens, d model width, N experts, k selected experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ref.config import HyperMoEConfig
from hypermoe.hypernetwork import param

CV_EPS = 1e-10  # the official cv² denominator guard (as ref.semantics.CV_EPS)


class Router(nn.Module):
    """weight (d, N), bias (N) [router_bias], noise_weight (d, N) [noisy_gating]."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        d, N, kw = config.d_model, config.n_experts, dict(device=device, dtype=dtype)
        self.weight = param((d, N), **kw)
        self.bias = param((N,), **kw) if config.router_bias else None
        self.noise_weight = param((d, N), **kw) if config.noisy_gating else None


class Routing(NamedTuple):
    selected: torch.Tensor  # (..., k) int64, largest logit first, ties → lower index
    gates: torch.Tensor  # (..., k) router dtype (float32 for 16-bit inputs)
    probs: torch.Tensor  # (..., N) router dtype
    logits: torch.Tensor  # (..., N) router dtype, after jitter / noise
    kept: torch.Tensor  # (...,) bool, False where capacity dropped the token


def route(config: HyperMoEConfig, router: Router, x: torch.Tensor, jitter: torch.Tensor | None,
          gate_noise: torch.Tensor | None, *, training: bool) -> Routing:
    """§3.1–3.4 for x (..., S, d): Routing with the token axes flattened (T, ·). In training mode, draws the
    jitter / gate noise not given (torch's RNG)."""
    c = config
    x2 = x.reshape(-1, c.d_model)  # (T, d)
    rdtype = torch.promote_types(x.dtype, torch.float32)  # router dtype: float32 at least
    if training and jitter is None and c.router_jitter > 0:
        jitter = torch.empty_like(x).uniform_(1.0 - c.router_jitter, 1.0 + c.router_jitter)
    if training and gate_noise is None and c.noisy_gating:
        gate_noise = torch.randn((*x.shape[:-1], c.n_experts), dtype=rdtype, device=x.device)
    logits = router_logits(c, router, x2, jitter, gate_noise, rdtype)  # §3.1 (T, N)
    probs = torch.softmax(logits, dim=-1)  # (T, N)
    selected = select_sorted(logits, c.top_k)  # §3.2 (T, k): ties → lower index
    chosen = probs.gather(-1, selected)  # (T, k)
    gate = chosen / chosen.sum(-1, keepdim=True) if c.gate == "topk" else chosen  # §3.3 (T, k)
    kept = capacity_keep(c, selected, x.shape[-2])  # §3.4 (T,)
    return Routing(selected, gate, probs, logits, kept)


def router_logits(config: HyperMoEConfig, router: Router, x2: torch.Tensor, jitter: torch.Tensor | None,
                  gate_noise: torch.Tensor | None, rdtype: torch.dtype) -> torch.Tensor:
    """§3.1 logits = (x ⊙ u) W_r + b_r [+ ε ⊙ (softplus(x W_noise) + 0.01)] in rdtype → (T, N)."""
    d, N = config.d_model, config.n_experts
    router_in = x2 if jitter is None else x2 * jitter.reshape(-1, d).to(x2.dtype)  # experts see plain x
    logits = router_in.to(rdtype) @ router.weight.to(rdtype)  # (T, N)
    if router.bias is not None:
        logits = logits + router.bias.to(rdtype)
    if gate_noise is not None:
        raw = x2.to(rdtype) @ router.noise_weight.to(rdtype)  # (T, N)
        softplus = torch.logaddexp(raw, torch.zeros_like(raw))  # = log(1 + e^raw), as np.logaddexp(0, raw)
        logits = logits + gate_noise.reshape(-1, N).to(rdtype) * (softplus + 0.01)
    return logits


def capacity_keep(config: HyperMoEConfig, selected: torch.Tensor, seq_len: int) -> torch.Tensor:
    """§3.4 per sequence (rows of S consecutive tokens), count tokens per expert in sequence order; a token
    whose position exceeds C is dropped → (T,) bool."""
    T, C = selected.shape[0], config.capacity
    if C is None or is_zero(T):
        return torch.ones(T, dtype=torch.bool, device=selected.device)
    expert = selected[:, 0].reshape(-1, seq_len)  # (B, S) top-1 ("switch" only)
    onehot = (expert.unsqueeze(-1) == torch.arange(config.n_experts, device=expert.device)).long()
    position = onehot.cumsum(1).gather(-1, expert.unsqueeze(-1)).squeeze(-1)  # (B, S): 1, 2, ... per expert
    return (position <= C).reshape(T)


def select_sorted(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest logits per token, largest first → (T, k); ties → lower index (stable sort; argmax
    returns the first maximum). Never torch.topk: it breaks ties differently (testing-notes.md)."""
    if k == 1:
        return logits.argmax(-1, keepdim=True)
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]


def is_zero(n) -> bool:
    """n == 0 for a concrete size; False for a symbolic one (torch.compile with dynamic sizes: they are ≥ 2)."""
    return isinstance(n, int) and n == 0


# ---------------------------------------------------------------------------------------------
# §3.8 auxiliary losses
# ---------------------------------------------------------------------------------------------


def aux_sums(logits, probs, selected, gate) -> torch.Tensor:
    """The sums over tokens that §3.8's losses are made of, packed in one vector (3N + 2,), router dtype:
    [T, Σ_t logsumexp(logits_t)², importance_i = Σ_t G_ti (N), load_i = Σ_t sel_ti (N), Σ_t p_ti (N)].
    Sums over disjoint batches add, so aux_from_sums(Σ over batches) is the losses of their union (the
    expert-parallel layer all-reduces this vector). Differentiable through logits, probs and gates."""
    T, N = probs.shape
    onehot = (selected.unsqueeze(-1) == torch.arange(N, device=probs.device)).to(probs.dtype)  # (T, k, N)
    importance = (onehot * gate.unsqueeze(-1)).sum((0, 1))  # (N,) Σ_tokens gates
    load = onehot.sum((0, 1))  # (N,) tokens per expert: exact integers (float32: up to 2^24 tokens)
    lse2 = torch.logsumexp(logits, dim=-1).pow(2).sum()  # () Σ_t (logsumexp_i logits_ti)²; 0 for T = 0
    return torch.cat([probs.new_full((1,), float(T)), lse2.reshape(1), importance, load, probs.sum(0)])


def aux_from_sums(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """§3.8 from aux_sums' vector: switch_balance = N Σ_i f_i P_i (f_i = load_i / T, P_i = Σ_t p_ti / T),
    z_loss = Σ_t lse² / T, cv_balance = cv²(importance) + cv²(load). T = 0: every sum is 0, and dividing by
    max(T, 1) gives the spec's 0 for all three without a branch on T (no host sync)."""
    N = (sums.shape[0] - 2) // 3
    T, lse2, importance, load, prob_sum = sums[0].clamp(min=1), sums[1], *sums[2:].split(N)
    return {
        "switch_balance": N * ((load / T) * (prob_sum / T)).sum(),
        "z_loss": lse2 / T,
        "cv_balance": cv_squared(importance) + cv_squared(load),
    }


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """cv²(v) = var(v) / (mean(v)² + 1e-10), unbiased; 0 for a single expert (as ref.cv_squared)."""
    if v.shape[0] == 1:
        return v.sum() * 0
    return v.var(unbiased=True) / (v.mean() ** 2 + CV_EPS)
