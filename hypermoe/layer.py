"""The HyperMoE layer and the shared hypernetwork in PyTorch (SPEC.md §3; the definition is ref/semantics.py).

    logits = (x ⊙ u) W_r + b_r [+ ε ⊙ (softplus(x W_noise) + 0.01)]       router, float32 at least
    S = top-k(logits), ties → lower index;  g = gates(softmax(logits), S)   "topk" renormalised | "switch" p_{i*}
    y = Σ_{i∈S} g_i FFN_i(x)   (capacity drop: y = g·x)
    s = Σ_{j∉S} E_j;  z = process(s);  r = relu([z ; L_ℓ] Wg + cg);  W_down, b_down, W_up, b_up = heads(r)
    output = y + relu(x W_down + b_down) W_up + b_up

The same numbers as the reference, computed fast (performance.md). Paths, chosen per call:
- sorted (default): tokens' expert assignments sorted by expert (stable), one GEMM pair per expert on a
  contiguous slice of per-expert views (`unbind`: one gradient op, not N full-size zeros), gathered back (no
  scatter-add). The HyperExpert depends on a token only through its selected set S, so adapters are generated
  once per distinct set present (sets encoded by their colex rank in [0, C(N, k))) and applied grouped by set —
  never per token. With k = 1 the set is the expert, and both run in one dispatch.
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
of this layer is refused with a one-line error. The exportable formulation is export/graph.py's ExportLayer
(`hypermoe export`), built from the same reference parameters.

Axis legend (as ref/):
    T tokens (all leading dims flattened)   d model width          N experts        k selected experts
    f expert hidden width                   a adapter width        e expert-embedding width
    p process hidden width                  h width of z           l layer-embedding width
    g generator width                       L layers sharing the hypernetwork
    C = C(N, k) possible selected sets      U distinct sets present in a batch
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ref.io
from ref.config import HyperMoEConfig
from ref.semantics import check_params, init_std, param_shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CV_EPS = 1e-10  # the official cv² denominator guard (as ref.semantics.CV_EPS)
# CUDA, T·k up to this: gather each assignment's weights (decode: no sort, no host sync, CUDA-graph friendly).
# Not on CPU: there the gathered copy doubles the weight traffic and the sorted path was faster at every T.
SMALL_TOKENS_CUDA = 4
# torch.export / torch.onnx.export(dynamo=True) of the layer: refused up front (its paths have data-dependent shapes)
EXPORT_REFUSAL = ("HyperMoELayer is not exportable (data-dependent shapes); export with `hypermoe export` or "
                  "export.graph.ExportLayer (the same reference parameters, same numbers)")
MAX_TABLE_SETS = 128  # C(N, k) up to this: adapters per set (grouped / cached); above: factored form


# ---------------------------------------------------------------------------------------------
# Small building blocks (x @ W layout, W: (in, out), as ref/)
# ---------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """x @ weight + bias, weight: (in, out) — the reference's layout, not nn.Linear's."""

    def __init__(self, n_in: int, n_out: int, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(n_out, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[0]}, out={self.weight.shape[1]}"


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


def _param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def _init_(module: nn.Module, cfg: HyperMoEConfig, prefix: str = "") -> None:
    """Every parameter ~ N(0, σ²) with the reference's σ for its name (ref.semantics.init_std: fan-in scaling,
    He where a ReLU follows, hypernetwork heads scaled so the HyperExpert is about as large as the routed
    output). The same distribution as ref.init, drawn from torch's RNG."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, init_std(cfg, prefix + name, tuple(p.shape)))


