"""Latency of an exported layer on onnxruntime against hypermoe.layer in PyTorch eager, with one CPU thread count
for both (`hypermoe main`'s last step), so that the two numbers compare."""

from __future__ import annotations

import statistics
import time

import numpy as np

WARMUP = 4  # untimed calls before each runtime's timed ones


def latencies(runner, cfg, params, x: np.ndarray, device: str, runs: int, threads: int) -> tuple[float, float | None]:
    """Median ms of onnxruntime (runner.run_bound, device-resident I/O; the runner opened with `threads`
    intra-op threads), then of hypermoe.layer.HyperMoELayer (eager, no grad, torch.set_num_threads(threads) for
    the duration; None where torch has no such device), one block after the other: interleaving them
    measures each one's interference (onnxruntime's idle threads spin, which slows torch; without spinning
    onnxruntime loses ~40% on 2 cores). WARMUP warm-up calls each (the layer's first call builds its per-set
    adapter cache, and torch's CPU kernels settle over the next few). The same thread count for both: with
    its default count on a busy 2-core machine torch took 440 ms, with 1 thread 35 ms (issue 20)."""
    import torch

    from hypermoe.layer import HyperMoELayer

    ort_ms = runner.benchmark(x, warmup=WARMUP, runs=runs).median_ms
    if device == "cuda" and not torch.cuda.is_available():
        return ort_ms, None
    layer = HyperMoELayer.from_ref(cfg, params, dtype=torch.float32, device=device).eval()
    xt = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for i in range(runs + WARMUP):
                sync()
                start = time.perf_counter()
                layer(xt)
                sync()
                if i >= WARMUP:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return ort_ms, statistics.median(times) * 1e3
