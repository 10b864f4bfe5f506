"""hypermoe: HyperMoE in PyTorch. The semantics are SPEC.md's, defined by the NumPy reference in ref/."""

from ref.config import SPEC_VERSION, HyperMoEConfig

__all__ = ["HyperMoEConfig", "SPEC_VERSION"]
