"""The HyperExpert in PyTorch (SPEC.md §3.6–3.7): the shared HyperNetwork, the per-layer embedding process, and the
ways its adapters are applied to tokens (grouped by selected set, gathered per token, factored).

    s = Σ_{j∉S} E_j;  z = process(s);  r = relu([z ; L_ℓ] Wg + cg);  W_down, b_down, W_up, b_up = heads(r)
    ê(x) = relu(x W_down + b_down) W_up + b_up

Parameters are in the reference's layout (x @ W, W: (in, out)); hypermoe/layer.py picks the path per call (its
docstring lists them). Axis legend as hypermoe/layer.py: T tokens, d model width, N experts, k selected experts,
a adapter width, e expert-embedding width, p process hidden width, h width of z, l layer-embedding width,
g generator width, L layers sharing the hypernetwork, C = C(N, k) possible selected sets.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ref.config import HyperMoEConfig
from ref.params import init_std


# ---------------------------------------------------------------------------------------------
# Small building blocks (x @ W layout, W: (in, out), as ref/)
# ---------------------------------------------------------------------------------------------

class Linear(nn.Module):
    """x @ weight + bias, weight: (in, out) — the reference's layout, not nn.Linear's."""

    def __init__(self, n_in: int, n_out: int, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(n_out, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[0]}, out={self.weight.shape[1]}"


def param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def init_(module: nn.Module, cfg: HyperMoEConfig, prefix: str = "") -> None:
    """Every parameter ~ N(0, σ²) with the reference's σ for its name (ref.params.init_std: fan-in scaling,
    He where a ReLU follows, hypernetwork heads scaled so the HyperExpert is about as large as the routed
    output). The same distribution as ref.init, drawn from torch's RNG."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, init_std(cfg, prefix + name, tuple(p.shape)))


class Adapters(NamedTuple):
    """Generated HyperExperts, one per row of z: W_down (S, d, a), b_down (S, a), W_up (S, a, d), b_up (S, d)."""

    w_down: torch.Tensor
    b_down: torch.Tensor
    w_up: torch.Tensor
    b_up: torch.Tensor


# ---------------------------------------------------------------------------------------------
# The shared hypernetwork
# ---------------------------------------------------------------------------------------------


class HyperNetwork(nn.Module):
    r"""The cross-layer hypernetwork (SPEC.md §3.7), shared by the HyperMoE layers of a stack.

    r = relu([z ; L_ℓ] Wg + cg);  W_down = reshape(r Hd + hd, (d, a)),  W_up = reshape(r Hu + hu, (a, d)),
    b_down = r Gd + gd,  b_up = r Gu + gu   (row-major reshapes: W_down[i, j] = out[i·a + j]).

    Shape: z (S, h) → Adapters (S, ...), one HyperExpert per row. Parameters (state_dict keys) are the
    reference's `hyper.*` names without the prefix: layer_embed (L, l), trunk.weight (h + l, g), trunk.bias,
    w_down.weight (g, d·a), w_down.bias, w_up.weight (g, a·d), w_up.bias, b_down.weight (g, a), b_down.bias,
    b_up.weight (g, d), b_up.bias.
    """

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        if not config.hyper_expert:
            raise ValueError("config field 'hyper_expert' is False: a HyperNetwork needs hyper_expert=True")
        self.config = config
        c, kw = config, dict(device=device, dtype=dtype)
        d, a, g = c.d_model, c.d_adapter, c.d_generator
        self.layer_embed = param((c.n_layers, c.d_layer_embed), **kw)  # (L, l)
        self.trunk = Linear(c.d_hyper + c.d_layer_embed, g, **kw)  # (h + l) → g
        self.w_down = Linear(g, d * a, **kw)  # → (d, a) row-major
        self.w_up = Linear(g, a * d, **kw)  # → (a, d) row-major
        self.b_down = Linear(g, a, **kw)
        self.b_up = Linear(g, d, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_(self, self.config, prefix="hyper.")

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, d_adapter={c.d_adapter}, d_hyper={c.d_hyper}, "
                f"d_layer_embed={c.d_layer_embed}, d_generator={c.d_generator}, n_layers={c.n_layers}")

    def trunk_features(self, z: torch.Tensor, layer_index: int) -> torch.Tensor:
        """r = relu([z ; L_ℓ] Wg + cg) → (S, g)."""
        layer_embed = self.layer_embed[layer_index].expand(z.shape[0], -1)  # (S, l)
        return F.relu(self.trunk(torch.cat([z, layer_embed], dim=-1)))  # (S, g): z first, as ref

    def forward(self, z: torch.Tensor, layer_index: int) -> Adapters:
        """The HyperExpert of each row of z (S, h) for layer ℓ."""
        c = self.config
        r = self.trunk_features(z, layer_index)  # (S, g)
        return Adapters(
            w_down=self.w_down(r).reshape(-1, c.d_model, c.d_adapter),  # (S, d, a)
            b_down=self.b_down(r),  # (S, a)
            w_up=self.w_up(r).reshape(-1, c.d_adapter, c.d_model),  # (S, a, d)
            b_up=self.b_up(r),  # (S, d)
        )

    generate = forward


