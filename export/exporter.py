"""Export a HyperMoE layer (or a stack of layers sharing one hypernetwork) to ONNX with the dynamo
exporter, stamp the config and spec version into the model metadata, and check the file.

    hidden_states (batch, seq, d)  →  output (batch, seq, d)
                                      [selected_experts (batch, seq, k) int64, gates (batch, seq, k) float32]

A language model (kind "model") exports as input_ids (batch, seq) → logits (batch, seq, V), or with past
key/values (`with_past`) as a directory of model.onnx + genai_config.json: one graph for prefill and decode,
Hugging Face Optimum's names (see export.graph.ExportModelWithPast and `past_names`).

Never the legacy TorchScript exporter: it silently bakes routing decisions into the graph (onnx-notes §2).
"""

from __future__ import annotations

import json
import shutil
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

import ref
from export.past import PAST_SAMPLE, name_total_length, past_names, past_sample  # noqa: F401 (past_names re-exported)
from ref import HyperMoEConfig

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_OPSET = 20  # ≥ 18 (torchlib's own opset); 20 has Gelu, so the activations stay single nodes
IR_VERSION = 10  # what torch writes; onnxruntime 1.31 rejects onnx 1.23's default of 14
EXTERNAL_DATA_BYTES = 2 * 2**30  # protobuf's 2 GB limit on one file
INPUT_NAME = "hidden_states"
OUTPUT_NAMES = ("output", "selected_experts", "gates")
MODEL_INPUT, MODEL_OUTPUT = "input_ids", "logits"  # kind "model": (batch, seq) int64 → (batch, seq, V)
META_PREFIX = "hypermoe."
PAST_MODEL_FILE, GENAI_CONFIG_FILE = "model.onnx", "genai_config.json"  # a with-past export's directory
HF_CONFIG_FILE, TOKENIZER_FILE = "config.json", "tokenizer.json"  # ... with Optimum's config.json and the tokenizer
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PAST_ENTRIES = (PAST_MODEL_FILE, PAST_MODEL_FILE + ".data", GENAI_CONFIG_FILE, HF_CONFIG_FILE, TOKENIZER_FILE,
                TOKENIZER_CONFIG_FILE)  # what --force may replace there


class ExportResult(NamedTuple):
    path: Path
    kind: str  # "layer" | "stack" | "model"
    flavour: str  # "portable" | "fused"
    hyper_form: str  # "sets" | "factored" | "none"
    dtype: str
    seconds: float
    bytes: int
    external_data: bool
    notes: tuple[str, ...]  # warnings worth printing (e.g. the fused flavour's tie rule)
    quantize: str = ""  # "" or " int4 weights (block 32, accuracy level 0)" (export.quant_ops.describe)


def default_model(seed: int = 0) -> tuple[HyperMoEConfig, dict[str, np.ndarray], str]:
    """The built-in default: ref.HyperMoEConfig() (official sizes), ref.init(seed) parameters, one layer."""
    cfg = HyperMoEConfig()
    return cfg, ref.init(cfg, seed=seed), "layer"


def load_source(source: str | os.PathLike | None, seed: int = 0) -> tuple[HyperMoEConfig, dict[str, np.ndarray], str, str]:
    """(cfg, params, kind, source id) of a saved model directory, or of the built-in default when None."""
    if source is None:
        cfg, params, kind = default_model(seed)
        return cfg, params, kind, f"default:seed={seed}"
    from ref import io

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory (expected config.json + weights.npz)")
    cfg, params, kind = io.load_dir(path)
    return cfg, params, kind, str(path.resolve())


def model_folder_extras(source: str | os.PathLike | None, eos_token_id: int | None, *,
                        with_past: bool) -> tuple[Path | None, int | None]:
    """(the model directory's tokenizer.json or None, the EOS id: `eos_token_id` if given, else the one its config.json
    declares, if one int) for a with-past export of `source`; (None, eos_token_id) for another export."""
    if source is None or not with_past:
        return None, eos_token_id
    from ref import io

    tokenizer = Path(source) / TOKENIZER_FILE
    if eos_token_id is None:
        declared = io.read_config_fields(source)[2].get("eos_token_id")
        eos_token_id = declared if isinstance(declared, int) else None
    return (tokenizer if tokenizer.is_file() else None), eos_token_id


def supported_opsets() -> range:
    """The opsets the installed torch exporter supports: from torchlib's own (18) to torch's ONNX_MAX_OPSET."""
    from torch.onnx import _constants  # private, but where torch states the newest opset it targets

    return range(18, _constants.ONNX_MAX_OPSET + 1)


