"""The reference decoder-only HyperMoE transformer in pure NumPy (SPEC.md §4): GPT-2-style pre-LayerNorm
blocks whose FFN is a HyperMoE layer (ref.semantics.layer) where cfg.is_moe_block(ℓ), else a dense MLP;
one hypernetwork shared by all HyperMoE blocks, block ℓ using layer embedding ℓ (the absolute block
index, as the official Switch code). Inference only: no dropout, no jitter, no gate noise.

    h = token_embed[tokens] + pos_embed[position_ids]
    for each block ℓ:  h ← h + attn_ℓ(ln1_ℓ(h), mask);  h ← h + ffn_ℓ(ln2_ℓ(h))
    logits = ln_f(h) @ token_embed.T   (tie_embeddings)   or   ln_f(h) @ lm_head

Padding and positions (SPEC.md §4.1): attention_mask (B, S), 1 = real token, 0 = padding (Hugging Face's
convention); a real token's default position is the number of real tokens before it in its row (so a
left-padded prompt gets positions 0, 1, …), a padding token's 0. The reference has no KV cache: a pass over
the whole sequence is the definition that incremental decoding with a cache must reproduce.

Axis legend: B sequences, S positions, d model width, H heads, c = d / H head width, V vocabulary,
P = max_seq_len positions, f = d_ff dense/expert hidden width; the HyperMoE letters are ref.semantics'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ref.config import HyperMoEConfig
from ref.params import check_params, hyper_param_shapes, init_std, layer_param_shapes
from ref.semantics import LayerResult, activation, layer, softmax


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def moe_blocks(cfg: HyperMoEConfig) -> list[int]:
    """The blocks ℓ < n_layers with a HyperMoE FFN (cfg.is_moe_block); the others have a dense MLP."""
    return [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]


def check_model(cfg: HyperMoEConfig) -> None:
    """The rules only a model's fields obey (SPEC.md §1): n_heads divides d_model, and at least one HyperMoE
    block (with moe_every > n_layers it would be a plain transformer with an unused hypernetwork). A lone
    layer or stack ignores these fields, so HyperMoEConfig itself does not check them."""
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"config field 'n_heads' ({cfg.n_heads}) must divide d_model ({cfg.d_model})")
    if not moe_blocks(cfg):
        raise ValueError(f"config field 'moe_every' ({cfg.moe_every}) exceeds n_layers ({cfg.n_layers}): "
                         "the model would have no HyperMoE block")


def model_param_shapes(cfg: HyperMoEConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model, x @ W layout (W: (in, out)), after check_model (every model built, loaded,
    saved or exported passes here)."""
    check_model(cfg)
    d, f, V, P = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    shapes: dict[str, tuple[int, ...]] = {"token_embed": (V, d), "pos_embed": (P, d)}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "ln1.weight": (d,), b + "ln1.bias": (d,),
            b + "attn.qkv.weight": (d, 3 * d), b + "attn.qkv.bias": (3 * d,),  # columns: q | k | v
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ln2.weight": (d,), b + "ln2.bias": (d,),
        })
        if cfg.is_moe_block(i):
            shapes.update({b + "moe." + name: s for name, s in layer_param_shapes(cfg).items()})
        else:  # dense MLP: like one expert, biases when cfg.expert_bias
            shapes[b + "mlp.w1"] = (d, f)
            if cfg.expert_bias:
                shapes[b + "mlp.b1"] = (f,)
            shapes[b + "mlp.w2"] = (f, d)
            if cfg.expert_bias:
                shapes[b + "mlp.b2"] = (d,)
    shapes.update(hyper_param_shapes(cfg))  # hyper.*: one hypernetwork, n_layers rows of layer_embed
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (d, V)
    return shapes


def block_moe_params(params: Mapping[str, np.ndarray], block: int) -> dict[str, np.ndarray]:
    """The standalone-layer view (ref.params.param_shapes names) of block `block`'s HyperMoE FFN."""
    prefix = f"blocks.{block}.moe."
    view = {name[len(prefix):]: v for name, v in params.items() if name.startswith(prefix)}
    view.update({name: v for name, v in params.items() if name.startswith("hyper.")})
    return view


def model_init_std(cfg: HyperMoEConfig, name: str, shape: tuple[int, ...]) -> float:
    """σ of each non-LayerNorm parameter: O(1) activations everywhere (x @ W with W ~ N(0, 1/fan_in)),
    so that attention is neither uniform nor saturated and (tied) logits start O(1). The HyperMoE and
    hypernetwork parameters keep ref.params.init_std."""
    d = cfg.d_model
    if ".moe." in name:
        return init_std(cfg, "layers.0." + name.split(".moe.", 1)[1], shape)
    if name.startswith("hyper."):
        return init_std(cfg, name, shape)
    if name in ("token_embed", "pos_embed"):
        return 1.0 / math.sqrt(d)
    if name.endswith(("bias", "b1", "b2")):
        return 0.1
    if name.endswith("mlp.w1") and cfg.activation == "relu":
        return math.sqrt(2.0 / shape[0])
    return 1.0 / math.sqrt(shape[0])  # qkv, proj, mlp, lm_head: fan_in = rows


