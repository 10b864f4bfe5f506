"""Training the small HyperMoE transformer on a tokenized corpus: `hypermoe train` and `hypermoe.train.train`.

    loss   = CE(logits, next tokens) + balance_coef · aux[balance_loss] + z_loss_coef · aux["z_loss"]
             (aux: SPEC.md §4, each term summed over the HyperMoE blocks; balance_loss "switch_balance" or "cv_balance")
    lr(s)  = lr · s / warmup_steps                                              s ≤ warmup_steps
           = min_lr + ½ (lr − min_lr) (1 + cos(π · (s − warmup_steps) / (steps − warmup_steps)))   after
    update s (1-based) = AdamW on the mean of grad_accum micro-batches, gradients clipped to grad_clip (global norm)

Data: a corpus directory (`train.bin`, `val.bin`, `test.bin`: flat token ids, uint8 bytes or uint16 BPE; `meta.json`
{"vocab_size", "dtype", "sha256": {split: hex}, "source"}), read through np.memmap. The batch of update s is a
function of (seed, s) only: np.random.default_rng([seed, s]) draws the window offsets, so a resumed run reads the
same batches as an uninterrupted one without any saved data position. Evaluation uses fixed, contiguous,
non-overlapping windows from the start of val.bin covering eval_tokens.

Run directory RUN_DIR: train.json (the TrainConfig), log.jsonl (one JSON object per logged step and per eval),
checkpoint/ (model/ = a "model" directory as HyperMoETransformer.save_dir, optimizer.npz + state.json for AdamW,
rng.npz for torch's generator), each file written through ref.files.atomic_output; docs/train.md has the formats.
Under torchrun (`--expert-parallel P`): experts sharded over P ranks, batches split over all ranks, the checkpoint
in torch.distributed.checkpoint's format (checkpoint/sharded/; hypermoe/parallel.py, docs/parallel.md).

Axis legend: B sequences per micro-batch, S positions (seq_len), V vocabulary, N experts, k selected experts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import ref.io
from ref.config import HyperMoEConfig
from ref.files import atomic_output, sha256_file

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


def load_init(cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The parameters of cfg.init (a model directory of kind "model" whose config equals cfg.model): ValueError
    naming the differing fields otherwise."""
    path = Path(cfg.init)
    if not path.is_dir():
        raise ValueError(f"--init {path}: not a directory (a model directory: config.json + weights)")
    model_cfg, params, kind = ref.io.load_dir(path)
    if kind != "model":
        raise ValueError(f"--init {path}: a model directory of kind {kind!r}; training needs kind 'model'")
    differ = _differing(model_cfg.to_dict(), cfg.model.to_dict())
    if differ:
        raise ValueError(f"--init {path}: its config differs from the run's model config in "
                         + ", ".join(f"{k} ({getattr(model_cfg, k)!r} vs {getattr(cfg.model, k)!r})" for k in differ))
    return params


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of update `step` (1-based): linear warmup, then cosine decay to min_lr at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


class Corpus(NamedTuple):
    train: np.ndarray  # (n_train,) memmap of token ids
    val: np.ndarray  # (n_val,)
    test: np.ndarray | None  # (n_test,); None where the corpus has no test.bin (evaluated once, at the end)
    vocab_size: int
    meta: dict[str, Any]