def activation(name: str, u: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(u)
    if name == "gelu":
        return F.gelu(u)  # exact: u · Φ(u)
    if name == "gelu_tanh":
        return F.gelu(u, approximate="tanh")  # GPT-2's "gelu_new"
    if name == "silu":
        return F.silu(u)
    raise ValueError(f"unknown activation {name!r}")


class Adapters(NamedTuple):
    """Generated HyperExperts, one per row of z: W_down (S, d, a), b_down (S, a), W_up (S, a, d), b_up (S, d)."""

    w_down: torch.Tensor
    b_down: torch.Tensor
    w_up: torch.Tensor
    b_up: torch.Tensor


# ---------------------------------------------------------------------------------------------
# The shared hypernetwork
# ---------------------------------------------------------------------------------------------


class HyperNetwork(nn.Module):
    r"""The cross-layer hypernetwork (SPEC.md §3.7), shared by the HyperMoE layers of a stack.

    r = relu([z ; L_ℓ] Wg + cg);  W_down = reshape(r Hd + hd, (d, a)),  W_up = reshape(r Hu + hu, (a, d)),
    b_down = r Gd + gd,  b_up = r Gu + gu   (row-major reshapes: W_down[i, j] = out[i·a + j]).

    Shape: z (S, h) → Adapters (S, ...), one HyperExpert per row. Parameters (state_dict keys) are the
    reference's `hyper.*` names without the prefix: layer_embed (L, l), trunk.weight (h + l, g), trunk.bias,
    w_down.weight (g, d·a), w_down.bias, w_up.weight (g, a·d), w_up.bias, b_down.weight (g, a), b_down.bias,
    b_up.weight (g, d), b_up.bias.
    """

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        if not config.hyper_expert:
            raise ValueError("config field 'hyper_expert' is False: a HyperNetwork needs hyper_expert=True")
        self.config = config
        c, kw = config, dict(device=device, dtype=dtype)
        d, a, g = c.d_model, c.d_adapter, c.d_generator
        self.layer_embed = _param((c.n_layers, c.d_layer_embed), **kw)  # (L, l)
        self.trunk = Linear(c.d_hyper + c.d_layer_embed, g, **kw)  # (h + l) → g
        self.w_down = Linear(g, d * a, **kw)  # → (d, a) row-major
        self.w_up = Linear(g, a * d, **kw)  # → (a, d) row-major
        self.b_down = Linear(g, a, **kw)
        self.b_up = Linear(g, d, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_(self, self.config, prefix="hyper.")

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, d_adapter={c.d_adapter}, d_hyper={c.d_hyper}, "
                f"d_layer_embed={c.d_layer_embed}, d_generator={c.d_generator}, n_layers={c.n_layers}")

    def trunk_features(self, z: torch.Tensor, layer_index: int) -> torch.Tensor:
        """r = relu([z ; L_ℓ] Wg + cg) → (S, g)."""
        layer_embed = self.layer_embed[layer_index].expand(z.shape[0], -1)  # (S, l)
        return F.relu(self.trunk(torch.cat([z, layer_embed], dim=-1)))  # (S, g): z first, as ref

    def forward(self, z: torch.Tensor, layer_index: int) -> Adapters:
        """The HyperExpert of each row of z (S, h) for layer ℓ."""
        c = self.config
        r = self.trunk_features(z, layer_index)  # (S, g)
        return Adapters(
            w_down=self.w_down(r).reshape(-1, c.d_model, c.d_adapter),  # (S, d, a)
            b_down=self.b_down(r),  # (S, a)
            w_up=self.w_up(r).reshape(-1, c.d_adapter, c.d_model),  # (S, a, d)
            b_up=self.b_up(r),  # (S, d)
        )

    generate = forward


# ---------------------------------------------------------------------------------------------
# Per-layer parts
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """weight (d, N), bias (N) [router_bias], noise_weight (d, N) [noisy_gating]."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        d, N, kw = config.d_model, config.n_experts, dict(device=device, dtype=dtype)
        self.weight = _param((d, N), **kw)
        self.bias = _param((N,), **kw) if config.router_bias else None
        self.noise_weight = _param((d, N), **kw) if config.noisy_gating else None


class Experts(nn.Module):
    """N stacked FFNs: w1 (N, d, f), b1 (N, f) [expert_bias], w2 (N, f, d), b2 (N, d) [expert_bias]."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        d, f, N, kw = config.d_model, config.d_ff, config.n_experts, dict(device=device, dtype=dtype)
        self.w1 = _param((N, d, f), **kw)
        self.b1 = _param((N, f), **kw) if config.expert_bias else None
        self.w2 = _param((N, f, d), **kw)
        self.b2 = _param((N, d), **kw) if config.expert_bias else None


class Process(nn.Module):
    """The embedding-process MLP z = relu(s w1 + b1) w2 + b2: w1 (e, p), b1 (p), w2 (p, h), b2 (h)."""

    def __init__(self, config: HyperMoEConfig, *, device=None, dtype=None):
        super().__init__()
        e, p, h, kw = config.d_expert_embed, config.d_process, config.d_hyper, dict(device=device, dtype=dtype)
        self.w1, self.b1 = _param((e, p), **kw), _param((p,), **kw)
        self.w2, self.b2 = _param((p, h), **kw), _param((h,), **kw)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return F.relu(s @ self.w1 + self.b1) @ self.w2 + self.b2  # (S, h)


def _set_tables(N: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """binom (k + 1, N) int64 with binom[j, n] = C(n, j); sets (C, N) bool, row r = the set of colex rank r.

    A set {c_1 < … < c_k} has colex rank Σ_i C(c_i, i) ∈ [0, C(N, k)) (combinatorial number system)."""
    binom = torch.tensor([[math.comb(n, j) for n in range(N)] for j in range(k + 1)], dtype=torch.int64)
    sets = torch.zeros(math.comb(N, k), N, dtype=torch.bool)
    for combo in itertools.combinations(range(N), k):
        sets[sum(math.comb(c, i + 1) for i, c in enumerate(combo)), list(combo)] = True
    return binom.to(device), sets.to(device)


class Routing(NamedTuple):
    selected: torch.Tensor  # (..., k) int64, largest logit first, ties → lower index
    gates: torch.Tensor  # (..., k) router dtype (float32 for 16-bit inputs)
    probs: torch.Tensor  # (..., N) router dtype
    logits: torch.Tensor  # (..., N) router dtype, after jitter / noise
    kept: torch.Tensor  # (...,) bool, False where capacity dropped the token


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
            self.expert_embed = _param((c.n_experts, c.d_expert_embed), **kw)  # (N, e)
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
        binom, sets = _set_tables(c.n_experts, c.top_k, device) if n_sets <= MAX_TABLE_SETS else (None, None)
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
        (ref.semantics.init_std: router/expert weights 1/sqrt(fan_in), He (sqrt(2/fan_in)) before a ReLU or
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
                gate_noise: torch.Tensor | None = None) -> HyperMoEOutput:
        """x (..., S, d) → HyperMoEOutput. `layer_index` picks the layer embedding ℓ of the hypernetwork;
        `jitter` (..., S, d) and `gate_noise` (..., S, N) are the training-only random draws (SPEC.md §3.1)."""
        if torch.compiler.is_exporting():
            raise ValueError(EXPORT_REFUSAL)
        self._check(x, layer_index, jitter, gate_noise)
        layer_index, c = int(layer_index), self.config
        lead, d, N, k = x.shape[:-1], c.d_model, c.n_experts, c.top_k
        x2 = x.reshape(-1, d)  # (T, d)
        selected, gate, probs, logits, kept = self._route(x, jitter, gate_noise)  # §3.1–3.4, (T, ·)

        small = x2.shape[0] * k <= self._small_tokens(x.device)
        fused = c.hyper_expert and k == 1 and not small and self._tables()
        if small:
            out = self._routed_gather(x2, selected, gate, kept)  # (T, d) decode sizes
        elif fused:  # k = 1: routed experts and HyperExpert in one dispatch
            out = self._routed_sorted(x2, selected, gate, kept, self._all_set_adapters(x2, layer_index))
        else:
            out = self._routed_sorted(x2, selected, gate, kept)  # (T, d)
        if c.hyper_expert and not fused:
            out = out + self._hyper_expert(x2, selected, layer_index, small)  # §3.8 weight 1
        routing = Routing(selected.reshape(*lead, k), gate.reshape(*lead, k), probs.reshape(*lead, N),
                          logits.reshape(*lead, N), kept.reshape(lead))
        return HyperMoEOutput(out.reshape(x.shape), routing, self._aux(logits, probs, selected, gate))

    def _route(self, x, jitter, gate_noise) -> Routing:
        """§3.1–3.4 for x (..., S, d): Routing with the token axes flattened (T, ·). In training mode, draws the
        jitter / gate noise not given (torch's RNG)."""
        c = self.config
        x2 = x.reshape(-1, c.d_model)  # (T, d)
        rdtype = torch.promote_types(x.dtype, torch.float32)  # router dtype: float32 at least
        if self.training and jitter is None and c.router_jitter > 0:
            jitter = torch.empty_like(x).uniform_(1.0 - c.router_jitter, 1.0 + c.router_jitter)
        if self.training and gate_noise is None and c.noisy_gating:
            gate_noise = torch.randn((*x.shape[:-1], c.n_experts), dtype=rdtype, device=x.device)
        logits = self._router_logits(x2, jitter, gate_noise, rdtype)  # §3.1 (T, N)
        probs = torch.softmax(logits, dim=-1)  # (T, N)
        selected = _select_sorted(logits, c.top_k)  # §3.2 (T, k): ties → lower index
        chosen = probs.gather(-1, selected)  # (T, k)
        gate = chosen / chosen.sum(-1, keepdim=True) if c.gate == "topk" else chosen  # §3.3 (T, k)
        kept = self._capacity_keep(selected, x.shape[-2])  # §3.4 (T,)
        return Routing(selected, gate, probs, logits, kept)

    def _router_logits(self, x2, jitter, gate_noise, rdtype) -> torch.Tensor:
        """§3.1 logits = (x ⊙ u) W_r + b_r [+ ε ⊙ (softplus(x W_noise) + 0.01)] in rdtype → (T, N)."""
        d, N, router = self.config.d_model, self.config.n_experts, self.router
        router_in = x2 if jitter is None else x2 * jitter.reshape(-1, d).to(x2.dtype)  # experts see plain x
        logits = router_in.to(rdtype) @ router.weight.to(rdtype)  # (T, N)
        if router.bias is not None:
            logits = logits + router.bias.to(rdtype)
        if gate_noise is not None:
            raw = x2.to(rdtype) @ router.noise_weight.to(rdtype)  # (T, N)
            softplus = torch.logaddexp(raw, torch.zeros_like(raw))  # = log(1 + e^raw), as np.logaddexp(0, raw)
            logits = logits + gate_noise.reshape(-1, N).to(rdtype) * (softplus + 0.01)
        return logits

    def _small_tokens(self, device: torch.device) -> int:
        if self.small_tokens is not None:
            return self.small_tokens
        return SMALL_TOKENS_CUDA if device.type == "cuda" else 0

    def _capacity_keep(self, selected: torch.Tensor, seq_len: int) -> torch.Tensor:
        """§3.4 per sequence (rows of S consecutive tokens), count tokens per expert in sequence order; a token
        whose position exceeds C is dropped → (T,) bool."""
        T, C = selected.shape[0], self.config.capacity
        if C is None or _is_zero(T):
            return torch.ones(T, dtype=torch.bool, device=selected.device)
        expert = selected[:, 0].reshape(-1, seq_len)  # (B, S) top-1 ("switch" only)
        onehot = (expert.unsqueeze(-1) == torch.arange(self.config.n_experts, device=expert.device)).long()
        position = onehot.cumsum(1).gather(-1, expert.unsqueeze(-1)).squeeze(-1)  # (B, S): 1, 2, ... per expert
        return (position <= C).reshape(T)

    def _routed_sorted(self, x2, selected, gate, kept, adapters: Adapters | None = None) -> torch.Tensor:
        """§3.5 y = Σ_{i∈S} g_i FFN_i(x): the T·k assignments sorted by expert (stable), one GEMM pair per expert
        on a contiguous slice, then gathered back (no scatter-add: deterministic on every device).

        With `adapters` (k = 1, where the selected set is the expert: row e = the HyperExpert of set {e}), the
        HyperExpert runs on the same slices, g·FFN_e(x) + ê_e(x): one dispatch and one gather-back for both."""
        c = self.config
        T, k, N, d = selected.shape[0], c.top_k, c.n_experts, c.d_model
        group = selected.reshape(-1)  # (T·k,) expert of assignment t·k + slot
        if c.capacity is not None:
            group = torch.where(kept, group, group + N)  # k = 1; dropped tokens: groups N.. pass through
        order = torch.sort(group, stable=True).indices  # (T·k,) assignments grouped by expert
        counts = torch.bincount(group, minlength=2 * N).tolist()  # one host sync
        xs = x2.index_select(0, order // k)  # (T·k, d) tokens in expert order
        gs = gate.reshape(-1).to(x2.dtype).index_select(0, order).unsqueeze(-1)  # (T·k, 1) cast back to x's dtype
        w1, w2 = c_unbind(self.experts.w1), c_unbind(self.experts.w2)  # per-expert views (one grad op each)
        b1, b2 = c_unbind(self.experts.b1), c_unbind(self.experts.b2)
        if adapters is not None:
            w_down, b_down, w_up, b_up = (t.unbind(0) for t in adapters)
        parts = []
        # split, not xs[start:start + n]: one backward op (a cat) instead of a full-size zero gradient per slice
        for g, (rows, g_rows) in enumerate(zip(xs.split(counts), gs.split(counts))):
            if not rows.shape[0]:
                continue
            e = g % N  # rows (n, d), g_rows (n, 1)
            if g < N:
                bias1, bias2 = (None if b is None else b[e] for b in (b1, b2))
                y = expert_ffn(c.activation, rows, w1[e], bias1, w2[e], bias2)  # (n, d)
            else:
                y = rows  # capacity drop rule: routed = g · x (HF SwitchTransformers)
            y = y * g_rows
            if adapters is not None:
                hidden = F.relu(torch.addmm(b_down[e], rows, w_down[e]))  # (n, a)
                y = torch.addmm(b_up[e], hidden, w_up[e]).add_(y)  # (n, d) ê + g·y
            parts.append(y)
        ys = torch.cat(parts) if parts else x2.new_zeros((0, d))  # (T·k, d) in expert order
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        ys = ys.index_select(0, inverse)  # (T·k, d) back in token order
        return ys if k == 1 else ys.reshape(T, k, d).sum(1)

    def _routed_gather(self, x2, selected, gate, kept) -> torch.Tensor:
        """§3.5 for a few tokens (decode): each assignment's expert weights gathered, one bmm per matrix; no
        sort and no host sync. Reads the selected experts' weights twice (copy, then bmm), so only for tiny T·k."""
        c, ex = self.config, self.experts
        T, k, d = selected.shape[0], c.top_k, c.d_model
        expert = selected.reshape(-1)  # (T·k,) assignment t·k + slot
        xs = x2.repeat_interleave(k, dim=0).unsqueeze(1)  # (T·k, 1, d)
        u = torch.bmm(xs, ex.w1.index_select(0, expert))  # (T·k, 1, f)
        if ex.b1 is not None:
            u = u + ex.b1.index_select(0, expert).unsqueeze(1)
        y = torch.bmm(activation(c.activation, u), ex.w2.index_select(0, expert))  # (T·k, 1, d)
        if ex.b2 is not None:
            y = y + ex.b2.index_select(0, expert).unsqueeze(1)
        y = y.reshape(T, k, d)
        if c.capacity is not None:
            y = torch.where(kept.reshape(T, 1, 1), y, x2.unsqueeze(1))  # k = 1; capacity drop: routed = g · x
        return (y * gate.to(x2.dtype).unsqueeze(-1)).sum(1)

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
        if not self._tables():
            return self._hyper_factored(x2, chosen, layer_index)
        count = chosen.long().cumsum(-1)  # (T, N) 1-based position among the selected
        set_id = (self._binom.gather(0, count) * chosen).sum(-1)  # (T,) colex rank Σ_i C(c_i, i)
        if self._may_cache(x2):
            table = self._cached_adapters(layer_index)
            return _gathered_adapter(x2, set_id, table) if small else _grouped_adapter(x2, set_id, table)
        present, group = torch.unique(set_id, return_inverse=True)  # (U,), (T,) sets present, sorted
        return _grouped_adapter(x2, group, self._adapters(self._sets[present], layer_index))

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

    def _hyper_factored(self, x2, chosen, layer_index) -> torch.Tensor:
        """Per token, without materialising weights: x W_down(r) = Σ_j r_j (x Hd_j) + x hd, and likewise
        h W_up(r) = (r ⊗ h) Hu + h hu. FLOPs grow with g, so used only when C(N, k) > max_table_sets."""
        c, hyper = self.config, self.hypernetwork
        d, a, g = c.d_model, c.d_adapter, c.d_generator
        s = (~chosen).to(x2.dtype) @ self.expert_embed  # (T, e)
        r = hyper.trunk_features(self.process(s), layer_index)  # (T, g)
        Hd = hyper.w_down.weight.reshape(g, d, a).permute(1, 0, 2).reshape(d, g * a)  # (d, g·a)
        down = torch.einsum("tg,tga->ta", r, (x2 @ Hd).reshape(-1, g, a))  # (T, a)
        down = down + x2 @ hyper.w_down.bias.reshape(d, a) + hyper.b_down(r)
        hidden = F.relu(down)  # (T, a)
        outer = (r.unsqueeze(-1) * hidden.unsqueeze(1)).reshape(-1, g * a)  # (T, g·a)
        return outer @ hyper.w_up.weight.reshape(g * a, d) + hidden @ hyper.w_up.bias.reshape(a, d) + hyper.b_up(r)

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
# Helpers of the fast paths
# ---------------------------------------------------------------------------------------------


def c_unbind(t: torch.Tensor | None):
    """Per-expert views of a stacked (N, ...) parameter; backward is one stack, not N full-size zero grads."""
    return None if t is None else t.unbind(0)


def _select_sorted(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest logits per token, largest first → (T, k); ties → lower index (stable sort; argmax
    returns the first maximum). Never torch.topk: it breaks ties differently (testing-notes.md)."""
    if k == 1:
        return logits.argmax(-1, keepdim=True)
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]


def _grouped_adapter(x2: torch.Tensor, group: torch.Tensor, table: Adapters) -> torch.Tensor:
    """ê = relu(x W_down[u] + b_down[u]) W_up[u] + b_up[u] with u = group of each token: tokens sorted by
    group, one GEMM pair per group present, gathered back → (T, d)."""
    order = torch.sort(group, stable=True).indices  # (T,) tokens grouped
    counts = torch.bincount(group, minlength=table.w_down.shape[0]).tolist()
    xs = x2.index_select(0, order)  # (T, d)
    w_down, b_down, w_up, b_up = (t.unbind(0) for t in table)
    parts = []
    for u, rows in enumerate(xs.split(counts)):  # split: one backward op, not a zero gradient per slice
        if rows.shape[0]:
            hidden = F.relu(torch.addmm(b_down[u], rows, w_down[u]))  # (n, a)
            parts.append(torch.addmm(b_up[u], hidden, w_up[u]))  # (n, d)
    out = torch.cat(parts) if parts else x2.new_zeros((0, x2.shape[-1]))  # (T, d) in group order
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return out.index_select(0, inverse)


def _is_zero(n) -> bool:
    """n == 0 for a concrete size; False for a symbolic one (torch.compile with dynamic sizes: they are ≥ 2)."""
    return isinstance(n, int) and n == 0


def _gathered_adapter(x2: torch.Tensor, group: torch.Tensor, table: Adapters) -> torch.Tensor:
    """The same for a few tokens: each token's adapter gathered (T, d, a), one bmm per matrix, no host sync."""
    hidden = torch.relu(torch.bmm(x2.unsqueeze(1), table.w_down.index_select(0, group)).squeeze(1)
                        + table.b_down.index_select(0, group))  # (T, a)
    up = torch.bmm(hidden.unsqueeze(1), table.w_up.index_select(0, group)).squeeze(1)  # (T, d)
    return up + table.b_up.index_select(0, group)


def aux_sums(logits, probs, selected, gate) -> torch.Tensor:
    """The sums over tokens that §3.8's losses are made of, packed in one vector (3N + 2,), router dtype:
    [T, Σ_t logsumexp(logits_t)², importance_i = Σ_t G_ti (N), load_i = Σ_t sel_ti (N), Σ_t p_ti (N)].
    Sums over disjoint batches add, so aux_from_sums(Σ over batches) is the losses of their union (the
    expert-parallel layer all-reduces this vector). Differentiable through logits, probs and gates."""
    T, N = probs.shape
    onehot = (selected.unsqueeze(-1) == torch.arange(N, device=probs.device)).to(probs.dtype)  # (T, k, N)
    importance = (onehot * gate.unsqueeze(-1)).sum((0, 1))  # (N,) Σ_tokens gates
    load = onehot.sum((0, 1))  # (N,) tokens per expert: exact integers (float32: up to 2^24 tokens)
    lse2 = torch.logsumexp(logits, dim=-1).pow(2).sum()  # () Σ_t (logsumexp_i logits_ti)²; 0 for T = 0
    return torch.cat([probs.new_full((1,), float(T)), lse2.reshape(1), importance, load, probs.sum(0)])


def aux_from_sums(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """§3.8 from aux_sums' vector: switch_balance = N Σ_i f_i P_i (f_i = load_i / T, P_i = Σ_t p_ti / T),
    z_loss = Σ_t lse² / T, cv_balance = cv²(importance) + cv²(load). T = 0: every sum is 0, and dividing by
    max(T, 1) gives the spec's 0 for all three without a branch on T (no host sync)."""
    N = (sums.shape[0] - 2) // 3
    T, lse2, importance, load, prob_sum = sums[0].clamp(min=1), sums[1], *sums[2:].split(N)
    return {
        "switch_balance": N * ((load / T) * (prob_sum / T)).sum(),
        "z_loss": lse2 / T,
        "cv_balance": _cv_squared(importance) + _cv_squared(load),
    }


def expert_ffn(act: str, x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """§3.5 FFN_i(x) = act(x W1_i + c1_i) W2_i + c2_i of one expert on rows x (n, d) → (n, d); b1, b2 None
    without expert_bias."""
    u = x @ w1 if b1 is None else torch.addmm(b1, x, w1)  # (n, f)
    u = activation(act, u)
    return u @ w2 if b2 is None else torch.addmm(b2, u, w2)  # (n, d)


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    """cv²(v) = var(v) / (mean(v)² + 1e-10), unbiased; 0 for a single expert (as ref.cv_squared)."""
    if v.shape[0] == 1:
        return v.sum() * 0
    return v.var(unbiased=True) / (v.mean() ** 2 + CV_EPS)


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
