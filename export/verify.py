"""Check an exported file against the reference: run it on onnxruntime with inputs whose routing margins
are controlled, run ref (float64) on the same inputs, and compare every output with an error bound derived
from the magnitudes of that run; routing (selected_experts) must agree exactly.

Notation as conformance/tolerances.py (one formulation of ε_D, R_t and S, shared): u_D the unit roundoff of
the export dtype D (float32 2^-24, float16 2^-11, bfloat16 2^-8).

Why not a fixed elementwise rule: `atol 1e-4 + rtol 1e-4 |ref|` ignored the magnitude of the sums that formed
a value near zero (ref itself in float32 failed it on a 4-layer stack with outputs ~1e5) and let errors of
~1e-4 through at output scale 1e-3. Why not a worst-case bound alone: carried through a stack's layers it
multiplies the input error by max_j Σ_i |W_ij| and the gate sensitivity at every layer; on a converted
4-layer stack (weights N(0, 0.3), outputs ~1e6) it exceeded the routing gaps by 1e4 and no input could be
drawn. So each bound has two terms, both scaling with the magnitudes of this very run:

    measured   YARDSTICK · max |ref_D - ref_64|: ref run in float32 on the export's parameters rounded to D
               and the same input. An honest implementation rounds at the same places (matmuls, softmax,
               residual sums); its rounding errors are other samples of the same size, propagated by the same
               layers (to first order the same linear map), so its deviation is of the same size as ref_D's.
               YARDSTICK = 4 covers other summation orders (blocked GEMMs, fused kernels): measured, the
               onnxruntime exports and hypermoe.layer in float32 stay ≤ 0.18 of the whole bound.
    floor      K u_D S (K = 16): where ref_D happens to be nearly exact, an implementation's own rounding of
               the last operations is still a few u_D of S (conformance measured < 5 u_D S; its K = 64 has no
               measured term beside it). S: the output's own scale — for a layer the largest of any expert's
               FFN output, the routed part, the HyperExpert part and the output (the input left out: with small
               output weights it would swamp the outputs); for a stack, the layers' scales and every residual
               sum; for a model's logits the largest sum a logit is formed from, max_v Σ_i (|w_i| sqrt(d-1) +
               |b_i|) |E_iv| (w, b the final LayerNorm, E the output projection). Gates: S = 1.
    bound      YARDSTICK · max |ref_D - ref_64| + K u_D S, per output and per (batch, seq); the bound decides
               pass/fail. selected_experts must agree exactly.

Inputs: drawn N(0, 1) and rounded to D (ref sees the rounded input: only the model's arithmetic is measured).
Per token t and HyperMoE layer, the router-logit error is bounded by ε_t = ε_D(R_t) (conformance/tolerances.py:
the router's own rounding on an exact input) + YARDSTICK · max_j |logit_D,tj - logit_64,tj| (the error carried
in by the layer's input, measured as above). A token is redrawn while its routing margin (k-th minus (k+1)-th
logit) is below MARGIN_FACTOR · ε_t: a margin above 2 ε_t cannot flip; the margin is in units of ε_t, so it
scales with the logits.

Measured (`python3 scripts/verify_scales.py`: tiny configs d 16, f 32, N 4, k 2; onnxruntime 1.31.1 CPU; the
output-side weights scaled by s so outputs are ~3 s), max |onnx - ref| / bound over outputs and shapes:
    s                              1e-3    1e-1    1e1     1e3     1e5
    layer, correct export          0.112   0.105   0.052   0.124   0.070
    layer, hypermoe.layer float32  0.118   0.179   0.149   0.125   0.159
    layer, shifted source          49      44      41      48      45     (hyper.b_up.bias + 1e-3 max |b|: FAIL)
    stack (2 layers), correct      0.056   0.076   0.100   0.156   0.113
    stack, shifted source          0.19    14      70      53      45     (FAIL from s = 0.1)
At s = 1e-3 a stack's output is x + layer outputs ~1e-3 |x|: the shift moves it by less than float32's
resolution of x; no bound can see it there. A 4-layer stack converted from an official GPT-2 state dict
(d 64, f 256, N 8, k 2, all weights N(0, 0.3), outputs up to 1.4e6): correct ≤ 0.16 of the bound, shifted
source ≥ 1.8× (FAIL on every shape). Default layer (`hypermoe main`, sparse): see README.
float16 and bfloat16 exports: the same formula with their u_D in the floor (K u_D = 0.8% and 6% of S) and
ref_D rounding only the parameters (its float32 arithmetic does not round to D): the floor carries the
16-bit rounding; not yet measured on a GPU.

The bounds, the inputs and the comparison live in export/bounds.py, a with-past export's decode and greedy checks
in export/verify_past.py; their names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

import ref
from ref import HyperMoEConfig
from export.bounds import (  # noqa: F401 (re-exported: defined here before the split)
    K, MARGIN_FACTOR, YARDSTICK, Comparison, Expected, _after_norm, _logit_scale, compare, expected, inputs_with_margin,
    layer_margins, measured_run,
)
from export.verify_past import (  # noqa: F401 (re-exported: defined here before the split)
    DECODE_LENGTH, GREEDY_STEPS, PastCheck, _left_padded, check_decode, check_greedy, full_pass,
)

DEFAULT_SHAPES = ((2, 16), (1, 1), (3, 7))  # (batch, seq): several shapes on one file (dynamic dims)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


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
    past_checks: tuple[PastCheck, ...] = ()  # a with-past export's decode and greedy checks
    quantization: tuple[str, ...] = ()  # a quantised export: its effect vs the float model per shape (a report)
    report_only: bool = False  # accuracy_level 4 (int8 activations): no bound holds; ok = finite outputs only

    def lines(self) -> list[str]:
        out = [f"verify {self.path.name}: {self.flavour}, {self.dtype}, onnxruntime {self.provider} vs ref float64 "
               f"(bound per output: {YARDSTICK:g} × ref float32's deviation + {K} u S; inputs with routing margin ≥ {self.margin:g} ε)"]
        if self.past_checks:
            out.append("  a. full passes (past length 0):")
        for r in self.shapes:
            routing = "n/a (not exported)" if r.routing_agreement is None else f"{r.routing_agreement:.1%}"
            out.append(f"  (batch, seq) = {r.batch_seq}: routing agreement {routing}")
            for c in r.comparisons:
                flag = "ok" if c.ok else "FAIL"
                out.append(f"    {c.name:17s} max abs {c.max_abs:.2e} (bound {c.bound:.2e})  max rel {c.max_rel:.2e}  {flag}")
        for c in self.past_checks:
            error = "" if c.max_abs is None else f"max abs {c.max_abs:.2e} "
            out.append(f"  {c.name}: {error}(bound {c.bound:.2e}) {c.detail}  {'ok' if c.ok else 'FAIL'}")
        if self.quantization:  # export/verify_quant.py
            out.append("  quantisation's effect vs the float model (reported, not a bound; the checks above use the "
                       "dequantised reference):")
            out.extend(f"    {line}" for line in self.quantization)
        if self.report_only:  # export/verify_quant.py
            out.append("REPORT ONLY: accuracy_level 4 (int8 activations in the kernels) meets no rounding bound; the "
                       "ok/FAIL flags above do not decide. " + ("Outputs finite." if self.ok else "FAIL: non-finite "
                       "or misshapen outputs"))
            return out
        out.append("PASS" if self.ok else "FAIL: onnxruntime output differs from the reference beyond its error bound")
        return out


def source_params(meta: Mapping[str, str], cfg: HyperMoEConfig, source: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """The float64 parameters the file was exported from: `source` (a model directory) if given, else the
    one recorded in the metadata. ValueError when the source's config differs from the file's."""
    from export.exporter import load_source

    recorded = meta.get("source", "")
    if source is None and recorded.startswith("default:seed="):  # ref's deterministic init
        from ref import model as ref_model

        kind, seed = meta.get("kind", "layer"), recorded.split("=", 1)[1]
        if not seed.isdigit():
            raise ValueError(f"the recorded source {recorded!r} has no valid seed; pass the model directory it was "
                             "exported from")
        ref.check_memory(cfg, kind, 8, what="the recorded source's parameters (float64)")
        init = {"layer": ref.init, "stack": ref.init_stack, "model": ref_model.init_model}[kind]
        return init(cfg, seed=int(seed))
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
    """Run the exported file on onnxruntime and ref on the same margin-controlled inputs; compare.
    A with-past export (its directory or its model.onnx) runs on export.generate.OrtDecoder, the decoder
    `hypermoe generate` uses: full passes (past length 0) on `shapes`, then check_decode and check_greedy.
    runner: an open export.runtime.OnnxRunner (plain export) or OrtDecoder (with-past), e.g. on CUDA."""
    from export.exporter import PAST_MODEL_FILE, metadata_config, read_metadata
    from export.generate import OrtDecoder
    from export.runtime import OnnxRunner, round_to

    path = Path(path)
    if path.is_dir() and (path / PAST_MODEL_FILE).is_file():  # a with-past export's directory
        path = path / PAST_MODEL_FILE
    meta = read_metadata(path)
    cfg, kind, dtype = metadata_config(meta), meta.get("kind", "layer"), meta.get("dtype", "float32")
    layer_index = int(meta.get("layer_index", "0"))
    params = source_params(meta, cfg, source)
    float_model = None
    if "quantize" in meta:  # checked against ref on the dequantised parameters (export/verify_quant.py)
        from export.verify_quant import dequantized_source, effect, float_outputs

        float_model, (cfg, params) = (cfg, params), dequantized_source(meta, cfg, params)
    quant_lines = []
    with_past = meta.get("with_past") == "1"
    runner = runner or (OrtDecoder(path, provider) if with_past else OnnxRunner(path, provider))
    round_fn = (lambda v: v) if with_past else (lambda v: round_to(v, runner.input_type))  # token ids: as drawn
    drawn: dict[str, Expected] = {}

    def margins(x: np.ndarray) -> np.ndarray:  # keeps its last run: the accepted draw's is the one compared with
        drawn["want"] = expected(cfg, params, kind, x, dtype, layer_index)
        return drawn["want"].margins

    rng = np.random.default_rng(seed)
    results = []
    for batch, seq in shapes:
        shape = (batch, seq) if kind == "model" else (batch, seq, cfg.d_model)
        x = inputs_with_margin(margins, shape, rng, MARGIN_FACTOR, round_fn=round_fn,
                               vocab_size=cfg.vocab_size if kind == "model" else None)
        want = drawn["want"]  # expected() of this x: inputs_with_margin returns x unchanged after its last margins(x)
        got = full_pass(runner, x) if with_past else runner(x)
        if with_past and runner.logits == "last":  # the graph computes the last position's logits only
            want = want._replace(values={"logits": want.values["logits"][:, -1:]})
        comparisons = [compare(name, value, want.values[name], want.bounds[name]) for name, value in got.items()]
        agreement = None
        if "selected_experts" in got:
            value, ref_value = got["selected_experts"], want.values["selected_experts"]
            same = np.all(value == ref_value, axis=-1) if value.shape == ref_value.shape else np.zeros(1, bool)
            agreement = float(same.mean()) if same.size else 1.0
        results.append(ShapeResult((batch, seq), comparisons, agreement, all(c.ok for c in comparisons)))
        if float_model is not None:
            quant_lines.append(f"(batch, seq) = {(batch, seq)}: "
                               + effect(float_outputs(*float_model, kind, x, layer_index), got))
    checks = ()
    if with_past:
        checks = (check_decode(runner, cfg, params, dtype, rng), check_greedy(runner, cfg, params, dtype, rng))
    flavour = meta.get("flavour", "?") + (f" {meta['quantize']} block {meta.get('block_size')}" if float_model else "")
    ok = all(r.ok for r in results) and all(c.ok for c in checks)
    report_only = meta.get("accuracy_level", "0") != "0"
    if report_only:
        ok = all(np.isfinite(c.max_abs) for r in results for c in r.comparisons)
    return VerifyReport(path, dtype, flavour, runner.provider, MARGIN_FACTOR, results, ok, checks, tuple(quant_lines),
                        report_only)
