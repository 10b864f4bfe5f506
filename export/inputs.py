"""The input array of `hypermoe run`: a .npy file read without unpickling and checked against the model's input,
or random token ids (a model) or hidden states (a layer or stack) of --batch × --seq. Heavy imports (onnxruntime)
happen inside the function, as in export/cli.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_input(args, runner) -> np.ndarray:
    """The input of `hypermoe run` for `runner` (an export.runtime.OnnxRunner): args.input (a .npy file, read
    without unpickling, checked against the model's input), else args.batch × args.seq random token ids (a model)
    or N(0, 1) hidden states (float32), seeded by args.seed."""
    from export.runtime import ONNX_INT64

    if args.input is not None:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        with open(path, "rb") as fh:
            head = fh.read(8)
        if not head.startswith(b"\x93NUMPY"):  # np.load would try it as a pickle, or an .npz archive
            raise ValueError(f"{path}: not a .npy file (starts with {head.hex(' ') or 'nothing: empty file'}; "
                             "a .npy file starts with 93 4e 55 4d 50 59, np.save writes one)")
        from ref.io import read_npy_file

        try:
            x = read_npy_file(path)  # never unpickles; the header's size is checked against the file before allocating
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: not a readable .npy array ({err})") from None
        try:
            runner.check_input(x)  # dtype and shape against the model's input, before anything runs
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return x
    if args.batch < 1 or args.seq < 0:
        raise ValueError(f"--batch must be ≥ 1 and --seq ≥ 0, got {args.batch} and {args.seq}")
    rng = np.random.default_rng(args.seed)
    if runner.input_type == ONNX_INT64:  # a model: token ids
        from ref import HyperMoEConfig

        if "hypermoe.config" not in runner.metadata:
            raise ValueError("the model takes token ids but records no config (vocabulary size); pass --input")
        cfg = HyperMoEConfig.from_json(runner.metadata["hypermoe.config"])
        if not 1 <= args.seq <= cfg.max_seq_len:
            raise ValueError(f"--seq must be in [1, max_seq_len={cfg.max_seq_len}] for this model, got {args.seq}")
        return rng.integers(0, cfg.vocab_size, (args.batch, args.seq))
    d = runner.input.shape[-1]
    if not isinstance(d, int):
        raise ValueError("the model's last input dim is not fixed; pass --input")
    return rng.standard_normal((args.batch, args.seq, d)).astype(np.float32)


__all__ = ["run_input"]
