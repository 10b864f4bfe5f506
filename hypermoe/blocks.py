"""The blocks of hypermoe.model's transformer: the attention bias, causal self-attention with its KV past, the dense
MLP, and the pre-LayerNorm block whose FFN is a HyperMoE layer or the dense MLP (SPEC.md §4, §4.1; the NumPy
reference is ref/model.py).

Axis legend: B sequences, S new positions, P cached positions, d model width, H heads, c = d / H head width,
f = d_ff hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ref.config import HyperMoEConfig
from hypermoe.layer import HyperMoELayer, HyperMoEOutput, HyperNetwork, Linear, activation


def attention_bias(attention_mask: torch.Tensor, S: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention bias of S new queries over P + S keys (the past P, then the S new ones):
    0.0 where key j is visible to query i (j ≤ P + i: causal, and attention_mask[b, j] ≠ 0: a real token; and
    j = P + i: every query sees itself), torch.finfo(dtype).min elsewhere (Hugging Face's convention). The
    diagonal keeps a left-padding query's row from being all-masked: its output (meaningless, never used) is
    finite in every dtype, even in float16 where finfo.min plus a negative score rounds to −inf, so no NaN
    reaches a real token through a padding key or value (ref.model.attention_bias, SPEC.md §4.1).

    attention_mask (B, P + S) int or bool, 1 = real token, 0 = padding → bias (B, 1, S, P + S), broadcast over
    the heads. Tensor ops only, every size from the inputs: torch.export traces it with dynamic B, S and P
    (P may be 0 at run time)."""
    L = attention_mask.shape[1]  # P + S keys
    device = attention_mask.device
    query_pos = torch.arange(S, device=device) + (L - S)  # (S,): query i sits at key position P + i
    key_pos = torch.arange(L, device=device)  # (P + S,)
    causal = key_pos[None, :] <= query_pos[:, None]  # (S, P + S)
    itself = key_pos[None, :] == query_pos[:, None]  # (S, P + S)
    visible = causal[None] & (attention_mask != 0)[:, None, :] | itself[None]  # (B, S, P + S)
    zero = torch.zeros((), dtype=dtype, device=device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(visible, zero, hidden)[:, None]  # (B, 1, S, P + S)


class KVBuffer:
    """One block's KV cache preallocated for a whole generation (hypermoe.decoding.TorchDecoder): key and value
    (B, H, max_length, c), the first `length` positions filled. As `past` of CausalSelfAttention it takes the S
    new positions in place and gives views of the P + S filled ones, so a step copies S positions, not P + S (the
    tuple past is concatenated: a copy of the whole cache per step, 2.3× the attention's time at B 8, P 1024)."""

    def __init__(self, B: int, H: int, max_length: int, c: int, *, device=None, dtype=None) -> None:
        self.key = torch.empty(B, H, max_length, c, device=device, dtype=dtype)  # (B, H, max_length, c)
        self.value = torch.empty(B, H, max_length, c, device=device, dtype=dtype)
        self.length = 0  # P

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value (B, H, S, c) written at positions P … P + S - 1 → the (key, value) views (B, H, P + S, c)."""
        P, S = self.length, key.shape[2]
        if P + S > self.key.shape[2]:
            raise ValueError(f"{P} cached + {S} new positions exceed the KV buffer's {self.key.shape[2]}")
        self.key[:, :, P:P + S] = key
        self.value[:, :, P:P + S] = value
        self.length = P + S
        return self.key[:, :, :P + S], self.value[:, :, :P + S]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, position t attends to positions ≤ t. qkv columns: q | k | v.

    forward(x (B, S, d), *, bias (B, 1, S, P + S) | None, past (key, value) each (B, H, P, c) | KVBuffer | None)
    → (out (B, S, d), present (key, value) each (B, H, P + S, c) = past then the S new ones along dim 2,
    Optimum's layout; views of a KVBuffer past). No bias: causal over past and new keys (is_causal fast path when
    there is no past)."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads, self.dropout = config.n_heads, config.dropout
        self.qkv = Linear(d, 3 * d, device=device, dtype=dtype)
        self.proj = Linear(d, d, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | KVBuffer | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, S, d = x.shape  # sequences, new positions, model width
        H = self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 × (B, S, d)
        q, k, v = (t.view(B, S, H, d // H).transpose(1, 2) for t in (q, k, v))  # (B, H, S, c)
        if isinstance(past, KVBuffer):
            k, v = past.append(k, v)  # (B, H, P + S, c), the past not copied
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P + S, c)
        if bias is None and k.shape[2] > S:  # causal with P > 0 past positions in front (P = 0: is_causal below)
            bias = attention_bias(torch.ones(B, k.shape[2], dtype=torch.int64, device=x.device), S, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, H, S, c)
        elif torch.compiler.is_exporting():
            # the same softmax(q kᵀ / √c + bias) v, spelt out for the ONNX graph: the exporter's SDPA decomposition
            # materialises kᵀ and scales the whole cache every step (a Transpose and a Mul over (B, H, P + S, c));
            # here the scale goes on q (S rows) and the Transpose feeds the MatMul directly, which onnxruntime fuses
            # into one FusedMatMul(transB) that reads the cache in place (BENCHMARKS.md, "Generation")
            scores = (q * (1.0 / math.sqrt(d // H))) @ k.transpose(-2, -1) + bias  # (B, H, S, P + S)
            out = torch.softmax(scores, dim=-1) @ v  # (B, H, S, c)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, H, S, c)
        return self.proj(out.transpose(1, 2).reshape(B, S, d)), (k, v)  # (B, S, d): heads side by side


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

    def forward(self, h: torch.Tensor, *, bias: torch.Tensor | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, aux: bool = True,
                ) -> tuple[torch.Tensor, HyperMoEOutput | None, tuple[torch.Tensor, torch.Tensor]]:
        """h (B, S, d) → (new h, the HyperMoE layer's output or None for a dense block, present (key, value)
        each (B, H, P + S, c)); bias and past as CausalSelfAttention.forward; aux=False: the layer skips its
        auxiliary losses (inference)."""
        a, present = self.attn(self.ln1(h), bias=bias, past=past)  # (B, S, d)
        h = h + self.drop(a)
        x = self.ln2(h)  # (B, S, d)
        if self.moe is None:
            return h + self.drop(self.mlp(x)), None, present
        # layer embedding ℓ = the absolute block index; aux only when False (an expert-parallel layer takes no aux)
        out = self.moe(x, self.index) if aux else self.moe(x, self.index, aux=False)
        return h + self.drop(out.output), out, present


__all__ = ["Block", "CausalSelfAttention", "DenseMLP", "KVBuffer", "attention_bias"]
