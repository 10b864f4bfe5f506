"""How a run is spread over processes, decided once before the loop: one process, or a torchrun job with expert
parallelism (docs/parallel.md).

A strategy sets the model up (expert shards, each rank's generator), says which rows of a batch this process
computes, syncs and clips the gradients, turns this process's losses into the job's, and saves and restores the
checkpoint in its format (checkpoint.py). The loop (loop.py) calls these methods and never asks how many processes
there are: parallelism is applied to the model once, before one loop (as torchtitan's Trainer does).

    SingleProcess   the whole batch here; torch's clip_grad_norm_; checkpoint/model + optimizer.npz
    Distributed     each micro-batch split over the ranks (np.array_split), experts sharded over expert groups of
                    expert_parallel ranks, replicated gradients summed; checkpoint/sharded (DCP)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hypermoe.train.checkpoint import load_checkpoint, load_checkpoint_sharded, save_checkpoint, save_checkpoint_sharded
from hypermoe.train.config import TrainConfig


class SingleProcess:
    """One process computes every row of every batch."""

    lead = True  # this process writes train.json and log.jsonl

    def prepare(self, cfg: TrainConfig, model):
        return model

    def rows(self, windows: np.ndarray) -> np.ndarray:
        return windows

    def loss_tokens(self, cfg: TrainConfig) -> int | None:
        return None  # total_loss takes the mean over this micro-batch's tokens

    def sync_and_clip(self, cfg: TrainConfig, model, params: list) -> Any:
        """Clip the global gradient norm → the norm before clipping."""
        import torch

        return torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)

    def job_losses(self, cfg: TrainConfig, loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        return loss, parts

    def sum_eval(self, cfg: TrainConfig, total: float, n: int, sq: dict, counts: dict) -> tuple[float, int]:
        return total, n

    def on_lead(self, fn: Callable[[], Any]) -> None:
        fn()

    def save_checkpoint(self, run_dir: Path, cfg: TrainConfig, step: int, model, optimizer) -> None:
        save_checkpoint(run_dir, cfg, step, model, optimizer)

    def load_checkpoint(self, run_dir: Path, cfg: TrainConfig, model, optimizer) -> int:
        return load_checkpoint(run_dir, cfg, model, optimizer)

    def close(self) -> None:
        pass


class Distributed(NamedTuple):
    """This process's place in a torchrun job. Every micro-batch of batch_size sequences is split over the ranks
    (np.array_split: a rank holds ≥ 1 sequence); the experts are sharded over expert groups of expert_parallel
    ranks (mesh dimension "expert"); all other parameters are replicated and their gradients summed."""

    rank: int
    world: int
    mesh: Any  # torch DeviceMesh (replica, expert)
    device: str  # where collectives' tensors live: "cpu" (gloo) or "cuda" (NCCL)

    @property
    def expert_group(self):
        return self.mesh["expert"].get_group()

    @property
    def replica_group(self):
        return self.mesh["replica"].get_group()

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def prepare(self, cfg: TrainConfig, model):
        """Same init on every rank (same seed), then each keeps its experts; its own generator from here on."""
        import torch

        from hypermoe import parallel

        parallel.expert_parallel_(model, group=self.expert_group)
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, self.rank]).generate_state(1)[0]))
        return model

    def rows(self, windows: np.ndarray) -> np.ndarray:
        """This rank's rows of `windows` (np.array_split: the first n % world ranks get one more)."""
        return windows[np.array_split(np.arange(len(windows)), self.world)[self.rank]]

    def loss_tokens(self, cfg: TrainConfig) -> int:
        return cfg.batch_size * cfg.seq_len  # the global micro-batch: the ranks' CE shares add up to its mean

    def sync_and_clip(self, cfg: TrainConfig, model, params: list) -> Any:
        """A distributed update's gradient: replicated parameters' summed over all ranks, expert shards' over their
        replicas, then the global norm clipped (hypermoe/parallel.py) → the norm before clipping."""
        from hypermoe import parallel

        parallel.sync_gradients(model, replica_group=self.replica_group)
        return parallel.clip_grad_norm_(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                        expert_group=self.expert_group)

    def job_losses(self, cfg: TrainConfig, loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The logged loss and parts of the whole job: lm_loss is each rank's share, summed; the aux losses are the
        global batch's already (the same on every rank)."""
        import torch
        import torch.distributed as dist

        lm = torch.tensor([parts["lm_loss"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(lm)
        parts = {**parts, "lm_loss": float(lm[0])}
        loss = parts["lm_loss"] + cfg.balance_coef * parts[cfg.balance_loss] + cfg.z_loss_coef * parts["z_loss"]
        return loss, parts

    def sum_eval(self, cfg: TrainConfig, total: float, n: int, sq: dict, counts: dict) -> tuple[float, int]:
        """Σ over ranks of every sum of a validation pass, in one all-reduce (sq and counts updated in place)."""
        import torch
        import torch.distributed as dist

        c = cfg.model
        keys = sorted(counts)
        flat = torch.tensor([total, n, *(v for i in keys for v in sq[i])], dtype=torch.float64)
        flat = torch.cat([flat, *(counts[i] for i in keys)]).to(self.device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        total, n = float(flat[0]), int(flat[1])
        for j, i in enumerate(keys):
            sq[i] = [float(flat[2 + 2 * j]), float(flat[3 + 2 * j])]
            counts[i] = flat[2 + 2 * len(keys) + j * c.n_experts:2 + 2 * len(keys) + (j + 1) * c.n_experts]
        return total, n

    def on_lead(self, fn: Callable[[], Any]) -> None:
        """fn() on rank 0; the other ranks learn whether it failed (then they raise too, instead of waiting for
        rank 0 in the next collective)."""
        import torch
        import torch.distributed as dist

        ok = torch.ones((), device=self.device)
        try:
            if self.rank == 0:
                fn()
        except BaseException:
            ok.zero_()
            dist.broadcast(ok, 0)
            raise
        dist.broadcast(ok, 0)
        if not bool(ok):
            raise ValueError("rank 0 failed (see its error)")

    def save_checkpoint(self, run_dir: Path, cfg: TrainConfig, step: int, model, optimizer) -> None:
        save_checkpoint_sharded(run_dir, cfg, step, model, optimizer, self)

    def load_checkpoint(self, run_dir: Path, cfg: TrainConfig, model, optimizer) -> int:
        return load_checkpoint_sharded(run_dir, cfg, model, optimizer, self)

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


Strategy = SingleProcess | Distributed


def start_distributed(cfg: TrainConfig) -> Distributed | None:
    """None for a single process; under torchrun (WORLD_SIZE > 1) or with expert_parallel > 1, join the job
    (ValueError outside torchrun, or with fewer sequences per micro-batch than ranks)."""
    if cfg.expert_parallel == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from hypermoe import parallel

    rank, world = parallel.init_distributed(cfg.device)
    if cfg.batch_size < world:
        raise ValueError(f"train config field 'batch_size' ({cfg.batch_size}) is smaller than the world size "
                         f"({world}); each rank needs at least one sequence per micro-batch")
    return Distributed(rank, world, parallel.expert_mesh(cfg.expert_parallel, cfg.device), cfg.device)


def choose_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy of this process, chosen once: Distributed under torchrun (or expert_parallel > 1), else one
    process."""
    return start_distributed(cfg) or SingleProcess()
