"""A run's checkpoint, RUN_DIR/checkpoint: written atomically (ref.files) and restored exactly, in the one-process
format (model/ = a "model" directory as HyperMoETransformer.save_dir, optimizer.npz + state.json for AdamW, rng.npz
for torch's generator) or the distributed one (sharded/: torch.distributed.checkpoint, + state.json and every rank's
rng.npz; hypermoe/parallel.py, docs/parallel.md). Which one a run uses is its strategy's choice (strategy.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import ref.io
from hypermoe.train.config import TrainConfig, differing
from hypermoe.train.data import corpus_tokenizer
from ref.files import atomic_output

def save_checkpoint(run_dir: Path, cfg: TrainConfig, step: int, model, optimizer) -> None:
    """RUN_DIR/checkpoint, replaced as a whole (atomic): model/, optimizer.npz, state.json, rng.npz."""
    import torch

    names = {p: n for n, p in model.named_parameters()}
    arrays, steps = {}, {}
    for p, state in optimizer.state.items():
        name = names[p]
        arrays[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().numpy()
        arrays[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().numpy()
        steps[name] = float(state["step"])
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    rng = {"torch": torch.get_rng_state().numpy()}
    if cfg.device == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state().numpy()
    with atomic_output(run_dir / "checkpoint", directory=True, force=True) as tmp:
        model.save_dir(tmp / "model")
        tokenizer = corpus_tokenizer(cfg.data, verify=False)  # checked when the run opened the corpus
        if tokenizer is not None:  # the model directory carries the tokenizer its ids mean (hypermoe generate, hf)
            shutil.copyfile(tokenizer, tmp / "model" / tokenizer.name)
        with open(tmp / "optimizer.npz", "wb") as fh:
            np.savez(fh, **arrays)
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "train_config": cfg.to_dict(), "adam_step": steps, "param_groups": groups},
            indent=2, sort_keys=True, default=list) + "\n")
        with open(tmp / "rng.npz", "wb") as fh:
            np.savez(fh, **rng)


def load_checkpoint(run_dir: Path, cfg: TrainConfig, model, optimizer) -> int:
    """Restore model, optimizer and RNG from RUN_DIR/checkpoint → its step. ValueError if it belongs to another
    model config or another run."""
    import torch

    ckpt = run_dir / "checkpoint"
    state = _checkpoint_state(ckpt, cfg)
    if (ckpt / "sharded").is_dir():
        raise ValueError(f"{ckpt} was written by a distributed run of {state.get('world_size')} processes: resume "
                         f"it under torchrun, or convert it (hypermoe checkpoint to-model)")
    model_cfg, params, kind = ref.io.load_dir(ckpt / "model")
    if model_cfg != cfg.model or kind != "model":
        raise ValueError(f"{ckpt / 'model'} holds another model config than the run's")
    model.load_ref(params)
    arrays = _read_checkpoint_npz(ckpt / "optimizer.npz")
    steps = state.get("adam_step")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    if not isinstance(steps, dict) or not set(steps) <= set(shapes) or not all(
            _number(v) and v >= 0 for v in steps.values()):
        raise ValueError(f"{ckpt / 'state.json'}: 'adam_step' must map parameter names to step counts; the "
                         "checkpoint is damaged")
    for name in steps:
        for moment in ("exp_avg", "exp_avg_sq"):
            value = arrays.get(f"{name}.{moment}")
            if value is None or value.shape != shapes[name] or value.dtype != np.float32 or not np.isfinite(value).all():
                got = "missing" if value is None else f"{value.dtype} {value.shape}"
                raise ValueError(f"{ckpt / 'optimizer.npz'}: array '{name}.{moment}' is {got}, expected finite float32 "
                                 f"{shapes[name]}; the checkpoint is damaged")
    for name, p in model.named_parameters():
        if name in steps:
            optimizer.state[p] = {
                "step": torch.tensor(steps[name], dtype=torch.float32),
                "exp_avg": torch.from_numpy(arrays[f"{name}.exp_avg"]).to(p.device),
                "exp_avg_sq": torch.from_numpy(arrays[f"{name}.exp_avg_sq"]).to(p.device),
            }
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()})
    rng = _read_checkpoint_npz(ckpt / "rng.npz")
    _check_rng(ckpt / "rng.npz", rng, ["torch"])
    torch.set_rng_state(torch.from_numpy(rng["torch"]))
    if "cuda" in rng:
        torch.cuda.set_rng_state(torch.from_numpy(rng["cuda"]))
    return int(state["step"])


def _checkpoint_state(ckpt: Path, cfg: TrainConfig) -> dict[str, Any]:
    """state.json of a checkpoint, after checking that it belongs to this model config and run settings."""
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt / 'state.json'}: no such file (the run wrote no checkpoint yet)")
    file = ckpt / "state.json"
    try:
        state = json.loads(file.read_text())
        saved = TrainConfig.from_dict(state["train_config"])
        step, groups = state["step"], state["param_groups"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); the checkpoint is damaged") from None
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: not a checkpoint state of hypermoe train ({type(err).__name__}: {err})") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{file}: 'step' must be an int ≥ 0, got {step!r}; the checkpoint is damaged")
    # AdamW's two groups (matrices with weight decay, the rest without): lr, betas, eps, weight_decay as numbers
    if not isinstance(groups, list) or len(groups) != 2 or not all(
            isinstance(g, dict) and all(_number(g.get(k)) for k in ("lr", "eps", "weight_decay"))
            and isinstance(g.get("betas"), list) and len(g["betas"]) == 2 and all(map(_number, g["betas"]))
            for g in groups):
        raise ValueError(f"{file}: 'param_groups' is not AdamW's two parameter groups; the checkpoint is damaged")
    differ = differing(saved.model.to_dict(), cfg.model.to_dict())
    if differ:
        raise ValueError(f"{ckpt} is a checkpoint of another model config (fields {', '.join(differ)} differ)")
    differ = differing(saved.to_dict(), cfg.to_dict(), ignore=("model", "steps"))
    if differ:
        raise ValueError(f"{ckpt} was written with other training settings (fields {', '.join(differ)} differ)")
    return state


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_rng(file: Path, rng: dict[str, np.ndarray], names: list[str]) -> None:
    """Each generator state a checkpoint restores: uint8, the size torch's own state has (ValueError naming it)."""
    import torch

    size = torch.get_rng_state().numel()
    for name in names:
        value = rng.get(name)
        if value is None or value.dtype != np.uint8 or value.shape != (size,):
            got = "missing" if value is None else f"{value.dtype} {value.shape}"
            raise ValueError(f"{file}: generator state '{name}' is {got}, expected uint8 ({size},); the checkpoint "
                             "is damaged")


