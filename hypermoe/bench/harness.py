"""What every benchmark shares (`opts`: a benchmark's Options, read for device, threads, block_s, budget_s,
min_reps, max_reps): timing (blocks of calls, warm-up, interleaved rounds), memory (bytes saved for
backward, peak RSS / CUDA allocation growth), the GEMM-rate probe and the machine description of every result's meta.
The library never prints: progress goes to a callback."""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


MiB = 1024**2


# ---------------------------------------------------------------------------------------------
# Harness: timing, memory
# ---------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_block(fn: Callable[[], Any], n: int, device: str) -> float:
    """Seconds per call of `fn`, averaged over a block of n back-to-back calls (CUDA events on CUDA)."""
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def warm_up(fn: Callable[[], Any], first_call_s: float, device: str) -> float:
    """More warm-up calls while they are cheap (until 0.3 s or 3 calls) → seconds per call, from the last."""
    t_call = first_call_s
    if t_call < 1.0:
        spent = 0.0
        for _ in range(3):
            t_call = time_block(fn, 1, device)
            spent += t_call
            if spent > 0.3:
                break
    return max(t_call, 1e-7)


def interleaved_times(fns: Sequence[tuple[Callable[[], Any], int, str]], per_call_s: Sequence[float], opts,
                      progress: Callable[[str], None] | None = None) -> list[list[float]]:
    """Time several functions in rounds — a block of each in turn — so that a shared machine's changing load
    hits them all alike. fns: (fn, calls per block, timer device). Function i gets reps_i = budget_s / its
    block time blocks, clamped to [min_reps, max_reps], spread evenly over max_i reps_i rounds (a slow
    function, such as the official approach at T = 8192, joins fewer rounds than a fast one)."""
    block_s = [n * t for (_, n, _), t in zip(fns, per_call_s)]
    reps = [int(min(opts.max_reps, max(opts.min_reps, round(opts.budget_s / max(b, 1e-9))))) for b in block_s]
    rounds = max(reps)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        members = [i for i, n in enumerate(reps) if (r * n) // rounds != ((r + 1) * n) // rounds]  # n of the rounds
        if progress and sum(block_s[i] for i in members) > 5:
            progress(f"  round {r + 1}/{rounds} (≈ {sum(block_s[i] for i in members):.0f} s)")
        for i in members:
            fn, n, device = fns[i]
            times[i].append(time_block(fn, n, device))
    return times


def _rss_kib() -> dict[str, int] | None:
    try:
        status = open("/proc/self/status").read()
    except OSError:
        return None
    return {key: int(re.search(key + r":\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """glibc: return free heap memory to the system (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Memory:
    saved_bytes: int | None  # bytes saved for backward (unique storages, parameters and input excluded)
    peak_bytes: int | None  # CPU: peak RSS growth; CUDA: max_memory_allocated growth


def measure_memory(fn: Callable[[], Any], exclude: Sequence[Any], device: str, track_saved: bool) -> tuple[Memory, Any, float]:
    """One call of `fn` with memory tracking → (Memory, fn's result, seconds). `exclude`: tensors
    (parameters, the input) whose storages already exist and do not count as saved for backward."""
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}  # storage pointer → bytes, so views and repeats count once

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        malloc_trim()  # hand freed heap memory back first, so growth is not hidden by earlier rows' leftovers
        ok = _reset_peak_rss()
        before = _rss_kib() if ok else None
    t0 = time.perf_counter()
    if track_saved:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn()
    else:
        result = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        after = _rss_kib() if before is not None else None
        peak = max(0, after["VmHWM"] - before["VmHWM"]) * 1024 if after is not None else None
    return Memory(sum(saved.values()) if track_saved else None, peak), result, seconds


# ---------------------------------------------------------------------------------------------
# This machine's GEMM rate, measured in the same run
# ---------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def gemm_operands(m: int, k: int, n: int, dtype: str, opts):
    import torch

    gen = torch.Generator().manual_seed(opts.seed)
    a = torch.randn(m, k, generator=gen).to(opts.device, _torch_dtype(dtype))  # (m, k)
    b = torch.randn(k, n, generator=gen).to(opts.device, _torch_dtype(dtype))  # (k, n)
    return a, b


def gemm_rate(m: int, k: int, n: int, dtype: str, opts) -> dict[str, Any]:
    """GFLOP/s of one (m, k) @ (k, n) matmul (2·m·k·n FLOPs), median and best of timed blocks."""
    import torch

    a, b = gemm_operands(m, k, n, dtype, opts)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    t_call = warm_up(fn, time_block(fn, 1, opts.device), opts.device)
    calls = max(1, math.ceil(opts.block_s / t_call))
    times = interleaved_times([(fn, calls, opts.device)], [t_call], opts)[0]
    flops = 2.0 * m * k * n
    median = float(np.median(times))
    return {"shape": f"({m},{k})@({k},{n})", "dtype": dtype, "median_ms": median * 1e3,
            "gflops": flops / median / 1e9, "best_gflops": flops / min(times) / 1e9, "reps": len(times)}


def machine(device: str) -> dict[str, Any]:
    """When and where a benchmark ran: date, library versions, CPU model and cores, the load average at the start,
    and the GPU on CUDA (the meta of every benchmark's JSON; the generation benchmark uses it too)."""
    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    cpu = platform.processor() or ""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        pass
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "onnxruntime": ort_version, "numpy": np.__version__,
        "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
        "device": device, "loadavg_start": list(os.getloadavg()),
    }
    if device == "cuda":
        meta["gpu"], meta["cuda"] = torch.cuda.get_device_name(), torch.version.cuda
    return meta
