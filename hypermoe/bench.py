"""`hypermoe bench`: the HyperMoE layer against the official approach, side by side in one run.

What is measured, per top-k k, token count T and mode (forward, forward + backward):
- "official": the official approach, re-implemented here from the math of SPEC.md (design note
  semantics.md), not copied: per token, the hypernetwork's W_down (d, a) and W_up (a, d) are generated
  and materialised as (T, d, a) and (T, a, d) tensors and applied with a batched mat-vec (bmm); the
  experts are an `nn.ModuleList` run by a loop over experts with a boolean mask and `index_add_`
  (HF-style); softmax top-k gating. It is checked against ref/ before anything is timed.
- "hypermoe": hypermoe.layer.HyperMoELayer (forward rows in eval mode: at inference it caches the
  adapters of all C(N, k) selection sets); "hypermoe-nocache": the same without that cache (forward only,
  what a training-mode forward pays); "plain-moe": the same layer with the HyperExpert disabled
  (config.hyper_expert = False, same router and experts), to show the HyperExpert's overhead.
- "ort-portable" / "ort-sparse" / "ort-fused": onnxruntime on the exported layer (export/: dense standard ops,
  per-expert dispatch in standard ops, com.microsoft::MoE), forward only, fp32.
Columns: median and min ms per call, tokens/s, memory (bytes saved for backward, measured with
`torch.autograd.graph.saved_tensors_hooks`, parameters and the input excluded; peak RSS growth on CPU,
`torch.cuda.max_memory_allocated` growth on CUDA), the ratio to the official approach, and the
experts' useful FLOPs (4·d·f·T·k forward, 3× that forward + backward) per second of the whole call,
as a fraction of this machine's GEMM rate measured in the same run.

Axis legend: T tokens, d model width, N experts, k selected, f expert hidden width, a adapter width,
e expert-embedding width, h = d_h, l = d_l layer-embedding width, g generator width.

Methodology: inputs x ~ N(0, 1) and ref.init parameters (random routing, near-uniform load; the
routing load is reported). Per (k, T, mode) group, every implementation makes one call that measures
memory (and warms up), more warm-up calls while they are cheap, then all of them are timed in
interleaved rounds — one block of n calls of each in turn (n so that a block lasts ≥ `block_s`), plus
a GEMM probe, so that a shared machine's changing load hits them alike and "% of GEMM rate" divides by
the GEMM rate of the same moment. Each gets budget / block time blocks, clamped to [min_reps, max_reps]
and spread evenly over the rounds: the official approach at T = 8192 (seconds per call) gets 3. Parameter gradients accumulate
across calls (allocated once during warm-up), as in gradient accumulation, so the RSS growth of a
forward + backward excludes them.
The library never prints: progress goes to the `progress` callback (the CLI writes it to stderr).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ref
import ref.io
from ref import HyperMoEConfig
from ref.files import atomic_output, check_output

IMPLS = ("official", "hypermoe", "hypermoe-nocache", "plain-moe", "ort-portable", "ort-sparse", "ort-fused")
FORWARD_ONLY = ("hypermoe-nocache", "ort-portable", "ort-sparse", "ort-fused")
MODES = ("fwd", "fwd+bwd")
MiB = 1024**2


@dataclass
class Options:
    """What one benchmark run covers. The defaults are the full run; `quick()` the CLI's --quick subset."""

    device: str = "cpu"  # "cpu" | "cuda"
    dtypes: tuple[str, ...] = ("fp32",)  # "fp32" | "bf16" (bf16 is for CUDA; on CPU it is optional)
    top_ks: tuple[int, ...] = (1, 2)
    tokens: tuple[int, ...] = (64, 1024, 8192)
    modes: tuple[str, ...] = MODES
    impls: tuple[str, ...] = IMPLS
    threads: int | None = None  # torch intra-op threads and onnxruntime intra_op_num_threads
    gemm_sizes: tuple[int, ...] = (4096,)  # square GEMM n³ (plus the MoE-shaped (T·k/N, d)·(d, f))
    block_s: float = 0.2  # a timed block lasts at least this long
    budget_s: float = 8.0  # timed seconds per row (after warm-up), before clamping reps to [min_reps, max_reps]
    max_reps: int = 15
    min_reps: int = 3
    seed: int = 0
    cfg: HyperMoEConfig = field(default_factory=HyperMoEConfig)  # official sizes by default

    @classmethod
    def quick(cls, **changes: Any) -> Options:
        """k = 1, T = 64 and 1024, small GEMM, short budgets: 2½–3 minutes on 2 cores (measured: 2 min 36 s on a
        2-core AMD EPYC, 3 min 0 s on a 2-core machine shared with other jobs, load 4)."""
        base = dict(top_ks=(1,), tokens=(64, 1024), gemm_sizes=(2048,), block_s=0.05, budget_s=0.6, max_reps=7)
        return cls(**{**base, **changes})


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


