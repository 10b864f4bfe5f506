"""Converting checkpoints from other layouts: official HyperMoE checkpoints → hypermoe model directories,
and dense GPT-2 MLPs → HyperMoE layers (upcycling). docs/convert.md has the full mapping tables; in short:

    official GPT-2 variant (per block `h.{ℓ}.mlp.`, one `param_gen.`)      → gate "topk", expert biases, gelu_tanh
    official Switch variant (per sparse block `{encoder|decoder}.block.{ℓ}.layer.{1|2}.mlp.`,
        one `{stack}.param_gen.` per stack; one stack per conversion)          → gate "switch", no expert biases, relu
    dense GPT-2 `h.{ℓ}.mlp.c_fc` / `c_proj` copied into every expert         → fresh router, embeddings, hypernetwork
                                                                                (W_up / b_up heads zero)
    a dense hypermoe model directory (n_experts 1), its MLPs likewise       → the same model with N experts (dense.py)

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

import os
from pathlib import Path

import ref.io

from hypermoe.convert.common import (  # noqa: F401 (the names hypermoe.convert has always had)
    Converted, GPT2_KNOWN_UNUSED, KINDS, KNOWN_UNUSED, SOURCES, SWITCH_FF_LAYER, WHOLE_LM, anchor, assemble,
    block_count, check_activation, check_official, embedding_expected, embedding_params, find_blocks,
    find_param_gen, finish, hyper_expected, hyper_params, hyper_part_expected, hyper_sizes, leftovers, linear_t,
    moe_every_for,
)
from hypermoe.convert.gpt2 import (  # noqa: F401 (the names hypermoe.convert has always had)
    as_model, check_heads, gpt2_body, resolve_kind,
)
from hypermoe.convert.read import (  # noqa: F401 (the names hypermoe.convert has always had)
    file_kind, load_safetensors, load_state_dict, pickle_global, tensors_to_arrays,
)
from hypermoe.convert.hf_config import load_weights
from hypermoe.convert.official_gpt2 import from_official_gpt2
from hypermoe.convert.official_switch import from_official_switch
from hypermoe.convert.dense import upcycle_dense_model
from hypermoe.convert.upcycle import UP_HEADS, upcycle_, upcycle_gpt2_mlp  # noqa: F401


def convert(path: str | os.PathLike, source: str, **options) -> Converted:
    """Read the state dict at `path` (a weights file, a *.index.json of shards, or a checkpoint folder: config.json +
    weights; hf_config.load_weights) and convert it: source "official-gpt2" → from_official_gpt2, "official-switch"
    → from_official_switch, "gpt2-mlp" → upcycle_gpt2_mlp; `options` go to that function. (config.json is not read
    here: the CLI reads it, hf_config.resolve, and passes its values as options.)"""
    functions = {"official-gpt2": from_official_gpt2, "official-switch": from_official_switch,
                 "gpt2-mlp": upcycle_gpt2_mlp}
    if source == "hypermoe-dense":  # a model directory, not a state dict
        if not Path(path).is_dir():
            raise ValueError(f"{path}: --from hypermoe-dense takes a model directory (config.json + weights)")
        cfg, params, kind = ref.io.load_dir(path)
        if kind != "model":
            raise ValueError(f"{path}: a model directory of kind {kind!r}; --from hypermoe-dense needs kind 'model'")
        return upcycle_dense_model(cfg, params, **options)
    if source not in functions:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    return functions[source](load_weights(path), **options)

