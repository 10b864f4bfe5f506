"""The exportable stack and transformers built from ExportLayer (export/layer.py, whose names are re-exported
here): ExportStack (ref.stack), ExportModel (hypermoe.model's transformer with ExportLayer FFNs) and
ExportModelWithPast (the same with a KV cache), each traced by `torch.export` with dynamic dims.

Axis legend (as export/layer.py):  B batch  S sequence  d model  V vocabulary  H heads  c = d / H head width
    P cached positions  L = P + S
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ref import HyperMoEConfig
from export.layer import (  # noqa: F401 (re-exported: defined here before the split)
    FLAVOURS, HYPER_FORMS, SETS_MAX_BYTES, ExportLayer, _tensor, choose_hyper_form, colex_sets, n_sets, set_adapters,
)

PAST_LOGITS = ("last", "all")  # a with-past export's logits: the last position of each row (generation), or every one


def last_real(h: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """h (B, S, d) → (B, 1, d): each row's last position whose new_mask (B, S) is not 0 (its last position if
    none is). Left padding: always position S - 1; right padding: the last token before the padding."""
    S = new_mask.shape[1]
    from_end = torch.argmax((new_mask.flip(1) != 0).to(torch.int64), dim=1)  # (B,) the first real from the end; 0: none
    index = (S - 1 - from_end).reshape(-1, 1, 1).expand(-1, 1, h.shape[-1])  # (B, 1, d)
    return h.gather(1, index)  # (B, 1, d)


class ExportStack(nn.Module):
    """The HyperMoE layers of a stack with the residual between them: h ← h + layer_ℓ(h) (ref.stack)."""

    def __init__(self, layers: list[ExportLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.hyper_form = layers[0].hyper_form if layers else "none"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states
        for layer in self.layers:
            h = h + layer(h)
        return h


class ExportModel(nn.Module):
    """hypermoe.model.HyperMoETransformer for export: its embeddings, attention, dense MLPs and final norm,
    with the FFN of each HyperMoE block ℓ replaced by an ExportLayer at layer index ℓ (either flavour).
    The model's own forward is not traced: its token-range check reads tensor values (data-dependent).

    forward(input_ids (B, S) int64) → logits (B, S, V)   (positions 0 … S-1, causal, no cache)
    decode(...) is the one formulation of a forward pass; ExportModelWithPast exports it with a KV cache.
    """

    def __init__(self, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, dtype: torch.dtype = torch.float32,
                 flavour: str = "portable", hyper_form: str = "auto"):
        super().__init__()
        from hypermoe.model import HyperMoETransformer
        from ref import model as ref_model

        params64 = {n: np.asarray(v, dtype=np.float64) for n, v in params.items()}
        model = HyperMoETransformer.from_ref(cfg, params64, dtype=torch.float64).to(dtype).eval()
        self.token_embed, self.pos_embed, self.ln_f = model.token_embed, model.pos_embed, model.ln_f
        self.lm_head = model.lm_head
        self.moe = nn.ModuleDict()
        for block in model.blocks:
            if block.moe is not None:
                self.moe[str(block.index)] = ExportLayer(cfg, ref_model.block_moe_params(params64, block.index),
                                                         layer_index=block.index, dtype=dtype, flavour=flavour,
                                                         hyper_form=hyper_form)
                block.moe = None  # replaced; dropping it keeps its weights out of the graph
        self.blocks = model.blocks
        layers = list(self.moe.values())
        self.hyper_form = layers[0].hyper_form if layers else "none"

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               last: bool = False, new_mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """S new tokens after P cached ones → (logits (B, S, V), present (key, value) of every block, each
        (B, H, P + S, c)). position_ids (B, S) (None: 0 … S-1); bias (B, 1, S, P + S) from
        hypermoe.model.attention_bias (None: causal); past: per block (key, value) (B, H, P, c) or None;
        last: ln_f and the head for one position per row only → logits (B, 1, V) (generation needs no more): the
        last, or with new_mask (B, S) (the attention mask of the S new tokens) each row's last real one
        (last_real)."""
        S = input_ids.shape[1]
        pos = self.pos_embed[:S] if position_ids is None else self.pos_embed[position_ids]  # (S, d) | (B, S, d)
        h = self.token_embed[input_ids] + pos  # (B, S, d)
        presents = []
        for block in self.blocks:
            a, present = block.attn(block.ln1(h), bias=bias, past=None if past is None else past[block.index])
            h = h + a  # (B, S, d)
            x = block.ln2(h)  # (B, S, d)
            key = str(block.index)
            h = h + (self.moe[key](x) if key in self.moe else block.mlp(x))
            presents.append(present)
        if last:
            h = h[:, -1:] if new_mask is None else last_real(h, new_mask)  # (B, 1, d)
        h = self.ln_f(h)  # (B, S, d) | (B, 1, d)
        head = self.token_embed.t() if self.lm_head is None else self.lm_head.weight  # (d, V)
        return h @ head, presents  # (B, S, V) | (B, 1, V)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(input_ids)[0]  # (B, S, V)


class ExportModelWithPast(ExportModel):
    """ExportModel with a KV cache, Hugging Face Optimum's "decoder with past" interface: one graph for
    prefill (past_sequence_length 0) and decode (sequence_length 1). L = P + S total positions.

    forward(input_ids (B, S) int64, attention_mask (B, L) int64, position_ids (B, S) int64,
            past_key_values.{i}.key, past_key_values.{i}.value (B, H, P, c) for every block i, flat)
    → (logits (B, S, V), present.{i}.key, present.{i}.value (B, H, L, c) for every block i, flat)
    logits "last": (B, 1, V), ln_f and the head for one position per row only, what generation reads: each row's
    last real new token (last_real: the last position of a left-padded row, as hypermoe's generation pads; the
    last before the padding of a right-padded one, as onnxruntime-genai 0.18 pads a batch of prompts);
    "all": every new position's (B, S, V) (Optimum's interface, and what evaluation needs).

    attention_mask: 1 = real token, 0 = padding (left padding for a batch of prompts); position_ids: a real
    token's position is the number of real tokens before it in its sequence (the caller's rule, as
    Optimum's and onnxruntime-genai's). Capacity is refused: it counts tokens per sequence, and a decode
    step sees only its new ones.

    attention "contrib" (export/attention_op.py): every block's attention is com.microsoft::GroupQueryAttention
    with past and present ONE buffer (B, H, M, c) of max_length M (onnxruntime-genai's past_present_share_buffer);
    its lengths come from attention_mask's row sums, so a prompt batch must be right-padded (OrtDecoder does it)."""

    def __init__(self, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, dtype: torch.dtype = torch.float32,
                 flavour: str = "portable", hyper_form: str = "auto", attention: str = "standard", logits: str = "all"):
        if logits not in PAST_LOGITS:
            raise ValueError(f"logits must be one of {', '.join(PAST_LOGITS)} (positions whose logits a with-past "
                             f"export computes), got {logits!r}")
        if cfg.capacity is not None:
            raise ValueError(f"config field 'capacity' ({cfg.capacity}) cannot be exported with past key/values: "
                             "capacity counts the tokens of a whole sequence per expert, a decode step sees only its new ones")
        super().__init__(cfg, params, dtype=dtype, flavour=flavour, hyper_form=hyper_form)
        self.n_layers, self.logits = cfg.n_layers, logits
        self.attention = attention
        if attention == "contrib":
            from export.attention_op import SharedBufferAttention

            for block in self.blocks:
                block.attn = SharedBufferAttention(block.attn)
        elif attention != "standard":
            raise ValueError(f"attention must be 'standard' or 'contrib', got {attention!r}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from hypermoe.blocks import attention_bias

        if self.attention == "contrib":  # GroupQueryAttention's lengths in the bias's place (export/attention_op.py)
            from export.attention_op import sequence_lengths

            bias = sequence_lengths(attention_mask)  # seqlens_k (B,), total_sequence_length ()
        else:
            bias = attention_bias(attention_mask, input_ids.shape[1], self.token_embed.dtype)  # (B, 1, S, L)
        past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.n_layers)]
        S = input_ids.shape[1]
        logits, presents = self.decode(input_ids, position_ids, bias, past, last=self.logits == "last",
                                       new_mask=attention_mask[:, -S:])  # (B, S, V) | (B, 1, V)
        return (logits, *(t for kv in presents for t in kv))
