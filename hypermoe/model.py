"""A small decoder-only HyperMoE transformer in PyTorch (SPEC.md §4; the NumPy reference is ref/model.py).

GPT-2-style pre-LayerNorm blocks; the FFN of block ℓ is a HyperMoE layer where cfg.is_moe_block(ℓ), else
a dense MLP of width d_ff. One HyperNetwork is shared by all HyperMoE blocks and owned here, once, as
`self.hyper`; block ℓ asks it for layer embedding ℓ (the absolute block index, as the official Switch code).

    h = token_embed[tokens] + pos_embed[position_ids]
    for each block ℓ:  h ← h + dropout(attn_ℓ(ln1_ℓ(h), mask, past_ℓ))
                       h ← h + dropout(ffn_ℓ(ln2_ℓ(h)))
    logits = ln_f(h) @ token_embed.T   (tie_embeddings)   or   ln_f(h) @ lm_head

Parameter names and layouts (x @ W, W: (in, out)) are exactly ref.model.model_param_shapes', so that
`state_dict()` and ref's parameter mapping are the same dictionary up to array type. The blocks (attention_bias,
CausalSelfAttention, DenseMLP, Block) live in hypermoe/blocks.py and are re-exported here.

Incremental decoding (SPEC.md §4.1): forward(..., past_key_values, use_cache=True) runs S new tokens after P
cached positions and returns the keys and values of all P + S (Optimum's layout); it must equal one pass over the
whole sequence, which is the reference's definition. TorchDecoder (hypermoe/decoding.py, re-exported here) drives
it from hypermoe.generation.generate.

Axis legend: B sequences, S new positions, P cached positions (max_seq_len in pos_embed's shape), d model width,
H heads, c = d / H head width, V vocabulary, f = d_ff hidden width.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

import ref.io
from ref.config import HyperMoEConfig
from ref.model import model_init_std, model_param_shapes
from ref.semantics import check_params
from hypermoe.blocks import Block, CausalSelfAttention, DenseMLP, attention_bias  # noqa: F401 (re-exported)
from hypermoe.decoding import TorchDecoder
from hypermoe.generation import Sampling, generate
from hypermoe.layer import HyperNetwork, Routing, check_memory, params_to_ref

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


KeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # one (key, value) per block, each (B, H, P, c)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, S, V); (B, min(n, S), V) with logits_to_keep = n > 0
    aux: dict[str, torch.Tensor]  # switch_balance, z_loss, cv_balance: scalars summed over the HyperMoE blocks
    routing: dict[int, Routing]  # block ℓ → its routing of the S tokens (selected, gates, probs, logits, kept)
    past_key_values: KeyValues | None = None  # use_cache: every block's keys and values of all P + S positions


def check_logits_to_keep(n) -> int:
    """n as an int, after a one-line error unless it is an int ≥ 0 (transformers' logits_to_keep, int form)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"logits_to_keep must be an int ≥ 0 (0 = all positions, n = the last n), got {n!r}")
    return int(n)


class LMHead(nn.Module):
    """logits = x @ weight, weight (d, V): the untied output projection (no bias, like GPT-2's head)."""

    def __init__(self, d: int, V: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, V, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"d={self.weight.shape[0]}, vocab_size={self.weight.shape[1]}"


class HyperMoETransformer(nn.Module):
    r"""Decoder-only transformer with HyperMoE FFNs sharing one hypernetwork.

    Shape:
        - tokens: (B, S) integer ids in [0, vocab_size), 1 ≤ S, P + S ≤ max_seq_len
        - attention_mask: (B, P + S) 0/1; position_ids: (B, S) in [0, max_seq_len)
        - past_key_values: n_layers × (key, value), each (B, H, P, c)
        - logits_to_keep: 0 (all S positions' logits) or n > 0 (the last min(n, S) positions')
        - output: ModelOutput(logits (B, S, V), aux {name: scalar} summed over the HyperMoE blocks,
          routing {block ℓ: routing of the S tokens}, past_key_values (each (B, H, P + S, c)) if use_cache)

    Example::

        >>> from ref import tiny_config
        >>> model = HyperMoETransformer(tiny_config()).eval()
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 32])
        >>> out = model(torch.tensor([[1, 2, 3]]), use_cache=True)  # prefill, then one token with the cache
        >>> model(torch.tensor([[4]]), past_key_values=out.past_key_values).logits.shape
        torch.Size([1, 1, 32])
        >>> model.generate(torch.tensor([[0, 1, 2], [0, 0, 5]]), 4,
        ...                attention_mask=torch.tensor([[1, 1, 1], [0, 0, 1]])).shape  # a left-padded batch
        torch.Size([2, 7])
    """

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        model_param_shapes(config)  # ValueError for a config no model can have (ref.model.check_model)
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
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host synchronisation
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={c.vocab_size}), got values in [{lo}, {hi}]")

    def check_past(self, past_key_values, B: int) -> int:
        """The past length P of a KV cache: n_layers (key, value) pairs, each (B, H, P, c) in the model's dtype and
        device, one P for all."""
        c = self.config
        if not isinstance(past_key_values, (tuple, list)):
            raise ValueError(f"past_key_values must be a tuple of (key, value) pairs, "
                             f"got {type(past_key_values).__name__}")
        if len(past_key_values) != c.n_layers:
            raise ValueError(f"past_key_values must be {c.n_layers} (key, value) pairs, one per block, "
                             f"got {len(past_key_values)}")
        P = None
        for i, pair in enumerate(past_key_values):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"past_key_values[{i}] must be a (key, value) pair")
            for name, t in zip(("key", "value"), pair):
                if P is None and isinstance(t, torch.Tensor) and t.dim() == 4:
                    P = t.shape[2]  # the first tensor's length; every other must match it
                want = (B, c.n_heads, P, c.d_model // c.n_heads)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                    raise ValueError(f"past_key_values[{i}] {name} must have shape (B, H, P, c) = {want}, "
                                     f"got {tuple(getattr(t, 'shape', ()))}")
                if t.dtype != self.token_embed.dtype or t.device != self.token_embed.device:
                    raise ValueError(f"past_key_values[{i}] {name} is {t.dtype} on {t.device}, the model "
                                     f"{self.token_embed.dtype} on {self.token_embed.device}")
        return P

    def forward(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: KeyValues | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, aux: bool = True) -> ModelOutput:
        """tokens (B, S): S new tokens after the P cached positions of past_key_values (P = 0 without).

        attention_mask (B, P + S), 1 = real token, 0 = padding (Hugging Face's convention; default all 1);
        position_ids (B, S) (default: a real token's position is the number of real tokens before it in its row,
        a padding token's 0, so a left-padded prompt gets 0, 1, …; without a mask P + arange(S)), each
        < max_seq_len. use_cache: return every block's keys and values of the P + S positions as
        past_key_values, to pass to the next call with its tokens. P + S ≤ max_seq_len (learned positions: a
        longer context cannot be cropped, the cached keys hold their positions). A config with capacity counts
        tokens per sequence, so it refuses past_key_values and padding (SPEC.md §4.1). logits_to_keep
        (transformers' meaning): 0 = the logits of all S positions; n > 0 = only the last min(n, S), and ln_f and
        the head run only for those (generation needs the last one). aux=False: no auxiliary losses (ModelOutput.aux
        {}; inference needs none)."""
        self.check_tokens(tokens)
        logits_to_keep = check_logits_to_keep(logits_to_keep)
        c = self.config
        B, S = tokens.shape
        P = 0 if past_key_values is None else self.check_past(past_key_values, B)
        if P + S > c.max_seq_len:
            raise ValueError(f"context of {P} cached + {S} new positions exceeds config max_seq_len ({c.max_seq_len})")
        padded = attention_mask is not None and self._check_mask(attention_mask, B, P + S)  # a 0 in the mask
        if c.capacity is not None and (past_key_values is not None or padded):
            raise ValueError("a config with capacity refuses past_key_values and padding: capacity counts the tokens "
                             "of each sequence, which a cached step or padding changes (SPEC.md §4.1)")
        if position_ids is None:
            position_ids = self.default_positions(attention_mask, B, P, S, tokens.device)  # (B, S)
        self._check_positions(position_ids, B, S)
        bias = None  # no padding and no past: the is_causal fast path
        if padded or P > 0:
            if attention_mask is None:
                attention_mask = torch.ones(B, P + S, dtype=torch.int64, device=tokens.device)
            bias = attention_bias(attention_mask, S, self.token_embed.dtype)  # (B, 1, S, P + S)
        return self.forward_unchecked(tokens, position_ids, bias, past_key_values, use_cache=use_cache,
                                      logits_to_keep=logits_to_keep, aux=aux)

    def forward_unchecked(self, tokens: torch.Tensor, position_ids: torch.Tensor, bias: torch.Tensor | None,
                    past_key_values: KeyValues | None, *, use_cache: bool, logits_to_keep: int,
                    aux: bool) -> ModelOutput:
        """forward after its checks, for a caller that built and checked its inputs itself (TorchDecoder: no host
        synchronisation here): position_ids (B, S), bias (B, 1, S, P + S) from attention_bias or None (causal, no
        past), past_key_values the (key, value) tuples or one hypermoe.blocks.KVBuffer per block (written in place),
        logits_to_keep an int ≥ 0."""
        h = self.token_embed[tokens] + self.pos_embed[position_ids]  # (B, S, d)
        losses: dict[str, torch.Tensor] = {}
        routing: dict[int, Routing] = {}
        presents = []
        for i, block in enumerate(self.blocks):
            h, out, present = block(h, bias=bias, past=None if past_key_values is None else past_key_values[i],
                                    aux=aux)
            presents.append(present)
            if out is not None:
                routing[block.index] = out.routing
                losses = {name: losses.get(name, 0) + value for name, value in out.aux.items()}
        h = self.ln_f(h if logits_to_keep == 0 else h[:, -logits_to_keep:])  # (B, S', d), S' = S or min(n, S)
        head = self.token_embed.t() if self.lm_head is None else self.lm_head.weight  # (d, V)
        return ModelOutput(h @ head, losses, routing, tuple(presents) if use_cache else None)  # logits (B, S', V)

    @staticmethod
    def default_positions(attention_mask: torch.Tensor | None, B: int, P: int, S: int,
                          device=None) -> torch.Tensor:
        """The position ids (B, S) of the S new tokens: P + arange(S) without a mask; with one (B, P + S), a real
        token's position is the number of real tokens before it in its row, a padding token's 0
        (ref.model.default_positions over the whole row, its last S columns)."""
        if attention_mask is None:
            return (P + torch.arange(S, device=device)).expand(B, S)  # (B, S)
        real = attention_mask != 0  # (B, P + S)
        positions = torch.where(real, real.long().cumsum(-1) - 1, 0)  # (B, P + S)
        return positions[:, P:]  # (B, S)

    def _check_mask(self, attention_mask: torch.Tensor, B: int, L: int) -> bool:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise ValueError(f"attention_mask must be an integer or bool tensor, got dtype {attention_mask.dtype}")
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must have shape (B, P + S) = {(B, L)}, got {tuple(attention_mask.shape)}")
        if attention_mask.device != self.token_embed.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, the model's parameters on "
                             f"{self.token_embed.device}")
        binary, full = torch.stack([((attention_mask == 0) | (attention_mask == 1)).all(),
                                    attention_mask.all()]).tolist()  # one host synchronisation
        if not binary:
            raise ValueError("attention_mask values must be 0 (padding) or 1 (real token)")
        return not full  # padding

    def _check_positions(self, position_ids: torch.Tensor, B: int, S: int) -> None:
        P = self.config.max_seq_len
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point \
                or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise ValueError(f"position_ids must be an integer tensor, got "
                             f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
        if tuple(position_ids.shape) != (B, S):
            raise ValueError(f"position_ids must have shape (B, S) = {(B, S)}, got {tuple(position_ids.shape)}")
        lo, hi = torch.stack(torch.aminmax(position_ids)).tolist()  # one host synchronisation
        if lo < 0 or hi >= P:
            raise ValueError(f"position ids must be in [0, max_seq_len={P}), got values in [{lo}, {hi}]")

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True, sampling: Sampling | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> torch.Tensor:
        """Append up to max_new_tokens tokens to each row of tokens (B, S) → (B, S + new), by
        hypermoe.generation.generate with a TorchDecoder (greedy unless `sampling`; ties → the lowest id).

        attention_mask (B, S): left padding (zeros before each row's first real token), as generation.left_pad
        makes. A row stops after its first EOS (eos_token_id: one id or several); rows that stop early are filled
        with pad_token_id, and new = the longest row's count. S + max_new_tokens must be ≤ max_seq_len: learned
        positions cannot be cropped once keys are cached, so a longer context is refused. use_cache=False
        recomputes the whole history each step (the baseline; a config with capacity needs it and no padding).
        Runs in eval mode (no dropout), then restores the module's mode."""
        self.check_tokens(tokens)
        B, S = tokens.shape
        if attention_mask is None:
            prompts = tokens.tolist()
        else:
            self._check_mask(attention_mask, B, S)
            real = attention_mask != 0  # (B, S)
            if not bool(real[:, -1].all()) or bool((real[:, 1:] < real[:, :-1]).any()):
                raise ValueError("attention_mask must be left padding: each row 0 … 0 then 1 … 1, ending with a 1")
            prompts = [row[m].tolist() for row, m in zip(tokens, real)]
        eos = (() if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, (int, np.integer))
               else eos_token_id)  # generation.generate checks each id
        was_training = self.training
        self.eval()
        try:
            result = generate(TorchDecoder(self, use_cache=use_cache), prompts, max_new_tokens=max_new_tokens,
                              sampling=Sampling() if sampling is None else sampling, eos_token_ids=eos,
                              pad_token_id=pad_token_id, max_length=self.config.max_seq_len)
        finally:
            self.train(was_training)
        width = max(len(row) for row in result.tokens)
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in result.tokens],
                           dtype=tokens.dtype, device=tokens.device).reshape(B, width)  # (B, new)
        return torch.cat([tokens, new], dim=1)  # (B, S + new)

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


__all__ = ["HyperMoETransformer", "ModelOutput", "TorchDecoder", "attention_bias"]
