"""Official HyperMoE checkpoints → hypermoe model directories, and dense GPT-2 MLPs → HyperMoE layers
(upcycling). docs/convert.md has the full mapping tables; in short:

    official GPT-2 variant (per block `h.{ℓ}.mlp.`, one `param_gen.`)      → gate "topk", expert biases, gelu_tanh
    official Switch variant (per sparse block `{encoder|decoder}.block.{ℓ}.layer.{1|2}.mlp.`,
        one `{stack}.param_gen.` per stack; one stack per conversion)          → gate "switch", no expert biases, relu
    dense GPT-2 `h.{ℓ}.mlp.c_fc` / `c_proj` copied into every expert         → fresh router, embeddings, hypernetwork
                                                                                (W_up / b_up heads zero)

Kinds. The HyperMoE layers and the hypernetwork make a "stack" (ref.stack_param_shapes). A GPT-2 checkpoint
that holds the whole language model (wte, wpe, ln_f: GPT2LMHeadModel's state dict, HF's model.safetensors)
becomes a "model" (ref.model.model_param_shapes) by default: as_model adds embeddings, attention, norms,
dense MLPs and the head around the stack (kind "auto"; "stack" / "model" force one).

Layouts. Ours is x @ W with W: (in, out), experts stacked on a leading N axis. GPT-2's Conv1D is already
x @ W (taken as is); torch nn.Linear stores (out, in) and computes x @ W.T + b (transposed here). The
generator heads' flat outputs are row-major in both codes (W_down[i, j] = out[i·a + j], W_up[j, i] =
out[j·d + i]), so a head needs only the nn.Linear transpose, no permutation.

Files are read without executing pickled code: torch checkpoints with torch.load(weights_only=True),
.npz with np.load(allow_pickle=False), .safetensors (no code in the format) after checking its header.
Every official tensor under a HyperMoE layer or the generator (in a model: every tensor) is either
converted or reported in `Converted.unused` with the reason; an unknown tensor there is an error.

Axis legend: d model width, f expert hidden width, N experts, e = d_e expert-embedding width, p = d_p
process hidden width, h = d_h width of z, l = d_l layer-embedding width, g = d_g generator width,
a adapter width, L layers sharing the hypernetwork (rows of the layer-embedding table); V vocabulary,
P positions.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

import ref
import ref.io
from ref.config import ACTIVATIONS, HyperMoEConfig
from ref.files import check_output

SOURCES = ("official-gpt2", "official-switch", "gpt2-mlp")
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


# ---------------------------------------------------------------------------------------------
# Reading a state dict without executing code
# ---------------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat {name: array} from a torch checkpoint (.bin/.pt/...: torch.load(weights_only=True)), a .safetensors
    file (Hugging Face's model.safetensors) or a .npz.

    A checkpoint that wraps the state dict as {"state_dict": ...} or {"model": ...} is unwrapped.
    float16 / bfloat16 tensors become float32 (numpy has no bfloat16); the rest keep their dtype.
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face model folder, say: name the file in it
        inside = [name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        raise ValueError(f"{path} is a directory: convert reads one checkpoint file"
                         + (f" such as {path / inside[0]}" if inside else " (.safetensors, .bin, .pt or .npz)"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = file_kind(path)
    if kind not in ("zip", "pickle", "safetensors"):
        raise ValueError(f"{path}: {kind}; convert reads torch checkpoints (.bin, .pt), .safetensors files and .npz "
                         "archives of named arrays")
    if kind == "safetensors":
        return tensors_to_arrays(path, load_safetensors(path))
    if path.suffix == ".npz" or kind == "zip" and _npy_members_only(path):
        try:
            return ref.io.read_npz(path)  # never unpickles; sizes checked against each header before allocating
        except ValueError as err:
            raise ValueError(f"{path}: not a readable .npz state dict ({err})") from None
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ...": the error below says it better
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's safe unpickler refused the pickle (the type is stable, the text not)
        # torch's message is long advice around one line that names the offending object: "WeightsUnpickler error:
        # Unsupported global: …" (≤ 2.12, and 2.13 for a class) or its own paragraph ("Trying to load unsupported
        # GLOBAL posix.system whose module posix is blocked.", 2.13)
        text = str(err).partition("WeightsUnpickler error:")[2] or str(err)
        paragraphs = [" ".join(part.split()) for part in text.partition("Check the documentation")[0].split("\n\n")]
        paragraphs = [part for part in paragraphs if part and not part.startswith("Weights only load failed")]
        detail = paragraphs[0].split(". ")[0].rstrip(".") if paragraphs else "unpickling refused"
        # refused because the pickle names a class or function: decided from the file, torch's text as a fallback
        found = pickle_global(path) or "global" in detail.lower()
        if not found:  # an opcode torch's safe unpickler lacks, in a pickle that names no class or function
            raise ValueError(f"{path}: a pickle that is not a torch checkpoint (torch.load weights_only=True: "
                             f"{detail})") from None
        if isinstance(found, str):
            detail += f"; the pickle references {found}"
        raise ValueError(
            f"{path}: refused: the file holds objects other than tensors and plain containers, and loading it "
            f"would execute pickled code (torch.load weights_only=True: {detail})") from None
    except Exception as err:  # torch raises KeyError, RuntimeError, EOFError, ... on files that are no checkpoint
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    return tensors_to_arrays(path, obj)


def load_safetensors(path: Path) -> dict:
    """{name: torch tensor} of a .safetensors file (Hugging Face's model.safetensors): the header is checked
    against the file's size first (ref.io.safetensors_header), then the safetensors package reads it (its torch
    API, which also reads bfloat16; no pickle is involved in the format)."""
    try:
        ref.io.safetensors_header(path)
    except ValueError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    package = ref.io.safetensors_package()  # ValueError when the package is missing
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except (package.SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from None


def tensors_to_arrays(path: Path, obj) -> dict[str, np.ndarray]:
    """The state dict `obj` (a mapping from names to torch tensors) as {name: array}."""
    import torch

    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: not a state dict (a non-empty mapping from names to tensors), got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: not a state dict: entry {name!r} is a {type(value).__name__}, not a tensor")
    out = {}
    for name, value in obj.items():
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        try:
            out[name] = value.numpy()
        except (TypeError, RuntimeError) as err:  # sparse, quantized, meta tensors, ...
            raise ValueError(f"{path}: tensor {name!r} cannot be read as an array ({err})") from None
    return out


def file_kind(path: Path) -> str:
    """"zip" (torch's checkpoint format, .npz), "pickle" (torch's legacy format) or "safetensors" from the first
    bytes; anything else is described (empty, a .npy array, or its size and first bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, pickle protocol 2–5
        return "pickle"
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array, not a state dict of named arrays"
    if len(head) > 8 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    return f"unrecognised content ({path.stat().st_size} bytes, starting {head[:8].hex(' ')})"


def pickle_global(path: Path) -> str:
    """The first class or function a pickle file names ("" if none) besides those of torch's own checkpoint format
    (torch.*, collections.OrderedDict), read with pickletools, which only decodes opcodes and never imports or
    calls anything. A zip checkpoint (torch.save's format): its data.pkl."""
    import pickletools

    def first_global(fh) -> str:
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(fh):
            name = ""
            if op.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL":
                name = ".".join(strings[-2:])
            elif isinstance(arg, str):
                strings.append(arg)
            if name and not name.startswith(("torch.", "collections.OrderedDict")):
                return name
        return ""

    try:
        with open(path, "rb") as fh:
            if not zipfile.is_zipfile(fh):
                fh.seek(0)
                return first_global(fh)
            with zipfile.ZipFile(fh) as archive:
                pkl = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
                if not pkl:
                    return ""
                with archive.open(pkl[0]) as member:
                    return first_global(member)
    except Exception:  # a corrupt pickle or zip (any decoding error, a huge declared length): no name to report
        return ""


def _npy_members_only(path: Path) -> bool:
    """An .npz under another name (a zip of .npy files; torch's zip checkpoints hold data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError):
        return False  # not a readable zip (a flipped version field: NotImplementedError); torch.load says why
    return bool(names) and all(name.endswith(".npy") for name in names)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the three conversions
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# A whole GPT-2 language model around the converted HyperMoE stack (kind "model")
# ---------------------------------------------------------------------------------------------


def resolve_kind(state: Mapping[str, np.ndarray], prefix: str, kind: str) -> str:
    """"model" or "stack": `kind`, or for "auto" "model" exactly when the checkpoint holds WHOLE_LM."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "model" if all(prefix + name in state for name in WHOLE_LM) else "stack"


def check_heads(n_heads: int | None) -> None:
    if n_heads is None:
        raise ValueError("a whole GPT-2 model needs its number of attention heads, which the checkpoint does not "
                         "store: pass --heads H (n_heads; GPT-2 small 12, medium 16, large 20, xl 25), or "
                         "--kind stack for the HyperMoE layers alone")


def gpt2_body(prefix: str, cfg: HyperMoEConfig, n_blocks: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{official name: (our name, shape)} of a GPT-2 model outside its HyperMoE layers, all taken as is: the
    embeddings are (rows, d) tables in both, LayerNorms are (d) vectors, and Conv1D weights are already x @ W
    (c_attn's columns are q | k | v, which is how GPT-2 splits them and ref.model reads them)."""
    d, f, V, P = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    body = {prefix + "wte.weight": ("token_embed", (V, d)), prefix + "wpe.weight": ("pos_embed", (P, d)),
            prefix + "ln_f.weight": ("ln_f.weight", (d,)), prefix + "ln_f.bias": ("ln_f.bias", (d,))}
    for i in range(n_blocks):
        h, b = f"{prefix}h.{i}.", f"blocks.{i}."
        body.update({
            h + "ln_1.weight": (b + "ln1.weight", (d,)), h + "ln_1.bias": (b + "ln1.bias", (d,)),
            h + "attn.c_attn.weight": (b + "attn.qkv.weight", (d, 3 * d)),
            h + "attn.c_attn.bias": (b + "attn.qkv.bias", (3 * d,)),
            h + "attn.c_proj.weight": (b + "attn.proj.weight", (d, d)),
            h + "attn.c_proj.bias": (b + "attn.proj.bias", (d,)),
            h + "ln_2.weight": (b + "ln2.weight", (d,)), h + "ln_2.bias": (b + "ln2.bias", (d,)),
        })
        if not cfg.is_moe_block(i):  # a block left dense keeps GPT-2's MLP (biases: cfg.expert_bias is True)
            body.update({h + "mlp.c_fc.weight": (b + "mlp.w1", (d, f)), h + "mlp.c_fc.bias": (b + "mlp.b1", (f,)),
                         h + "mlp.c_proj.weight": (b + "mlp.w2", (f, d)), h + "mlp.c_proj.bias": (b + "mlp.b2", (d,))})
    return body


def as_model(state: Mapping[str, np.ndarray], prefix: str, stack: Converted, *, n_heads: int,
             layer_norm_eps: float, dtype) -> Converted:
    """The whole GPT2LMHeadModel around `stack` (its converted HyperMoE layers and hypernetwork), kind "model":
    embeddings, every block's ln_1 / attention / ln_2, the MLPs of blocks left dense, ln_f (gpt2_body), and
    the LM head: tied when `lm_head.weight` is absent or equal to wte (GPT-2), else lm_head.weight = its
    transpose. Every tensor of the checkpoint is converted or reported unused with the reason; any other is
    an error. The checkpoint stores neither n_heads nor the LayerNorm eps (GPT-2: layer_norm_epsilon 1e-5)."""
    check_heads(n_heads)
    cfg = stack.config
    V, d = anchor(state, prefix + "wte.weight", 2)
    P, _ = anchor(state, prefix + "wpe.weight", 2)
    if d != cfg.d_model:
        raise ValueError(f"official tensor {prefix + 'wte.weight'!r} has shape {(V, d)}: width {d}, but the HyperMoE "
                         f"layers have d = {cfg.d_model}")
    n_blocks = block_count(state, prefix, "h")
    if n_blocks != cfg.n_layers:  # the official table has num_hidden_layers rows, one per block; a stack may have
        # more rows than blocks (HyperMoE in block 1 of blocks 0, 1 with a 3-row table), a model may not
        raise ValueError(f"the model has {n_blocks} blocks but the hypernetwork's layer-embedding table has "
                         f"{cfg.n_layers} rows: a model directory needs one row per block")
    head = prefix.removesuffix("transformer.") + "lm_head.weight"  # GPT2LMHeadModel: lm_head beside transformer.
    tied = head not in state or np.array_equal(state[head], state[prefix + "wte.weight"])
    cfg = cfg.replace(vocab_size=V, max_seq_len=P, n_heads=n_heads, layer_norm_eps=layer_norm_eps, tie_embeddings=tied)
    body = gpt2_body(prefix, cfg, n_blocks)
    check_official(state, {name: shape for name, (_, shape) in body.items()})
    params = {ours: np.asarray(state[name]) for name, (ours, _) in body.items()}
    if not tied:
        check_official(state, {head: (V, d)})
        params["lm_head.weight"] = linear_t(state, head)  # nn.Linear (V, d) → (d, V)
    for name, value in stack.params.items():  # layers.{ℓ}.X → blocks.{ℓ}.moe.X; hyper.* as is
        if name.startswith("layers."):
            layer, rest = name[len("layers."):].split(".", 1)
            name = f"blocks.{layer}.moe.{rest}"
        params[name] = value

    unused = {key: why for key, why in stack.unused.items() if key not in body}  # a dense block's MLP is used now
    if tied and head in state:
        unused[head] = f"the LM head, equal to {prefix}wte.weight: tied (GPT-2), the model reuses token_embed"
    unknown = []
    for key in stack.ignored:
        if key in body or key == head:
            continue
        reason = next((why for pat, why in GPT2_KNOWN_UNUSED
                       if key.startswith(prefix) and pat.fullmatch(key[len(prefix):])), None)
        if reason is None:
            unknown.append(key)
        else:
            unused[key] = reason
    if unknown:
        raise ValueError(f"unexpected tensor(s) in a whole GPT-2 model (not part of GPT2LMHeadModel's layout, refusing "
                         f"to drop them): {', '.join(sorted(unknown)[:10])}; --kind stack converts the HyperMoE "
                         "layers alone")
    return Converted(cfg, finish(cfg, params, dtype, "model"), unused, [], "model")


# ---------------------------------------------------------------------------------------------
# The official GPT-2 variant
# ---------------------------------------------------------------------------------------------


def from_official_gpt2(
    state: Mapping[str, np.ndarray], *, top_k: int = 1, keep_noise: bool = False,
    activation: str = "gelu_tanh", dtype=np.float32, kind: str = "auto", n_heads: int | None = None,
    layer_norm_eps: float = 1e-5,
) -> Converted:
    """The official GPT-2 HyperMoE (every block's `h.{ℓ}.mlp` is a HyperMoE layer; one `param_gen`).

    The checkpoint stores neither k (official: 1) nor the activation (GPT-2's gelu_new = gelu_tanh).
    keep_noise: keep `w_noise` as router.noise_weight (noisy_gating, for further training); else reported.
    kind: "stack" (the HyperMoE layers and the hypernetwork), "model" (the whole GPT2LMHeadModel: as_model;
    needs n_heads, and layer_norm_eps if not GPT-2's 1e-5) or "auto" (model when the checkpoint holds WHOLE_LM).
    """
    check_activation(activation)
    prefix, blocks = find_blocks(state, r"h\.(\d+)\.mlp\.w_gate", "official GPT-2 HyperMoE blocks")
    model = resolve_kind(state, prefix, kind) == "model"
    if model:
        check_heads(n_heads)  # before the work
    mlp = lambda i: f"{prefix}h.{i}.mlp."  # noqa: E731
    d, N = anchor(state, mlp(blocks[0]) + "w_gate", 2, [mlp(i) + "w_gate" for i in blocks[1:]])  # x @ w_gate: (d, N)
    _, f = anchor(state, mlp(blocks[0]) + "experts.expert_0.c_fc.weight", 2,
                  [mlp(i) + "experts.expert_0.c_fc.weight" for i in blocks[1:]])  # Conv1D: (d, f)
    hyper = mlp(blocks[0]) + "n_experts_embedding.weight" in state
    for i in blocks:
        if (mlp(i) + "n_experts_embedding.weight" in state) != hyper:
            raise ValueError(f"block {blocks[0]} {'has' if hyper else 'lacks'} expert embeddings but block {i} does "
                             "not: mixed HyperMoE and plain MoE layers are not supported")
    sizes, gen = {}, None
    n_blocks = block_count(state, prefix, "h")
    if hyper:
        gen = find_param_gen(state, prefix + "param_gen.")
        sizes = hyper_sizes(state, mlp(blocks[0]), gen, d)
        if n_blocks > sizes["n_layers"]:
            raise ValueError(f"the model has {n_blocks} blocks but {gen}layer_embed.weight only {sizes['n_layers']} rows")
    else:
        sizes["n_layers"] = n_blocks
    cfg = HyperMoEConfig(
        d_model=d, d_ff=f, n_experts=N, top_k=top_k, gate="topk", expert_bias=True, activation=activation,
        router_bias=False, noisy_gating=keep_noise, hyper_expert=hyper,
        moe_every=moe_every_for(blocks, sizes["n_layers"]),
        n_heads=1,  # model-level fields are not in a stack; 1 divides any d
        **sizes,
    )

    expected: dict[str, tuple[int, ...]] = {}
    for i in blocks:
        expected[mlp(i) + "w_gate"] = (d, N)
        if keep_noise:
            expected[mlp(i) + "w_noise"] = (d, N)
        for j in range(N):
            ex = f"{mlp(i)}experts.expert_{j}."
            expected.update({ex + "c_fc.weight": (d, f), ex + "c_fc.bias": (f,),
                             ex + "c_proj.weight": (f, d), ex + "c_proj.bias": (d,)})
    expected.update(hyper_part_expected(cfg, [mlp(i) for i in blocks], gen))
    check_official(state, expected)

    layers: dict[int, dict[str, np.ndarray]] = {}  # block → its router and experts, our names
    for i in blocks:
        experts = [f"{mlp(i)}experts.expert_{j}." for j in range(N)]
        layer = {
            "router.weight": np.asarray(state[mlp(i) + "w_gate"]),  # (d, N), already x @ W
            # GPT-2 Conv1D computes x @ W + b with W: (in, out), our layout: stack as is
            "experts.w1": np.stack([state[ex + "c_fc.weight"] for ex in experts]),  # (N, d, f)
            "experts.b1": np.stack([state[ex + "c_fc.bias"] for ex in experts]),  # (N, f)
            "experts.w2": np.stack([state[ex + "c_proj.weight"] for ex in experts]),  # (N, f, d)
            "experts.b2": np.stack([state[ex + "c_proj.bias"] for ex in experts]),  # (N, d)
        }
        if keep_noise:
            layer["router.noise_weight"] = np.asarray(state[mlp(i) + "w_noise"])  # (d, N), x @ w_noise
        layers[i] = layer
    stack = assemble(cfg, state, layers, mlp, gen, expected, dtype)
    if model:
        return as_model(state, prefix, stack, n_heads=n_heads, layer_norm_eps=layer_norm_eps, dtype=dtype)
    return stack


# ---------------------------------------------------------------------------------------------
# The official Switch Transformer variant
# ---------------------------------------------------------------------------------------------


def from_official_switch(
    state: Mapping[str, np.ndarray], *, stack: str, capacity: int | None,
    activation: str = "relu", dtype=np.float32,
) -> Converted:
    """One stack ("encoder" or "decoder") of the official Switch HyperMoE: its sparse blocks
    `{stack}.block.{ℓ}.layer.{1|2}.mlp` (layer index ℓ = the absolute block index) and `{stack}.param_gen`.

    capacity: the official config's expert_capacity (HF default 64; the checkpoint does not store it),
    or None for no limit. The activation (HF dense_act_fn, default relu) is not stored either.
    """
    if stack not in SWITCH_FF_LAYER:
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
    check_activation(activation)
    ff = SWITCH_FF_LAYER[stack]
    prefix, blocks = find_blocks(state, rf"{stack}\.block\.(\d+)\.layer\.{ff}\.mlp\.router\.classifier\.weight",
                                 f"official Switch HyperMoE blocks in the {stack} stack")
    mlp = lambda i: f"{prefix}{stack}.block.{i}.layer.{ff}.mlp."  # noqa: E731
    N, d = anchor(state, mlp(blocks[0]) + "router.classifier.weight", 2,
                  [mlp(i) + "router.classifier.weight" for i in blocks[1:]])  # nn.Linear: (N, d)
    f, _ = anchor(state, mlp(blocks[0]) + "experts.expert_0.wi.weight", 2,
                  [mlp(i) + "experts.expert_0.wi.weight" for i in blocks[1:]])  # nn.Linear: (f, d)
    router_bias = mlp(blocks[0]) + "router.classifier.bias" in state  # HF router_bias, default False
    hyper = mlp(blocks[0]) + "n_experts_embedding.weight" in state
    for i in blocks:
        if (mlp(i) + "n_experts_embedding.weight" in state) != hyper:
            raise ValueError(f"block {blocks[0]} {'has' if hyper else 'lacks'} expert embeddings but block {i} does "
                             "not: mixed HyperMoE and plain MoE layers are not supported")
    sizes, gen = {}, None
    n_blocks = block_count(state, prefix, f"{stack}.block")
    if hyper:
        gen = find_param_gen(state, f"{prefix}{stack}.param_gen.")
        sizes = hyper_sizes(state, mlp(blocks[0]), gen, d)
        if n_blocks > sizes["n_layers"]:
            raise ValueError(f"the {stack} has {n_blocks} blocks but {gen}layer_embed.weight only {sizes['n_layers']} rows")
    else:
        sizes["n_layers"] = n_blocks
    cfg = HyperMoEConfig(
        d_model=d, d_ff=f, n_experts=N, top_k=1, gate="switch", capacity=capacity, expert_bias=False,
        activation=activation, router_bias=router_bias, hyper_expert=hyper,
        moe_every=moe_every_for(blocks, sizes["n_layers"]),
        n_heads=1,  # model-level fields are not in a stack; 1 divides any d
        **sizes,
    )

    expected: dict[str, tuple[int, ...]] = {}
    for i in blocks:
        expected[mlp(i) + "router.classifier.weight"] = (N, d)
        if router_bias:
            expected[mlp(i) + "router.classifier.bias"] = (N,)
        for j in range(N):
            ex = f"{mlp(i)}experts.expert_{j}."
            expected.update({ex + "wi.weight": (f, d), ex + "wo.weight": (d, f)})
    expected.update(hyper_part_expected(cfg, [mlp(i) for i in blocks], gen))
    check_official(state, expected)

    layers: dict[int, dict[str, np.ndarray]] = {}  # block → its router and experts, our names
    for i in blocks:
        experts = [f"{mlp(i)}experts.expert_{j}." for j in range(N)]
        layer = {
            "router.weight": linear_t(state, mlp(i) + "router.classifier.weight"),  # (d, N)
            # T5-style experts are bias-free nn.Linear: transpose each, then stack
            "experts.w1": np.stack([linear_t(state, ex + "wi.weight") for ex in experts]),  # (N, d, f)
            "experts.w2": np.stack([linear_t(state, ex + "wo.weight") for ex in experts]),  # (N, f, d)
        }
        if router_bias:
            layer["router.bias"] = np.asarray(state[mlp(i) + "router.classifier.bias"])  # (N,)
        layers[i] = layer
    return assemble(cfg, state, layers, mlp, gen, expected, dtype)


# ---------------------------------------------------------------------------------------------
# Upcycling dense GPT-2 MLPs
# ---------------------------------------------------------------------------------------------


def upcycle_gpt2_mlp(
    state: Mapping[str, np.ndarray], *, n_experts: int, top_k: int, seed: int = 0, moe_every: int = 1,
    activation: str = "gelu_tanh", dtype=np.float32, kind: str = "auto", n_heads: int | None = None,
    layer_norm_eps: float = 1e-5, **hyper_widths: int,
) -> Converted:
    """HyperMoE from a dense GPT-2: block ℓ's MLP (`h.{ℓ}.mlp.c_fc` / `c_proj`, Conv1D, x @ W + b)
    copied into each of the N experts of layer ℓ, for the blocks cfg.is_moe_block picks (moe_every = 1:
    all, as the paper's GPT-2 experiments); router, expert embeddings, process MLP and hypernetwork
    fresh from ref.init_stack(cfg, seed), except the generator heads of W_up and b_up, which start at zero
    (the HyperExpert outputs 0). So each upcycled layer starts as the dense MLP: exactly with k = 1 (the gate
    is 1), up to rounding with k > 1 (the renormalised gates sum to 1 ± k·u). `hyper_widths`: d_expert_embed,
    d_process, d_hyper, d_layer_embed, d_generator, d_adapter (default: the official sizes).
    kind: "stack", "model" (the whole GPT2LMHeadModel around it: as_model; needs n_heads) or "auto" (model
    when the checkpoint holds WHOLE_LM, as a GPT2LMHeadModel's state dict / model.safetensors does).
    """
    check_activation(activation)
    allowed = {"d_expert_embed", "d_process", "d_hyper", "d_layer_embed", "d_generator", "d_adapter"}
    unknown = sorted(set(hyper_widths) - allowed)
    if unknown:
        raise ValueError(f"unknown hypernetwork width(s) {unknown}; expected some of {sorted(allowed)}")
    prefix, blocks = find_blocks(state, r"h\.(\d+)\.mlp\.c_fc\.weight", "dense GPT-2 MLPs")
    model = resolve_kind(state, prefix, kind) == "model"
    if model:
        check_heads(n_heads)  # before the work
    mlp = lambda i: f"{prefix}h.{i}.mlp."  # noqa: E731
    d, f = anchor(state, mlp(blocks[0]) + "c_fc.weight", 2, [mlp(i) + "c_fc.weight" for i in blocks[1:]])  # (d, f)
    n_layers = block_count(state, prefix, "h")
    cfg = HyperMoEConfig(
        d_model=d, d_ff=f, n_experts=n_experts, top_k=top_k, gate="topk", expert_bias=True, activation=activation,
        n_layers=n_layers, moe_every=moe_every, n_heads=1, **hyper_widths,  # n_heads: 1 divides any d
    )
    moe = ref.stack_layers(cfg)
    if not moe:
        raise ValueError(f"moe_every = {moe_every} selects no block of the {n_layers} blocks")
    ref.check_memory(cfg, "stack", 8, what="upcycling")  # ref.init_stack draws float64 (finish() then casts)
    expected: dict[str, tuple[int, ...]] = {}
    for i in moe:
        expected.update({mlp(i) + "c_fc.weight": (d, f), mlp(i) + "c_fc.bias": (f,),
                         mlp(i) + "c_proj.weight": (f, d), mlp(i) + "c_proj.bias": (d,)})
    check_official(state, expected)

    params = ref.init_stack(cfg, seed=seed)  # float64; the experts are overwritten below
    for i in moe:
        # every expert starts as the dense MLP (N identical copies): (d, f) → (N, d, f), ...
        for ours, theirs in (("w1", "c_fc.weight"), ("b1", "c_fc.bias"), ("w2", "c_proj.weight"), ("b2", "c_proj.bias")):
            params[f"layers.{i}.experts.{ours}"] = np.repeat(np.asarray(state[mlp(i) + theirs])[None], n_experts, axis=0)
    # the heads that generate W_up and b_up start at zero: every HyperExpert outputs relu(...) @ 0 + 0 = 0, so
    # the upcycled model starts as the dense one (the heads' gradients are not zero: training moves them)
    for name in ("hyper.w_up.weight", "hyper.w_up.bias", "hyper.b_up.weight", "hyper.b_up.bias"):
        params[name] = np.zeros_like(params[name])
    dense = re.compile(re.escape(prefix) + r"h\.(\d+)\.mlp\.c_(fc|proj)\.(weight|bias)")
    unused = {key: f"dense MLP of a block that stays dense (moe_every = {moe_every})"
              for key in state if key not in expected and dense.fullmatch(key)}
    ignored = sorted(key for key in state if key not in expected and key not in unused)
    stack = Converted(cfg, finish(cfg, params, dtype), unused, ignored)
    if model:
        return as_model(state, prefix, stack, n_heads=n_heads, layer_norm_eps=layer_norm_eps, dtype=dtype)
    return stack


# ---------------------------------------------------------------------------------------------
# One entry point and the CLI
# ---------------------------------------------------------------------------------------------


def convert(path: str | os.PathLike, source: str, **options) -> Converted:
    """Read the state dict at `path` and convert it: source "official-gpt2" → from_official_gpt2,
    "official-switch" → from_official_switch, "gpt2-mlp" → upcycle_gpt2_mlp; `options` go to that function."""
    functions = {"official-gpt2": from_official_gpt2, "official-switch": from_official_switch,
                 "gpt2-mlp": upcycle_gpt2_mlp}
    if source not in functions:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    return functions[source](load_state_dict(path), **options)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an official HyperMoE checkpoint, or upcycle dense GPT-2 MLPs, to a model directory",
        description="Reads a state dict (torch .bin/.pt via torch.load(weights_only=True), .safetensors, or .npz; "
        "never unpickles code) and writes a hypermoe model directory (config.json + weights.npz or "
        "weights.safetensors). official-gpt2 / official-switch: the official HyperMoE code's checkpoints "
        "(docs/convert.md has the mapping table); gpt2-mlp: copy each dense GPT-2 MLP into every expert, with a "
        "fresh router and hypernetwork whose W_up / b_up heads start at zero (upcycling). A whole GPT-2 language "
        "model (wte, wpe and ln_f present, as in GPT2LMHeadModel's state dict or HF's model.safetensors) becomes "
        "a directory of kind 'model' and needs --heads; HyperMoE layers alone become kind 'stack' (--kind).",
    )
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="layout of STATE_DICT")
    p.add_argument("state_dict", metavar="STATE_DICT", help="a torch state dict (.bin, .pt, ...), a .safetensors "
                   "file or a .npz")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model directory to write (staged "
                   "next to it, then renamed in; its parent must exist)")
    p.add_argument("--force", action="store_true", help="replace an existing MODEL_DIR (default: refuse it)")
    p.add_argument("--stack", choices=tuple(SWITCH_FF_LAYER), help="official-switch: which stack to convert (required)")
    p.add_argument("--capacity", metavar="C|none", help="official-switch: expert capacity per sequence, the official "
                   "config's expert_capacity (HF default 64), or 'none' for no limit (required)")
    p.add_argument("--top-k", type=int, default=None, help="official-gpt2 (default 1, official) and gpt2-mlp (required)")
    p.add_argument("--keep-noise", action="store_true", help="official-gpt2: keep w_noise as router.noise_weight "
                   "(noisy gating, for further training)")
    p.add_argument("--experts", type=int, default=None, help="gpt2-mlp: number of experts N (required)")
    p.add_argument("--seed", type=int, default=None, help="gpt2-mlp: seed of the fresh parameters (default 0)")
    p.add_argument("--moe-every", type=int, default=None, help="gpt2-mlp: upcycle block ℓ when "
                   "ℓ %% moe_every == moe_every - 1 (default 1: every block)")
    p.add_argument("--d-adapter", type=int, default=None, help="gpt2-mlp: HyperExpert width a (default 64)")
    p.add_argument("--hyper-width", type=int, default=None, help="gpt2-mlp: d_e = d_p = d_h = d_g (default 128)")
    p.add_argument("--kind", choices=KINDS, default=None, help="official-gpt2 and gpt2-mlp: 'model' (the whole "
                   "GPT-2 LM: embeddings, attention, norms, head), 'stack' (the HyperMoE layers and hypernetwork "
                   "alone), or 'auto' (default: 'model' when the checkpoint holds wte, wpe and ln_f, else 'stack')")
    p.add_argument("--heads", type=int, default=None, metavar="H", help="kind model: attention heads n_heads, "
                   "required (not stored in a checkpoint; no default, since a wrong one silently changes every "
                   "logit): GPT-2 small 12, medium 16, large 20, xl 25")
    p.add_argument("--layer-norm-eps", type=float, default=None, metavar="EPS", help="kind model: LayerNorm eps "
                   "(GPT-2's layer_norm_epsilon, default 1e-5; not stored in a checkpoint)")
    p.add_argument("--format", choices=tuple(ref.io.FORMATS), default="npz", help="weights file of MODEL_DIR: "
                   "weights.npz (default; numpy alone reads it) or weights.safetensors")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="expert (and dense MLP) activation (default gelu_tanh for GPT-2, relu for Switch)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="weights dtype (default float32)")
    p.add_argument("--verbose", action="store_true", help="kind stack: also list the tensors outside the HyperMoE "
                   "layers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm_flags = {"kind", "heads", "layer_norm_eps"}  # a whole GPT-2 LM
    per_source = {
        "official-gpt2": {"top_k", "keep_noise", "activation", *lm_flags},
        "official-switch": {"stack", "capacity", "activation"},
        "gpt2-mlp": {"top_k", "experts", "seed", "moe_every", "d_adapter", "hyper_width", "activation", *lm_flags},
    }[args.source]
    flags = {"stack": args.stack, "capacity": args.capacity, "top_k": args.top_k, "keep_noise": args.keep_noise or None,
             "experts": args.experts, "seed": args.seed, "moe_every": args.moe_every, "d_adapter": args.d_adapter,
             "hyper_width": args.hyper_width, "activation": args.activation, "kind": args.kind, "heads": args.heads,
             "layer_norm_eps": args.layer_norm_eps}
    stray = sorted("--" + k.replace("_", "-") for k, v in flags.items() if v is not None and k not in per_source)
    if stray:
        raise ValueError(f"{', '.join(stray)} do(es) not apply to --from {args.source}")
    if args.kind == "stack" and (args.heads is not None or args.layer_norm_eps is not None):
        raise ValueError("--heads and --layer-norm-eps apply to a whole model, not to --kind stack")
    options: dict = {"dtype": np.dtype(args.dtype)}
    if args.activation:
        options["activation"] = args.activation
    if args.source != "official-switch":
        options.update(kind=args.kind or "auto", n_heads=args.heads)
        if args.layer_norm_eps is not None:
            options["layer_norm_eps"] = args.layer_norm_eps
    if args.source == "official-gpt2":
        options.update(top_k=1 if args.top_k is None else args.top_k, keep_noise=args.keep_noise)
    elif args.source == "official-switch":
        if args.stack is None or args.capacity is None:
            raise ValueError("--from official-switch needs --stack encoder|decoder and --capacity C|none (the official "
                             "config's expert_capacity, HF default 64; the checkpoint does not store it)")
        capacity = None if args.capacity.lower() == "none" else _positive_int(args.capacity, "--capacity")
        options.update(stack=args.stack, capacity=capacity)
    else:
        if args.experts is None or args.top_k is None:
            raise ValueError("--from gpt2-mlp needs --experts N and --top-k k")
        options.update(n_experts=args.experts, top_k=args.top_k, seed=args.seed or 0, moe_every=args.moe_every or 1)
        if args.d_adapter is not None:
            options["d_adapter"] = args.d_adapter
        if args.hyper_width is not None:
            options.update({k: args.hyper_width for k in ("d_expert_embed", "d_process", "d_hyper", "d_generator")})
    if args.format == "safetensors":
        ref.io.safetensors_package()  # the package is missing: say so before the (slow) conversion
    check_output(args.output, force=args.force, directory=True, entries=ref.io.ENTRIES)
    result = convert(args.state_dict, args.source, **options)  # slow on big checkpoints: the output is checked first
    out = ref.io.save_dir(args.output, result.config, result.params, result.kind, force=args.force, format=args.format)

    cfg = result.config
    layers = ref.stack_layers(cfg)
    print(f"converted {args.state_dict} ({args.source}) → {out} (kind {result.kind}, {args.dtype}, "
          f"{ref.io.FORMATS[args.format]})")
    if result.kind == "model":
        print(f"model: vocab_size={cfg.vocab_size} max_seq_len={cfg.max_seq_len} n_heads={cfg.n_heads} "
              f"layer_norm_eps={cfg.layer_norm_eps} tie_embeddings={cfg.tie_embeddings}")
    print(f"config: d={cfg.d_model} f={cfg.d_ff} N={cfg.n_experts} k={cfg.top_k} gate={cfg.gate} "
          f"capacity={cfg.capacity} activation={cfg.activation} expert_bias={cfg.expert_bias} "
          f"hyper_expert={cfg.hyper_expert}")
    if cfg.hyper_expert:
        print(f"hypernetwork: d_e={cfg.d_expert_embed} d_p={cfg.d_process} d_h={cfg.d_hyper} d_l={cfg.d_layer_embed} "
              f"d_g={cfg.d_generator} a={cfg.d_adapter}")
    print(f"HyperMoE layers: {len(layers)} of {cfg.n_layers} blocks {layers} (moe_every={cfg.moe_every}), "
          f"{sum(v.size for v in result.params.values()):,} parameters")
    if result.unused:
        print(f"unused tensors ({len(result.unused)}):")
        for key, why in result.unused.items():
            print(f"  {key}: {why}")
    if result.kind == "stack":
        print(f"tensors outside the HyperMoE layers, not part of a stack: {len(result.ignored)}"
              + ("" if args.verbose or not result.ignored else " (--verbose lists them)"))
    if args.verbose:
        for key in result.ignored:
            print(f"  {key}")
    return 0


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} must be an int ≥ 1 or 'none', got {text!r}") from None
    if value < 1:
        raise ValueError(f"{flag} must be an int ≥ 1 or 'none', got {value}")
    return value
