"""Where a torch decode step's time goes, against transformers' dense GPT-2 of the same shape (issue 21 §2, §4).

Builds a random HyperMoETransformer (every block HyperMoE, N experts, top-k) and a random GPT2LMHeadModel with the
same d, heads, blocks, vocabulary, positions and n_inner = f; prefills a context of random ids in both, then times
one-token decode steps interleaved (hypermoe's TorchDecoder.step: numpy ids in, last-position logits (B, V) out;
GPT-2: forward with its own DynamicCache, logits[:, -1] to numpy), medians over rounds. --profile prints
torch.profiler's table of one decode step of each.

    python3 scripts/torch_decode_profile.py --batch 1 --context 128 --threads 2 [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def build(args):
    import transformers

    from ref.config import HyperMoEConfig
    from hypermoe.model import HyperMoETransformer

    L = args.context + args.steps * (args.rounds + 1) + 4
    cfg = HyperMoEConfig(d_model=args.d, d_ff=args.f, n_experts=args.experts, top_k=args.k, gate="switch",
                         n_layers=args.blocks, n_heads=args.heads, vocab_size=args.vocab, max_seq_len=L,
                         hyper_expert=not args.no_hyper)
    torch.manual_seed(0)
    ours = HyperMoETransformer(cfg).eval()
    dense = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=L, n_embd=args.d, n_layer=args.blocks, n_head=args.heads,
        n_inner=args.f)).eval()
    return cfg, ours, dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hyper", action="store_true", help="a plain MoE (no HyperExpert)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from hypermoe.model import TorchDecoder

    cfg, ours, dense = build(args)
    B, C = args.batch, args.context
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, args.vocab, (B, C))
    total = C + args.steps * (args.rounds + 1) + 4

    with torch.no_grad():
        decoder = TorchDecoder(ours)
        decoder.begin(B, total)
        decoder.step(prompt, np.ones((B, C), dtype=np.int64), np.broadcast_to(np.arange(C), (B, C)))
        out = dense(torch.from_numpy(prompt), use_cache=True, logits_to_keep=1)  # no (B, C, V) logits
        cache = out.cache if "cache" in out else out.past_key_values
        kw = {"cache" if "cache" in out else "past_key_values": cache}
        seen = C
        times = {"hypermoe": [], "gpt2": []}
        for r in range(args.rounds + 1):  # round 0: warm-up, not counted
            for name in ("hypermoe", "gpt2") if r % 2 == 0 else ("gpt2", "hypermoe"):  # interleaved
                start = time.perf_counter()
                for s in range(args.steps):
                    t = seen + s
                    ids = rng.integers(0, args.vocab, (B, 1))
                    if name == "hypermoe":
                        decoder.step(ids, np.ones((B, t + 1), dtype=np.int64), np.full((B, 1), t))
                    else:
                        logits = dense(torch.from_numpy(ids), use_cache=True, **kw).logits
                        logits[:, -1].float().numpy()
                if r:
                    times[name].append((time.perf_counter() - start) / args.steps)
            seen += args.steps
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name in ("hypermoe", "gpt2"):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for s in range(4):
                        t = seen + s
                        ids = rng.integers(0, args.vocab, (B, 1))
                        if name == "hypermoe":
                            decoder.step(ids, np.ones((B, t + 1), dtype=np.int64), np.full((B, 1), t))
                        else:
                            dense(torch.from_numpy(ids), use_cache=True, **kw).logits[:, -1].numpy()
                print(f"--- {name}: 4 decode steps")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"d {args.d} f {args.f} H {args.heads} blocks {args.blocks} N {args.experts} k {args.k} V {args.vocab} "
          f"context {C} batch {B} threads {args.threads}; median of {args.rounds} rounds × {args.steps} steps")
    for name, v in med.items():
        print(f"  {name:9s} {v * 1e3:7.2f} ms/step  {B / v:8.1f} tokens/s   rounds (ms): "
              + " ".join(f"{x * 1e3:.2f}" for x in times[name]))
    print(f"  hypermoe / gpt2 decode rate: {med['gpt2'] / med['hypermoe']:.3f}")


if __name__ == "__main__":
    main()
