"""The built-in implementations the runner can check, as plug-ins with the documented interface
(conformance/runner.py's docstring, conformance/README.md): `ref` (the NumPy reference), `torch` /
`torch-cuda` (hypermoe.layer), `onnx` / `onnx-cuda` (export/ + onnxruntime), and `resolve_impl`, which also
imports a third party's MODULE:FUNCTION. torch and onnxruntime are imported only when used."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import ref

BUILTIN_IMPLS = ("ref", "torch", "torch-cuda", "onnx", "onnx-cuda")


class Unsupported(Exception):
    """Raised by an implementation for a case or dtype it does not support: the case is skipped with this reason."""


# ---------------------------------------------------------------------------------------------
# Built-in implementations
# ---------------------------------------------------------------------------------------------


def ref_impl(cfg: ref.HyperMoEConfig, params: dict[str, np.ndarray], inputs: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The NumPy reference itself, in float64 or float32 (it rejects 16-bit inputs by design)."""
    if dtype not in ("float64", "float32"):
        raise Unsupported(f"the reference computes in float32/float64 only, not {dtype}")
    cast = {name: v.astype(dtype) for name, v in params.items()}
    extra = {n: inputs[n].astype(dtype) for n in ("jitter", "gate_noise") if n in inputs}
    r = ref.layer(cfg, cast, inputs["x"].astype(dtype), inputs["layer_index"], **extra)
    return {"output": r.output, "selected": r.selected, "gates": r.gates, "probs": r.probs, "logits": r.logits,
            "kept": r.kept, "routed": r.routed, "hyper": r.hyper, "aux": r.aux}


def torch_impl(device: str) -> Callable[..., dict[str, Any]]:
    """hypermoe.layer.HyperMoELayer on `device` ("cpu" or "cuda"), eval mode, no autograd."""

    def run(cfg, params, inputs, dtype):
        try:
            import torch

            from hypermoe.layer import HyperMoELayer
        except ImportError as err:
            raise Unsupported(f"hypermoe.layer.HyperMoELayer is not available: {err}") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise Unsupported("no CUDA device (torch.cuda.is_available() is False)")
        if device == "cpu" and dtype == "float16":
            raise Unsupported("hypermoe.layer supports float16 on CUDA only")
        tdtype = getattr(torch, dtype)
        layer = HyperMoELayer.from_ref(cfg, params, device=device, dtype=tdtype).eval()
        to = lambda a: torch.tensor(a, dtype=tdtype, device=device)  # noqa: E731
        extra = {n: to(inputs[n]) for n in ("jitter", "gate_noise") if n in inputs}
        with torch.no_grad():
            out = layer(to(inputs["x"]), inputs["layer_index"], **extra)
        r = out.routing
        return {"output": out.output, "selected": r.selected, "gates": r.gates, "probs": r.probs,
                "logits": r.logits, "kept": r.kept, "aux": {n: float(v) for n, v in out.aux.items()}}

    return run


def onnx_impl(provider: str, flavour: str = "portable") -> Callable[..., dict[str, Any]]:
    """export/: the layer exported to ONNX (export.exporter.export_model, routing outputs on) and run by
    onnxruntime (export.runtime.OnnxRunner, `provider` "cpu" or "cuda"). Inference only: cases that give
    jitter or gate_noise are skipped; float64 is not exported. Inputs (..., S, d) are run as (B, S, d)."""

    def run(cfg, params, inputs, dtype):
        try:
            from export.exporter import DTYPES as EXPORT_DTYPES
            from export.exporter import export_model
            from export.runtime import OnnxRunner, cuda_status
        except ImportError as err:
            raise Unsupported(f"export/ not available yet: {err}") from None
        if dtype not in EXPORT_DTYPES:
            raise Unsupported(f"the ONNX exporter exports {', '.join(EXPORT_DTYPES)}, not {dtype}")
        if "jitter" in inputs or "gate_noise" in inputs:
            raise Unsupported("the ONNX export is inference-only (no jitter / gate_noise inputs)")
        if provider == "cuda":
            usable, why = cuda_status()
            if not usable:
                raise Unsupported(f"onnxruntime's CUDA provider is not available: {why}")
        import tempfile

        x = inputs["x"]
        x3 = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])  # (B, S, d): capacity counts along S
        with tempfile.TemporaryDirectory(prefix="hypermoe-conformance-") as tmp:
            path = Path(tmp) / "layer.onnx"
            export_model(path, cfg, params, kind="layer", layer_index=inputs["layer_index"], dtype=dtype,
                         flavour=flavour, routing_outputs=True, source="conformance")
            try:
                session = OnnxRunner(path, provider)
            except ValueError as err:  # e.g. the CPU provider has no bfloat16 MatMul kernel
                if "NOT_IMPLEMENTED" in str(err) and dtype in ("bfloat16", "float16"):
                    raise Unsupported(f"onnxruntime's {provider} provider cannot run the {dtype} graph: "
                                      f"{str(err).split('NOT_IMPLEMENTED : ')[-1]}") from None
                raise
            out = session(x3)
        k = cfg.top_k
        return {"output": out["output"].reshape(x.shape), "selected": out["selected_experts"].reshape(*x.shape[:-1], k),
                "gates": out["gates"].reshape(*x.shape[:-1], k)}

    return run


def resolve_impl(name: str) -> Callable[..., Mapping[str, Any]]:
    """A built-in implementation name, or MODULE:FUNCTION (imported) → the implementation function."""
    if name == "ref":
        return ref_impl
    if name in ("torch", "torch-cuda"):
        return torch_impl("cuda" if name == "torch-cuda" else "cpu")
    if name in ("onnx", "onnx-cuda"):
        return onnx_impl("cuda" if name == "onnx-cuda" else "cpu")
    if ":" not in name:
        raise ValueError(f"unknown --impl {name!r}: expected one of {', '.join(BUILTIN_IMPLS)} or MODULE:FUNCTION")
    module_name, _, func_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--impl {name!r}: cannot import module {module_name!r}: {err}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"--impl {name!r}: module {module_name!r} has no function {func_name!r}")
    return func
