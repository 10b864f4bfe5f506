"""What the three conversions share: the result type (Converted), the official layouts' names and checks, the
hypernetwork and expert-embedding mapping, the leftovers report and the final assembly into a stack.

Axis legend: d model width, f expert hidden width, N experts, e = d_e expert-embedding width, p = d_p
process hidden width, h = d_h width of z, l = d_l layer-embedding width, g = d_g generator width,
a adapter width, L layers sharing the hypernetwork (rows of the layer-embedding table)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

import ref
import ref.io
from ref.config import ACTIVATIONS, HyperMoEConfig

SOURCES = ("official-gpt2", "official-switch", "gpt2-mlp", "hypermoe-dense")
# what a conversion writes: "stack" (layers.{ℓ}.* for the HyperMoE blocks + hyper.*) or, from a whole GPT-2
# language model, "model" (ref.model: embeddings, attention, norms, dense MLPs, HyperMoE blocks, hypernetwork);
# "auto" picks "model" when the checkpoint holds WHOLE_LM (Switch conversions are always stacks)
KINDS = ("auto", "model", "stack")
WHOLE_LM = ("wte.weight", "wpe.weight", "ln_f.weight")  # tensors that only a whole GPT-2 LM has
# GPT-2 tensors outside the HyperMoE layers that a model directory has no place for, and why
GPT2_KNOWN_UNUSED = (
    (re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
     "GPT2Attention's causal-mask buffers (saved by older transformers versions); the causal mask is built, "
     "not loaded (SPEC.md §4)"),
)
# the layer holding the FFN inside a Switch block: encoder blocks are (self-attn, FF), decoder blocks
# (self-attn, cross-attn, FF)
SWITCH_FF_LAYER = {"encoder": 1, "decoder": 2}

# official tensors inside a HyperMoE layer that have no counterpart here, and why (matched on the name
# relative to the layer's `mlp.` prefix)
KNOWN_UNUSED = (
    (re.compile(r"w_noise"), "noisy-gating noise weights (training only); keep_noise / --keep-noise keeps them"),
    (re.compile(r"(mean|std)"), "constants 0 and 1 of the noisy-gating normal CDF, not learned"),
    (re.compile(r"adapter_layer\.adapter_(down|up)_manual\.(weight|bias)"),
     "the official adapter's fallback weights, never used when the HyperExpert is generated"),
)


class Converted(NamedTuple):
    config: HyperMoEConfig
    params: dict[str, np.ndarray]  # kind "stack": ref.stack_param_shapes names (layers.{ℓ}.*, hyper.*);
    #                                kind "model": ref.model.model_param_shapes names (token_embed, blocks.{ℓ}.*, ...)
    unused: dict[str, str]  # official tensor → why it was not converted
    ignored: list[str]  # kind "stack": tensors outside the HyperMoE layers (attention, norms, ...); "model": none
    kind: str = "stack"  # the kind of model directory the params make (ref.io.save_dir)


def find_blocks(state: Mapping[str, np.ndarray], pattern: str, what: str) -> tuple[str, list[int]]:
    """(prefix, sorted block indices) of the keys `prefix + pattern`, pattern with one `(\\d+)` group.

    The prefix is any run of dotted names ("", "transformer.", "module.", "model.transformer.", ...);
    all matches must share it, so two models in one file are an error rather than a silent mix.
    """
    regex = re.compile(r"^((?:[^.]+\.)*?)" + pattern + "$")
    found: dict[str, set[int]] = {}
    for key in state:
        m = regex.match(key)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        example = pattern.replace(r"(\d+)", "0").replace("\\", "")
        raise ValueError(f"no {what} found: no key like {example!r} (optionally behind a prefix such as 'transformer.')")
    if len(found) > 1:
        raise ValueError(f"{what} found under several prefixes {sorted(found)}: ambiguous, convert one model at a time")
    prefix, blocks = next(iter(found.items()))
    return prefix, sorted(blocks)


def anchor(state: Mapping[str, np.ndarray], key: str, ndim: int, same: Sequence[str] = ()) -> tuple[int, ...]:
    """The shape of a tensor the sizes are inferred from: `key`'s, or the shape most of `same` (the same tensor
    in the other blocks) agree on where that is more common than `key`'s, so that one misshapen tensor is the
    one check_official blames rather than every correct one."""
    if key not in state:
        raise ValueError(f"missing official tensor {key!r} (needed to infer the sizes)")
    shapes = [tuple(np.shape(state[k])) for k in (key, *same) if k in state]
    shape = max(shapes, key=shapes.count)  # the first of the most common: key's own on a tie
    if len(shape) != ndim:
        raise ValueError(f"official tensor {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def check_official(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError listing every missing, misshapen or non-float official tensor of `expected`."""
    missing = [key for key in expected if key not in state]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise ValueError(f"missing official tensor(s): {', '.join(missing[:10])}{more}")
    wrong = [f"{key} has shape {tuple(np.shape(state[key]))}, expected {shape}"
             for key, shape in expected.items() if tuple(np.shape(state[key])) != tuple(shape)]
    if wrong:
        raise ValueError("misshapen official tensor(s): " + "; ".join(wrong[:10]))
    for key in expected:
        if not np.issubdtype(np.asarray(state[key]).dtype, np.floating):
            raise ValueError(f"official tensor {key!r} has dtype {np.asarray(state[key]).dtype}, expected floating point")