def _read_checkpoint_npz(file: Path) -> dict[str, np.ndarray]:
    """ref.io.read_npz with the file's name in every error (a truncated or damaged checkpoint file)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (the checkpoint is incomplete)")
    try:
        return ref.io.read_npz(file)
    except ValueError as err:
        raise ValueError(f"{file}: {err}; the checkpoint is damaged") from None



def save_checkpoint_sharded(run_dir: Path, cfg: TrainConfig, step: int, model, optimizer, job) -> None:
    """RUN_DIR/checkpoint of a distributed run, replaced as a whole (atomic, staged by rank 0): sharded/ (DCP:
    model.* and optim.* with the expert shards as global tensors, + config.json), state.json, rng.npz (every
    rank's generator, `torch.RANK`)."""
    import torch
    import torch.distributed as dist

    from hypermoe import parallel

    with contextlib.ExitStack() as stack:
        staged = ""
        if job.rank == 0:
            staged = str(stack.enter_context(atomic_output(run_dir / "checkpoint", directory=True, force=True)))
            (Path(staged) / "sharded").mkdir()
        tmp = Path(broadcast_str(staged, device=job.device))
        parallel.save_sharded(tmp / "sharded", cfg.model, model, job.mesh, optimizer)
        rngs = {"torch": torch.get_rng_state()}  # (n,) uint8, the same n on every rank
        if job.device == "cuda":
            rngs["cuda"] = torch.cuda.get_rng_state()
        gathered = {}
        for kind, rng in rngs.items():
            gathered[kind] = [torch.empty_like(rng.to(job.device)) for _ in range(job.world)]
            dist.all_gather(gathered[kind], rng.to(job.device))
        if job.rank == 0:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            (tmp / "state.json").write_text(json.dumps(
                {"step": step, "train_config": cfg.to_dict(), "world_size": job.world, "param_groups": groups},
                indent=2, sort_keys=True, default=list) + "\n")
            with open(tmp / "rng.npz", "wb") as fh:
                np.savez(fh, **{f"{kind}.{r}": t.cpu().numpy() for kind, ts in gathered.items()
                                for r, t in enumerate(ts)})
        dist.barrier()  # every rank's shard is written before rank 0 renames the directory in
    dist.barrier()


def broadcast_str(text: str | None, src: int = 0, limit: int = 4096, device: str = "cpu") -> str:
    """`text` of rank `src` on every rank (UTF-8 in a uint8 tensor on `device`: "cuda" for NCCL; no pickle)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(limit + 8, dtype=torch.uint8)
    if dist.get_rank() == src:
        data = text.encode()
        if len(data) > limit:
            raise ValueError(f"broadcast_str: {len(data)} bytes exceed {limit}")
        buf[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        buf[8:8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    buf = buf.to(device)
    dist.broadcast(buf, src)
    buf = buf.cpu()
    size = int.from_bytes(bytes(buf[:8].tolist()), "little")
    return bytes(buf[8:8 + size].tolist()).decode()


def load_checkpoint_sharded(run_dir: Path, cfg: TrainConfig, model, optimizer, job) -> int:
    """Restore a distributed run's checkpoint (same world size: each rank gets its own generator back) → step.
    `job`: the Distributed strategy (strategy.py), this process's place in the job."""
    import torch

    from hypermoe import parallel

    ckpt = run_dir / "checkpoint"
    state = _checkpoint_state(ckpt, cfg)
    if not (ckpt / "sharded").is_dir():
        raise ValueError(f"{ckpt} was written by a single-process run; resume it without torchrun")
    if state.get("world_size") != job.world:
        raise ValueError(f"{ckpt} was written by {state.get('world_size')} processes, this job has {job.world}: "
                         f"resume with torchrun --nproc-per-node {state.get('world_size')}")
    parallel.load_sharded(ckpt / "sharded", model, job.mesh, optimizer)
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()})
    rng = _read_checkpoint_npz(ckpt / "rng.npz")
    _check_rng(ckpt / "rng.npz", rng, [f"torch.{job.rank}"])
    torch.set_rng_state(torch.from_numpy(rng[f"torch.{job.rank}"]))
    if f"cuda.{job.rank}" in rng:
        torch.cuda.set_rng_state(torch.from_numpy(rng[f"cuda.{job.rank}"]))
    return int(state["step"])

