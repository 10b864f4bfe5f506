"""The HyperMoE layer in PyTorch (SPEC.md §3; the definition is ref/semantics.py): router, routed experts and
HyperExpert put together, the choice of their fast paths per call, and the layer's reference parameters.

    logits = (x ⊙ u) W_r + b_r [+ ε ⊙ (softplus(x W_noise) + 0.01)]       router, float32 at least
    S = top-k(logits), ties → lower index;  g = gates(softmax(logits), S)   "topk" renormalised | "switch" p_{i*}
    y = Σ_{i∈S} g_i FFN_i(x)   (capacity drop: y = g·x)
    s = Σ_{j∉S} E_j;  z = process(s);  r = relu([z ; L_ℓ] Wg + cg);  W_down, b_down, W_up, b_up = heads(r)
    output = y + relu(x W_down + b_down) W_up + b_up

The parts live next door: the router and the aux losses in routing.py (§3.1–3.4, §3.8), the routed experts'
dispatch in experts.py (§3.5), the hypernetwork and the ways its adapters are applied in hypernetwork.py
(§3.6–3.7). The same numbers as the reference, computed fast (performance.md). Paths, chosen per call:
- sorted (default): tokens' expert assignments sorted by expert (stable), one GEMM pair per expert on a
  contiguous slice of per-expert views (`unbind`: one gradient op, not N full-size zeros), gathered back (no
  scatter-add). The HyperExpert depends on a token only through its selected set S, so adapters are generated
  once per distinct set present (sets encoded by their colex rank in [0, C(N, k))) and applied grouped by set —
  never per token. With k = 1 the set is the expert, and both run in one dispatch.
- few (CPU, no gradient, T·k ≤ FEW_TOKENS_CPU; decode at batch 1–2): the sorted path's groups formed on the host
  (experts.routed_few: no sort, no unbind, no gather back for one group).
- cached (eval mode, no gradient needed, `cache_adapters`): the adapters of all C(N, k) sets of a layer index
  are generated once and reused until a parameter changes (keyed on data pointers and version counters).
- factored (C(N, k) > MAX_TABLE_SETS = 128, e.g. N = 12, k = 6): x W_down(r) = Σ_j r_j (x Hd_j) + x hd per token,
  nothing of size (T, d, a) stored; g× the adapter FLOPs, hence only there. 128 sets of adapters are
  128·2·d·a floats (50 MB at d = 768, a = 64); C(8, k) ≤ 70 always fits.
- gathered (CUDA, T·k ≤ SMALL_TOKENS_CUDA; decode): each assignment's expert weights (and, at inference, its
  cached adapter) gathered, then bmm; no sort, no host sync. Off on CPU, where it was slower at every T measured
  (the copy doubles the weight traffic). Not yet measured on a GPU: scripts/gpu_check.sh times both.
- torch.nn.functional.grouped_mm is not used: on CPU it is a loop of mm without bias (no faster); its CUDA bf16
  kernel (SM90) is the candidate for the sorted path on GPUs once measured there.
Every path gives the reference's routing exactly and its numbers to rounding (tests/test_layer.py).
None is exportable (data-dependent shapes: sort, bincount, unique); torch.export / torch.onnx.export(dynamo=True)
of this layer is refused with a one-line error. The exportable formulation is export/layer.py's ExportLayer
(`hypermoe export`), built from the same reference parameters.

Axis legend (as ref/):
    T tokens (all leading dims flattened)   d model width          N experts        k selected experts
    f expert hidden width                   a adapter width        e expert-embedding width
    p process hidden width                  h width of z           l layer-embedding width
    g generator width                       L layers sharing the hypernetwork
    C = C(N, k) possible selected sets      U distinct sets present in a batch
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

import ref.io
from ref.config import HyperMoEConfig
from ref.params import check_params, init_std, param_shapes
from hypermoe.experts import FEW_TOKENS_CPU, Experts, routed_few, routed_gathered, routed_sorted
from hypermoe.hypernetwork import (
    Adapters, HyperNetwork, Process, factored_adapter, gathered_adapter, grouped_adapter, param, set_tables,
)
from hypermoe.routing import Router, Routing, aux_from_sums, aux_sums, route

# re-exported: defined here before the split into routing.py, experts.py and hypernetwork.py; hypermoe.model
# imports activation and Linear from here
from hypermoe.experts import activation, c_unbind, expert_ffn  # noqa: F401
from hypermoe.hypernetwork import Linear  # noqa: F401

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# CUDA, T·k up to this: gather each assignment's weights (decode: no sort, no host sync, CUDA-graph friendly).
# Not on CPU: there the gathered copy doubles the weight traffic and the sorted path was faster at every T.
SMALL_TOKENS_CUDA = 4
# torch.export / torch.onnx.export(dynamo=True) of the layer: refused up front (its paths have data-dependent shapes)
EXPORT_REFUSAL = ("HyperMoELayer is not exportable (data-dependent shapes); export with `hypermoe export` or "
                  "export.graph.ExportLayer (the same reference parameters, same numbers)")
MAX_TABLE_SETS = 128  # C(N, k) up to this: adapters per set (grouped / cached); above: factored form


def check_memory(config: HyperMoEConfig, kind: str, *, device=None, dtype=None, what: str) -> None:
    """ref.check_memory for parameters about to be allocated on `device` (torch's default when None): the
    host's available memory on the CPU, the device's free memory on CUDA; other devices are not checked."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type not in ("cpu", "cuda"):
        return
    dtype_bytes = torch.empty((), dtype=dtype, device="meta").element_size()  # dtype None: torch's default
    available, where = None, "this machine's"
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"{device}'s"
    ref.check_memory(config, kind, dtype_bytes, what=what, available=available, where=where)


class HyperMoEOutput(NamedTuple):
    output: torch.Tensor  # (..., d) routed + HyperExpert, the input's dtype
    routing: Routing
    aux: dict[str, torch.Tensor]  # switch_balance, z_loss, cv_balance: scalars (router dtype)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class HyperMoELayer(nn.Module):
    r"""One HyperMoE layer (SPEC.md §3): routed experts plus the HyperExpert generated from the embeddings of
    the experts *not* selected. With config.hyper_expert False it is a plain MoE layer.

    Args:
        config: the HyperMoEConfig.
        hyper: a HyperNetwork shared with other layers (the model owns it; it is referenced, not registered
            here). None with config.hyper_expert: the layer creates and registers its own `hyper`, so that its
            state_dict keys are exactly ref.param_shapes(config).
        check_finite: raise ValueError on NaN/Inf input (costs a host sync on CUDA). Off by default.
        cache_adapters: at inference (eval mode, no gradient needed) keep the adapters of all C(N, k) sets
            per layer index (C(N, k) ≤ MAX_TABLE_SETS), keyed on the parameters' data pointers and version
            counters, so any in-place update, load_state_dict or .to() regenerates them.

    Shape: x (..., S, d) with at least 2 dims (capacity counts along S) → output (..., d); routing and aux as
    `HyperMoEOutput`. Dtypes: float32/float64 (CPU, CUDA), bfloat16 (CPU, CUDA), float16 (CUDA only); the input
    and the parameters must share dtype and device. Router logits, probabilities and gates are computed in
    float32 for 16-bit inputs (float64 for float64), and gates are cast back to the input's dtype to combine.

    Randomness: in training mode, router jitter (cfg.router_jitter > 0) and noisy gating (cfg.noisy_gating)
    draw from torch's RNG unless `jitter` / `gate_noise` are given; in eval mode nothing is drawn. Explicit
    draws are always used (so the stochastic paths compare with the reference).

    NaN policy: inputs are not checked unless `check_finite`. Tokens are independent (without capacity), so
    a non-finite token makes its own output row non-finite and leaves every other token's output unchanged;
    its routing is unspecified (but always valid indices), and the aux losses (means over tokens) become
    non-finite. With capacity, a non-finite token still takes a slot of whichever expert it was routed to.

    Example::

        >>> layer = HyperMoELayer(ref.tiny_config())
        >>> out = layer(torch.randn(2, 5, 16))
        >>> out.output.shape, out.routing.selected.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 2]))
    """

    def __init__(self, config: HyperMoEConfig, *, hyper: HyperNetwork | None = None, check_finite: bool = False,
                 cache_adapters: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, HyperMoEConfig):
            raise ValueError(f"config must be a HyperMoEConfig, got {type(config).__name__}")
        if hyper is None:  # with a shared hypernetwork its owner (the model) has checked the whole
            check_memory(config, "layer", device=device, dtype=dtype, what="HyperMoELayer")
        self.config = config
        c, kw = config, dict(device=device, dtype=dtype)
        self.router = Router(c, **kw)
        self.experts = Experts(c, **kw)
        self._shared_hyper: tuple[HyperNetwork, ...] = ()  # a tuple: referenced, not a registered submodule
        if c.hyper_expert:
            self.expert_embed = param((c.n_experts, c.d_expert_embed), **kw)  # (N, e)
            self.process = Process(c, **kw)
            if hyper is None:
                self.hyper = HyperNetwork(c, **kw)
            else:
                if not isinstance(hyper, HyperNetwork):
                    raise ValueError(f"hyper must be a HyperNetwork, got {type(hyper).__name__}")
                for name in ("d_model", "d_adapter", "d_hyper", "d_layer_embed", "d_generator", "n_layers"):
                    if getattr(hyper.config, name) != getattr(c, name):
                        raise ValueError(f"shared hypernetwork has config field {name!r} = "
                                         f"{getattr(hyper.config, name)}, the layer's config has {getattr(c, name)}")
                self._shared_hyper = (hyper,)
        elif hyper is not None:
            raise ValueError("a hypernetwork was given but config field 'hyper_expert' is False")
        self.check_finite = check_finite
        self.cache_adapters = cache_adapters
        self.max_table_sets = MAX_TABLE_SETS
        self.small_tokens: int | None = None  # None: SMALL_TOKENS_CUDA on CUDA, 0 on CPU
        n_sets = math.comb(c.n_experts, c.top_k)
        binom, sets = set_tables(c.n_experts, c.top_k, device) if n_sets <= MAX_TABLE_SETS else (None, None)
        self.register_buffer("_binom", binom, persistent=False)  # (k + 1, N) C(n, j), for set ranks
        self.register_buffer("_sets", sets, persistent=False)  # (C, N) bool: the sets in colex-rank order
        self._adapter_cache: dict[int, tuple[tuple, Adapters]] = {}
        self.reset_parameters()

    # --- module plumbing ---
    @property
    def hypernetwork(self) -> HyperNetwork | None:
        """The hypernetwork this layer uses: its own `hyper` or the shared one (None for a plain MoE)."""
        if self._shared_hyper:
            return self._shared_hyper[0]
        return self._modules.get("hyper")

    def reset_parameters(self) -> None:
        """Training init: every per-layer parameter ~ N(0, σ²) with the reference's per-name σ
        (ref.params.init_std: router/expert weights 1/sqrt(fan_in), He (sqrt(2/fan_in)) before a ReLU or
        the first expert matrix, biases 0.1, expert embeddings 1). An own hypernetwork is re-initialised too;
        a shared one is left to its owner."""
        own = [(n, p) for n, p in self.named_parameters() if not n.startswith("hyper.")]
        with torch.no_grad():
            for name, p in own:
                p.normal_(0.0, init_std(self.config, name, tuple(p.shape)))
        if "hyper" in self._modules:
            self.hyper.reset_parameters()
        self._adapter_cache.clear()

    def extra_repr(self) -> str:
        c = self.config
        s = (f"d_model={c.d_model}, d_ff={c.d_ff}, n_experts={c.n_experts}, top_k={c.top_k}, gate={c.gate!r}, "
             f"capacity={c.capacity}, activation={c.activation!r}, hyper_expert={c.hyper_expert}")
        if c.hyper_expert:
            s += f", d_adapter={c.d_adapter}, shared_hyper={bool(self._shared_hyper)}"
        return s

    # --- checks ---
    def _check(self, x, layer_index, jitter, gate_noise) -> None:
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"input dtype must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"input must have shape (..., S, d) with at least 2 dims, got shape {tuple(x.shape)}")
        if x.shape[-1] != c.d_model:
            raise ValueError(f"input's last dim is {x.shape[-1]}, config d_model is {c.d_model}")
        w = self.router.weight
        if x.dtype != w.dtype:
            raise ValueError(f"input dtype {x.dtype} differs from the layer's parameter dtype {w.dtype} "
                             "(convert the layer with .to(dtype) or the input)")
        if x.device != w.device:
            raise ValueError(f"input is on {x.device}, the layer's parameters are on {w.device}")
        if x.dtype == torch.float16 and x.device.type == "cpu":
            raise ValueError("float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
        integer = isinstance(layer_index, (int, np.integer)) and not isinstance(layer_index, bool)
        if not integer or not 0 <= layer_index < c.n_layers:
            raise ValueError(f"layer_index must be an int in [0, n_layers={c.n_layers}), got {layer_index!r}")
        if jitter is not None and (not isinstance(jitter, torch.Tensor) or jitter.shape != x.shape):
            raise ValueError(f"jitter must be a tensor of the input's shape {tuple(x.shape)}, "
                             f"got {getattr(jitter, 'shape', type(jitter).__name__)}")
        if gate_noise is not None:
            if not c.noisy_gating:
                raise ValueError("gate_noise given but config field 'noisy_gating' is False")
            want = (*x.shape[:-1], c.n_experts)
            if not isinstance(gate_noise, torch.Tensor) or tuple(gate_noise.shape) != want:
                raise ValueError(f"gate_noise must be a tensor of shape {want}, "
                                 f"got {getattr(gate_noise, 'shape', type(gate_noise).__name__)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("input contains NaN or Inf (check_finite=True)")

    # --- forward ---
    def forward(self, x: torch.Tensor, layer_index: int = 0, *, jitter: torch.Tensor | None = None,
                gate_noise: torch.Tensor | None = None, aux: bool = True) -> HyperMoEOutput:
        """x (..., S, d) → HyperMoEOutput. `layer_index` picks the layer embedding ℓ of the hypernetwork;
        `jitter` (..., S, d) and `gate_noise` (..., S, N) are the training-only random draws (SPEC.md §3.1);
        aux=False skips the §3.8 losses (HyperMoEOutput.aux is {}): ~30 small ops, a third of a decode step's layer."""
        if torch.compiler.is_exporting():
            raise ValueError(EXPORT_REFUSAL)
        self._check(x, layer_index, jitter, gate_noise)
        layer_index, c = int(layer_index), self.config
        lead, d, N, k = x.shape[:-1], c.d_model, c.n_experts, c.top_k
        x2 = x.reshape(-1, d)  # (T, d)
        selected, gate, probs, logits, kept = self._route(x, jitter, gate_noise)  # §3.1–3.4, (T, ·)

        small = x2.shape[0] * k <= self._small_tokens(x.device)
        fused = c.hyper_expert and k == 1 and not small and self._tables()
        few = x.device.type == "cpu" and x2.shape[0] * k <= FEW_TOKENS_CPU and not torch.is_grad_enabled()
        routed = routed_few if few else routed_sorted
        if small:
            out = routed_gathered(c, self.experts, x2, selected, gate, kept)  # (T, d) decode sizes
        elif fused:  # k = 1: routed experts and HyperExpert in one dispatch
            out = routed(c, self.experts, x2, selected, gate, kept, self._all_set_adapters(x2, layer_index))
        else:
            out = routed(c, self.experts, x2, selected, gate, kept)  # (T, d)
        if c.hyper_expert and not fused:
            out = out + self._hyper_expert(x2, selected, layer_index, small)  # §3.8 weight 1
        routing = Routing(selected.reshape(*lead, k), gate.reshape(*lead, k), probs.reshape(*lead, N),
                          logits.reshape(*lead, N), kept.reshape(lead))
        return HyperMoEOutput(out.reshape(x.shape), routing, self._aux(logits, probs, selected, gate) if aux else {})

    def _route(self, x, jitter, gate_noise) -> Routing:
        """§3.1–3.4 for x (..., S, d) with this layer's router (routing.route): Routing with the token axes
        flattened (T, ·). In training mode, draws the jitter / gate noise not given (torch's RNG)."""
        return route(self.config, self.router, x, jitter, gate_noise, training=self.training)

    def _small_tokens(self, device: torch.device) -> int:
        if self.small_tokens is not None:
            return self.small_tokens
        return SMALL_TOKENS_CUDA if device.type == "cuda" else 0

    # --- the HyperExpert ---
    def _tables(self) -> bool:
        """Whether adapters are generated per selected set (C(N, k) ≤ max_table_sets), else the factored form."""
        return self._sets is not None and self._sets.shape[0] <= self.max_table_sets

    def _may_cache(self, x2) -> bool:
        """Inference (eval mode, no gradient needed) with the adapter cache on."""
        if not self.cache_adapters or self.training:
            return False
        return not (torch.is_grad_enabled() and (x2.requires_grad or any(
            p.requires_grad for p in (self.expert_embed, *self.process.parameters(), *self.hypernetwork.parameters()))))

    def _all_set_adapters(self, x2, layer_index: int) -> Adapters:
        """The adapters of all C(N, k) sets, row = colex rank: cached at inference, else generated."""
        return self._cached_adapters(layer_index) if self._may_cache(x2) else self._adapters(self._sets, layer_index)

    def _hyper_expert(self, x2, selected, layer_index, small=False) -> torch.Tensor:
        """§3.6–3.7 ê (T, d). Tables of adapters per set when C(N, k) ≤ max_table_sets, else the factored form."""
        c = self.config
        chosen = (selected.unsqueeze(-1) == torch.arange(c.n_experts, device=x2.device)).any(1)  # (T, N) S mask
        if not self._tables():  # per token, nothing of size (T, d, a) stored
            s = (~chosen).to(x2.dtype) @ self.expert_embed  # (T, e)
            return factored_adapter(self.hypernetwork, x2, self.process(s), layer_index)
        count = chosen.long().cumsum(-1)  # (T, N) 1-based position among the selected
        set_id = (self._binom.gather(0, count) * chosen).sum(-1)  # (T,) colex rank Σ_i C(c_i, i)
        if self._may_cache(x2):
            table = self._cached_adapters(layer_index)
            return gathered_adapter(x2, set_id, table) if small else grouped_adapter(x2, set_id, table)
        present, group = torch.unique(set_id, return_inverse=True)  # (U,), (T,) sets present, sorted
        return grouped_adapter(x2, group, self._adapters(self._sets[present], layer_index))

    def _adapters(self, sets: torch.Tensor, layer_index: int) -> Adapters:
        """The HyperExpert of each selected set (U, N) bool: s = Σ_{j∉S} E_j (unweighted; 0 when k = N)."""
        s = (~sets).to(self.expert_embed.dtype) @ self.expert_embed  # (U, e)
        return self.hypernetwork(self.process(s), layer_index)

    def _cached_adapters(self, layer_index: int) -> Adapters:
        """All C(N, k) sets' adapters for layer ℓ, regenerated when any parameter involved changed."""
        tensors = (self.expert_embed, *self.process.parameters(), *self.hypernetwork.parameters())
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        hit = self._adapter_cache.get(layer_index)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            table = self._adapters(self._sets, layer_index)
        self._adapter_cache[layer_index] = (key, table)
        return table

    # --- §3.8 auxiliary losses ---
    def _aux(self, logits, probs, selected, gate) -> dict[str, torch.Tensor]:
        """§3.8 over the T tokens of this call (selection before any capacity drop; all 0 for T = 0)."""
        return aux_from_sums(aux_sums(logits, probs, selected, gate))

    # --- reference parameters and saved directories ---
    def load_ref(self, params: Mapping[str, np.ndarray]) -> HyperMoELayer:
        """Copy a reference parameter mapping (exactly ref.param_shapes(config)'s names, including `hyper.*`,
        which go into the hypernetwork in use — shared or own) into this layer, casting to its dtype."""
        arrays = {name: np.asarray(v) for name, v in params.items()}
        dtypes = {v.dtype for v in arrays.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
            raise ValueError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
        check_params(arrays, param_shapes(self.config), next(iter(dtypes)))
        with torch.no_grad():
            for name, value in params_from_ref(arrays).items():
                if name.startswith("hyper."):
                    target = self.hypernetwork.get_parameter(name[len("hyper."):])
                else:
                    target = self.get_parameter(name)
                target.copy_(value)
        return self

    @classmethod
    def from_ref(cls, config: HyperMoEConfig, params: Mapping[str, np.ndarray], *, device=None,
                 dtype=None, **kwargs) -> HyperMoELayer:
        """A standalone layer holding the reference parameters (dtype: theirs unless given)."""
        if dtype is None:
            dtype = torch.float64 if np.asarray(next(iter(params.values()))).dtype == np.float64 else torch.float32
        return cls(config, device=device, dtype=dtype, **kwargs).load_ref(params)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, device=None, dtype=None, **kwargs) -> HyperMoELayer:
        """Load a saved layer directory (config.json + weights.npz, kind "layer"; ref/io.py, no pickle)."""
        cfg, params, kind = ref.io.load_dir(path)
        if kind != "layer":
            raise ValueError(f"{Path(path) / ref.io.CONFIG_FILE}: kind is {kind!r}, expected 'layer'")
        return cls.from_ref(cfg, params, device=device, dtype=dtype, **kwargs)

    def save_dir(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write config.json + weights.npz (kind "layer"; 16-bit parameters are saved as float32) atomically; an
        existing non-empty `path` is refused unless `force` (ref.io.save_dir)."""
        return ref.io.save_dir(path, self.config, params_to_ref(self), "layer", force=force)


# ---------------------------------------------------------------------------------------------
# Reference parameter mappings
# ---------------------------------------------------------------------------------------------


def params_from_ref(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Reference arrays → tensors under the same names (copies; dtype kept)."""
    return {name: torch.tensor(np.asarray(value)) for name, value in params.items()}


def params_to_ref(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's parameters → reference arrays under the same names (its state_dict keys; a layer using a
    shared hypernetwork adds that one's as `hyper.*`, so the result is ref.param_shapes'). float64 stays
    float64; other dtypes become float32 (the reference's dtypes)."""
    tensors = dict(module.state_dict())
    if isinstance(module, HyperMoELayer) and module._shared_hyper:
        tensors.update({f"hyper.{n}": t for n, t in module.hypernetwork.state_dict().items()})
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        out[name] = (t if t.dtype == torch.float64 else t.float()).numpy().copy()
    return out


__all__ = ["HyperNetwork", "HyperMoELayer", "HyperMoEOutput", "Routing", "Adapters", "params_from_ref",
           "params_to_ref", "MAX_TABLE_SETS"]
