"""The layer benchmark (`hypermoe bench`): the HyperMoE layer against the official approach, side by side in one run.

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

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ref
import ref.io
from ref import HyperMoEConfig
from hypermoe.bench.harness import (
    Memory, _torch_dtype, gemm_operands, gemm_rate, interleaved_times, machine, measure_memory, time_block, warm_up,
)
from hypermoe.bench.official import official_error_vs_ref, official_layer


IMPLS = ("official", "hypermoe", "hypermoe-nocache", "plain-moe", "ort-portable", "ort-sparse", "ort-fused")
FORWARD_ONLY = ("hypermoe-nocache", "ort-portable", "ort-sparse", "ort-fused")
MODES = ("fwd", "fwd+bwd")


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
# The implementations under test
# ---------------------------------------------------------------------------------------------


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