def moe_every_for(sparse: list[int], n_layers: int) -> int:
    """The moe_every whose HyperMoE blocks {ℓ < L : ℓ % m == m - 1} are exactly `sparse`."""
    for m in range(1, n_layers + 1):
        if [i for i in range(n_layers) if i % m == m - 1] == sparse:
            return m
    raise ValueError(
        f"HyperMoE layers in blocks {sparse} of {n_layers}: this pattern is not expressible by moe_every "
        "(block ℓ is HyperMoE when ℓ % moe_every == moe_every - 1: every block, the odd ones, ...)")


def block_count(state: Mapping[str, np.ndarray], prefix: str, blocks_name: str) -> int:
    """1 + the largest block index among keys `prefix + blocks_name + ".{i}."` (0 when there are none)."""
    regex = re.compile(re.escape(prefix + blocks_name) + r"\.(\d+)\.")
    return 1 + max((int(m.group(1)) for key in state if (m := regex.match(key))), default=-1)


def find_param_gen(state: Mapping[str, np.ndarray], preferred: str) -> str:
    """The generator's prefix: `preferred` when its layer_embed exists, else the only `*param_gen.` there is."""
    if preferred + "layer_embed.weight" in state:
        return preferred
    found = sorted(key[: -len("layer_embed.weight")] for key in state if key.endswith("param_gen.layer_embed.weight"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"missing official tensor {preferred + 'layer_embed.weight'!r}: the checkpoint has expert "
                         "embeddings but no hypernetwork (param_gen)")
    raise ValueError(f"several hypernetworks {found}: ambiguous, expected {preferred!r}")


def linear_t(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """An nn.Linear weight (out, in) in our x @ W layout (in, out)."""
    return np.ascontiguousarray(np.asarray(state[key]).T)


def hyper_expected(gen: str, L: int, d: int, a: int, h: int, l: int, g: int) -> dict[str, tuple[int, ...]]:
    """The official generator's tensors (`param_gen.`, one per stack) and their shapes (nn.Linear: (out, in))."""
    return {
        gen + "layer_embed.weight": (L, l),
        gen + "decoder.linear1.weight": (g, h + l), gen + "decoder.linear1.bias": (g,),
        gen + "decoder.weight_up.weight": (a * d, g), gen + "decoder.weight_up.bias": (a * d,),
        gen + "decoder.weight_down.weight": (d * a, g), gen + "decoder.weight_down.bias": (d * a,),
        gen + "decoder.bias_up.weight": (d, g), gen + "decoder.bias_up.bias": (d,),
        gen + "decoder.bias_down.weight": (a, g), gen + "decoder.bias_down.bias": (a,),
    }


def hyper_params(state: Mapping[str, np.ndarray], gen: str) -> dict[str, np.ndarray]:
    """Our hyper.* from the official generator: nn.Linear weights transposed, biases and tables as is.
    The flat heads need no permutation: both codes read them row-major ((d, a) for down, (a, d) for up)."""
    return {
        "hyper.layer_embed": np.asarray(state[gen + "layer_embed.weight"]),  # (L, l)
        "hyper.trunk.weight": linear_t(state, gen + "decoder.linear1.weight"),  # (h + l, g): [z ; L_ℓ], z first
        "hyper.trunk.bias": np.asarray(state[gen + "decoder.linear1.bias"]),
        "hyper.w_down.weight": linear_t(state, gen + "decoder.weight_down.weight"),  # (g, d·a)
        "hyper.w_down.bias": np.asarray(state[gen + "decoder.weight_down.bias"]),
        "hyper.w_up.weight": linear_t(state, gen + "decoder.weight_up.weight"),  # (g, a·d)
        "hyper.w_up.bias": np.asarray(state[gen + "decoder.weight_up.bias"]),
        "hyper.b_down.weight": linear_t(state, gen + "decoder.bias_down.weight"),  # (g, a)
        "hyper.b_down.bias": np.asarray(state[gen + "decoder.bias_down.bias"]),
        "hyper.b_up.weight": linear_t(state, gen + "decoder.bias_up.weight"),  # (g, d)
        "hyper.b_up.bias": np.asarray(state[gen + "decoder.bias_up.bias"]),
    }


def embedding_expected(mlp: str, N: int, e: int, p: int, h: int) -> dict[str, tuple[int, ...]]:
    return {
        mlp + "n_experts_embedding.weight": (N, e),
        mlp + "embedding_process.0.weight": (p, e), mlp + "embedding_process.0.bias": (p,),
        mlp + "embedding_process.2.weight": (h, p), mlp + "embedding_process.2.bias": (h,),
    }


def hyper_part_expected(cfg: HyperMoEConfig, mlps: list[str], gen: str | None) -> dict[str, tuple[int, ...]]:
    """The HyperExpert's official tensors of a stack: each sparse block's embeddings and process MLP, then
    the shared generator; none when the stack has no HyperExpert."""
    if not cfg.hyper_expert:
        return {}
    expected: dict[str, tuple[int, ...]] = {}
    for mlp in mlps:
        expected.update(embedding_expected(mlp, cfg.n_experts, cfg.d_expert_embed, cfg.d_process, cfg.d_hyper))
    expected.update(hyper_expected(gen, cfg.n_layers, cfg.d_model, cfg.d_adapter, cfg.d_hyper, cfg.d_layer_embed,
                                   cfg.d_generator))
    return expected


def embedding_params(state: Mapping[str, np.ndarray], mlp: str) -> dict[str, np.ndarray]:
    """expert_embed and the embedding-process MLP (an nn.Sequential of Linear, ReLU, Linear)."""
    return {
        "expert_embed": np.asarray(state[mlp + "n_experts_embedding.weight"]),  # (N, e): nn.Embedding rows
        "process.w1": linear_t(state, mlp + "embedding_process.0.weight"),  # (e, p)
        "process.b1": np.asarray(state[mlp + "embedding_process.0.bias"]),
        "process.w2": linear_t(state, mlp + "embedding_process.2.weight"),  # (p, h)
        "process.b2": np.asarray(state[mlp + "embedding_process.2.bias"]),
    }


def hyper_sizes(state: Mapping[str, np.ndarray], mlp: str, gen: str, d: int) -> dict[str, int]:
    """d_e, d_p, d_h (from the first layer's embedding tensors), L, d_l, d_g, a (from the generator)."""
    _, e = anchor(state, mlp + "n_experts_embedding.weight", 2)
    p, _ = anchor(state, mlp + "embedding_process.0.weight", 2)
    h, _ = anchor(state, mlp + "embedding_process.2.weight", 2)
    L, l = anchor(state, gen + "layer_embed.weight", 2)
    g, _ = anchor(state, gen + "decoder.linear1.weight", 2)
    rows, _ = anchor(state, gen + "decoder.weight_down.weight", 2)
    if rows % d:
        raise ValueError(f"official tensor {gen + 'decoder.weight_down.weight'!r} has {rows} rows, not a multiple "
                         f"of d = {d} (rows = d·a)")
    return dict(d_expert_embed=e, d_process=p, d_hyper=h, n_layers=L, d_layer_embed=l, d_generator=g,
                d_adapter=rows // d)


def leftovers(state: Mapping[str, np.ndarray], used: set[str], owned: list[str]) -> tuple[dict[str, str], list[str]]:
    """Unconverted tensors: those under an `owned` prefix (a HyperMoE layer or the generator) must be
    known-unused (reported with the reason) or are an error; the rest are outside the layers (ignored)."""
    unused, unknown, ignored = {}, [], []
    for key in state:
        if key in used:
            continue
        owner = next((o for o in owned if key.startswith(o)), None)
        if owner is None:
            ignored.append(key)
            continue
        reason = next((why for pat, why in KNOWN_UNUSED if pat.fullmatch(key[len(owner):])), None)
        if reason is None:
            unknown.append(key)
        else:
            unused[key] = reason
    if unknown:
        raise ValueError(f"unexpected official tensor(s) inside a HyperMoE layer or the hypernetwork (not part of "
                         f"this variant's layout, refusing to drop them): {', '.join(sorted(unknown)[:10])}")
    return unused, sorted(ignored)


def finish(cfg: HyperMoEConfig, params: dict[str, np.ndarray], dtype, kind: str = "stack") -> dict[str, np.ndarray]:
    """Cast to `dtype` (float32 or float64) and check every name and shape against the config's `kind`."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    with np.errstate(over="ignore"):  # a float32 overflow becomes ±Inf, reported below with the parameter's name
        params = {name: np.array(value, dtype=dtype, order="C") for name, value in params.items()}  # copies, no views
    ref.check_params(params, ref.io.expected_shapes(cfg, kind), dtype)
    ref.check_finite_params(params, what="converted parameter")  # NaN/Inf in the source, or float32 overflow
    return params


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def assemble(cfg: HyperMoEConfig, state: Mapping[str, np.ndarray], layers: dict[int, dict[str, np.ndarray]],
             mlp, gen: str | None, expected: Mapping[str, tuple[int, ...]], dtype) -> Converted:
    """The stack from each sparse block's converted router and experts (`layers`: block ℓ → our names),
    plus, where the stack has a HyperExpert, each block's expert embeddings and process MLP and the shared
    generator; the official tensors that were not converted are reported, not dropped."""
    params: dict[str, np.ndarray] = {}
    for i, layer in layers.items():
        if cfg.hyper_expert:
            layer = {**layer, **embedding_params(state, mlp(i))}
        params.update({f"layers.{i}.{name}": value for name, value in layer.items()})
    if cfg.hyper_expert:
        params.update(hyper_params(state, gen))
    unused, ignored = leftovers(state, set(expected), [mlp(i) for i in layers] + ([gen] if gen else []))
    return Converted(cfg, finish(cfg, params, dtype), unused, ignored)