# ---------------------------------------------------------------------------------------------
# Per layer: the embedding process; the selected sets, numbered
# ---------------------------------------------------------------------------------------------


class Process(nn.Module):
    """The embedding-process MLP z = relu(s w1 + b1) w2 + b2: w1 (e, p), b1 (p), w2 (p, h), b2 (h)."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        e, p, h, kw = config.d_expert_embed, config.d_process, config.d_hyper, dict(device=device, dtype=dtype)
        self.w1, self.b1 = param((e, p), **kw), param((p,), **kw)
        self.w2, self.b2 = param((p, h), **kw), param((h,), **kw)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return F.relu(s @ self.w1 + self.b1) @ self.w2 + self.b2  # (S, h)


def set_tables(N: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """binom (k + 1, N) int64 with binom[j, n] = C(n, j); sets (C, N) bool, row r = the set of colex rank r.

    A set {c_1 < … < c_k} has colex rank Σ_i C(c_i, i) ∈ [0, C(N, k)) (combinatorial number system)."""
    binom = torch.tensor([[math.comb(n, j) for n in range(N)] for j in range(k + 1)], dtype=torch.int64)
    sets = torch.zeros(math.comb(N, k), N, dtype=torch.bool)
    for combo in itertools.combinations(range(N), k):
        sets[sum(math.comb(c, i + 1) for i, c in enumerate(combo)), list(combo)] = True
    return binom.to(device), sets.to(device)


# ---------------------------------------------------------------------------------------------
# Applying adapters to tokens
# ---------------------------------------------------------------------------------------------


def grouped_adapter(x2: torch.Tensor, group: torch.Tensor, table: Adapters) -> torch.Tensor:
    """ê = relu(x W_down[u] + b_down[u]) W_up[u] + b_up[u] with u = group of each token: tokens sorted by
    group, one GEMM pair per group present, gathered back → (T, d)."""
    order = torch.sort(group, stable=True).indices  # (T,) tokens grouped
    counts = torch.bincount(group, minlength=table.w_down.shape[0]).tolist()
    xs = x2.index_select(0, order)  # (T, d)
    w_down, b_down, w_up, b_up = (t.unbind(0) for t in table)
    parts = []
    for u, rows in enumerate(xs.split(counts)):  # split: one backward op, not a zero gradient per slice
        if rows.shape[0]:
            hidden = F.relu(torch.addmm(b_down[u], rows, w_down[u]))  # (n, a)
            parts.append(torch.addmm(b_up[u], hidden, w_up[u]))  # (n, d)
    out = torch.cat(parts) if parts else x2.new_zeros((0, x2.shape[-1]))  # (T, d) in group order
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return out.index_select(0, inverse)


def gathered_adapter(x2: torch.Tensor, group: torch.Tensor, table: Adapters) -> torch.Tensor:
    """The same for a few tokens: each token's adapter gathered (T, d, a), one bmm per matrix, no host sync."""
    hidden = torch.relu(torch.bmm(x2.unsqueeze(1), table.w_down.index_select(0, group)).squeeze(1)
                        + table.b_down.index_select(0, group))  # (T, a)
    up = torch.bmm(hidden.unsqueeze(1), table.w_up.index_select(0, group)).squeeze(1)  # (T, d)
    return up + table.b_up.index_select(0, group)



def factored_adapter(hyper: HyperNetwork, x2: torch.Tensor, z: torch.Tensor, layer_index: int) -> torch.Tensor:
    """ê per token from its own z (T, h), without materialising weights: x W_down(r) = Σ_j r_j (x Hd_j) + x hd,
    and likewise h W_up(r) = (r ⊗ h) Hu + h hu → (T, d). FLOPs grow with g, so used only when C(N, k) exceeds
    the layer's max_table_sets."""
    c = hyper.config
    d, a, g = c.d_model, c.d_adapter, c.d_generator
    r = hyper.trunk_features(z, layer_index)  # (T, g)
    Hd = hyper.w_down.weight.reshape(g, d, a).permute(1, 0, 2).reshape(d, g * a)  # (d, g·a)
    down = torch.einsum("tg,tga->ta", r, (x2 @ Hd).reshape(-1, g, a))  # (T, a)
    down = down + x2 @ hyper.w_down.bias.reshape(d, a) + hyper.b_down(r)
    hidden = F.relu(down)  # (T, a)
    outer = (r.unsqueeze(-1) * hidden.unsqueeze(1)).reshape(-1, g * a)  # (T, g·a)
    return outer @ hyper.w_up.weight.reshape(g * a, d) + hidden @ hyper.w_up.bias.reshape(a, d) + hyper.b_up(r)
