"""The contrib attention of a with-past export (`attention="contrib"`): a torch custom op
`hypermoe_export::group_query_attention` that the ONNX exporter translates into one onnxruntime contrib node
`com.microsoft::GroupQueryAttention` per block, whose past and present are ONE buffer of max_length (onnxruntime-genai's
`past_present_share_buffer: true`): a decode step writes its new key/value into the buffer in place, nothing is
concatenated or copied (the standard graph's Concat copies the whole cache every step).

Axis legend: B sequences, S new positions, M buffer length (max_length), H heads, c = d / H head width, d model.

What GroupQueryAttention computes (onnxruntime 1.31.1 CPU, measured against the eager op below on one-node graphs;
pinned by tests/test_export_contrib_attention.py):
- query, key, value (B, S, d) packed heads, no bias input: the fused qkv bias is added before it (the Linear).
- past_key/value (B, H, M, c) and present_key/value (B, H, M, c), bound to the same OrtValue (shared buffer).
- seqlens_k (B,) int32 = each row's real tokens − 1, total_sequence_length () int32 = attention_mask's width;
  computed in the graph from attention_mask as onnxruntime-genai's builder does (ReduceSum − 1, Shape[1]).
- row b's cached tokens are CONTIGUOUS from buffer position 0: the step's S new keys go to positions
  seqlens_k[b] + 1 − S …, and query i attends causally to positions ≤ its own. A first prompt (S = total) is
  written at 0 … S − 1; its row b is real at 0 … seqlens_k[b] only, so a prompt batch must be RIGHT-padded.
  A left-padded row (mask 0 0 1 1 1) is computed as if its first three tokens were real (max error 3.2 on a
  random example): export.generate.OrtDecoder moves left-padded prompts to the left before the prefill.
- with a past, S > 1 needs B = 1 ("batch_size must be 1 when sequence_length > 1 and past context is given").
- the CPU kernel needs c a multiple of 8 ("head_size must be a multiple of 8") and has float32 and float16 only
  (bfloat16: NOT_IMPLEMENTED when the session loads).
Why GroupQueryAttention and not com.microsoft::MultiHeadAttention: GQA does all that is needed here (shared buffer,
per-row lengths, right-padded batches, decode at any batch size) and is what onnxruntime-genai's shared-buffer mode
is written for (its builder emits it); CPU MultiHeadAttention takes one past_sequence_length scalar for the whole
batch, and its in-place semantics with a max_length past are undocumented (not pursued).

onnx has no schema for ORT contrib ops and the exporter needs one, so a minimal OpSchema is registered once
(onnx.defs.register_schema), the pattern of export/moe_op.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import onnx
import torch
from torch import nn

from ref import HyperMoEConfig

DOMAIN = "com.microsoft"
ATTENTIONS = ("standard", "contrib")  # with-past attention: Concat of the cache | GroupQueryAttention, shared buffer
HEAD_MULTIPLE = 8  # onnxruntime's CPU GroupQueryAttention: "head_size must be a multiple of 8"


def check_attention(attention: str, *, with_past: bool, cfg: HyperMoEConfig | None = None, dtype: str = "float32"
                    ) -> None:
    """ValueError unless `attention` is one of ATTENTIONS and, for "contrib", the export is with past and the config
    (when given) and dtype fit GroupQueryAttention's CPU kernel (check_supported)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "contrib":
        if not with_past:
            raise ValueError("--attention contrib is the with-past graph's cache attention: add --with-past "
                             "(a plain export has no cache)")
        if cfg is not None:
            check_supported(cfg, dtype)


def check_supported(cfg: HyperMoEConfig, dtype: str) -> None:
    """ValueError saying why `cfg` in `dtype` cannot use com.microsoft::GroupQueryAttention on onnxruntime's CPU."""
    c = cfg.d_model // cfg.n_heads
    if c % HEAD_MULTIPLE:
        raise ValueError(f"--attention contrib (com.microsoft::GroupQueryAttention) needs a head width d_model / n_heads "
                         f"that is a multiple of {HEAD_MULTIPLE} (onnxruntime's CPU kernel), got {cfg.d_model} / "
                         f"{cfg.n_heads} = {c}; export --attention standard instead")
    if dtype not in ("float32", "float16"):  # bfloat16: the CPU provider has no kernel (NOT_IMPLEMENTED at load)
        raise ValueError(f"--attention contrib supports float32 and float16 (onnxruntime's CPU GroupQueryAttention), "
                         f"got {dtype}; export --attention standard instead")


class SequenceLengths(NamedTuple):
    """GroupQueryAttention's length inputs, computed from attention_mask (B, L) as onnxruntime-genai's builder does."""
    seqlens_k: torch.Tensor  # (B,) int32: real tokens of each row − 1
    total_length: torch.Tensor  # () int32: L = attention_mask's width