def check_opset(opset: int) -> None:
    opsets = supported_opsets()
    if not isinstance(opset, int) or isinstance(opset, bool) or opset not in opsets:
        raise ValueError(f"opset must be an int in [{opsets[0]}, {opsets[-1]}] (what the installed torch exporter "
                         f"supports), got {opset!r}")


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def build_module(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], kind: str, *, layer_index: int = 0,
                 dtype: str = "float32", flavour: str = "portable", hyper_form: str = "auto",
                 routing_outputs: bool = False, with_past: bool = False, attention: str = "standard",
                 logits: str = "all"):
    """The torch module that is exported: export.graph.ExportLayer (ExportStack for kind "stack", ExportModel
    for kind "model", ExportModelWithPast with `with_past`, `attention` and its logits "last" or "all").
    hypermoe.layer.HyperMoELayer itself is not exportable (it refuses torch.export)."""
    from export.graph import ExportLayer, ExportModel, ExportModelWithPast, ExportStack

    tdtype = _torch_dtype(dtype)
    ref.check_finite_params(params)  # a NaN weight would export fine and make every later run fail
    if with_past:
        if kind != "model":
            raise ValueError(f"with past key/values only a language model (kind 'model') can be exported; a saved "
                             f"{kind} has no attention, so nothing to cache")
        if routing_outputs:
            raise ValueError("routing outputs (selected_experts, gates) are only exported for a single layer")
        return ExportModelWithPast(cfg, params, dtype=tdtype, flavour=flavour, hyper_form=hyper_form, attention=attention,
                                   logits=logits)
    if logits != "all":
        raise ValueError(f"logits {logits!r} needs with_past (--with-past): a plain export computes every position's")
    if kind == "layer":
        return ExportLayer(cfg, params, layer_index=layer_index, dtype=tdtype, flavour=flavour,
                           hyper_form=hyper_form, routing_outputs=routing_outputs)
    if kind == "stack":
        if routing_outputs:
            raise ValueError("routing outputs (selected_experts, gates) are only exported for a single layer")
        layers = [ExportLayer(cfg, ref.layer_params(params, i), layer_index=i, dtype=tdtype, flavour=flavour,
                              hyper_form=hyper_form) for i in ref.stack_layers(cfg)]
        return ExportStack(layers)
    if kind == "model":
        if routing_outputs:
            raise ValueError("routing outputs (selected_experts, gates) are only exported for a single layer")
        return ExportModel(cfg, params, dtype=tdtype, flavour=flavour, hyper_form=hyper_form)
    raise ValueError(f"cannot export a saved model of kind {kind!r}; expected layer, stack or model")


