"""Expert parallelism for HyperMoE on torch.distributed (docs/parallel.md): gloo on CPU, NCCL on GPUs.

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

Gradients. Every rank back-propagates its own loss; what the ranks compute together is the gradient of the
*sum* of their losses, in which each aux loss counts once (the aux all-reduce passes gradients straight
through: rank r's backward reaches only its own tokens' share, and the shares add up). Expert gradients are
that sum already (the backward all_to_all brings every rank's contribution to the expert's owner); replicated
parameters' gradients are summed by `sync_gradients` (and expert shards held by several expert-parallel
groups, by the expert-replica group). So with loss_r = Σ_{t ∈ rank r} ℓ_t / T_global + aux, the ranks
reproduce the single-process gradient of mean_t ℓ_t + aux over the union of their batches.

Checkpoints: torch.distributed.checkpoint with the expert shards as DTensors (Shard(0) over the expert mesh
dimension), so a checkpoint is one set of global tensors, loadable at another world size and convertible
to an ordinary model directory (`to_model_dir`, `from_model_dir`). Reading back unpickles nothing but the
checkpoint's own metadata classes (`SafeFileSystemReader`).

Axis legend (as hypermoe/layer.py):
    T tokens of this rank   d model width   N experts   k selected experts   E expert-parallel ranks
    n = N / E experts per rank   A assignments this rank sends   R rows this rank receives
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import ref.io
from ref.config import HyperMoEConfig
from ref.files import atomic_output
from hypermoe.layer import (
    HyperMoELayer, HyperMoEOutput, HyperNetwork, Routing, aux_from_sums, aux_sums, c_unbind, expert_ffn,
)

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer fails instead of hanging the job
MESH_DIMS = ("replica", "expert")  # rank = replica · E + expert-parallel rank: an expert group is E consecutive ranks


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------


def init_distributed(device: str = "cpu", timeout: datetime.timedelta = TIMEOUT) -> tuple[int, int]:
    """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): gloo on the CPU,
    NCCL on CUDA (device cuda:LOCAL_RANK) → (rank, world size). ValueError outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("expert parallelism needs torchrun (RANK and WORLD_SIZE are not set): "
                         "torchrun --nproc-per-node P --no-python hypermoe train ... --expert-parallel P")
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def expert_mesh(expert_parallel: int, device: str = "cpu") -> DeviceMesh:
    """The (replica, expert) mesh of the job: W / E replicas of expert-parallel groups of E consecutive ranks.
    mesh["expert"].get_group() dispatches tokens; mesh["replica"].get_group() sums the gradients of the
    ranks holding the same expert shard."""
    world = dist.get_world_size()
    if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise ValueError(f"expert_parallel must be an int ≥ 1, got {expert_parallel!r}")
    if world % expert_parallel:
        raise ValueError(f"the world size {world} is not a multiple of expert_parallel {expert_parallel}")
    return init_device_mesh(device, (world // expert_parallel, expert_parallel), mesh_dim_names=MESH_DIMS)


class _SumOverRanks(torch.autograd.Function):
    """Σ over the group's ranks forward; gradient passed straight through backward: each rank's backward
    reaches its own contribution only, so the ranks' gradients add up to the gradient of one copy of the
    result (module docstring). torch.distributed.nn's all_reduce sums gradients instead (W copies)."""

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


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def sync_gradients(model: nn.Module, *, batch_group=None, replica_group=None) -> None:
    """After backward, before the optimizer: Σ over `batch_group` of each replicated parameter's gradient, and
    Σ over `replica_group` (the ranks holding the same expert shard; None or size 1: nothing to do) of each
    expert shard's. Missing gradients count as 0 (every rank takes part in the same collectives). One
    all-reduce per dtype over the flattened gradients."""
    experts = expert_parameters(model)
    replicated, sharded = [], []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (sharded if id(p) in experts else replicated).append(p.grad)
    _all_reduce_flat(replicated, batch_group)
    if replica_group is not None and dist.get_world_size(replica_group) > 1:
        _all_reduce_flat(sharded, replica_group)


def _all_reduce_flat(grads: list[torch.Tensor], group) -> None:
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])  # (Σ numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def clip_grad_norm_(model: nn.Module, max_norm: float, *, expert_group=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model's gradient (after sync_gradients): the replicated
    parameters' norm² (the same on every rank) plus the expert shards' norm² summed over `expert_group`.
    Scales the gradients by min(1, max_norm / (norm + 1e-6)) as torch does → the norm before clipping."""
    experts = expert_parameters(model)
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    replicated, sharded = torch.zeros((), device=device), torch.zeros((), device=device)  # norm² parts
    for p in params:
        square = p.grad.detach().float().pow(2).sum()
        if id(p) in experts:
            sharded = sharded + square
        else:
            replicated = replicated + square
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=expert_group)  # every expert-parallel rank's shards
    norm = (replicated + sharded).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm


# ---------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint)
# ---------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"  # next to DCP's files: the model config (ref.io's format, kind "model")

# The only globals a checkpoint's .metadata may name (DCP pickles it; everything else is refused).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.distributed.checkpoint.planner", "ReadItem"),
    ("torch", "Size"), ("torch", "float32"), ("torch", "float64"), ("torch", "bfloat16"), ("torch", "float16"),
    ("torch", "int64"), ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "preserve_format"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("torch", "dtype"),
    ("torch", "layout"), ("torch", "memory_format"), ("torch.serialization", "_get_layout"),  # name → torch.strided
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # StorageMeta.checkpoint_id: a path built from a string
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_GLOBALS:
            raise ValueError(f"checkpoint metadata names {module}.{name}, which a hypermoe checkpoint never holds; "
                             "not loaded")
        return super().find_class(module, name)


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader without arbitrary unpickling. DCP pickles `.metadata` and reads it with
    pickle.load, and loads non-tensor entries with torch.load(weights_only=False); tensors themselves it reads
    with torch.load(weights_only=True). Here `.metadata` is unpickled allowing only DCP's metadata classes and
    torch dtypes/sizes, and a checkpoint with any non-tensor entry is refused, so nothing else is unpickled."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (not a torch.distributed.checkpoint directory)")
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP metadata")
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata) or not isinstance(md, TensorStorageMetadata):
                raise ValueError(f"{path}: entry {key!r} is not a tensor; a hypermoe checkpoint holds tensors only")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def sharded_state(model: nn.Module, mesh: DeviceMesh | None, optimizer: torch.optim.Optimizer | None = None,
                  ) -> dict[str, torch.Tensor]:
    """The DCP state of `model` (and AdamW's state): "model.NAME", "optim.NAME.{exp_avg,exp_avg_sq,step}",
    sharing storage with the live tensors (dcp.load writes into them). Expert shards are DTensors placed
    [Replicate(), Shard(0)] on the (replica, expert) mesh: global tensors of all N experts."""
    experts = expert_parameters(model)

    def wrap(p: torch.nn.Parameter, t: torch.Tensor) -> torch.Tensor:
        if id(p) not in experts:
            return t
        return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False)

    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        state[f"model.{name}"] = wrap(p, p.detach())
        if optimizer is not None and p in optimizer.state:
            s = optimizer.state[p]
            state[f"optim.{name}.exp_avg"] = wrap(p, s["exp_avg"])
            state[f"optim.{name}.exp_avg_sq"] = wrap(p, s["exp_avg_sq"])
            state[f"optim.{name}.step"] = s["step"]
    return state


def save_sharded(path: str | os.PathLike, config: HyperMoEConfig, model: nn.Module, mesh: DeviceMesh | None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: every rank writes its shards into the existing directory `path` (the caller stages it
    atomically); rank 0 writes .metadata and config.json."""
    dcp.save(sharded_state(model, mesh, optimizer), storage_writer=dcp.FileSystemWriter(path, thread_count=1))
    if dist.get_rank() == 0:
        (Path(path) / CONFIG_FILE).write_text(_config_json(config))


def load_sharded(path: str | os.PathLike, model: nn.Module, mesh: DeviceMesh | None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: fill `model` (and AdamW's state, created here) from a checkpoint of save_sharded or
    from_model_dir, whatever world size wrote it (DCP reshards). ValueError for another model config."""
    saved, _ = ref.io.read_config(Path(path) / CONFIG_FILE)
    if saved != model.config:
        raise ValueError(f"{path} holds a checkpoint of another model config")
    if optimizer is not None:
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    state = sharded_state(model, mesh, optimizer)
    dcp.load(state, storage_reader=SafeFileSystemReader(path))
    for name, t in state.items():  # DTensor / 0-dim entries may have been replaced rather than filled
        target = _target(model, optimizer, name)
        if target is not None and t is not target:
            target.copy_(t.to_local() if isinstance(t, DTensor) else t)


def _target(model, optimizer, key: str):
    kind, rest = key.split(".", 1)
    if kind == "model":
        return None
    name, field = rest.rsplit(".", 1)
    return optimizer.state[model.get_parameter(name)][field]


def to_model_dir(path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """A sharded checkpoint (save_sharded's directory) → one ordinary model directory (config.json +
    weights.npz, HyperMoETransformer.from_dir), in this single process; written atomically, replaced only with
    `force`."""
    path = Path(path)
    config, kind = ref.io.read_config(path / CONFIG_FILE)
    reader = SafeFileSystemReader(path)
    try:
        reader.read_metadata()  # its checks (DCP's classes only, tensors only) before anything is allocated
        state = {f"model.{name}": torch.full(shape, float("nan"))  # the config's shapes (DCP refuses others), and
                 for name, shape in ref.io.expected_shapes(config, kind).items()}  # NaN where no stored chunk lands
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except ValueError:
        raise
    except (Exception, dcp.CheckpointException) as err:  # a damaged .metadata or shard: pickle's, torch.load's errors,
        cause = next(iter(getattr(err, "failures", {}).values()), (err,))[0]  # or DCP's (a BaseException): per rank
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ValueError(f"{path}: not a readable sharded checkpoint ({type(cause).__name__}"
                         + (f": {message}" if message else "") + ")") from None
    params = {key[len("model."):]: t.float().numpy() for key, t in state.items()}
    bad = sorted(name for name, a in params.items() if not np.isfinite(a).all())  # a damaged .metadata's chunk
    if bad:  # offsets can leave elements unread: dcp.load fills only what the stored chunks cover
        raise ValueError(f"{path}: not a readable sharded checkpoint ({bad[0]!r} is not fully stored, or not finite)")
    return ref.io.save_dir(out, config, params, kind, force=force)


def from_model_dir(model_dir: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """An ordinary model directory → a sharded checkpoint directory (DCP, model.* only, + config.json) that
    load_sharded reads at any world size; written atomically, replaced only with `force`."""
    config, kind = ref.io.load_config(model_dir)
    if kind != "model":  # a training checkpoint holds a whole model (HyperMoETransformer)
        raise ValueError(f"{model_dir}: a saved {kind}, not a model (kind 'model'); from-model converts the model "
                         "directory of a language model")
    config, params, kind = ref.io.load_dir(model_dir)
    state = {f"model.{name}": torch.from_numpy(np.ascontiguousarray(a)) for name, a in params.items()}
    with atomic_output(out, directory=True, force=force) as tmp:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, thread_count=1), no_dist=True)
        (tmp / CONFIG_FILE).write_text(_config_json(config, kind))
    return Path(out)


def _config_json(config: HyperMoEConfig, kind: str = "model") -> str:
    return json.dumps({"spec_version": ref.io.SPEC_VERSION, "kind": kind, **config.to_dict()},
                      indent=2, sort_keys=True) + "\n"


__all__ = ["ExpertParallelHyperMoE", "init_distributed", "expert_mesh", "expert_parallel_", "sync_gradients",
           "clip_grad_norm_", "save_sharded", "load_sharded", "to_model_dir", "from_model_dir",
           "SafeFileSystemReader", "sharded_state"]
