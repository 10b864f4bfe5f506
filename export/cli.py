"""`hypermoe export`, `hypermoe verify`, `hypermoe run` and `hypermoe main` (export → verify → run on the
default layer); `hypermoe generate` is export/cli_generate.py. Heavy imports (torch, onnx, onnxruntime) happen inside the command functions."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from export.inputs import run_input as _input  # defined here before the split

FLAVOUR_HELP = ("portable: standard ONNX ops only (runs on onnx.reference and any runtime); fused: routed experts "
                "as one com.microsoft::MoE node (onnxruntime only; no capacity, no erf GELU, ties not guaranteed); sparse: "
                "standard ops, per-expert NonZero dispatch (fastest on onnxruntime CPU; not CUDA-graph capturable)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a HyperMoE layer, stack or model to ONNX and check the file",
        description="Exports a saved model directory (config.json + weights.npz or weights.safetensors, of kind "
        "layer, stack or model), or the built-in default layer (official sizes, ref.init seed 0), to ONNX, in "
        "the portable flavour unless --flavour says otherwise, with torch's dynamo exporter: input "
        "hidden_states (batch, seq, d) → output (+ selected_experts, gates with --routing-outputs); a model: "
        "input_ids (batch, seq) → logits. Dynamic batch and seq. The config and spec version go into the model metadata; onnx.checker (full check) and strict "
        "shape inference run on the written file. A model with --with-past: a directory with model.onnx (one graph "
        "for prefill and decode: input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value → logits, "
        "present.{i}.key/.value, Hugging Face Optimum's names) and genai_config.json (onnxruntime-genai).")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="saved model directory, kind layer, stack or model (default: the built-in default layer)")
    p.add_argument("-o", "--output", default=None, help="output .onnx file (default hypermoe.onnx), or with "
                   "--with-past the output directory (default hypermoe-past); written under a temporary name, "
                   "checked, then renamed in")
    p.add_argument("--force", action="store_true", help="replace an existing output file (default: refuse it)")
    _export_options(p)
    p.add_argument("--with-past", action="store_true",
                   help="a model (kind model) with past key/values (KV cache) as inputs and present ones as outputs, "
                   "for generation; no capacity (it counts the tokens of a whole sequence)")
    p.add_argument("--attention", choices=("standard", "contrib"), default="standard",
                   help="with --with-past only: the cache's attention. standard (default): standard ONNX ops, present "
                   "= past + the new positions (a copy of the whole cache per step); contrib: onnxruntime's "
                   "com.microsoft::GroupQueryAttention with past and present ONE (batch, H, max_length, c) buffer "
                   "written in place (onnxruntime-genai's past_present_share_buffer), for any --flavour; needs head "
                   "width d_model/n_heads a multiple of 8 and float32/float16; prompts are right-padded for it")
    p.add_argument("--logits", choices=("last", "all"), default=None,
                   help="with --with-past only: 'last' (default) computes the final norm and the head for each row's "
                   "last position only, logits (batch, 1, V): what generation reads, and prefill skips the head for "
                   "the other prompt positions; 'all' gives every position's (batch, seq, V), Optimum's layout. "
                   "Without --with-past a model's logits are always every position's")
    p.add_argument("--eos-token-id", type=int, default=None,
                   help="with --with-past only: end-of-sequence id for genai_config.json (default: none)")
    p.add_argument("--pad-token-id", type=int, default=None,
                   help="with --with-past only: padding id for genai_config.json (default 0)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="block-wise symmetric weight quantisation (onnxruntime com.microsoft::MatMulNBits; the fused "
                   "flavour's experts through QMoE, int4 only) of the routed experts, attention qkv/proj, dense MLPs "
                   "and the LM head; router, HyperExpert, embeddings, LayerNorms and biases stay float. float32 "
                   "only. verify checks it against the reference on the dequantised weights and reports the "
                   "change against the float model (default: no quantisation)")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="with --quantize: weights per scale along the input dimension, a power of two ≥ 16 "
                   "(default 32); fused needs d_model and d_ff multiples of it, portable d_ff")
    p.add_argument("--accuracy-level", type=int, choices=(0, 4), default=None,
                   help="with --quantize: 0 (default) float activations, the export computes exactly the dequantised "
                   "model; 4 int8 activations inside MatMulNBits/QMoE, several times faster on the CPU but no "
                   "rounding bound holds, so verify only reports its quality (it also allows fused int8)")
    p.add_argument("--verify", action="store_true", help="verify the exported file against the reference afterwards")
    p.set_defaults(func=export_command)

    p = subparsers.add_parser(
        "verify", help="run an exported file on onnxruntime and compare with the reference (float64)",
        description="Runs MODEL.onnx on onnxruntime with inputs whose routing margins are controlled, runs the "
        "reference on the same inputs and reports max abs/rel error per output and routing agreement. Exit "
        "status 1 when an output is outside its error bound (export/verify.py). A --with-past export (its "
        "directory or model.onnx) also gets: prefill + one-token decode steps, left-padded rows included, against "
        "one full pass; greedy tokens of onnxruntime and PyTorch (hypermoe.model.TorchDecoder) compared where the "
        "top-2 logit gap decides them.")
    p.add_argument("model", help="an .onnx file written by hypermoe export, or a --with-past export's directory")
    p.add_argument("--source", default=None, help="the model directory it was exported from (default: as recorded)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="onnxruntime provider: auto (CUDA when usable, else the CPU with a one-line notice; default), cuda, cpu")
    p.add_argument("--shapes", default="2x16,1x1,3x7", help="(batch)x(seq) list (default 2x16,1x1,3x7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the margin-controlled inputs (default 0)")
    p.set_defaults(func=verify_command)

    p = subparsers.add_parser(
        "run", help="run an exported file on onnxruntime (CUDA when available) and time it",
        description="Runs MODEL.onnx on onnxruntime: the CUDA provider when a usable NVIDIA GPU and CUDA "
        "libraries are present (IOBinding, device-resident inputs and outputs), else the CPU provider with a "
        "one-line notice. Prints median latency and tokens/s.")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--input", default=None, help=".npy file of shape (batch, seq, d) (default: random N(0, 1))")
    p.add_argument("--batch", type=int, default=1, help="sequences of the random input (default 1; not with --input)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence of the random input (default 128)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="onnxruntime provider: auto (CUDA when usable, else the CPU with a one-line notice; default), cuda, cpu")
    p.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (fixed shape, CUDA only)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (median reported; default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--save", default=None, help="write the output tensor to this .npy file")
    p.add_argument("--force", action="store_true", help="replace an existing --save file (default: refuse it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.set_defaults(func=run_command)

    p = subparsers.add_parser(
        "main", help="the whole path on the default layer: build → export → verify → run",
        description="Builds the default HyperMoE layer (official sizes, ref.init seed 0), exports it to ONNX "
        "(sparse flavour on CPU, portable on CUDA), verifies onnxruntime against the NumPy reference on "
        "margin-controlled inputs, runs it on "
        "the best available provider and prints a short report. Exit status 1 if verification fails.")
    p.add_argument("--workdir", default=None, help="where to write hypermoe.onnx (default: a temporary directory, "
                   "removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="without --workdir: keep the temporary directory and say where")
    p.add_argument("--force", action="store_true", help="replace an existing WORKDIR/hypermoe.onnx (default: refuse it)")
    p.add_argument("--flavour", choices=("auto", "portable", "fused", "sparse"), default="auto",
                   help=FLAVOUR_HELP + "; auto (default): sparse on the CPU provider (fastest there, BENCHMARKS.md), "
                   "portable on CUDA (static shapes: CUDA-graph capturable)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="onnxruntime provider: auto (CUDA when usable, else the CPU with a one-line notice; default), cuda, cpu")
    p.add_argument("--seq", type=int, default=128, help="tokens for the timed run (default 128)")
    p.add_argument("--runs", type=int, default=10, help="timed runs of each runtime (median reported; default 10)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="CPU threads of onnxruntime (intra-op) and of PyTorch, the same for both so that the two "
                   "timings compare (default: PyTorch's default, the physical cores); the report states it")
    p.set_defaults(func=main_command)


def _export_options(p) -> None:
    p.add_argument("--flavour", choices=("portable", "fused", "sparse"), default="portable",
                   help=FLAVOUR_HELP + " (default portable)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the graph's weights and activations (default float32)")
    p.add_argument("--hyper-form", choices=("auto", "sets", "grouped", "factored"), default="auto",
                   help="HyperExpert as per-set constants (sets: dense one-hot, grouped: per-set dispatch) or "
                   "factored hypernetwork (default: by size and flavour)")
    p.add_argument("--layer-index", type=int, default=0, help="layer embedding ℓ of a standalone layer (default 0)")
    p.add_argument("--routing-outputs", action="store_true", help="also output selected_experts and gates")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset of the exported graph (default 20; at least 18, "
                   "at most what the installed torch exporter supports)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in default's parameters")


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or s[0] < 1 or s[1] < 0 for s in shapes):
        raise ValueError(f"--shapes must look like 2x16,1x1 (batch ≥ 1, seq ≥ 0), got {text!r}")
    return shapes


def _print_export(result) -> None:
    size = f"{result.bytes / 2**20:.1f} MiB" + (" (external data)" if result.external_data else "")
    print(f"exported {result.path}: {result.kind}, {result.flavour}, {result.dtype}{result.quantize}, HyperExpert form "
          f"{result.hyper_form}, {size}, {result.seconds:.1f} s; onnx.checker (full) and strict shape inference passed")
    for note in result.notes:
        print(f"warning: {note}")


def export_command(args: argparse.Namespace) -> int:
    from export import exporter
    from export.attention_op import check_attention
    from ref.files import check_output

    exporter.check_opset(args.opset)  # both before loading a model that may take a while
    check_attention(args.attention, with_past=args.with_past)  # the config's limits: once it is loaded
    if not args.with_past and (args.eos_token_id is not None or args.pad_token_id is not None):
        raise ValueError("--eos-token-id and --pad-token-id go into a --with-past export's genai_config.json; "
                         "without --with-past there is none (add --with-past, or drop them)")
    if (args.block_size is not None or args.accuracy_level is not None) and args.quantize is None:
        raise ValueError("--block-size and --accuracy-level apply to --quantize; add --quantize int8|int4, or drop them")
    block_size = 32 if args.block_size is None else args.block_size
    if args.quantize is not None:
        from export.quantize import BITS, check_block

        check_block(BITS[args.quantize], block_size)  # the config-dependent checks follow in export_model
    if not args.with_past and args.logits is not None:
        raise ValueError("--logits chooses a --with-past export's logits; without --with-past a model's are every "
                         "position's (add --with-past, or drop --logits)")
    output = args.output or ("hypermoe-past" if args.with_past else "hypermoe.onnx")
    check_output(output, force=args.force, directory=args.with_past,
                 entries=exporter.PAST_ENTRIES if args.with_past else None)
    cfg, params, kind, source = exporter.load_source(args.model_dir, seed=args.seed)
    tokenizer, eos = exporter.model_folder_extras(args.model_dir, args.eos_token_id, with_past=args.with_past)
    result = exporter.export_model(output, cfg, params, kind=kind, layer_index=args.layer_index, dtype=args.dtype,
                                   flavour=args.flavour, hyper_form=args.hyper_form, routing_outputs=args.routing_outputs,
                                   opset=args.opset, source=source, force=args.force, with_past=args.with_past,
                                   eos_token_id=eos, pad_token_id=args.pad_token_id or 0, tokenizer=tokenizer,
                                   quantize=args.quantize, block_size=block_size,
                                   accuracy_level=args.accuracy_level or 0, attention=args.attention, logits=args.logits)
    _print_export(result)
    if args.with_past:
        inputs, outputs = exporter.past_names(cfg.n_layers)
        print(f"with past key/values: {', '.join(inputs[:4])}, … → {', '.join(outputs[:2])}, …; files "
              + ", ".join(sorted(entry.name for entry in Path(output).iterdir())))
    if args.verify:
        return _print_verify(result.path, source=args.model_dir, provider="auto")
    return 0


def _print_verify(path, **kwargs) -> int:
    from export.verify import verify

    report = verify(path, **kwargs)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def verify_command(args: argparse.Namespace) -> int:
    from export.exporter import PAST_MODEL_FILE

    if Path(args.model).is_dir() and not (Path(args.model) / PAST_MODEL_FILE).is_file():
        raise ValueError(f"{args.model} is a directory: verify takes the exported .onnx file, and --source "
                         f"{args.model} for the model directory it was exported from")
    return _print_verify(args.model, source=args.source, provider=args.provider, shapes=_shapes(args.shapes),
                         seed=args.seed)


def run_command(args: argparse.Namespace) -> int:
    from export.runtime import OnnxRunner
    from ref.files import atomic_output, check_output

    if args.runs < 1 or args.warmup < 0:
        raise ValueError(f"--runs must be ≥ 1 and --warmup ≥ 0, got {args.runs} and {args.warmup}")
    save = None
    if args.save:  # numpy's convention: a name without .npy gets it appended
        save = check_output(args.save if args.save.endswith(".npy") else args.save + ".npy", force=args.force)
    runner = OnnxRunner(args.model, args.provider, cuda_graph=args.cuda_graph)
    if runner.notice:
        print(runner.notice)
    x = _input(args, runner)
    outputs = runner(x)
    timing = runner.benchmark(x, warmup=args.warmup, runs=args.runs)
    print(f"{Path(args.model).name} on onnxruntime {runner.provider.upper()} provider: input {x.shape}, "
          f"median {timing.median_ms:.3f} ms over {timing.runs} runs, {timing.tokens_per_s:,.0f} tokens/s")
    print("outputs: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in outputs.items()))
    if save:
        with atomic_output(save, force=args.force) as tmp, open(tmp, "wb") as fh:
            np.save(fh, outputs[runner.outputs[0].name])
        print(f"wrote {save}")
    return 0


def main_command(args: argparse.Namespace) -> int:
    """Export into --workdir (an existing hypermoe.onnx refused unless --force), or into a temporary directory
    that is removed at the end, on failure and on interrupt too, unless --keep."""
    from export.runtime import choose_provider
    from ref.files import check_output

    if args.seq < 1 or args.runs < 1:
        raise ValueError(f"--seq and --runs must be ≥ 1, got {args.seq} and {args.runs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
    if args.keep and args.workdir:
        raise ValueError("--keep goes without --workdir (a --workdir is always kept)")
    provider, _ = choose_provider(args.provider)  # fail fast (before the export) when --provider cuda cannot work
    flavour = args.flavour if args.flavour != "auto" else ("portable" if provider == "cuda" else "sparse")
    if args.workdir:
        if not Path(args.workdir).is_dir():
            raise ValueError(f"--workdir {args.workdir} is not a directory")
        return _main_steps(args, check_output(Path(args.workdir) / "hypermoe.onnx", force=args.force), flavour)
    workdir = Path(tempfile.mkdtemp(prefix="hypermoe-"))
    try:
        return _main_steps(args, workdir / "hypermoe.onnx", flavour)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _main_steps(args: argparse.Namespace, out: Path, flavour: str) -> int:
    import torch

    from export import exporter
    from export.latency import WARMUP, latencies
    from export.runtime import OnnxRunner
    from export.verify import verify

    threads = args.threads or torch.get_num_threads()  # one count for both runtimes (torch's default: physical cores)
    t0 = time.perf_counter()
    cfg, params, kind, source = exporter.load_source(None)
    print(f"1. build: default layer (d={cfg.d_model}, f={cfg.d_ff}, N={cfg.n_experts}, k={cfg.top_k}, "
          f"gate={cfg.gate}, a={cfg.d_adapter}), ref.init seed 0, {sum(v.size for v in params.values()):,} parameters")
    result = exporter.export_model(out, cfg, params, kind=kind, flavour=flavour, routing_outputs=True, source=source,
                                   force=args.force)
    print("2. ", end="")
    _print_export(result)
    runner = OnnxRunner(result.path, args.provider, threads=threads)
    report = verify(result.path, runner=runner, shapes=((2, 16), (1, 1), (3, 7)))
    print("3. " + "\n".join(report.lines()))
    if runner.notice:
        print("4. " + runner.notice)
    x = np.random.default_rng(1).standard_normal((1, args.seq, cfg.d_model)).astype(np.float32)
    device = "cuda" if runner.provider == "cuda" else "cpu"
    ort_ms, torch_ms = latencies(runner, cfg, params, x, device, args.runs, threads)
    cpu = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    print(f"{'   ' if runner.notice else '4. '}run on onnxruntime {runner.provider.upper()} ({cpu}): (1, {args.seq}, "
          f"{cfg.d_model}), {WARMUP} warm-up runs, median of {args.runs}: {ort_ms:.2f} ms, "
          f"{args.seq / ort_ms * 1e3:,.0f} tokens/s")
    if torch_ms is not None:
        print(f"   same input on PyTorch eager ({device.upper()}, {cpu}, hypermoe.layer, float32, timed after "
              f"onnxruntime, {WARMUP} warm-up runs, median of {args.runs}): {torch_ms:.2f} ms, "
              f"{args.seq / torch_ms * 1e3:,.0f} tokens/s")
    kept = args.workdir or args.keep
    print(f"{'PASS' if report.ok else 'FAIL'}: total {time.perf_counter() - t0:.0f} s; file {result.path}"
          + ("" if kept else " (removed at exit; --keep or --workdir keeps it)"))
    return 0 if report.ok else 1
