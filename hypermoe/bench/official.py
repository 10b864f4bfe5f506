"""The official HyperMoE approach, re-implemented from the math of SPEC.md for `hypermoe bench` (per-token
generated HyperExpert weights, an HF-style loop over experts), and its check against ref/ before anything is timed.

Axis legend: T tokens, d model width, N experts, k selected, f expert hidden width, a adapter width."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import ref
import ref.io
from ref import HyperMoEConfig

# ---------------------------------------------------------------------------------------------
# The official approach, written from the math (SPEC.md §3; design note semantics.md §2)
# ---------------------------------------------------------------------------------------------


def _activation(name: str):
    import torch.nn.functional as F

    return {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"),
            "silu": F.silu}[name]


def _official_classes():
    """Defined lazily so that importing hypermoe.bench (the CLI) does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class OfficialExpert(nn.Module):
        """One GPT-2-style expert MLP with its own parameters (the official code keeps an
        nn.ModuleList of experts): act(x W1 + b1) W2 + b2."""

        def __init__(self, w1, b1, w2, b2, activation):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)  # (d, f), (f, d)
            self.b1 = nn.Parameter(b1) if b1 is not None else None  # (f)
            self.b2 = nn.Parameter(b2) if b2 is not None else None  # (d)
            self.act = activation

        def forward(self, x):  # x: (T_e, d) the tokens routed to this expert
            u = x @ self.w1  # (T_e, f)
            if self.b1 is not None:
                u = u + self.b1
            y = self.act(u) @ self.w2  # (T_e, d)
            return y + self.b2 if self.b2 is not None else y

    class OfficialLayer(nn.Module):
        """The official HyperMoE approach: per-token materialised HyperExpert weights applied with a
        batched mat-vec, experts by a loop with a boolean mask and index_add (HF-style).

        Built from a ref/ parameter mapping (names of ref.param_shapes). Inference semantics without
        capacity (SPEC.md §3.1–3.8); training-only noise and jitter are not part of the baseline."""

        def __init__(self, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None, dtype=None):
            super().__init__()
            if cfg.capacity is not None:
                raise ValueError("the official-approach baseline has no expert capacity (config field 'capacity')")
            self.cfg = cfg

            def p(name):
                return torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype).clone()

            self.router_weight = nn.Parameter(p("router.weight"))  # (d, N)
            self.router_bias = nn.Parameter(p("router.bias")) if cfg.router_bias else None  # (N)
            act = _activation(cfg.activation)
            w1, w2 = p("experts.w1"), p("experts.w2")  # (N, d, f), (N, f, d)
            b1, b2 = (p("experts.b1"), p("experts.b2")) if cfg.expert_bias else (None, None)  # (N, f), (N, d)
            self.experts = nn.ModuleList(  # each expert owns its parameters, as in the official code
                OfficialExpert(w1[i].clone(), b1[i].clone() if b1 is not None else None,
                               w2[i].clone(), b2[i].clone() if b2 is not None else None, act)
                for i in range(cfg.n_experts)
            )
            if cfg.hyper_expert:
                self.hyper = nn.ParameterDict({
                    name.replace(".", "_"): nn.Parameter(p(name))
                    for name in ref.param_shapes(cfg)
                    if name.startswith(("expert_embed", "process.", "hyper."))
                })

        def forward(self, x, layer_index: int = 0):
            cfg, N, k = self.cfg, self.cfg.n_experts, self.cfg.top_k
            shape = x.shape
            x = x.reshape(-1, cfg.d_model)  # (T, d)
            T = x.shape[0]
            logits = x @ self.router_weight  # (T, N)
            if self.router_bias is not None:
                logits = logits + self.router_bias
            routing_dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 at least (bf16 → float32)
            probs = F.softmax(logits, dim=-1, dtype=routing_dtype)  # (T, N)
            selected = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]  # (T, k) ties → lower index
            chosen = probs.gather(-1, selected)  # (T, k)
            gate = chosen / chosen.sum(-1, keepdim=True) if cfg.gate == "topk" else chosen  # renormalised over S
            gate = gate.to(x.dtype)  # cast back to the compute dtype

            # experts: loop over experts, boolean mask → token indices, index_add (HF-style)
            y = torch.zeros_like(x)  # (T, d)
            expert_mask = F.one_hot(selected, N).permute(2, 1, 0)  # (N, k, T)
            for e, expert in enumerate(self.experts):
                slot, idx = torch.where(expert_mask[e])  # (T_e,), (T_e,)
                y.index_add_(0, idx, expert(x[idx]) * gate[idx, slot, None])
            if not cfg.hyper_expert:
                return y.reshape(shape)

            # HyperExpert, per token: s = Σ_{j∉S} E_j (unweighted) → z → r → generated weights
            hp = self.hyper
            unselected = torch.ones(T, N, dtype=x.dtype, device=x.device).scatter(-1, selected, 0.0)  # (T, N)
            s = unselected @ hp["expert_embed"]  # (T, e); zero when k = N
            z = F.relu(s @ hp["process_w1"] + hp["process_b1"]) @ hp["process_w2"] + hp["process_b2"]  # (T, h)
            layer_embed = hp["hyper_layer_embed"][layer_index].expand(T, -1)  # (T, l)
            r = F.relu(torch.cat([z, layer_embed], -1) @ hp["hyper_trunk_weight"] + hp["hyper_trunk_bias"])  # (T, g)
            d, a = cfg.d_model, cfg.d_adapter
            w_down = (r @ hp["hyper_w_down_weight"] + hp["hyper_w_down_bias"]).view(T, d, a)  # (T, d, a) materialised
            w_up = (r @ hp["hyper_w_up_weight"] + hp["hyper_w_up_bias"]).view(T, a, d)  # (T, a, d) materialised
            b_down = r @ hp["hyper_b_down_weight"] + hp["hyper_b_down_bias"]  # (T, a)
            b_up = r @ hp["hyper_b_up_weight"] + hp["hyper_b_up_bias"]  # (T, d)
            hidden = F.relu(torch.bmm(x[:, None, :], w_down)[:, 0] + b_down)  # (T, a) batched mat-vec
            hyper = torch.bmm(hidden[:, None, :], w_up)[:, 0] + b_up  # (T, d)
            return (y + hyper).reshape(shape)

    return OfficialLayer


def official_layer(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None, dtype=None):
    """The official-approach baseline as an nn.Module: forward(x (..., d), layer_index) → (..., d)."""
    return _official_classes()(cfg, params, device=device, dtype=dtype)


def official_error_vs_ref(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], x: np.ndarray, layer_index: int = 0) -> float:
    """Max |official − ref| / max(1, max |ref|) in float64 on x (..., S, d): the baseline's check."""
    import torch

    expected = ref.layer(cfg, params, x, layer_index).output
    model = official_layer(cfg, params, dtype=torch.float64)
    with torch.no_grad():
        got = model(torch.from_numpy(x), layer_index).numpy()
    return float(np.max(np.abs(got - expected), initial=0.0) / max(1.0, float(np.max(np.abs(expected), initial=0.0))))