def export_model(out_path: str | os.PathLike, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *,
                 kind: str = "layer", layer_index: int = 0, dtype: str = "float32", flavour: str = "portable",
                 hyper_form: str = "auto", routing_outputs: bool = False, opset: int = DEFAULT_OPSET,
                 source: str = "", force: bool = False, with_past: bool = False, eos_token_id: int | None = None,
                 pad_token_id: int = 0, tokenizer: str | os.PathLike | None = None, quantize: str | None = None,
                 block_size: int = 32, accuracy_level: int = 0, attention: str = "standard",
                 logits: str | None = None) -> ExportResult:
    """Export, add metadata, save (external data above 2 GB), run the checker and strict shape inference.

    Atomic (ref.files): `out_path` and `opset` are checked before any work (an existing file is refused unless
    `force`); the file (and its .data) is written under a temporary name next to it, checked, then renamed in.
    On any failure or interrupt nothing new is left at `out_path` and an existing file is untouched.

    `with_past` (kind "model"): `out_path` is a directory, written whole and atomically, holding model.onnx
    (+ model.onnx.data above 2 GB), genai_config.json (eos_token_id, pad_token_id and context length
    max_seq_len go there), config.json (export.genai.optimum_config) and a copy of `tokenizer` (a tokenizer.json,
    e.g. the model directory's) as tokenizer.json with a tokenizer_config.json, for onnxruntime-genai's og.Tokenizer;
    ExportResult.path is the directory. `attention` "contrib" (with_past only): onnxruntime's GroupQueryAttention
    with past and present one max_length buffer (export/attention_op.py; genai's past_present_share_buffer).
    `logits`: with past "last" (default: each row's last position, (B, 1, V)) or "all" ((B, S, V)); without, "all"
    only. Stored in the metadata as hypermoe.logits.

    `quantize` "int8" | "int4": block-wise weights (`block_size`) through MatMulNBits / QMoE (export/quant_ops.py;
    `accuracy_level` 4: int8 activations in the kernels, faster, verify reports only)."""
    from ref.files import atomic_output
    from export.quant_ops import check_request

    check_opset(opset)
    quant = {"quantize": quantize, "block_size": block_size, "accuracy_level": accuracy_level}
    check_request(cfg, flavour=flavour, dtype=dtype, **quant)  # a bad combination fails before any work
    from export.attention_op import check_attention

    check_attention(attention, with_past=with_past, cfg=cfg, dtype=dtype)
    logits = logits if logits is not None else "last" if with_past else "all"
    if with_past:
        genai = _genai_config(cfg, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              share_buffer=attention == "contrib")  # bad ids: before the work
        from export.genai import optimum_config, tokenizer_config

        hf_config = optimum_config(cfg, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        if tokenizer is not None and not Path(tokenizer).is_file():
            raise FileNotFoundError(f"{tokenizer}: no such file (the tokenizer.json to copy into the export)")
        with atomic_output(out_path, force=force, directory=True, entries=PAST_ENTRIES) as tmp:
            result = _export_to(tmp / PAST_MODEL_FILE, cfg, params, kind=kind, layer_index=layer_index, dtype=dtype,
                                flavour=flavour, hyper_form=hyper_form, routing_outputs=routing_outputs, opset=opset,
                                source=source, name=Path(out_path) / PAST_MODEL_FILE, with_past=True,
                                attention=attention, logits=logits, **quant)
            (tmp / GENAI_CONFIG_FILE).write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")
            (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
            if tokenizer is not None:
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
                (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(cfg), indent=2) + "\n")
        return result._replace(path=Path(out_path))
    with atomic_output(out_path, force=force) as tmp:
        result = _export_to(tmp, cfg, params, kind=kind, layer_index=layer_index, dtype=dtype, flavour=flavour,
                            hyper_form=hyper_form, routing_outputs=routing_outputs, opset=opset, source=source,
                            name=Path(out_path), logits=logits, **quant)
    return result._replace(path=Path(out_path))


def _genai_config(cfg: HyperMoEConfig, *, eos_token_id: int | None, pad_token_id: int, share_buffer: bool) -> dict:
    """genai_config.json's content (export.genai.genai_config, which checks the ids)."""
    from export.genai import genai_config

    return genai_config(cfg, filename=PAST_MODEL_FILE, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                        context_length=cfg.max_seq_len, past_present_share_buffer=share_buffer)


def _export_to(out_path: Path, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], *, kind: str, layer_index: int,
               dtype: str, flavour: str, hyper_form: str, routing_outputs: bool, opset: int, source: str,
               name: Path, with_past: bool = False, quantize: str | None = None, block_size: int = 32,
               accuracy_level: int = 0, attention: str = "standard", logits: str = "all") -> ExportResult:
    """export_model's work, into a fresh staging folder (`out_path` has the final file name; messages say `name`)."""
    import onnx
    import torch

    from export import attention_op, moe_op, quant_ops

    start = time.perf_counter()
    module = build_module(cfg, params, kind, layer_index=layer_index, dtype=dtype, flavour=flavour,
                          hyper_form=hyper_form, routing_outputs=routing_outputs, with_past=with_past,
                          attention=attention, logits=logits).eval()
    module, quant_table, quant_props = quant_ops.prepare(module, cfg, flavour=flavour, dtype=dtype, quantize=quantize,
                                                         block_size=block_size, accuracy_level=accuracy_level)
    hyper = module.hyper_form
    # a sample of 2 × 3 tokens: neither dim may be 0 or 1, which torch.export would specialise on
    batch = torch.export.Dim("batch")
    if with_past:
        samples, input_names, outputs, dynamic_shapes = past_sample(cfg, _torch_dtype(dtype), attention)
    elif kind == "model":  # token ids → logits; positions are learned up to max_seq_len
        if cfg.max_seq_len < 3:
            raise ValueError(f"config field 'max_seq_len' ({cfg.max_seq_len}) must be ≥ 3 to export a model")
        sample = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 3)))
        seq = torch.export.Dim("seq", max=cfg.max_seq_len)
        input_name, outputs = MODEL_INPUT, [MODEL_OUTPUT]
    else:
        sample = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, cfg.d_model))).to(_torch_dtype(dtype))
        seq = torch.export.Dim("seq")
        input_name, outputs = INPUT_NAME, list(OUTPUT_NAMES if routing_outputs else OUTPUT_NAMES[:1])
    if not with_past:
        samples, input_names, dynamic_shapes = (sample,), [input_name], ({0: batch, 1: seq},)
    table = {**(moe_op.translation_table() if flavour == "fused" else {}), **quant_table,
             **(attention_op.translation_table() if attention == "contrib" else {})} or None
    # the exporter logs "torchvision is not installed. Skipping torchvision::nms" and the like
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        try:
            program = torch.onnx.export(
                module, samples, dynamo=True, input_names=input_names, output_names=outputs, opset_version=opset,
                dynamic_shapes=dynamic_shapes, custom_translation_table=table,
                optimize=True, verbose=False, report=False,
            )
        except Exception as err:  # torch.onnx wraps the module's own errors in TorchExportError
            # Ctrl-C or SIGTERM (hypermoe.cli raises a KeyboardInterrupt from the handler) during the exporter's
            # own lazy imports of torch._dynamo can leave a module half initialised and surface as torch's
            # AttributeError: an interrupt anywhere in the chain is an interrupt, not a failed export
            link, seen = err, set()
            while link is not None and id(link) not in seen:
                seen.add(id(link))
                if isinstance(link, KeyboardInterrupt):
                    raise link from None
                link = link.__cause__ or link.__context__
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise ValueError(f"torch.onnx.export failed ({type(cause).__name__}): {message}") from err
    model = program.model_proto
    model.ir_version = IR_VERSION
    if with_past:
        name_total_length(model)
    notes = [moe_op.TIE_NOTE] if flavour == "fused" else []
    props = {
        "config": cfg.to_json().strip(), "spec_version": ref.SPEC_VERSION, "kind": kind,
        "layer_index": str(layer_index), "flavour": flavour, "hyper_form": hyper, "dtype": dtype,
        "outputs": ",".join(outputs), "source": source, "notes": json.dumps(notes),
    }
    if with_past:
        props["with_past"], props["logits"] = "1", logits  # logits: "last" (B, 1, V) or "all" (B, S, V)
        props["attention"] = attention  # "contrib": past and present share one max_length buffer
    props.update(quant_props)  # quantize, bits, block_size, accuracy_level (verify reads them)
    onnx.helper.set_model_props(model, {META_PREFIX + k: v for k, v in props.items()})
    size = model.ByteSize()
    external = size > EXTERNAL_DATA_BYTES - 64 * 2**20  # leave headroom for the graph itself
    try:
        if external:  # the location names the final data file: it is staged next to out_path under that name
            onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out_path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(out_path))
    except OSError as err:
        raise ValueError(f"cannot write {name}: {err}") from None
    check_file(out_path, name=name)
    return ExportResult(out_path, kind, flavour, hyper, dtype, time.perf_counter() - start, size, external, tuple(notes),
                        quant_ops.describe(quant_props))