def open_corpus(path: str | os.PathLike, *, verify: bool = True) -> Corpus:
    """train.bin, val.bin (and test.bin where present) of a corpus directory as memmaps, after checking meta.json, each file's size (a
    multiple of the token size) and, when `verify`, its sha256. ValueError/FileNotFoundError naming the problem."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"corpus directory {path} does not exist (make one with scripts/fetch_corpus.py)")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: no such file (a corpus directory holds meta.json, train.bin, val.bin)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"{meta_file}: 'dtype' must be one of {tuple(TOKEN_DTYPES)}")
    dtype = np.dtype(TOKEN_DTYPES[meta["dtype"]])
    vocab = meta.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= np.iinfo(dtype).max + 1:
        raise ValueError(f"{meta_file}: 'vocab_size' must be an int in [1, {np.iinfo(dtype).max + 1}], got {vocab!r}")
    sha = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    arrays = {}
    for split in ("train", "val", "test"):
        file = path / f"{split}.bin"
        if split == "test" and not file.is_file():
            arrays[split] = None
            continue
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        size = file.stat().st_size
        if size % dtype.itemsize:
            raise ValueError(f"{file}: {size} bytes is not a multiple of {dtype.itemsize} ({meta['dtype']} tokens); "
                             f"the file is truncated or corrupt")
        if size == 0:
            raise ValueError(f"{file}: empty")
        if verify and split in sha and sha256_file(file) != sha[split]:
            raise ValueError(f"{file}: sha256 differs from meta.json's; the file is corrupt or was changed")
        arrays[split] = np.memmap(file, dtype=dtype, mode="r")  # (n,)
    return Corpus(arrays["train"], arrays["val"], arrays["test"], vocab, meta)


def batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (B, S) int64: tokens[o : o + S] and tokens[o + 1 : o + S + 1] for each offset o."""
    window = offsets[:, None] + np.arange(seq_len + 1)  # (B, S + 1)
    chunk = np.asarray(tokens[window], dtype=np.int64)  # (B, S + 1)
    if chunk.max() >= vocab_size:  # cheap here, and it catches a corpus tokenized for a larger vocabulary
        raise ValueError(f"corpus token id {int(chunk.max())} is ≥ the model's vocab_size ({vocab_size})")
    return chunk[:, :-1], chunk[:, 1:]


def train_offsets(cfg: TrainConfig, step: int, n_tokens: int) -> np.ndarray:
    """Window starts of update `step`: (grad_accum · B,) uniform in [0, n − S − 1], from (seed, step) only."""
    return np.random.default_rng([cfg.seed, step]).integers(0, n_tokens - cfg.seq_len, cfg.grad_accum * cfg.batch_size)


def eval_offsets(cfg: TrainConfig, n_tokens: int) -> np.ndarray:
    """Contiguous non-overlapping windows from the start of val.bin: min(eval_tokens, n − 1) // S of them."""
    windows = min(cfg.eval_tokens, n_tokens - 1) // cfg.seq_len
    return np.arange(windows) * cfg.seq_len  # (W,)


# ---------------------------------------------------------------------------------------------
# Model, optimizer, losses
# ---------------------------------------------------------------------------------------------

HYPER_HEADS = ("hyper.w_down.", "hyper.w_up.", "hyper.b_down.", "hyper.b_up.")  # the generator's output projections


def build_model(cfg: TrainConfig):
    import torch

    from hypermoe.model import HyperMoETransformer

    torch.manual_seed(cfg.seed)
    model = HyperMoETransformer(cfg.model, device=cfg.device, dtype=torch.float32)
    if cfg.init is not None:  # fine-tuning: every parameter from the model directory (the optimizer starts fresh)
        model.load_ref(load_init(cfg))
    if cfg.freeze_hyper_heads:  # W_down = b_down = W_up = b_up = 0 ⇒ ê = relu(0) · 0 + 0 = 0 exactly
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(HYPER_HEADS):
                    p.zero_()
                    p.requires_grad_(False)
    return model


def build_optimizer(cfg: TrainConfig, model):
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def total_loss(cfg: TrainConfig, out, targets, n_tokens: int | None = None) -> tuple[Any, dict[str, Any]]:
    """loss = CE + balance_coef · aux[balance_loss] + z_loss_coef · aux["z_loss"] → (loss, its parts). With
    `n_tokens` (a rank of a distributed job): CE summed over this rank's tokens / n_tokens, the global batch's
    token count, so that the ranks' shares add up to the global mean (hypermoe/parallel.py: gradients)."""
    import torch.nn.functional as F

    V = out.logits.shape[-1]
    if n_tokens is None:
        lm = F.cross_entropy(out.logits.float().reshape(-1, V), targets.reshape(-1))  # mean over B·S tokens
    else:
        lm = F.cross_entropy(out.logits.float().reshape(-1, V), targets.reshape(-1), reduction="sum") / n_tokens
    loss = lm + cfg.balance_coef * out.aux[cfg.balance_loss] + cfg.z_loss_coef * out.aux["z_loss"]
    return loss, {"lm_loss": lm, **out.aux}


