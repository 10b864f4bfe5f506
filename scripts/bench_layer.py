"""Forward time of HyperMoELayer vs the same layer with hyper_expert=False (plain MoE), measured side by side
in one run. Official sizes by default (d=768, f=3072, N=8, a=64, hypernet 128), CPU, fp32.

    python scripts/bench_layer.py --tokens 8192 --threads 2 --repeats 7

Modes: "infer" = eval + no_grad (adapter cache on), "train-fwd" = training-mode forward with autograd
recording (no cache: adapters generated per distinct set present), "train-fwd+bwd" (--backward).
Prints one line per (k, mode, layer) with the median and min in ms, and the HyperExpert overhead."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hypermoe.layer import HyperMoELayer
from ref.config import HyperMoEConfig


def timeit(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {args.threads} threads, T={args.tokens}, {dtype}, median/min of {args.repeats}")
    for k in args.k:
        cfg = HyperMoEConfig(top_k=k)  # official sizes
        torch.manual_seed(0)
        layers = {"hyper": HyperMoELayer(cfg, dtype=dtype), "plain": HyperMoELayer(cfg.replace(hyper_expert=False), dtype=dtype)}
        x = torch.randn(1, args.tokens, cfg.d_model, dtype=dtype)
        modes = ["infer", "train-fwd"] + (["train-fwd+bwd"] if args.backward else [])
        for mode in modes:
            res = {}
            for name, layer in layers.items():
                layer.train(mode != "infer")
                if mode == "infer":
                    def fn(layer=layer):
                        with torch.no_grad():
                            layer(x)
                elif mode == "train-fwd":
                    def fn(layer=layer):
                        layer(x)
                else:
                    xg = x.clone().requires_grad_(True)
                    def fn(layer=layer, xg=xg):
                        layer(xg).output.pow(2).mean().backward()
                t = timeit(fn, args.repeats)
                res[name] = statistics.median(t)
                print(f"k={k} {mode:14s} {name:6s} median {statistics.median(t):8.1f} ms  min {min(t):8.1f} ms")
            print(f"k={k} {mode:14s} HyperExpert overhead {100 * (res['hyper'] / res['plain'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
