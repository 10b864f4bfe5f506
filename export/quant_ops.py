"""A quantised export's graph: torch custom ops that the ONNX exporter translates into onnxruntime's
`com.microsoft::MatMulNBits` and `com.microsoft::QMoE`, and `quantize_module`, which swaps them into an
ExportLayer / ExportStack / ExportModel built as usual (export/graph.py). The weights come from
export/quantize.py (one formulation: the eager ops below dequantise with it too).

Axis legend:  T tokens  K input width (quantised axis)  N output width  E experts  d model  f expert hidden

How a weight is swapped without touching the graph code: every matmul there is written `x @ W`. A QuantWeight
stands in for W; `x @ QuantWeight` falls through torch's Tensor.__matmul__ (not a tensor) to
QuantWeight.__rmatmul__, which calls the MatMulNBits op. The fused flavour's experts are a QMoE module the
layer calls instead of its MoE op (ExportLayer reads `self.qmoe`).

What is quantised, per flavour (the rest stays float: the router, so routing decisions are the float model's;
the HyperExpert and its hypernetwork, small and per-token; embeddings; LayerNorms; biases):
- sparse: each expert's W1 and W2 (one MatMulNBits each), attention qkv and proj, dense MLPs, the LM head.
- portable: the concatenated w1_cat (d, N·f) and w2_cat (N·f, d) (its blocks along N·f must not straddle two
  experts: d_ff a multiple of the block size), and the same dense parts.
- fused: the experts as one QMoE node, int4 only (onnxruntime 1.31.1's CPU QMoE computes 8-bit block-wise
  experts ~0.7 % off the dequantised weights, measured; per-row 8-bit and 4-bit block-wise are exact to
  float rounding), d_model and d_ff multiples of the block size (QMoE does not pad); the same dense parts.
MatMulNBits and QMoE run with accuracy_level 0 by default: float activations × dequantised weights on the CPU
(measured ≤ 0.03 of float32's rounding bound), so verify holds the export to the dequantised reference's bounds.
accuracy_level 4 (`--accuracy-level 4`) quantises the activations to int8 inside the kernels: much faster on
the CPU (onnxruntime 1.31.1, one thread, K 768, N 3072, one token: float MatMul 127 µs; int4 173 µs at level 0,
54 µs at level 4; int8 5.6 ms at level 0 (B dequantised every call), 49 µs at level 4), but no rounding bound
holds (measured 300-900× float32's): verify only reports such an export's quality. It also lifts the fused
flavour's int4-only rule (8-bit block-wise QMoE behaves like int8 activations anyway).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from export import moe_op
from export.quantize import Quantized, check_block, dequantise, qmoe_weights, quantise

DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 4)  # 0: float activations, x · dequantise(W), exact; 4: int8 activations (module docstring)


def _dequantised(packed: torch.Tensor, scales: torch.Tensor, K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    q = Quantized(packed.numpy().reshape(N, scales.shape[-1], -1), scales.numpy().reshape(N, -1), K, N, bits,
                  block_size)
    return torch.from_numpy(dequantise(q))  # (K, N) float32


@torch.library.custom_op("hypermoe_export::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int, N: int, bits: int,
                 block_size: int, accuracy_level: int) -> torch.Tensor:
    """x (..., K) @ dequantise(packed (N, nb, blob), scales (N·nb,)) → (..., N), MatMulNBits' semantics at
    accuracy_level 0 (eager, for tracing: level 4's int8 activations are not modelled)."""
    w = _dequantised(packed, scales.reshape(N, -1), K, N, bits, block_size)  # (K, N)
    return (x.to(torch.float32) @ w).to(x.dtype)


@matmul_nbits.register_fake
def _(x, packed, scales, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("hypermoe_export::qmoe_experts", mutates_args=())
def qmoe_experts(x: torch.Tensor, logits: torch.Tensor, fc1: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor | None,
                 fc2: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor | None, k: int, activation: str, bits: int,
                 block_size: int, accuracy_level: int) -> torch.Tensor:
    """com.microsoft::QMoE (normalize_routing_weights=1): moe_op.moe_experts on the dequantised experts.
    fc1 (E, f, d·bits/8), s1 (E, f, d/block); fc2 (E, d, f·bits/8), s2 (E, d, f/block) → (T, d)."""
    E, f, d = fc1.shape[0], fc1.shape[1], x.shape[-1]
    w1 = torch.stack([_dequantised(fc1[e], s1[e], d, f, bits, block_size).T for e in range(E)])  # (E, f, d)
    w2 = torch.stack([_dequantised(fc2[e], s2[e], f, d, bits, block_size).T for e in range(E)])  # (E, d, f)
    return torch.ops.hypermoe_export.moe_experts(x, logits, w1, b1, w2, b2, k, activation)


@qmoe_experts.register_fake
def _(x, logits, fc1, s1, b1, fc2, s2, b2, k, activation, bits, block_size, accuracy_level):
    return torch.empty_like(x)


def register_schemas() -> tuple:
    """Minimal OpSchemas of MatMulNBits and QMoE (onnx has none for contrib ops; the exporter and checker need one)."""
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    INT, STRING = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.STRING
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    floats = ("T", ["tensor(float)", "tensor(float16)"], "activations and scales")
    if not onnx.defs.has("MatMulNBits", DOMAIN):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "MatMulNBits", DOMAIN, 1, inputs=[P("A", "T"), P("B", "T2"), P("scales", "T")], outputs=[P("Y", "T")],
            type_constraints=[floats, ("T2", ["tensor(uint8)"], "packed weights")],
            attributes=[A(name, INT, name) for name in ("K", "N", "bits", "block_size", "accuracy_level")]))
    if not onnx.defs.has("QMoE", DOMAIN):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "QMoE", DOMAIN, 1,
            inputs=[P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T2"), P("fc1_scales", "T"),
                    P("fc1_experts_bias", "T", param_option=optional), P("fc2_experts_weights", "T2"),
                    P("fc2_scales", "T"), P("fc2_experts_bias", "T", param_option=optional)],
            outputs=[P("output", "T")], type_constraints=[floats, ("T2", ["tensor(uint8)"], "packed weights")],
            attributes=[A("k", INT, ""), A("activation_type", STRING, ""), A("normalize_routing_weights", INT, ""),
                        A("expert_weight_bits", INT, ""), A("block_size", INT, ""), A("accuracy_level", INT, "")]))
    return onnx.defs.get_schema("MatMulNBits", 1, DOMAIN), onnx.defs.get_schema("QMoE", 1, DOMAIN)


