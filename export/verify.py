"""Check an exported file against the reference: run it on onnxruntime with inputs whose routing margins
are controlled, run ref (float64) on the same inputs, compare every output, and check routing exactly.

Inputs: drawn N(0, 1), then every token whose gap between its k-th and (k+1)-th router logit (at any
HyperMoE layer of the file) is below MARGINS[dtype] is redrawn, so that rounding cannot flip a selection
(testing-notes.md §2). The input is rounded to the model's dtype first, and the reference sees the rounded
input, so only the model's own arithmetic is measured.

Tolerances (TOLERANCES, per export dtype; |onnx - ref| ≤ atol + rtol·|ref| elementwise, ref in float64).
Measured on the default layer (d 768, f 3072, N 8, k 1; onnxruntime 1.31 CPU, |ref| up to ~9), both flavours:
    float32   atol 1e-4  rtol 1e-4   measured max abs 2.8e-6, max rel (to max |ref|) 3.3e-7
    float16   atol 1e-2  rtol 5e-3   measured max abs 3.7e-3 (half an fp16 ulp at |y| ≈ 8 is 3.9e-3), rel 4.3e-4
    bfloat16  atol 8e-2  rtol 4e-2   fp16's scaled by 2^3 (3 fewer mantissa bits). onnxruntime's CPU provider has
                                     no bfloat16 MatMul / MoE kernel (CUDA only); the portable graph under
                                     onnx.reference (64 tokens): max abs 5.4e-2, rel 6.6e-3, ≤ 0.31 of the tolerance
Routing (selected_experts) must agree exactly on every token; gates (float32 in every export) within
GATE_TOLERANCE.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

import ref
from ref import HyperMoEConfig

TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 5e-3), "bfloat16": (8e-2, 4e-2)}  # (atol, rtol)
GATE_TOLERANCE = (1e-5, 1e-5)  # (atol, rtol); gates are computed in float32 from float32 logits
MARGINS = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}  # minimum routing margin of verification inputs
DEFAULT_SHAPES = ((2, 16), (1, 1), (3, 7))  # (batch, seq): several shapes on one file (dynamic dims)


# ---------------------------------------------------------------------------------------------
# Inputs with controlled routing margins (the library version of tests/strategies.inputs_with_margin)
# ---------------------------------------------------------------------------------------------


def layer_margins(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, layer_index: int = 0
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """x (B, S, d) → per-token routing margin (B, S), the smallest over the HyperMoE layers x goes through."""
    def margins(x: np.ndarray) -> np.ndarray:
        if kind == "model":  # x: token ids (B, S)
            from ref import model as ref_model

            _, _, results = ref_model.forward(cfg, params, x)
            per_block = [ref.routing_margins(r.logits, cfg.top_k) for r in results.values()]
            return np.min(per_block, axis=0) if per_block else np.full(x.shape, np.inf)
        if kind == "layer":  # the router sees x itself: no need to run the layer
            logits = ref.router_logits(cfg, params, x.reshape(-1, cfg.d_model))  # (T, N)
            return ref.routing_margins(logits, cfg.top_k).reshape(x.shape[:-1])
        _, results = ref.stack(cfg, params, x)
        per_layer = [ref.routing_margins(r.logits, cfg.top_k) for r in results]
        return np.min(per_layer, axis=0) if per_layer else np.full(x.shape[:-1], np.inf)
    return margins


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
    worst_excess: float  # max (|onnx - ref| - atol - rtol |ref|); > 0 fails
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
    tolerance: tuple[float, float]
    margin: float
    shapes: list[ShapeResult]
    ok: bool

    def lines(self) -> list[str]:
        atol, rtol = self.tolerance
        out = [f"verify {self.path.name}: {self.flavour}, {self.dtype}, onnxruntime {self.provider} vs ref float64 "
               f"(tolerance atol {atol:g} rtol {rtol:g}; inputs with routing margin ≥ {self.margin:g})"]
        for r in self.shapes:
            routing = "n/a (not exported)" if r.routing_agreement is None else f"{r.routing_agreement:.1%}"
            out.append(f"  (batch, seq) = {r.batch_seq}: routing agreement {routing}")
            for c in r.comparisons:
                flag = "ok" if c.ok else "FAIL"
                out.append(f"    {c.name:17s} max abs {c.max_abs:.3e}  max rel {c.max_rel:.3e}  {flag}")
        out.append("PASS" if self.ok else "FAIL: onnxruntime output differs from the reference beyond tolerance")
        return out


def compare(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> Comparison:
    if actual.shape != expected.shape:
        return Comparison(name, tuple(actual.shape), float("inf"), float("inf"), float("inf"), False)
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if a.size == 0:
        return Comparison(name, a.shape, 0.0, 0.0, 0.0, True)
    if not np.all(np.isfinite(a)):
        return Comparison(name, a.shape, float("inf"), float("inf"), float("inf"), False)
    err = np.abs(a - e)
    scale = float(np.abs(e).max())
    excess = float((err - atol - rtol * np.abs(e)).max())
    return Comparison(name, a.shape, float(err.max()), float(err.max() / scale) if scale else float(err.max()),
                      excess, excess <= 0)


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
    atol, rtol = TOLERANCES[dtype]
    margin = MARGINS[dtype]
    margins = layer_margins(cfg, params, kind, layer_index)
    rng = np.random.default_rng(seed)
    results = []
    for batch, seq in shapes:
        shape = (batch, seq) if kind == "model" else (batch, seq, cfg.d_model)
        x = inputs_with_margin(margins, shape, rng, margin, round_fn=lambda v: round_to(v, runner.input_type),
                               vocab_size=cfg.vocab_size if kind == "model" else None)
        if kind == "model":
            from ref import model as ref_model

            want = {"logits": ref_model.forward(cfg, params, x)[0]}
        elif kind == "layer":
            expected = ref.layer(cfg, params, x, layer_index)
            want = {"output": expected.output, "selected_experts": expected.selected, "gates": expected.gates}
        else:
            want = {"output": ref.stack(cfg, params, x)[0]}
        got = runner(x)
        comparisons, agreement = [], None
        for name, value in got.items():
            if name == "selected_experts":
                same = np.all(value == want[name], axis=-1) if value.shape == want[name].shape else np.zeros(1, bool)
                agreement = float(same.mean()) if same.size else 1.0
                comparisons.append(Comparison(name, value.shape, 0.0 if agreement == 1 else float("inf"), 0.0, 0.0,
                                              agreement == 1.0))
            else:
                tol = GATE_TOLERANCE if name == "gates" else (atol, rtol)
                comparisons.append(compare(name, value, want[name], *tol))
        results.append(ShapeResult((batch, seq), comparisons, agreement, all(c.ok for c in comparisons)))
    return VerifyReport(path, dtype, meta.get("flavour", "?"), runner.provider, (atol, rtol), margin, results,
                        all(r.ok for r in results))