def sequence_lengths(attention_mask: torch.Tensor) -> SequenceLengths:
    """attention_mask (B, L), 1 = real → SequenceLengths (ReduceSum − 1 per row, Shape[1])."""
    seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)  # (B,)
    total = torch.full((), attention_mask.shape[1], dtype=torch.int32, device=attention_mask.device)  # ()
    return SequenceLengths(seqlens_k, total)


@torch.library.custom_op("hypermoe_export::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor,
                          num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager version with com.microsoft::GroupQueryAttention's semantics (module docstring; kv heads = heads):
    q, k, v (B, S, d), past_key/value (B, H, M, c) → (out (B, S, d), present_key, present_value (B, H, M, c))."""
    B, S, d = q.shape
    H, M = num_heads, past_key.shape[2]
    q, k, v = (t.view(B, S, H, d // H).transpose(1, 2) for t in (q, k, v))  # (B, H, S, c)
    first = S == int(total_length)  # a first prompt is written from position 0
    start = torch.zeros_like(seqlens_k) if first else seqlens_k + 1 - S  # (B,) where the S new keys go
    where = (start[:, None] + torch.arange(S, device=q.device)).long()  # (B, S)
    index = where[:, None, :, None].expand(B, H, S, d // H)  # (B, H, S, c)
    present_key, present_value = past_key.scatter(2, index, k), past_value.scatter(2, index, v)  # (B, H, M, c)
    visible = torch.arange(M, device=q.device)[None, None, :] <= where[:, :, None]  # (B, S, M): causal, in-row
    scores = (q * scale) @ present_key.transpose(-2, -1)  # (B, H, S, M)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ present_value  # (B, H, S, c)
    return out.transpose(1, 2).reshape(B, S, d), present_key, present_value


@group_query_attention.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total_length, num_heads, scale):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


class SharedBufferAttention(nn.Module):
    """hypermoe.blocks.CausalSelfAttention's weights over GroupQueryAttention with a shared (B, H, M, c) buffer.

    forward(x (B, S, d), *, bias: SequenceLengths, past (key, value) each (B, H, M, c))
    → (out (B, S, d), present (key, value) each (B, H, M, c): the same buffer with the S new positions written).
    `bias` carries the lengths in the place of the standard attention's additive bias (ExportModel.decode passes it
    through unchanged)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj, self.n_heads = attn.qkv, attn.proj, attn.n_heads

    def forward(self, x: torch.Tensor, *, bias: SequenceLengths, past: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, S, d = x.shape
        scale = 1.0 / math.sqrt(d // self.n_heads)  # SPEC.md's; written as the node's attribute
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 × (B, S, d): the qkv bias added here, GQA has no bias input
        out, key, value = group_query_attention(q, k, v, past[0], past[1], bias.seqlens_k, bias.total_length,
                                                self.n_heads, scale)  # (B, S, d), 2 × (B, H, M, c)
        return self.proj(out), (key, value)  # (B, S, d)


def register_schema():
    if onnx.defs.has("GroupQueryAttention", DOMAIN):
        return onnx.defs.get_schema("GroupQueryAttention", 1, DOMAIN)
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        "GroupQueryAttention", DOMAIN, 1,
        inputs=[P("query", "T"), P("key", "T", param_option=optional), P("value", "T", param_option=optional),
                P("past_key", "T", param_option=optional), P("past_value", "T", param_option=optional),
                P("seqlens_k", "M"), P("total_sequence_length", "M")],
        outputs=[P("output", "T"), P("present_key", "T"), P("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors"),
                          ("M", ["tensor(int32)"], "lengths")],
        attributes=[A("num_heads", onnx.defs.OpSchema.AttrType.INT, "query heads"),
                    A("kv_num_heads", onnx.defs.OpSchema.AttrType.INT, "key/value heads"),
                    A("scale", onnx.defs.OpSchema.AttrType.FLOAT, "scores scale (default 1/sqrt(head size))")],
    )
    onnx.defs.register_schema(schema)
    return schema


def translation_table() -> dict:
    """custom_translation_table entry: hypermoe_export::group_query_attention → com.microsoft::GroupQueryAttention."""
    import onnxscript

    schema = register_schema()
    gqa = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "GroupQueryAttention", schema)

    def group_query_attention_onnx(q, k, v, past_key, past_value, seqlens_k, total_length, num_heads: int,
                                   scale: float):
        return gqa(q, k, v, past_key, past_value, seqlens_k, total_length, num_heads=num_heads,
                   kv_num_heads=num_heads, scale=scale, _num_outputs=3)

    return {torch.ops.hypermoe_export.group_query_attention.default: group_query_attention_onnx}
