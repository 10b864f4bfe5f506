"""Saved models: a directory with `config.json` (the config, the spec version and the kind) and
`weights.npz` or `weights.safetensors` (one array per parameter name, exactly the names of ref/; float32 or
float64). Loading never unpickles (`allow_pickle=False`) and checks every name, shape and dtype against the
config. An .npz needs numpy alone; the `safetensors` package is imported only to read or write a
weights.safetensors, and each file's header is checked against the file's size before anything is allocated.

kinds: "layer" (ref.param_shapes), "stack" (ref.stack_param_shapes), "model" (ref.model.model_param_shapes).
"""

from __future__ import annotations

import json
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ref.config import SPEC_VERSION, HyperMoEConfig

KINDS = ("layer", "stack", "model")
CONFIG_FILE, WEIGHTS_FILE, SAFETENSORS_FILE = "config.json", "weights.npz", "weights.safetensors"
FORMATS = {"npz": WEIGHTS_FILE, "safetensors": SAFETENSORS_FILE}  # save_dir's format → the weights file it writes
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer a model directory may carry (hypermoe train copies its corpus's)
ENTRIES = (CONFIG_FILE, WEIGHTS_FILE, SAFETENSORS_FILE, TOKENIZER_FILE)  # what a model directory may hold (--force replaces only these)

# The fields a transformers loader reads from a kind-"model" config.json (hypermoe.hf): the model type AutoConfig
# looks up, the class that loads it, and the special token ids generate() uses. They change no number; save_dir
# writes model_type and architectures for every kind-"model" directory, read_config_fields checks and returns them,
# and any other field is still an unknown-field error (HyperMoEConfig.from_dict).
MODEL_TYPE, ARCHITECTURE = "hypermoe", "HyperMoEForCausalLM"
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
TRANSFORMERS_FIELDS = ("model_type", "architectures", *TOKEN_ID_FIELDS)


def check_transformers_fields(fields: Mapping, kind: str) -> dict:
    """The transformers fields of a config.json (TRANSFORMERS_FIELDS), checked: model_type "hypermoe", architectures
    [ARCHITECTURE], token ids None or an int ≥ 0 (eos_token_id also a list of them); only in a kind-"model" file."""
    fields = dict(fields)
    if fields and kind != "model":
        raise ValueError(f"field(s) {', '.join(sorted(fields))} belong to a kind 'model' config, this one is kind {kind!r}")
    if fields.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {fields['model_type']!r}")
    if fields.get("architectures", [ARCHITECTURE]) != [ARCHITECTURE]:
        raise ValueError(f"architectures must be [{ARCHITECTURE!r}], got {fields['architectures']!r}")
    token_id = lambda v: type(v) is int and v >= 0  # noqa: E731
    for name in TOKEN_ID_FIELDS:
        value = fields.get(name)
        ids = value if name == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is not None and not all(token_id(v) for v in ids):
            raise ValueError(f"{name} must be a token id (an int ≥ 0){' or a list of them' * (name == 'eos_token_id')}"
                             f" or null, got {value!r}")
    return fields


def expected_shapes(cfg: HyperMoEConfig, kind: str) -> dict[str, tuple[int, ...]]:
    from ref.params import param_shapes, stack_param_shapes

    if kind == "layer":
        return param_shapes(cfg)
    if kind == "stack":
        return stack_param_shapes(cfg)
    if kind == "model":
        from ref import model

        return model.model_param_shapes(cfg)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def save_dir(path: str | os.PathLike, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, *,
             force: bool = False, format: str = "npz", token_ids: Mapping[str, int | list[int] | None] | None = None,
             ) -> Path:
    """Write config.json + weights.npz (format "npz") or weights.safetensors (format "safetensors") as the
    directory `path`, atomically (ref.files): staged next to it, then renamed in. An existing non-empty `path`
    is refused unless `force`. Arrays must be float32/float64. A kind-"model" config.json also names its
    transformers model type and class, and `token_ids` (TOKEN_ID_FIELDS → id) when given (hypermoe.hf reads them)."""
    if format not in FORMATS:
        raise ValueError(f"unknown weights format {format!r}; expected one of {tuple(FORMATS)}")
    unknown = sorted(set(token_ids or {}) - set(TOKEN_ID_FIELDS))
    if unknown:
        raise ValueError(f"unknown token id field(s) {', '.join(unknown)}; expected some of {TOKEN_ID_FIELDS}")
    extra = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE]} if kind == "model" else {}
    extra.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    check_transformers_fields(extra, kind)
    shapes = expected_shapes(cfg, kind)
    dtypes = {np.asarray(v).dtype for v in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise ValueError(f"weights must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    from ref.params import check_params

    check_params({k: np.asarray(v) for k, v in params.items()}, shapes, next(iter(dtypes)))
    from ref.files import atomic_output

    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(params.items())}
    save_file = safetensors_package().numpy.save_file if format == "safetensors" else None  # package missing: fail first
    with atomic_output(path, force=force, directory=True, entries=ENTRIES) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps({"spec_version": SPEC_VERSION, "kind": kind, **cfg.to_dict(), **extra},
                                                  indent=2, sort_keys=True) + "\n")
        if save_file is not None:
            save_file(arrays, str(tmp / SAFETENSORS_FILE))
        else:
            with open(tmp / WEIGHTS_FILE, "wb") as fh:
                np.savez(fh, **arrays)
    return Path(path)


