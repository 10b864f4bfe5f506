"""The one configuration of hypermoe: a frozen, stdlib-only dataclass shared by ref/, hypermoe/,
export/ and conformance/. SPEC.md section 1 explains every field; defaults are the official HyperMoE
sizes (Zhao et al., ACL 2024, official code) with a GPT-2-sized layer.

`config.json` (how models are saved) is `config.to_json()`; `HyperMoEConfig.from_json` reads it back
and rejects unknown fields, so a typo in a hand-written file is an error, not a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

SPEC_VERSION = "1.1.0"  # version of SPEC.md; conformance cases and exported models carry it

GATES = ("topk", "switch")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


@dataclass(frozen=True)
class HyperMoEConfig:
    # --- one HyperMoE layer ---
    d_model: int = 768  # d: token width (GPT-2 small)
    d_ff: int = 3072  # f: hidden width of each expert FFN (4·d, GPT-2)
    n_experts: int = 8  # N: experts per layer (official: 8)
    top_k: int = 1  # k: experts selected per token, 1 ≤ k ≤ N (official: 1)
    gate: str = "topk"  # "topk": softmax → top-k → renormalise; "switch": top-1, gate = probability
    capacity: int | None = None  # C: max tokens per expert per sequence ("switch" only); None = no limit
    expert_bias: bool = True  # experts have biases b1, b2 (GPT-2 experts do, Switch experts do not)
    activation: str = "gelu_tanh"  # expert activation: relu | gelu (erf) | gelu_tanh (GPT-2) | silu
    router_bias: bool = False  # router has a bias b_r (the official routers have none)
    noisy_gating: bool = False  # training-only noisy top-k gating (GPT-2 variant); adds router.noise_weight
    router_jitter: float = 0.0  # ε of training-only multiplicative router-input jitter U[1-ε, 1+ε] (Switch)
    hyper_expert: bool = True  # False drops the HyperExpert: a plain MoE layer (for ablations, benchmarks)
    # --- hypernetwork (official sizes) ---
    d_expert_embed: int = 128  # d_e: width of each expert's embedding
    d_process: int = 128  # d_p: hidden width of the embedding-process MLP
    d_hyper: int = 128  # d_h: width of the processed selection embedding z
    d_layer_embed: int = 10  # d_l: width of the layer embedding
    d_generator: int = 128  # d_g: width of the generator trunk r
    d_adapter: int = 64  # a: HyperExpert (adapter) bottleneck width
    n_layers: int = 1  # L: layers sharing one hypernetwork = rows of the layer-embedding table
    # --- the small transformer model (hypermoe.model); ignored by a lone layer ---
    vocab_size: int = 256  # byte-level vocabulary by default
    n_heads: int = 12  # attention heads; must divide d_model (checked where a model is built: ref.model.check_model)
    max_seq_len: int = 1024  # learned positions
    moe_every: int = 1  # block ℓ is HyperMoE when ℓ % moe_every == moe_every - 1 (2: odd blocks, Switch)
    tie_embeddings: bool = True  # output projection = token embedding (GPT-2)
    dropout: float = 0.0  # residual/attention dropout of the model blocks (training only)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        positive = (
            "d_model d_ff n_experts top_k d_expert_embed d_process d_hyper d_layer_embed "
            "d_generator d_adapter n_layers vocab_size n_heads max_seq_len moe_every"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"config field {name!r} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"config field {name!r} must be ≥ 1, got {value}")
        for name in ("expert_bias", "router_bias", "noisy_gating", "hyper_expert", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config field {name!r} must be a bool, got {getattr(self, name)!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"config field 'top_k' ({self.top_k}) must be ≤ n_experts ({self.n_experts})")
        if self.gate not in GATES:
            raise ValueError(f"config field 'gate' must be one of {GATES}, got {self.gate!r}")
        if self.gate == "switch" and self.top_k != 1:
            raise ValueError(f"config field 'top_k' must be 1 with gate='switch', got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"config field 'activation' must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.capacity is not None:
            if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
                raise ValueError(f"config field 'capacity' must be None or an int ≥ 1, got {self.capacity!r}")
            if self.gate != "switch":
                raise ValueError("config field 'capacity' is only supported with gate='switch' (SPEC.md §3.4)")
        for name in ("router_jitter", "dropout", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config field {name!r} must be a number, got {value!r}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"config field 'router_jitter' must be in [0, 1), got {self.router_jitter}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config field 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config field 'layer_norm_eps' must be > 0, got {self.layer_norm_eps}")

    # --- derived quantities ---
    def is_moe_block(self, block: int) -> bool:
        """Whether transformer block `block` (0-based) has a HyperMoE FFN (else a dense MLP)."""
        return block % self.moe_every == self.moe_every - 1

    def replace(self, **changes: Any) -> HyperMoEConfig:
        return dataclasses.replace(self, **changes)

    # --- config.json ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps({"spec_version": SPEC_VERSION, **self.to_dict()}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperMoEConfig:
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        data.pop("spec_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HyperMoEConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)


def tiny_config(**changes: Any) -> HyperMoEConfig:
    """A small config for tests and examples (d = 16, f = 32, N = 4, k = 2, hypernet widths 8)."""
    base = dict(
        d_model=16, d_ff=32, n_experts=4, top_k=2, d_expert_embed=8, d_process=8, d_hyper=8,
        d_layer_embed=4, d_generator=8, d_adapter=4, n_layers=2, n_heads=2, max_seq_len=32, vocab_size=32,
    )
    base.update(changes)
    return HyperMoEConfig(**base)


__all__ = ["HyperMoEConfig", "SPEC_VERSION", "GATES", "ACTIVATIONS", "tiny_config"]
