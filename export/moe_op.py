"""The fused flavour's routed experts: a torch custom op `hypermoe_export::moe_experts` that the ONNX
exporter translates into one onnxruntime contrib node `com.microsoft::MoE` (opset com.microsoft 1).

What MoE computes (onnx-notes §1, measured on the CPU EP): softmax over its `router_probs` input (so it
is fed raw logits), top-k, optionally renormalised over the k (`normalize_routing_weights`), then
Σ_k w_k (FC2(act(FC1 x + b1)) + b2), weights laid out [E, out, in].

Where that matches SPEC.md (and where export refuses):
- always normalize_routing_weights=1. gate "topk": the renormalised top-k, SPEC.md's gate. gate "switch"
  (k = 1): the op's weight is p/p = 1, so it returns FFN_{i*}(x) and the graph multiplies by its own
  float32 gate p_{i*} (export/layer.py): p_{i*} · FFN, the switch gate without capacity.
  Why not normalize_routing_weights=0 (which gives p · FFN in the op itself): onnxruntime 1.31.1's CPU kernel
  registers MayInplace(0, 0), and on that path it zero-fills its output before reading its input (moe_cpu.cc of
  that time copies the input first only when normalize_routing_weights=1; later sources copy it always). When onnxruntime's planner lets the output share the
  input's buffer (the input an intermediate tensor with no reader after the MoE: inside a model, LayerNorm
  ln2's output; not a layer export, whose input is the graph input, nor a stack, whose residual reads the input
  afterwards) the op returns p · FFN(0): a fused switch-gate model failed verify by ~1.4 on logits of ~3.
  Measured: in the model, with or without onnxruntime's graph optimisations (ORT_PARALLEL execution, or the
  MoE's input or output made a graph output, hides it); on a three-node graph (Add → MoE → Add, optimisations
  off) p · FFN(0) exactly, k = 1 and 2; normalize=1 correct there (tests/test_export.py pins both).
- capacity: refused (MoE has no capacity or pass-through of dropped tokens).
- activation relu / silu / gelu_tanh (ORT's "gelu" is the tanh approximation); exact erf "gelu" refused.
- experts with or without biases (optional inputs).
- ties: NOT guaranteed. The CPU MoE kernel picks the HIGHEST index among tied logits, the graph's own selection
  (which feeds the HyperExpert, `selected_experts` and `gates`) the lowest. On exactly tied router logits
  the fused output can differ from ref; export records this in the model metadata and warns.
- dtype: MoE's router input has the activation dtype, so in float16/bfloat16 the MoE op ranks rounded
  logits while the graph's own selection ranks float32 ones: near-ties (gap below the half-precision
  rounding of the logits) may disagree.

Speed on onnxruntime's CPU provider (1.31, measured; BENCHMARKS.md "onnxruntime CPU investigation"): the
kernel runs each expert's two GEMMs through MLAS without a thread pool (threads only across experts), the
activation as a scalar loop (tanh-GELU ≈ 45 % of the node at d 768, f 3072), and copies, biases and the
thread-output accumulation (in double) as scalar loops: about half torch eager's speed at the official
sizes. The "sparse" flavour (export/layer.py, standard ops) is about twice as fast there.

onnx has no schema for ORT contrib ops and the exporter needs one, so a minimal OpSchema is registered
once (onnx.defs.register_schema).
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F

from ref import HyperMoEConfig

DOMAIN = "com.microsoft"
ORT_ACTIVATION = {"relu": "relu", "silu": "silu", "gelu_tanh": "gelu"}  # ORT "gelu" = tanh approximation
TIE_NOTE = ("fused MoE node breaks exact router-logit ties toward the HIGHEST expert index (onnxruntime CPU "
            "kernel) while SPEC.md and the graph's own selection pick the lowest; outputs may differ from ref on exact ties")


def check_supported(cfg: HyperMoEConfig) -> None:
    """ValueError saying why `cfg` cannot use com.microsoft::MoE with SPEC.md's semantics."""
    if cfg.capacity is not None:
        raise ValueError("the fused flavour (com.microsoft::MoE) has no expert capacity: config field 'capacity' "
                         f"is {cfg.capacity}; export the portable flavour instead")
    if cfg.activation not in ORT_ACTIVATION:
        raise ValueError(f"the fused flavour supports activations {sorted(ORT_ACTIVATION)}; "
                         f"{cfg.activation!r} (exact erf GELU) has no com.microsoft::MoE equivalent "
                         "(its 'gelu' is the tanh approximation); export the portable flavour instead")
    if cfg.gate == "switch" and cfg.top_k != 1:  # the config already forbids it; kept for clarity
        raise ValueError("gate 'switch' needs top_k = 1")


@torch.library.custom_op("hypermoe_export::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, logits: torch.Tensor, fc1: torch.Tensor, b1: torch.Tensor | None,
                fc2: torch.Tensor, b2: torch.Tensor | None, k: int, activation: str) -> torch.Tensor:
    """Eager version with com.microsoft::MoE semantics, normalize_routing_weights=1 (used for tracing only):
    x (T, d), logits (T, N), fc1 (N, f, d), fc2 (N, d, f) → (T, d)."""
    probs = torch.softmax(logits.float(), dim=-1)  # (T, N)
    weight, idx = torch.topk(probs, k, dim=-1)  # (T, k)
    weight = weight / weight.sum(dim=-1, keepdim=True)  # renormalised over the k (k = 1: 1)
    u = torch.einsum("td,nfd->tnf", x, fc1)  # (T, N, f)
    if b1 is not None:
        u = u + b1
    act = {"relu": torch.relu, "silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[activation]
    out = torch.einsum("tnf,ndf->tnd", act(u), fc2)  # (T, N, d)
    if b2 is not None:
        out = out + b2
    chosen = torch.gather(out, 1, idx.unsqueeze(-1).expand(-1, -1, out.shape[-1]))  # (T, k, d)
    return (weight.to(x.dtype).unsqueeze(-1) * chosen).sum(dim=1)


@moe_experts.register_fake
def _(x, logits, fc1, b1, fc2, b2, k, activation):
    return torch.empty_like(x)


def register_schema():
    if onnx.defs.has("MoE", DOMAIN):
        return onnx.defs.get_schema("MoE", 1, DOMAIN)
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        "MoE", DOMAIN, 1,
        inputs=[P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
                P("fc1_experts_bias", "T", param_option=optional), P("fc2_experts_weights", "T"),
                P("fc2_experts_bias", "T", param_option=optional)],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[A("k", onnx.defs.OpSchema.AttrType.INT, "experts per token"),
                    A("activation_type", onnx.defs.OpSchema.AttrType.STRING, "relu|gelu|silu|swiglu|identity"),
                    A("normalize_routing_weights", onnx.defs.OpSchema.AttrType.INT, "renormalise the top-k")],
    )
    onnx.defs.register_schema(schema)
    return schema


def translation_table() -> dict:
    """custom_translation_table entry for torch.onnx.export: hypermoe_export::moe_experts → com.microsoft::MoE."""
    import onnxscript

    schema = register_schema()
    moe = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "MoE", schema)

    def moe_experts_onnx(x, logits, fc1, b1, fc2, b2, k: int, activation: str):
        return moe(x, logits, fc1, b1, fc2, b2, k=k, activation_type=ORT_ACTIVATION[activation],
                   normalize_routing_weights=1)  # never 0: module docstring

    return {torch.ops.hypermoe_export.moe_experts.default: moe_experts_onnx}
