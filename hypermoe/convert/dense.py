"""Upcycling a dense hypermoe model directory (`--from hypermoe-dense`: kind "model", n_experts 1, no HyperExpert, as
the cpu-small-dense preset trains it) to N experts per HyperMoE block, through upcycle.upcycle_."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import ref.io
import ref.model
from ref.config import HyperMoEConfig
from hypermoe.convert.common import Converted, finish
from hypermoe.convert.upcycle import upcycle_


def upcycle_dense_model(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, n_experts: int, top_k: int,
                        gate: str = "topk", hyper_expert: bool = True, seed: int = 0, dtype=np.float32) -> Converted:
    """A hypermoe model directory's dense model (kind "model", n_experts 1, no HyperExpert: the cpu-small-dense
    preset) → the same model with N experts per HyperMoE block, each a copy of the dense MLP (upcycle_); router,
    expert embeddings, process MLP and hypernetwork fresh from ref.init_model(cfg, seed) (the training init's
    distributions), W_up / b_up heads zero. Every other parameter (embeddings, attention, norms) is copied.
    With gate "topk" and k = 1 the upcycled model computes the dense logits exactly (every gate is 1); with k > 1
    up to rounding; with gate "switch" each FFN output starts scaled by the router probability p of its expert."""
    if cfg.n_experts != 1 or cfg.hyper_expert:
        raise ValueError(f"--from hypermoe-dense needs a dense model directory (n_experts 1, hyper_expert false), got "
                         f"n_experts {cfg.n_experts}, hyper_expert {cfg.hyper_expert}")
    new = cfg.replace(n_experts=n_experts, top_k=top_k, gate=gate, hyper_expert=hyper_expert)  # validates k, gate
    # float64; drawn for the HyperMoE config even for a plain MoE, so that both get the same router from one seed
    fresh = ref.model.init_model(new.replace(hyper_expert=True), seed=seed)
    fresh = {name: fresh[name] for name in ref.io.expected_shapes(new, "model")}
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]
    experts = {f"blocks.{i}.moe.experts.{w}" for i in moe for w in ("w1", "b1", "w2", "b2")}
    out = {name: (np.asarray(params[name]) if name in params and name not in experts and ".moe.router." not in name
                  else value) for name, value in fresh.items()}
    upcycle_(out, {name: np.asarray(params[name])[0] for name in experts}, n_experts)
    return Converted(new, finish(new, out, dtype, kind="model"), {}, [], kind="model")
