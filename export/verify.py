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
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

import ref
from ref import HyperMoEConfig
from ref.tolerances import UNIT_ROUNDOFF, logit_error_bound, magnitude, router_scales
from ref.tolerances import round_to as round_to_dtype

YARDSTICK = 4.0  # × the measured deviation of ref in float32 from ref in float64 (module docstring)
K = 16  # the floor K u_D S; conformance's K = 64 has no measured term beside it (module docstring)
MARGIN_FACTOR = 4.0  # inputs: routing margin ≥ 4 ε_t (2 ε_t already rules out a flip; 2× headroom)
DEFAULT_SHAPES = ((2, 16), (1, 1), (3, 7))  # (batch, seq): several shapes on one file (dynamic dims)


# ---------------------------------------------------------------------------------------------
# The reference run and the error bound of every output
# ---------------------------------------------------------------------------------------------


class Expected(NamedTuple):
    values: dict[str, np.ndarray]  # output name → ref (float64)
    bounds: dict[str, float]  # output name → bound on max |onnx - ref| (selected_experts: 0, compared exactly)
    margins: np.ndarray  # (B, S) routing margin of each token in units of its logit-error bound ε_t, min over layers


def measured_run(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, x: np.ndarray, dtype: str,
                 layer_index: int = 0, attention_mask: np.ndarray | None = None) -> dict:
    """ref run in float32 on the export's parameters (rounded to `dtype`) and the same input: what an honest
    implementation's rounding does to every output and router logit, measured (the yardstick term)."""
    p32 = {name: round_to_dtype(dtype, v).astype(np.float32) for name, v in params.items()}  # exact: rounded to ≤ 24 bits
    if kind == "model":
        from ref import model as ref_model

        logits, _, results = ref_model.forward(cfg, p32, x, attention_mask)
        return {"logits": logits, "router": [r.logits for r in results.values()]}
    x32 = x.astype(np.float32)  # x is already rounded to the export's input dtype: exact
    if kind == "layer":
        r = ref.layer(cfg, p32, x32, layer_index)
        return {"output": r.output, "gates": r.gates, "router": [r.logits]}
    final, results = ref.stack(cfg, p32, x32)
    return {"output": final, "router": [r.logits for r in results]}


def expected(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, x: np.ndarray, dtype: str,
             layer_index: int = 0, attention_mask: np.ndarray | None = None) -> Expected:
    """ref (float64) on x (B, S, d), or token ids (B, S) for a model, the bound on every output's error for an
    export in `dtype`, and each token's routing margin in units of its logit-error bound (module docstring).
    A model's attention_mask (B, S) (0 = padding, default positions: ref.model.forward's): padding positions'
    outputs are meaningless, so they count neither in the bound's measured term nor in the margins (+inf)."""
    u = UNIT_ROUNDOFF[dtype]
    measured = measured_run(cfg, params, kind, x, dtype, layer_index, attention_mask)
    lead = x.shape if kind == "model" else x.shape[:-1]
    if kind == "model":
        from ref import model as ref_model

        logits, _, results = ref_model.forward(cfg, params, x, attention_mask)
        layers = []  # (layer params, router scale R (the router's input is LayerNorm ln2's output), result)
        for i, r in results.items():
            lp = ref_model.block_moe_params(params, i)
            layers.append((lp, _after_norm(cfg, params, f"blocks.{i}.ln2", lp["router.weight"]), r))
        values, scales = {"logits": logits}, {"logits": _logit_scale(cfg, params)}
    elif kind == "layer":
        r = ref.layer(cfg, params, x, layer_index)
        layers = [(params, router_scales(cfg, params, x, {}), r)]
        values = {"output": r.output, "selected_experts": r.selected, "gates": r.gates}
        scales = {"output": magnitude(cfg, params, x, r, with_input=False), "gates": 1.0}
    else:
        final, results = ref.stack(cfg, params, x)
        layers, h, S = [], x, 0.0
        for i, r in zip(ref.stack_layers(cfg), results):  # S: every layer's own scale and every residual sum h
            lp = ref.layer_params(params, i)
            layers.append((lp, router_scales(cfg, lp, h, {}), r))
            S = max(S, magnitude(cfg, lp, h, r, with_input=False))
            h = h + r.output  # the next layer's input (ref.stack's residual)
            S = max(S, float(np.abs(h).max(initial=0.0)))
        values, scales = {"output": final}, {"output": S}
    margins = np.full(lead, np.inf)
    for (lp, R, r), logits_d in zip(layers, measured["router"]):
        logits = r.logits.reshape(-1, cfg.n_experts)  # (T, N)
        drift = np.abs(logits_d.reshape(logits.shape) - logits).max(axis=-1, initial=0.0)  # (T,) measured
        eps = logit_error_bound(cfg, lp, R, dtype) + YARDSTICK * drift  # (T,) ε_t
        margins = np.minimum(margins, (ref.routing_margins(logits, cfg.top_k) / eps).reshape(lead))
    real = np.ones(lead, dtype=bool) if attention_mask is None else attention_mask != 0  # (B, S) positions that count
    margins[~real] = np.inf
    deviation = {name: float(np.abs(measured[name] - values[name])[real].max(initial=0.0)) for name in scales}
    bounds = {name: YARDSTICK * deviation[name] + K * u * scales[name] for name in scales}
    if "selected_experts" in values:
        bounds["selected_experts"] = 0.0  # compared exactly
    return Expected(values, bounds, margins)


