"""The generation benchmark's backends (hypermoe/bench/generation.py): its models — a dense transformers
GPT2LMHeadModel (random, seeded) and the HyperMoE model upcycled from it by `hypermoe convert --from gpt2-mlp`'s
code —, the Decoder that drives transformers' model, and the with-past exports onnxruntime runs.

Why upcycled: every expert of a layer is a copy of the dense MLP and the HyperExpert's output heads start at zero
(hypermoe.convert.upcycle), so with top-1 routing and the "topk" gate (weight p/p = 1) the HyperMoE model computes
exactly the dense model's function: the two must draw the same tokens, which checks the whole run, while the
HyperMoE model still pays for routing, dispatch and the HyperExpert. The dense model is the cost floor of a model
of the HyperMoE model's active size.

Axis legend: B sequences, S new positions of a step, P cached positions, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ref import HyperMoEConfig

FLAVOURS = ("portable", "sparse", "fused")
QUANTIZE = ("int8", "int4")
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # export dtypes other than float32 (the CUDA provider's)
TORCH_BACKENDS = ("torch-kv", "torch-nocache")
DENSE = "hf-gpt2"

HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}  # ours → GPT2Config's
HYPER_WIDTHS = ("d_expert_embed", "d_process", "d_hyper", "d_layer_embed", "d_generator", "d_adapter")


def dense_gpt2(cfg: HyperMoEConfig, seed: int, device: str = "cpu"):
    """transformers' GPT2LMHeadModel with cfg's shape (d, blocks, heads, V, positions, MLP width d_ff, activation,
    LayerNorm eps; tied head), its own random init from torch's RNG seeded with `seed`, eval mode, no dropout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                        activation_function=HF_ACTIVATION[cfg.activation], layer_norm_epsilon=cfg.layer_norm_eps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)  # GPT-2's: the last id
    return GPT2LMHeadModel(config).to(device).eval()


def check_upcyclable(cfg: HyperMoEConfig) -> None:
    """ValueError naming the fields of `cfg` that an upcycled GPT-2 cannot have (the benchmark's model is one)."""
    fixed = {"gate": "topk", "capacity": None, "expert_bias": True, "router_bias": False, "noisy_gating": False,
             "router_jitter": 0.0, "tie_embeddings": True, "dropout": 0.0}
    wrong = [f"{name} = {getattr(cfg, name)!r} (upcycled: {want!r})" for name, want in fixed.items()
             if getattr(cfg, name) != want]
    if cfg.activation not in HF_ACTIVATION:
        wrong.append(f"activation = {cfg.activation!r} (GPT-2 has {sorted(HF_ACTIVATION)})")
    if wrong:
        raise ValueError("the generation benchmark's model is upcycled from a dense GPT-2, which fixes "
                         + "; ".join(wrong))


def upcycled(dense, cfg: HyperMoEConfig, seed: int, device: str = "cpu"):
    """The HyperMoETransformer (eval mode, float32) upcycled from `dense` (dense_gpt2) by
    hypermoe.convert.upcycle_gpt2_mlp: cfg's N, k, moe_every and hypernetwork widths, router and hypernetwork
    drawn with `seed`. Its config must equal cfg (checked)."""
    from hypermoe.convert import upcycle_gpt2_mlp
    from hypermoe.model import HyperMoETransformer

    check_upcyclable(cfg)
    state = {name: t.detach().cpu().numpy() for name, t in dense.state_dict().items()}
    converted = upcycle_gpt2_mlp(state, n_experts=cfg.n_experts, top_k=cfg.top_k, seed=seed, moe_every=cfg.moe_every,
                                 activation=cfg.activation, kind="model", n_heads=cfg.n_heads,
                                 layer_norm_eps=cfg.layer_norm_eps, tie=True,
                                 **{name: getattr(cfg, name) for name in HYPER_WIDTHS})
    if converted.config != cfg:
        theirs, ours = converted.config.to_dict(), cfg.to_dict()
        raise ValueError("upcycled config differs from the benchmark's in "
                         + ", ".join(f"{k}: {theirs[k]!r} vs {ours[k]!r}" for k in ours if theirs[k] != ours[k]))
    return HyperMoETransformer.from_ref(converted.config, converted.params, device=device).eval()


class HFDecoder:
    """hypermoe.generation's Decoder over transformers' GPT2LMHeadModel with its own KV cache (the Cache object
    transformers 5 returns, or 4.x's tuples) and `logits_to_keep=1` (only the last position's logits: its own
    feature, used as transformers' generate() uses it)."""

    def __init__(self, model) -> None:
        import inspect

        self.model = model
        self._cache: Any = None
        # transformers 5 names the cache argument `cache` (`past_key_values` deprecated, removal announced); 4.x
        # has only `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def begin(self, batch_size: int, max_length: int) -> None:
        if max_length > self.model.config.n_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {self.model.config.n_positions} positions")
        self._cache = None

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        import torch

        device = self.model.device
        ids, mask, pos = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
                          for a in (input_ids, attention_mask, position_ids))  # (B, S), (B, P + S), (B, S)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_arg: self._cache})
        self._cache = out["cache"] if "cache" in out else out.past_key_values
        return out.logits[:, -1].float().cpu().numpy()  # (B, V)


