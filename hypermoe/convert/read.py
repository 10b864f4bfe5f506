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
    if path.is_dir():  # a Hugging Face model folder, say: name the file in it
        inside = [name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        raise ValueError(f"{path} is a directory: convert reads one checkpoint file"
                         + (f" such as {path / inside[0]}" if inside else " (.safetensors, .bin, .pt or .npz)"))
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
    except pickle.UnpicklingError as err:  # torch's safe unpickler refused the pickle (the type is stable, the text not)
        # torch's message is long advice around one line that names the offending object: "WeightsUnpickler error:
        # Unsupported global: …" (≤ 2.12, and 2.13 for a class) or its own paragraph ("Trying to load unsupported
        # GLOBAL posix.system whose module posix is blocked.", 2.13)
        text = str(err).partition("WeightsUnpickler error:")[2] or str(err)
        paragraphs = [" ".join(part.split()) for part in text.partition("Check the documentation")[0].split("\n\n")]
        paragraphs = [part for part in paragraphs if part and not part.startswith("Weights only load failed")]
        detail = paragraphs[0].split(". ")[0].rstrip(".") if paragraphs else "unpickling refused"
        # refused because the pickle names a class or function: decided from the file, torch's text as a fallback
        found = pickle_global(path) or "global" in detail.lower()
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
    """The first class or function a pickle file names ("" if none) besides those of torch's own checkpoint format
    (torch.*, collections.OrderedDict), read with pickletools, which only decodes opcodes and never imports or
    calls anything. A zip checkpoint (torch.save's format): its data.pkl."""
    import pickletools

    def first_global(fh) -> str:
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(fh):
            name = ""
            if op.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL":
                name = ".".join(strings[-2:])
            elif isinstance(arg, str):
                strings.append(arg)
            if name and not name.startswith(("torch.", "collections.OrderedDict")):
                return name
        return ""

    try:
        with open(path, "rb") as fh:
            if not zipfile.is_zipfile(fh):
                fh.seek(0)
                return first_global(fh)
            with zipfile.ZipFile(fh) as archive:
                pkl = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
                if not pkl:
                    return ""
                with archive.open(pkl[0]) as member:
                    return first_global(member)
    except Exception:  # a corrupt pickle or zip (any decoding error, a huge declared length): no name to report
        return ""


def _npy_members_only(path: Path) -> bool:
    """An .npz under another name (a zip of .npy files; torch's zip checkpoints hold data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError):
        return False  # not a readable zip (a flipped version field: NotImplementedError); torch.load says why
    return bool(names) and all(name.endswith(".npy") for name in names)