def _logit_scale(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray]) -> float:
    """S of a model's logits: the largest sum a logit can be formed from, max_v Σ_i (|w_i| sqrt(d-1) + |b_i|) |E_iv|
    (w, b the final LayerNorm's, E the output projection; |(h - mean)/σ| ≤ sqrt(d - 1))."""
    head = params["token_embed"].T if cfg.tie_embeddings else params["lm_head.weight"]  # (d, V)
    return _after_norm(cfg, params, "ln_f", head)


def _after_norm(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], prefix: str, W: np.ndarray) -> float:
    """max_j Σ_i |y_i W_ij| over every y = LayerNorm `prefix`(h)."""
    w, b = np.abs(params[prefix + ".weight"]), np.abs(params[prefix + ".bias"])  # (d,)
    return float(((w * math.sqrt(cfg.d_model - 1) + b) @ np.abs(W)).max())


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


class PastCheck(NamedTuple):
    """A with-past export's check beyond full passes: decode consistency or greedy tokens."""
    name: str
    max_abs: float | None  # max |onnx - ref| over the compared logits; None where tokens are compared
    bound: float  # the logits' error bound on these inputs (module docstring)
    detail: str
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
        comparisons = [compare(name, value, want.values[name], want.bounds[name]) for name, value in got.items()]
        agreement = None
        if "selected_experts" in got:
            value, ref_value = got["selected_experts"], want.values["selected_experts"]
            same = np.all(value == ref_value, axis=-1) if value.shape == ref_value.shape else np.zeros(1, bool)
            agreement = float(same.mean()) if same.size else 1.0
        results.append(ShapeResult((batch, seq), comparisons, agreement, all(c.ok for c in comparisons)))
    checks = ()
    if with_past:
        checks = (check_decode(runner, cfg, params, dtype, rng), check_greedy(runner, cfg, params, dtype, rng))
    return VerifyReport(path, dtype, meta.get("flavour", "?"), runner.provider, MARGIN_FACTOR, results,
                        all(r.ok for r in results) and all(c.ok for c in checks), checks)


# ---------------------------------------------------------------------------------------------
# With past key/values: one graph for prefill and decode (export.graph.ExportModelWithPast)
# ---------------------------------------------------------------------------------------------

DECODE_LENGTH = 16  # check_decode: prefill half of it, then one token per step (capped at max_seq_len)
GREEDY_STEPS = 32  # check_greedy: new tokens per prompt (capped by max_seq_len - the longest prompt)


def full_pass(decoder, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One full pass (past length 0, no padding, positions 0 … S-1) of a with-past export through its OrtDecoder
    → {"logits": (B, S, V) float32}: the plain model's interface, which verify's shape loop runs."""
    B, S = input_ids.shape
    decoder.begin(B, S)
    positions = np.broadcast_to(np.arange(S), (B, S))
    return {"logits": decoder.step(input_ids, np.ones((B, S), dtype=np.int64), positions, all_positions=True)}


def _left_padded(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], dtype: str, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, Expected]:
    """Token ids (B, L) for a left-padded batch (mask (B, L)) whose real tokens all have routing margin ≥
    MARGIN_FACTOR ε_t, and ref's Expected for them (the ids under mask 0 are random too: they must not matter)."""
    drawn: dict[str, Expected] = {}

    def margins(ids: np.ndarray) -> np.ndarray:
        drawn["want"] = expected(cfg, params, "model", ids, dtype, attention_mask=mask)
        return drawn["want"].margins

    ids = inputs_with_margin(margins, mask.shape, rng, MARGIN_FACTOR, vocab_size=cfg.vocab_size)
    return ids, drawn["want"]


def check_decode(decoder, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], dtype: str,
                 rng: np.random.Generator) -> PastCheck:
    """Prefill S0 tokens, then one token per step through the OrtDecoder (its present fed back as past on the
    device): every real position's logits must match ref's one full pass (float64, ref.model.forward with the
    attention mask) within the full pass's bound. Three rows, left-padded by 0, S0/2 and S0 - 1 positions
    (positions by ref.model.default_positions)."""
    from ref import model as ref_model

    total = min(cfg.max_seq_len, DECODE_LENGTH)
    S0 = total // 2
    pads = (0, S0 // 2, S0 - 1)
    mask = np.ones((len(pads), total), dtype=np.int64)  # (B, L)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    positions = ref_model.default_positions(mask)  # (B, L)
    ids, want = _left_padded(cfg, params, dtype, mask, rng)
    decoder.begin(len(pads), total)
    steps = [decoder.step(ids[:, :S0], mask[:, :S0], positions[:, :S0], all_positions=True)]  # prefill, past length 0
    for t in range(S0, total):
        steps.append(decoder.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], all_positions=True))
    got = np.concatenate(steps, axis=1)  # (B, L, V)
    real = mask != 0
    c = compare("logits", got[real], want.values["logits"][real], want.bounds["logits"])
    lengths = sorted({shape[2] for shape in decoder.cache_shapes})  # every present's P + S
    lengths_ok = lengths == [total]
    detail = (f"over {int(real.sum())} real positions; rows left-padded by {', '.join(map(str, pads))}"
              + ("" if lengths_ok else f"; present lengths {lengths} != {total}: FAIL"))
    return PastCheck(f"b. prefill {S0} + {total - S0} one-token steps vs one full pass", c.max_abs, c.bound, detail,
                     c.ok and lengths_ok)


