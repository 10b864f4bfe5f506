"""The golden cases on disk: the manifest, integrity checks (sha256 of every case file), loading. The
floating-point facts the tolerances and skip rules are built from (unit roundoff, rounding to a dtype) are
ref/tolerances.py's. Read by the runner and the generator.

A case is one `.npz` file (no pickle) holding, by key prefix:
    param.<name>      the parameters, float64, exactly ref/'s names (a layer: ref.param_shapes;
                      a stack: ref.stack_param_shapes)
    input.x           the input (..., S, d), float64; input.jitter (..., S, d) and input.gate_noise
                      (..., S, N) when the case exercises the training-only paths
    expected.<q>      ref/'s float64 results: output, selected, gates, probs, logits, kept, routed,
                      hyper, aux.switch_balance, aux.z_loss, aux.cv_balance; a stack has the final h as
                      expected.output and layer ℓ's results as expected.layers.<ℓ>.<q>
and one manifest entry (manifest.json) with its id, config, shapes, file name, sha256, tags, routing
margins and, per dtype, either a skip reason or the tolerances (see conformance/README.md).
"""

from __future__ import annotations

import fnmatch
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import ref
from ref.files import sha256_file
from ref.tolerances import DTYPES, UNIT_ROUNDOFF, representable, round_to  # noqa: F401 (defined in ref/)

CASES_DIR = Path(__file__).resolve().parent / "cases"
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1  # bump when the manifest's or the case files' layout changes

AUX_NAMES = ("switch_balance", "z_loss", "cv_balance")


class IntegrityError(ValueError):
    """A case file is missing, tampered with (sha256 mismatch), unreadable, or the manifest is invalid."""


# ---------------------------------------------------------------------------------------------
# Manifest and case files
# ---------------------------------------------------------------------------------------------


