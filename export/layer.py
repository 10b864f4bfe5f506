"""The exportable form of one HyperMoE layer (ExportLayer; export/graph.py builds the stack and the models from
it): a torch module built from reference parameters whose forward has no data-dependent control flow and no
data-dependent shapes, so `torch.export` traces it with dynamic batch and sequence dims and the ONNX graph
computes ref.layer for every input.

Axis legend (as ref/semantics.py):  B batch  S sequence  T = B·S tokens  d model  N experts  k selected
    f expert hidden  a adapter width  C = C(N, k) possible selection sets  e/p/h/l/g hypernetwork widths

Three flavours of the routed experts:
- "portable": standard ONNX ops only. Every expert runs on every token and the gates (zero outside the
  selection) weight the hidden activations, so the second projection is one MatMul: y = [G ⊙ act(x W1 + b1)] W2
  + G b2. N× the FLOPs of a sparse dispatch, but static shapes apart from T (CUDA-graph friendly, no NonZero).
- "fused": the routed experts become one `com.microsoft::MoE` node (onnxruntime contrib op, sparse), see
  export/moe_op.py for where its semantics match ref and where they do not.
- "sparse": standard ONNX ops, a sparse dispatch: per expert e, NonZero finds its tokens, Gather, two MatMuls
  (plus biases and the activation), the gate, and one ScatterND (no reduction) of all routes back:
  k·4·d·f FLOPs per token, the runtime's own multi-threaded GEMMs and vectorised activations.
  Data-dependent shapes (NonZero): not CUDA-graph capturable. Made for
  CPU inference: onnxruntime 1.31's CPU MoE kernel runs each expert's GEMMs single-threaded and its
  activation as a scalar loop (tanh-GELU ≈ 45 % of the node's time at d 768, f 3072; BENCHMARKS.md).

The HyperExpert never materialises per-token weights. Its weights depend only on the unselected set,
i.e. on the selection set S, so (hyper_form):
- "sets": the adapters of all C(N, k) sets are computed by ref at export time and stored as constants;
  each token computes relu(x W_down_c + b_down_c) for every set c, keeps its own set's row (a one-hot
  by the set's rank) and applies the concatenated W_up: cost 2·C·d·a per token. Static shapes.
- "grouped": the same constants, applied sparsely: per set c, NonZero finds the tokens whose set rank is c,
  Gather, relu(x W_down_c + b_down_c) W_up_c + b_up_c, one ScatterND back: 2·d·a per token (C× less than
  "sets"), data-dependent shapes. The default ("auto") of the fused and sparse flavours.
- "factored": the hypernetwork runs in the graph and the generated matrices are contracted with x first:
  x W_down(r) = Σ_j r_j (x Hd_j) + x hd, the same for W_up: cost 2·g·d·a per token, constants of the
  hypernetwork's size. Used when C(N, k) is large.

Precision: parameters are cast to the export dtype, except the router, which stays float32 (logits,
probabilities and gates in float32 at least, SPEC.md §3.1); gates are cast to the export dtype for the
combine. The sets-form constants are computed in float64 by ref and cast once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ref
from export import moe_op
from ref import HyperMoEConfig

FLAVOURS = ("portable", "fused", "sparse")
HYPER_FORMS = ("auto", "sets", "grouped", "factored")
SETS_MAX_BYTES = 256 * 2**20  # "sets" constants above this size (at the export dtype) → "factored"


def n_sets(cfg: HyperMoEConfig) -> int:
    return math.comb(cfg.n_experts, cfg.top_k)


def choose_hyper_form(cfg: HyperMoEConfig, requested: str = "auto", itemsize: int = 4, flavour: str = "portable") -> str:
    """"sets" ("grouped" for the fused and sparse flavours, whose graphs have data-dependent shapes anyway)
    when it is cheaper per token (C ≤ g) and its constants (C·(2·d·a + a + d) values) fit in
    SETS_MAX_BYTES; else "factored". An explicit request is honoured."""
    if requested not in HYPER_FORMS:
        raise ValueError(f"hyper_form must be one of {HYPER_FORMS}, got {requested!r}")
    if requested != "auto":
        return requested
    C, d, a = n_sets(cfg), cfg.d_model, cfg.d_adapter
    fits = C * (2 * d * a + a + d) * itemsize <= SETS_MAX_BYTES
    if not (fits and C <= cfg.d_generator):
        return "factored"
    return "sets" if flavour == "portable" else "grouped"


def colex_sets(N: int, k: int) -> np.ndarray:
    """All k-subsets of range(N) in colex rank order → (C, k), ascending within a row. The colex rank of
    {s_1 < ... < s_k} is Σ_i binom(s_i, i) (i from 1), which the graph computes from a selection mask."""
    sets = list(itertools.combinations(range(N), k))
    sets.sort(key=lambda s: sum(math.comb(v, i + 1) for i, v in enumerate(s)))
    return np.array(sets, dtype=np.int64).reshape(len(sets), k)


def set_adapters(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], layer_index: int):
    """The HyperExpert of every selection set, by ref (float64): W_down (C,d,a), b_down (C,a), W_up (C,a,d), b_up (C,d)."""
    params64 = {name: np.asarray(v, dtype=np.float64) for name, v in params.items()}
    sets = colex_sets(cfg.n_experts, cfg.top_k)  # (C, k)
    s = ref.selection_embedding(params64, sets)  # (C, e)
    z = ref.process(params64, s)  # (C, h)
    return ref.generate(cfg, params64, z, layer_index)


def _tensor(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value, dtype=np.float64))).to(dtype)


class ExportLayer(nn.Module):
    """One HyperMoE layer, inference only (no jitter, no gate noise), at a fixed layer index ℓ.

    forward(hidden_states (B, S, d)) → output (B, S, d) [, selected_experts (B, S, k) int64, gates (B, S, k) float32]
    """

    def __init__(self, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, layer_index: int = 0,
                 dtype: torch.dtype = torch.float32, flavour: str = "portable", hyper_form: str = "auto",
                 routing_outputs: bool = False):
        super().__init__()
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < cfg.n_layers:
            raise ValueError(f"layer_index must be an int in [0, n_layers={cfg.n_layers}), got {layer_index!r}")
        ref.check_params({n: np.asarray(v) for n, v in params.items()}, ref.param_shapes(cfg),
                         np.asarray(next(iter(params.values()))).dtype)
        if flavour == "fused":
            moe_op.check_supported(cfg)
        self.cfg, self.flavour, self.routing_outputs, self.layer_index = cfg, flavour, routing_outputs, layer_index
        N, k, d = cfg.n_experts, cfg.top_k, cfg.d_model
        self.hyper_form = (choose_hyper_form(cfg, hyper_form, torch.finfo(dtype).bits // 8, flavour)
                           if cfg.hyper_expert else "none")

        f32 = torch.float32
        self.register_buffer("router_weight", _tensor(params["router.weight"], f32))  # (d, N) float32
        self.register_buffer("router_bias", _tensor(params["router.bias"], f32) if cfg.router_bias else torch.zeros(N))
        self.register_buffer("expert_ids", torch.arange(N))  # (N,)
        self.register_buffer("ones_n", torch.ones(N, 1))  # (N, 1) float32: sums over N as MatMuls (see _select)
        self.register_buffer("lower", torch.ones(N, N, dtype=torch.bool).tril(-1))  # [i, j]: j < i
        self.register_buffer("slots", torch.arange(k, dtype=torch.float32))  # (k,) ranks 0 … k-1
        self.register_buffer("expert_col", torch.arange(N, dtype=torch.float32).reshape(N, 1))  # (N, 1)
        if flavour == "portable":
            w1 = np.asarray(params["experts.w1"], dtype=np.float64)  # (N, d, f)
            self.register_buffer("w1_cat", _tensor(w1.transpose(1, 0, 2).reshape(d, N * cfg.d_ff), dtype))  # (d, N·f)
            self.register_buffer("w2_cat", _tensor(np.asarray(params["experts.w2"]).reshape(N * cfg.d_ff, d), dtype))  # (N·f, d)
        elif flavour == "sparse":
            self.register_buffer("w1", _tensor(params["experts.w1"], dtype))  # (N, d, f)
            self.register_buffer("w2", _tensor(params["experts.w2"], dtype))  # (N, f, d)
        else:  # com.microsoft::MoE layout [E, out, in] (= nn.Linear.weight stacked); [E, in, out] is misread
            self.register_buffer("fc1", _tensor(np.asarray(params["experts.w1"]).transpose(0, 2, 1), dtype))  # (N, f, d)
            self.register_buffer("fc2", _tensor(np.asarray(params["experts.w2"]).transpose(0, 2, 1), dtype))  # (N, d, f)
        if cfg.expert_bias:
            self.register_buffer("b1", _tensor(params["experts.b1"], dtype))  # (N, f)
            self.register_buffer("b2", _tensor(params["experts.b2"], dtype))  # (N, d)

        if self.hyper_form != "none":
            # colex rank of a set from its selection mask m: Σ_n m_n · binom(n, cumsum(m)_n)
            binom = [[math.comb(n, j) for j in range(k + 1)] for n in range(N)]
            self.register_buffer("binom_flat", torch.tensor(binom, dtype=torch.int64).reshape(-1))  # (N·(k+1),)
        if self.hyper_form == "sets":
            w_down, b_down, w_up, b_up = set_adapters(cfg, params, layer_index)  # (C,d,a) (C,a) (C,a,d) (C,d)
            C, a = w_down.shape[0], cfg.d_adapter
            self.register_buffer("set_ids", torch.arange(C, dtype=torch.float32))  # compared with the float32 rank
            self.register_buffer("down_cat", _tensor(w_down.transpose(1, 0, 2).reshape(d, C * a), dtype))  # (d, C·a)
            self.register_buffer("down_bias", _tensor(b_down.reshape(C * a), dtype))  # (C·a,)
            # spreads the (T, C) one-hot of the token's set over the C·a adapter columns (one MatMul)
            self.register_buffer("set_columns", _tensor(np.repeat(np.eye(C), a, axis=1), dtype))  # (C, C·a)
            self.register_buffer("up_cat", _tensor(w_up.reshape(C * a, d), dtype))  # (C·a, d)
            self.register_buffer("up_bias", _tensor(b_up, dtype))  # (C, d)
        elif self.hyper_form == "grouped":
            w_down, b_down, w_up, b_up = set_adapters(cfg, params, layer_index)  # (C,d,a) (C,a) (C,a,d) (C,d)
            for name, value in (("set_w_down", w_down), ("set_b_down", b_down), ("set_w_up", w_up), ("set_b_up", b_up)):
                self.register_buffer(name, _tensor(value, dtype))
        elif self.hyper_form == "factored":
            g, a, h = cfg.d_generator, cfg.d_adapter, cfg.d_hyper
            p = {n: np.asarray(v, dtype=np.float64) for n, v in params.items()}
            for name in ("expert_embed", "process.w1", "process.b1", "process.w2", "process.b2"):
                self.register_buffer(name.replace(".", "_"), _tensor(p[name], dtype))
            trunk_w = p["hyper.trunk.weight"]  # (h + l, g): z rows first, then the layer embedding's
            self.register_buffer("trunk_z", _tensor(trunk_w[:h], dtype))  # (h, g)
            layer_part = p["hyper.layer_embed"][layer_index] @ trunk_w[h:] + p["hyper.trunk.bias"]  # (g,) constant for ℓ
            self.register_buffer("trunk_c", _tensor(layer_part, dtype))
            hd = p["hyper.w_down.weight"].reshape(g, d, a)  # W_down(r)[i, j] = Σ_m r_m Hd[m, i·a + j] + hd[i·a + j]
            self.register_buffer("hd_cat", _tensor(hd.transpose(1, 0, 2).reshape(d, g * a), dtype))  # (d, g·a)
            self.register_buffer("hd_bias", _tensor(p["hyper.w_down.bias"].reshape(d, a), dtype))  # (d, a)
            hu = p["hyper.w_up.weight"].reshape(g, a, d)
            self.register_buffer("hu_cat", _tensor(hu.transpose(1, 0, 2).reshape(a, g * d), dtype))  # (a, g·d)
            self.register_buffer("hu_bias", _tensor(p["hyper.w_up.bias"].reshape(a, d), dtype))  # (a, d)
            for name in ("b_down", "b_up"):
                self.register_buffer(f"{name}_w", _tensor(p[f"hyper.{name}.weight"], dtype))  # (g, a) / (g, d)
                self.register_buffer(f"{name}_b", _tensor(p[f"hyper.{name}.bias"], dtype))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"d={c.d_model}, f={c.d_ff}, N={c.n_experts}, k={c.top_k}, gate={c.gate}, capacity={c.capacity}, "
                f"flavour={self.flavour}, hyper_form={self.hyper_form}, layer_index={self.layer_index}")

    # --- steps --------------------------------------------------------------------------------

    def _activation(self, u: torch.Tensor) -> torch.Tensor:
        name = self.cfg.activation
        if name == "relu":
            return torch.relu(u)
        if name == "gelu":
            return F.gelu(u)  # exact (erf)
        if name == "gelu_tanh":
            return F.gelu(u, approximate="tanh")
        return F.silu(u)

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        """§3.2 the k largest logits, largest first → (T, k); ties → lower index BY CONSTRUCTION, whatever a
        runtime's TopK does with ties: rank_i = #{j : l_j > l_i} + #{j < i : l_j = l_i}, slot r holds the
        expert of rank r. Sums are MatMuls by a column of ones: onnxruntime's ReduceSum returns (0, N)
        instead of (0,) for a (0, N) input, and a 1-D right operand fails at T = 0. Exact in float32 (N < 2^24)."""
        T, N, k = logits.shape[0], self.cfg.n_experts, self.cfg.top_k
        li, lj = logits.unsqueeze(-1), logits.unsqueeze(-2)  # (T, N, 1) expert i, (T, 1, N) expert j
        ahead = (lj > li) | ((lj == li) & self.lower)  # (T, N, N) [t, i, j]: j ranks before i
        rank = (ahead.to(torch.float32) @ self.ones_n).reshape(T, N)  # (T, N) 0 = largest
        at_slot = (rank.unsqueeze(1) == self.slots.unsqueeze(-1)).to(torch.float32)  # (T, k, N) [t, r, i]: rank_i = r
        return (at_slot @ self.expert_col).reshape(T, k).to(torch.int64)  # (T, k)

    def _dense_gates(self, selected: torch.Tensor, gate: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(T, N) gate of each expert, zero outside the selection and for capacity-dropped tokens."""
        onehot = (selected.unsqueeze(-1) == self.expert_ids).to(gate.dtype)  # (T, k, N)
        return (gate.unsqueeze(-1) * onehot).sum(dim=1) * keep.unsqueeze(-1).to(gate.dtype)  # (T, N)

    def _portable_experts(self, xt: torch.Tensor, dense_gate: torch.Tensor) -> torch.Tensor:
        T, N, f = xt.shape[0], self.cfg.n_experts, self.cfg.d_ff
        u = (xt @ self.w1_cat).reshape(T, N, f)  # (T, N, f): every expert on every token
        if self.cfg.expert_bias:
            u = u + self.b1
        hidden = self._activation(u) * dense_gate.unsqueeze(-1)  # (T, N, f) gated before the second projection
        y = hidden.reshape(T, N * f) @ self.w2_cat  # (T, d) = Σ_n g_n act(·) W2_n
        if self.cfg.expert_bias:
            y = y + dense_gate @ self.b2  # Σ_n g_n b2_n
        return y

    def _sparse_experts(self, xt: torch.Tensor, selected: torch.Tensor, gate: torch.Tensor,
                        keep: torch.Tensor) -> torch.Tensor:
        """Σ_j g_j FFN_{s_j}(x) over each expert's own routes only. Route r = t·k + j is token t's slot j: per
        expert NonZero → Gather → FFN → times the gate; then ONE ScatterND (no reduction: every route is
        written at most once, dropped ones stay 0) into a (T·k, d) buffer, summed over the k slots."""
        k, d = self.cfg.top_k, self.cfg.d_model
        live = keep.unsqueeze(-1)  # (T, 1) false for capacity-dropped tokens
        gate_r = gate.reshape(-1)  # (T·k,) float32 gate of route r
        routes, rows = [], []
        for e in range(self.cfg.n_experts):
            at = torch.nonzero((selected == e) & live)  # (R_e, 2) [t, j] of the routes to expert e
            r = at[:, 0] * k + at[:, 1]  # (R_e,) route ids (integer ops only)
            u = xt.index_select(0, at[:, 0]) @ self.w1[e]  # (R_e, f) their tokens
            if self.cfg.expert_bias:
                u = u + self.b1[e]
            out = self._activation(u) @ self.w2[e]  # (R_e, d)
            if self.cfg.expert_bias:
                out = out + self.b2[e]
            routes.append(r)
            rows.append(out * gate_r.index_select(0, r).unsqueeze(-1).to(xt.dtype))  # g_j (FFN(x) + b2)
        per_route = xt.new_zeros((gate_r.shape[0], d)).index_put((torch.cat(routes),), torch.cat(rows))  # (T·k, d)
        return per_route.reshape(-1, k, d).sum(dim=1)  # (T, d)

    def _selection_mask(self, selected: torch.Tensor) -> torch.Tensor:
        return (selected.unsqueeze(-1) == self.expert_ids).sum(dim=1)  # (T, N) int64, 1 where selected

    def _set_rank(self, mask: torch.Tensor) -> torch.Tensor:
        k1 = self.cfg.top_k + 1
        position = torch.cumsum(mask, dim=-1)  # (T, N) number of selected experts with index ≤ n
        index = (self.expert_ids * k1 + position).reshape(-1)  # (T·N,) flat index into the (N, k+1) table
        coeff = self.binom_flat.index_select(0, index).reshape(mask.shape)  # (T, N) binom(n, position_n)
        # the sum over n as a MatMul: onnxruntime's ReduceSum returns (0, N) instead of (0,) for T = 0.
        # float32 holds the integer ranks exactly below 2^24 sets (far above any feasible "sets" table)
        return ((mask * coeff).to(torch.float32) @ self.ones_n).reshape(-1)  # (T,) colex rank of the set

    def _hyper_sets(self, xt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        onehot = (self._set_rank(mask).unsqueeze(-1) == self.set_ids).to(xt.dtype)  # (T, C) the token's set
        down = xt @ self.down_cat + self.down_bias  # (T, C·a) every set's adapter input, set-major columns
        hidden = torch.relu(down) * (onehot @ self.set_columns)  # (T, C·a) zero outside the token's set
        return hidden @ self.up_cat + onehot @ self.up_bias  # (T, d)

    def _hyper_grouped(self, xt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per set c: NonZero of its tokens → Gather → adapter; ONE ScatterND (no reduction: every token has
        exactly one set) puts the rows back in token order."""
        rank = self._set_rank(mask)  # (T,) float32 colex rank of each token's set
        tokens, rows = [], []
        for c in range(self.set_w_down.shape[0]):
            t = torch.nonzero(rank == c).reshape(-1)  # (T_c,) tokens whose selection set is c
            hidden = torch.relu(xt.index_select(0, t) @ self.set_w_down[c] + self.set_b_down[c])  # (T_c, a)
            tokens.append(t)
            rows.append(hidden @ self.set_w_up[c] + self.set_b_up[c])  # (T_c, d)
        return torch.zeros_like(xt).index_put((torch.cat(tokens),), torch.cat(rows))  # (T, d)

    def _hyper_factored(self, xt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T, g, a, d = xt.shape[0], self.cfg.d_generator, self.cfg.d_adapter, self.cfg.d_model
        s = (1 - mask).to(xt.dtype) @ self.expert_embed  # (T, e) plain sum over the unselected (0 when k = N)
        z = torch.relu(s @ self.process_w1 + self.process_b1) @ self.process_w2 + self.process_b2  # (T, h)
        r = torch.relu(z @ self.trunk_z + self.trunk_c)  # (T, g); [z ; L_ℓ] Wg + cg with L_ℓ folded in
        xd = (xt @ self.hd_cat).reshape(T, g, a)  # (T, g, a) x contracted with every head column first
        down = (r.unsqueeze(1) @ xd).squeeze(1) + xt @ self.hd_bias + r @ self.b_down_w + self.b_down_b  # (T, a)
        hidden = torch.relu(down)  # (T, a)
        hu = (hidden @ self.hu_cat).reshape(T, g, d)  # (T, g, d)
        return (r.unsqueeze(1) @ hu).squeeze(1) + hidden @ self.hu_bias + r @ self.b_up_w + self.b_up_b  # (T, d)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor):
        cfg = self.cfg
        B, S, d = hidden_states.shape
        xt = hidden_states.reshape(B * S, d)  # (T, d)
        logits = xt.to(torch.float32) @ self.router_weight + self.router_bias  # (T, N) float32 (SPEC.md §3.1)
        probs = torch.softmax(logits, dim=-1)  # (T, N)
        selected = self._select(logits)  # (T, k) largest first, ties → lower index (SPEC.md §3.2)
        chosen = torch.gather(probs, 1, selected)  # (T, k)
        gate = chosen / chosen.sum(dim=-1, keepdim=True) if cfg.gate == "topk" else chosen  # (T, k) float32

        if cfg.capacity is not None:  # per sequence, counted in sequence order (SPEC.md §3.4)
            onehot = (selected[:, 0].reshape(B, S, 1) == self.expert_ids).to(torch.int64)  # (B, S, N)
            position = (torch.cumsum(onehot, dim=1) * onehot).sum(dim=-1)  # (B, S) 1-based position at its expert
            keep = (position <= cfg.capacity).reshape(B * S)  # (T,)
        else:
            keep = torch.ones_like(selected[:, 0], dtype=torch.bool)  # (T,)

        if self.flavour != "fused":
            if self.flavour == "portable":
                y = self._portable_experts(xt, self._dense_gates(selected, gate, keep).to(xt.dtype))  # (T, d)
            else:
                y = self._sparse_experts(xt, selected, gate, keep)  # (T, d)
            if cfg.capacity is not None:  # a dropped token passes through scaled by its gate
                y = y + (~keep).to(xt.dtype).unsqueeze(-1) * gate[:, :1].to(xt.dtype) * xt
        else:
            b1 = self.b1 if cfg.expert_bias else None
            b2 = self.b2 if cfg.expert_bias else None
            if getattr(self, "qmoe", None) is not None:  # quantised: com.microsoft::QMoE (export/quant_ops.py)
                y = self.qmoe(xt, logits.to(xt.dtype), b1, b2)  # (T, d)
            else:
                y = torch.ops.hypermoe_export.moe_experts(
                    xt, logits.to(xt.dtype), self.fc1, b1, self.fc2, b2, cfg.top_k, cfg.activation)  # (T, d)
            if cfg.gate == "switch":  # the op renormalises (k = 1: weight 1, FFN); × p here (export/moe_op.py: why)
                y = y * gate.to(xt.dtype)  # (T, d) · (T, 1)

        if self.hyper_form == "sets":
            y = y + self._hyper_sets(xt, self._selection_mask(selected))
        elif self.hyper_form == "grouped":
            y = y + self._hyper_grouped(xt, self._selection_mask(selected))
        elif self.hyper_form == "factored":
            y = y + self._hyper_factored(xt, self._selection_mask(selected))
        output = y.reshape(B, S, d)
        if not self.routing_outputs:
            return output
        return output, selected.reshape(B, S, cfg.top_k), gate.reshape(B, S, cfg.top_k)
