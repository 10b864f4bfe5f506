"""The interface of a with-past export (export/exporter.py exports ExportModelWithPast, export/graph.py): its input and
output names (Hugging Face Optimum's and onnxruntime-genai's), the sample it is traced with, its dynamic dims and
their names."""

from __future__ import annotations

import numpy as np

from ref import HyperMoEConfig

PAST_SAMPLE = (2, 3, 4)  # traced (batch, new, cached) sizes: distinct and ≥ 2 (else torch.export specialises/merges)


def past_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a with-past export, Optimum's / onnxruntime-genai's names:
    input_ids, attention_mask, position_ids, past_key_values.{i}.key, past_key_values.{i}.value →
    logits, present.{i}.key, present.{i}.value, for every block i < n_layers."""
    pairs = [(i, kv) for i in range(n_layers) for kv in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i, kv in pairs],
            ["logits"] + [f"present.{i}.{kv}" for i, kv in pairs])


def past_sample(cfg: HyperMoEConfig, dtype, attention: str = "standard") -> tuple[tuple, list[str], list[str], tuple]:
    """(sample args, input names, output names, dynamic shapes) of ExportModelWithPast: B = 2 sequences of
    S = 3 new tokens after P = 4 cached ones. Named dims batch_size, sequence_length, past_sequence_length;
    attention_mask's length (P + S) is left to torch (Dim.AUTO: an expression of two dims cannot be named)
    and renamed total_sequence_length afterwards (name_total_length). Attention "contrib": the past is the shared
    buffer (B, H, M, c), M = P + S + 1 (distinct from the others), its dim named max_sequence_length."""
    import torch

    B, S, P = PAST_SAMPLE
    M = P + S + 1 if attention == "contrib" else P  # the past's length: a shared buffer's (≠ P + S), or the cache's
    if cfg.max_seq_len < max(P + S, M):
        raise ValueError(f"config field 'max_seq_len' ({cfg.max_seq_len}) must be ≥ {max(P + S, M)} to export with "
                         f"past key/values (the traced sample has {P} cached and {S} new positions in {M})")
    H, c = cfg.n_heads, cfg.d_model // cfg.n_heads
    rng = np.random.default_rng(0)
    input_ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, S)))
    attention_mask = torch.ones(B, P + S, dtype=torch.int64)
    position_ids = torch.arange(P, P + S).expand(B, S).contiguous()
    past = tuple(torch.from_numpy(rng.standard_normal((B, H, M, c))).to(dtype) for _ in range(2 * cfg.n_layers))
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length", max=cfg.max_seq_len)
    past_len = (torch.export.Dim("max_sequence_length", max=cfg.max_seq_len) if attention == "contrib" else
                torch.export.Dim("past_sequence_length", max=cfg.max_seq_len - 1))
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
                      tuple({0: batch, 2: past_len} for _ in past))  # the varargs travel as one tuple
    inputs, outputs = past_names(cfg.n_layers)
    return (input_ids, attention_mask, position_ids, *past), inputs, outputs, dynamic_shapes


def name_total_length(model) -> None:
    """Rename the symbols torch gave the total length P + S (attention_mask's dim 1, a fresh symbol like s53;
    present's dim 2, "past_sequence_length + sequence_length") to total_sequence_length, as Optimum names it."""
    graph = model.graph
    mask = next(v for v in graph.input if v.name == "attention_mask")
    old = {mask.type.tensor_type.shape.dim[1].dim_param}
    old |= {v.type.tensor_type.shape.dim[2].dim_param for v in graph.output if v.name.startswith("present.")}
    old -= {v.type.tensor_type.shape.dim[2].dim_param for v in graph.input if v.name.startswith("past_key_values.")}
    old.discard("")  # (a shared buffer's present has the past's length, max_sequence_length: kept)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in old:
                dim.dim_param = "total_sequence_length"
