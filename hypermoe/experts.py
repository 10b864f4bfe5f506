"""The routed experts in PyTorch (SPEC.md §3.5): y = Σ_{i∈S} g_i FFN_i(x), the tokens dispatched to the stacked
experts sorted by expert (one GEMM pair per expert) or, for a few tokens, gathered (no sort, no host sync) or
grouped on the host (routed_few: CPU inference).

Both are free functions of the layer's config and its `Experts` (the stacked parameters, as ref/'s layout);
hypermoe/layer.py picks one per call (its docstring lists the paths) and hypermoe/parallel.py reuses the FFN.
Axis legend as hypermoe/layer.py: T tokens, d model width, N experts, k selected experts, f expert hidden width,
a adapter width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ref.config import HyperMoEConfig
from hypermoe.hypernetwork import Adapters, param

FEW_TOKENS_CPU = 2  # T·k up to this, CPU inference: routed_few (faster at T·k ≤ 2; measured equal at 4, 8)


class Experts(nn.Module):
    """N stacked FFNs: w1 (N, d, f), b1 (N, f) [expert_bias], w2 (N, f, d), b2 (N, d) [expert_bias]."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        d, f, N, kw = config.d_model, config.d_ff, config.n_experts, dict(device=device, dtype=dtype)
        self.w1 = param((N, d, f), **kw)
        self.b1 = param((N, f), **kw) if config.expert_bias else None
        self.w2 = param((N, f, d), **kw)
        self.b2 = param((N, d), **kw) if config.expert_bias else None


