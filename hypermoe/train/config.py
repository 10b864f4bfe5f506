"""What a training run is: TrainConfig (validated once), the built-in model presets and the learning-rate schedule.

    lr(s)  = lr · s / warmup_steps                                              s ≤ warmup_steps
           = min_lr + ½ (lr − min_lr) (1 + cos(π · (s − warmup_steps) / (steps − warmup_steps)))   after
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

import ref.io
from ref.config import HyperMoEConfig

SPLITS = ("train", "val", "test")
TOKEN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
BALANCE_LOSSES = ("switch_balance", "cv_balance")
RUN_ENTRIES = ("train.json", "log.jsonl", "checkpoint")  # what --force may replace in RUN_DIR, nothing else

# Built-in model configs (--config NAME). A dense baseline is a preset too: one expert, k = 1, no HyperExpert is a
# dense MLP of width d_ff (the gate of the only expert is 1; its router gets gradient only from z_loss).
# Top-1 presets use the Switch gate (gate = the router probability): with gate "topk" and k = 1 the renormalised
# gate is p/p = 1, so the language-model loss sends the router no gradient at all (router_gets_task_gradient).
_HYPER_SMALL = dict(d_expert_embed=64, d_process=64, d_hyper=64, d_layer_embed=10, d_generator=64, d_adapter=16)
PRESETS: dict[str, HyperMoEConfig] = {
    # seconds per run on a CPU: tests and smoke checks
    "tiny": HyperMoEConfig(d_model=16, d_ff=32, n_experts=4, top_k=2, d_expert_embed=8, d_process=8, d_hyper=8,
                           d_layer_embed=4, d_generator=8, d_adapter=4, n_layers=2, n_heads=2, max_seq_len=32,
                           vocab_size=256),
    # the CPU experiment: byte vocabulary, 4 blocks, 8 experts top-1
    "cpu-small": HyperMoEConfig(d_model=128, d_ff=256, n_experts=8, top_k=1, gate="switch", n_layers=4, n_heads=4,
                                max_seq_len=128, vocab_size=256, **_HYPER_SMALL),
    "cpu-small-moe": HyperMoEConfig(d_model=128, d_ff=256, n_experts=8, top_k=1, gate="switch", n_layers=4,
                                    n_heads=4, max_seq_len=128, vocab_size=256, hyper_expert=False, **_HYPER_SMALL),
    "cpu-small-k2": HyperMoEConfig(d_model=128, d_ff=256, n_experts=8, top_k=2, n_layers=4, n_heads=4,
                                   max_seq_len=128, vocab_size=256, **_HYPER_SMALL),
    "cpu-small-moe-k2": HyperMoEConfig(d_model=128, d_ff=256, n_experts=8, top_k=2, n_layers=4, n_heads=4,
                                       max_seq_len=128, vocab_size=256, hyper_expert=False, **_HYPER_SMALL),
    "cpu-small-dense": HyperMoEConfig(d_model=128, d_ff=256, n_experts=1, top_k=1, n_layers=4, n_heads=4,
                                      max_seq_len=128, vocab_size=256, hyper_expert=False, **_HYPER_SMALL),
}


@dataclass(frozen=True)
class TrainConfig:
    model: HyperMoEConfig  # the model (a config.json or a preset); hyper_expert False = plain MoE ablation
    data: str  # corpus directory: train.bin, val.bin, meta.json
    seed: int = 0  # model init (torch.manual_seed) and batch draws (default_rng([seed, step]))
    steps: int = 1000  # optimizer updates; also the cosine schedule's horizon
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # S tokens per sequence (≤ model.max_seq_len)
    grad_accum: int = 1  # micro-batches per update (tokens per update = grad_accum · batch_size · seq_len)
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # the cosine decays to this at `steps`
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps
    weight_decay: float = 0.1  # AdamW, on matrices only (dim ≥ 2), as nanoGPT
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.95  # AdamW β2 (0.95: the usual choice for small transformers)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = no clipping (the norm is still logged)
    dtype: str = "float32"  # "float32" or "bfloat16" (torch.autocast; weights and optimizer stay float32)
    device: str = "cpu"  # "cpu" or "cuda"
    balance_loss: str = "switch_balance"  # which §3.8 balance loss is trained: switch_balance | cv_balance
    balance_coef: float = 0.01  # its coefficient (Switch Transformer: 0.01)
    z_loss_coef: float = 0.001  # router z-loss coefficient (ST-MoE: 0.001)
    eval_every: int = 200  # steps between validation passes (and one at the last step); 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per pass (whole windows of seq_len, capped by val.bin)
    checkpoint_every: int = 200  # steps between checkpoints (and one at the last step); 0 = only at the end
    log_every: int = 10  # steps between log.jsonl lines (and the last step)
    freeze_hyper_heads: bool = False  # ablation: HyperExpert output heads zero and frozen, so ê = 0 throughout
    expert_parallel: int = 1  # under torchrun: ranks each expert stack is sharded over (divides N and the world size)
    init: str | None = None  # a model directory (kind "model") whose weights start the run (fine-tuning); None: fresh
    allow_router_without_task_gradient: bool = False  # acknowledge top-1 "topk" routing (see router_gets_task_gradient)
    threads: int | None = None  # torch CPU threads (torch.set_num_threads); None: torch's default. Changes speed and,
    #                              through the reduction order, the last bits: recorded so that --resume restores it

    def __post_init__(self) -> None:
        if not isinstance(self.model, HyperMoEConfig):
            raise ValueError(f"train config field 'model' must be a HyperMoEConfig, got {type(self.model).__name__}")
        for name in ("seed", "steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "eval_every",
                     "eval_tokens", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"train config field {name!r} must be an int, got {value!r}")
            low = 0 if name in ("seed", "warmup_steps", "eval_every", "checkpoint_every") else 1
            if value < low:
                raise ValueError(f"train config field {name!r} must be ≥ {low}, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"train config field {name!r} must be a finite number ≥ 0, got {value!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"train config fields 'beta1', 'beta2' must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.min_lr > self.lr:
            raise ValueError(f"train config field 'min_lr' ({self.min_lr}) must be ≤ lr ({self.lr})")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"train config field 'seq_len' ({self.seq_len}) exceeds the model's max_seq_len "
                             f"({self.model.max_seq_len})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train config field 'dtype' must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"train config field 'device' must be 'cpu' or 'cuda', got {self.device!r}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"train config field 'balance_loss' must be one of {BALANCE_LOSSES}, "
                             f"got {self.balance_loss!r}")
        if not isinstance(self.freeze_hyper_heads, bool):
            raise ValueError(f"train config field 'freeze_hyper_heads' must be a bool, got {self.freeze_hyper_heads!r}")
        if not isinstance(self.allow_router_without_task_gradient, bool):
            raise ValueError("train config field 'allow_router_without_task_gradient' must be a bool, got "
                             f"{self.allow_router_without_task_gradient!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"train config field 'threads' must be null or an int ≥ 1, got {self.threads!r}")
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            raise ValueError(f"train config field 'init' must be a model directory path or null, got {self.init!r}")
        if self.freeze_hyper_heads and not self.model.hyper_expert:
            raise ValueError("train config field 'freeze_hyper_heads' needs a model with hyper_expert=True")
        ep = self.expert_parallel
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1 or self.model.n_experts % ep:
            raise ValueError(f"train config field 'expert_parallel' must be an int ≥ 1 dividing n_experts "
                             f"({self.model.n_experts}), got {ep!r}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("train config must be a JSON object with a 'model' object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**{**data, "model": HyperMoEConfig.from_dict(data["model"])})


def model_config(spec: str) -> HyperMoEConfig:
    """A preset name (PRESETS) or a config JSON file / model directory (ref.io.read_config)."""
    if spec in PRESETS:
        return PRESETS[spec]
    if not os.path.exists(spec):
        raise ValueError(f"--config {spec!r} is neither a file nor a preset ({', '.join(PRESETS)})")
    return ref.io.read_config(spec)[0]


def router_gets_task_gradient(model: HyperMoEConfig) -> bool:
    """Whether the language-model loss reaches the routers. Not with N > 1, k = 1 and gate "topk": the renormalised
    gate is p/p = 1 exactly (SPEC.md §3.3) and the selection is discrete, so the routers learn only from the balance
    and z losses (load-balanced, task-blind routing). gate "switch" (gate = p) or k ≥ 2 let the task gradient in."""
    return not (model.n_experts > 1 and model.top_k == 1 and model.gate == "topk")


class RouterGradientWarning(UserWarning):
    """A trainable router that the language-model loss cannot reach (router_gets_task_gradient)."""


def router_warning(cfg: TrainConfig) -> str | None:
    """The warning for a run whose routers get no task gradient (router_gets_task_gradient), or None: also when the
    run says it means it (allow_router_without_task_gradient: the official GPT-2 protocol does this on purpose)."""
    if router_gets_task_gradient(cfg.model) or cfg.allow_router_without_task_gradient:
        return None
    return (f"top_k = 1 with gate 'topk' and {cfg.model.n_experts} experts: every gate is p/p = 1, so the routers "
            "get no gradient from the language-model loss (only from the balance and z losses). Use gate 'switch' "
            "(--gate switch) for a router that learns, or pass --allow-router-without-task-gradient "
            "(allow_router_without_task_gradient=True) if this is intended.")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of update `step` (1-based): linear warmup, then cosine decay to min_lr at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def differing(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))

