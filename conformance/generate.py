"""Build the golden cases from ref/ (float64) and write them with their manifest:

    python -m conformance.generate            # rewrite conformance/cases/ (manifest.json + one .npz per case)
    python -m conformance.generate --check    # regenerate into a temporary folder, compare with the committed cases

Every expected value comes from importing ref/ (style.md §9); nothing here re-derives the math.

Inputs and parameters are exactly reproducible: they are np.random.default_rng(seed) draws, scaled or
combined only by elementwise IEEE operations (one correctly rounded result each: no BLAS, no summation
whose order a library chooses), and the one constructed input (the near-tie token) is computed in exact
rational arithmetic (`_exact_dot`) and rounded once. ref/ (through BLAS) only decides which draws are
kept (a token is redrawn while a logit gap is below MARGIN); `_draw` refuses any decision whose gap lies
within DECISION_GUARD of the threshold, so a platform whose float64 logits differ by less than that (the
float64 error is ~1e-13) takes the same decisions and draws the same arrays. `--check` therefore
compares inputs and parameters bitwise. The expected values are ref's float64 results through BLAS, whose
last bits depend on the CPU and BLAS build: `--check` requires this platform's ref to pass every committed
case in float64 under the case's own float64 tolerances (|Δ| ≤ atol + rtol |e|, derived from the case's
magnitudes in conformance/tolerances.py; stacks layer by layer, teacher-forced), not bitwise equality.
The arrays are committed as well as their seeds: NumPy guarantees a seed's stream only per version (NEP 19).

Tolerances, skip rules and margins are computed by conformance/tolerances.py from each case's own
magnitudes and written into the manifest (conformance/README.md, "What the runner checks").
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

import ref
from conformance.specs import Spec, case_specs as _specs  # defined here before the split
from conformance.suite import AUX_NAMES, CASES_DIR, DTYPES, MANIFEST, MANIFEST_SCHEMA, load_manifest, sha256_file
from conformance.tolerances import K_VALUES, dtype_entry, margins, order_gaps
from ref import HyperMoEConfig

SUITE_VERSION = "1.0.2"  # version of the case set; bump when cases are added, removed or changed
MARGIN = 0.15  # target order margin of random cases: above 2 ε_D for bfloat16 at d ≤ 32 (ε ≈ 0.05)
# No redraw decision may rest on a gap within DECISION_GUARD · max(1, max|logit|) of MARGIN. ref's float64
# logits differ between platforms by at most ~(d + 6) u R + u max|b| + the propagated error of earlier
# stack layers, < 1e-12 · max(1, max|logit|) here (u = 2^-53, d ≤ 32, R = max Σ|x W| ≤ ~20): the guard is
# 1000× that, so every platform keeps and redraws the same tokens.
DECISION_GUARD = 1e-9
NEAR_TIE_GAP = 1e-4  # the near-tie token's gap between its k-th and (k+1)-th logit


# ---------------------------------------------------------------------------------------------
# Drawing inputs and running the reference
# ---------------------------------------------------------------------------------------------


def _run_ref(spec: Spec, params: dict[str, np.ndarray], inputs: dict[str, np.ndarray]):
    """[(layer input, LayerResult)] per layer, and the final output."""
    cfg, x = spec.cfg, inputs["x"]
    if spec.kind == "stack":
        out, results = ref.stack(cfg, params, x)
        h, per_layer = x, []
        for result in results:
            per_layer.append((h, result))
            h = h + result.output
        return per_layer, out
    result = ref.layer(cfg, params, x, spec.layer_index, jitter=inputs.get("jitter"), gate_noise=inputs.get("gate_noise"))
    return [(x, result)], result.output


def _layer_params(spec: Spec, params: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    return ref.layer_params(params, layer) if spec.kind == "stack" else params


def _exact_dot(a: np.ndarray, b: np.ndarray) -> Fraction:
    """Σ_i a_i b_i of two float64 vectors in exact rational arithmetic (no rounding, no BLAS)."""
    return sum((Fraction(float(p)) * Fraction(float(q)) for p, q in zip(a.tolist(), b.tolist())), Fraction(0))


def _near_tie(cfg: HyperMoEConfig, params: dict[str, np.ndarray], x0: np.ndarray) -> np.ndarray:
    """Token x0 moved along w = W_i - W_j (i, j: its k-th and (k+1)-th expert) until the gap between
    those two logits is NEAR_TIE_GAP. Exactly reproducible: the logits and w·w are exact rationals, the
    step c is rounded once (Fraction → float), and w, c·w and x0 - c·w are elementwise IEEE operations."""
    k, W = cfg.top_k, params["router.weight"]
    bias = params["router.bias"] if cfg.router_bias else np.zeros(cfg.n_experts)
    logits = [_exact_dot(x0, W[:, j]) + Fraction(float(bias[j])) for j in range(cfg.n_experts)]
    order = sorted(range(cfg.n_experts), key=lambda j: (-logits[j], j))  # ties: the lower index first
    i, j = order[k - 1], order[k]
    w = W[:, i] - W[:, j]
    c = float((logits[i] - logits[j] - Fraction(NEAR_TIE_GAP)) / _exact_dot(w, w))
    return x0 - c * w


def _draw(spec: Spec) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The parameters and inputs of a case: default_rng draws and elementwise IEEE operations only (module
    docstring); ref's float64 logits choose which tokens are redrawn, never the values."""
    cfg, rng = spec.cfg, np.random.default_rng(spec.seed)
    d, N = cfg.d_model, cfg.n_experts
    params = ref.init_stack(cfg, seed=spec.seed) if spec.kind == "stack" else ref.init(cfg, seed=spec.seed)
    lead = spec.shape[:-1]
    T = math.prod(lead)
    if spec.router == "ties":  # multiples of 1/4 in [-1, 1]: products and sums exact in every dtype
        W = rng.integers(-4, 5, (d, N)) / 4
        W[:, 2] = W[:, 1]  # experts 1 and 2 always tie
        params["router.weight"] = W
        x = rng.integers(-4, 5, (T, d)) / 4
        x[::3] = 0.0  # all-zero tokens: every logit 0, all N experts tie
        return params, {"x": x.reshape(spec.shape)}
    if spec.router == "large":
        params["router.bias"] = np.array(spec.bias, dtype=np.float64)
    x = rng.standard_normal((T, d))
    jitter = rng.uniform(1 - cfg.router_jitter, 1 + cfg.router_jitter, (T, d)) if spec.jitter else None
    noise = rng.standard_normal((T, N)) if spec.gate_noise else None
    for _ in range(1000):  # redraw tokens until every layer's order margin ≥ MARGIN
        inputs = {"x": x.reshape(spec.shape)}
        if jitter is not None:
            inputs["jitter"] = jitter.reshape(spec.shape)
        if noise is not None:
            inputs["gate_noise"] = noise.reshape(*lead, N)
        per_layer, _ = _run_ref(spec, params, inputs)
        bad = np.zeros(T, dtype=bool)
        for _, result in per_layer:
            logits = result.logits.reshape(T, N)
            gaps = order_gaps(logits, cfg.top_k)
            guard = DECISION_GUARD * max(1.0, float(np.abs(logits).max(initial=0.0)))
            if (np.abs(gaps - MARGIN) < guard).any():
                raise RuntimeError(f"case {spec.id}: a logit gap lies within {guard:.1e} of the margin {MARGIN}, "
                                   "so whether that token is redrawn could depend on the platform's rounding")
            bad |= (gaps < MARGIN).any(axis=-1)
        if not bad.any():
            break
        x[bad] = rng.standard_normal((int(bad.sum()), d))
        if jitter is not None:
            jitter[bad] = rng.uniform(1 - cfg.router_jitter, 1 + cfg.router_jitter, (int(bad.sum()), d))
        if noise is not None:
            noise[bad] = rng.standard_normal((int(bad.sum()), N))
    else:
        raise RuntimeError(f"case {spec.id}: could not draw inputs with order margin {MARGIN}")
    if spec.router == "near-tie":
        if spec.jitter or spec.gate_noise:
            raise ValueError(f"case {spec.id}: a near-tie case takes neither jitter nor gate noise")
        x[0] = _near_tie(cfg, params, x[0])
        inputs["x"] = x.reshape(spec.shape)
    return params, inputs