def _autocast(cfg: TrainConfig):
    import torch

    if cfg.dtype == "bfloat16":
        return torch.autocast(cfg.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(cfg: TrainConfig, model, val: np.ndarray, job: Distributed | None = None) -> dict[str, Any]:
    """Validation loss and perplexity over eval_offsets, and per HyperMoE block ℓ: expert_fraction[ℓ] (share of the
    T·k assignments each expert got; sums to 1) and hyper_share[ℓ] = ‖ê‖ / (‖y‖ + ‖ê‖), Frobenius norms over all
    eval tokens, y the routed part, ê the HyperExpert (0 for a plain MoE). In a distributed `job` each batch of
    windows is split over the ranks (a rank without a window runs a dummy one, not counted: every forward is a
    collective) and the sums are all-reduced."""
    import torch

    offsets = eval_offsets(cfg, len(val))
    if not len(offsets):
        raise ValueError(f"val.bin holds {len(val)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    c = cfg.model
    blocks = [b for b in model.blocks if b.moe is not None]
    counts = {b.index: torch.zeros(c.n_experts, dtype=torch.float64) for b in blocks}
    sq = {b.index: [0.0, 0.0] for b in blocks}  # (‖y‖², ‖ê‖²)

    counting = [True]  # False while a rank runs a dummy window

    def hook(module, args, kwargs, out):  # ê again from the layer's own HyperExpert path (eval only)
        if not counting[0]:
            return
        x, index = args[0], (args[1] if len(args) > 1 else kwargs.get("layer_index", 0))
        x2 = x.reshape(-1, c.d_model)  # (T, d)
        hyper = module._hyper_expert(x2, out.routing.selected.reshape(-1, c.top_k), index)  # (T, d)
        routed = out.output.reshape(-1, c.d_model) - hyper  # (T, d)
        sq[index][0] += float(routed.float().pow(2).sum())
        sq[index][1] += float(hyper.float().pow(2).sum())

    handles = [b.moe.register_forward_hook(hook, with_kwargs=True) for b in blocks if c.hyper_expert]
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad(), _autocast(cfg):
            for start in range(0, len(offsets), cfg.batch_size):
                windows = offsets[start:start + cfg.batch_size]  # (B,)
                if job is not None:
                    windows = windows[_rank_rows(len(windows), job)]
                    counting[0] = len(windows) > 0
                    if not counting[0]:
                        windows = offsets[:1]  # a dummy window: this rank's part of the collectives
                x, y = batch(val, windows, cfg.seq_len, c.vocab_size)
                out = model(torch.from_numpy(x).to(cfg.device))
                if not counting[0]:
                    continue
                logits = out.logits.float()  # (B, S, V)
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, c.vocab_size), torch.from_numpy(y).to(cfg.device).reshape(-1), reduction="sum"))
                n += y.size
                for index, routing in out.routing.items():
                    counts[index] += torch.bincount(routing.selected.reshape(-1).cpu(), minlength=c.n_experts).double()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if job is not None:  # Σ over ranks of every sum, in one all-reduce
        import torch.distributed as dist

        keys = sorted(counts)
        flat = torch.tensor([total, n, *(v for i in keys for v in sq[i])], dtype=torch.float64)
        flat = torch.cat([flat, *(counts[i] for i in keys)]).to(job.device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        total, n = float(flat[0]), int(flat[1])
        for j, i in enumerate(keys):
            sq[i] = [float(flat[2 + 2 * j]), float(flat[3 + 2 * j])]
            counts[i] = flat[2 + 2 * len(keys) + j * c.n_experts:2 + 2 * len(keys) + (j + 1) * c.n_experts]
    val_loss = total / n
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "expert_fraction": {str(i): (v / v.sum()).tolist() for i, v in counts.items()},
        "hyper_share": {str(i): (math.sqrt(h) / (math.sqrt(r) + math.sqrt(h)) if h > 0 else 0.0)
                        for i, (r, h) in sq.items()},
    }


# ---------------------------------------------------------------------------------------------
# Distributed runs (torchrun: expert parallelism, data parallelism for the rest; docs/parallel.md)
# ---------------------------------------------------------------------------------------------


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


