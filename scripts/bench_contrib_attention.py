"""Decode tokens/s of the with-past export with the standard attention (Concat of the whole cache every step) next to
`--attention contrib` (GroupQueryAttention, one shared max_length buffer per block), at batch B and contexts C, on
onnxruntime's CPU through export.generate.OrtDecoder and hypermoe.generation.generate (issue 21 §2).

    python scripts/bench_contrib_attention.py                  # d 256, 4 blocks, 4 heads, V 50257, 1024 positions
    python scripts/bench_contrib_attention.py --rounds 5 --threads 2

Method as `hypermoe bench --generation` (hypermoe/bench/generation.py): random parameters (torch's RNG, seed 0),
random prompts of C tokens (C − n where C + n would not fit), n new tokens by temperature-1 sampling with a fixed
seed, decode tokens/s = B · (n − 1) steps / their time; one warm-up each, then rounds that call every (attention,
context) once in an order rotated from round to round; the median over rounds and the min–max. Prints one line per
(attention, context) and the ratio C_max / C_min per attention."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from export.exporter import export_model
from export.generate import OrtDecoder
from hypermoe.generation import Sampling, generate
from hypermoe.layer import params_to_ref
from hypermoe.model import HyperMoETransformer
from ref.config import HyperMoEConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--flavour", default="sparse")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--new-tokens", type=int, default=17)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    cfg = HyperMoEConfig(vocab_size=50257, max_seq_len=1024, n_layers=args.layers, n_heads=args.heads, top_k=1,
                         d_model=args.d_model, d_ff=args.d_ff)
    torch.manual_seed(0)
    params = params_to_ref(HyperMoETransformer(cfg).eval())
    rng = np.random.default_rng(0)
    P, n, B = cfg.max_seq_len, args.new_tokens, args.batch
    prompts = {C: rng.integers(0, cfg.vocab_size, (B, C if C + n <= P else C - n)).tolist() for C in args.contexts}
    with tempfile.TemporaryDirectory() as tmp:
        decoders = {}
        for attention in ("standard", "contrib"):
            r = export_model(Path(tmp) / attention, cfg, params, kind="model", with_past=True, attention=attention,
                             flavour=args.flavour, source="scripts/bench_contrib_attention.py")
            print(f"exported {attention}: {r.seconds:.0f} s", flush=True)
            decoders[attention] = OrtDecoder(Path(tmp) / attention, "cpu", threads=args.threads)
        cases = [(a, C) for a in decoders for C in args.contexts]

        def run(case):
            a, C = case
            result = generate(decoders[a], prompts[C], max_new_tokens=n, sampling=Sampling(temperature=1.0, seed=0))
            return (result.decode_tokens_per_s, B * 1e3 / result.latency_ms), result.tokens

        for case in cases:  # warm-up
            run(case)
        rates: dict = {case: [] for case in cases}
        tokens: dict = {}
        for i in range(args.rounds):
            for case in cases[i % len(cases):] + cases[:i % len(cases)]:
                rate, toks = run(case)
                rates[case].append(rate)
                tokens.setdefault(case[1], {})[case[0]] = toks
            print(f"round {i + 1}: " + ", ".join(f"{a} C={C} {rates[a, C][-1][0]:.1f}" for a, C in cases), flush=True)
    print(f"d {cfg.d_model}, {cfg.n_layers} blocks, {cfg.n_heads} heads, V {cfg.vocab_size}, N {cfg.n_experts}, "
          f"f {cfg.d_ff}, {args.flavour}; batch {B}, {n - 1} decode steps, {args.rounds} rounds (median [min–max])")
    lo, hi = min(args.contexts), max(args.contexts)
    for i, what in enumerate(("decode tokens/s (B · steps / their time)", "B / median step (robust to load spikes)")):
        print(what)
        med = {case: statistics.median(r[i] for r in rates[case]) for case in cases}
        for a, C in cases:
            r = [x[i] for x in rates[a, C]]
            print(f"  {a:8s} C={C:5d}: {med[a, C]:7.1f} tokens/s [{min(r):.1f}–{max(r):.1f}]")
        print("  " + "; ".join(f"{a}: C={hi} / C={lo} = {med[a, hi] / med[a, lo]:.2f}" for a in decoders))
    same = all(t["standard"] == t["contrib"] for t in tokens.values())
    print(f"  sampled tokens of the last round, standard == contrib: {same}")


if __name__ == "__main__":
    main()