def load_manifest(cases_dir: str | Path = CASES_DIR) -> dict[str, Any]:
    path = Path(cases_dir) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"conformance manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"conformance manifest {path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA or not isinstance(manifest.get("cases"), list):
        raise IntegrityError(f"conformance manifest {path} is not a schema-{MANIFEST_SCHEMA} manifest")
    for key in ("suite_version", "spec_version"):
        if not isinstance(manifest.get(key), str):
            raise IntegrityError(f"conformance manifest {path}: {key!r} must be a string, got {manifest.get(key)!r}")
    for i, entry in enumerate(manifest["cases"]):
        problem = _entry_problem(entry)
        if problem:
            name = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else f"number {i}"
            raise IntegrityError(f"conformance manifest {path}: case {name}: {problem}")
    return manifest


PER_LAYER = ("output", "selected", "gates", "probs", "logits", "kept", "routed", "hyper") + tuple(
    f"aux.{name}" for name in AUX_NAMES)  # what the runner reads of each layer's expected results
TOLERANCES = ("output", "logits", "probs", "gates") + tuple(f"aux.{name}" for name in AUX_NAMES)


def _entry_problem(entry: Any) -> str:
    """What in one manifest entry the runner cannot use ("" if nothing): the case files are covered by their
    sha256, the manifest only by this check, so an edited field is an integrity error, not a KeyError later."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    pair = lambda v: isinstance(v, list) and len(v) == 2 and all(number(x) for x in v)  # noqa: E731  [atol, rtol]
    fields = {
        "id": lambda v: isinstance(v, str) and v != "",
        "file": lambda v: isinstance(v, str) and v.endswith(".npz") and Path(v).name == v,
        "sha256": lambda v: isinstance(v, str),
        "kind": lambda v: v in ("layer", "stack"),
        "layer_index": lambda v: entry.get("kind") == "stack" or isinstance(v, int) and not isinstance(v, bool),
        "config": lambda v: isinstance(v, dict),
        "shapes": lambda v: isinstance(v, dict) and all(
            isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in s) for s in v.values()),
        "tags": lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
        "routing_margin": lambda v: v is None or number(v),
        "order_margin": lambda v: v is None or number(v),
        "dtypes": lambda v: isinstance(v, dict) and all(isinstance(v.get(d), dict) for d in DTYPES),
    }
    for key, valid in fields.items():
        if key not in entry or not valid(entry[key]):
            return f"field {key!r} is missing or invalid ({entry.get(key)!r:.60})"
    try:
        cfg = case_config(entry)
    except (TypeError, ValueError) as err:
        return f"invalid config: {err}"
    layers = cfg.n_layers if entry["kind"] == "stack" else 1
    prefixes = [f"layers.{ell}." for ell in range(layers)] if entry["kind"] == "stack" else [""]
    needed = {"input.x"} | {f"expected.{p}{q}" for p in prefixes for q in PER_LAYER}
    if entry["kind"] == "stack":
        needed |= {"expected.output"} | {f"expected.{p}input" for p in prefixes}
    missing = sorted(needed - set(entry["shapes"]))
    if missing:
        return f"the {entry['kind']} case lists no array(s) {', '.join(missing[:3])}"
    for dtype in DTYPES:
        spec = entry["dtypes"][dtype]
        if spec.get("skip") is not None:
            if not isinstance(spec["skip"], str) or not spec["skip"]:
                return f"dtypes.{dtype}.skip must be null or a reason, got {spec['skip']!r:.60}"
            continue
        tolerances = spec.get("layers")
        if not (isinstance(tolerances, list) and len(tolerances) == layers and all(
                isinstance(t, dict) and all(pair(t.get(name)) for name in TOLERANCES) for t in tolerances)):
            return f"dtypes.{dtype}.layers must be {layers} object(s) of [atol, rtol] for {', '.join(TOLERANCES)}"
        if entry["kind"] == "stack" and not pair(spec.get("output")):
            return f"dtypes.{dtype}.output must be [atol, rtol], got {spec.get('output')!r:.60}"
    return ""


def select_cases(manifest: dict[str, Any], patterns: str | None) -> list[dict[str, Any]]:
    """The manifest entries whose id matches one of the comma-separated glob `patterns` (all when None).
    A pattern that matches nothing is an error (a typo must not turn into an empty, passing run)."""
    cases = manifest["cases"]
    if patterns is None:
        return list(cases)
    chosen, ids = [], [c["id"] for c in cases]
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()] or [patterns]:
        hits = [c for c in cases if fnmatch.fnmatchcase(c["id"], pattern)]
        if not hits:
            raise ValueError(f"--cases pattern {pattern!r} matches no case; case ids are: {', '.join(ids)}")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in cases if c in chosen]  # manifest order


def load_case(entry: dict[str, Any], cases_dir: str | Path = CASES_DIR) -> dict[str, np.ndarray]:
    """The arrays of one case, after checking the file's sha256 against the manifest."""
    path = Path(cases_dir) / entry["file"]
    if not path.is_file():
        raise IntegrityError(f"case {entry['id']!r}: file {path} is missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise IntegrityError(
            f"case {entry['id']!r}: file {path} has sha256 {digest}, the manifest says {entry['sha256']} "
            "(tampered or stale; regenerate with `python -m conformance.generate`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise IntegrityError(f"case {entry['id']!r}: cannot read {path}: {err}") from None
    expected_keys = set(entry["shapes"])
    if set(arrays) != expected_keys:
        raise IntegrityError(f"case {entry['id']!r}: {path} holds {sorted(arrays)}, the manifest lists {sorted(expected_keys)}")
    for name, shape in entry["shapes"].items():
        if list(arrays[name].shape) != shape:
            raise IntegrityError(f"case {entry['id']!r}: array {name!r} has shape {arrays[name].shape}, manifest {shape}")
    return arrays


def case_config(entry: dict[str, Any]) -> ref.HyperMoEConfig:
    return ref.HyperMoEConfig.from_dict(entry["config"])


def split_case(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, inputs, expected) with the key prefixes removed."""
    parts: dict[str, dict[str, np.ndarray]] = {"param": {}, "input": {}, "expected": {}}
    for name, value in arrays.items():
        prefix, rest = name.split(".", 1)
        parts[prefix][rest] = value
    return parts["param"], parts["input"], parts["expected"]
