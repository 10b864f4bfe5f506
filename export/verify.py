"""Check an exported file against the reference: run it on onnxruntime with inputs whose routing margins
are controlled, run ref (float64) on the same inputs, and compare every output with an error bound derived
from the magnitudes of that run; routing (selected_experts) must agree exactly.

Notation as conformance/tolerances.py (one formulation of ε_D and S, shared): u_D the unit roundoff of the
export dtype D (float32 2^-24, float16 2^-11, bfloat16 2^-8), K = 64.

Inputs: drawn N(0, 1) and rounded to D (ref sees the rounded input: only the model's arithmetic is
measured). Per token t and HyperMoE layer, ε_t = (4 u_D + (d + 2) u_32) R_t (+ the bias term, + δ_in
max_j Σ_i |W_ij| when the layer's input carries an error ≤ δ_in) bounds the router-logit error, R_t =
max_j Σ_i |x_ti W_ij|. A token is redrawn while its routing margin (k-th minus (k+1)-th logit) is below
MARGIN_FACTOR · ε_t: a margin above 2 ε_t cannot flip; the margin is in units of ε_t, so it scales with the
logits (an absolute margin, as before, rejected everything at logit scale 1e-3 and meant nothing at 1e5).

Bounds (on max |onnx - ref| over one output, per (batch, seq); the bound decides pass/fail):
    layer output   K u_D S + max_t Σ_s |Δg_ts| · S,   S = largest magnitude of any expert's FFN output,
                   the routed part, the HyperExpert part and the output (the output's own scale: rounding
                   errors of an honest implementation are a few u_D of the sums that formed it; the old
                   elementwise atol 1e-4 + rtol 1e-4 |ref| failed values near 0 formed from large sums and
                   let errors of ~1e-4 through at output scale 1e-3);
                   |Δg_ts| ≤ 2 ε_t g_ts (1 - g_ts) (first order, selection exact: g = softmax over the
                   selected logits, or the switch probability; 0 for top-1 renormalised gates)
    gates          max_ts 2 ε_t g_ts (1 - g_ts) + 8 u_D
    stack output   Σ_ℓ (layer ℓ's output bound, its ε_t including the error carried into its input)
                   + Σ_ℓ u_D max|h_ℓ+1| (each residual add rounds once); propagation of an input error
                   through the experts is left to K's slack (measured below)
    model logits   (K u_D + Σ_ℓ max_t Σ_s |Δg_ts| ) · max_v Σ_i (|w_i| sqrt(d-1) + |b_i|) |E_iv|, w, b the
                   final LayerNorm's, E the output projection: the largest sum a logit can be formed from
                   (|(h - mean)/σ| ≤ sqrt(d-1)); the MoE routers' ε use the same LayerNorm bound for R.
                   First-order and coarser than the layer's (no per-block magnitudes without rerunning the
                   forward pass).

Measured (tiny configs d 16, f 32, N 4; onnxruntime 1.31.1 CPU; tests/test_verify.py), max |onnx - ref| /
bound, with the output-side weights (experts w2, b2, HyperExpert w_up, b_up generators) scaled by s so
outputs are ~3.3 s:
    layer, s = 1e-3, 1e-1, 1e1, 1e3, 1e5: correct export 0.022, 0.017, 0.025, 0.023, 0.014 (gates 0.017);
        ref itself in float32 ≤ 0.043 (top-k 2, switch, top-1); the old rule failed ref float32 at s = 1e3
        and 1e5; checked against a source whose hyper.b_up.bias moved by 1e-3 of max |b|: ≥ 3.9 × the bound
        (FAIL) at every s
    stack (2 layers, second output ~s²), s = 1e3, 1e5: correct ≤ 0.09, shifted source ≥ 6.7 (FAIL). At
        s ≤ 1 the stack's output is dominated by x and the shift is below float32 resolution of it; at s = 10
        with unsaturated top-2 gates over logits ~300 the gate term (≈ 1.2% of the output) exceeds the
        shift: there any honest bound must let a 1e-3 bias change through
    default layer (d 768, f 3072, N 8, top-1; `hypermoe main`, sparse): max abs 2.3e-6, 0.08 of the bound 2.8e-5
The bound for float16/bfloat16 is the same formula with their u_D (K u_D = 3.1% and 25% of S): loose, not
yet measured on a GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

import ref
from conformance.suite import UNIT_ROUNDOFF
from conformance.tolerances import K_VALUES, logit_error_bound, magnitude, router_scales
from ref import HyperMoEConfig

K = K_VALUES  # the factor of u_D S (conformance/tolerances.py; measured figures in the module docstring)
MARGIN_FACTOR = 4.0  # inputs: routing margin ≥ 4 ε_t (2 ε_t already rules out a flip; 2× headroom)
DEFAULT_SHAPES = ((2, 16), (1, 1), (3, 7))  # (batch, seq): several shapes on one file (dynamic dims)


# ---------------------------------------------------------------------------------------------
# The reference run and the error bound of every output
# ---------------------------------------------------------------------------------------------


class Expected(NamedTuple):
    values: dict[str, np.ndarray]  # output name → ref (float64)
    bounds: dict[str, float]  # output name → bound on max |onnx - ref| (selected_experts: 0, compared exactly)
    margins: np.ndarray  # (B, S) routing margin of each token in units of its logit-error bound ε_t, min over layers


def layer_bound(cfg: HyperMoEConfig, lp: Mapping[str, np.ndarray], h: np.ndarray, result, dtype: str,
                input_error: float = 0.0) -> tuple[np.ndarray, float, float]:
    """One HyperMoE layer run by ref on h → (margins (T,) in units of ε_t, bound on its output's error, bound on
    its gates' error) for an implementation in `dtype` whose input h carries an error ≤ input_error entrywise."""
    u, k = UNIT_ROUNDOFF[dtype], cfg.top_k
    column_l1 = float(np.abs(lp["router.weight"]).sum(axis=0).max())  # max_j Σ_i |W_ij|
    eps = logit_error_bound(cfg, lp, router_scales(cfg, lp, h, {}), dtype) + input_error * column_l1  # (T,)
    g = result.gates.reshape(-1, k)  # (T, k)
    dg = 2 * eps[:, None] * g * (1 - g)  # (T, k): |Δg| ≤ 2 ε g (1 - g), first order, selection exact
    S = magnitude(cfg, lp, h, result, with_input=False)  # the output's scale: FFN outputs, routed, HyperExpert
    output = K * u * S + float(dg.sum(axis=-1).max(initial=0.0)) * S  # Σ_i |Δg_i| |FFN_i| ≤ Σ_i |Δg_i| S
    margins = ref.routing_margins(result.logits.reshape(-1, cfg.n_experts), k) / eps  # (T,)
    return margins, output, float(dg.max(initial=0.0)) + 8 * u


def expected(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, x: np.ndarray, dtype: str,
             layer_index: int = 0) -> Expected:
    """ref (float64) on x (B, S, d), or token ids (B, S) for a model, and the bound on every output's error
    for an export in `dtype` (module docstring)."""
    if kind == "model":
        return _expected_model(cfg, params, x, dtype)
    lead = x.shape[:-1]
    if kind == "layer":
        result = ref.layer(cfg, params, x, layer_index)
        margins, output, gates = layer_bound(cfg, params, x, result, dtype)
        return Expected({"output": result.output, "selected_experts": result.selected, "gates": result.gates},
                        {"output": output, "selected_experts": 0.0, "gates": gates}, margins.reshape(lead))
    final, results = ref.stack(cfg, params, x)
    u = UNIT_ROUNDOFF[dtype]
    h, carried, margins = x, 0.0, np.full(lead, np.inf)  # carried: bound on the error of layer ℓ's input h
    for i, result in zip(ref.stack_layers(cfg), results):
        m, output, _ = layer_bound(cfg, ref.layer_params(params, i), h, result, dtype, carried)
        margins = np.minimum(margins, m.reshape(lead))
        h = h + result.output  # the next layer's input (ref.stack's residual)
        carried += output + u * float(np.abs(h).max(initial=0.0))  # x is exact; each residual add rounds once
    return Expected({"output": final}, {"output": carried}, margins)


def _expected_model(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], tokens: np.ndarray, dtype: str) -> Expected:
    """A model's logits (B, S, V): first-order bound through the final LayerNorm (module docstring)."""
    from ref import model as ref_model

    logits, _, results = ref_model.forward(cfg, params, tokens)
    u, k, spread = UNIT_ROUNDOFF[dtype], cfg.top_k, math.sqrt(cfg.d_model - 1)

    def after_norm(prefix: str, W: np.ndarray) -> float:
        """max_j Σ_i |y_i W_ij| over every y = LayerNorm `prefix`(h): |(h_i - mean) / σ| ≤ sqrt(d - 1)."""
        w, b = np.abs(params[prefix + ".weight"]), np.abs(params[prefix + ".bias"])  # (d,)
        return float(((w * spread + b) @ np.abs(W)).max())

    relative, margins = K * u, np.full(tokens.shape, np.inf)  # relative: error of a LayerNorm output / its bound
    for i, result in results.items():
        lp = ref_model.block_moe_params(params, i)
        R = after_norm(f"blocks.{i}.ln2", lp["router.weight"])
        eps = logit_error_bound(cfg, lp, R, dtype) + K * u * R  # the router's own rounding + its input's error
        g = result.gates.reshape(-1, k)  # (T, k)
        relative += float((2 * eps * g * (1 - g)).sum(axis=-1).max(initial=0.0))
        margins = np.minimum(margins, ref.routing_margins(result.logits, k) / eps)
    head = params["token_embed"].T if cfg.tie_embeddings else params["lm_head.weight"]  # (d, V)
    return Expected({"logits": logits}, {"logits": relative * after_norm("ln_f", head)}, margins)


