"""Checkpoint folders (config.json + weights, one file or shards) and the hyperparameters their config.json stores:
found and read, mapped to convert's options, checked against the flags and the tensors, each value's source kept.

Where a value comes from, in order: config.json (Hugging Face GPT2Config / SwitchTransformersConfig, plus the
official HyperMoE fork's fields), a flag (which must agree with config.json), or the tensors' shapes (sizes, which
must agree with config.json). A value that changes the numbers and has none of these is an error: nothing is
guessed. docs/convert.md has the mapping table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import ref
from hypermoe.convert.read import load_state_dict

CONFIG = "config.json"
# a folder's weights, in the order transformers' from_pretrained looks for them
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_JSON = 64 * 2**20  # config.json and *.index.json are small; a larger one is not read
# transformers' activation names (ACT2FN) → ours; any other is refused
ACTIVATION_NAMES = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                    "silu": "silu", "swish": "silu"}
MODEL_TYPE = {"official-gpt2": "gpt2", "gpt2-mlp": "gpt2", "official-switch": "switch_transformers"}
# the official fork's HyperExpert widths: config.json key → our field
HYPER_WIDTHS = {"experts_embedding_dim": "d_expert_embed", "process_dim": "d_process", "hypernet_input": "d_hyper",
                "layer_emb_dim": "d_layer_embed", "hypernetwork_bottleneck": "d_generator", "adapter_dim": "d_adapter"}


def locate(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(the weights: a file or a shard index, the config.json that describes them or None) of `path`: a checkpoint
    folder (config.json + WEIGHTS), a weights file or a *.index.json (config.json beside it, when there is one)."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG
        if not config.is_file():
            raise ValueError(f"{path}: a checkpoint folder holds {CONFIG} and its weights ({', '.join(WEIGHTS)}); "
                             f"this one has no {CONFIG} (pass the weights file itself, with the flags, instead)")
        found = [path / name for name in WEIGHTS if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path}: no weights in the folder (expected one of {', '.join(WEIGHTS)})")
        return found[0], config
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    beside = path.parent / CONFIG
    return path, (beside if beside.is_file() else None)


def read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_JSON:
        raise ValueError(f"{path}: {path.stat().st_size:,} bytes, larger than a config or index file can be "
                         f"({MAX_JSON:,}); not read")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of `path` (as locate finds it): one file through read.load_state_dict, or the shards a
    *.index.json names (each through load_state_dict, its header or pickle checked before anything is allocated),
    merged; every shard must hold exactly the tensors the index assigns to it."""
    weights, _ = locate(path)
    if not weights.name.endswith(".index.json"):
        return load_state_dict(weights)
    index = read_json(weights)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{weights}: no 'weight_map' (a non-empty object from tensor names to shard files)")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ValueError(f"{weights}: tensor {name!r} maps to {shard!r}, not a file name in the folder")
        shards.setdefault(shard, set()).add(name)
    state: dict[str, np.ndarray] = {}
    for shard, names in shards.items():
        part = load_state_dict(weights.parent / shard)
        if set(part) != names:
            missing, extra = sorted(names - set(part)), sorted(set(part) - names)
            raise ValueError(f"{weights.parent / shard}: does not hold what {weights.name} says"
                             + (f"; missing {', '.join(missing[:5])}" if missing else "")
                             + (f"; not in the index: {', '.join(extra[:5])}" if extra else ""))
        state.update(part)
    return state


def activation_from(name, key: str) -> str:
    if name not in ACTIVATION_NAMES:
        raise ValueError(f"config.json's {key} = {name!r} is not supported; supported: "
                         + ", ".join(f"{k} (= {v})" for k, v in ACTIVATION_NAMES.items()))
    return ACTIVATION_NAMES[name]


def _need(hf: Mapping, key: str, kind: type | tuple):
    value = hf.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ValueError(f"config.json's {key} = {value!r}: expected {getattr(kind, '__name__', 'a number')}")
    return value


