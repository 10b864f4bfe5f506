"""The `hypermoe` command line. Each subcommand lives in its own module with two functions:
`register(subparsers)` adds its parser (and sets `func`), the function it sets does the work and
returns the exit status. Heavy imports (torch, onnxruntime) happen inside those functions, so that
`hypermoe --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import threading

import numpy as np

import ref

# modules that provide a `register(subparsers)`; listed in the order `--help` shows them
COMMAND_MODULES = ["hypermoe.cli", "hypermoe.convert.cli", "hypermoe.train.cli", "hypermoe.bench.cli", "conformance.cli",
                   "export.cli", "export.cli_generate"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"hypermoe {version('hypermoe')} (spec {ref.SPEC_VERSION})"
    except PackageNotFoundError:
        return f"hypermoe (not installed) (spec {ref.SPEC_VERSION})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypermoe",
        description="HyperMoE (Zhao et al., ACL 2024): reference, PyTorch implementation, ONNX export, "
        "conformance suite. SPEC.md defines what every implementation computes.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C raises KeyboardInterrupt: every `finally` then
    runs (ref.files removes its staging folders, `hypermoe main` its temporary directory) before the exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # the signals _terminate raised during the running command


def _terminate(signum: int, frame) -> None:
    _received.append(signum)
    raise Terminated(signum)


def _interrupted(command: str, signum: int, notes) -> int:
    print(f"hypermoe {command}: interrupted ({signal.Signals(signum).name})" + "".join(f"; {note}" for note in notes),
          file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: its own; 2 with one line on bad input; 128 + the signal's number when
    interrupted (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), with one line saying what was not written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = {}
    _received.clear()
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s}
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:  # ref.files.atomic_output notes the destinations it left untouched
        return _interrupted(args.command, getattr(err, "signum", signal.SIGINT), getattr(err, "__notes__", ()))
    except BrokenPipeError:  # `hypermoe ... | head`: the reader left; say nothing more (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as if killed by SIGPIPE, as other command-line tools are
    except Exception as err:
        if _received:  # a signal's exception that the interrupted work caught and turned into another error
            return _interrupted(args.command, _received[0], getattr(err, "__notes__", ()))
        if not isinstance(err, (ValueError, FileNotFoundError, PermissionError)):
            raise
        print(f"hypermoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# hypermoe demo: the reference on the built-in default config
# ---------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the NumPy reference on the built-in default config and print routing statistics",
        description="Runs the reference HyperMoE layer (float64) on random tokens with the default config "
        "(official sizes: d=768, f=3072, N=8, k=1, a=64, hypernetwork widths 128) and prints routing, "
        "output and auxiliary-loss statistics.",
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--top-k", type=int, default=None, help="override the config's top_k")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters and inputs (default 0)")
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    if args.tokens < 0 or args.batch < 1:
        raise ValueError(f"--tokens must be ≥ 0 and --batch ≥ 1, got {args.tokens} and {args.batch}")
    cfg = ref.HyperMoEConfig() if args.top_k is None else ref.HyperMoEConfig(top_k=args.top_k)
    params = ref.init(cfg, seed=args.seed)
    x = np.random.default_rng(args.seed + 1).standard_normal((args.batch, args.tokens, cfg.d_model))
    result = ref.layer(cfg, params, x, layer_index=0)
    T = args.batch * args.tokens
    print(f"hypermoe reference demo (spec {ref.SPEC_VERSION}), float64")
    print(f"config: d={cfg.d_model} f={cfg.d_ff} N={cfg.n_experts} k={cfg.top_k} gate={cfg.gate} "
          f"activation={cfg.activation} a={cfg.d_adapter} d_e=d_p=d_h=d_g={cfg.d_generator} d_l={cfg.d_layer_embed}")
    print(f"input: {x.shape} ({T} tokens), {sum(v.size for v in params.values()):,} parameters")
    counts = np.bincount(result.selected.reshape(-1), minlength=cfg.n_experts)
    print("tokens per expert: " + " ".join(f"{i}:{c}" for i, c in enumerate(counts)))
    sets = {tuple(sorted(s)) for s in result.selected.reshape(-1, cfg.top_k).tolist()}
    print(f"distinct selection sets: {len(sets)} of C({cfg.n_experts}, {cfg.top_k}) = "
          f"{math.comb(cfg.n_experts, cfg.top_k)} possible")
    if T:
        rms = lambda a: float(np.sqrt(np.mean(a**2)))  # noqa: E731
        print(f"gates: mean {result.gates.mean():.4f}, min {result.gates.min():.4f}, max {result.gates.max():.4f}")
        print(f"output rms {rms(result.output):.4f} = routed rms {rms(result.routed):.4f} + HyperExpert rms {rms(result.hyper):.4f}")
    print("aux losses: " + ", ".join(f"{k}={v:.4f}" for k, v in result.aux.items()))
    return 0