def _rank_rows(n: int, job: Distributed) -> np.ndarray:
    """This rank's rows of n (np.array_split: the first n % world ranks get one more)."""
    return np.array_split(np.arange(n), job.world)[job.rank]


def _on_rank0(job: Distributed, fn: Callable[[], Any]) -> None:
    """fn() on rank 0; the other ranks learn whether it failed (then they raise too, instead of waiting for rank 0
    in the next collective)."""
    import torch
    import torch.distributed as dist

    ok = torch.ones((), device=job.device)
    try:
        if job.rank == 0:
            fn()
    except BaseException:
        ok.zero_()
        dist.broadcast(ok, 0)
        raise
    dist.broadcast(ok, 0)
    if not bool(ok):
        raise ValueError("rank 0 failed (see its error)")


def save_checkpoint_sharded(run_dir: Path, cfg: TrainConfig, step: int, model, optimizer, job: Distributed) -> None:
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
        tmp = Path(parallel.broadcast_str(staged, device=job.device))
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


def load_checkpoint_sharded(run_dir: Path, cfg: TrainConfig, model, optimizer, job: Distributed) -> int:
    """Restore a distributed run's checkpoint (same world size: each rank gets its own generator back) → step."""
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
    torch.set_rng_state(torch.from_numpy(rng[f"torch.{job.rank}"]))
    if f"cuda.{job.rank}" in rng:
        torch.cuda.set_rng_state(torch.from_numpy(rng[f"cuda.{job.rank}"]))
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


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
    for name, p in model.named_parameters():
        if name in state["adam_step"]:
            optimizer.state[p] = {
                "step": torch.tensor(state["adam_step"][name], dtype=torch.float32),
                "exp_avg": torch.from_numpy(arrays[f"{name}.exp_avg"]).to(p.device),
                "exp_avg_sq": torch.from_numpy(arrays[f"{name}.exp_avg_sq"]).to(p.device),
            }
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()})
    rng = _read_checkpoint_npz(ckpt / "rng.npz")
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
        int(state["step"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); the checkpoint is damaged") from None
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: not a checkpoint state of hypermoe train ({type(err).__name__}: {err})") from None
    differ = _differing(saved.model.to_dict(), cfg.model.to_dict())
    if differ:
        raise ValueError(f"{ckpt} is a checkpoint of another model config (fields {', '.join(differ)} differ)")
    differ = _differing(saved.to_dict(), cfg.to_dict(), ignore=("model", "steps"))
    if differ:
        raise ValueError(f"{ckpt} was written with other training settings (fields {', '.join(differ)} differ)")
    return state


def _read_checkpoint_npz(file: Path) -> dict[str, np.ndarray]:
    """ref.io.read_npz with the file's name in every error (a truncated or damaged checkpoint file)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (the checkpoint is incomplete)")
    try:
        return ref.io.read_npz(file)
    except ValueError as err:
        raise ValueError(f"{file}: {err}; the checkpoint is damaged") from None


def _differing(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class TrainResult(NamedTuple):
    step: int  # updates done in total
    loss: float  # training loss of the last update
    val_loss: float | None  # of the last evaluation (None if there was none)
    val_ppl: float | None
    tokens_per_s: float  # training tokens per second of this invocation
    run_dir: Path


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, force: bool = False,
          progress: bool = True, callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train from scratch into `run_dir` (refused if it holds a run, unless `force`), or with `resume` continue the
    run there from its checkpoint, with the same config except `steps`. `progress`: a tqdm bar on stderr when it
    is a terminal. `callback(record)` sees every log.jsonl record as it is written (a KeyboardInterrupt raised there
    stops the run like Ctrl-C: the last checkpoint stays).

    Under torchrun (or with cfg.expert_parallel > 1) every rank calls this: the experts are sharded over
    expert_parallel ranks, each micro-batch is split over all ranks, rank 0 writes train.json and log.jsonl, all
    write the checkpoint (torch.distributed.checkpoint); `callback` runs on rank 0 (docs/parallel.md)."""
    import torch

    message = router_warning(cfg)
    if message:
        warnings.warn(message, RouterGradientWarning, stacklevel=2)  # shown once per process (Python's default)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    job = start_distributed(cfg)
    try:
        return _train(cfg, Path(run_dir), resume, force, progress, callback, job)
    finally:
        if job is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, force: bool, progress: bool,
           callback: Callable[[dict[str, Any]], None] | None, job: Distributed | None) -> TrainResult:
    import torch

    lead = job is None or job.rank == 0  # writes train.json and log.jsonl
    corpus = open_corpus(cfg.data)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"corpus vocab_size {corpus.vocab_size} exceeds the model's vocab_size {cfg.model.vocab_size}")
    if len(corpus.train) < cfg.seq_len + 1:
        raise ValueError(f"train.bin holds {len(corpus.train)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    if len(corpus.val) < cfg.seq_len + 1:
        raise ValueError(f"val.bin holds {len(corpus.val)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train config device 'cuda' but torch sees no CUDA device")

    model = build_model(cfg)
    if job is not None:  # same init on every rank (same seed), then each keeps its experts; own RNG per rank after
        from hypermoe import parallel

        parallel.expert_parallel_(model, group=job.expert_group)
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, job.rank]).generate_state(1)[0]))
    optimizer = build_optimizer(cfg, model)
    log_file = run_dir / "log.jsonl"
    if resume:
        saved = _read_train_json(run_dir)
        differ = _differing(saved.to_dict(), cfg.to_dict(), ignore=("steps",))
        if differ:
            raise ValueError(f"cannot resume {run_dir}: train config field(s) {', '.join(differ)} differ from its "
                             f"train.json (only steps may change)")
        if job is None:
            start = load_checkpoint(run_dir, cfg, model, optimizer)
        else:
            start = load_checkpoint_sharded(run_dir, cfg, model, optimizer, job)
        if start >= cfg.steps:  # nothing to do, or fewer steps than done: train.json stays as it is
            raise ValueError(f"{run_dir} is at step {start} of {saved.steps}: "
                             + ("the run is finished; pass --steps N with N > " if start == saved.steps and
                                cfg.steps == saved.steps else f"--steps {cfg.steps} is not past its checkpoint; pass "
                                "--steps N with N > ") + f"{start} to continue it")

        def rewrite() -> None:
            _truncate_log(log_file, start)  # lines past the checkpoint belong to steps that are redone
            if cfg.steps != saved.steps:
                with atomic_output(run_dir / "train.json", force=True) as tmp:
                    tmp.write_text(cfg.to_json())
    else:
        def rewrite() -> None:
            with atomic_output(run_dir, directory=True, force=force, entries=RUN_ENTRIES) as tmp:
                (tmp / "train.json").write_text(cfg.to_json())
                (tmp / "log.jsonl").write_text("")
        start = 0
    if job is None:
        rewrite()
    else:
        _on_rank0(job, rewrite)

    bar = _progress_bar(cfg, start) if progress and lead and sys.stderr.isatty() else None
    tokens_per_update = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    params = [p for p in model.parameters() if p.requires_grad]
    loss_value, last_eval, began = float("nan"), None, time.perf_counter()
    window_start, window_tokens = began, 0
    model.train()
    try:
        with open(log_file, "a") if lead else contextlib.nullcontext() as log:  # log None: not rank 0
            for step in range(start + 1, cfg.steps + 1):
                lr = lr_at(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                offsets = train_offsets(cfg, step, len(corpus.train))  # (grad_accum · B,)
                parts_sum: dict[str, float] = {}
                loss_value = 0.0
                for micro in range(cfg.grad_accum):
                    windows = offsets[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]  # (B,)
                    if job is not None:
                        windows = windows[_rank_rows(len(windows), job)]  # this rank's sequences
                    x, y = batch(corpus.train, windows, cfg.seq_len, cfg.model.vocab_size)
                    n_tokens = None if job is None else cfg.batch_size * cfg.seq_len  # the global micro-batch
                    with _autocast(cfg):
                        out = model(torch.from_numpy(x).to(cfg.device))
                        loss, parts = total_loss(cfg, out, torch.from_numpy(y).to(cfg.device), n_tokens)
                    (loss / cfg.grad_accum).backward()
                    loss_value += float(loss.detach()) / cfg.grad_accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                if job is None:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                else:
                    norm = _sync_and_clip(cfg, model, job)
                    loss_value, parts_sum = _global_losses(cfg, parts_sum, job)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window_tokens += tokens_per_update
                if not math.isfinite(loss_value):
                    raise ValueError(f"training loss is {loss_value} at step {step}; lower --lr or use float32")
                if bar is not None:
                    bar.update(1)
                    rate = (step - start) * tokens_per_update / max(time.perf_counter() - began, 1e-9)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tokens_per_s=f"{rate:,.0f}", refresh=False)
                last = step == cfg.steps
                if step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    record = {"step": step, "lr": lr, "loss": loss_value, **parts_sum, "grad_norm": float(norm),
                              "tokens_per_s": window_tokens / max(now - window_start, 1e-9)}
                    _write(log, record, callback)
                    window_start, window_tokens = now, 0
                paused = time.perf_counter()  # evaluation and checkpoints are not training time
                if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                    last_eval = {"step": step, **evaluate(cfg, model, corpus.val, job)}
                    _write(log, last_eval, callback)
                if last and corpus.test is not None and len(corpus.test) > cfg.seq_len:  # held out until the end
                    test = evaluate(cfg, model, corpus.test, job)
                    _write(log, {"step": step, "test_loss": test["val_loss"], "test_ppl": test["val_ppl"]}, callback)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
                    if log is not None:
                        log.flush()
                        os.fsync(log.fileno())
                    if job is None:
                        save_checkpoint(run_dir, cfg, step, model, optimizer)
                    else:
                        save_checkpoint_sharded(run_dir, cfg, step, model, optimizer, job)
                idle = time.perf_counter() - paused
                window_start += idle
                began += idle
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - began
    done = max(cfg.steps - start, 0)
    return TrainResult(max(cfg.steps, start), loss_value, last_eval and last_eval["val_loss"],
                       last_eval and last_eval["val_ppl"], done * tokens_per_update / max(elapsed, 1e-9), run_dir)