def resolve(source: str, hf: Mapping | None, flags: Mapping, kind: str | None) -> tuple[dict, dict[str, str]]:
    """(options for convert(), {our field: where its value came from}) from config.json's fields `hf` (None: no
    config.json) and the flags given (`flags`: top_k, activation, n_heads, layer_norm_eps, capacity; None where not
    given). A flag that contradicts config.json, or a value neither gives (for kind model: also the heads and the
    LayerNorm eps), is a ValueError naming it."""
    hf = dict(hf or {})
    if hf and hf.get("model_type") != MODEL_TYPE[source]:
        raise ValueError(f"config.json's model_type is {hf.get('model_type')!r}; --from {source} reads "
                         f"model_type {MODEL_TYPE[source]!r}")
    gpt2 = source != "official-switch"
    table = {  # our option: (flag, config.json key, how to read it)
        "activation": ("--activation", "activation_function" if gpt2 else "dense_act_fn", activation_from),
        "top_k": ("--top-k", "k" if source == "official-gpt2" else None, lambda v, k: _need({k: v}, k, int)),
        "n_heads": ("--heads", "n_head" if gpt2 else None, lambda v, k: _need({k: v}, k, int)),
        "layer_norm_eps": ("--layer-norm-eps", "layer_norm_epsilon" if gpt2 else None,
                           lambda v, k: float(_need({k: v}, k, (int, float)))),
        "capacity": ("--capacity", None if gpt2 else "expert_capacity", lambda v, k: _need({k: v}, k, int)),
    }
    options: dict = {}
    sources: dict[str, str] = {}
    for field, (flag, key, read) in table.items():
        given = flags.get(field)
        stored = read(hf[key], key) if key and key in hf else None
        if stored is not None and given is not None and stored != given:
            shown = f"{hf[key]!r} (= {stored})" if field == "activation" and hf[key] != stored else repr(stored)
            raise ValueError(f"{flag} {given} contradicts config.json's {key} = {shown}")
        if stored is not None:
            options[field], sources[field] = stored, f"config.json {key}"
        elif given is not None:
            options[field], sources[field] = given, f"flag {flag}"
    if options.get("capacity") == "none":
        options["capacity"] = None
    needed = ["activation", *(["top_k"] if source == "official-gpt2" else []),
              *(["capacity"] if source == "official-switch" else [])]
    for field in needed:
        if field not in sources:
            flag, key = table[field][:2]
            where = f"config.json has no {key}" if hf else "there is no config.json beside the weights"
            raise ValueError(f"{flag} is needed: {where}, and the checkpoint's tensors do not store it "
                             "(a wrong value silently changes the outputs, so there is no default)")
    if gpt2 and kind != "stack":
        options.setdefault("n_heads", None)  # kind model: the library names the missing value (check_heads)
        options.setdefault("layer_norm_eps", None)
        if hf:
            options["tie"] = bool(hf.get("tie_word_embeddings", True))  # absent: transformers' default, True
            sources["tie_embeddings"] = "config.json tie_word_embeddings" + ("" if "tie_word_embeddings" in hf
                                                                             else " (absent: transformers' True)")
            for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
                if hf.get(key, ok) != ok:
                    raise ValueError(f"config.json's {key} = {hf[key]!r}: not supported (the attention here scales "
                                     "by 1/sqrt(head width) in every block, GPT-2's default)")
    if source == "official-gpt2" and hf and hf.get("use_moe", "MoE") != "MoE":
        raise ValueError(f"config.json's use_moe = {hf['use_moe']!r}: not a HyperMoE checkpoint (the official fork "
                         "builds its MoE layers for use_moe 'MoE'); --from gpt2-mlp upcycles a dense GPT-2")
    return options, sources


def shape_fields(source: str, hf: Mapping, stack: str | None) -> dict[str, tuple[str, object]]:
    """{our field: (config.json key, the value it implies)} for the sizes that the tensors also give."""
    out: dict[str, tuple[str, object]] = {}
    if source == "official-switch":
        layers = "num_decoder_layers" if stack == "decoder" else "num_layers"
        keys = {"d_model": "d_model", "d_ff": "d_ff", "n_experts": "num_experts", "router_bias": "router_bias",
                "n_layers": layers}
    else:
        keys = {"d_model": "n_embd", "n_layers": "n_layer", "vocab_size": "vocab_size", "max_seq_len": "n_positions"}
        if source == "official-gpt2":
            keys["n_experts"] = "n_experts"
        if "n_embd" in hf:
            inner = hf.get("n_inner")
            out["d_ff"] = ("n_inner", 4 * hf["n_embd"] if inner is None else inner)
    if source != "gpt2-mlp":
        keys.update({ours: key for key, ours in HYPER_WIDTHS.items()})
        if "experts_embedding" in hf or "use_hypernet" in hf:
            out["hyper_expert"] = ("experts_embedding", bool(hf.get("experts_embedding"))
                                   and bool(hf.get("use_hypernet")))
    out.update({field: (key, hf[key]) for field, key in keys.items() if key in hf})
    return out


def check_shapes(source: str, hf: Mapping | None, cfg, kind: str, stack: str | None,
                 sources: dict[str, str]) -> None:
    """ValueError where config.json and the converted tensors disagree on a size; records each size's source."""
    fields = shape_fields(source, hf or {}, stack)
    model_only = {"vocab_size", "max_seq_len"}
    for field, (key, value) in fields.items():
        if field in model_only and kind != "model" or field in HYPER_WIDTHS.values() and not cfg.hyper_expert:
            continue
        got = getattr(cfg, field)
        if got != value:
            raise ValueError(f"config.json's {key} = {value!r} contradicts the tensors, which give {field} = {got!r}")
        sources.setdefault(field, f"tensors' shapes = config.json {key}")
    if source == "official-switch" and hf:
        step = hf.get("decoder_sparse_step" if stack == "decoder" else "encoder_sparse_step")
        if isinstance(step, int) and not isinstance(step, bool):
            want = [i for i in range(cfg.n_layers) if step > 0 and i % step == 1]  # the official stack's rule
            if want != ref.stack_layers(cfg):
                raise ValueError(f"config.json's sparse step {step} makes blocks {want} sparse, but the tensors hold "
                                 f"HyperMoE layers in blocks {ref.stack_layers(cfg)}")
            sources["moe_every"] = f"tensors' blocks = config.json {stack}_sparse_step"


def report(source: str, cfg, kind: str, sources: Mapping[str, str]) -> list[str]:
    """One line per source: the fields whose values came from it."""
    fields = ["d_model", "d_ff", "n_experts", "top_k", "capacity", "activation", "router_bias", "n_layers",
              "moe_every", "hyper_expert"]
    if cfg.hyper_expert:
        fields += list(HYPER_WIDTHS.values())
    if kind == "model":
        fields += ["vocab_size", "max_seq_len", "n_heads", "layer_norm_eps", "tie_embeddings"]
    by: dict[str, list[str]] = {}
    for field in fields:
        fixed = field in FIXED and not (field == "router_bias" and source == "official-switch")
        where = sources.get(field, "the layout" if fixed else "the tensors' shapes")
        by.setdefault(where, []).append(f"{field}={getattr(cfg, field)}")
    return [f"  {where}: {' '.join(values)}" for where, values in by.items()]


# fields that the source layout fixes (official Switch: k = 1; GPT-2: no capacity, no router bias) unless a source
# above gave them
FIXED = {"top_k", "capacity", "router_bias"}
