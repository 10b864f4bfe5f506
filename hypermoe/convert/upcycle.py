"""Upcycling dense GPT-2 MLPs (`--from gpt2-mlp`), and the one upcycling step every source shares (upcycle_): each dense GPT-2 MLP (`h.{ℓ}.mlp.c_fc` / `c_proj`) copied into every expert of a HyperMoE layer, with
a fresh router, expert embeddings and hypernetwork whose W_up / b_up heads start at zero, so that the upcycled
model first computes exactly the dense model's outputs."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from hypermoe.convert.common import (
    Converted, anchor, block_count, check_activation, check_official, find_blocks, finish,
)
from hypermoe.convert.gpt2 import as_model, check_eps, check_heads, resolve_kind
import ref
import ref.io
from ref.config import HyperMoEConfig

def upcycle_gpt2_mlp(
    state: Mapping[str, np.ndarray], *, n_experts: int, top_k: int, seed: int = 0, moe_every: int = 1,
    activation: str = "gelu_tanh", dtype=np.float32, kind: str = "auto", n_heads: int | None = None,
    layer_norm_eps: float | None = 1e-5, tie: bool | None = None, **hyper_widths: int,
) -> Converted:
    """HyperMoE from a dense GPT-2: block ℓ's MLP (`h.{ℓ}.mlp.c_fc` / `c_proj`, Conv1D, x @ W + b)
    copied into each of the N experts of layer ℓ, for the blocks cfg.is_moe_block picks (moe_every = 1:
    all, as the paper's GPT-2 experiments); router, expert embeddings, process MLP and hypernetwork
    fresh from ref.init_stack(cfg, seed), except the generator heads of W_up and b_up, which start at zero
    (the HyperExpert outputs 0). So each upcycled layer starts as the dense MLP: exactly with k = 1 (the gate
    is 1), up to rounding with k > 1 (the renormalised gates sum to 1 ± k·u). `hyper_widths`: d_expert_embed,
    d_process, d_hyper, d_layer_embed, d_generator, d_adapter (default: the official sizes).
    kind: "stack", "model" (the whole GPT2LMHeadModel around it: as_model; needs n_heads) or "auto" (model
    when the checkpoint holds WHOLE_LM, as a GPT2LMHeadModel's state dict / model.safetensors does).
    """
    check_activation(activation)
    allowed = {"d_expert_embed", "d_process", "d_hyper", "d_layer_embed", "d_generator", "d_adapter"}
    unknown = sorted(set(hyper_widths) - allowed)
    if unknown:
        raise ValueError(f"unknown hypernetwork width(s) {unknown}; expected some of {sorted(allowed)}")
    prefix, blocks = find_blocks(state, r"h\.(\d+)\.mlp\.c_fc\.weight", "dense GPT-2 MLPs")
    model = resolve_kind(state, prefix, kind) == "model"
    if model:
        check_heads(n_heads)  # before the work
        check_eps(layer_norm_eps)
    mlp = lambda i: f"{prefix}h.{i}.mlp."  # noqa: E731
    d, f = anchor(state, mlp(blocks[0]) + "c_fc.weight", 2, [mlp(i) + "c_fc.weight" for i in blocks[1:]])  # (d, f)
    n_layers = block_count(state, prefix, "h")
    cfg = HyperMoEConfig(
        d_model=d, d_ff=f, n_experts=n_experts, top_k=top_k, gate="topk", expert_bias=True, activation=activation,
        n_layers=n_layers, moe_every=moe_every, n_heads=1, **hyper_widths,  # n_heads: 1 divides any d
    )
    moe = ref.stack_layers(cfg)
    if not moe:
        raise ValueError(f"moe_every = {moe_every} selects no block of the {n_layers} blocks")
    ref.check_memory(cfg, "stack", 8, what="upcycling")  # ref.init_stack draws float64 (finish() then casts)
    expected: dict[str, tuple[int, ...]] = {}
    for i in moe:
        expected.update({mlp(i) + "c_fc.weight": (d, f), mlp(i) + "c_fc.bias": (f,),
                         mlp(i) + "c_proj.weight": (f, d), mlp(i) + "c_proj.bias": (d,)})
    check_official(state, expected)

    params = ref.init_stack(cfg, seed=seed)  # float64; the experts are overwritten below
    upcycle_(params, {f"layers.{i}.experts.{ours}": np.asarray(state[mlp(i) + theirs]) for i in moe
                      for ours, theirs in (("w1", "c_fc.weight"), ("b1", "c_fc.bias"), ("w2", "c_proj.weight"),
                                           ("b2", "c_proj.bias"))}, n_experts)
    dense = re.compile(re.escape(prefix) + r"h\.(\d+)\.mlp\.c_(fc|proj)\.(weight|bias)")
    unused = {key: f"dense MLP of a block that stays dense (moe_every = {moe_every})"
              for key in state if key not in expected and dense.fullmatch(key)}
    ignored = sorted(key for key in state if key not in expected and key not in unused)
    stack = Converted(cfg, finish(cfg, params, dtype), unused, ignored)
    if model:
        return as_model(state, prefix, stack, n_heads=n_heads, layer_norm_eps=layer_norm_eps, dtype=dtype,
                        tie=tie)
    return stack


UP_HEADS = ("hyper.w_up.weight", "hyper.w_up.bias", "hyper.b_up.weight", "hyper.b_up.bias")


def upcycle_(params: dict[str, np.ndarray], dense: Mapping[str, np.ndarray], n_experts: int) -> None:
    """Upcycling, in place: each `dense` MLP tensor (name → (d, f), (f,), (f, d) or (d,)) copied into all N experts
    of that name ((N, d, f), ...: N identical copies), and the hypernetwork heads that generate W_up and b_up set to
    zero, so every HyperExpert outputs relu(...) @ 0 + 0 = 0 and the upcycled layer starts as the dense MLP (the
    heads' gradients are not zero: training moves them). The router and the rest stay as `params` has them."""
    for name, value in dense.items():
        params[name] = np.repeat(np.asarray(value)[None], n_experts, axis=0)
    for name in UP_HEADS:
        if name in params:
            params[name] = np.zeros_like(params[name])
