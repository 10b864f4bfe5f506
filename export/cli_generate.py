"""`hypermoe generate`: text from a with-past export on onnxruntime or a model directory on torch (export/generate.py
runs the graph, export/text.py the tokenizers). Heavy imports happen inside the command function."""

from __future__ import annotations

import argparse
import sys

import numpy as np

def register(subparsers) -> None:
    from export.runtime import PROVIDERS

    p = subparsers.add_parser(
        "generate", help="generate text with a language model: onnxruntime (with-past export) or torch (model dir)",
        description="Generates up to --max-new-tokens tokens after the prompt and prints the text, then "
        "onnxruntime-genai's benchmark metrics: prefill (prompt) tokens/s, decode tokens/s and per-token latency "
        "(median and p90 of the decode steps), and the backend used. MODEL is a with-past export directory "
        "(`hypermoe export MODEL_DIR --with-past -o DIR`: model.onnx + genai_config.json) or its .onnx file, run "
        "on onnxruntime with IOBinding (the KV cache stays on the device); or a model directory (config.json kind "
        "'model'), run on torch with its KV cache — the reference backend the export is compared with. Greedy by "
        "default; --temperature > 0 samples (then --top-k, --top-p), reproducibly for a --seed. Tokenizer: "
        "--tokenizer, else the tokenizer.json in MODEL's folder (used automatically when present), else UTF-8 "
        "bytes for a model of vocabulary 256; another model without one takes --prompt-ids and prints ids.")
    p.add_argument("model", metavar="MODEL", help="with-past export directory or .onnx, or a model directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text, encoded by the tokenizer")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="tokens to generate per prompt (default 32); prompt + N must fit the model's context (max_seq_len)")
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="onnxruntime provider: auto (CUDA when usable, else the CPU with a one-line notice), cuda, cpu")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="intra-op threads of onnxruntime or torch (default: theirs)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely ids (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample within the smallest set of ids of probability ≥ P (1 = off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampler (default 0)")
    p.add_argument("--eos-id", type=int, action="append", default=None, metavar="ID",
                   help="stop a sequence after this token (repeatable; default: the export's genai_config.json "
                   "eos_token_id, else none)")
    p.add_argument("--tokenizer", metavar="tokenizer.json", default=None,
                   help="a Hugging Face tokenizer.json, or a directory holding one (needs the tokenizers package, "
                   "extra 'serve'); default: the tokenizer.json in MODEL's folder when there is one, else UTF-8 "
                   "bytes as ids 0..255 for a model whose vocabulary is the 256 bytes; any other model needs "
                   "--tokenizer or --prompt-ids (then the output is printed as ids)")
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="run the prompt as B identical sequences at once (throughput; prints the first)")
    p.add_argument("--print-ids", action="store_true", help="also print the generated token ids")
    p.set_defaults(func=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    from export.generate import export_token_ids, load_decoder
    from export.text import ByteTokenizer, FileTokenizer, encode_prompt, model_tokenizer, parse_ids
    from hypermoe.generation import Sampling, generate

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if args.batch < 1:
        raise ValueError(f"--batch must be ≥ 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
    tokenizer = FileTokenizer(args.tokenizer) if args.tokenizer else None  # a bad one fails before the model loads
    decoder, cfg, backend, notice = load_decoder(args.model, args.provider, threads=args.threads)
    if notice:
        print(notice, file=sys.stderr)
    if tokenizer is None:
        tokenizer = model_tokenizer(args.model, cfg.vocab_size)
    if args.prompt_ids is not None:
        prompt = parse_ids(args.prompt_ids, "--prompt-ids")
    else:
        prompt = encode_prompt(tokenizer, args.prompt, cfg.vocab_size)  # ValueError when no tokenizer fits the model
    if max(prompt) >= cfg.vocab_size:
        raise ValueError(f"prompt token id {max(prompt)} ≥ the model's vocab_size {cfg.vocab_size}")
    if len(prompt) + args.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
                         f"context of {cfg.max_seq_len} positions (max_seq_len)")
    eos, pad = export_token_ids(args.model)
    if args.eos_id is not None:
        eos = tuple(args.eos_id)
    for i in eos:
        if not 0 <= i < cfg.vocab_size:
            raise ValueError(f"--eos-id {i} is not a token id in [0, vocab_size={cfg.vocab_size})")
    result = generate(decoder, [prompt] * args.batch, max_new_tokens=args.max_new_tokens, sampling=sampling,
                      eos_token_ids=eos, pad_token_id=pad, max_length=cfg.max_seq_len)
    tokens = result.tokens[0]
    if tokenizer is not None:
        print(tokenizer.decode(prompt + tokens))
    if args.print_ids or tokenizer is None:  # no tokenizer for this vocabulary: the ids are the output
        print("ids: " + " ".join(map(str, tokens)))
    described = ("none (ids only)" if tokenizer is None else "UTF-8 bytes" if isinstance(tokenizer, ByteTokenizer)
                 else str(tokenizer.path))
    steps_ms = np.asarray(result.step_seconds) * 1e3
    latency = (f"median {np.median(steps_ms):.2f} ms, p90 {np.percentile(steps_ms, 90):.2f} ms" if steps_ms.size
               else "n/a (no decode step)")
    print(f"backend: {backend}; tokenizer {described}; batch {args.batch} × prompt {len(prompt)} tokens, {len(tokens)} new tokens"
          + (" (stopped at EOS)" if tokens and tokens[-1] in eos else ""))
    print(f"prefill {result.prefill_tokens_per_s:,.1f} tokens/s, decode {result.decode_tokens_per_s:,.1f} tokens/s, "
          f"per-token latency {latency}")
    return 0