def load_config(path: str | os.PathLike) -> tuple[HyperMoEConfig, str]:
    """(config, kind) of a saved model directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    return read_config(file)


def read_config(file: str | os.PathLike) -> tuple[HyperMoEConfig, str]:
    """(config, kind) of a config JSON file: a model directory's config.json (with kind and spec_version) or
    a bare config (kind "layer"); a directory stands for its config.json."""
    return read_config_fields(file)[:2]


def read_config_fields(file: str | os.PathLike) -> tuple[HyperMoEConfig, str, dict]:
    """(config, kind, transformers fields) of a config JSON file, as read_config; the third is the
    TRANSFORMERS_FIELDS the file holds, checked (check_transformers_fields)."""
    file = Path(file)
    if file.is_dir():
        file = file / CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    try:
        return config_from_fields(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def config_from_fields(data: Mapping) -> tuple[HyperMoEConfig, str, dict]:
    """(config, kind, transformers fields) of a config.json's parsed object (kind "layer" when absent); ValueError
    naming the problem: an unknown kind, an incompatible spec version, a bad or unknown field."""
    data = dict(data)
    kind = data.pop("kind", "layer")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    version = data.get("spec_version", SPEC_VERSION)
    if str(version).split(".")[0] != SPEC_VERSION.split(".")[0]:
        raise ValueError(f"spec version {version} is incompatible with this hypermoe (spec {SPEC_VERSION})")
    fields = check_transformers_fields({k: data.pop(k) for k in TRANSFORMERS_FIELDS if k in data}, kind)
    cfg = HyperMoEConfig.from_dict(data)
    if kind == "model":
        from ref.model import check_model

        check_model(cfg)  # the model-only rules (n_heads | d_model), which a layer's config need not obey
    return cfg, kind, fields


def read_npy(fh, size: int) -> np.ndarray:
    """The array of a .npy stream `fh` of `size` bytes, never unpickled. Its header is read and checked against
    `size` before anything is allocated: numpy's own reader allocates whatever a (corrupted) header declares."""
    version = np.lib.format.read_magic(fh)  # ValueError unless the file starts with the .npy magic
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here (np.save writes 1.0)")
    try:
        shape, fortran_order, dtype = read_header(fh)
    except (SyntaxError, tokenize.TokenError) as err:  # numpy parses the header as a Python literal
        raise ValueError(f"unreadable .npy header ({type(err).__name__}: {err})") from None
    if dtype.hasobject:
        raise ValueError(f"holds Python objects ({dtype}), stored pickled: not loaded")
    declared, held = dtype.itemsize * math.prod(shape), size - fh.tell()
    if declared != held:
        raise ValueError(f"its header declares shape {shape} of {dtype} ({declared} bytes) but {held} bytes follow it")
    data = bytearray(fh.read(held))  # a bytearray: the array is writable, as np.load's
    if len(data) != held:
        raise ValueError(f"{len(data)} of the {held} bytes of its data could be read")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")


def read_npy_file(path: str | os.PathLike) -> np.ndarray:
    """The array of a .npy file (read_npy: never unpickled, its size checked against the header)."""
    with open(path, "rb") as fh:
        return read_npy(fh, os.fstat(fh.fileno()).st_size)