def init_model(cfg: HyperMoEConfig, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Deterministic parameters in (cfg, seed): every name in sorted order from one
    np.random.default_rng(seed) stream (float64, then cast to `dtype`). LayerNorm weights are
    1 + N(0, 0.1²) and biases N(0, 0.1²), not 1 and 0, so that a test would notice a swapped or
    ignored LayerNorm."""
    shapes = model_param_shapes(cfg)
    rng = np.random.default_rng(seed)
    params = {}
    for name in sorted(shapes):
        draw = rng.standard_normal(shapes[name])
        if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "ln_f.weight":
            value = 1.0 + 0.1 * draw
        elif name.endswith("ln1.bias") or name.endswith("ln2.bias") or name == "ln_f.bias":
            value = 0.1 * draw
        else:
            value = draw * model_init_std(cfg, name, shapes[name])
        params[name] = value.astype(dtype)
    return params


# ---------------------------------------------------------------------------------------------
# The pieces of a block
# ---------------------------------------------------------------------------------------------


def check_tokens(cfg: HyperMoEConfig, tokens: np.ndarray) -> None:
    if not isinstance(tokens, np.ndarray):
        raise ValueError(f"tokens must be a numpy array, got {type(tokens).__name__}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must have shape (B, S) with B ≥ 1 and S ≥ 1, got shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds config max_seq_len ({cfg.max_seq_len})")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), "
                         f"got values in [{tokens.min()}, {tokens.max()}]")


def check_attention_mask(cfg: HyperMoEConfig, tokens: np.ndarray, attention_mask: np.ndarray, past: int = 0) -> None:
    """attention_mask (B, P + S) of S new tokens after `past` = P cached positions (the reference has none; a
    cached decoder, export/generate.py's, checks its steps with this too)."""
    B, S = tokens.shape
    if not isinstance(attention_mask, np.ndarray):
        raise ValueError(f"attention_mask must be a numpy array, got {type(attention_mask).__name__}")
    if attention_mask.dtype.kind not in "iub":
        raise ValueError(f"attention_mask must be an integer or bool array, got dtype {attention_mask.dtype}")
    if attention_mask.shape != (B, past + S):
        raise ValueError(f"attention_mask must have shape (B, P + S) = {(B, past + S)} ({past} cached + {S} new "
                         f"positions), got {attention_mask.shape}")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask values must be 0 (padding) or 1 (real token)")
    if cfg.capacity is not None and not attention_mask.all():
        raise ValueError("a config with capacity refuses padding (attention_mask with zeros): capacity counts "
                         "the tokens of each sequence, padding included (SPEC.md §4.1)")


def default_positions(attention_mask: np.ndarray) -> np.ndarray:
    """attention_mask (B, S) → position_ids (B, S): a real token's position is the number of real tokens before it
    in its row (a left-padded prompt gets 0, 1, …), a padding token's 0."""
    real = attention_mask != 0  # (B, S)
    return np.where(real, np.cumsum(real, axis=-1) - 1, 0).astype(np.int64)  # (B, S)


def check_positions(cfg: HyperMoEConfig, tokens: np.ndarray, position_ids: np.ndarray) -> None:
    if not isinstance(position_ids, np.ndarray) or position_ids.dtype.kind not in "iu":
        raise ValueError(f"position_ids must be an integer numpy array, got "
                         f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if position_ids.shape != tokens.shape:
        raise ValueError(f"position_ids must have shape (B, S) = {tokens.shape}, got {position_ids.shape}")
    if position_ids.min() < 0 or position_ids.max() >= cfg.max_seq_len:
        raise ValueError(f"position ids must be in [0, max_seq_len={cfg.max_seq_len}), "
                         f"got values in [{position_ids.min()}, {position_ids.max()}]")


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) · weight + bias over the last axis; biased variance (torch's)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def attention_bias(attention_mask: np.ndarray, S: int, dtype) -> np.ndarray:
    """The additive bias of S queries over the P + S keys of attention_mask (B, P + S) (the last S are the
    queries' own): 0 where key j is visible to query i (j ≤ P + i and attention_mask[b, j] ≠ 0, or j = P + i:
    every query sees itself), else finfo(dtype).min, as Hugging Face. A padding query therefore sees at least
    itself: its row always has a finite score, so its (meaningless, unused) output is finite in every dtype,
    even where finfo.min plus a negative score rounds to −inf (float16), and no NaN can reach a real token
    through its key or value. A real query's own position is real, so the diagonal changes nothing for it.
    → (B, 1, S, P + S), broadcast over the heads."""
    L = attention_mask.shape[1]  # P + S keys
    key_pos, query_pos = np.arange(L)[None, :], np.arange(L - S, L)[:, None]  # (1, P + S), (S, 1)
    causal = key_pos <= query_pos  # (S, P + S): key j ≤ query position P + i
    visible = causal[None] & (attention_mask != 0)[:, None, :] | (key_pos == query_pos)[None]  # (B, S, P + S)
    return np.where(visible, 0.0, np.finfo(dtype).min).astype(dtype)[:, None]  # (B, 1, S, P + S)


def attention(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], block: int, x: np.ndarray,
              bias: np.ndarray | None = None) -> np.ndarray:
    """Multi-head self-attention softmax(q kᵀ / sqrt(c) + bias) v; bias (B, 1, S, S) from attention_bias,
    None = causal without padding (position t sees positions ≤ t)."""
    b = f"blocks.{block}.attn."
    B, S, d = x.shape  # sequences, positions, model width
    H = cfg.n_heads
    c = d // H  # head width
    if bias is None:
        bias = attention_bias(np.ones((B, S), dtype=np.int64), S, x.dtype)  # (B, 1, S, S)
    qkv = x @ params[b + "qkv.weight"] + params[b + "qkv.bias"]  # (B, S, 3d)
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(B, S, H, c).transpose(0, 2, 1, 3) for i in range(3))  # (B, H, S, c)
    # finfo.min + an O(1) score rounds to finfo.min: a hidden key gets weight exp(min - max) = 0 exactly
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(c) + bias  # (B, H, S, S)
    out = softmax(scores) @ v  # (B, H, S, c)
    out = out.transpose(0, 2, 1, 3).reshape(B, S, d)  # (B, S, d): heads side by side
    return out @ params[b + "proj.weight"] + params[b + "proj.bias"]  # (B, S, d)


def dense_mlp(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], block: int, x: np.ndarray) -> np.ndarray:
    """act(x W1 + b1) W2 + b2 → (B, S, d), the FFN of a block without HyperMoE."""
    b = f"blocks.{block}.mlp."
    u = x @ params[b + "w1"]  # (B, S, f)
    if cfg.expert_bias:
        u = u + params[b + "b1"]
    y = activation(cfg.activation, u) @ params[b + "w2"]  # (B, S, d)
    if cfg.expert_bias:
        y = y + params[b + "b2"]
    return y


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def forward(
    cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], tokens: np.ndarray,
    attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float], dict[int, LayerResult]]:
    """tokens (B, S) int → (logits (B, S, V), aux losses summed over the HyperMoE blocks,
    {block ℓ: its HyperMoE LayerResult}). The compute dtype is the parameters' (float32 or float64).

    attention_mask (B, S) 0/1, 1 = real token (default: all real); position_ids (B, S) in [0, max_seq_len)
    (default: default_positions(attention_mask), which is arange(S) without padding). Padding tokens are computed
    like the others (their outputs are meaningless, and they count in the aux losses); no real token sees them."""
    check_tokens(cfg, tokens)
    if attention_mask is not None:
        check_attention_mask(cfg, tokens, attention_mask)
    if position_ids is None:
        position_ids = default_positions(np.ones(tokens.shape, dtype=np.int64) if attention_mask is None
                                         else attention_mask)  # (B, S)
    check_positions(cfg, tokens, position_ids)
    if "token_embed" not in params:
        raise ValueError("missing parameter(s): token_embed")
    dtype = np.asarray(params["token_embed"]).dtype
    check_params(params, model_param_shapes(cfg), dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"parameters must be float32 or float64, got {dtype}")
    eps = cfg.layer_norm_eps
    bias = None if attention_mask is None else attention_bias(attention_mask, tokens.shape[1], dtype)  # (B, 1, S, S)
    h = params["token_embed"][tokens] + params["pos_embed"][position_ids]  # (B, S, d)
    aux = {"switch_balance": 0.0, "z_loss": 0.0, "cv_balance": 0.0}
    results: dict[int, LayerResult] = {}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        h = h + attention(cfg, params, i, layer_norm(h, params[b + "ln1.weight"], params[b + "ln1.bias"], eps), bias)
        x = layer_norm(h, params[b + "ln2.weight"], params[b + "ln2.bias"], eps)  # (B, S, d)
        if cfg.is_moe_block(i):
            result = layer(cfg, block_moe_params(params, i), x, layer_index=i)  # ℓ = absolute block index
            results[i] = result
            aux = {name: aux[name] + result.aux[name] for name in aux}
            h = h + result.output
        else:
            h = h + dense_mlp(cfg, params, i, x)
    out = layer_norm(h, params["ln_f.weight"], params["ln_f.bias"], eps)  # (B, S, d)
    head = params["token_embed"].T if cfg.tie_embeddings else params["lm_head.weight"]  # (d, V)
    return out @ head, aux, results  # (B, S, V)


__all__ = [
    "attention", "attention_bias", "block_moe_params", "check_attention_mask", "check_model", "check_positions", "check_tokens",
    "default_positions", "dense_mlp", "forward", "init_model", "layer_norm", "model_init_std", "model_param_shapes",
    "moe_blocks",
]