def translation_table() -> dict:
    """custom_translation_table entries: matmul_nbits → MatMulNBits, qmoe_experts → QMoE."""
    import onnxscript

    nbits_schema, qmoe_schema = register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, 1)
    nbits, qmoe = onnxscript.values.Op(opset, "MatMulNBits", nbits_schema), onnxscript.values.Op(opset, "QMoE", qmoe_schema)

    def matmul_nbits_onnx(x, packed, scales, K: int, N: int, bits: int, block_size: int, accuracy_level: int):
        return nbits(x, packed, scales, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=accuracy_level)

    def qmoe_onnx(x, logits, fc1, s1, b1, fc2, s2, b2, k: int, activation: str, bits: int, block_size: int,
                  accuracy_level: int):
        return qmoe(x, logits, fc1, s1, b1, fc2, s2, b2, k=k, activation_type=moe_op.ORT_ACTIVATION[activation],
                    normalize_routing_weights=1, expert_weight_bits=bits, block_size=block_size,
                    accuracy_level=accuracy_level)

    return {torch.ops.hypermoe_export.matmul_nbits.default: matmul_nbits_onnx,
            torch.ops.hypermoe_export.qmoe_experts.default: qmoe_onnx}


# ---------------------------------------------------------------------------------------------
# Modules and the swap
# ---------------------------------------------------------------------------------------------

