"""`hypermoe bench` (the layer benchmark) and `hypermoe bench --generation`: options → one run → tables on stdout,
--json / --markdown written atomically."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import ref.io
from ref import HyperMoEConfig
from ref.files import atomic_output, check_output
from hypermoe import bench  # the layer benchmark, through the package: bench.run is looked up when a command runs
from hypermoe.bench import generation


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark the HyperMoE layer against the official approach (CPU or CUDA)",
        description="Times, side by side in one run, the official HyperMoE approach (per-token generated "
        "HyperExpert weights, HF-style expert loop), hypermoe's layer, the same layer without the HyperExpert "
        "and onnxruntime on the exported layer, at the official sizes (d=768, f=3072, N=8, a=64, hypernetwork "
        "widths 128, layer embedding 10). With --generation: text generation with a GPT-2-small-sized HyperMoE language "
        "model instead (hypermoe/bench/generation.py). Progress goes to stderr, the tables to stdout.",
    )
    p.add_argument("--quick", action="store_true", help="a subset that takes 2½–3 minutes on 2 cores (k=1, T=64 and 1024)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch runs (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads (default: torch's, = cores)")
    p.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    p.add_argument("--force", action="store_true", help="replace existing --json/--markdown files (default: refuse them)")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts T (default 64 1024 8192)")
    p.add_argument("--top-k", type=int, nargs="+", dest="top_k", help="top-k values (default 1 2)")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), help="default fp32 on cpu, fp32 bf16 on cuda")
    p.add_argument("--impls", nargs="+", choices=bench.IMPLS, help=f"implementations (default all: {' '.join(bench.IMPLS)})")
    p.add_argument("--modes", nargs="+", choices=bench.MODES, help="fwd and/or fwd+bwd (default both)")
    p.add_argument("--config", metavar="FILE", help="a config.json to benchmark instead of the official sizes "
                   "(its top_k is replaced by --top-k's values)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters and inputs (default 0)")
    p.add_argument("--render", metavar="JSON", help="print the tables of an earlier run's --json file and exit (runs nothing)")
    p.add_argument("--generation", action="store_true",
                   help="instead: text generation with a GPT-2-small-sized HyperMoE LM (d=768, 12 blocks, V=50257, "
                   "1024 positions, N=8, k=1) upcycled from transformers' dense GPT2LMHeadModel of that shape: "
                   "prefill (prompt 128, 1024) and decode (batch 1, 8; context 128, 1024) tokens/s of transformers' "
                   "dense model (hf-gpt2, the base of every ratio), onnxruntime on each --exports graph, torch with "
                   "its KV cache and torch recomputing, side by side (hypermoe/bench/generation.py). Takes ≈ 23 min "
                   "on 2 quiet cores with the five default exports (≈ 2 min each), --quick (a narrower 4-block model) "
                   "≈ 7 min; peaks at ≈ 15 GB of memory and needs 2 GB of temporary disk per fp32 export (deleted "
                   "after the run); uses --quick, --device, --threads, --config, --seed, "
                   "--json, --markdown, --force, --exports, --no-dense")
    p.add_argument("--exports", nargs="+", metavar="EXPORT",
                   help="--generation: the with-past exports, one onnxruntime row each, as FLAVOUR[:fp16|:bf16]"
                   "[:int8|:int4[:acc4]][:contrib] (FLAVOUR portable, sparse or fused; :fp16/:bf16 = --dtype float16/"
                   "bfloat16 (for --device cuda), :int8/:int4 = --quantize, :acc4 = --accuracy-level 4, :contrib = "
                   "--attention contrib of hypermoe export). Default: " + " ".join(generation.Options().exports))
    p.add_argument("--no-dense", action="store_true",
                   help="--generation: leave out transformers' dense GPT-2 row (then the model is a random HyperMoE "
                   "model, not an upcycled one, and ratios are to torch-kv)")
    p.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    if args.render:
        try:
            with open(args.render) as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--render {args.render}: cannot read a benchmark JSON ({err})") from None
        if generation.is_result(result):
            print(generation.markdown(result))
            return 0
        if not isinstance(result, dict) or not {"meta", "gemm", "rows"} <= set(result):
            raise ValueError(f"--render {args.render}: not a `hypermoe bench --json` file")
        print(bench.markdown(result))
        return 0
    if args.generation:
        return generation_command(args)
    if args.exports or args.no_dense:
        raise ValueError("--exports and --no-dense apply to --generation (the layer benchmark's rows are chosen with "
                         "--impls)")
    changes: dict[str, Any] = {"device": args.device, "threads": args.threads, "seed": args.seed}
    changes["dtypes"] = tuple(args.dtypes) if args.dtypes else (("fp32", "bf16") if args.device == "cuda" else ("fp32",))
    for name, value in (("tokens", args.tokens), ("top_ks", args.top_k), ("impls", args.impls), ("modes", args.modes)):
        if value:
            changes[name] = tuple(value)
    if any(T < 1 for T in changes.get("tokens", ())) or any(k < 1 for k in changes.get("top_ks", ())):
        raise ValueError("--tokens and --top-k must be ≥ 1")
    if args.config:
        changes["cfg"] = config_option(args.config)
    check_outputs(args)
    if args.device == "cuda" and not args.quick:
        changes["gemm_sizes"] = (4096, 8192)  # a GPU needs the larger GEMM to approach its peak
    opts = bench.Options.quick(**changes) if args.quick else bench.Options(**changes)
    command = " ".join(["hypermoe", *sys.argv[1:]]) if sys.argv[0].endswith("hypermoe") else None
    return run_and_report(args, lambda progress: bench.run(opts, progress=progress), bench.markdown, command)


def config_option(path: str) -> HyperMoEConfig:
    """--config: a bare config JSON, a model directory's config.json (kind, spec_version), or the directory."""
    try:
        cfg, _ = ref.io.read_config(path)
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror})") from None
    return cfg