# ---------------------------------------------------------------------------------------------
# Inputs with controlled routing margins (the library version of tests/strategies.inputs_with_margin)
# ---------------------------------------------------------------------------------------------


def layer_margins(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, dtype: str, layer_index: int = 0
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """x (B, S, d) or token ids (B, S) → each token's routing margin (B, S) in units of its logit-error bound
    ε_t in `dtype`, the smallest over the HyperMoE layers x goes through (+inf where nothing is routed)."""
    return lambda x: expected(cfg, params, kind, x, dtype, layer_index).margins


def inputs_with_margin(margins: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], rng: np.random.Generator,
                       margin: float, *, round_fn: Callable[[np.ndarray], np.ndarray] = lambda v: v,
                       vocab_size: int | None = None, attempts: int = 200) -> np.ndarray:
    """x of `shape` (float64 (B, S, d), already rounded by `round_fn`; or token ids (B, S) in
    [0, vocab_size) when vocab_size is given) whose every token has margin ≥ `margin`. Tokens below it are
    redrawn (whole tokens; capacity and attention interactions are re-evaluated each round)."""
    def draw(n_tokens: int) -> np.ndarray:
        if vocab_size is not None:
            return rng.integers(0, vocab_size, n_tokens)
        return round_fn(rng.standard_normal((n_tokens, shape[-1])))

    x = draw(int(np.prod(shape[:-1] if vocab_size is None else shape))).reshape(shape)
    for _ in range(attempts):
        bad = margins(x) < margin  # (B, S)
        if not bad.any():
            return x
        x[bad] = draw(int(bad.sum()))
    raise ValueError(f"could not draw inputs with routing margin ≥ {margin} in {attempts} rounds "
                     "(degenerate router? use a model whose router separates the experts)")


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |onnx - ref| / max |ref|
    bound: float  # the error bound of this output on these inputs (module docstring); max_abs > bound fails
    ok: bool


