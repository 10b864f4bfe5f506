"""The generation benchmark (`hypermoe bench --generation`): text generation with a HyperMoE language model, three backends side by side.

The shape: GPT-2-small-sized (d = 768, 12 blocks, 12 heads, vocabulary 50257, 1024 learned positions), every
block's FFN a HyperMoE layer at the official sizes (N = 8 experts of f = 3072 with biases and tanh-GELU, k = 1,
adapter a = 64, hypernetwork widths 128, layer embedding 10), fp32.
`--quick` shrinks the widths and depth, not the vocabulary, the context or the measured shapes.

The model: transformers' GPT2LMHeadModel of that shape (dense, MLP width f, random, seeded) and the HyperMoE model
upcycled from it (hypermoe/bench/generation_backends.py): every expert a copy of its block's dense MLP, the HyperExpert's output
heads zero, so with top-1 "topk" routing it computes the dense model's function and must draw its tokens.

Backends, all driven by the one loop of hypermoe.generation (`generate`, onnxruntime-genai's metrics):
- "hf-gpt2": transformers' dense GPT2LMHeadModel with its own KV cache and `logits_to_keep=1`
  (hypermoe.bench.dense.HFDecoder): the cost floor of a dense model of the active size, and the row every ratio
  divides by (`base`; torch-kv when it is left out).
- "ort-<export>": export.generate.OrtDecoder (IOBinding, the KV cache stays in onnxruntime) on a with-past export
  of the same parameters; <export> is FLAVOUR[:int8|:int4][:contrib] (`hypermoe export --with-past --flavour
  FLAVOUR [--quantize int8|int4] [--attention contrib]`), written to a temporary directory for the run and deleted
  after it; the CPU provider (or CUDA with --device cuda).
- "torch-kv": hypermoe.model.TorchDecoder(model, use_cache=True), torch eager with its KV cache.
- "torch-nocache": TorchDecoder(model, use_cache=False): every step recomputes the whole history (the baseline
  a KV cache is measured against).

Groups (each row one backend of one group):
- prefill B × L: the prompt of L tokens in one step; prefill tokens/s = B·L / its time. It is generate()'s first
  step (decoder.begin, then decoder.step on the prompt) called directly, because generate() refuses a prompt
  that fills the whole context (it must leave room for a new token); nothing else differs.
- decode B at context C: generate(max_new_tokens = n) after prompts of C − n tokens (C = 128: prompts of 128);
  decode tokens/s = B · (n − 1) steps / the decode steps' time, latency = the median step. torch-nocache
  runs only its first few steps (each recomputes the whole context).

Methodology: random prompts (seeded; each row of a batch its own), temperature-1 sampling with a fixed seed (a
random model's greedy choice repeats one token, which would route every step to the same experts; sampling
from its near-uniform distribution routes like real text), no EOS. Before timing, every backend runs a short
warm-up with the group's batch size; then the group's repetitions run in rounds, each round calling every
backend once, in an order rotated from round to round, so that a shared machine's changing load hits all
alike. Reported: the median over the repetitions and the min–max. Checks before timing: every backend's
prefill logits against the base's (max |Δ| / max |base|; a quantised export's are reported, not judged: its
weights differ) and the tokens each draws in every repetition (the same seed and nearly the same logits draw the
same tokens; a quantised export's count is its agreement with the float model).

Axis legend: B sequences, L prompt length, C context (cached positions), n new tokens, V vocabulary.
The library never prints: progress goes to the `progress` callback (the CLI writes it to stderr). The tables
(markdown, targets) are in hypermoe/bench/generation_report.py, re-exported here.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ref import HyperMoEConfig
from hypermoe.bench.harness import machine, malloc_trim
from hypermoe.bench.generation_backends import (  # noqa: F401 (re-exported)
    DENSE, FLAVOURS, QUANTIZE, TORCH_BACKENDS, build_models, export_all, make_decoders, parse_export,
)
from hypermoe.bench.generation_report import (  # noqa: F401 (re-exported: defined here before the split)
    BASE, COLUMNS, KIND, is_result, markdown, table_rows, targets,
)






def gpt2_small_config() -> HyperMoEConfig:
    """GPT-2 small's shape with HyperMoE FFNs at the official sizes (the config's defaults), k = 1."""
    return HyperMoEConfig(vocab_size=50257, max_seq_len=1024, n_layers=12, n_heads=12, top_k=1)


def quick_config() -> HyperMoEConfig:
    """--quick: a quarter of the width, 4 blocks; GPT-2's vocabulary and context kept (the measured shapes)."""
    return gpt2_small_config().replace(d_model=192, d_ff=768, n_heads=4, n_layers=4)


