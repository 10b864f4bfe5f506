"""hypermoe's pure-NumPy reference: the definition of HyperMoE (SPEC.md). No torch here."""

from ref.config import ACTIVATIONS, GATES, SPEC_VERSION, HyperMoEConfig, tiny_config
from ref.memory import check_memory, param_bytes
from ref.params import (
    check_finite_params, check_params, hyper_param_shapes, init, init_stack, layer_param_shapes, layer_params,
    param_shapes, stack_layers, stack_param_shapes,
)
from ref.semantics import (
    LayerResult, activation, aux_losses, capacity_keep, cv_squared, expert_ffn, gates, generate, hyper_expert, layer,
    logsumexp, process, routed_output, router_logits, routing_margins, select, selection_embedding, softmax, stack,
)

__all__ = [name for name in dir() if not name.startswith("_")]
