"""hypermoe: HyperMoE in PyTorch. The semantics are SPEC.md's, defined by the NumPy reference in ref/."""

from ref.config import SPEC_VERSION, HyperMoEConfig
from hypermoe.layer import HyperMoELayer, HyperMoEOutput, HyperNetwork, Routing, params_from_ref, params_to_ref
from hypermoe.model import HyperMoETransformer, ModelOutput

__all__ = ["HyperMoEConfig", "SPEC_VERSION", "HyperMoELayer", "HyperMoEOutput", "HyperNetwork", "Routing",
           "params_from_ref", "params_to_ref", "HyperMoETransformer", "ModelOutput"]