@dataclass
class Options:
    """What one run covers. The defaults are the full run (23 min on 2 quiet cores, ≈ 10 of them the five exports;
    ≈ 15 GB peak memory); `quick()` is --quick."""

    device: str = "cpu"  # "cpu" | "cuda" (torch on that device, onnxruntime's CUDA provider)
    threads: int | None = None  # torch intra-op threads and onnxruntime intra_op_num_threads (None: torch's)
    # one ort-<export> backend each (() none): float32, the shared-buffer attention, int8 and int4 with int8
    # activations (level 4: the fast CPU path; level 0's exact int4 is no faster than float32 per token, docs/quantize.md),
    # and the fastest combination
    exports: tuple[str, ...] = ("sparse", "sparse:contrib", "sparse:int8:acc4", "sparse:int4:acc4",
                                "sparse:int4:acc4:contrib")
    torch_backends: tuple[str, ...] = TORCH_BACKENDS
    dense: bool = True  # the hf-gpt2 row (transformers' dense GPT2LMHeadModel), the base of every ratio
    prefill_prompts: tuple[int, ...] | None = None  # prompt lengths L of the prefill groups (batch 1); None: 128
    # and max_seq_len (GPT-2: 1024, the whole context)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_contexts: tuple[int, ...] | None = None  # C: decode after C − n prompt tokens (C + n fits: after C);
    # None: 128 and max_seq_len
    new_tokens: int = 33  # n per decode repetition: 32 decode steps after the prefill's token
    nocache_new_tokens: int = 3  # torch-nocache's n: 2 decode steps (each recomputes the whole context)
    prefill_reps: int = 5
    decode_reps: int = 3
    seed: int = 0
    cfg: HyperMoEConfig = field(default_factory=gpt2_small_config)

    @classmethod
    def quick(cls, **changes: Any) -> Options:
        base = dict(cfg=quick_config(), new_tokens=17, prefill_reps=3, decode_reps=3)
        return cls(**{**base, **changes})

    def backends(self) -> tuple[str, ...]:
        return (DENSE,) * self.dense + tuple(f"ort-{e}" for e in self.exports) + tuple(self.torch_backends)

    @property
    def base(self) -> str:
        return DENSE if self.dense else BASE


@dataclass(frozen=True)
class Group:
    """One measured shape: phase "prefill" (B × L prompt tokens) or "decode" (B rows, prompt L, n new tokens)."""

    phase: str
    batch: int
    prompt: int
    new_tokens: int = 0  # decode: n (the cached backends; torch-nocache runs Options.nocache_new_tokens)
    context: int = 0  # decode: the nominal context C of the label

    @property
    def label(self) -> str:
        if self.phase == "prefill":
            return f"prefill B={self.batch} L={self.prompt}"
        return f"decode B={self.batch} C={self.context}"


def groups(opts: Options) -> list[Group]:
    """The prefill groups (batch 1), then the decode groups (each batch at each context)."""
    P = opts.cfg.max_seq_len
    default = tuple(dict.fromkeys((min(128, P), P)))
    out = [Group("prefill", 1, L) for L in opts.prefill_prompts or default]
    for C in opts.decode_contexts or default:
        for B in opts.decode_batches:
            L = C if C + opts.new_tokens <= P else C - opts.new_tokens  # context C: decoded around C
            out.append(Group("decode", B, L, opts.new_tokens, C))
    for g in out:
        if g.prompt < 1 or g.prompt + g.new_tokens > P:
            raise ValueError(f"{g.label}: prompt {g.prompt} + {g.new_tokens} new tokens does not fit the context "
                             f"of {P} positions")
    return out


