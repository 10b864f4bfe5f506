"""The official HyperMoE Switch Transformer variant (per sparse block `{encoder|decoder}.block.{ℓ}.layer.{1|2}.mlp.`,
one `{stack}.param_gen.` per stack; one stack per conversion) → a stack: gate "switch", no expert biases, relu."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hypermoe.convert.common import (
    Converted, SWITCH_FF_LAYER, anchor, assemble, block_count, check_activation, check_official, find_blocks,
    find_param_gen, hyper_part_expected, hyper_sizes, linear_t, moe_every_for,
)
from ref.config import HyperMoEConfig

def from_official_switch(
    state: Mapping[str, np.ndarray], *, stack: str, capacity: int | None,
    activation: str = "relu", dtype=np.float32,
) -> Converted:
    """One stack ("encoder" or "decoder") of the official Switch HyperMoE: its sparse blocks
    `{stack}.block.{ℓ}.layer.{1|2}.mlp` (layer index ℓ = the absolute block index) and `{stack}.param_gen`.

    capacity: the official config's expert_capacity (HF default 64; the checkpoint does not store it),
    or None for no limit. The activation (HF dense_act_fn, default relu) is not stored either.
    """
    if stack not in SWITCH_FF_LAYER:
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
    check_activation(activation)
    ff = SWITCH_FF_LAYER[stack]
    prefix, blocks = find_blocks(state, rf"{stack}\.block\.(\d+)\.layer\.{ff}\.mlp\.router\.classifier\.weight",
                                 f"official Switch HyperMoE blocks in the {stack} stack")
    mlp = lambda i: f"{prefix}{stack}.block.{i}.layer.{ff}.mlp."  # noqa: E731
    N, d = anchor(state, mlp(blocks[0]) + "router.classifier.weight", 2,
                  [mlp(i) + "router.classifier.weight" for i in blocks[1:]])  # nn.Linear: (N, d)
    f, _ = anchor(state, mlp(blocks[0]) + "experts.expert_0.wi.weight", 2,
                  [mlp(i) + "experts.expert_0.wi.weight" for i in blocks[1:]])  # nn.Linear: (f, d)
    router_bias = mlp(blocks[0]) + "router.classifier.bias" in state  # HF router_bias, default False
    hyper = mlp(blocks[0]) + "n_experts_embedding.weight" in state
    for i in blocks:
        if (mlp(i) + "n_experts_embedding.weight" in state) != hyper:
            raise ValueError(f"block {blocks[0]} {'has' if hyper else 'lacks'} expert embeddings but block {i} does "
                             "not: mixed HyperMoE and plain MoE layers are not supported")
    sizes, gen = {}, None
    n_blocks = block_count(state, prefix, f"{stack}.block")
    if hyper:
        gen = find_param_gen(state, f"{prefix}{stack}.param_gen.")
        sizes = hyper_sizes(state, mlp(blocks[0]), gen, d)
        if n_blocks > sizes["n_layers"]:
            raise ValueError(f"the {stack} has {n_blocks} blocks but {gen}layer_embed.weight only {sizes['n_layers']} rows")
    else:
        sizes["n_layers"] = n_blocks
    cfg = HyperMoEConfig(
        d_model=d, d_ff=f, n_experts=N, top_k=1, gate="switch", capacity=capacity, expert_bias=False,
        activation=activation, router_bias=router_bias, hyper_expert=hyper,
        moe_every=moe_every_for(blocks, sizes["n_layers"]),
        n_heads=1,  # model-level fields are not in a stack; 1 divides any d
        **sizes,
    )

    expected: dict[str, tuple[int, ...]] = {}
    for i in blocks:
        expected[mlp(i) + "router.classifier.weight"] = (N, d)
        if router_bias:
            expected[mlp(i) + "router.classifier.bias"] = (N,)
        for j in range(N):
            ex = f"{mlp(i)}experts.expert_{j}."
            expected.update({ex + "wi.weight": (f, d), ex + "wo.weight": (d, f)})
    expected.update(hyper_part_expected(cfg, [mlp(i) for i in blocks], gen))
    check_official(state, expected)

    layers: dict[int, dict[str, np.ndarray]] = {}  # block → its router and experts, our names
    for i in blocks:
        experts = [f"{mlp(i)}experts.expert_{j}." for j in range(N)]
        layer = {
            "router.weight": linear_t(state, mlp(i) + "router.classifier.weight"),  # (d, N)
            # T5-style experts are bias-free nn.Linear: transpose each, then stack
            "experts.w1": np.stack([linear_t(state, ex + "wi.weight") for ex in experts]),  # (N, d, f)
            "experts.w2": np.stack([linear_t(state, ex + "wo.weight") for ex in experts]),  # (N, f, d)
        }
        if router_bias:
            layer["router.bias"] = np.asarray(state[mlp(i) + "router.classifier.bias"])  # (N,)
        layers[i] = layer
    return assemble(cfg, state, layers, mlp, gen, expected, dtype)