class ShapeResult(NamedTuple):
    batch_seq: tuple[int, int]
    comparisons: list[Comparison]
    routing_agreement: float | None  # fraction of tokens with identical selected_experts; None if not exported
    ok: bool


class VerifyReport(NamedTuple):
    path: Path
    dtype: str
    flavour: str
    provider: str
    margin: float  # inputs' routing margin, in units of each token's logit-error bound ε_t
    shapes: list[ShapeResult]
    ok: bool

    def lines(self) -> list[str]:
        out = [f"verify {self.path.name}: {self.flavour}, {self.dtype}, onnxruntime {self.provider} vs ref float64 "
               f"(bound per output: {K} u S + gate error; inputs with routing margin ≥ {self.margin:g} ε)"]
        for r in self.shapes:
            routing = "n/a (not exported)" if r.routing_agreement is None else f"{r.routing_agreement:.1%}"
            out.append(f"  (batch, seq) = {r.batch_seq}: routing agreement {routing}")
            for c in r.comparisons:
                flag = "ok" if c.ok else "FAIL"
                out.append(f"    {c.name:17s} max abs {c.max_abs:.2e} (bound {c.bound:.2e})  max rel {c.max_rel:.2e}  {flag}")
        out.append("PASS" if self.ok else "FAIL: onnxruntime output differs from the reference beyond its error bound")
        return out