def check_options(opts: Options) -> None:
    if opts.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {opts.device!r}")
    for spec in opts.exports:
        parse_export(spec)
    if len(set(opts.exports)) != len(opts.exports):
        raise ValueError(f"exports must differ, got {list(opts.exports)}")
    if opts.dense:
        from hypermoe.bench.generation_backends import check_upcyclable

        check_upcyclable(opts.cfg)
    if [b for b in opts.torch_backends if b not in TORCH_BACKENDS]:
        raise ValueError(f"torch backends must be among {TORCH_BACKENDS}, got {list(opts.torch_backends)}")
    if BASE not in opts.torch_backends:
        raise ValueError(f"{BASE} is the HyperMoE model's torch row (tokens and logits are checked against it): it "
                         "cannot be left out")
    if opts.new_tokens < 2 or opts.nocache_new_tokens < 2:
        raise ValueError("new tokens must be ≥ 2 (the first new token comes from the prefill, not a decode step)")
    if min(opts.prefill_reps, opts.decode_reps) < 1:
        raise ValueError("repetitions must be ≥ 1")
    if opts.cfg.capacity is not None:
        raise ValueError("a config with capacity cannot decode with a KV cache")
    groups(opts)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def prompts_for(group: Group, opts: Options, vocab_size: int) -> list[list[int]]:
    """B random prompts of L ids (each row its own), the same for every backend of the group."""
    rng = np.random.default_rng([opts.seed, group.batch, group.prompt])
    return rng.integers(0, vocab_size, (group.batch, group.prompt)).tolist()


def prefill(decoder, prompts: list[list[int]]) -> tuple[float, np.ndarray]:
    """generate()'s first step, called directly (see the module docstring) → (seconds, logits (B, V))."""
    ids = np.asarray(prompts, dtype=np.int64)  # (B, L), equal lengths: no padding
    B, L = ids.shape
    mask = np.ones((B, L), dtype=np.int64)  # (B, L)
    positions = np.broadcast_to(np.arange(L, dtype=np.int64), (B, L)).copy()  # (B, L)
    decoder.begin(B, L)
    start = time.perf_counter()
    logits = decoder.step(ids, mask, positions)  # (B, V)
    return time.perf_counter() - start, logits


def decode(decoder, prompts: list[list[int]], new_tokens: int, opts: Options, rep: int):
    """generate() with temperature-1 sampling seeded per repetition (rep 0: the warm-up)."""
    from hypermoe.generation import Sampling, generate

    return generate(decoder, prompts, max_new_tokens=new_tokens, max_length=opts.cfg.max_seq_len,
                    sampling=Sampling(temperature=1.0, seed=opts.seed * 1000 + rep))


def check_logits(decoders: dict[str, Any], opts: Options) -> list[dict[str, Any]]:
    """Every backend's prefill logits on 2 × 16 random tokens against the base's (max |Δ| / max |base|): a float32
    backend must be within 1e-3 (fp32 rounding through 12 blocks is ~1e-6; a wrong graph is ≳ 1e-1); a quantised or
    16-bit export is reported ("ok" None: its weights differ by design; `hypermoe verify` checks such a graph against
    ref, and scripts/quant_quality.py measures a quantised model's quality on trained models)."""
    prompts = np.random.default_rng([opts.seed, 7]).integers(0, opts.cfg.vocab_size, (2, 16)).tolist()
    logits = {name: prefill(decoder, prompts)[1] for name, decoder in decoders.items()}
    base = logits[opts.base]
    scale = float(np.abs(base).max()) or 1.0
    out = []
    for name, value in logits.items():
        diff = float(np.abs(value - base).max()) / scale
        spec = parse_export(name[4:]) if name.startswith("ort-") else {"quantize": None, "dtype": "float32"}
        judged = spec["quantize"] is None and spec["dtype"] == "float32"
        out.append({"backend": name, "max_rel_diff": diff, "ok": bool(diff <= 1e-3) if judged else None})
    return out