def read_npz(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of an .npz archive (np.savez), each member read by read_npy; ValueError naming the member
    (the caller names the file)."""
    try:
        with zipfile.ZipFile(file) as archive:
            arrays = {}
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if info.compress_type == zipfile.ZIP_STORED and info.file_size > os.path.getsize(file):
                    raise ValueError(f"member {name!r} claims {info.file_size} bytes, more than the whole archive")
                with archive.open(info) as member:
                    try:
                        arrays[name] = read_npy(member, info.file_size)
                    except ValueError as err:
                        raise ValueError(f"array {name!r}: {err}") from None
            return arrays
    except zipfile.BadZipFile as err:
        with open(file, "rb") as fh:
            if fh.read(6) == b"\x93NUMPY":
                raise ValueError("a single .npy array, not an .npz archive of named arrays") from None
        raise ValueError(str(err)) from None
    except (OSError, EOFError, NotImplementedError, RuntimeError, zlib.error) as err:  # zipfile: unsupported
        raise ValueError(f"{type(err).__name__}: {err}") from None  # compression, encrypted member, bad deflate data


# safetensors (https://github.com/huggingface/safetensors): 8 bytes little-endian header length n, n bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data, each
# tensor's bytes at data_offsets relative to the end of the header.
SAFETENSORS_DTYPES = {  # safetensors dtype → bytes per element
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
NUMPY_DTYPES = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")  # numpy has these
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors package refuses longer headers (MAX_HEADER_SIZE)


def safetensors_package():
    """The safetensors package, imported only for a .safetensors file."""
    try:
        import safetensors.numpy  # noqa: F401 (also makes safetensors.numpy an attribute)
        import safetensors
    except ImportError:
        raise ValueError("reading or writing .safetensors needs the 'safetensors' package (pip install safetensors); "
                         "weights.npz needs only numpy") from None
    return safetensors


def safetensors_header(file: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a .safetensors file, after checking that its header is well-formed and that
    every tensor's declared size fits the bytes the file holds (ValueError naming the tensor; the caller names
    the file). Nothing is allocated beyond the header, whose length is checked against the file's size first."""
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length of a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ValueError(f"its header claims {n} bytes, the file holds {size - 8} after the length")
        text = fh.read(n)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    data = size - 8 - n  # bytes after the header
    out, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r}: header entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        ints = lambda v: isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)  # noqa: E731
        if not ints(shape) or not ints(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r}: shape {shape!r} / data_offsets {offsets!r} are not lists of ints ≥ 0")
        begin, end = offsets
        declared = SAFETENSORS_DTYPES[dtype] * math.prod(shape)
        if not begin <= end <= data or end - begin != declared:
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} of {dtype} ({declared} bytes) at data_offsets "
                             f"[{begin}, {end}] does not fit the {data} data bytes of the file")
        out[name] = (dtype, tuple(shape))
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):  # the package's own rule: the tensors tile the data, no gap, no overlap
        if begin != covered:
            raise ValueError(f"data_offsets leave a gap or overlap at byte {covered} of the data")
        covered = end
    if covered != data:
        raise ValueError(f"the tensors cover {covered} of the {data} data bytes")
    return out


def read_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors file, read with the safetensors package's numpy API after
    safetensors_header's checks; ValueError naming the problem (the caller names the file)."""
    header = safetensors_header(file)
    unreadable = sorted({dtype for dtype, _ in header.values()} - set(NUMPY_DTYPES))
    if unreadable:
        raise ValueError(f"dtype {unreadable[0]} has no numpy equivalent")
    package = safetensors_package()
    try:
        return dict(package.numpy.load_file(str(file)))
    except (package.SafetensorError, OSError) as err:
        raise ValueError(f"{type(err).__name__}: {' '.join(str(err).split())}") from None


def load_dir(path: str | os.PathLike) -> tuple[HyperMoEConfig, dict[str, np.ndarray], str]:
    """(config, params, kind) of a saved model directory (weights.npz or weights.safetensors), every parameter
    checked against the config."""
    cfg, kind = load_config(path)
    found = [Path(path) / name for name in (WEIGHTS_FILE, SAFETENSORS_FILE) if (Path(path) / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{Path(path) / WEIGHTS_FILE}: no such file (nor {SAFETENSORS_FILE})")
    if len(found) > 1:
        raise ValueError(f"{Path(path)}: holds both {WEIGHTS_FILE} and {SAFETENSORS_FILE}; keep one")
    file = found[0]
    try:
        params = read_npz(file) if file.name == WEIGHTS_FILE else read_safetensors(file)
    except ValueError as err:
        what = ".npz" if file.name == WEIGHTS_FILE else ".safetensors"
        raise ValueError(f"{file}: not a readable {what} weights file ({err})") from None
    dtypes = {v.dtype for v in params.values()}
    if not params:
        raise ValueError(f"{file}: holds no arrays")
    if len(dtypes) != 1:
        raise ValueError(f"{file}: weights mix dtypes {sorted(map(str, dtypes))}")
    if next(iter(dtypes)) not in (np.float32, np.float64):
        raise ValueError(f"{file}: weights must be float32 or float64, got {next(iter(dtypes))}")
    from ref.params import check_finite_params, check_params

    try:
        check_params(params, expected_shapes(cfg, kind), next(iter(dtypes)))
    except ValueError as err:
        raise ValueError(f"{file} does not match {CONFIG_FILE}: {err}") from None
    try:
        check_finite_params(params)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    return cfg, params, kind
