"""Text generation with an exported HyperMoE language model on onnxruntime (the library of `hypermoe generate`).

`OrtDecoder` is the onnxruntime backend of hypermoe.generation's `Decoder` protocol over a with-past export
(`hypermoe export MODEL_DIR --with-past -o DIR`: one graph for prefill and decode, Hugging Face Optimum's and
onnxruntime-genai's names). The generation loop, sampling, padding and timings are hypermoe.generation's;
this module only runs the graph. `hypermoe generate` (export/cli.py) drives either backend: an export directory (or its .onnx)
runs on onnxruntime, a model directory (config.json kind "model") on torch with its KV cache (TorchDecoder).

Tokenizers (export/text.py, re-exported here): a Hugging Face tokenizer.json read by the `tokenizers` package
(optional extra `serve`): --tokenizer, else the one in MODEL's folder; without one, UTF-8 bytes as ids 0..255 (what
`hypermoe train` models on), only for a model whose vocabulary is the 256 bytes.

Axis legend: B sequences, S new positions of a step, P cached positions, H heads, c head width, V vocabulary.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np

from export.runtime import (
    ONNX_BFLOAT16, ONNX_FLOAT, ONNX_FLOAT16, ONNX_INT64, ONNX_TYPES, cuda_libraries,
    from_bfloat16_bits, open_session, ortvalue_bits,
)
from export import shared_buffer
from export.text import (  # noqa: F401 (re-exported: defined here before the split)
    BYTE_VOCAB, MAX_TOKENIZER_BYTES, TOKENIZER_FILE, ByteTokenizer, FileTokenizer, encode_prompt, model_tokenizer, parse_ids,
)
from hypermoe.generation import check_step

GENAI_CONFIG_FILE, DEFAULT_ONNX_FILE = "genai_config.json", "model.onnx"
MAX_CONFIG_BYTES = 1 << 20  # a genai_config.json is a few kB; a bigger one is not ours
_ITEMSIZE = {ONNX_FLOAT: 4, ONNX_FLOAT16: 2, ONNX_BFLOAT16: 2}
_HOST_DTYPE = {ONNX_FLOAT: np.float32, ONNX_FLOAT16: np.float16, ONNX_BFLOAT16: np.uint16}  # bfloat16 as its bits


# ---------------------------------------------------------------------------------------------
# Where the graph is: an export directory (genai_config.json names the file) or the .onnx itself
# ---------------------------------------------------------------------------------------------


def read_genai_config(directory: str | os.PathLike) -> dict:
    """The parsed genai_config.json of an export directory ({} when there is none). A user's file: size, JSON
    and the fields read here are checked, each failure one line."""
    file = Path(directory) / GENAI_CONFIG_FILE
    if not file.exists():
        return {}
    if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{file}: not a regular file of at most {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("decoder", {}), dict):
        raise ValueError(f"{file}: expected an object with a 'model' object (onnxruntime-genai's format)")
    filename = model.get("decoder", {}).get("filename", DEFAULT_ONNX_FILE)
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        raise ValueError(f"{file}: model.decoder.filename must be a file name in that directory, got {filename!r}")
    for key in ("eos_token_id", "pad_token_id"):
        value = model.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
            raise ValueError(f"{file}: model.{key} must be a token id ≥ 0 (or a list of them), got {value!r}")
    return config


def onnx_file(path: str | os.PathLike) -> Path:
    """The .onnx file of `path`: the file itself, or in an export directory the file its genai_config.json names
    (default model.onnx)."""
    path = Path(path)
    if path.is_dir():
        model = read_genai_config(path).get("model", {})
        path = path / model.get("decoder", {}).get("filename", DEFAULT_ONNX_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def export_token_ids(path: str | os.PathLike) -> tuple[tuple[int, ...], int]:
    """(eos ids, pad id) the genai_config.json of an export directory declares (for an .onnx file: the one
    beside it, when it names that file); ((), 0) without one."""
    path = Path(path)
    model = read_genai_config(path.parent if path.is_file() else path).get("model", {})
    if path.is_file() and model.get("decoder", {}).get("filename", DEFAULT_ONNX_FILE) != path.name:
        model = {}
    eos = model.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    return eos, model.get("pad_token_id", 0)


# ---------------------------------------------------------------------------------------------
# The onnxruntime decoder
# ---------------------------------------------------------------------------------------------


class OrtDecoder:
    """hypermoe.generation's Decoder over a with-past export on onnxruntime, with IOBinding.

    decoder = OrtDecoder("export_dir")        # or its model.onnx; provider "auto" | "cuda" | "cpu"
    result = hypermoe.generation.generate(decoder, [[1, 2, 3]], max_new_tokens=16)

    The KV cache never leaves the provider's device: every `present.{i}.key/value` output is bound to device
    memory (onnxruntime allocates it, from its arena on CUDA) and bound, as that same OrtValue, as the next
    step's `past_key_values.{i}.key/value` input. Per step only the new ids, positions and the attention mask go
    to the device (B·(2S + P + S) int64s, chosen on the host by the sampler), and only the last position's
    logits (B, V) come back. step(..., all_positions=True) returns every new position's logits (B, S, V) instead
    ((B, 1, V), the last position's, from an export with logits "last", whose graph computes no others):
    export/verify.py checks the graph through this same decoder (full passes, prefill + decode steps, greedy
    tokens), so what verify passes is what `hypermoe generate` runs. cache_shapes: the present tensors' shapes.

    Preallocated in begin(), per batch: the empty past (B, H, 0, c) of the first step; the decode steps'
    input_ids and position_ids (B, 1) and logits (B, 1, V) device buffers (fixed shapes, refilled in place,
    stable addresses). Not preallocated: the presents (B, H, P + S, c), new each step (the standard graph concatenates
    past and new keys; `--attention contrib` exports instead get one (B, H, max_length, c) key and value buffer per
    block in begin(), bound as past AND present, written in place: export/shared_buffer.py); the attention mask
    (B, P + S), growing by one each step; and the prefill's (B, S) inputs and (B, S, V) logits, used once.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "auto", *, device_id: int = 0,
                 threads: int | None = None) -> None:
        from export.exporter import metadata_config, past_names, read_metadata

        path = onnx_file(path)
        meta = read_metadata(path)
        if meta.get("with_past") != "1":
            raise ValueError(f"{path}: not a with-past export (it takes no past key/values, so it cannot decode one "
                             "token at a time); export one with `hypermoe export MODEL_DIR --with-past -o DIR`")
        self.config = metadata_config(meta)
        self.logits = meta.get("logits", "all")  # "last": the graph computes logits (B, 1, V) only; "all": (B, S, V)
        self.path = path
        self.session, self.provider, self.notice = open_session(path, provider, device_id=device_id, threads=threads)
        self.device = ("cuda", device_id) if self.provider == "cuda" else ("cpu", 0)
        inputs, outputs = past_names(self.config.n_layers)
        have_in = {i.name: i for i in self.session.get_inputs()}
        have_out = {o.name: o for o in self.session.get_outputs()}
        if sorted(have_in) != sorted(inputs) or sorted(have_out) != sorted(outputs):
            raise ValueError(f"{path}: inputs/outputs {sorted(have_in)} → {sorted(have_out)} are not those of a "
                             f"with-past export of {self.config.n_layers} blocks ({inputs} → {outputs})")
        self.past_inputs, self.present_outputs = inputs[3:], outputs[1:]  # past_key_values.* ↔ present.*, same order
        self.kv_type = ONNX_TYPES.get(have_in[self.past_inputs[0]].type)
        self.logits_type = ONNX_TYPES.get(have_out["logits"].type)
        if self.kv_type not in _ITEMSIZE or self.logits_type not in _ITEMSIZE:
            raise ValueError(f"{path}: unsupported past/logits types {have_in[self.past_inputs[0]].type}, "
                             f"{have_out['logits'].type}")
        self._binding = self.session.io_binding()
        self._batch = self._max_length = self._seen = 0  # begin() sets them; step() before it is refused
        self.shared_buffer = shared_buffer.is_shared(meta)  # past and present one max_length buffer

    def begin(self, batch_size: int, max_length: int) -> None:
        import onnxruntime as ort

        cfg = self.config
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= cfg.max_seq_len:
            raise ValueError(f"max_length must be in [1, max_seq_len = {cfg.max_seq_len}], got {max_length!r}")
        B, H, c = batch_size, cfg.n_heads, cfg.d_model // cfg.n_heads
        device, device_id = self.device
        empty = ort.OrtValue.ortvalue_from_shape_and_type([B, H, 0, c], self.kv_type, device, device_id)  # (B, H, 0, c)
        self._past = {name: empty for name in self.past_inputs}
        if self.shared_buffer:  # (B, H, max_length, c) per past input, bound as past and present
            self._past = shared_buffer.buffers(self.past_inputs, (B, H, max_length, c), _HOST_DTYPE[self.kv_type], *self.device)
        self._step_ids = ort.OrtValue.ortvalue_from_shape_and_type([B, 1], ONNX_INT64, device, device_id)  # (B, 1)
        self._step_positions = ort.OrtValue.ortvalue_from_shape_and_type([B, 1], ONNX_INT64, device, device_id)
        self._step_logits = ort.OrtValue.ortvalue_from_shape_and_type([B, 1, cfg.vocab_size], self.logits_type,
                                                                      device, device_id)  # (B, 1, V)
        self._batch, self._max_length, self._seen = B, max_length, 0

    @property
    def cache_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the cache the next step reads: the last presents (B, H, P + S, c), the empty past, or the buffers."""
        return [tuple(value.shape()) for value in self._past.values()] if self._batch else []

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, *,
             all_positions: bool = False) -> np.ndarray:
        """S new positions after the cached ones → the last position's logits (B, V) float32, or with
        all_positions=True every position's the graph computes: (B, S, V) float32, (B, 1, V) if self.logits is
        "last"."""
        import onnxruntime as ort

        ids, mask, positions = check_step(self.config, input_ids, attention_mask, position_ids, batch=self._batch,
                                          past=self._seen, max_length=self._max_length)
        B, S = ids.shape
        pad = None  # a shared buffer's prefill goes right-padded (shared_buffer.align_prefill); later steps checked
        if self.shared_buffer and self._seen == 0:
            ids, mask, positions, pad = shared_buffer.align_prefill(ids, mask, positions)
        elif self.shared_buffer:
            shared_buffer.check_later_step(mask, self._real, self._seen, S)
        real = mask.sum(axis=1)  # (B,) real tokens seen after this step
        device, device_id = self.device
        io = self._binding
        if S == 1:  # a decode step: the preallocated buffers, refilled in place
            self._step_ids.update_inplace(ids)
            self._step_positions.update_inplace(positions)
            io.bind_ortvalue_input("input_ids", self._step_ids)
            io.bind_ortvalue_input("position_ids", self._step_positions)
        else:
            io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, device, device_id))
            io.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(positions, device, device_id))
        io.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask, device, device_id))
        for name, value in self._past.items():
            io.bind_ortvalue_input(name, value)  # the previous step's present, still on the device
        io.clear_binding_outputs()
        if S == 1:
            io.bind_ortvalue_output("logits", self._step_logits)
        else:
            io.bind_output("logits", device, device_id)
        for name, past in zip(self.present_outputs, self._past.values()):
            if self.shared_buffer:
                io.bind_ortvalue_output(name, past)  # the same buffer: written in place
            else:
                io.bind_output(name, device, device_id)  # onnxruntime allocates (B, H, P + S, c) on the device
        run = None
        if S > 1 and device == "cpu":  # a prompt's activations (B·S tokens) are not kept in the CPU arena for the
            run = ort.RunOptions()  # one-token steps after it (seen: 7 sessions holding B 8 × 991-token prefill
            run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")  # peaks ran out of 24 GB)
        try:
            self.session.run_with_iobinding(io, run)
        except Exception as err:  # onnxruntime's own Fail/InvalidArgument classes
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"onnxruntime run failed at {self._seen} cached + {S} new positions: {message}") from None
        io.synchronize_outputs()
        values = io.get_outputs()  # in binding order: logits, then the presents
        self._past = self._past if self.shared_buffer else dict(zip(self.past_inputs, values[1:]))
        self._seen, self._real = self._seen + S, real
        if pad is not None and pad.any():  # the prefill's rows back in the caller's left-padded layout
            logits = shared_buffer.restore(_all_positions(values[0], self.logits_type), pad)  # (B, S, V)
            return logits if all_positions else logits[:, -1]
        if all_positions:
            return _all_positions(values[0], self.logits_type)  # (B, S, V) float32
        return _last_position(values[0], self.logits_type)  # (B, V) float32


def _all_positions(value, onnx_type: int) -> np.ndarray:
    """logits (B, S, V) OrtValue on the provider's device → a float32 copy on the host (the decode steps'
    logits buffer is refilled in place by the next step, so never a view of it)."""
    if onnx_type == ONNX_BFLOAT16:
        return from_bfloat16_bits(ortvalue_bits(value))
    return np.array(value.numpy(), dtype=np.float32)


def _last_position(value, onnx_type: int) -> np.ndarray:
    """logits (B, S, V) OrtValue on the provider's device → the last position's (B, V) float32 on the host:
    one strided copy of B rows of V (memmove on the CPU, cudaMemcpy2D on the GPU), never the whole (B, S, V)."""
    B, S, V = value.shape()
    size = _ITEMSIZE[onnx_type]
    host = np.empty((B, V), dtype=_HOST_DTYPE[onnx_type])  # (B, V)
    first = value.data_ptr() + (S - 1) * V * size  # row b's last position starts at first + b·S·V·size
    if value.device_name().lower() == "cpu":
        for b in range(B):
            ctypes.memmove(host[b].ctypes.data, first + b * S * V * size, V * size)
    else:
        cudart = ctypes.CDLL(cuda_libraries()[0])
        device_to_host = 2  # cudaMemcpyDeviceToHost
        status = cudart.cudaMemcpy2D(ctypes.c_void_p(host.ctypes.data), ctypes.c_size_t(V * size),
                                     ctypes.c_void_p(first), ctypes.c_size_t(S * V * size),
                                     ctypes.c_size_t(V * size), ctypes.c_size_t(B), device_to_host)
        if status != 0:
            raise ValueError(f"cudaMemcpy2D of the last position's logits to the host failed (error {status})")
    return from_bfloat16_bits(host) if onnx_type == ONNX_BFLOAT16 else host.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Loading a backend
# ---------------------------------------------------------------------------------------------


def load_decoder(model: str | os.PathLike, provider: str = "auto", *, threads: int | None = None):
    """(decoder, config, backend description, notice) for MODEL: a model directory (config.json kind "model")
    → hypermoe.model.TorchDecoder with its KV cache; an export directory or .onnx → OrtDecoder."""
    from ref.io import CONFIG_FILE, read_config

    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (MODEL is a with-past export directory, its "
                                ".onnx, or a model directory)")
    if path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / GENAI_CONFIG_FILE).is_file():  # an export
        cfg, kind = read_config(path / CONFIG_FILE)  # folder holds genai_config.json next to Optimum's config.json
        if kind != "model":
            raise ValueError(f"{path}: a saved {kind}, not a language model (kind 'model'): nothing to generate with")
        if provider == "cuda":
            raise ValueError("--provider cuda applies to onnxruntime; a model directory runs on torch (CPU)")
        import torch

        from hypermoe.model import HyperMoETransformer, TorchDecoder

        if threads:
            torch.set_num_threads(threads)
        return (TorchDecoder(HyperMoETransformer.from_dir(path).eval(), use_cache=True), cfg,
                f"torch {torch.__version__} CPU, KV cache", "")
    decoder = OrtDecoder(path, provider, threads=threads)
    import onnxruntime as ort

    return decoder, decoder.config, f"onnxruntime {ort.__version__} {decoder.provider.upper()}, IOBinding", decoder.notice
