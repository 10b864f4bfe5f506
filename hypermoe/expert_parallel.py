"""The expert-parallel HyperMoE layer (docs/parallel.md): HyperMoELayer with its experts sharded over a process
group, tokens sent to the experts' owners with all_to_all_single, and the aux losses over the batch group.

An expert-parallel group of E ranks shards the N experts (N divisible by E): rank r holds experts
[r·n, (r + 1)·n), n = N / E. Everything else of the layer — router, expert embeddings, process network, the
shared hypernetwork — is small and replicated. Each rank runs the layer on its own tokens:

    route (§3.1–3.4) locally            capacity counts per sequence, and a sequence never spans ranks
    sort the T·k assignments by expert  (stable; experts are contiguous per rank, so also by owner rank)
    all_to_all_single  counts (N,)      split sizes first: how many rows each rank will receive
    all_to_all_single  rows (A, d)      x of each assignment to the rank holding its expert
    FFN of each local expert            sorted dispatch on the rows received (one GEMM pair per expert)
    all_to_all_single  rows back        expert outputs to the tokens' ranks, in the order sent
    gate, combine (§3.5)                y = Σ_j g_j FFN_{S_j}(x), dropped tokens g·x, at home
    HyperExpert (§3.6–3.7) at home      it depends on the token only through its selected set: no communication
    aux (§3.8)                          aux_sums all-reduced over the batch group: the losses of the global batch

The process groups, gradient sync and sharded checkpoints of a job are hypermoe/parallel.py's (which re-exports
this module's names).

Axis legend (as hypermoe/layer.py):
    T tokens of this rank   d model width   N experts   k selected experts   E expert-parallel ranks
    n = N / E experts per rank   A assignments this rank sends   R rows this rank receives
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from ref.config import HyperMoEConfig
from hypermoe.experts import c_unbind, expert_ffn
from hypermoe.hypernetwork import HyperNetwork
from hypermoe.layer import HyperMoELayer, HyperMoEOutput
from hypermoe.routing import Routing, aux_from_sums, aux_sums


class _SumOverRanks(torch.autograd.Function):
    """Σ over the group's ranks forward; gradient passed straight through backward: each rank's backward
    reaches its own contribution only, so the ranks' gradients add up to the gradient of one copy of the
    result (hypermoe/parallel.py's docstring). torch.distributed.nn's all_reduce sums gradients instead (W copies)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class ExpertParallelHyperMoE(HyperMoELayer):
    r"""HyperMoELayer with its experts sharded over an expert-parallel process group (module docstring).

    Args:
        config, hyper, check_finite, cache_adapters, device, dtype: as HyperMoELayer. The layer draws the
            single-process layer's init (torch's RNG, the same draws) and keeps its own experts' rows.
        group: the expert-parallel group (None: the default group); its size E must divide n_experts.
        batch_group: the ranks whose tokens form the batch the aux losses are over (None: the default group).

    Parameters: those of HyperMoELayer, with experts.w1 (n, d, f), experts.b1 (n, f), experts.w2 (n, f, d),
    experts.b2 (n, d) holding experts [expert_offset, expert_offset + n). Output: HyperMoEOutput of this rank's
    tokens; aux are the global batch's losses (the same on every rank). Every rank of the group must call
    forward (and backward through every output) the same number of times, in the same order: each call is a
    collective. A rank may have no tokens.
    """

    def __init__(self, config: HyperMoEConfig, *, group=None, batch_group=None, hyper: HyperNetwork | None = None,
                 check_finite: bool = False, cache_adapters: bool = True, device=None, dtype=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ExpertParallelHyperMoE needs torch.distributed initialised (under torchrun: "
                             "hypermoe.parallel.init_distributed())")
        E = dist.get_world_size(group)
        if config.n_experts % E:
            raise ValueError(f"config field 'n_experts' ({config.n_experts}) is not divisible by the "
                             f"expert-parallel group size {E}")
        super().__init__(config, hyper=hyper, check_finite=check_finite, cache_adapters=cache_adapters,
                         device=device, dtype=dtype)
        self.group, self.batch_group = group, batch_group
        self.ep_size, self.n_local = E, config.n_experts // E
        self.expert_offset = dist.get_rank(group) * self.n_local
        with torch.no_grad():  # the single-process init was drawn for all N: keep this rank's rows
            for name, p in list(self.experts.named_parameters()):
                local = p[self.expert_offset:self.expert_offset + self.n_local].clone()
                setattr(self.experts, name, nn.Parameter(local))

    @classmethod
    def from_layer(cls, layer: HyperMoELayer, group=None, batch_group=None) -> ExpertParallelHyperMoE:
        """The expert-parallel twin of `layer` (same parameters, this rank's experts; a shared hypernetwork stays
        shared). Torch's RNG is left as it was (construction's init draws are undone)."""
        w = layer.router.weight
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            new = cls(layer.config, group=group, batch_group=batch_group,
                      hyper=layer.hypernetwork if layer._shared_hyper else None, check_finite=layer.check_finite,
                      cache_adapters=layer.cache_adapters, device=w.device, dtype=w.dtype)
        lo, hi = new.expert_offset, new.expert_offset + new.n_local
        new.load_state_dict({name: t[lo:hi] if name.startswith("experts.") else t
                             for name, t in layer.state_dict().items()})
        return new.train(layer.training)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", expert_parallel={self.ep_size}, "
                f"experts=[{self.expert_offset}, {self.expert_offset + self.n_local})")

    def load_ref(self, params):
        raise ValueError("an expert-parallel layer holds a shard: load the full layer, then "
                         "ExpertParallelHyperMoE.from_layer(layer, group)")

    def save_dir(self, path, *, force: bool = False):
        raise ValueError("an expert-parallel layer holds a shard: save with torch.distributed.checkpoint "
                         "(hypermoe.parallel.save_sharded) and convert with to_model_dir")

    def forward(self, x: torch.Tensor, layer_index: int = 0, *, jitter: torch.Tensor | None = None,
                gate_noise: torch.Tensor | None = None) -> HyperMoEOutput:
        """x (..., S, d) of this rank → HyperMoEOutput of this rank's tokens, aux over the batch group."""
        self._check(x, layer_index, jitter, gate_noise)
        layer_index, c = int(layer_index), self.config
        lead, d, N, k = x.shape[:-1], c.d_model, c.n_experts, c.top_k
        x2 = x.reshape(-1, d)  # (T, d)
        selected, gate, probs, logits, kept = self._route(x, jitter, gate_noise)  # §3.1–3.4, (T, ·)
        out = self._routed_parallel(x2, selected, gate, kept)  # §3.5 (T, d)
        if c.hyper_expert:
            out = out + self._hyper_expert(x2, selected, layer_index)  # §3.6–3.8, replicated parameters
        sums = _SumOverRanks.apply(aux_sums(logits, probs, selected, gate), self.batch_group)  # (3N + 2,) global
        routing = Routing(selected.reshape(*lead, k), gate.reshape(*lead, k), probs.reshape(*lead, N),
                          logits.reshape(*lead, N), kept.reshape(lead))
        return HyperMoEOutput(out.reshape(x.shape), routing, aux_from_sums(sums))

    def _routed_parallel(self, x2, selected, gate, kept) -> torch.Tensor:
        """§3.5 with the experts on their owners: assignments sorted by expert (stable), rows sent with
        all_to_all_single, each expert's FFN where it lives, outputs sent back, gated and combined here."""
        c, E, n = self.config, self.ep_size, self.n_local
        T, k, N, d = selected.shape[0], c.top_k, c.n_experts, c.d_model
        expert = selected.reshape(-1)  # (T·k,) expert of assignment t·k + slot
        sent = torch.arange(T * k, device=x2.device)  # (T·k,)
        if c.capacity is not None:
            sent = sent[kept]  # k = 1; dropped tokens stay here: routed = g · x
        order = sent[torch.sort(expert[sent], stable=True).indices]  # (A,) by expert, hence by owner rank
        counts = torch.bincount(expert[order], minlength=N)  # (N,) rows for each expert
        received = torch.empty_like(counts)  # (E·n,) [s·n + j]: rows rank s sends to local expert j
        dist.all_to_all_single(received, counts, group=self.group)  # split sizes first
        send_splits = counts.reshape(E, n).sum(1).tolist()  # host sync (the sorted dispatch has one too)
        recv_splits = received.reshape(E, n).sum(1).tolist()
        group = self.group if self.group is not None else dist.group.WORLD
        # funcol: torch's differentiable all_to_all_single (torch.distributed.nn's is deprecated for it); backward
        # is the reverse all_to_all_single
        rows = funcol.all_to_all_single(x2.index_select(0, order // k), recv_splits, send_splits, group)  # (R, d)
        local = torch.arange(n, device=x2.device).repeat(E).repeat_interleave(received)  # (R,) local expert
        back = funcol.all_to_all_single(self._local_experts(rows, local), send_splits, recv_splits, group)  # (A, d)
        back = funcol.wait_tensor(back)
        y = back.new_zeros(T * k, d).index_copy(0, order, back)  # (T·k, d): `order` undone; autocast: back's dtype
        if c.capacity is not None:
            y = torch.where(kept.unsqueeze(-1), y, x2)  # capacity drop rule: routed = g · x
        y = y * gate.reshape(-1, 1).to(x2.dtype)  # gates cast back to x's dtype
        return y if k == 1 else y.reshape(T, k, d).sum(1)

    def _local_experts(self, rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """FFN_{local[i]}(rows[i]) (R, d): rows sorted by local expert (stable: within an expert, by sending rank,
        then in the sender's token order), one GEMM pair per expert, gathered back to the received order."""
        c, ex = self.config, self.experts
        order = torch.sort(local, stable=True).indices  # (R,)
        counts = torch.bincount(local, minlength=self.n_local).tolist()
        w1, b1, w2, b2 = (c_unbind(t) for t in (ex.w1, ex.b1, ex.w2, ex.b2))  # per-expert views
        parts = []
        for e, xs in enumerate(rows.index_select(0, order).split(counts)):
            if xs.shape[0]:
                bias1, bias2 = (None if b is None else b[e] for b in (b1, b2))
                parts.append(expert_ffn(c.activation, xs, w1[e], bias1, w2[e], bias2))  # (rows of e, d)
        ys = torch.cat(parts) if parts else rows.new_zeros((0, c.d_model))  # (R, d) in expert order
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return ys.index_select(0, inverse)


def expert_parallel_(model: nn.Module, group=None, batch_group=None) -> nn.Module:
    """Replace every HyperMoE layer of `model` (a HyperMoETransformer's blocks, or any module holding
    HyperMoELayer children) by its ExpertParallelHyperMoE twin, in place → model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is HyperMoELayer:
                setattr(parent, name, ExpertParallelHyperMoE.from_layer(child, group, batch_group))
    return model


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the expert shards' parameters (everything else is replicated)."""
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelHyperMoE) for p in m.experts.parameters()}
