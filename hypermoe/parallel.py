"""Expert parallelism on torch.distributed, around the layer (docs/parallel.md): process groups, gradient sync and
sharded checkpoints; gloo on CPU, NCCL on GPUs.

The layer, ExpertParallelHyperMoE (its experts sharded over an expert-parallel group of E ranks, tokens sent to
their experts' owners), is hypermoe/expert_parallel.py's; this module re-exports it and holds what a job needs
around it.

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
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import ref.io
from ref.config import HyperMoEConfig
from ref.files import atomic_output
from hypermoe.expert_parallel import ExpertParallelHyperMoE, expert_parallel_, expert_parameters

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
