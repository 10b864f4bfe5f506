"""hypermoe: HyperMoE in PyTorch. The semantics are SPEC.md's, defined by the NumPy reference in ref/.

The torch classes are imported on first use (PEP 562), so that `hypermoe --help` and the reference-only
commands start without loading torch."""

from importlib import import_module

from ref.config import SPEC_VERSION, HyperMoEConfig

_LAZY = {
    "HyperMoELayer": "hypermoe.layer", "HyperMoEOutput": "hypermoe.layer", "HyperNetwork": "hypermoe.layer",
    "Routing": "hypermoe.layer", "params_from_ref": "hypermoe.layer", "params_to_ref": "hypermoe.layer",
    "HyperMoETransformer": "hypermoe.model", "ModelOutput": "hypermoe.model", "TorchDecoder": "hypermoe.model",
    "GenerationResult": "hypermoe.generation", "Sampling": "hypermoe.generation",
}

__all__ = ["HyperMoEConfig", "SPEC_VERSION", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hypermoe' has no attribute {name!r}")