def _write(log, record: dict[str, Any], callback) -> None:
    if log is None:  # a rank other than 0 of a distributed run
        return
    log.write(json.dumps(record) + "\n")  # one write per line: a killed run leaves at most one partial last line
    log.flush()
    if callback is not None:
        callback(record)


def _sync_and_clip(cfg: TrainConfig, model, job: Distributed):
    """A distributed update's gradient: replicated parameters' summed over all ranks, expert shards' over their
    replicas, then the global norm clipped (hypermoe/parallel.py) → the norm before clipping."""
    from hypermoe import parallel

    parallel.sync_gradients(model, replica_group=job.replica_group)
    return parallel.clip_grad_norm_(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                    expert_group=job.expert_group)


def _global_losses(cfg: TrainConfig, parts: dict[str, float], job: Distributed) -> tuple[float, dict[str, float]]:
    """The logged loss and parts of the whole job: lm_loss is each rank's share, summed; the aux losses are the
    global batch's already (the same on every rank)."""
    import torch
    import torch.distributed as dist

    lm = torch.tensor([parts["lm_loss"]], dtype=torch.float64, device=job.device)
    dist.all_reduce(lm)
    parts = {**parts, "lm_loss": float(lm[0])}
    loss = parts["lm_loss"] + cfg.balance_coef * parts[cfg.balance_loss] + cfg.z_loss_coef * parts["z_loss"]
    return loss, parts


