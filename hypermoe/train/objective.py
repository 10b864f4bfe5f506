"""What a run optimises and how it is measured: the model and optimizer it builds, the loss, the validation pass.

    loss   = CE(logits, next tokens) + balance_coef · aux[balance_loss] + z_loss_coef · aux["z_loss"]
             (aux: SPEC.md §4, each term summed over the HyperMoE blocks; balance_loss "switch_balance" or "cv_balance")
    update s (1-based) = AdamW on the mean of grad_accum micro-batches, gradients clipped to grad_clip (global norm)

Axis legend: B sequences per micro-batch, S positions (seq_len), V vocabulary, N experts, k selected experts.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np

import ref.io
from hypermoe.train.config import TrainConfig, differing
from hypermoe.train.data import batch, eval_offsets
from hypermoe.train.strategy import SingleProcess, Strategy

HYPER_HEADS = ("hyper.w_down.", "hyper.w_up.", "hyper.b_down.", "hyper.b_up.")  # the generator's output projections


def load_init(cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The parameters of cfg.init (a model directory of kind "model" whose config equals cfg.model): ValueError
    naming the differing fields otherwise."""
    path = Path(cfg.init)
    if not path.is_dir():
        raise ValueError(f"--init {path}: not a directory (a model directory: config.json + weights)")
    model_cfg, params, kind = ref.io.load_dir(path)
    if kind != "model":
        raise ValueError(f"--init {path}: a model directory of kind {kind!r}; training needs kind 'model'")
    differ = differing(model_cfg.to_dict(), cfg.model.to_dict())
    if differ:
        raise ValueError(f"--init {path}: its config differs from the run's model config in "
                         + ", ".join(f"{k} ({getattr(model_cfg, k)!r} vs {getattr(cfg.model, k)!r})" for k in differ))
    return params


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


def evaluate(cfg: TrainConfig, model, val: np.ndarray, strategy: Strategy | None = None) -> dict[str, Any]:
    """Validation loss and perplexity over eval_offsets, and per HyperMoE block ℓ: expert_fraction[ℓ] (share of the
    T·k assignments each expert got; sums to 1) and hyper_share[ℓ] = ‖ê‖ / (‖y‖ + ‖ê‖), Frobenius norms over all
    eval tokens, y the routed part, ê the HyperExpert (0 for a plain MoE). `strategy` (default one process): under
    a distributed one each batch of windows is split over the ranks (a rank without a window runs a dummy one, not
    counted: every forward is a collective) and the sums are all-reduced."""
    import torch

    strategy = SingleProcess() if strategy is None else strategy

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
                windows = strategy.rows(windows)  # this process's windows
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
    total, n = strategy.sum_eval(cfg, total, n, sq, counts)  # Σ over the ranks (a no-op for one process)
    val_loss = total / n
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "expert_fraction": {str(i): (v / v.sum()).tolist() for i, v in counts.items()},
        "hyper_share": {str(i): (math.sqrt(h) / (math.sqrt(r) + math.sqrt(h)) if h > 0 else 0.0)
                        for i, (r, h) in sq.items()},
    }