class QuantWeight(nn.Module):
    """Stands in for a weight W (K, N) in `x @ W`: x (..., K) → MatMulNBits(x) (..., N)."""

    def __init__(self, w: np.ndarray, bits: int, block_size: int, accuracy_level: int = 0):
        super().__init__()
        q = quantise(w, bits, block_size)
        self.K, self.N, self.bits, self.block_size, self.accuracy_level = q.K, q.N, bits, block_size, accuracy_level
        self.register_buffer("packed", torch.from_numpy(q.packed))  # (N, nb, blob) uint8
        self.register_buffer("scales", torch.from_numpy(q.scales.reshape(-1)))  # (N·nb,) float32

    @property
    def shape(self) -> tuple[int, int]:  # the (K, N) of the weight it stands for (extra_repr of its owner reads it)
        return (self.K, self.N)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.hypermoe_export.matmul_nbits(x, self.packed, self.scales, self.K, self.N, self.bits,
                                                      self.block_size, self.accuracy_level)

    def extra_repr(self) -> str:
        return f"K={self.K}, N={self.N}, bits={self.bits}, block_size={self.block_size}"


class QMoE(nn.Module):
    """The fused flavour's quantised experts: forward(x (T, d), logits (T, E), b1, b2) → (T, d) via QMoE."""

    def __init__(self, w1: np.ndarray, w2: np.ndarray, k: int, activation: str, bits: int, block_size: int,
                 accuracy_level: int = 0):
        super().__init__()
        fc1, s1 = qmoe_weights(w1, bits, block_size)  # (E, f, d·bits/8), (E, f, d/block) from w1 (E, d, f)
        fc2, s2 = qmoe_weights(w2, bits, block_size)  # (E, d, f·bits/8), (E, d, f/block) from w2 (E, f, d)
        for name, value in (("fc1", fc1), ("s1", s1), ("fc2", fc2), ("s2", s2)):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value)))
        self.k, self.activation, self.bits, self.block_size, self.level = k, activation, bits, block_size, accuracy_level

    def forward(self, x, logits, b1, b2):
        return torch.ops.hypermoe_export.qmoe_experts(x, logits, self.fc1, self.s1, b1, self.fc2, self.s2, b2, self.k,
                                                      self.activation, self.bits, self.block_size, self.level)


def _swap(owner: nn.Module, name: str, scheme: tuple[int, int, int]) -> None:
    """Replace owner's parameter/buffer `name` (K, N) by a QuantWeight of it; scheme (bits, block_size, level)."""
    w = getattr(owner, name).detach().to(torch.float32).numpy()
    delattr(owner, name)
    setattr(owner, name, QuantWeight(w, *scheme))


def check_supported(cfg, flavour: str, bits: int, block_size: int, dtype: str, accuracy_level: int = 0) -> None:
    """ValueError naming the combination a quantised export cannot compute as the dequantised reference."""
    check_block(bits, block_size)
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy level must be one of {ACCURACY_LEVELS} (0: float activations, exact; 4: int8 "
                         f"activations, faster, verify reports only), got {accuracy_level!r}")
    if dtype != "float32":
        raise ValueError(f"quantised exports are float32 only (dtype {dtype!r} asked): MatMulNBits takes float16 on "
                         "the CPU but this project has not verified it; QMoE's CUDA path needs float16/bfloat16 input")
    if flavour == "fused" and bits != 4 and accuracy_level == 0:
        raise ValueError("flavour fused quantises its experts through com.microsoft::QMoE, int4 only at accuracy "
                         "level 0: onnxruntime 1.31.1's CPU QMoE computes 8-bit block-wise experts ~0.7 % off the "
                         "dequantised weights (measured); use --quantize int4, --flavour sparse or --accuracy-level 4")
    if flavour == "fused" and (cfg.d_model % block_size or cfg.d_ff % block_size):
        raise ValueError(f"flavour fused with --quantize needs d_model ({cfg.d_model}) and d_ff ({cfg.d_ff}) to be "
                         f"multiples of the block size {block_size} (QMoE does not pad); use a smaller block or "
                         "--flavour sparse")
    if flavour == "portable" and cfg.d_ff % block_size:
        raise ValueError(f"flavour portable with --quantize needs d_ff ({cfg.d_ff}) to be a multiple of the block "
                         f"size {block_size} (w2_cat's blocks would straddle two experts); use a smaller block or "
                         "--flavour sparse")


