"""verify on a quantised export (metadata hypermoe.quantize): the reference it is checked against, and the report of
what quantisation itself does to the outputs.

A quantised export computes ref on the dequantised parameters (export/quantize.py's dequantized_reference: every
quantised matrix replaced by the weights the kernels multiply by; MatMulNBits accuracy_level 0 and the CPU QMoE
multiply float activations by exactly those). So verify checks it against ref on (cfg2, params2) with the
usual bounds of export/bounds.py, unchanged: a wrong graph (wrong scales, zero point, layout) still fails.

Quantisation's own effect (float model vs quantised model) has no rounding bound; it is REPORTED, never a
pass/fail: max |Δ| between ref on the float parameters and the export, relative to the float output's max |·|,
and for a model the fraction of positions whose argmax token agrees.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import ref
from ref import HyperMoEConfig


def dequantized_source(meta: Mapping[str, str], cfg: HyperMoEConfig, params: Mapping[str, np.ndarray]
                       ) -> tuple[HyperMoEConfig, dict[str, np.ndarray]]:
    """(cfg2, params2) of the float model the export recorded in `meta` computes; ValueError on bad metadata."""
    from export.quantize import BITS, check_block, dequantized_reference

    quantize, block = meta.get("quantize"), meta.get("block_size", "")
    if quantize not in BITS or not block.isdigit():
        raise ValueError(f"metadata hypermoe.quantize / block_size are {quantize!r} / {block!r}, expected one of "
                         f"{tuple(BITS)} and an int")
    check_block(BITS[quantize], int(block))
    cfg2, params2 = dequantized_reference(cfg, params, BITS[quantize], int(block))
    return cfg2, {name: v.astype(np.float64) for name, v in params2.items()}


def float_outputs(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, x: np.ndarray,
                  layer_index: int = 0) -> dict[str, np.ndarray]:
    """ref (float64) on the FLOAT parameters: the model before quantisation."""
    if kind == "model":
        from ref import model as ref_model

        return {"logits": ref_model.forward(cfg, params, x)[0]}
    if kind == "layer":
        r = ref.layer(cfg, params, x, layer_index)
        return {"output": r.output, "selected_experts": r.selected}
    return {"output": ref.stack(cfg, params, x)[0]}


def effect(float_values: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> str:
    """One report line: quantisation's effect on these outputs (relative max |Δ|, argmax / routing agreement)."""
    parts = []
    for name in ("logits", "output"):
        if name in got and name in float_values:
            want, value = float_values[name], got[name].astype(np.float64)
            scale = float(np.abs(want).max(initial=0.0)) or 1.0
            parts.append(f"{name} max |Δ| {np.abs(value - want).max(initial=0.0) / scale:.2%} of max |float|")
            if name == "logits":
                agree = float(np.mean(value.argmax(-1) == want.argmax(-1)))
                parts.append(f"argmax agreement {agree:.1%}")
    if "selected_experts" in got:
        same = np.all(got["selected_experts"] == float_values["selected_experts"], axis=-1)
        parts.append(f"routing agreement {float(same.mean()) if same.size else 1.0:.1%}")
    return ", ".join(parts)