def activation(name: str, u: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(u)
    if name == "gelu":
        return F.gelu(u)  # exact: u · Φ(u)
    if name == "gelu_tanh":
        return F.gelu(u, approximate="tanh")  # GPT-2's "gelu_new"
    if name == "silu":
        return F.silu(u)
    raise ValueError(f"unknown activation {name!r}")


def expert_ffn(act: str, x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """§3.5 FFN_i(x) = act(x W1_i + c1_i) W2_i + c2_i of one expert on rows x (n, d) → (n, d); b1, b2 None
    without expert_bias."""
    u = x @ w1 if b1 is None else torch.addmm(b1, x, w1)  # (n, f)
    u = activation(act, u)
    return u @ w2 if b2 is None else torch.addmm(b2, u, w2)  # (n, d)


def c_unbind(t: torch.Tensor | None):
    """Per-expert views of a stacked (N, ...) parameter; backward is one stack, not N full-size zero grads."""
    return None if t is None else t.unbind(0)


def routed_sorted(config: HyperMoEConfig, experts: Experts, x2: torch.Tensor, selected: torch.Tensor,
                  gate: torch.Tensor, kept: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
    """§3.5 y = Σ_{i∈S} g_i FFN_i(x): the T·k assignments sorted by expert (stable), one GEMM pair per expert
    on a contiguous slice, then gathered back (no scatter-add: deterministic on every device).

    With `adapters` (k = 1, where the selected set is the expert: row e = the HyperExpert of set {e}), the
    HyperExpert runs on the same slices, g·FFN_e(x) + ê_e(x): one dispatch and one gather-back for both."""
    c = config
    T, k, N, d = selected.shape[0], c.top_k, c.n_experts, c.d_model
    group = selected.reshape(-1)  # (T·k,) expert of assignment t·k + slot
    if c.capacity is not None:
        group = torch.where(kept, group, group + N)  # k = 1; dropped tokens: groups N.. pass through
    order = torch.sort(group, stable=True).indices  # (T·k,) assignments grouped by expert
    counts = torch.bincount(group, minlength=2 * N).tolist()  # one host sync
    xs = x2.index_select(0, order // k)  # (T·k, d) tokens in expert order
    gs = gate.reshape(-1).to(x2.dtype).index_select(0, order).unsqueeze(-1)  # (T·k, 1) cast back to x's dtype
    w1, w2 = c_unbind(experts.w1), c_unbind(experts.w2)  # per-expert views (one grad op each)
    b1, b2 = c_unbind(experts.b1), c_unbind(experts.b2)
    if adapters is not None:
        w_down, b_down, w_up, b_up = (t.unbind(0) for t in adapters)
    parts = []
    # split, not xs[start:start + n]: one backward op (a cat) instead of a full-size zero gradient per slice
    for g, (rows, g_rows) in enumerate(zip(xs.split(counts), gs.split(counts))):
        if not rows.shape[0]:
            continue
        e = g % N  # rows (n, d), g_rows (n, 1)
        if g < N:
            bias1, bias2 = (None if b is None else b[e] for b in (b1, b2))
            y = expert_ffn(c.activation, rows, w1[e], bias1, w2[e], bias2)  # (n, d)
        else:
            y = rows  # capacity drop rule: routed = g · x (HF SwitchTransformers)
        y = y * g_rows
        if adapters is not None:
            hidden = F.relu(torch.addmm(b_down[e], rows, w_down[e]))  # (n, a)
            y = torch.addmm(b_up[e], hidden, w_up[e]).add_(y)  # (n, d) ê + g·y
        parts.append(y)
    ys = torch.cat(parts) if parts else x2.new_zeros((0, d))  # (T·k, d) in expert order
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    ys = ys.index_select(0, inverse)  # (T·k, d) back in token order
    return ys if k == 1 else ys.reshape(T, k, d).sum(1)


def routed_few(config: HyperMoEConfig, experts: Experts, x2: torch.Tensor, selected: torch.Tensor,
               gate: torch.Tensor, kept: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
    """routed_sorted for a few tokens at inference on the CPU (decode at batch 1–2, T·k ≤ FEW_TOKENS_CPU): the
    assignments grouped by expert on the host (one .tolist(): a host sync costs nothing on the CPU), each group's
    expert (and adapter) weights indexed directly (views: no unbind of all N, no copy), no sort and no gather back
    when one expert takes every assignment. The same rows in the same order per expert as routed_sorted, so the
    same sums; ~40 % less time per layer than routed_sorted at T = 1 (d 256, f 1024, N 8: 190 vs 320 µs)."""
    c, ex = config, experts
    T, k, N, d = selected.shape[0], c.top_k, c.n_experts, c.d_model
    group = selected.reshape(-1)  # (T·k,) expert of assignment t·k + slot
    if c.capacity is not None:
        group = torch.where(kept, group, group + N)  # k = 1; dropped tokens: groups N.. pass through
    groups: dict[int, list[int]] = {}
    for a, g in enumerate(group.tolist()):  # one host sync; assignments ascending within each group
        groups.setdefault(g, []).append(a)
    xs = x2 if k == 1 else x2.repeat_interleave(k, dim=0)  # (T·k, d): row a is token a // k
    gs = gate.reshape(-1, 1).to(x2.dtype)  # (T·k, 1) cast back to x's dtype
    ys = None if len(groups) == 1 else x2.new_empty((T * k, d))  # (T·k, d) in assignment order
    for g, assignments in groups.items():
        index = None if ys is None else torch.tensor(assignments, device=x2.device)  # (n,)
        rows, g_rows = (xs, gs) if index is None else (xs.index_select(0, index), gs.index_select(0, index))
        e = g % N
        if g < N:
            y = expert_ffn(c.activation, rows, ex.w1[e], None if ex.b1 is None else ex.b1[e], ex.w2[e],
                           None if ex.b2 is None else ex.b2[e])  # (n, d)
        else:
            y = rows  # capacity drop rule: routed = g · x
        y = y * g_rows
        if adapters is not None:
            hidden = F.relu(torch.addmm(adapters.b_down[e], rows, adapters.w_down[e]))  # (n, a)
            y = torch.addmm(adapters.b_up[e], hidden, adapters.w_up[e]).add_(y)  # (n, d) ê + g·y
        if index is None:
            ys = y
        else:
            ys.index_copy_(0, index, y)
    return ys if k == 1 else ys.reshape(T, k, d).sum(1)


def routed_gathered(config: HyperMoEConfig, experts: Experts, x2: torch.Tensor, selected: torch.Tensor,
                    gate: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """§3.5 for a few tokens (decode): each assignment's expert weights gathered, one bmm per matrix; no
    sort and no host sync. Reads the selected experts' weights twice (copy, then bmm), so only for tiny T·k."""
    c, ex = config, experts
    T, k, d = selected.shape[0], c.top_k, c.d_model
    expert = selected.reshape(-1)  # (T·k,) assignment t·k + slot
    xs = x2.repeat_interleave(k, dim=0).unsqueeze(1)  # (T·k, 1, d)
    u = torch.bmm(xs, ex.w1.index_select(0, expert))  # (T·k, 1, f)
    if ex.b1 is not None:
        u = u + ex.b1.index_select(0, expert).unsqueeze(1)
    y = torch.bmm(activation(c.activation, u), ex.w2.index_select(0, expert))  # (T·k, 1, d)
    if ex.b2 is not None:
        y = y + ex.b2.index_select(0, expert).unsqueeze(1)
    y = y.reshape(T, k, d)
    if c.capacity is not None:
        y = torch.where(kept.reshape(T, 1, 1), y, x2.unsqueeze(1))  # k = 1; capacity drop: routed = g · x
    return (y * gate.to(x2.dtype).unsqueeze(-1)).sum(1)

