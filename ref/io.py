"""Saved models: a directory with `config.json` (the config, the spec version and the kind) and
`weights.npz` (one array per parameter name, exactly the names of ref/; float32 or float64). Loading
never unpickles (`allow_pickle=False`) and checks every name, shape and dtype against the config.

kinds: "layer" (ref.param_shapes), "stack" (ref.stack_param_shapes), "model" (ref.model.model_param_shapes).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ref.config import SPEC_VERSION, HyperMoEConfig

KINDS = ("layer", "stack", "model")
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.npz"


def expected_shapes(cfg: HyperMoEConfig, kind: str) -> dict[str, tuple[int, ...]]:
    from ref import semantics as layer

    if kind == "layer":
        return layer.param_shapes(cfg)
    if kind == "stack":
        return layer.stack_param_shapes(cfg)
    if kind == "model":
        from ref import model

        return model.model_param_shapes(cfg)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def save_dir(path: str | os.PathLike, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str) -> Path:
    """Write config.json + weights.npz into `path` (created if needed). Arrays must be float32/float64."""
    shapes = expected_shapes(cfg, kind)
    dtypes = {np.asarray(v).dtype for v in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise ValueError(f"weights must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    from ref.semantics import check_params

    check_params({k: np.asarray(v) for k, v in params.items()}, shapes, next(iter(dtypes)))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"spec_version": SPEC_VERSION, "kind": kind, **cfg.to_dict()},
                                               indent=2, sort_keys=True) + "\n")
    with open(path / WEIGHTS_FILE, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in sorted(params.items())})
    return path


def load_config(path: str | os.PathLike) -> tuple[HyperMoEConfig, str]:
    """(config, kind) of a saved model directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    kind = data.pop("kind", "layer")
    if kind not in KINDS:
        raise ValueError(f"{file}: unknown kind {kind!r}; expected one of {KINDS}")
    version = data.get("spec_version", SPEC_VERSION)
    if str(version).split(".")[0] != SPEC_VERSION.split(".")[0]:
        raise ValueError(f"{file}: spec version {version} is incompatible with this hypermoe (spec {SPEC_VERSION})")
    try:
        return HyperMoEConfig.from_dict(data), kind
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def load_dir(path: str | os.PathLike) -> tuple[HyperMoEConfig, dict[str, np.ndarray], str]:
    """(config, params, kind) of a saved model directory, every parameter checked against the config."""
    cfg, kind = load_config(path)
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a plain .npy array, not an archive
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with loaded as archive:
            params = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{file}: not a readable .npz weights file ({err})") from None
    dtypes = {v.dtype for v in params.values()}
    if not params:
        raise ValueError(f"{file}: holds no arrays")
    if len(dtypes) != 1:
        raise ValueError(f"{file}: weights mix dtypes {sorted(map(str, dtypes))}")
    if next(iter(dtypes)) not in (np.float32, np.float64):
        raise ValueError(f"{file}: weights must be float32 or float64, got {next(iter(dtypes))}")
    from ref.semantics import check_params

    try:
        check_params(params, expected_shapes(cfg, kind), next(iter(dtypes)))
    except ValueError as err:
        raise ValueError(f"{file} does not match {CONFIG_FILE}: {err}") from None
    return cfg, params, kind
