"""onnxruntime-genai compatibility: the `genai_config.json` written next to a with-past export.

onnxruntime-genai (`og.Model(folder)`) runs a decoder LM from a folder holding the .onnx file and
`genai_config.json`. Graphs not made by its own builder use its generic model type `"decoder"`: genai feeds
`input_ids`, `attention_mask` and `position_ids` (in the dtypes the graph declares), feeds
`past_key_values.%d.key/value` of shape (batch, H, past, c) and reads back `present.%d.key/value` of shape
(batch, H, past + S, c) and `logits` (batch, S, V) — exactly our with-past graph's names and layouts.

Fields and their meaning are those of onnxruntime-genai's config parser (src/config.h, src/config.cpp,
read at 0.16-dev; the 0.18.0 wheel loads this file): `model.decoder.head_size`, `num_key_value_heads`,
`num_hidden_layers` size the KV cache it allocates; `model.context_length` is the longest sequence and the
default `search.max_length`; `model.eos_token_id` ends a sequence, and when it is absent genai uses
`pad_token_id` as the end of sequence (Config::Config: "If no eos_token_id was set, set it to the pad token
id"): give an EOS id, or a pad id the model never emits before you want it to stop.
`config.json` (optimum_config) carries the Hugging Face fields that Optimum's ORTModelForCausalLM and tools that
inspect a model folder read (model_type, sizes, use_cache, token ids); genai itself reads genai_config.json.
`search.past_present_share_buffer` is false for the standard attention: that graph concatenates past and new keys into
a `present` of length past + S; true for `--attention contrib` (GroupQueryAttention writes into the max_length buffer
in place; genai then allocates past = present = (batch, H, max_length, c) and takes right-padded prompts, as that
op needs).
"""

from __future__ import annotations

from typing import Any

from ref.config import HyperMoEConfig

# genai's documented default input/output names (src/config.h, Config::Defaults), which our graph uses
INPUT_NAMES = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "position_ids": "position_ids",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
}
OUTPUT_NAMES = {
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}


def _token_id(name: str, value: int, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def genai_config(cfg: HyperMoEConfig, *, filename: str = "model.onnx", eos_token_id: int | None,
                 pad_token_id: int, context_length: int, past_present_share_buffer: bool = False) -> dict[str, Any]:
    """The genai_config.json contents (a dict; the exporter writes `json.dumps(..., indent=2)`) for the
    with-past export of the model `cfg` stored as `filename` in the same folder.

    Search defaults are greedy (do_sample false, one beam), max_length = context_length; a caller of genai
    overrides them with `og.GeneratorParams.set_search_options`. eos_token_id None leaves the key out:
    genai then ends a sequence at pad_token_id (see the module docstring). past_present_share_buffer: true only for
    an export with attention "contrib" (export/attention_op.py), whose past and present are one max_length buffer.
    """
    if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename:
        raise ValueError(f"filename must be a plain file name in the export folder, got {filename!r}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or not 0 < context_length <= cfg.max_seq_len:
        raise ValueError(f"context_length must be in [1, max_seq_len = {cfg.max_seq_len}] (learned positions), "
                         f"got {context_length!r}")
    model: dict[str, Any] = {
        "type": "decoder",  # genai's generic decoder-only LM (ModelType::LLM)
        "pad_token_id": _token_id("pad_token_id", pad_token_id, cfg.vocab_size),
        "context_length": context_length,
        "vocab_size": cfg.vocab_size,
        "decoder": {
            "filename": filename,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},  # [] = CPU
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_heads,  # plain multi-head attention: one K/V head per query head
            "num_hidden_layers": cfg.n_layers,  # one past/present pair per transformer block
            "head_size": cfg.d_model // cfg.n_heads,  # c
            "inputs": dict(INPUT_NAMES),
            "outputs": dict(OUTPUT_NAMES),
        },
    }
    if eos_token_id is not None:
        model["eos_token_id"] = _token_id("eos_token_id", eos_token_id, cfg.vocab_size)
    return {
        "model": model,
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "min_length": 0,
            "max_length": context_length,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "early_stopping": True,
            # standard attention: present = concat(past, new), not an in-place max_length buffer; contrib: one buffer
            "past_present_share_buffer": bool(past_present_share_buffer),
        },
    }


__all__ = ["genai_config", "INPUT_NAMES", "OUTPUT_NAMES"]


def optimum_config(cfg: HyperMoEConfig, *, eos_token_id: int | None, pad_token_id: int) -> dict[str, Any]:
    """The config.json of a with-past export folder: Hugging Face's names for the sizes of the graph's model
    (Optimum's NormalizedTextConfig reads num_hidden_layers, num_attention_heads, hidden_size, vocab_size) and the
    token ids genai_config.json holds. model_type "hypermoe": no Optimum version knows it, so Optimum needs it
    registered; the folder is an export, not a hypermoe model directory (that config.json holds kind "model")."""
    config: dict[str, Any] = {
        "model_type": "hypermoe",
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "hidden_size": cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "use_cache": True,
        "pad_token_id": _token_id("pad_token_id", pad_token_id, cfg.vocab_size),
    }
    if eos_token_id is not None:
        config["eos_token_id"] = _token_id("eos_token_id", eos_token_id, cfg.vocab_size)
    return config


def tokenizer_config(cfg: HyperMoEConfig) -> dict[str, Any]:
    """The tokenizer_config.json written next to a copied tokenizer.json: onnxruntime-genai's og.Tokenizer refuses a
    folder without one, and reads the class (transformers' generic fast tokenizer: tokenizer.json says the rest)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}