def compare(name: str, actual: np.ndarray, expected: np.ndarray, bound: float) -> Comparison:
    """max |actual - expected| against `bound` (exact equality for integer outputs: bound 0)."""
    if actual.shape != expected.shape:
        return Comparison(name, tuple(actual.shape), float("inf"), float("inf"), bound, False)
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if a.size == 0:
        return Comparison(name, a.shape, 0.0, 0.0, bound, True)
    if not np.all(np.isfinite(a)):
        return Comparison(name, a.shape, float("inf"), float("inf"), bound, False)
    err = float(np.abs(a - e).max())
    scale = float(np.abs(e).max())
    return Comparison(name, a.shape, err, err / scale if scale else err, bound, err <= bound)


def source_params(meta: Mapping[str, str], cfg: HyperMoEConfig, source: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """The float64 parameters the file was exported from: `source` (a model directory) if given, else the
    one recorded in the metadata. ValueError when the source's config differs from the file's."""
    from export.exporter import load_source

    recorded = meta.get("source", "")
    if source is None and recorded.startswith("default:seed="):  # ref's deterministic init
        from ref import model as ref_model

        init = {"layer": ref.init, "stack": ref.init_stack, "model": ref_model.init_model}[meta.get("kind", "layer")]
        return init(cfg, seed=int(recorded.split("=", 1)[1]))
    if source is None:
        if not recorded:
            raise ValueError("the file records no source model; pass the model directory it was exported from")
        source = recorded
    src_cfg, params, kind, _ = load_source(source)
    if src_cfg != cfg or kind != meta.get("kind"):
        raise ValueError(f"{source}: its config (kind {kind}) does not match the config stored in the ONNX file "
                         f"(kind {meta.get('kind')}); was the file exported from another model?")
    return {name: v.astype(np.float64) for name, v in params.items()}


def verify(path: str | os.PathLike, *, source: str | os.PathLike | None = None, provider: str = "auto",
           shapes=DEFAULT_SHAPES, seed: int = 0, runner=None) -> VerifyReport:
    """Run the exported file on onnxruntime and ref on the same margin-controlled inputs; compare."""
    from export.exporter import metadata_config, read_metadata
    from export.runtime import OnnxRunner, round_to

    path = Path(path)
    meta = read_metadata(path)
    cfg, kind, dtype = metadata_config(meta), meta.get("kind", "layer"), meta.get("dtype", "float32")
    layer_index = int(meta.get("layer_index", "0"))
    params = source_params(meta, cfg, source)
    runner = runner or OnnxRunner(path, provider)
    margins = layer_margins(cfg, params, kind, dtype, layer_index)
    rng = np.random.default_rng(seed)
    results = []
    for batch, seq in shapes:
        shape = (batch, seq) if kind == "model" else (batch, seq, cfg.d_model)
        x = inputs_with_margin(margins, shape, rng, MARGIN_FACTOR, round_fn=lambda v: round_to(v, runner.input_type),
                               vocab_size=cfg.vocab_size if kind == "model" else None)
        want = expected(cfg, params, kind, x, dtype, layer_index)
        got = runner(x)
        comparisons = [compare(name, value, want.values[name], want.bounds[name]) for name, value in got.items()]
        agreement = None
        if "selected_experts" in got:
            value, ref_value = got["selected_experts"], want.values["selected_experts"]
            same = np.all(value == ref_value, axis=-1) if value.shape == ref_value.shape else np.zeros(1, bool)
            agreement = float(same.mean()) if same.size else 1.0
        results.append(ShapeResult((batch, seq), comparisons, agreement, all(c.ok for c in comparisons)))
    return VerifyReport(path, dtype, meta.get("flavour", "?"), runner.provider, MARGIN_FACTOR, results,
                        all(r.ok for r in results))
