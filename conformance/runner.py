"""The conformance runner: checks one implementation against the golden cases, case by case and dtype by
dtype, and reports pass / fail / expected-fail / unexpected-pass / skipped (with the reason) and the errors.

An implementation is a function (conformance/README.md, "Plugging in your implementation")

    impl(config: ref.HyperMoEConfig, params: dict[str, np.ndarray], inputs: dict, dtype: str) -> Mapping

`params`: float64 arrays under ref/'s names (ref.param_shapes(config); for a stack case, the standalone
view of one layer: its own names plus the shared `hyper.*`). `inputs`: "x" (..., S, d) float64,
"layer_index" (int), and, for the training-path cases, "jitter" (..., S, d) and "gate_noise" (..., S, N).
`dtype`: "float64" | "float32" | "float16" | "bfloat16", the precision to compute in (cast the inputs and
parameters to it). It returns "output" (..., S, d) and "selected" (..., S, k) (integer expert indices,
largest logit first), and optionally "gates" (..., S, k), "probs", "logits" (..., S, N), "kept" (..., S),
"routed", "hyper" (..., S, d), "aux" {switch_balance, z_loss, cv_balance}: everything returned is checked.
Arrays may be NumPy arrays of any float dtype or torch tensors. Raise `Unsupported("why")` to skip
(a dtype or device you do not support); any other exception is a failure of that case.

Per case and dtype: the skip rule of the manifest first (routing margin below the dtype's resolution),
then the implementation runs; routing is checked first (selected experts and their order, exactly; the
capacity mask exactly), then the values against the manifest's tolerances, |a - e| ≤ atol + rtol |e|.
A stack case runs each layer on the reference's input to that layer, with that layer's parameters and
layer index, and checks the final output x + Σ_ℓ output_ℓ as well.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import ref
from conformance.impls import BUILTIN_IMPLS, Unsupported, onnx_impl, ref_impl, resolve_impl, torch_impl  # noqa: F401
from conformance.suite import (
    AUX_NAMES, CASES_DIR, DTYPES, case_config, load_case, load_manifest, select_cases, sha256_file, split_case,
)

STATUSES = ("pass", "fail", "expected-fail", "unexpected-pass", "skipped")
VALUE_NAMES = ("output", "gates", "probs", "logits", "routed", "hyper")


# ---------------------------------------------------------------------------------------------
# Expected failures
# ---------------------------------------------------------------------------------------------


def load_xfails(path: str | os.PathLike, case_ids: list[str]) -> list[tuple[str, str]]:
    """An xfails file: one `PATTERN  # reason` per line; PATTERN globs a case id or `case_id@dtype`.
    A pattern that matches no case of the suite is an error (stale lists hide nothing silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"xfails file not found: {path}")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        pattern, _, reason = line.partition("#")
        pattern = pattern.strip()
        if not pattern:
            continue
        if " " in pattern:
            raise ValueError(f"{path}:{number}: one pattern per line, got {pattern!r}")
        case_pattern = pattern.split("@", 1)[0]
        dtype = pattern.split("@", 1)[1] if "@" in pattern else None
        if dtype is not None and not any(fnmatch.fnmatchcase(d, dtype) for d in DTYPES):
            raise ValueError(f"{path}:{number}: {pattern!r} names no dtype of {DTYPES}")
        if not any(fnmatch.fnmatchcase(c, case_pattern) for c in case_ids):
            raise ValueError(f"{path}:{number}: {pattern!r} matches no case of the suite")
        entries.append((pattern, reason.strip() or "listed in " + path.name))
    return entries


def _xfail_reason(xfails: list[tuple[str, str]], case_id: str, dtype: str) -> str | None:
    for pattern, reason in xfails:
        if fnmatch.fnmatchcase(f"{case_id}@{dtype}", pattern) or fnmatch.fnmatchcase(case_id, pattern):
            return reason
    return None


# ---------------------------------------------------------------------------------------------
# Checking one case
# ---------------------------------------------------------------------------------------------


class CaseFailure(Exception):
    pass


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype: go through float64)
        value = value.detach().cpu()
        value = value.double() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def _compare(name: str, actual: Any, expected: np.ndarray, tol: list[float], errors: dict[str, Any]) -> None:
    a = _to_numpy(actual)
    if a.shape != expected.shape:
        raise CaseFailure(f"{name}: shape {a.shape}, expected {expected.shape}")
    a = a.astype(np.float64)
    atol, rtol = tol
    diff = np.abs(a - expected)  # NaN stays NaN and fails below
    allowed = atol + rtol * np.abs(expected)
    if diff.size:
        worst = float(np.nanmax(diff)) if not np.isnan(diff).all() else math.nan
        scale = float(np.abs(expected).max())
        use = float(np.max(np.where(np.isnan(diff), np.inf, diff / np.where(allowed > 0, allowed, np.finfo(float).tiny))))
    else:
        worst, scale, use = 0.0, 0.0, 0.0
    errors[name] = {"max_abs": worst, "max_rel": worst / scale if scale > 0 else worst, "tol_use": use,
                    "atol": atol, "rtol": rtol}
    bad = ~(diff <= allowed)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise CaseFailure(f"{name}: {int(bad.sum())} of {bad.size} values out of tolerance (atol {atol:g}, "
                          f"rtol {rtol:g}); first at {tuple(int(j) for j in i)}: {a[i]!r} vs expected "
                          f"{expected[i]!r}; max abs error {worst:.3g}")


