"""A small decoder-only HyperMoE transformer in PyTorch (SPEC.md §4; the NumPy reference is ref/model.py).

GPT-2-style pre-LayerNorm blocks; the FFN of block ℓ is a HyperMoE layer where cfg.is_moe_block(ℓ), else
a dense MLP of width d_ff. One HyperNetwork is shared by all HyperMoE blocks and owned here, once, as
`self.hyper`; block ℓ asks it for layer embedding ℓ (the absolute block index, as the official Switch code).

    h = token_embed[tokens] + pos_embed[:S]
    for each block ℓ:  h ← h + dropout(attn_ℓ(ln1_ℓ(h)));  h ← h + dropout(ffn_ℓ(ln2_ℓ(h)))
    logits = ln_f(h) @ token_embed.T   (tie_embeddings)   or   ln_f(h) @ lm_head

Parameter names and layouts (x @ W, W: (in, out)) are exactly ref.model.model_param_shapes', so that
`state_dict()` and ref's parameter mapping are the same dictionary up to array type.

Axis legend: B sequences, S positions, d model width, H heads, c = d / H head width, V vocabulary,
P = max_seq_len positions, f = d_ff hidden width.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ref.io
from ref.config import HyperMoEConfig
from ref.model import model_init_std, model_param_shapes
from ref.semantics import check_params
from hypermoe.layer import (
    HyperMoELayer, HyperMoEOutput, HyperNetwork, Linear, Routing, activation, check_memory, params_to_ref,
)

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, S, V)
    aux: dict[str, torch.Tensor]  # switch_balance, z_loss, cv_balance: scalars summed over the HyperMoE blocks
    routing: dict[int, Routing]  # block ℓ → that block's routing (selected, gates, probs, logits, kept)


class LMHead(nn.Module):
    """logits = x @ weight, weight (d, V): the untied output projection (no bias, like GPT-2's head)."""

    def __init__(self, d: int, V: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, V, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"d={self.weight.shape[0]}, vocab_size={self.weight.shape[1]}"


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, position t attends to positions ≤ t. qkv columns: q | k | v."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.dropout = config.n_heads, config.dropout
        self.qkv = Linear(d, 3 * d, device=device, dtype=dtype)
        self.proj = Linear(d, d, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape  # sequences, positions, model width
        H = self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 × (B, S, d)
        q, k, v = (t.view(B, S, H, d // H).transpose(1, 2) for t in (q, k, v))  # (B, H, S, c)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, H, S, c)
        return self.proj(out.transpose(1, 2).reshape(B, S, d))  # (B, S, d): heads side by side


class DenseMLP(nn.Module):
    """act(x W1 + b1) W2 + b2, the FFN of a block without HyperMoE (biases when cfg.expert_bias)."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        d, f = config.d_model, config.d_ff
        self.activation = config.activation
        self.w1 = nn.Parameter(torch.empty(d, f, device=device, dtype=dtype))
        self.b1 = nn.Parameter(torch.empty(f, device=device, dtype=dtype)) if config.expert_bias else None
        self.w2 = nn.Parameter(torch.empty(f, d, device=device, dtype=dtype))
        self.b2 = nn.Parameter(torch.empty(d, device=device, dtype=dtype)) if config.expert_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.w1  # (B, S, f)
        if self.b1 is not None:
            u = u + self.b1
        y = activation(self.activation, u) @ self.w2  # (B, S, d)
        return y if self.b2 is None else y + self.b2


class Block(nn.Module):
    """h ← h + dropout(attn(ln1(h))); h ← h + dropout(ffn(ln2(h))), ffn HyperMoE or dense."""

    def __init__(self, config: HyperMoEConfig, index: int, hyper: HyperNetwork | None, *, device=None, dtype=None) -> None:
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.index = index  # the layer embedding ℓ of its HyperMoE FFN
        self.ln1 = nn.LayerNorm(d, eps=eps, device=device, dtype=dtype)
        self.attn = CausalSelfAttention(config, device=device, dtype=dtype)
        self.ln2 = nn.LayerNorm(d, eps=eps, device=device, dtype=dtype)
        moe = config.is_moe_block(index)
        # the HyperMoE layer references the shared hypernetwork without registering it (state_dict: hyper.* once)
        self.moe = HyperMoELayer(config, hyper=hyper, device=device, dtype=dtype) if moe else None
        self.mlp = None if moe else DenseMLP(config, device=device, dtype=dtype)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, HyperMoEOutput | None]:
        """h (B, S, d) → (new h, the HyperMoE layer's output or None for a dense block)."""
        h = h + self.drop(self.attn(self.ln1(h)))
        x = self.ln2(h)  # (B, S, d)
        if self.moe is None:
            return h + self.drop(self.mlp(x)), None
        out = self.moe(x, self.index)  # layer embedding ℓ = the absolute block index
        return h + self.drop(out.output), out


class HyperMoETransformer(nn.Module):
    r"""Decoder-only transformer with HyperMoE FFNs sharing one hypernetwork.

    Shape:
        - tokens: (B, S) integer ids in [0, vocab_size), 1 ≤ S ≤ max_seq_len
        - output: ModelOutput(logits (B, S, V), aux {name: scalar} summed over the HyperMoE blocks,
          routing {block ℓ: routing of that block})

    Example::

        >>> model = HyperMoETransformer(tiny_config())
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 32])
    """

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        model_param_shapes(config)  # ValueError for a config without a HyperMoE block
        check_memory(config, "model", device=device, dtype=dtype, what="HyperMoETransformer")
        self.config = config
        d, V, P = config.d_model, config.vocab_size, config.max_seq_len
        self.token_embed = nn.Parameter(torch.empty(V, d, device=device, dtype=dtype))
        self.pos_embed = nn.Parameter(torch.empty(P, d, device=device, dtype=dtype))
        self.hyper = HyperNetwork(config, device=device, dtype=dtype) if config.hyper_expert else None
        self.blocks = nn.ModuleList(Block(config, i, self.hyper, device=device, dtype=dtype)
                                    for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.lm_head = None if config.tie_embeddings else LMHead(d, V, device=device, dtype=dtype)  # tied: token_embed
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, σ²) with ref.model.model_init_std for every matrix and bias (torch's global RNG);
        LayerNorms weight 1, bias 0; the HyperMoE layers and the hypernetwork reset themselves."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if ".moe." in name or name.startswith("hyper."):
                    continue
                if name.startswith("ln_f.") or ".ln1." in name or ".ln2." in name:
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    param.normal_(0.0, model_init_std(self.config, name, tuple(param.shape)))
        if self.hyper is not None:
            self.hyper.reset_parameters()
        for block in self.blocks:
            if block.moe is not None:
                block.moe.reset_parameters()  # leaves the shared hypernetwork to us

    def extra_repr(self) -> str:
        c = self.config
        moe = [i for i in range(c.n_layers) if c.is_moe_block(i)]
        return (f"vocab_size={c.vocab_size}, d_model={c.d_model}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
                f"max_seq_len={c.max_seq_len}, moe_blocks={moe}, tie_embeddings={c.tie_embeddings}")

    def check_tokens(self, tokens: torch.Tensor) -> None:
        c = self.config
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.device != self.token_embed.device:
            raise ValueError(f"tokens are on {tokens.device}, the model's parameters on {self.token_embed.device}")
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (B, S) with B ≥ 1 and S ≥ 1, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > c.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds config max_seq_len ({c.max_seq_len})")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={c.vocab_size}), got values in [{lo}, {hi}]")

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        self.check_tokens(tokens)
        S = tokens.shape[1]
        h = self.token_embed[tokens] + self.pos_embed[:S]  # (B, S, d)
        aux: dict[str, torch.Tensor] = {}
        routing: dict[int, Routing] = {}
        for block in self.blocks:
            h, out = block(h)
            if out is not None:
                routing[block.index] = out.routing
                aux = {name: aux.get(name, 0) + value for name, value in out.aux.items()}
        h = self.ln_f(h)  # (B, S, d)
        head = self.token_embed.t() if self.lm_head is None else self.lm_head.weight  # (d, V)
        return ModelOutput(h @ head, aux, routing)  # logits (B, S, V)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: append the most likely next token `max_new_tokens` times → (B, S + new).
        The context is cropped to the last max_seq_len tokens. Runs in eval mode (no dropout)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int ≥ 0, got {max_new_tokens!r}")
        self.check_tokens(tokens)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(tokens[:, -self.config.max_seq_len:]).logits  # (B, S', V)
                # ties → the lower id, as torch.argmax's first-occurrence rule
                tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True).to(tokens.dtype)], dim=1)
        finally:
            self.train(was_training)
        return tokens

    # --- reference parameters and saved directories (config.json + weights.npz, kind "model") ---

    def load_ref(self, params: Mapping[str, np.ndarray]) -> HyperMoETransformer:
        """Copy a ref parameter mapping in (every name, shape and the common dtype checked; cast to this
        model's dtype). The way back is hypermoe.layer.params_to_ref(model): the state_dict keys are the ref names."""
        arrays = {name: np.asarray(v) for name, v in params.items()}
        dtypes = {v.dtype for v in arrays.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _TORCH_DTYPES:
            raise ValueError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
        check_params(arrays, model_param_shapes(self.config), next(iter(dtypes)))
        state = self.state_dict()  # tensors sharing the parameters' storage
        if set(state) != set(arrays):  # a module registered the shared hypernetwork again, or a name drifted
            raise RuntimeError(f"state_dict keys differ from ref names: {sorted(set(state) ^ set(arrays))}")
        with torch.no_grad():
            for name, value in arrays.items():
                state[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        return self

    @classmethod
    def from_ref(cls, config: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None,
                 dtype=None) -> HyperMoETransformer:
        """A model holding ref parameters (dtype: theirs, float32 or float64, unless given)."""
        if dtype is None:
            dtype = _TORCH_DTYPES.get(np.asarray(next(iter(params.values()))).dtype, torch.float32) if params else None
        return cls(config, device=device, dtype=dtype).load_ref(params)

    def save_dir(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write config.json + weights.npz (kind "model") as `path` (16-bit parameters as float32) atomically; an
        existing non-empty `path` is refused unless `force` (ref.io.save_dir)."""
        return ref.io.save_dir(path, self.config, params_to_ref(self), "model", force=force)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, device=None, dtype=None) -> HyperMoETransformer:
        """Load a directory written by save_dir (or ref.io.save_dir, kind "model"); never unpickles."""
        config, params, kind = ref.io.load_dir(path)
        if kind != "model":
            raise ValueError(f"{Path(path) / ref.io.CONFIG_FILE}: kind is {kind!r}, HyperMoETransformer loads kind 'model'")
        return cls.from_ref(config, params, device=device, dtype=dtype)


__all__ = ["HyperMoETransformer", "ModelOutput"]
