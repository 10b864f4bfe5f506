"""The golden cases' definitions: one Spec per case of conformance/cases/ (config, input shape, tags, seed, how the
router is constructed), read by conformance/generate.py, which draws, runs ref and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ref import HyperMoEConfig, tiny_config


@dataclass(frozen=True)
class Spec:
    id: str
    cfg: HyperMoEConfig
    shape: tuple[int, ...]  # input (..., S, d)
    tags: tuple[str, ...]
    seed: int
    description: str
    layer_index: int = 0
    kind: str = "layer"  # "layer": ref.layer; "stack": ref.stack (layer ℓ uses layer embedding ℓ)
    router: str = "random"  # "random" | "ties" (dyadic router, exact ties) | "large" (bias offsets) | "near-tie"
    bias: tuple[float, ...] = ()  # router bias for router="large"
    jitter: bool = False  # draw input.jitter ~ U[1-ε, 1+ε] (ε = cfg.router_jitter)
    gate_noise: bool = False  # draw input.gate_noise ~ N(0, 1) (cfg.noisy_gating)


def case_specs() -> list[Spec]:
    """Every golden case of the suite, in the manifest's order."""
    t = tiny_config  # d = 16, f = 32, N = 4, k = 2, hypernetwork widths 8, a = 4, L = 2
    wide = dict(d_model=24, d_ff=40, n_experts=8, d_expert_embed=5, d_process=7, d_hyper=6, d_layer_embed=3,
                d_generator=9, d_adapter=6, n_layers=3, n_heads=1)
    return [
        Spec("topk_k1", t(top_k=1), (2, 5, 16), ("topk", "k1", "layer-index"), 101,
             "top-1 with 'topk' gates (gate is exactly 1), layer embedding 1", layer_index=1),
        Spec("topk_k2_bias_relu", t(top_k=2, router_bias=True, activation="relu"), (2, 6, 16),
             ("topk", "k2", "router-bias", "relu"), 102, "top-2, renormalised gates, router bias, relu experts"),
        Spec("topk_k3_wide_gelu", t(top_k=3, activation="gelu", **wide), (3, 4, 24),
             ("topk", "k3", "gelu", "asymmetric-shapes", "layer-index"), 103,
             "N = 8, k = 3, every width different (d = 24, a = 6), exact gelu, layer embedding 2", layer_index=2),
        Spec("topk_kN", t(top_k=4, activation="silu"), (7, 16), ("topk", "k=N", "empty-unselected", "silu"), 104,
             "k = N: nothing unselected, selection embedding 0; all N logits ordered"),
        Spec("topk_N1", t(n_experts=1, top_k=1), (5, 16), ("topk", "N1", "k=N", "empty-unselected"), 105,
             "a single expert"),
        Spec("batch_dims", t(top_k=2), (2, 3, 2, 16), ("topk", "k2", "batch-dims"), 106,
             "two leading batch dims (tokens flattened)", layer_index=1),
        Spec("no_hyper", t(top_k=2, hyper_expert=False), (2, 5, 16), ("plain-moe", "k2"), 107,
             "hyper_expert=False: a plain MoE layer, no hypernetwork parameters"),
        Spec("switch_basic", t(gate="switch", top_k=1, expert_bias=False, activation="silu"), (2, 5, 16),
             ("switch", "k1", "no-expert-bias"), 108, "'switch' gate: the unrenormalised top-1 probability"),
        Spec("switch_capacity", t(gate="switch", top_k=1, capacity=2, activation="relu"), (3, 8, 16),
             ("switch", "capacity", "drops"), 109,
             "capacity 2 per sequence of 8 tokens over 4 experts: dropped tokens pass through as g·x"),
        Spec("tie_topk", t(d_model=8, top_k=2), (2, 6, 8), ("tie", "topk", "k2"), 110,
             "exact ties (dyadic router, experts 1 and 2 identical router columns, zero tokens): lower index wins",
             router="ties"),
        Spec("tie_switch_capacity", t(d_model=8, gate="switch", top_k=1, capacity=2), (2, 8, 8),
             ("tie", "switch", "capacity", "drops"), 111,
             "exact ties with capacity: all-zero tokens tie on every expert, pick expert 0 and overflow it",
             router="ties"),
        Spec("near_tie", t(top_k=2), (2, 4, 16), ("near-tie", "topk"), 112,
             "one token with a routing margin of 1e-4: runs in float64/float32, skipped in float16/bfloat16",
             router="near-tie"),
        Spec("large_logits", t(top_k=2, router_bias=True), (2, 5, 16), ("large-logits", "softmax-stability", "topk"), 113,
             "logits ≈ ±1024 (router bias): a softmax without max subtraction overflows; a float16 router rounds "
             "logits to steps of 1", router="large", bias=(1024.0, 1024.0, 1024.0, -1024.0)),
        Spec("large_logits_switch", t(gate="switch", top_k=1, router_bias=True), (2, 5, 16),
             ("large-logits", "softmax-stability", "switch"), 114,
             "logits ≈ -2048: exp underflows without max subtraction", router="large", bias=(-2048.0,) * 4),
        Spec("T0", t(top_k=2), (0, 16), ("T0", "empty"), 115, "no tokens"),
        Spec("T0_capacity", t(gate="switch", top_k=1, capacity=1), (2, 0, 16), ("T0", "empty", "capacity"), 116,
             "two sequences of length 0 with capacity"),
        Spec("T1", t(top_k=2), (1, 16), ("T1",), 117, "one token", layer_index=1),
        Spec("stack3", t(top_k=2, n_layers=3, activation="gelu_tanh"), (2, 4, 16),
             ("stack", "shared-hypernetwork", "layer-index"), 118,
             "three layers sharing one hypernetwork, h ← h + layer_ℓ(h) with layer embedding ℓ", kind="stack"),
        Spec("aux_topk", t(n_experts=8, top_k=2), (4, 8, 16), ("aux", "topk", "k2"), 119,
             "32 tokens over 8 experts: switch_balance, z_loss, cv_balance"),
        Spec("aux_switch", t(n_experts=8, gate="switch", top_k=1), (4, 8, 16), ("aux", "switch"), 120,
             "32 tokens over 8 experts, 'switch' gate: auxiliary losses"),
        Spec("train_jitter", t(gate="switch", top_k=1, router_jitter=0.2, capacity=3), (2, 6, 16),
             ("training", "jitter", "switch", "capacity", "drops"), 121,
             "router jitter given as input (x ⊙ u on the router input only)", jitter=True),
        Spec("train_noisy_gating", t(top_k=2, noisy_gating=True), (2, 6, 16), ("training", "noisy-gating", "topk"), 122,
             "noisy gating, ε given as input: logits + ε ⊙ (softplus(x W_noise) + 0.01)", gate_noise=True),
    ]


__all__ = ["Spec", "case_specs"]