def measure_group(group: Group, decoders: dict[str, Any], opts: Options,
                  say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The group's repetitions in rounds (every backend once per round, order rotated) → one row per backend."""
    names = list(decoders)
    prompts = prompts_for(group, opts, opts.cfg.vocab_size)
    new = {name: (opts.nocache_new_tokens if name == "torch-nocache" else group.new_tokens) for name in names}
    warm = [row[:8] for row in prompts]
    for name in names:  # warm-up with the group's batch size: first-run allocations, shape-specialised kernels
        decode(decoders[name], warm, 3, opts, rep=0) if group.phase == "decode" else prefill(decoders[name], warm)
    reps = opts.prefill_reps if group.phase == "prefill" else opts.decode_reps
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        timings = []
        for name in order:
            if group.phase == "prefill":
                seconds, _ = prefill(decoders[name], prompts)
                sample = {"prefill_s": seconds, "tokens_per_s": group.batch * group.prompt / seconds}
                timings.append(f"{name} {seconds:.2f} s")
            else:
                result = decode(decoders[name], prompts, new[name], opts, rep=r + 1)
                sample = {"prefill_s": result.prefill_seconds, "decode_s": result.decode_seconds,
                          "steps": len(result.step_seconds), "step_s": result.step_seconds,
                          "tokens_per_s": result.decode_tokens_per_s, "latency_ms": result.latency_ms,
                          "tokens": result.tokens}
                timings.append(f"{name} {result.latency_ms:.0f} ms/step")
            samples[name].append(sample)
        say(f"  {group.label}: round {r + 1}/{reps}: " + ", ".join(timings))
    rows = []
    for name in names:
        s = samples[name]
        rate = [x["tokens_per_s"] for x in s]
        row = {"phase": group.phase, "batch": group.batch, "prompt": group.prompt, "context": group.context,
               "backend": name, "reps": len(s), "new_tokens": new[name] if group.phase == "decode" else 0,
               "tokens_per_s": float(np.median(rate)), "tokens_per_s_min": float(min(rate)),
               "tokens_per_s_max": float(max(rate)), "samples": s}
        if group.phase == "decode":
            row["latency_ms"] = float(np.median([t for x in s for t in x["step_s"]])) * 1e3
            row["steps"] = s[0]["steps"]
            row["context_range"] = [group.prompt + 1, group.prompt + s[0]["steps"]]  # positions the steps attend to
        else:
            row["latency_ms"] = float(np.median([x["prefill_s"] for x in s])) * 1e3
        rows.append(row)
    _compare(rows, opts.base)
    return rows


def _compare(rows: list[dict[str, Any]], base_name: str) -> None:
    """Each row's speed against the base's (median / median) and, for decode, how many of its drawn tokens match
    the base's in the same repetition (torch-nocache: its fewer tokens)."""
    base = next(r for r in rows if r["backend"] == base_name)
    for r in rows:
        r["x_vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r["phase"] == "decode":
            same = total = 0
            for mine, theirs in zip(r["samples"], base["samples"]):
                for a, b in zip(mine["tokens"], theirs["tokens"]):
                    same += sum(x == y for x, y in zip(a, b))
                    total += min(len(a), len(b))
            r["tokens_same"], r["tokens_compared"] = same, total


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def environment(opts: Options, threads: int) -> dict[str, Any]:
    meta = {"kind": KIND, **machine(opts.device), "threads": threads, "config": opts.cfg.to_dict(), "base": opts.base,
            "options": {k: v for k, v in asdict(opts).items() if k != "cfg"}}
    if opts.dense:
        import transformers

        meta["transformers"] = transformers.__version__
    return meta


def run(opts: Options, progress: Callable[[str], None] | None = None,
        workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole benchmark → {"meta", "exports", "checks", "rows"} (JSON-serialisable). The exports live in a
    temporary directory under `workdir` (default: the system's) and are deleted before returning."""
    import torch

    check_options(opts)
    say = progress or (lambda message: None)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = opts.threads or torch.get_num_threads()
    meta = environment(opts, threads)
    cfg = opts.cfg
    say(f"building the model: d={cfg.d_model}, {cfg.n_layers} blocks, N={cfg.n_experts}, k={cfg.top_k}, "
        f"V={cfg.vocab_size}, {cfg.max_seq_len} positions")
    model, dense = build_models(opts)
    meta["parameters"] = sum(p.numel() for p in model.parameters())
    if dense is not None:
        meta["dense_parameters"] = sum(p.numel() for p in dense.parameters())
        meta["dense_attention"] = dense.config._attn_implementation  # transformers' choice (sdpa where it can)
    directory = tempfile.mkdtemp(prefix="hypermoe-bench-generation-", dir=workdir)  # the exports, deleted below
    try:
        exports = export_all(model, opts, directory, say)
        gc.collect()
        malloc_trim()  # the export's transient copies (≈ 13 GB peak at full size) go back to the system
        decoders = make_decoders(model, dense, opts, directory)
        checks = check_logits(decoders, opts)
        rows: list[dict[str, Any]] = []
        for group in groups(opts):
            say(f"{group.label}: {', '.join(decoders)}")
            rows += measure_group(group, decoders, opts, say)
        del decoders
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    meta["loadavg_end"] = list(os.getloadavg())
    return {"meta": meta, "exports": exports, "checks": checks, "rows": rows}


__all__ = ["Options", "Group", "gpt2_small_config", "groups", "markdown", "parse_export", "run", "targets"]