def check_greedy(decoder, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], dtype: str,
                 rng: np.random.Generator) -> PastCheck:
    """Greedy tokens of onnxruntime (the OrtDecoder) and PyTorch (hypermoe.model.TorchDecoder, float32, the export's
    parameters rounded to its dtype) through the same hypermoe.generation.generate, 3 left-padded prompts.

    A step is decidable when ref's (float64, on the generated sequence) top-2 logit gap exceeds 2 × the logits'
    bound (each side within the bound of ref cannot reorder them) and every real token up to it has routing
    margin ≥ MARGIN_FACTOR ε_t. Tokens must be equal at decidable steps; a difference at an undecidable step
    ends that row's comparison and is reported, neither pass nor fail."""
    import torch

    from hypermoe.generation import generate, left_pad
    from hypermoe.model import HyperMoETransformer, TorchDecoder

    L = min(8, cfg.max_seq_len // 4)  # longest prompt
    steps = min(GREEDY_STEPS, cfg.max_seq_len - L)
    mask = np.zeros((3, L), dtype=np.int64)
    for b, n in enumerate((L, max(1, L // 2), 1)):
        mask[b, L - n:] = 1
    ids, _ = _left_padded(cfg, params, dtype, mask, rng)
    prompts = [row[m != 0].tolist() for row, m in zip(ids, mask)]
    p32 = {name: round_to_dtype(dtype, v).astype(np.float32) for name, v in params.items()}
    model = HyperMoETransformer.from_ref(cfg, p32, dtype=torch.float32).eval()
    options = dict(max_new_tokens=steps, max_length=cfg.max_seq_len)
    got = generate(decoder, prompts, **options).tokens
    torch_tokens = generate(TorchDecoder(model, use_cache=True), prompts, **options).tokens

    full, full_mask = left_pad([p + g[:-1] for p, g in zip(prompts, got)], 0)  # the sequences that made each step
    want = expected(cfg, params, "model", full, dtype, attention_mask=full_mask)
    bound = want.bounds["logits"]
    top2 = -np.sort(-want.values["logits"], axis=-1)[..., :2]  # (B, L', 2)
    gap_ok = top2[..., 0] - top2[..., 1] > 2 * bound  # (B, L')
    routing_ok = np.minimum.accumulate(want.margins, axis=1) >= MARGIN_FACTOR  # (B, L'): every token so far
    decidable = (gap_ok & routing_ok)[:, L - 1:]  # (B, steps): step n's logits sit at padded position L - 1 + n
    same = decided = 0
    differ, undecidable = [], []
    for b in range(len(prompts)):
        for n in range(steps):
            if got[b][n] == torch_tokens[b][n]:
                same += 1
                decided += bool(decidable[b, n])
            else:
                (differ if decidable[b, n] else undecidable).append(f"prompt {b} step {n}")
                break
    detail = (f"{len(prompts)} prompts × {steps} steps: {same} tokens identical ({decided} decidable: top-2 gap > "
              f"2·bound and routing margins ≥ {MARGIN_FACTOR:g} ε)")
    if undecidable:
        detail += f"; differ where undecidable (not compared after): {', '.join(undecidable)}"
    if differ:
        detail += f"; DIFFER where decidable: {', '.join(differ)}"
    return PastCheck("c. greedy tokens, onnxruntime vs torch", None, bound, detail, not differ)