# ---------------------------------------------------------------------------------------------
# The benchmark's backends (opts: hypermoe.bench.generation.Options)
# ---------------------------------------------------------------------------------------------


def parse_export(spec: str) -> dict[str, Any]:
    """FLAVOUR[:fp16|:bf16][:int8|:int4[:acc4]][:contrib] → export_model's flavour, dtype, quantize,
    accuracy_level and attention (ValueError naming the part)."""
    parts = spec.split(":")
    if parts[0] not in FLAVOURS:
        raise ValueError(f"export {spec!r}: the flavour must be one of {FLAVOURS}, got {parts[0]!r}")
    out: dict[str, Any] = {"flavour": parts[0], "dtype": "float32", "quantize": None, "accuracy_level": 0,
                           "attention": "standard"}
    for part in parts[1:]:
        if part in DTYPES and out["dtype"] == "float32":
            out["dtype"] = DTYPES[part]
        elif part in QUANTIZE and out["quantize"] is None:
            out["quantize"] = part
        elif part == "acc4" and out["accuracy_level"] == 0:
            out["accuracy_level"] = 4
        elif part == "contrib" and out["attention"] == "standard":
            out["attention"] = "contrib"
        else:
            raise ValueError(f"export {spec!r}: {part!r} is not fp16, bf16, int8, int4, acc4 or contrib (each at most "
                             "once)")
    if out["accuracy_level"] and not out["quantize"]:
        raise ValueError(f"export {spec!r}: acc4 (int8 activations) applies to int8 or int4 weights")
    return out


def build_models(opts):
    """(the HyperMoE model, the dense GPT-2 or None), eval mode: with opts.dense, transformers' GPT2LMHeadModel
    (seeded with opts.seed) and the model upcycled from it (above); without, a HyperMoE model
    drawn from torch's RNG seeded with opts.seed."""
    import torch

    from hypermoe.model import HyperMoETransformer

    if not opts.dense:
        torch.manual_seed(opts.seed)
        return HyperMoETransformer(opts.cfg, device=opts.device).eval(), None
    dense = dense_gpt2(opts.cfg, opts.seed, opts.device)
    return upcycled(dense, opts.cfg, opts.seed, opts.device), dense


def export_dir(directory: str, spec: str) -> str:
    return os.path.join(directory, spec.replace(":", "-"))


def export_all(model, opts, directory: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One with-past export per opts.exports entry of the model's parameters into directory/<spec> → what each
    took (export_model's options: only those that differ from its defaults are passed)."""
    from export.exporter import export_model
    from hypermoe.layer import params_to_ref

    params = params_to_ref(model)  # float32 copies on the host
    out = []
    for spec in opts.exports:
        chosen = parse_export(spec)
        options = {"flavour": chosen["flavour"]}
        if chosen["dtype"] != "float32":
            options["dtype"] = chosen["dtype"]
        if chosen["quantize"]:
            options["quantize"] = chosen["quantize"]
        if chosen["accuracy_level"]:
            options["accuracy_level"] = chosen["accuracy_level"]
        if chosen["attention"] != "standard":
            options["attention"] = chosen["attention"]
        say(f"exporting the with-past {spec} graph (d={opts.cfg.d_model}, {opts.cfg.n_layers} blocks; minutes at "
            "full size)…")
        result = export_model(export_dir(directory, spec), opts.cfg, params, kind="model", with_past=True,
                              source="hypermoe bench --generation", **options)
        say(f"  {spec}: {result.seconds:.0f} s, {result.bytes / 2**20:,.0f} MiB, hyper form {result.hyper_form}")
        out.append({"export": spec, **chosen, "seconds": result.seconds, "bytes": result.bytes,
                    "hyper_form": result.hyper_form, "external_data": result.external_data})
    return out


def make_decoders(model, dense, opts, directory: str) -> dict[str, Any]:
    from export.generate import OrtDecoder
    from hypermoe.model import TorchDecoder

    provider = "cuda" if opts.device == "cuda" else "cpu"
    decoders: dict[str, Any] = {}
    if dense is not None:
        decoders[DENSE] = HFDecoder(dense)
    for spec in opts.exports:
        decoders[f"ort-{spec}"] = OrtDecoder(export_dir(directory, spec), provider, threads=opts.threads)
    for name in opts.torch_backends:
        decoders[name] = TorchDecoder(model, use_cache=name == "torch-kv")
    return decoders


__all__ = ["HFDecoder", "build_models", "check_upcyclable", "dense_gpt2", "export_all", "make_decoders",
           "parse_export", "upcycled"]
