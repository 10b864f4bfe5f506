"""Forward time of HyperMoELayer next to the same layer with hyper_expert=False (plain MoE), measured side by
side in one run (the two alternate call by call, so they share the machine's noise). Official sizes (d=768,
f=3072, N=8, a=64, hypernetwork widths 128), random near-uniform routing.

    python scripts/bench_layer.py                         # CPU, fp32, T=8192, k=1 and 2, 2 threads
    python scripts/bench_layer.py --device cuda --dtype bfloat16 float32 --tokens 1 64 1024 8192

Modes: "infer" = eval + no_grad (the adapter cache is used); "train-fwd" = training-mode forward recording
autograd (adapters generated per distinct set present); "train-fwd+bwd" with --backward.
Prints one line per (dtype, T, k, mode, layer): median and min in ms, then the HyperExpert overhead."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hypermoe.layer import HyperMoELayer
from ref.config import HyperMoEConfig


def interleaved(fns: dict, repeats: int, device: torch.device, warmup: int = 2) -> dict[str, list[float]]:
    """Times each function `repeats` times, alternating between them; ms per call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--small-tokens", type=int, default=None,
                    help="layer.small_tokens: T·k up to which weights are gathered per assignment "
                         "(default: the layer's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"median/min of {args.repeats}")
    for dtype in (getattr(torch, name) for name in args.dtype):
        for k in args.k:
            cfg = HyperMoEConfig(top_k=k)  # official sizes
            torch.manual_seed(0)
            layers = {"hyper": HyperMoELayer(cfg, dtype=dtype, device=device),
                      "plain": HyperMoELayer(cfg.replace(hyper_expert=False), dtype=dtype, device=device)}
            for layer in layers.values():
                layer.small_tokens = args.small_tokens
            for T in args.tokens:
                x = torch.randn(1, T, cfg.d_model, dtype=dtype, device=device)
                modes = ["infer", "train-fwd"] + (["train-fwd+bwd"] if args.backward else [])
                for mode in modes:
                    fns = {}
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
                                layer(xg).output.float().pow(2).mean().backward()
                        fns[name] = fn
                    times = interleaved(fns, args.repeats, device)
                    tag = f"{str(dtype)[6:]:8s} T={T:<5d} k={k} {mode:13s}"
                    for name, t in times.items():
                        print(f"{tag} {name:5s} median {statistics.median(t):9.2f} ms  min {min(t):9.2f} ms")
                    med = {name: statistics.median(t) for name, t in times.items()}
                    print(f"{tag} HyperExpert overhead {100 * (med['hyper'] / med['plain'] - 1):+.1f}% (medians), "
                          f"{100 * (min(times['hyper']) / min(times['plain']) - 1):+.1f}% (mins)", flush=True)


if __name__ == "__main__":
    main()