def quantize_layer(layer: nn.Module, scheme: tuple[int, int, int]) -> None:
    """Swap an ExportLayer's routed experts for quantised ones (its router and HyperExpert stay float)."""
    if layer.flavour == "portable":
        _swap(layer, "w1_cat", scheme)
        _swap(layer, "w2_cat", scheme)
    elif layer.flavour == "sparse":
        for name in ("w1", "w2"):
            stacked = getattr(layer, name).detach().to(torch.float32).numpy()  # (N, K, N')
            delattr(layer, name)
            setattr(layer, name, nn.ModuleList(QuantWeight(w, *scheme) for w in stacked))
    else:
        w1 = layer.fc1.detach().to(torch.float32).numpy().transpose(0, 2, 1)  # (E, d, f) back from [E, out, in]
        w2 = layer.fc2.detach().to(torch.float32).numpy().transpose(0, 2, 1)  # (E, f, d)
        del layer.fc1, layer.fc2
        layer.qmoe = QMoE(w1, w2, layer.cfg.top_k, layer.cfg.activation, *scheme)


def quantize_module(module: nn.Module, bits: int, block_size: int, accuracy_level: int = 0) -> nn.Module:
    """Quantise, in place, an ExportLayer, ExportStack or ExportModel(WithPast): the routed experts, and for a model
    attention qkv and proj, the dense MLPs and the LM head (tied: a quantised copy of token_embedᵀ; the lookup keeps
    the float token_embed). Returns the module."""
    from export.layer import ExportLayer

    scheme = (bits, block_size, accuracy_level)
    for layer in [m for m in module.modules() if isinstance(m, ExportLayer)]:
        quantize_layer(layer, scheme)
    for block in getattr(module, "blocks", ()):
        _swap(block.attn.qkv, "weight", scheme)
        _swap(block.attn.proj, "weight", scheme)
        if block.mlp is not None:
            _swap(block.mlp, "w1", scheme)
            _swap(block.mlp, "w2", scheme)
    if hasattr(module, "token_embed"):
        if module.lm_head is None:  # tied: decode reads lm_head.weight when lm_head is not None
            head = nn.Module()
            head.weight = QuantWeight(module.token_embed.detach().to(torch.float32).numpy().T, *scheme)
            module.lm_head = head
        else:
            _swap(module.lm_head, "weight", scheme)
    return module


def check_request(cfg, *, flavour: str, quantize: str | None, block_size: int, dtype: str,
                  accuracy_level: int = 0) -> int | None:
    """The bits of `quantize` (None | "int8" | "int4"), or a ValueError naming what cannot be exported."""
    if quantize is None:
        if accuracy_level != 0:
            raise ValueError("an accuracy level applies to quantised weights only; add --quantize int8|int4")
        return None
    from export.quantize import BITS

    if quantize not in BITS:
        raise ValueError(f"quantize must be one of {tuple(BITS)} or None, got {quantize!r}")
    check_supported(cfg, flavour, BITS[quantize], block_size, dtype, accuracy_level)
    return BITS[quantize]


def prepare(module: nn.Module, cfg, *, flavour: str, quantize: str | None, block_size: int, dtype: str,
            accuracy_level: int = 0):
    """The exporter's one call: (module, translation-table entries, metadata) for `quantize` None | "int8" | "int4"."""
    bits = check_request(cfg, flavour=flavour, quantize=quantize, block_size=block_size, dtype=dtype,
                         accuracy_level=accuracy_level)
    if bits is None:
        return module, {}, {}
    meta = {"quantize": quantize, "bits": str(bits), "block_size": str(block_size), "accuracy_level": str(accuracy_level)}
    return quantize_module(module, bits, block_size, accuracy_level), translation_table(), meta


def describe(meta: dict) -> str:
    """prepare's metadata in words for `hypermoe export`'s line: "" or " int4 weights (block 32, accuracy level 0)"."""
    if not meta:
        return ""
    return f" {meta['quantize']} weights (block {meta['block_size']}, accuracy level {meta['accuracy_level']})"
