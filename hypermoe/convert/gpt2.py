"""A whole GPT-2 language model around a converted HyperMoE stack (kind "model"): embeddings, attention, norms,
dense MLPs and the head, shared by the official GPT-2 conversion and GPT-2 upcycling.

Axis legend: d model width, V vocabulary, P positions."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hypermoe.convert.common import (
    Converted, GPT2_KNOWN_UNUSED, KINDS, WHOLE_LM, anchor, block_count, check_official, finish, linear_t,
)
from ref.config import HyperMoEConfig

def resolve_kind(state: Mapping[str, np.ndarray], prefix: str, kind: str) -> str:
    """"model" or "stack": `kind`, or for "auto" "model" exactly when the checkpoint holds WHOLE_LM."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "model" if all(prefix + name in state for name in WHOLE_LM) else "stack"


def check_heads(n_heads: int | None) -> None:
    if n_heads is None:
        raise ValueError("a whole GPT-2 model needs its number of attention heads, which the checkpoint does not "
                         "store: pass --heads H (n_heads; GPT-2 small 12, medium 16, large 20, xl 25), or "
                         "--kind stack for the HyperMoE layers alone")


def check_eps(layer_norm_eps: float | None) -> None:
    if layer_norm_eps is None:
        raise ValueError("a whole GPT-2 model needs its LayerNorm eps, which the checkpoint does not store: pass "
                         "--layer-norm-eps EPS (GPT-2's layer_norm_epsilon: 1e-5), or convert the checkpoint folder "
                         "whose config.json states it")


def gpt2_body(prefix: str, cfg: HyperMoEConfig, n_blocks: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{official name: (our name, shape)} of a GPT-2 model outside its HyperMoE layers, all taken as is: the
    embeddings are (rows, d) tables in both, LayerNorms are (d) vectors, and Conv1D weights are already x @ W
    (c_attn's columns are q | k | v, which is how GPT-2 splits them and ref.model reads them)."""
    d, f, V, P = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    body = {prefix + "wte.weight": ("token_embed", (V, d)), prefix + "wpe.weight": ("pos_embed", (P, d)),
            prefix + "ln_f.weight": ("ln_f.weight", (d,)), prefix + "ln_f.bias": ("ln_f.bias", (d,))}
    for i in range(n_blocks):
        h, b = f"{prefix}h.{i}.", f"blocks.{i}."
        body.update({
            h + "ln_1.weight": (b + "ln1.weight", (d,)), h + "ln_1.bias": (b + "ln1.bias", (d,)),
            h + "attn.c_attn.weight": (b + "attn.qkv.weight", (d, 3 * d)),
            h + "attn.c_attn.bias": (b + "attn.qkv.bias", (3 * d,)),
            h + "attn.c_proj.weight": (b + "attn.proj.weight", (d, d)),
            h + "attn.c_proj.bias": (b + "attn.proj.bias", (d,)),
            h + "ln_2.weight": (b + "ln2.weight", (d,)), h + "ln_2.bias": (b + "ln2.bias", (d,)),
        })
        if not cfg.is_moe_block(i):  # a block left dense keeps GPT-2's MLP (biases: cfg.expert_bias is True)
            body.update({h + "mlp.c_fc.weight": (b + "mlp.w1", (d, f)), h + "mlp.c_fc.bias": (b + "mlp.b1", (f,)),
                         h + "mlp.c_proj.weight": (b + "mlp.w2", (f, d)), h + "mlp.c_proj.bias": (b + "mlp.b2", (d,))})
    return body


def as_model(state: Mapping[str, np.ndarray], prefix: str, stack: Converted, *, n_heads: int,
             layer_norm_eps: float | None, dtype, tie: bool | None = None) -> Converted:
    """The whole GPT2LMHeadModel around `stack` (its converted HyperMoE layers and hypernetwork), kind "model":
    embeddings, every block's ln_1 / attention / ln_2, the MLPs of blocks left dense, ln_f (gpt2_body), and
    the LM head: tied when `lm_head.weight` is absent or equal to wte (GPT-2), else lm_head.weight = its
    transpose. Every tensor of the checkpoint is converted or reported unused with the reason; any other is
    an error. The checkpoint stores neither n_heads nor the LayerNorm eps (GPT-2: layer_norm_epsilon 1e-5; None:
    unknown, an error). tie (config.json's tie_word_embeddings): True demands a head that is absent or equal to wte,
    False keeps lm_head.weight untied even where it equals wte; None decides from the tensors as above."""
    check_heads(n_heads)
    check_eps(layer_norm_eps)
    cfg = stack.config
    V, d = anchor(state, prefix + "wte.weight", 2)
    P, _ = anchor(state, prefix + "wpe.weight", 2)
    if d != cfg.d_model:
        raise ValueError(f"official tensor {prefix + 'wte.weight'!r} has shape {(V, d)}: width {d}, but the HyperMoE "
                         f"layers have d = {cfg.d_model}")
    n_blocks = block_count(state, prefix, "h")
    if n_blocks != cfg.n_layers:  # the official table has num_hidden_layers rows, one per block; a stack may have
        # more rows than blocks (HyperMoE in block 1 of blocks 0, 1 with a 3-row table), a model may not
        raise ValueError(f"the model has {n_blocks} blocks but the hypernetwork's layer-embedding table has "
                         f"{cfg.n_layers} rows: a model directory needs one row per block")
    head = prefix.removesuffix("transformer.") + "lm_head.weight"  # GPT2LMHeadModel: lm_head beside transformer.
    tied = head not in state or np.array_equal(state[head], state[prefix + "wte.weight"])
    if tie is not None and tie != tied:
        raise ValueError(f"config.json's tie_word_embeddings = {str(tie).lower()}, but the checkpoint's {head} is "
                         + ("present and differs from wte (untied)" if tie else "absent (tied)"))
    if tie is False:
        tied = False
    cfg = cfg.replace(vocab_size=V, max_seq_len=P, n_heads=n_heads, layer_norm_eps=layer_norm_eps, tie_embeddings=tied)
    body = gpt2_body(prefix, cfg, n_blocks)
    check_official(state, {name: shape for name, (_, shape) in body.items()})
    params = {ours: np.asarray(state[name]) for name, (ours, _) in body.items()}
    if not tied:
        check_official(state, {head: (V, d)})
        params["lm_head.weight"] = linear_t(state, head)  # nn.Linear (V, d) → (d, V)
    for name, value in stack.params.items():  # layers.{ℓ}.X → blocks.{ℓ}.moe.X; hyper.* as is
        if name.startswith("layers."):
            layer, rest = name[len("layers."):].split(".", 1)
            name = f"blocks.{layer}.moe.{rest}"
        params[name] = value

    unused = {key: why for key, why in stack.unused.items() if key not in body}  # a dense block's MLP is used now
    if tied and head in state:
        unused[head] = f"the LM head, equal to {prefix}wte.weight: tied (GPT-2), the model reuses token_embed"
    unknown = []
    for key in stack.ignored:
        if key in body or key == head:
            continue
        reason = next((why for pat, why in GPT2_KNOWN_UNUSED
                       if key.startswith(prefix) and pat.fullmatch(key[len(prefix):])), None)
        if reason is None:
            unknown.append(key)
        else:
            unused[key] = reason
    if unknown:
        raise ValueError(f"unexpected tensor(s) in a whole GPT-2 model (not part of GPT2LMHeadModel's layout, refusing "
                         f"to drop them): {', '.join(sorted(unknown)[:10])}; --kind stack converts the HyperMoE "
                         "layers alone")
    return Converted(cfg, finish(cfg, params, dtype, "model"), unused, [], "model")
