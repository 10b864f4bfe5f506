"""Reading a checkpoint file into a state dict of NumPy arrays, without executing pickled code: torch
.bin/.pt (torch.load(weights_only=True)), .safetensors (header checked) and .npz (allow_pickle=False)."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import ref
import ref.io


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat {name: array} from a torch checkpoint (.bin/.pt/...: torch.load(weights_only=True)), a .safetensors
    file (Hugging Face's model.safetensors) or a .npz.

    A checkpoint that wraps the state dict as {"state_dict": ...} or {"model": ...} is unwrapped.
    float16 / bfloat16 tensors become float32 (numpy has no bfloat16); the rest keep their dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = file_kind(path)
    if kind not in ("zip", "pickle", "safetensors"):
        raise ValueError(f"{path}: {kind}; convert reads torch checkpoints (.bin, .pt), .safetensors files and .npz "
                         "archives of named arrays")
    if kind == "safetensors":
        return tensors_to_arrays(path, load_safetensors(path))
    if path.suffix == ".npz" or kind == "zip" and _npy_members_only(path):
        try:
            return ref.io.read_npz(path)  # never unpickles; sizes checked against each header before allocating
        except ValueError as err:
            raise ValueError(f"{path}: not a readable .npz state dict ({err})") from None
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ...": the error below says it better
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long advice; keep its one line that names the offending object
        detail = str(err).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        detail = " ".join(detail.split()).split(". ")[0] or "unpickling refused"
        found = "global" in detail.lower() or pickle_global(path)
        if not found:  # an opcode torch's safe unpickler lacks, in a pickle that names no class or function
            raise ValueError(f"{path}: a pickle that is not a torch checkpoint (torch.load weights_only=True: "
                             f"{detail})") from None
        if isinstance(found, str):
            detail += f"; the pickle references {found}"
        raise ValueError(
            f"{path}: refused: the file holds objects other than tensors and plain containers, and loading it "
            f"would execute pickled code (torch.load weights_only=True: {detail})") from None
    except Exception as err:  # torch raises KeyError, RuntimeError, EOFError, ... on files that are no checkpoint
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    return tensors_to_arrays(path, obj)


def load_safetensors(path: Path) -> dict:
    """{name: torch tensor} of a .safetensors file (Hugging Face's model.safetensors): the header is checked
    against the file's size first (ref.io.safetensors_header), then the safetensors package reads it (its torch
    API, which also reads bfloat16; no pickle is involved in the format)."""
    try:
        ref.io.safetensors_header(path)
    except ValueError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    package = ref.io.safetensors_package()  # ValueError when the package is missing
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except (package.SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())})") from None


def tensors_to_arrays(path: Path, obj) -> dict[str, np.ndarray]:
    """The state dict `obj` (a mapping from names to torch tensors) as {name: array}."""
    import torch

    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: not a state dict (a non-empty mapping from names to tensors), got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: not a state dict: entry {name!r} is a {type(value).__name__}, not a tensor")
    out = {}
    for name, value in obj.items():
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        try:
            out[name] = value.numpy()
        except (TypeError, RuntimeError) as err:  # sparse, quantized, meta tensors, ...
            raise ValueError(f"{path}: tensor {name!r} cannot be read as an array ({err})") from None
    return out


def file_kind(path: Path) -> str:
    """"zip" (torch's checkpoint format, .npz), "pickle" (torch's legacy format) or "safetensors" from the first
    bytes; anything else is described (empty, a .npy array, or its size and first bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, pickle protocol 2–5
        return "pickle"
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array, not a state dict of named arrays"
    if len(head) > 8 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    return f"unrecognised content ({path.stat().st_size} bytes, starting {head[:8].hex(' ')})"


def pickle_global(path: Path) -> str:
    """The first class or function a pickle file names ("" if none), read with pickletools, which only
    decodes opcodes and never imports or calls anything."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a corrupt pickle (any decoding error, a huge declared length): no name to report
        pass
    return ""


def _npy_members_only(path: Path) -> bool:
    """An .npz under another name (a zip of .npy files; torch's zip checkpoints hold data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError):
        return False  # not a readable zip (a flipped version field: NotImplementedError); torch.load says why
    return bool(names) and all(name.endswith(".npy") for name in names)
