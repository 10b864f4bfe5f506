"""The official HyperMoE GPT-2 variant (per block `h.{ℓ}.mlp.`, one `param_gen.`) → a stack or a whole model:
gate "topk", expert biases, gelu_tanh (docs/convert.md has the mapping table)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hypermoe.convert.common import (
    Converted, anchor, assemble, block_count, check_activation, check_official, find_blocks, find_param_gen,
    hyper_part_expected, hyper_sizes, moe_every_for,
)
from hypermoe.convert.gpt2 import as_model, check_eps, check_heads, resolve_kind
from ref.config import HyperMoEConfig

def from_official_gpt2(
    state: Mapping[str, np.ndarray], *, top_k: int = 1, keep_noise: bool = False,
    activation: str = "gelu_tanh", dtype=np.float32, kind: str = "auto", n_heads: int | None = None,
    layer_norm_eps: float | None = 1e-5, tie: bool | None = None,
) -> Converted:
    """The official GPT-2 HyperMoE (every block's `h.{ℓ}.mlp` is a HyperMoE layer; one `param_gen`).

    The checkpoint stores neither k (official: 1) nor the activation (GPT-2's gelu_new = gelu_tanh).
    keep_noise: keep `w_noise` as router.noise_weight (noisy_gating, for further training); else reported.
    kind: "stack" (the HyperMoE layers and the hypernetwork), "model" (the whole GPT2LMHeadModel: as_model;
    needs n_heads, and layer_norm_eps if not GPT-2's 1e-5; tie: config.json's
    tie_word_embeddings, as_model) or "auto" (model when the checkpoint holds WHOLE_LM).
    """
    check_activation(activation)
    prefix, blocks = find_blocks(state, r"h\.(\d+)\.mlp\.w_gate", "official GPT-2 HyperMoE blocks")
    model = resolve_kind(state, prefix, kind) == "model"
    if model:
        check_heads(n_heads)  # before the work
        check_eps(layer_norm_eps)
    mlp = lambda i: f"{prefix}h.{i}.mlp."  # noqa: E731
    d, N = anchor(state, mlp(blocks[0]) + "w_gate", 2, [mlp(i) + "w_gate" for i in blocks[1:]])  # x @ w_gate: (d, N)
    _, f = anchor(state, mlp(blocks[0]) + "experts.expert_0.c_fc.weight", 2,
                  [mlp(i) + "experts.expert_0.c_fc.weight" for i in blocks[1:]])  # Conv1D: (d, f)
    hyper = mlp(blocks[0]) + "n_experts_embedding.weight" in state
    for i in blocks:
        if (mlp(i) + "n_experts_embedding.weight" in state) != hyper:
            raise ValueError(f"block {blocks[0]} {'has' if hyper else 'lacks'} expert embeddings but block {i} does "
                             "not: mixed HyperMoE and plain MoE layers are not supported")
    sizes, gen = {}, None
    n_blocks = block_count(state, prefix, "h")
    if hyper:
        gen = find_param_gen(state, prefix + "param_gen.")
        sizes = hyper_sizes(state, mlp(blocks[0]), gen, d)
        if n_blocks > sizes["n_layers"]:
            raise ValueError(f"the model has {n_blocks} blocks but {gen}layer_embed.weight only {sizes['n_layers']} rows")
    else:
        sizes["n_layers"] = n_blocks
    cfg = HyperMoEConfig(
        d_model=d, d_ff=f, n_experts=N, top_k=top_k, gate="topk", expert_bias=True, activation=activation,
        router_bias=False, noisy_gating=keep_noise, hyper_expert=hyper,
        moe_every=moe_every_for(blocks, sizes["n_layers"]),
        n_heads=1,  # model-level fields are not in a stack; 1 divides any d
        **sizes,
    )

    expected: dict[str, tuple[int, ...]] = {}
    for i in blocks:
        expected[mlp(i) + "w_gate"] = (d, N)
        if keep_noise:
            expected[mlp(i) + "w_noise"] = (d, N)
        for j in range(N):
            ex = f"{mlp(i)}experts.expert_{j}."
            expected.update({ex + "c_fc.weight": (d, f), ex + "c_fc.bias": (f,),
                             ex + "c_proj.weight": (f, d), ex + "c_proj.bias": (d,)})
    expected.update(hyper_part_expected(cfg, [mlp(i) for i in blocks], gen))
    check_official(state, expected)

    layers: dict[int, dict[str, np.ndarray]] = {}  # block → its router and experts, our names
    for i in blocks:
        experts = [f"{mlp(i)}experts.expert_{j}." for j in range(N)]
        layer = {
            "router.weight": np.asarray(state[mlp(i) + "w_gate"]),  # (d, N), already x @ W
            # GPT-2 Conv1D computes x @ W + b with W: (in, out), our layout: stack as is
            "experts.w1": np.stack([state[ex + "c_fc.weight"] for ex in experts]),  # (N, d, f)
            "experts.b1": np.stack([state[ex + "c_fc.bias"] for ex in experts]),  # (N, f)
            "experts.w2": np.stack([state[ex + "c_proj.weight"] for ex in experts]),  # (N, f, d)
            "experts.b2": np.stack([state[ex + "c_proj.bias"] for ex in experts]),  # (N, d)
        }
        if keep_noise:
            layer["router.noise_weight"] = np.asarray(state[mlp(i) + "w_noise"])  # (d, N), x @ w_noise
        layers[i] = layer
    stack = assemble(cfg, state, layers, mlp, gen, expected, dtype)
    if model:
        return as_model(state, prefix, stack, n_heads=n_heads, layer_norm_eps=layer_norm_eps, dtype=dtype,
                        tie=tie)
    return stack