def interleaved_times(fns: Sequence[tuple[Callable[[], Any], int, str]], per_call_s: Sequence[float], opts: Options,
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


def _malloc_trim() -> None:
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
        _malloc_trim()  # hand freed heap memory back first, so growth is not hidden by earlier rows' leftovers
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


def gemm_operands(m: int, k: int, n: int, dtype: str, opts: Options):
    import torch

    gen = torch.Generator().manual_seed(opts.seed)
    a = torch.randn(m, k, generator=gen).to(opts.device, _torch_dtype(dtype))  # (m, k)
    b = torch.randn(k, n, generator=gen).to(opts.device, _torch_dtype(dtype))  # (k, n)
    return a, b


def gemm_rate(m: int, k: int, n: int, dtype: str, opts: Options) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# The official approach, written from the math (SPEC.md §3; design note semantics.md §2)
# ---------------------------------------------------------------------------------------------


def _activation(name: str):
    import torch.nn.functional as F

    return {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"),
            "silu": F.silu}[name]


def _official_classes():
    """Defined lazily so that importing hypermoe.bench (the CLI) does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class OfficialExpert(nn.Module):
        """One GPT-2-style expert MLP with its own parameters (the official code keeps an
        nn.ModuleList of experts): act(x W1 + b1) W2 + b2."""

        def __init__(self, w1, b1, w2, b2, activation):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)  # (d, f), (f, d)
            self.b1 = nn.Parameter(b1) if b1 is not None else None  # (f)
            self.b2 = nn.Parameter(b2) if b2 is not None else None  # (d)
            self.act = activation

        def forward(self, x):  # x: (T_e, d) the tokens routed to this expert
            u = x @ self.w1  # (T_e, f)
            if self.b1 is not None:
                u = u + self.b1
            y = self.act(u) @ self.w2  # (T_e, d)
            return y + self.b2 if self.b2 is not None else y

    class OfficialLayer(nn.Module):
        """The official HyperMoE approach: per-token materialised HyperExpert weights applied with a
        batched mat-vec, experts by a loop with a boolean mask and index_add (HF-style).

        Built from a ref/ parameter mapping (names of ref.param_shapes). Inference semantics without
        capacity (SPEC.md §3.1–3.8); training-only noise and jitter are not part of the baseline."""

        def __init__(self, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None, dtype=None):
            super().__init__()
            if cfg.capacity is not None:
                raise ValueError("the official-approach baseline has no expert capacity (config field 'capacity')")
            self.cfg = cfg

            def p(name):
                return torch.as_tensor(np.asarray(params[name])).to(device=device, dtype=dtype).clone()

            self.router_weight = nn.Parameter(p("router.weight"))  # (d, N)
            self.router_bias = nn.Parameter(p("router.bias")) if cfg.router_bias else None  # (N)
            act = _activation(cfg.activation)
            w1, w2 = p("experts.w1"), p("experts.w2")  # (N, d, f), (N, f, d)
            b1, b2 = (p("experts.b1"), p("experts.b2")) if cfg.expert_bias else (None, None)  # (N, f), (N, d)
            self.experts = nn.ModuleList(  # each expert owns its parameters, as in the official code
                OfficialExpert(w1[i].clone(), b1[i].clone() if b1 is not None else None,
                               w2[i].clone(), b2[i].clone() if b2 is not None else None, act)
                for i in range(cfg.n_experts)
            )
            if cfg.hyper_expert:
                self.hyper = nn.ParameterDict({
                    name.replace(".", "_"): nn.Parameter(p(name))
                    for name in ref.param_shapes(cfg)
                    if name.startswith(("expert_embed", "process.", "hyper."))
                })

        def forward(self, x, layer_index: int = 0):
            cfg, N, k = self.cfg, self.cfg.n_experts, self.cfg.top_k
            shape = x.shape
            x = x.reshape(-1, cfg.d_model)  # (T, d)
            T = x.shape[0]
            logits = x @ self.router_weight  # (T, N)
            if self.router_bias is not None:
                logits = logits + self.router_bias
            routing_dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 at least (bf16 → float32)
            probs = F.softmax(logits, dim=-1, dtype=routing_dtype)  # (T, N)
            selected = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]  # (T, k) ties → lower index
            chosen = probs.gather(-1, selected)  # (T, k)
            gate = chosen / chosen.sum(-1, keepdim=True) if cfg.gate == "topk" else chosen  # renormalised over S
            gate = gate.to(x.dtype)  # cast back to the compute dtype

            # experts: loop over experts, boolean mask → token indices, index_add (HF-style)
            y = torch.zeros_like(x)  # (T, d)
            expert_mask = F.one_hot(selected, N).permute(2, 1, 0)  # (N, k, T)
            for e, expert in enumerate(self.experts):
                slot, idx = torch.where(expert_mask[e])  # (T_e,), (T_e,)
                y.index_add_(0, idx, expert(x[idx]) * gate[idx, slot, None])
            if not cfg.hyper_expert:
                return y.reshape(shape)

            # HyperExpert, per token: s = Σ_{j∉S} E_j (unweighted) → z → r → generated weights
            hp = self.hyper
            unselected = torch.ones(T, N, dtype=x.dtype, device=x.device).scatter(-1, selected, 0.0)  # (T, N)
            s = unselected @ hp["expert_embed"]  # (T, e); zero when k = N
            z = F.relu(s @ hp["process_w1"] + hp["process_b1"]) @ hp["process_w2"] + hp["process_b2"]  # (T, h)
            layer_embed = hp["hyper_layer_embed"][layer_index].expand(T, -1)  # (T, l)
            r = F.relu(torch.cat([z, layer_embed], -1) @ hp["hyper_trunk_weight"] + hp["hyper_trunk_bias"])  # (T, g)
            d, a = cfg.d_model, cfg.d_adapter
            w_down = (r @ hp["hyper_w_down_weight"] + hp["hyper_w_down_bias"]).view(T, d, a)  # (T, d, a) materialised
            w_up = (r @ hp["hyper_w_up_weight"] + hp["hyper_w_up_bias"]).view(T, a, d)  # (T, a, d) materialised
            b_down = r @ hp["hyper_b_down_weight"] + hp["hyper_b_down_bias"]  # (T, a)
            b_up = r @ hp["hyper_b_up_weight"] + hp["hyper_b_up_bias"]  # (T, d)
            hidden = F.relu(torch.bmm(x[:, None, :], w_down)[:, 0] + b_down)  # (T, a) batched mat-vec
            hyper = torch.bmm(hidden[:, None, :], w_up)[:, 0] + b_up  # (T, d)
            return (y + hyper).reshape(shape)

    return OfficialLayer


def official_layer(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None, dtype=None):
    """The official-approach baseline as an nn.Module: forward(x (..., d), layer_index) → (..., d)."""
    return _official_classes()(cfg, params, device=device, dtype=dtype)


def official_error_vs_ref(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], x: np.ndarray, layer_index: int = 0) -> float:
    """Max |official − ref| / max(1, max |ref|) in float64 on x (..., S, d): the baseline's check."""
    import torch

    expected = ref.layer(cfg, params, x, layer_index).output
    model = official_layer(cfg, params, dtype=torch.float64)
    with torch.no_grad():
        got = model(torch.from_numpy(x), layer_index).numpy()
    return float(np.max(np.abs(got - expected), initial=0.0) / max(1.0, float(np.max(np.abs(expected), initial=0.0))))


# ---------------------------------------------------------------------------------------------
# The implementations under test
# ---------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def hypermoe_layer(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None, dtype=None, **kwargs):
    """hypermoe's layer holding the ref parameters (cfg.hyper_expert False: a plain MoE layer)."""
    from hypermoe.layer import HyperMoELayer

    return HyperMoELayer.from_ref(cfg, params, device=device, dtype=dtype, **kwargs)


class TorchImpl:
    """One torch implementation: forward(x) → output tensor. Eval mode for the forward rows (inference:
    hypermoe's layer may use its adapter cache), train mode for forward + backward."""

    def __init__(self, module, is_hypermoe: bool):
        self.module, self.is_hypermoe = module, is_hypermoe

    def __call__(self, x):
        out = self.module(x, 0)
        return out.output if self.is_hypermoe else out


def make_torch_impl(impl: str, cfg: HyperMoEConfig, params, device: str, dtype: str) -> TorchImpl:
    tdtype = _torch_dtype(dtype)
    if impl == "official":
        return TorchImpl(official_layer(cfg, params, device=device, dtype=tdtype), False)
    if impl == "hypermoe":
        return TorchImpl(hypermoe_layer(cfg, params, device=device, dtype=tdtype), True)
    if impl == "hypermoe-nocache":
        return TorchImpl(hypermoe_layer(cfg, params, device=device, dtype=tdtype, cache_adapters=False), True)
    if impl == "plain-moe":
        plain = cfg.replace(hyper_expert=False)
        plain_params = {name: params[name] for name in ref.param_shapes(plain)}  # the same experts and router
        return TorchImpl(hypermoe_layer(plain, plain_params, device=device, dtype=tdtype), True)
    raise ValueError(f"unknown torch implementation {impl!r}")


class OrtImpl:
    """onnxruntime on the exported layer (export/), inputs bound once on the provider's device (IOBinding),
    so a timed call does no host copies. Forward only."""

    def __init__(self, flavour: str, cfg: HyperMoEConfig, params, device: str, threads: int | None):
        import tempfile

        from export.exporter import export_model
        from export.runtime import OnnxRunner

        self._dir = tempfile.TemporaryDirectory(prefix="hypermoe-bench-")
        path = os.path.join(self._dir.name, f"layer-{flavour}.onnx")
        exported = export_model(path, cfg, params, kind="layer", flavour=flavour, dtype="float32")
        self.export_s, self.hyper_form = exported.seconds, exported.hyper_form
        self.runner = OnnxRunner(path, provider=device, threads=threads)

    def bind(self, x: np.ndarray) -> None:
        self.runner.bind(x[None])  # (1, T, d): the exported input is (batch, seq, d)

    def __call__(self) -> None:
        self.runner.run_bound()

    def output(self) -> np.ndarray:
        return self.runner.fetch()["output"][0]  # (T, d)


def make_impl(impl: str, cfg: HyperMoEConfig, params, opts: Options, dtype: str):
    if impl.startswith("ort-"):
        if dtype != "fp32":
            raise NotImplementedError("onnxruntime rows are measured in fp32 only")
        return OrtImpl(impl[len("ort-"):], cfg, params, opts.device, opts.threads)
    return make_torch_impl(impl, cfg, params, opts.device, dtype)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def routing_load(cfg: HyperMoEConfig, params, x: np.ndarray) -> dict[str, Any]:
    """Tokens per expert and distinct selection sets of the benchmark's input (random routing)."""
    logits = x @ params["router.weight"].astype(np.float64)
    selected = ref.select(logits, cfg.top_k)  # (T, k)
    counts = np.bincount(selected.reshape(-1), minlength=cfg.n_experts)
    sets = {tuple(sorted(s)) for s in selected.tolist()}
    return {"tokens_per_expert_min": int(counts.min()), "tokens_per_expert_max": int(counts.max()),
            "distinct_sets": len(sets), "possible_sets": math.comb(cfg.n_experts, cfg.top_k)}


def _row(impl, device, dtype, k, T, mode, **values) -> dict[str, Any]:
    return {"impl": impl, "device": device, "dtype": dtype, "k": k, "T": T, "mode": mode, **values}


def run(opts: Options, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark → {"meta", "gemm", "checks", "load", "rows"} (JSON-serialisable)."""
    import torch

    say = progress or (lambda message: None)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    for name, allowed, values in (("impl", IMPLS, opts.impls), ("mode", MODES, opts.modes), ("dtype", ("fp32", "bf16"), opts.dtypes)):
        bad = sorted(set(values) - set(allowed))
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; expected some of {allowed}")
    if opts.threads is not None and opts.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {opts.threads}")
    # float32 parameters from ref.init and their float64 copy for the check against ref are held at once
    # (3 × 4 bytes); the implementations' own copies come on top, so this is a lower bound
    ref.check_memory(opts.cfg.replace(top_k=max(opts.top_ks)), "layer", 4, copies=3, tokens=max(opts.tokens),
                     what="hypermoe bench")
    previous_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _run(opts, say)
    finally:
        torch.set_num_threads(previous_threads)  # leave the process as it was (tests share it)


def _run(opts: Options, say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    result: dict[str, Any] = {"meta": environment(opts, threads), "gemm": [], "checks": [], "load": [], "rows": []}

    # 1. the GEMM rate of this machine, now
    base_cfg = opts.cfg
    for dtype in opts.dtypes:
        shapes = [(n, n, n) for n in opts.gemm_sizes]
        shapes.append((max(opts.tokens) * min(opts.top_ks) // base_cfg.n_experts or 1, base_cfg.d_model, base_cfg.d_ff))
        for m, kk, n in shapes:
            say(f"gemm {dtype} ({m},{kk})@({kk},{n}) ...")
            g = gemm_rate(m, kk, n, dtype, opts)
            result["gemm"].append(g)
            say(f"  {g['gflops']:.1f} GFLOP/s")

    rng = np.random.default_rng(opts.seed)
    jobs = [(k, dtype, mode, T, impl) for k in opts.top_ks for dtype in opts.dtypes for mode in opts.modes
            for T in opts.tokens for impl in opts.impls if mode == "fwd" or impl not in FORWARD_ONLY]
    done = 0
    for k in opts.top_ks:
        cfg = base_cfg.replace(top_k=k)
        say(f"k={k}: drawing parameters (ref.init, seed {opts.seed}) ...")
        params = ref.init(cfg, seed=opts.seed, dtype=np.float32)
        # 2. the baseline agrees with ref before anything is timed (float64, a small T)
        x_check = rng.standard_normal((2, 8, cfg.d_model))
        err = official_error_vs_ref(cfg, {n: v.astype(np.float64) for n, v in params.items()}, x_check)
        result["checks"].append({"what": "official approach vs ref (float64, 2×8 tokens)", "k": k, "max_rel_err": err,
                                 "ok": err < 1e-9})
        say(f"check official vs ref, k={k}: max rel err {err:.2e}")
        if not err < 1e-9:
            raise RuntimeError(f"the official-approach baseline disagrees with ref (k={k}, max rel err {err:.3e})")
        inputs, well_routed = {}, {}
        for T in opts.tokens:
            x = rng.standard_normal((T, cfg.d_model))
            logits = x @ params["router.weight"].astype(np.float64)  # (T, N)
            well_routed[T] = ref.routing_margins(logits, k) >= 1e-3  # (T,) tokens whose selection cannot flip in fp32
            inputs[T] = x.astype(np.float32)
            result["load"].append({"k": k, "T": T, **routing_load(cfg, params, x)})
        for dtype in opts.dtypes:
            impls: dict[str, Any] = {}
            for impl in opts.impls:
                try:
                    impls[impl] = make_impl(impl, cfg, params, opts, dtype)
                    if isinstance(impls[impl], OrtImpl):
                        say(f"exported {impl} k={k} in {impls[impl].export_s:.1f} s (HyperExpert form {impls[impl].hyper_form})")
                except Exception as err:  # noqa: BLE001 — a row that cannot be built is reported, not fatal
                    impls[impl] = f"not measured: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            for mode in opts.modes:
                for T, x_np in inputs.items():
                    names = [i for i in opts.impls if mode == "fwd" or i not in FORWARD_ONLY]
                    done += len(names)
                    say(f"[{done}/{len(jobs)}] {opts.device} {dtype} k={k} T={T} {mode}: {', '.join(names)}")
                    rows = measure_group({name: impls[name] for name in names}, x_np, mode, dtype, opts, say)
                    official_out = rows.get("official", {}).pop("_output", None)
                    for name, row in rows.items():
                        out = row.pop("_output", None)
                        row = {**_row(name, opts.device, dtype, k, T, mode), **row}
                        if "median_s" in row:
                            # the results agree with the official approach on the same input (forward rows; tokens
                            # whose routing margin ≥ 1e-3, so that an fp32 near-tie cannot flip a selection)
                            if out is not None and official_out is not None and name not in ("official", "plain-moe"):
                                mask = well_routed[T]
                                diff = np.abs(out[mask] - official_out[mask]).max(initial=0.0)
                                row["max_rel_diff_vs_official"] = float(diff / max(1.0, float(np.abs(official_out).max())))
                            flops = 4.0 * cfg.d_model * cfg.d_ff * T * k * (3 if mode == "fwd+bwd" else 1)
                            row["tokens_per_s"] = T / row["median_s"]
                            row["expert_gflops"] = flops / row["median_s"] / 1e9
                            row["frac_gemm"] = row["expert_gflops"] / row["gemm_gflops_now"]
                            say(f"  {name}: median {row['median_s'] * 1e3:.2f} ms, min {row['min_s'] * 1e3:.2f} ms "
                                f"({row['reps']}×{row['calls_per_rep']} calls)")
                        else:
                            say(f"  {name}: {row['note']}")
                        result["rows"].append(row)
            del impls
    _add_ratios(result["rows"])
    result["meta"]["loadavg_end"] = list(os.getloadavg())
    return result


def prepare(impl, x_np: np.ndarray, mode: str, dtype: str, opts: Options):
    """The call to time for one implementation on x (T, d), after one call that measures memory →
    (fn, timer device, Memory, forward output as float64 or None, seconds of that first call)."""
    import torch

    if isinstance(impl, OrtImpl):
        impl.bind(x_np)
        # run_bound() returns after the outputs are synchronised, so wall-clock timing is right on every
        # provider; onnxruntime's own arena is invisible to torch.cuda, so CUDA rows have no peak memory
        memory, _, first = measure_memory(impl, [], "cpu", track_saved=False)
        if opts.device == "cuda":
            memory = Memory(None, None)
        return impl, "cpu", memory, impl.output().astype(np.float64), first

    x = torch.from_numpy(x_np).to(opts.device, _torch_dtype(dtype))
    params = list(impl.module.parameters())
    if mode == "fwd":
        impl.module.eval()  # inference: hypermoe's layer may use its adapter cache

        def fn():
            with torch.inference_mode():
                return impl(x)
        memory, out, first = measure_memory(fn, [x, *params], opts.device, track_saved=False)
        return fn, opts.device, memory, out.float().cpu().numpy().astype(np.float64), first
    impl.module.train()
    x = x.clone().requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(opts.seed)).to(x.device, x.dtype)

    def fn():
        impl(x).backward(grad_out)  # a real upstream gradient (out.sum() would give a stride-0 one)
    memory, _, first = measure_memory(fn, [x, grad_out, *params], opts.device, track_saved=True)
    return fn, opts.device, memory, None, first


def measure_group(impls: Mapping[str, Any], x_np: np.ndarray, mode: str, dtype: str, opts: Options,
                  say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """All implementations on one input, timed in interleaved rounds together with a GEMM probe (the MoE-shaped
    (T·k/N, d) @ (d, f) matmul at T = 8192, k = 1: this machine's GEMM rate at the same moment)
    → name → row fields (with "_output": the forward output) or {"note": why not measured}."""
    import torch

    rows: dict[str, dict[str, Any]] = {}
    ready = []  # (name, fn, timer device, calls per block, seconds per call)
    for name, impl in impls.items():
        if isinstance(impl, str):
            rows[name] = {"note": impl}
            continue
        try:
            fn, device, memory, out, first = prepare(impl, x_np, mode, dtype, opts)
            t_call = warm_up(fn, first, device)
        except (RuntimeError, ValueError, MemoryError) as err:  # e.g. out of memory: report it, go on
            rows[name] = {"note": f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            say(f"  {name}: {rows[name]['note']}")
            continue
        say(f"  {name}: ready, ≈ {t_call * 1e3:.1f} ms per call")
        rows[name] = {"saved_bytes": memory.saved_bytes, "peak_bytes": memory.peak_bytes, "_output": out}
        ready.append((name, fn, device, max(1, math.ceil(opts.block_s / t_call)), t_call))
    cfg = opts.cfg
    a, b = gemm_operands(max(1, 8192 // cfg.n_experts), cfg.d_model, cfg.d_ff, dtype, opts)
    probe = lambda: torch.mm(a, b)  # noqa: E731
    probe_s = warm_up(probe, time_block(probe, 1, opts.device), opts.device)
    fns = [(fn, n, device) for _, fn, device, n, _ in ready] + [(probe, max(1, math.ceil(opts.block_s / probe_s)), opts.device)]
    times = interleaved_times(fns, [t for *_, t in ready] + [probe_s], opts, progress=say)
    probe_flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    probe_now = {"gemm_gflops_now": probe_flops / float(np.median(times[-1])) / 1e9,
                 "gemm_gflops_best_now": probe_flops / min(times[-1]) / 1e9}
    for (name, _, _, n, _), t in zip(ready, times):
        rows[name].update(median_s=float(np.median(t)), min_s=float(min(t)), reps=len(t), calls_per_rep=n, **probe_now)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup = official median / row median; saved_ratio = official saved bytes / row saved bytes."""
    official = {(r["device"], r["dtype"], r["k"], r["T"], r["mode"]): r for r in rows
                if r["impl"] == "official" and "median_s" in r}
    for r in rows:
        base = official.get((r["device"], r["dtype"], r["k"], r["T"], r["mode"]))
        if base is None or "median_s" not in r:
            continue
        r["speedup_vs_official"] = base["median_s"] / r["median_s"]
        if r.get("saved_bytes") and base.get("saved_bytes"):
            r["saved_ratio_vs_official"] = base["saved_bytes"] / r["saved_bytes"]


def machine(device: str) -> dict[str, Any]:
    """When and where a benchmark ran: date, library versions, CPU model and cores, the load average at the start,
    and the GPU on CUDA (the meta of every benchmark's JSON; bench_generation uses it too)."""
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


def environment(opts: Options, threads: int) -> dict[str, Any]:
    meta = {
        **machine(opts.device), "torch_threads": threads,
        "config": {k: getattr(opts.cfg, k) for k in ("d_model", "d_ff", "n_experts", "d_adapter", "d_expert_embed",
                                                      "d_process", "d_hyper", "d_generator", "d_layer_embed",
                                                      "activation", "expert_bias", "gate")},
        "options": {k: getattr(opts, k) for k in ("dtypes", "top_ks", "tokens", "modes", "impls", "block_s",
                                                   "budget_s", "max_reps", "min_reps", "seed")},
    }
    return meta


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

COLUMNS = ("impl", "k", "T", "mode", "reps", "median ms", "min ms", "tokens/s", "saved MiB", "peak MiB",
           "× faster than official", "× less saved", "expert GFLOP/s", "GEMM GFLOP/s now", "% of GEMM rate", "note")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["rows"]:
        if "median_s" not in r:
            out.append([r["impl"], str(r["k"]), str(r["T"]), r["mode"], *[""] * (len(COLUMNS) - 5), r.get("note", "")])
            continue
        note = ""
        if "max_rel_diff_vs_official" in r:
            note = f"diff vs official {r['max_rel_diff_vs_official']:.1e}"
        out.append([
            r["impl"], str(r["k"]), str(r["T"]), r["mode"], f"{r['reps']}×{r['calls_per_rep']}",
            _fmt(r["median_s"] * 1e3, ".2f"), _fmt(r["min_s"] * 1e3, ".2f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["saved_bytes"] / MiB if r.get("saved_bytes") is not None else None, ",.1f"),
            _fmt(r["peak_bytes"] / MiB if r.get("peak_bytes") is not None else None, ",.1f"),
            _fmt(r.get("speedup_vs_official"), ".2f"), _fmt(r.get("saved_ratio_vs_official"), ".1f"),
            _fmt(r["expert_gflops"], ".1f"), _fmt(r.get("gemm_gflops_now"), ".1f"), _fmt(r["frac_gemm"] * 100, ".0f"), note,
        ])
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (performance.md), one entry per (target, case), evaluated on the medians and,
    as a second opinion on a shared machine, on the minima (GEMM rate: the same-time probe's median, resp. best)."""
    rows = {(r["impl"], r["device"], r["dtype"], r["k"], r["T"], r["mode"]): r for r in result["rows"] if "median_s" in r}
    largest = max(result["meta"]["options"]["tokens"])
    out = []

    def add(name, key, value, goal, higher_is_better=True):
        values = {stat: value(stat) for stat in ("median_s", "min_s")}
        met = values["median_s"] >= goal if higher_is_better else values["median_s"] <= goal
        out.append({"target": name, "device": key[0], "dtype": key[1], "k": key[2], "T": key[3], "mode": key[4],
                    "value": values["median_s"], "value_min": values["min_s"], "goal": goal, "met": bool(met)})

    for (impl, device, dtype, k, T, mode), r in rows.items():
        key = (device, dtype, k, T, mode)
        official, plain, torch_eager = (rows.get((name, *key)) for name in ("official", "plain-moe", "hypermoe"))
        if impl == "hypermoe" and T == largest and official:
            add("× faster than the official approach", key, lambda stat: official[stat] / r[stat], 5.0)
            if r.get("saved_bytes") and official.get("saved_bytes"):
                add("× less memory saved for backward", key, lambda stat: official["saved_bytes"] / r["saved_bytes"], 10.0)
        if impl == "hypermoe" and T >= 1024 and plain:
            add("HyperExpert overhead over the plain MoE", key, lambda stat: r[stat] / plain[stat] - 1.0, 0.08,
                higher_is_better=False)
        if impl == "plain-moe" and T == largest:
            flops = 4.0 * result["meta"]["config"]["d_model"] * result["meta"]["config"]["d_ff"] * T * k * (3 if mode == "fwd+bwd" else 1)
            add("expert FLOP rate / GEMM rate (plain MoE layer: a lower bound)", key,
                lambda stat: flops / r[stat] / 1e9 / r["gemm_gflops_now" if stat == "median_s" else "gemm_gflops_best_now"], 0.90)
        if impl.startswith("ort-") and torch_eager:
            add(f"{impl} × faster than torch eager (hypermoe)", key, lambda stat: torch_eager[stat] / r[stat], 1.0)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The run as markdown: environment, GEMM rates, checks, routing load, one table per device/dtype."""
    meta = result["meta"]
    lines = [
        f"- date: {meta['date_utc']}; device: {meta['device']}" + (f" ({meta['gpu']}, CUDA {meta['cuda']})" if "gpu" in meta else ""),
        f"- torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, numpy {meta['numpy']}, Python {meta['python']}",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores; torch threads {meta['torch_threads']}; "
        f"load average at start {meta['loadavg_start'][0]:.2f}, at end {meta.get('loadavg_end', [float('nan')])[0]:.2f}",
        "", "GEMM rate of this machine at the start of this run (the \"% of GEMM rate\" column divides by a GEMM probe "
        "timed in the same interleaved rounds as each row instead: `gemm now` in the JSON):", "",
        "| shape | dtype | median ms | GFLOP/s (median) | GFLOP/s (best) |", "|---|---|---|---|---|",
    ]
    lines += [f"| {g['shape']} | {g['dtype']} | {g['median_ms']:.2f} | {g['gflops']:.1f} | {g['best_gflops']:.1f} |" for g in result["gemm"]]
    lines += ["", "Checks before timing:", ""]
    lines += [f"- {c['what']}, k={c['k']}: max rel err {c['max_rel_err']:.1e} ({'ok' if c['ok'] else 'FAILED'})" for c in result["checks"]]
    lines += ["", "Routing load of the inputs (x ~ N(0, 1), ref.init parameters):", "",
              "| k | T | tokens per expert (min–max) | distinct selection sets / possible |", "|---|---|---|---|"]
    lines += [f"| {l['k']} | {l['T']} | {l['tokens_per_expert_min']}–{l['tokens_per_expert_max']} | {l['distinct_sets']} / {l['possible_sets']} |" for l in result["load"]]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(result["rows"]):
        groups.setdefault((r["device"], r["dtype"]), []).append(i)
    body = table_rows(result)
    for (device, dtype), indices in groups.items():
        lines += ["", f"#### {device}, {dtype}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(body[i]) + " |" for i in indices]
    checks = targets(result)
    if checks:
        lines += ["", "#### Targets (the issue states the speed and memory targets for T = 8192; here they are evaluated at "
                  "this run's largest T; \"met\" judges the median)", "",
                  "| target | device | dtype | k | T | mode | median | from the minima | goal | met |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in checks:
            percent = "overhead" in t["target"] or "GEMM rate" in t["target"]
            value, value_min = (f"{v * 100:.0f}%" if percent else f"{v:.2f}" for v in (t["value"], t["value_min"]))
            goal = ("≤ " if "overhead" in t["target"] else "≥ ") + (f"{t['goal'] * 100:.0f}%" if percent else f"{t['goal']:g}")
            lines.append(f"| {t['target']} | {t['device']} | {t['dtype']} | {t['k']} | {t['T']} | {t['mode']} | {value} | {value_min} | {goal} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI: hypermoe bench
# ---------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark the HyperMoE layer against the official approach (CPU or CUDA)",
        description="Times, side by side in one run, the official HyperMoE approach (per-token generated "
        "HyperExpert weights, HF-style expert loop), hypermoe's layer, the same layer without the HyperExpert "
        "and onnxruntime on the exported layer, at the official sizes (d=768, f=3072, N=8, a=64, hypernetwork "
        "widths 128, layer embedding 10). With --generation: text generation with a GPT-2-small-sized HyperMoE language "
        "model instead (hypermoe/bench_generation.py). Progress goes to stderr, the tables to stdout.",
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
    p.add_argument("--impls", nargs="+", choices=IMPLS, help=f"implementations (default all: {' '.join(IMPLS)})")
    p.add_argument("--modes", nargs="+", choices=MODES, help="fwd and/or fwd+bwd (default both)")
    p.add_argument("--config", metavar="FILE", help="a config.json to benchmark instead of the official sizes "
                   "(its top_k is replaced by --top-k's values)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters and inputs (default 0)")
    p.add_argument("--render", metavar="JSON", help="print the tables of an earlier run's --json file and exit (runs nothing)")
    p.add_argument("--generation", action="store_true",
                   help="instead: text generation with a GPT-2-small-sized HyperMoE LM (d=768, 12 blocks, V=50257, "
                   "1024 positions, N=8, k=1): prefill (prompt 128, 1024) and decode (batch 1, 8; context 128, 1024) "
                   "tokens/s of onnxruntime, torch with its KV cache and torch recomputing, side by side "
                   "(hypermoe/bench_generation.py). Takes ≈ 7 min on 2 quiet cores (2 min of it the export), "
                   "--quick (a narrower 4-block model) ≈ 1 min (5 min on a busy machine); peaks at ≈ 13 GB of "
                   "memory during the export and needs 2 GB of temporary disk per flavour (deleted after the run); "
                   "uses --quick, --device, --threads, --config, --seed, --json, --markdown, --force, --flavours")
    p.add_argument("--flavours", nargs="+", choices=("portable", "sparse", "fused"),
                   help="--generation: export flavours, one onnxruntime row each (default sparse: per-expert "
                   "dispatch, reads only the selected experts' weights)")
    p.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from hypermoe import bench_generation

    if args.render:
        try:
            with open(args.render) as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--render {args.render}: cannot read a benchmark JSON ({err})") from None
        if bench_generation.is_result(result):
            print(bench_generation.markdown(result))
            return 0
        if not isinstance(result, dict) or not {"meta", "gemm", "rows"} <= set(result):
            raise ValueError(f"--render {args.render}: not a `hypermoe bench --json` file")
        print(markdown(result))
        return 0
    if args.generation:
        return bench_generation.command(args)
    if args.flavours:
        raise ValueError("--flavours applies to --generation (the layer benchmark's rows are chosen with --impls)")
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
    opts = Options.quick(**changes) if args.quick else Options(**changes)
    command = " ".join(["hypermoe", *sys.argv[1:]]) if sys.argv[0].endswith("hypermoe") else None
    return run_and_report(args, lambda progress: run(opts, progress=progress), markdown, command)


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