def check_outputs(args: argparse.Namespace) -> None:
    """--json / --markdown refused before the run (which takes minutes) when they exist without --force."""
    for out in (args.json, args.markdown):
        if out:
            check_output(out, force=args.force)


def run_and_report(args: argparse.Namespace, run_fn, markdown_fn, command: str | None) -> int:
    """Run a benchmark (`run_fn(progress)` → result with a "meta" dict; progress lines go to stderr), record the
    command and wall time, print `markdown_fn(result)` and write --json / --markdown atomically."""
    started = time.perf_counter()
    result = run_fn(lambda message: print(message, file=sys.stderr, flush=True))
    result["meta"]["command"] = command
    result["meta"]["wall_s"] = time.perf_counter() - started
    text = markdown_fn(result)
    print(text)
    if args.json:
        with atomic_output(args.json, force=args.force) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    if args.markdown:
        with atomic_output(args.markdown, force=args.force) as tmp:
            tmp.write_text(text)
    return 0


LAYER_ONLY = ("tokens", "top_k", "dtypes", "impls", "modes")  # hypermoe bench options of the layer benchmark


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run (the options that change what is measured; outputs left out)."""
    words = ["hypermoe", "bench", "--generation"]
    words += ["--quick"] if args.quick else []
    words += ["--device", args.device] if args.device != "cpu" else []
    words += ["--threads", str(args.threads)] if args.threads else []
    words += ["--exports", *dict.fromkeys(args.exports)] if getattr(args, "exports", None) else []
    words += ["--no-dense"] if getattr(args, "no_dense", False) else []
    words += ["--config", args.config] if args.config else []
    words += ["--seed", str(args.seed)] if args.seed else []
    return " ".join(words)


def generation_command(args: argparse.Namespace) -> int:
    """`hypermoe bench --generation …`: run, print the table, write --json/--markdown atomically."""
    given = [f"--{name.replace('_', '-')}" for name in LAYER_ONLY if getattr(args, name, None)]
    if given:
        raise ValueError(f"{', '.join(given)}: options of the layer benchmark, not of --generation")
    changes: dict[str, Any] = {"device": args.device, "threads": args.threads, "seed": args.seed}
    if getattr(args, "exports", None):
        changes["exports"] = tuple(dict.fromkeys(args.exports))
    if getattr(args, "no_dense", False):
        changes["dense"] = False
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
    opts = generation.Options.quick(**changes) if args.quick else generation.Options(**changes)
    if args.config:
        opts.cfg = config_option(args.config)
    generation.check_options(opts)
    check_outputs(args)
    return run_and_report(args, lambda progress: generation.run(opts, progress=progress), generation.markdown,
                          command_line(args))