# ---------------------------------------------------------------------------------------------
# Building and writing
# ---------------------------------------------------------------------------------------------


def build(spec: Spec) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays of one case and its manifest entry (without file and sha256)."""
    params, inputs = _draw(spec)
    per_layer, final = _run_ref(spec, params, inputs)
    arrays = {f"param.{n}": v for n, v in params.items()}
    arrays.update({f"input.{n}": v for n, v in inputs.items()})
    arrays["expected.output"] = final
    for ell, (_, result) in enumerate(per_layer):
        prefix = f"expected.layers.{ell}." if spec.kind == "stack" else "expected."
        for q in ("selected", "gates", "probs", "logits", "kept", "routed", "hyper"):
            arrays[prefix + q] = getattr(result, q)
        if spec.kind == "stack":  # the runner feeds layer ℓ the reference's input to it (teacher forcing)
            arrays[prefix + "input"] = per_layer[ell][0]
            arrays[prefix + "output"] = result.output
        for n in AUX_NAMES:
            arrays[f"{prefix}aux.{n}"] = np.array(result.aux[n], dtype=np.float64)
    layers = [(h, result, _layer_params(spec, params, ell)) for ell, (h, result) in enumerate(per_layer)]
    margin = margins(spec.cfg, per_layer)
    if "capacity" in spec.tags and "T0" not in spec.tags:
        kept = np.concatenate([r.kept.reshape(-1) for _, r in per_layer])
        if (not kept.all()) != ("drops" in spec.tags):
            raise RuntimeError(f"case {spec.id}: the 'drops' tag disagrees with the data")
    if "tie" in spec.tags:
        if not margin["tokens_with_exact_ties"]:
            raise RuntimeError(f"case {spec.id}: tagged 'tie' but has no exact tie")
    entry = {
        "id": spec.id, "spec_version": ref.SPEC_VERSION, "description": spec.description, "tags": list(spec.tags),
        "kind": spec.kind, "layer_index": spec.layer_index if spec.kind == "layer" else None, "seed": spec.seed,
        "config": spec.cfg.to_dict(),
        "shapes": {n: list(v.shape) for n, v in sorted(arrays.items())},
        **margin,
        "dtypes": {dt: dtype_entry(spec.cfg, layers, inputs, margin, dt, exact_router=spec.router == "ties",
                                   stack=spec.kind == "stack") for dt in DTYPES},
    }
    return {n: np.asarray(v, order="C") for n, v in sorted(arrays.items())}, entry  # (ascontiguousarray makes 0-d 1-d)


def write(out_dir: str | Path = CASES_DIR) -> dict[str, Any]:
    """Regenerate every case into `out_dir` (stale .npz files there are removed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.npz"):
        old.unlink()
    cases = []
    for spec in _specs():
        arrays, entry = build(spec)
        path = out / f"{spec.id}.npz"
        np.savez(path, **arrays)  # uncompressed: byte-stable (fixed zip timestamps), no pickle
        cases.append({**entry, "file": path.name, "sha256": sha256_file(path)})
    manifest = {
        "schema": MANIFEST_SCHEMA, "suite_version": SUITE_VERSION, "spec_version": ref.SPEC_VERSION,
        "generator": "python -m conformance.generate", "margin_target": MARGIN, "tolerance_factor_K": K_VALUES,
        "cases": cases,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _close_json(a: Any, b: Any, path: str, problems: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in ("sha256",):
                continue
            if key not in a or key not in b:
                problems.append(f"{path}.{key}: present in only one manifest")
            else:
                _close_json(a[key], b[key], f"{path}.{key}", problems)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _close_json(x, y, f"{path}[{i}]", problems)
    elif isinstance(a, float) and isinstance(b, float):
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
            problems.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        problems.append(f"{path}: {a!r} != {b!r}")


CHECK_RULES = (
    "inputs and parameters: bitwise (default_rng draws and elementwise IEEE operations, no BLAS); "
    "routing (selected, kept): exactly; expected values: this platform's ref must pass every committed case in "
    "float64 under the case's float64 tolerances (|Δ| ≤ atol + rtol|e|, scaled by the case's magnitudes; "
    "stacks layer by layer, teacher-forced), not bitwise (ref computes them through BLAS); manifest: strings "
    "and integers exactly, numbers within 1e-9 relative (margins and tolerances derive from BLAS-computed logits "
    "and magnitudes: the smallest margin, near_tie's 1e-4, moves by ≤ ~2e-14 = 2e-10 relative between platforms; "
    "tolerances are rounded up to two digits, so they agree unless one lies within ~1e-12 of a rounding step)"
)


def _stack_chain_problems(entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[str]:
    """A committed stack's layer inputs are x + the earlier layers' outputs, each sum one IEEE addition."""
    problems, h = [], arrays["input.x"]
    n_layers = entry["config"]["n_layers"]
    for ell in range(n_layers):
        if not np.array_equal(arrays[f"expected.layers.{ell}.input"], h):
            problems.append(f"{entry['id']}/expected.layers.{ell}.input: not the input plus the earlier layers' outputs")
        h = h + arrays[f"expected.layers.{ell}.output"]
    if not np.array_equal(arrays["expected.output"], h):
        problems.append(f"{entry['id']}/expected.output: not the input plus every layer's output")
    return problems


def check(cases_dir: str | Path = CASES_DIR) -> tuple[list[str], list[str]]:
    """Regenerate into a temporary folder and compare with `cases_dir` by CHECK_RULES. Returns
    (problems, notes): problems are failures; notes name expected arrays that are not bitwise equal to
    the regeneration (allowed: they are within the case's float64 tolerances, or a problem says so)."""
    from conformance import runner
    from conformance.suite import load_case

    committed = load_manifest(cases_dir)
    problems, notes = [], []
    loaded = {entry["id"]: load_case(entry, cases_dir) for entry in committed["cases"]}  # IntegrityError first
    for entry in committed["cases"]:
        arrays = loaded[entry["id"]]
        row = runner.run_case(runner.ref_impl, entry, arrays, "float64")
        if row["status"] != "pass":
            problems.append(f"{entry['id']}: ref on this platform does not reproduce the expected values within the "
                            f"case's float64 tolerances: {row['status']}: {row['reason']}")
        if entry["kind"] == "stack":
            problems += _stack_chain_problems(entry, arrays)
    tmp = Path(tempfile.mkdtemp(prefix="hypermoe-conformance-"))
    try:
        fresh = write(tmp)
        _close_json(committed, fresh, "manifest", problems)
        for entry in fresh["cases"]:
            if entry["id"] not in loaded:
                continue  # reported by the manifest comparison
            a = loaded[entry["id"]]
            with np.load(tmp / entry["file"], allow_pickle=False) as data:
                b = {name: data[name] for name in data.files}
            if sorted(a) != sorted(b):
                problems.append(f"{entry['id']}: arrays {sorted(a)} != regenerated {sorted(b)}")
                continue
            for name in sorted(a):
                x, y = a[name], b[name]
                if x.dtype != y.dtype or x.shape != y.shape:
                    problems.append(f"{entry['id']}/{name}: {x.dtype}{x.shape} != regenerated {y.dtype}{y.shape}")
                elif np.array_equal(x, y):
                    continue
                elif name.startswith("expected.") and x.dtype.kind == "f":  # judged by run_case above
                    notes.append(f"{entry['id']}/{name}: not bitwise equal to the regeneration "
                                 f"(max abs {float(np.abs(x - y).max()):.2e}; checked against the float64 tolerances)")
                else:
                    err = float(np.abs(x.astype(np.float64) - y).max()) if x.dtype.kind in "fiub" else None
                    what = "routing must agree exactly" if name.startswith("expected.") else (
                        "inputs and parameters must be bitwise reproducible")
                    problems.append(f"{entry['id']}/{name}: differs from the regenerated array (max abs {err}); {what}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(CASES_DIR), help=f"output folder (default {CASES_DIR})")
    parser.add_argument("--check", action="store_true", help="compare a fresh regeneration with --out instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        problems, notes = check(args.out)
        print("compared:", CHECK_RULES)
        for line in notes:
            print("note:", line)
        for line in problems:
            print("DIFFERS:", line)
        verdict = "differ from" if problems else "agree (by the rules above) with"
        print(f"{'FAILED' if problems else 'OK'}: regenerated cases {verdict} {args.out}")
        return 1 if problems else 0
    manifest = write(args.out)
    size = sum((Path(args.out) / c["file"]).stat().st_size for c in manifest["cases"])
    print(f"wrote {len(manifest['cases'])} cases ({size / 1e6:.2f} MB) and {MANIFEST} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
