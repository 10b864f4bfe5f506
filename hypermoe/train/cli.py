"""The commands of the training room: `hypermoe train`, `hypermoe checkpoint to-model/from-model`, `hypermoe plot`.
Argument parsing, one call into hypermoe.train (or hypermoe.parallel), printing."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import ref.io

from hypermoe.train.config import (
    BALANCE_LOSSES, PRESETS, RouterGradientWarning, TrainConfig, differing, model_config, router_warning,
)
from hypermoe.train.loop import _read_train_json, train
from hypermoe.train.plot import plot_runs

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
    c.add_argument("direction", choices=("to-model", "from-model"), help="to-model: sharded checkpoint → model "
                   "directory; from-model: model directory → sharded checkpoint")
    c.add_argument("source", help="to-model: RUN_DIR or its checkpoint; from-model: a model directory")
    c.add_argument("out", help="directory to write (refused if it exists, unless --force)")
    c.add_argument("--force", action="store_true", help="replace OUT")
    c.set_defaults(func=checkpoint_command)
    register_plot(subparsers)


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
            differ = differing(model_config(args.config).to_dict(), model.to_dict())
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
    needed = (".metadata", parallel.CONFIG_FILE)  # DCP's index, and the config
    if args.direction == "to-model" and not all((source / name).is_file() for name in needed):
        single = next((p for p in (source / "checkpoint" / "model", source / "model")
                       if (p / parallel.CONFIG_FILE).is_file()), None)
        raise ValueError(f"{source} is not a sharded checkpoint (no .metadata and {parallel.CONFIG_FILE} of "
                         "torch.distributed.checkpoint); to-model takes the run directory of a distributed run "
                         "(--expert-parallel), its checkpoint/ or checkpoint/sharded/"
                         + (f"; this single-process checkpoint's model directory is {single} already" if single else ""))
    print(convert(source, args.out, force=args.force))
    return 0



def register_plot(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", help="PNG plots of training runs: loss curves, expert load per layer",
        description="Reads RUN_DIR/log.jsonl of each `hypermoe train` run and writes into OUT_DIR: loss.png "
        "(training and validation loss of every run on one axis), expert_load_layer{L}.png (per MoE layer, a "
        "heatmap per run of each expert's fraction of the tokens over the evaluation steps) and hyper_share.png. "
        "A plot whose data no log holds is skipped with a note.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding log.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                   help="directory for the PNGs (created if missing; its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace existing PNGs of the same names (default: refuse)")
    p.set_defaults(func=plot_command)


def plot_command(args: argparse.Namespace) -> int:
    for path in plot_runs(args.run_dirs, args.output, force=args.force):
        print(f"wrote {path}")
    return 0