def _check_layer(entry: dict, where: str, result: Any, expected: dict[str, np.ndarray], prefix: str,
                 tol: dict[str, list[float]], errors: dict[str, Any], checked: set[str]) -> None:
    if not isinstance(result, Mapping):
        raise CaseFailure(f"{where}the implementation returned {type(result).__name__}, not a mapping")
    for key in ("output", "selected"):
        if key not in result:
            raise CaseFailure(f"{where}the implementation returned no {key!r} (required)")
    # 1. routing: the selected experts and their order, exactly
    sel = _to_numpy(result["selected"])
    want = expected[prefix + "selected"]
    if sel.shape != want.shape:
        raise CaseFailure(f"{where}selected: shape {sel.shape}, expected {want.shape}")
    if sel.size and (sel.dtype.kind not in "iu" and not np.array_equal(sel, np.round(sel))):
        raise CaseFailure(f"{where}selected: not integer expert indices ({sel.dtype})")
    checked.add("selected")
    if not np.array_equal(sel.astype(np.int64), want):
        flat_a, flat_e = sel.reshape(-1, want.shape[-1]).astype(np.int64), want.reshape(-1, want.shape[-1])
        t = int(np.nonzero((flat_a != flat_e).any(axis=-1))[0][0])
        logits = expected[prefix + "logits"].reshape(-1, expected[prefix + "logits"].shape[-1])[t]
        hint = " (exact tie: the lower expert index must win)" if "tie" in entry["tags"] else ""
        same_set = sorted(flat_a[t].tolist()) == sorted(flat_e[t].tolist())
        raise CaseFailure(f"{where}routing: token {t} selected {flat_a[t].tolist()}, expected {flat_e[t].tolist()}"
                          f"{' (same set, wrong order)' if same_set else ''}{hint}; reference logits "
                          f"{np.array2string(logits, precision=6)}")
    if "kept" in result:
        kept = _to_numpy(result["kept"])
        if kept.shape != expected[prefix + "kept"].shape or not np.array_equal(kept.astype(bool), expected[prefix + "kept"]):
            raise CaseFailure(f"{where}capacity: kept mask {kept.astype(bool).reshape(-1).astype(int).tolist()}, "
                              f"expected {expected[prefix + 'kept'].reshape(-1).astype(int).tolist()}")
        checked.add("kept")
    # 2. values
    for name in VALUE_NAMES:
        if name in result:
            _compare(f"{where}{name}", result[name], expected[prefix + name], tol["output" if name in ("routed", "hyper") else name], errors)
            checked.add(name)
    if "aux" in result:
        aux = result["aux"]
        if not isinstance(aux, Mapping):
            raise CaseFailure(f"{where}aux: expected a mapping name → value, got {type(aux).__name__}")
        for name in AUX_NAMES:
            if name in aux:
                _compare(f"{where}aux.{name}", np.asarray(_to_numpy(aux[name]), dtype=np.float64).reshape(()),
                         expected[f"{prefix}aux.{name}"], tol[f"aux.{name}"], errors)
                checked.add(f"aux.{name}")
    if "aux" in entry["tags"]:
        if "aux" not in result:  # not claimed (e.g. an ONNX graph has no aux outputs): skipped, not passed
            raise Unsupported("the case checks the auxiliary losses and the implementation returns none "
                              "(its routing and values, checked first, matched)")
        if not all(f"aux.{n}" in checked for n in AUX_NAMES):
            raise CaseFailure(f"{where}the case checks the auxiliary losses; the implementation returned "
                              f"aux {sorted(result['aux'])}, need {list(AUX_NAMES)}")


