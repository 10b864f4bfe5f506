"""`hypermoe convert`: argument parsing, one call into hypermoe.convert, a summary of what was converted."""

from __future__ import annotations

import argparse

import numpy as np

import ref
import ref.io
from ref.config import ACTIVATIONS
from ref.files import check_output
from hypermoe.convert import convert, hf_config
from hypermoe.convert.common import KINDS, SOURCES, SWITCH_FF_LAYER


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an official HyperMoE checkpoint, or upcycle dense GPT-2 MLPs, to a model directory",
        description="Reads a state dict (torch .bin/.pt via torch.load(weights_only=True), .safetensors, or .npz; "
        "never unpickles code) and writes a hypermoe model directory (config.json + weights.npz or "
        "weights.safetensors). official-gpt2 / official-switch: the official HyperMoE code's checkpoints "
        "(docs/convert.md has the mapping table); gpt2-mlp: copy each dense GPT-2 MLP into every expert, with a "
        "fresh router and hypernetwork whose W_up / b_up heads start at zero (upcycling). A whole GPT-2 language "
        "model (wte, wpe and ln_f present, as in GPT2LMHeadModel's state dict or HF's model.safetensors) becomes "
        "a directory of kind 'model' and needs --heads; HyperMoE layers alone become kind 'stack' (--kind).",
    )
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="layout of STATE_DICT")
    p.add_argument("state_dict", metavar="STATE_DICT", help="a checkpoint folder (config.json + model.safetensors, "
                   "pytorch_model.bin or a sharded *.index.json: every hyperparameter config.json stores is read from "
                   "it), or a torch state dict (.bin, .pt, ...), a .safetensors file, a .npz or a *.index.json (with "
                   "the config.json beside it, if there is one; else the flags give the values); for hypermoe-dense "
                   "a model directory (hypermoe train's checkpoint/model of a "
                   "dense run)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model directory to write (staged "
                   "next to it, then renamed in; its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace an existing MODEL_DIR (default: refuse it)")
    p.add_argument("--stack", choices=tuple(SWITCH_FF_LAYER), help="official-switch: which stack to convert (required)")
    p.add_argument("--capacity", metavar="C|none", help="official-switch: expert capacity per sequence, config.json's "
                   "expert_capacity, or 'none' for no limit (required without a config.json; must agree with it)")
    p.add_argument("--top-k", type=int, default=None, help="official-gpt2 (config.json's k; required without "
                   "one), gpt2-mlp and hypermoe-dense (required)")
    p.add_argument("--gate", choices=("topk", "switch"), default=None, help="hypermoe-dense: the upcycled model's gate "
                   "(default topk: with k = 1 it starts at the dense logits exactly, but its routers get no task "
                   "gradient; switch: gate = router probability)")
    p.add_argument("--no-hyper-expert", dest="no_hyper_expert", action="store_true", default=None,
                   help="hypermoe-dense: upcycle to a plain MoE (no HyperExpert)")
    p.add_argument("--keep-noise", action="store_true", help="official-gpt2: keep w_noise as router.noise_weight "
                   "(noisy gating, for further training)")
    p.add_argument("--experts", type=int, default=None, help="gpt2-mlp and hypermoe-dense: number of experts N "
                   "(required)")
    p.add_argument("--seed", type=int, default=None, help="gpt2-mlp and hypermoe-dense: seed of the fresh parameters "
                   "(default 0)")
    p.add_argument("--moe-every", type=int, default=None, help="gpt2-mlp: upcycle block ℓ when "
                   "ℓ %% moe_every == moe_every - 1 (default 1: every block)")
    p.add_argument("--d-adapter", type=int, default=None, help="gpt2-mlp: HyperExpert width a (default 64)")
    p.add_argument("--hyper-width", type=int, default=None, help="gpt2-mlp: d_e = d_p = d_h = d_g (default 128)")
    p.add_argument("--kind", choices=KINDS, default=None, help="official-gpt2 and gpt2-mlp: 'model' (the whole "
                   "GPT-2 LM: embeddings, attention, norms, head), 'stack' (the HyperMoE layers and hypernetwork "
                   "alone), or 'auto' (default: 'model' when the checkpoint holds wte, wpe and ln_f, else 'stack')")
    p.add_argument("--heads", type=int, default=None, metavar="H", help="kind model: attention heads n_heads "
                   "(config.json's n_head; required without one: a state dict does not store it, and a wrong value "
                   "silently changes every logit): GPT-2 small 12, medium 16, large 20, xl 25")
    p.add_argument("--layer-norm-eps", type=float, default=None, metavar="EPS", help="kind model: LayerNorm eps "
                   "(config.json's layer_norm_epsilon; required without one: GPT-2's is 1e-5)")
    p.add_argument("--format", choices=tuple(ref.io.FORMATS), default="npz", help="weights file of MODEL_DIR: "
                   "weights.npz (default; numpy alone reads it) or weights.safetensors")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="expert (and dense MLP) activation (config.json's activation_function / dense_act_fn; required "
                   "without one: GPT-2's gelu_new is gelu_tanh, Switch's is relu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="weights dtype (default float32)")
    p.add_argument("--verbose", action="store_true", help="kind stack: also list the tensors outside the HyperMoE "
                   "layers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm_flags = {"kind", "heads", "layer_norm_eps"}  # a whole GPT-2 LM
    per_source = {
        "official-gpt2": {"top_k", "keep_noise", "activation", *lm_flags},
        "official-switch": {"stack", "capacity", "activation"},
        "gpt2-mlp": {"top_k", "experts", "seed", "moe_every", "d_adapter", "hyper_width", "activation", *lm_flags},
        "hypermoe-dense": {"top_k", "experts", "seed", "gate", "no_hyper_expert"},
    }[args.source]
    flags = {"stack": args.stack, "capacity": args.capacity, "top_k": args.top_k, "keep_noise": args.keep_noise or None,
             "experts": args.experts, "seed": args.seed, "moe_every": args.moe_every, "d_adapter": args.d_adapter,
             "hyper_width": args.hyper_width, "activation": args.activation, "kind": args.kind, "heads": args.heads,
             "layer_norm_eps": args.layer_norm_eps, "gate": args.gate, "no_hyper_expert": args.no_hyper_expert}
    stray = sorted("--" + k.replace("_", "-") for k, v in flags.items() if v is not None and k not in per_source)
    if stray:
        raise ValueError(f"{', '.join(stray)} do(es) not apply to --from {args.source}")
    if args.kind == "stack" and (args.heads is not None or args.layer_norm_eps is not None):
        raise ValueError("--heads and --layer-norm-eps apply to a whole model, not to --kind stack")
    options: dict = {"dtype": np.dtype(args.dtype)}
    hf, sources = None, {}
    if args.source != "hypermoe-dense":  # a checkpoint: its config.json, if any, and the flags give the values
        _, config_file = hf_config.locate(args.state_dict)
        hf = hf_config.read_json(config_file) if config_file else None
        capacity = args.capacity and ("none" if args.capacity.lower() == "none"
                                      else _positive_int(args.capacity, "--capacity"))
        given = {"top_k": args.top_k, "activation": args.activation, "n_heads": args.heads,
                 "layer_norm_eps": args.layer_norm_eps, "capacity": capacity}
        resolved, sources = hf_config.resolve(args.source, hf, given, args.kind)
        options.update(resolved)
    if args.source == "official-gpt2":
        options.update(kind=args.kind or "auto", keep_noise=args.keep_noise)
    elif args.source == "official-switch":
        if args.stack is None:
            raise ValueError("--from official-switch needs --stack encoder|decoder (one stack per conversion)")
        options["stack"] = args.stack
    elif args.source == "hypermoe-dense":
        if args.experts is None or args.top_k is None:
            raise ValueError("--from hypermoe-dense needs --experts N and --top-k k")
        options.update(n_experts=args.experts, top_k=args.top_k, gate=args.gate or "topk",
                       hyper_expert=not args.no_hyper_expert, seed=args.seed or 0)
    elif args.source == "gpt2-mlp":
        if args.experts is None or args.top_k is None:
            raise ValueError("--from gpt2-mlp needs --experts N and --top-k k")
        options.update(kind=args.kind or "auto", n_experts=args.experts, seed=args.seed or 0,
                       moe_every=args.moe_every or 1)
        sources.update(n_experts="flag --experts", moe_every="flag --moe-every" if args.moe_every else "default")
        widths = ("d_expert_embed", "d_process", "d_hyper", "d_generator")
        sources.update({w: "flag --hyper-width" if args.hyper_width else "default" for w in widths})
        sources.update(d_adapter="flag --d-adapter" if args.d_adapter else "default", d_layer_embed="default")
        if args.d_adapter is not None:
            options["d_adapter"] = args.d_adapter
        if args.hyper_width is not None:
            options.update({k: args.hyper_width for k in widths})
    if args.format == "safetensors":
        ref.io.safetensors_package()  # the package is missing: say so before the (slow) conversion
    check_output(args.output, force=args.force, directory=True, entries=ref.io.ENTRIES)
    result = convert(args.state_dict, args.source, **options)  # slow on big checkpoints: the output is checked first
    if args.source != "hypermoe-dense":
        hf_config.check_shapes(args.source, hf, result.config, result.kind, args.stack, sources)
    out = ref.io.save_dir(args.output, result.config, result.params, result.kind, force=args.force, format=args.format)

    cfg = result.config
    layers = ref.stack_layers(cfg)
    print(f"converted {args.state_dict} ({args.source}) → {out} (kind {result.kind}, {args.dtype}, "
          f"{ref.io.FORMATS[args.format]})")
    if result.kind == "model":
        print(f"model: vocab_size={cfg.vocab_size} max_seq_len={cfg.max_seq_len} n_heads={cfg.n_heads} "
              f"layer_norm_eps={cfg.layer_norm_eps} tie_embeddings={cfg.tie_embeddings}")
    print(f"config: d={cfg.d_model} f={cfg.d_ff} N={cfg.n_experts} k={cfg.top_k} gate={cfg.gate} "
          f"capacity={cfg.capacity} activation={cfg.activation} expert_bias={cfg.expert_bias} "
          f"hyper_expert={cfg.hyper_expert}")
    if cfg.hyper_expert:
        print(f"hypernetwork: d_e={cfg.d_expert_embed} d_p={cfg.d_process} d_h={cfg.d_hyper} d_l={cfg.d_layer_embed} "
              f"d_g={cfg.d_generator} a={cfg.d_adapter}")
    print(f"HyperMoE layers: {len(layers)} of {cfg.n_layers} blocks {layers} (moe_every={cfg.moe_every}), "
          f"{sum(v.size for v in result.params.values()):,} parameters")
    if args.source != "hypermoe-dense":
        print("where each value came from" + ("" if hf else " (no config.json beside the weights)") + ":")
        for line in hf_config.report(args.source, cfg, result.kind, sources):
            print(line)
    if result.unused:
        print(f"unused tensors ({len(result.unused)}):")
        for key, why in result.unused.items():
            print(f"  {key}: {why}")
    if result.kind == "stack":
        print(f"tensors outside the HyperMoE layers, not part of a stack: {len(result.ignored)}"
              + ("" if args.verbose or not result.ignored else " (--verbose lists them)"))
    if args.verbose:
        for key in result.ignored:
            print(f"  {key}")
    return 0


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} must be an int ≥ 1 or 'none', got {text!r}") from None
    if value < 1:
        raise ValueError(f"{flag} must be an int ≥ 1 or 'none', got {value}")
    return value