def check_file(path: str | os.PathLike, *, name: str | os.PathLike | None = None) -> None:
    """onnx.checker (full_check, by path so external data works) and strict shape inference; ValueError on failure
    (naming `name`, default `path`)."""
    import onnx

    from export import attention_op, moe_op, quant_ops

    path = Path(path)
    moe_op.register_schema()  # the checker needs a schema for com.microsoft::MoE (and MatMulNBits, QMoE,
    quant_ops.register_schemas()
    attention_op.register_schema()  # GroupQueryAttention)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred.tmp", check_type=True, strict_mode=True,
                                               data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ValueError(f"{name or path}: ONNX check failed: {err}") from None
    finally:
        Path(str(path) + ".inferred.tmp").unlink(missing_ok=True)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The hypermoe.* model properties of an exported file (without the prefix). ValueError if not a hypermoe export
    or if the config, kind, dtype or layer_index it records is invalid."""
    import onnx

    from ref.io import KINDS

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an .onnx file written by hypermoe export")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if "config" not in meta:
        raise ValueError(f"{path}: not a hypermoe export (no {META_PREFIX}config metadata)")
    try:  # what verify reads from the metadata is checked here, once: a value edited by hand gets one line
        cfg = metadata_config(meta)
    except ValueError as err:
        raise ValueError(f"{path}: metadata {META_PREFIX}config: {err}") from None
    for key, allowed in (("kind", KINDS), ("dtype", DTYPES)):
        if key in meta and meta[key] not in allowed:
            raise ValueError(f"{path}: metadata {META_PREFIX}{key} is {meta[key]!r}, expected one of {allowed}")
    index = meta.get("layer_index", "0")
    if not (index.isdigit() and int(index) < cfg.n_layers):
        raise ValueError(f"{path}: metadata {META_PREFIX}layer_index is {index!r}, expected an int in "
                         f"[0, n_layers={cfg.n_layers})")
    return meta


def metadata_config(meta: Mapping[str, str]) -> HyperMoEConfig:
    return HyperMoEConfig.from_json(meta["config"])
