"""The training loop, one for one process and for a torchrun job: `hypermoe.train.train(cfg, run_dir)`.

Run directory RUN_DIR: train.json (the TrainConfig), log.jsonl (one JSON object per logged step and per eval),
checkpoint/ (checkpoint.py), each file written through ref.files.atomic_output; docs/train.md has the formats.
The strategy (strategy.py), chosen once before the loop, decides what differs under torchrun (`--expert-parallel
P`: experts sharded over P ranks, batches split over all ranks, the checkpoint in torch.distributed.checkpoint's
format); the loop itself has no branch on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from hypermoe.train.config import RUN_ENTRIES, RouterGradientWarning, TrainConfig, differing, lr_at, router_warning
from hypermoe.train.data import batch, open_corpus, train_offsets
from hypermoe.train.objective import _autocast, build_model, build_optimizer, evaluate, total_loss
from hypermoe.train.strategy import Strategy, choose_strategy
from ref.files import atomic_output

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
    strategy = choose_strategy(cfg)  # decided once: the loop below is the same for one process and for P
    try:
        return _train(cfg, Path(run_dir), resume, force, progress, callback, strategy)
    finally:
        strategy.close()


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, force: bool, progress: bool,
           callback: Callable[[dict[str, Any]], None] | None, strategy: Strategy) -> TrainResult:
    import torch

    lead = strategy.lead  # writes train.json and log.jsonl
    corpus = open_corpus(cfg.data)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"corpus vocab_size {corpus.vocab_size} exceeds the model's vocab_size {cfg.model.vocab_size}")
    if len(corpus.train) < cfg.seq_len + 1:
        raise ValueError(f"train.bin holds {len(corpus.train)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    if len(corpus.val) < cfg.seq_len + 1:
        raise ValueError(f"val.bin holds {len(corpus.val)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train config device 'cuda' but torch sees no CUDA device")

    model = strategy.prepare(cfg, build_model(cfg))  # distributed: this rank's expert shards, its own generator
    optimizer = build_optimizer(cfg, model)
    log_file = run_dir / "log.jsonl"
    if resume:
        saved = _read_train_json(run_dir)
        differ = differing(saved.to_dict(), cfg.to_dict(), ignore=("steps",))
        if differ:
            raise ValueError(f"cannot resume {run_dir}: train config field(s) {', '.join(differ)} differ from its "
                             f"train.json (only steps may change)")
        start = strategy.load_checkpoint(run_dir, cfg, model, optimizer)
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
    strategy.on_lead(rewrite)

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
                    windows = strategy.rows(windows)  # this process's sequences
                    x, y = batch(corpus.train, windows, cfg.seq_len, cfg.model.vocab_size)
                    n_tokens = strategy.loss_tokens(cfg)  # None: the mean over x's tokens
                    with _autocast(cfg):
                        out = model(torch.from_numpy(x).to(cfg.device))
                        loss, parts = total_loss(cfg, out, torch.from_numpy(y).to(cfg.device), n_tokens)
                    (loss / cfg.grad_accum).backward()
                    loss_value += float(loss.detach()) / cfg.grad_accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                norm = strategy.sync_and_clip(cfg, model, params)
                loss_value, parts_sum = strategy.job_losses(cfg, loss_value, parts_sum)
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
                    last_eval = {"step": step, **evaluate(cfg, model, corpus.val, strategy)}
                    _write(log, last_eval, callback)
                if last and corpus.test is not None and len(corpus.test) > cfg.seq_len:  # held out until the end
                    test = evaluate(cfg, model, corpus.test, strategy)
                    _write(log, {"step": step, "test_loss": test["val_loss"], "test_ppl": test["val_ppl"]}, callback)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
                    if log is not None:
                        log.flush()
                        os.fsync(log.fileno())
                    strategy.save_checkpoint(run_dir, cfg, step, model, optimizer)
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