def run_case(impl: Callable[..., Any], entry: dict[str, Any], arrays: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """One case in one dtype → a report row (status "pass", "fail" or "skipped", before xfails)."""
    row: dict[str, Any] = {"case": entry["id"], "dtype": dtype, "tags": entry["tags"], "status": "pass",
                           "reason": "", "errors": {}, "checked": [],
                           "max_abs": None, "max_rel": None, "tol_use": None}
    spec = entry["dtypes"][dtype]
    if spec["skip"]:
        return {**row, "status": "skipped", "reason": spec["skip"]}
    cfg = case_config(entry)
    params, inputs, expected = split_case(arrays)
    checked: set[str] = set()
    try:
        if entry["kind"] == "layer":
            call = {"x": inputs["x"], "layer_index": entry["layer_index"],
                    **{n: inputs[n] for n in ("jitter", "gate_noise") if n in inputs}}
            result = _call(impl, cfg, params, call, dtype)
            _check_layer(entry, "", result, expected, "", spec["layers"][0], row["errors"], checked)
        else:  # a stack: layer ℓ on the reference's input to it, with layer ℓ's view of the parameters
            total = inputs["x"].copy()
            for ell in range(cfg.n_layers):
                prefix = f"layers.{ell}."
                call = {"x": expected[prefix + "input"], "layer_index": ell}
                result = _call(impl, cfg, ref.layer_params(params, ell), call, dtype)
                _check_layer(entry, f"layer {ell}: ", result, expected, prefix, spec["layers"][ell], row["errors"], checked)
                total = total + _to_numpy(result["output"]).astype(np.float64)
            _compare("stack output", total, expected["output"], spec["output"], row["errors"])
    except Unsupported as why:
        return {**row, "status": "skipped", "reason": str(why) or "unsupported", "errors": {}}
    except CaseFailure as failure:
        row.update(status="fail", reason=str(failure))
    row["checked"] = sorted(checked)
    out = row["errors"].get("output") or row["errors"].get("stack output") or row["errors"].get("layer 0: output")
    row["max_abs"] = out["max_abs"] if out else None
    row["max_rel"] = out["max_rel"] if out else None
    row["tol_use"] = max((e["tol_use"] for e in row["errors"].values()), default=None)
    return row


def _call(impl, cfg, params, inputs, dtype):
    try:
        return impl(cfg, {n: v.copy() for n, v in params.items()}, {n: (v.copy() if isinstance(v, np.ndarray) else v)
                                                                   for n, v in inputs.items()}, dtype)
    except Unsupported:
        raise
    except Exception as err:  # noqa: BLE001 — any crash of the implementation is that case's failure
        raise CaseFailure(f"the implementation raised {type(err).__name__}: {err}") from None


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


def run(impl: str | Callable[..., Any], dtypes: list[str] | str = "float32", cases: str | None = None,
        xfails: str | os.PathLike | None = None, cases_dir: str | os.PathLike = CASES_DIR) -> dict[str, Any]:
    """Run the suite; returns the report (see `format_table`, and `report["exit_status"]`).

    Raises ValueError (IntegrityError) before running anything if a selected case file is missing or
    tampered with, a --cases pattern matches nothing, the implementation or a dtype is unknown."""
    impl_name = impl if isinstance(impl, str) else f"{impl.__module__}:{impl.__qualname__}"
    func = resolve_impl(impl) if isinstance(impl, str) else impl
    dtypes = [d.strip() for d in dtypes.split(",")] if isinstance(dtypes, str) else list(dtypes)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}: expected one of {', '.join(DTYPES)}")
    manifest = load_manifest(cases_dir)
    entries = select_cases(manifest, cases)
    loaded = [(entry, load_case(entry, cases_dir)) for entry in entries]  # integrity first, all of it
    xfail_list = load_xfails(xfails, [c["id"] for c in manifest["cases"]]) if xfails else []
    rows = []
    for entry, arrays in loaded:
        for dtype in dtypes:
            row = run_case(func, entry, arrays, dtype)
            why = _xfail_reason(xfail_list, entry["id"], dtype)
            if why is not None and row["status"] == "fail":
                row.update(status="expected-fail", reason=f"{why} [{row['reason']}]")
            elif why is not None and row["status"] == "pass":
                row.update(status="unexpected-pass", reason=f"listed as expected to fail ({why}) but passed")
            rows.append(row)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    bad = counts["fail"] + counts["unexpected-pass"]
    return {
        "impl": impl_name, "dtypes": dtypes, "cases_pattern": cases, "suite_version": manifest["suite_version"],
        "spec_version": manifest["spec_version"], "manifest_sha256": sha256_file(Path(cases_dir) / "manifest.json"),
        "results": rows, "summary": counts, "exit_status": 1 if bad else 0,
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def format_table(report: dict[str, Any]) -> str:
    """The per-case summary table and the totals, as printed by `hypermoe conformance`."""
    head = ("case", "dtype", "status", "max abs err", "max rel err", "tol use", "reason")
    lines = [(r["case"], r["dtype"], r["status"], _fmt(r.get("max_abs")), _fmt(r.get("max_rel")),
              "-" if r.get("tol_use") is None else f"{r['tol_use']:.3f}", r["reason"]) for r in report["results"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)][:-1]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1])  # noqa: E731
    out = [fmt(head), fmt(tuple("-" * w for w in widths) + ("-" * 6,))]
    out += [fmt(line).rstrip() for line in lines]
    s = report["summary"]
    out.append("")
    out.append(f"impl {report['impl']}, suite {report['suite_version']} (spec {report['spec_version']}): "
               + ", ".join(f"{s[k]} {k}" for k in STATUSES))
    if s["pass"] + s["fail"] + s["expected-fail"] + s["unexpected-pass"] == 0:
        out.append("NOTHING RAN: every case was skipped (see the reasons above)")
    out.append("max abs/rel err: of the layer (or stack) output; rel = max|a-e| / max|e|; "
               "tol use = max over all checked values of |a-e| / (atol + rtol|e|) (≤ 1 passes)")
    return "\n".join(out)