def _read_train_json(run_dir: Path) -> TrainConfig:
    file = run_dir / "train.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (not a run directory of hypermoe train)")
    try:
        return TrainConfig.from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def _truncate_log(log_file: Path, step: int) -> None:
    """Keep the records of steps ≤ `step` (rewritten atomically); drop later ones and a partial last line."""
    kept = []
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record.get("step", 0) > step:
                break
            kept.append(line)
    with atomic_output(log_file, force=True) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _progress_bar(cfg: TrainConfig, start: int):
    try:
        from tqdm import tqdm
    except ImportError:
        raise ValueError("the progress bar needs tqdm: pip install 'hypermoe[train]', or pass --quiet") from None
    return tqdm(total=cfg.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of RUN_DIR/log.jsonl (a partial last line, from a killed run, is skipped)."""
    records = []
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


# ---------------------------------------------------------------------------------------------
# hypermoe train
# ---------------------------------------------------------------------------------------------

# CLI option → TrainConfig field (None defaults: "not given", so that --resume can tell an explicit change)
_OPTIONS = {
    "data": "data", "seed": "seed", "steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len",
    "grad_accum": "grad_accum", "lr": "lr", "min_lr": "min_lr", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip", "dtype": "dtype", "device": "device",
    "balance_loss": "balance_loss", "balance_coef": "balance_coef", "z_loss_coef": "z_loss_coef",
    "eval_every": "eval_every", "eval_tokens": "eval_tokens", "checkpoint_every": "checkpoint_every",
    "log_every": "log_every", "freeze_hyper_heads": "freeze_hyper_heads", "expert_parallel": "expert_parallel",
    "init": "init", "allow_router_without_task_gradient": "allow_router_without_task_gradient", "threads": "threads",
}


def register(subparsers) -> None:
    d = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "train", help="train the HyperMoE transformer on a tokenized corpus (checkpoints, exact resume)",
        description="Trains HyperMoETransformer with AdamW (warmup + cosine), writing RUN_DIR/train.json, "
        "RUN_DIR/log.jsonl and RUN_DIR/checkpoint/ (docs/train.md). --resume RUN_DIR continues a run from its "
        "checkpoint; on CPU in float32 the losses equal an uninterrupted run's. Under torchrun, --expert-parallel P "
        "shards the experts over P ranks and splits each batch over all ranks (docs/parallel.md). Presets: "
        + ", ".join(PRESETS) + ".",
    )
    p.add_argument("--config", help="model config JSON (or a model directory: only its config.json, the weights "
                   f"start fresh; --init loads them) or a preset name ({', '.join(PRESETS)}); with --resume, taken "
                   "from the run; with --init, taken from that directory")
    p.add_argument("--init", metavar="MODEL_DIR", help="fine-tune: start from this model directory's weights (kind "
                   "model; its config.json is the model config) with a fresh optimizer and schedule")
    p.add_argument("--data", help="corpus directory (train.bin, val.bin, meta.json; scripts/fetch_corpus.py)")
    p.add_argument("--out", help="run directory to create (refused if it holds a run, unless --force)")
    p.add_argument("--force", action="store_true", help="replace the run in --out")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its checkpoint (options given "
                   "must match its train.json, except --steps)")
    hyper = p.add_mutually_exclusive_group()
    hyper.add_argument("--hyper-expert", dest="hyper_expert", action="store_true", default=None,
                       help="model with the HyperExpert (the config's setting by default)")
    hyper.add_argument("--no-hyper-expert", dest="hyper_expert", action="store_false",
                       help="plain MoE ablation: no HyperExpert")
    p.add_argument("--freeze-hyper-heads", action="store_true", default=None,
                   help="ablation: the HyperExpert's output heads zero and frozen (its output is 0 throughout)")
    p.add_argument("--gate", choices=("topk", "switch"), default=None, help="override the model config's gate: "
                   "'switch' (gate = router probability; top-1 routers learn from the loss) or 'topk' (renormalised "
                   "over the k selected; with k = 1 every gate is 1 and the routers get no task gradient)")
    p.add_argument("--allow-router-without-task-gradient", action="store_true", default=None,
                   help="acknowledge a top-1 'topk' model whose routers the language-model loss cannot reach (the "
                   "official GPT-2 protocol) and silence the warning about it")
    for flag, kind in (("seed", int), ("steps", int), ("batch-size", int), ("seq-len", int), ("grad-accum", int),
                       ("lr", float), ("min-lr", float), ("warmup-steps", int), ("weight-decay", float),
                       ("grad-clip", float), ("balance-coef", float), ("z-loss-coef", float), ("eval-every", int),
                       ("eval-tokens", int), ("checkpoint-every", int), ("log-every", int),
                       ("expert-parallel", int)):
        field = flag.replace("-", "_")
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"default {d[field].default}")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default float32 (bfloat16: autocast)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cpu")
    p.add_argument("--balance-loss", choices=BALANCE_LOSSES, default=None, help="default switch_balance")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, recorded in train.json and "
                   "restored by --resume (default: torch's own choice; 1: bitwise-reproducible runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=train_command)

    c = subparsers.add_parser(
        "checkpoint", help="convert a distributed run's sharded checkpoint to a model directory, and back",
        description="to-model: a torch.distributed.checkpoint directory (a run directory, its checkpoint/ or "
        "checkpoint/sharded/) → one ordinary model directory (config.json + weights.npz). from-model: a model "
        "directory → a sharded checkpoint directory that a run of any world size loads (docs/parallel.md).")
    c.add_argument("direction", choices=("to-model", "from-model"))
    c.add_argument("source", help="to-model: RUN_DIR or its checkpoint; from-model: a model directory")
    c.add_argument("out", help="directory to write (refused if it exists, unless --force)")
    c.add_argument("--force", action="store_true", help="replace OUT")
    c.set_defaults(func=checkpoint_command)


def train_command(args: argparse.Namespace) -> int:
    given = {field: getattr(args, opt) for opt, field in _OPTIONS.items() if getattr(args, opt) is not None}
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise ValueError("--out and --resume name different run directories; --resume RUN_DIR alone continues it")
        run_dir, base = Path(args.resume), _read_train_json(Path(args.resume))
        model = model_config(args.config) if args.config else base.model
        cfg = TrainConfig.from_dict({**base.to_dict(), "model": model.to_dict()}).replace(**given)
    elif args.init:
        if not (args.data and args.out):
            raise ValueError("--data and --out are required with --init MODEL_DIR")
        run_dir, model, cfg = Path(args.out), ref.io.read_config(args.init)[0], None
        if args.config:  # the weights fix the model: a --config may only repeat it
            differ = _differing(model_config(args.config).to_dict(), model.to_dict())
            if differ:
                raise ValueError(f"--config {args.config} contradicts --init {args.init}'s config.json in "
                                 f"field(s) {', '.join(differ)}; leave --config out (--init sets the model)")
    else:
        if not (args.config and args.data and args.out):
            raise ValueError("--config, --data and --out are required (or --resume RUN_DIR)")
        run_dir, model = Path(args.out), model_config(args.config)
        cfg = None
        if os.path.isdir(args.config):
            print(f"note: --config {args.config} uses that directory's config.json only; the weights start fresh "
                  "(--init MODEL_DIR fine-tunes from them)", file=sys.stderr)
    changes = {k: v for k, v in (("hyper_expert", args.hyper_expert), ("gate", args.gate)) if v is not None}
    if args.init and any(getattr(model, k) != v for k, v in changes.items()):
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in changes)} contradict(s) --init "
                         f"{args.init}'s config.json ({', '.join(f'{k}={getattr(model, k)!r}' for k in changes)})")
    model = model.replace(**changes)
    cfg = (cfg.replace(model=model) if cfg else TrainConfig(model=model, **given))
    message = router_warning(cfg)
    if message:
        print(f"hypermoe train: warning: {message}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouterGradientWarning)  # said above, in the CLI's words
        result = train(cfg, run_dir, resume=bool(args.resume), force=args.force, progress=not args.quiet)
    val = "" if result.val_loss is None else f", val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one line, from rank 0
        print(f"{run_dir}: step {result.step}, loss {result.loss:.4f}{val}, {result.tokens_per_s:,.0f} tokens/s")
    return 0


def checkpoint_command(args: argparse.Namespace) -> int:
    from hypermoe import parallel

    convert = parallel.to_model_dir if args.direction == "to-model" else parallel.from_model_dir
    source = Path(args.source)
    if args.direction == "to-model" and (source / "checkpoint" / "sharded").is_dir():
        source = source / "checkpoint" / "sharded"  # a run directory of a distributed run
    elif args.direction == "to-model" and (source / "sharded").is_dir():
        source = source / "sharded"  # its checkpoint directory
    print(convert(source, args.out, force=args.force))
    return 0


__all__ = ["TrainConfig", "TrainResult", "PRESETS", "train", "evaluate", "open_corpus", "lr_at", "read_log",
           "router_gets_task_gradient", "RouterGradientWarning",
           "Distributed", "start_distributed"]
