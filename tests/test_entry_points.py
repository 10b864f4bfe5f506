"""Corrupted input at every entry point (issue 10 §6): model directories, state dicts for convert, .onnx files,
conformance case folders and .npy inputs, mutated byte by byte (truncated, bits flipped, bytes overwritten) and
array by array (wrong dtype or shape, NaN/Inf, missing and extra arrays, pickled object arrays, a .npy header that
claims more than the file holds), fed to the loaders and the CLI commands.

The property. From the library: success, or a ValueError / FileNotFoundError with a one-line message. From the
CLI: exit 0, 1 (verify FAIL, conformance failure) or 2 with exactly one line on stderr, `hypermoe CMD: error:
...`; never another exception, never a traceback, and an output path is either absent or a complete, valid file.
A corruption that leaves a file valid (a flipped bit inside a float's mantissa) may succeed.

Each test builds its pristine files once per module (an export takes seconds) and mutates copies in a
temporary folder per example; example counts are set per test so that the file runs in about a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ref
import ref.io
import ref.model
from conformance.suite import CASES_DIR
from export import exporter
from export.runtime import OnnxRunner
from hypermoe import convert
from hypermoe.cli import main
from hypermoe.layer import HyperMoELayer
from hypermoe.model import HyperMoETransformer

CFG = ref.tiny_config()
INIT = {"layer": ref.init, "stack": ref.init_stack, "model": ref.model.init_model}
SETTINGS = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
JUNK = ("16", 16.5, None, [16], {"a": 1}, True, -1, 0, 10**9, 10**30, math.nan, math.inf, "")  # wrong JSON values


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------


def clean(call: Callable[[], object]) -> object | None:
    """call() → its result, or None after a ValueError / FileNotFoundError with a one-line message. Any other
    exception propagates and fails the test."""
    try:
        return call()
    except (ValueError, FileNotFoundError) as err:
        assert str(err) and "\n" not in str(err), f"{type(err).__name__} of more than one line: {err!r}"
        return None


def cli(argv: list[str], *, allowed: tuple[int, ...] = (0, 2)) -> int:
    """Run `hypermoe ARGV` in this process; its exit status, after checking it is allowed and that exit 2 comes
    with exactly one line on stderr, `hypermoe CMD: error: ...` (any other exception escapes main and fails)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    err = err.getvalue()
    assert code in allowed, f"exit {code}; stderr: {err!r}; stdout tail: {out.getvalue()[-500:]!r}"
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith(f"hypermoe {argv[0]}: error: "), err
    else:
        assert err == "", err
    return code


# ---------------------------------------------------------------------------------------------
# Mutations, drawn by hypothesis
# ---------------------------------------------------------------------------------------------


def mutate_bytes(data: st.DataObject, blob: bytes) -> bytes:
    """blob truncated at a drawn offset, or with 1–3 drawn bits flipped, or 1–3 bytes overwritten."""
    how = data.draw(st.sampled_from(("truncate", "flip", "overwrite")), label="byte mutation")
    if how == "truncate":
        return blob[:data.draw(st.integers(0, len(blob) - 1), label="truncate at")]
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3), label="how many")):
        at = data.draw(st.integers(0, len(blob) - 1), label="offset")
        if how == "flip":
            out[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        else:
            out[at] = data.draw(st.integers(0, 255), label="byte")
    return bytes(out)


def npy_bytes(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=True)  # object arrays are pickled: the readers must refuse them
    return buf.getvalue()


def npz_bytes(members: dict[str, bytes]) -> bytes:
    """An .npz archive (uncompressed zip, as np.savez writes) of raw member bytes: headers may lie. A fixed
    member date (numpy's): writestr(name) would stamp the current time, and bytes that change with the clock
    steer hypothesis's derandomized search into other examples from one run to the next."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, blob in members.items():
            archive.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), blob)
    return buf.getvalue()


def lying_header(value: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """value's .npy bytes under a header that declares `shape`: numpy's own reader allocates what it says."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(value.dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue() + np.ascontiguousarray(value).tobytes()


ARRAY_MUTATIONS = ("dtype", "shape", "nonfinite", "missing", "extra", "object", "huge header", "short data",
                   "not npy", "empty")


def mutate_arrays(data: st.DataObject, arrays: dict[str, np.ndarray]) -> bytes:
    """The .npz of `arrays` with one drawn array-level corruption."""
    how = data.draw(st.sampled_from(ARRAY_MUTATIONS), label="array mutation")
    name = data.draw(st.sampled_from(sorted(arrays)), label="array")
    value = arrays[name]
    members = {n: npy_bytes(v) for n, v in arrays.items()}
    if how == "dtype":
        dtype = data.draw(st.sampled_from(("float16", "float32", "float64", "int32", "int64", "complex64", "bool",
                                           "<U4", "V8")), label="dtype")
        members[name] = npy_bytes(value.astype(dtype) if dtype != "V8" else np.zeros(value.shape, "V8"))
    elif how == "shape":
        reshape = data.draw(st.sampled_from(("flat", "extra axis", "shorter", "scalar")), label="reshape")
        members[name] = npy_bytes({"flat": lambda: value.reshape(-1), "extra axis": lambda: value[None],
                                   "shorter": lambda: value[..., :-1], "scalar": lambda: value.reshape(-1)[:1].reshape(())
                                   }[reshape]())
    elif how == "nonfinite":
        bad = value.copy().reshape(-1)
        bad[data.draw(st.integers(0, bad.size - 1), label="index")] = data.draw(
            st.sampled_from((np.nan, np.inf, -np.inf)), label="value")
        members[name] = npy_bytes(bad.reshape(value.shape))
    elif how == "missing":
        del members[name]
    elif how == "extra":
        members["extra.weight"] = npy_bytes(np.zeros(3, value.dtype))
    elif how == "object":
        members[name] = npy_bytes(np.array([1.0, "one", None], dtype=object))
    elif how == "huge header":
        members[name] = lying_header(value, data.draw(st.sampled_from(((10**12,), (2**40, 2**20), (10**6,), (0,))),
                                                      label="declared shape"))
    elif how == "short data":
        members[name] = npy_bytes(value)[:-data.draw(st.integers(1, value.nbytes), label="bytes cut")]
    elif how == "not npy":
        members[name] = data.draw(st.sampled_from((b"", b"not an array", bytes(200), b"\x93NUMPY\x01\x00")), label="bytes")
    else:
        members = {}
    return npz_bytes(members)


SAFETENSORS_MUTATIONS = ("dtype", "shape", "nonfinite", "missing", "extra", "empty", "header dtype", "header shape",
                         "header offsets", "header length", "header not json")


def mutate_safetensors(data: st.DataObject, arrays: dict[str, np.ndarray]) -> bytes:
    """The .safetensors of `arrays` with one drawn corruption: of one array (wrong dtype, shape, NaN/Inf, missing,
    extra, none at all), or of the JSON header, which may lie about a dtype, a shape, the data offsets or its own
    length (the safetensors package refuses most of these itself; the reader must check before allocating)."""
    from safetensors.numpy import save

    how = data.draw(st.sampled_from(SAFETENSORS_MUTATIONS), label="safetensors mutation")
    name = data.draw(st.sampled_from(sorted(arrays)), label="array")
    arrays, value = dict(arrays), arrays[name]
    if how == "dtype":
        dtype = data.draw(st.sampled_from(("float16", "float64", "int32", "int64", "bool", "uint8")), label="dtype")
        arrays[name] = value.astype(dtype)
    elif how == "shape":
        arrays[name] = data.draw(st.sampled_from((value.reshape(-1), value[None], value[..., :-1],
                                                  value.reshape(-1)[:1].reshape(()))), label="reshaped")
    elif how == "nonfinite":
        bad = value.copy().reshape(-1)
        bad[data.draw(st.integers(0, bad.size - 1), label="index")] = data.draw(
            st.sampled_from((np.nan, np.inf, -np.inf)), label="value")
        arrays[name] = bad.reshape(value.shape)
    elif how == "missing":
        del arrays[name]
    elif how == "extra":
        arrays["extra.weight"] = np.zeros(3, value.dtype)
    elif how == "empty":
        arrays = {}
    blob = save({n: np.ascontiguousarray(v) for n, v in arrays.items()})
    if not how.startswith("header"):
        return blob
    n = int.from_bytes(blob[:8], "little")
    header, rest = json.loads(blob[8:8 + n]), blob[8 + n:]
    if how == "header dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(("BF16", "F16", "F64", "I32", "F8_E4M3", "Q4", 3)),
                                          label="dtype")
    elif how == "header shape":
        header[name]["shape"] = data.draw(st.sampled_from(([10**12], [2**40, 2**20], [10**6], [0], [-1], "4", [2.5])),
                                          label="declared shape")
    elif how == "header offsets":
        header[name]["data_offsets"] = data.draw(st.sampled_from(([0, 10**12], [8, 4], [0, 0], [-4, 4], [0], None)),
                                                 label="data_offsets")
    elif how == "header length":
        length = data.draw(st.sampled_from((0, 1, n - 1, n + 1, 2**63, 10**12)), label="length")
        return length.to_bytes(8, "little") + blob[8:]
    else:
        return n.to_bytes(8, "little") + b"{not json" + blob[8 + 9:]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + rest


def mutate_json(data: st.DataObject, obj: dict) -> bytes:
    """A JSON object's text with one drawn structural edit: a field set to a value of the wrong type or size,
    removed, renamed, or the whole document replaced by something that is not an object."""
    how = data.draw(st.sampled_from(("value", "huge", "remove", "unknown", "not an object", "not utf-8")),
                    label="json mutation")
    obj = dict(obj)
    key = data.draw(st.sampled_from(sorted(obj)), label="field")
    if how == "value":
        obj[key] = data.draw(st.sampled_from(JUNK), label="value")
    elif how == "huge":
        for name in data.draw(st.sampled_from((("d_model",), ("d_ff",), ("n_experts",), ("vocab_size",),
                                               ("d_adapter", "d_generator"))), label="huge fields"):
            if name in obj:
                obj[name] = 10**9
    elif how == "remove":
        del obj[key]
    elif how == "unknown":
        obj[key + "_typo"] = obj.pop(key)
    elif how == "not an object":
        return json.dumps(data.draw(st.sampled_from(([1, 2], None, "config", 3.5)), label="document")).encode()
    else:
        return b"\xff\xfe" + json.dumps(obj).encode()
    return json.dumps(obj).encode()  # NaN and Infinity as JSON's common extension, which json.loads reads


# ---------------------------------------------------------------------------------------------
# Model directories → ref.io.load_dir, HyperMoELayer/HyperMoETransformer.from_dir, hypermoe export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """kind → a saved tiny model directory of that kind (ref.io.save_dir)."""
    folder = tmp_path_factory.mktemp("pristine")
    dirs = {kind: ref.io.save_dir(folder / kind, CFG, init(CFG, seed=0), kind) for kind, init in INIT.items()}
    dirs["model.safetensors"] = ref.io.save_dir(folder / "model.safetensors", CFG, INIT["model"](CFG, seed=0), "model",
                                                format="safetensors")  # weights.safetensors instead of weights.npz
    return dirs


def corrupted_dir(data: st.DataObject, pristine: Path, into: Path) -> Path:
    """A copy of the model directory `pristine` in `into` with config.json or its weights file (weights.npz or
    weights.safetensors) corrupted."""
    shutil.copytree(pristine, into / "model")
    weights = ref.io.SAFETENSORS_FILE if (pristine / ref.io.SAFETENSORS_FILE).exists() else ref.io.WEIGHTS_FILE
    target = data.draw(st.sampled_from((ref.io.CONFIG_FILE, weights)), label="file")
    level = data.draw(st.sampled_from(("bytes", "structure")), label="level")
    file = into / "model" / target
    if level == "bytes":
        file.write_bytes(mutate_bytes(data, file.read_bytes()))
    elif target == ref.io.CONFIG_FILE:
        file.write_bytes(mutate_json(data, json.loads(file.read_text())))
    elif target == ref.io.SAFETENSORS_FILE:
        file.write_bytes(mutate_safetensors(data, ref.io.read_safetensors(file)))
    else:
        with np.load(file, allow_pickle=False) as archive:
            file.write_bytes(mutate_arrays(data, {n: archive[n] for n in archive.files}))
    return into / "model"


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_model_directory_loaders(model_dirs, data):
    kind = data.draw(st.sampled_from(sorted(model_dirs)), label="kind")
    with tempfile.TemporaryDirectory() as tmp:
        path = corrupted_dir(data, model_dirs[kind], Path(tmp))
        loaded = clean(lambda: ref.io.load_dir(path))
        if loaded is not None:  # what the loader accepts is what it promises: float weights, the config's shapes
            cfg, params, loaded_kind = loaded
            assert params.keys() == ref.io.expected_shapes(cfg, loaded_kind).keys()
            assert all(np.isfinite(v).all() for v in params.values())
        clean(lambda: HyperMoELayer.from_dir(path))
        clean(lambda: HyperMoETransformer.from_dir(path))
        if loaded is None:  # the command gives the loader's error as one line and writes nothing
            assert cli(["export", str(path), "-o", str(Path(tmp) / "out.onnx")]) == 2
            assert not (Path(tmp) / "out.onnx").exists()


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_export_command(model_dirs, data):
    """Every corruption through the whole command, including those the loader accepts (each then exports)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = corrupted_dir(data, model_dirs["layer"], Path(tmp))
        out = Path(tmp) / "out.onnx"
        if cli(["export", str(path), "-o", str(out)]) == 0:
            exporter.check_file(out)
        else:
            assert not out.exists()
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["model"] + (["out.onnx"] if out.exists() else [])


# ---------------------------------------------------------------------------------------------
# State dicts → hypermoe convert
# ---------------------------------------------------------------------------------------------


def dense_gpt2(d: int = 4, f: int = 8, blocks: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sd = {"wte.weight": rng.standard_normal((9, d))}
    for i in range(blocks):
        sd.update({f"h.{i}.mlp.c_fc.weight": rng.standard_normal((d, f)), f"h.{i}.mlp.c_fc.bias": rng.standard_normal(f),
                   f"h.{i}.mlp.c_proj.weight": rng.standard_normal((f, d)), f"h.{i}.mlp.c_proj.bias": rng.standard_normal(d)})
    return sd


UPCYCLE = ["--from", "gpt2-mlp", "--experts", "2", "--top-k", "1", "--d-adapter", "2", "--hyper-width", "4",
           "--activation", "gelu_tanh"]
TENSOR_MUTATIONS = ("dtype", "nonfinite", "not a tensor", "class", "nested", "empty")


def mutate_checkpoint(data: st.DataObject, sd: dict[str, np.ndarray]) -> bytes:
    """torch.save of the state dict with one drawn tensor-level corruption."""
    state = {name: torch.from_numpy(value) for name, value in sd.items()}
    how = data.draw(st.sampled_from(TENSOR_MUTATIONS), label="tensor mutation")
    name = data.draw(st.sampled_from(sorted(state)), label="tensor")
    if how == "dtype":
        dtype = data.draw(st.sampled_from((torch.int64, torch.bool, torch.complex64, torch.float16, torch.bfloat16,
                                           torch.uint8)), label="dtype")
        state[name] = state[name].to(dtype)
    elif how == "nonfinite":
        state[name] = state[name].clone().reshape(-1)
        state[name][0] = data.draw(st.sampled_from((math.nan, math.inf)), label="value")
    elif how == "not a tensor":
        state[name] = data.draw(st.sampled_from(([1.0, 2.0], "weights", 3, None)), label="value")
    elif how == "class":
        state[name] = zipfile.ZipInfo("x")  # an arbitrary class: torch.load(weights_only=True) refuses it
    elif how == "nested":
        state = {"state_dict": state, "epoch": 3}  # a wrapper convert unwraps: legitimately valid
    else:
        state = {}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_convert(data):
    sd = dense_gpt2()
    form = data.draw(st.sampled_from(("npz", "bin", "safetensors")), label="format")
    level = data.draw(st.sampled_from(("bytes", "structure")), label="level")
    if form == "npz":
        pristine = npz_bytes({n: npy_bytes(v) for n, v in sd.items()})
        blob = mutate_bytes(data, pristine) if level == "bytes" else mutate_arrays(data, sd)
    elif form == "safetensors":
        from safetensors.numpy import save

        blob = mutate_bytes(data, save(sd)) if level == "bytes" else mutate_safetensors(data, sd)
    else:
        buf = io.BytesIO()
        torch.save({n: torch.from_numpy(v) for n, v in sd.items()}, buf)
        blob = mutate_bytes(data, buf.getvalue()) if level == "bytes" else mutate_checkpoint(data, sd)
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"sd.{form}", Path(tmp) / "out"
        path.write_bytes(blob)
        clean(lambda: convert.load_state_dict(path))
        if cli(["convert", *UPCYCLE, str(path), "-o", str(out)]) == 0:
            cfg, params, kind = ref.io.load_dir(out)  # a complete, valid model directory
            assert kind == "stack" and cfg.n_experts == 2
        else:
            assert not out.exists()
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted([path.name] + (["out"] if out.exists() else []))


# ---------------------------------------------------------------------------------------------
# .onnx files → read_metadata, OnnxRunner, hypermoe verify, hypermoe run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, model_dirs) -> Path:
    """The tiny layer exported once (with routing outputs), its source recorded as the saved directory."""
    path = tmp_path_factory.mktemp("onnx") / "layer.onnx"
    cfg, params, kind = ref.io.load_dir(model_dirs["layer"])
    exporter.export_model(path, cfg, params, kind=kind, routing_outputs=True, source=str(model_dirs["layer"]))
    return path


def mutate_metadata(data: st.DataObject, blob: bytes) -> bytes:
    """The .onnx with one hypermoe.* metadata property edited or removed."""
    model = onnx.load_from_string(blob)
    props = {p.key: p.value for p in model.metadata_props}
    key = data.draw(st.sampled_from(sorted(props)), label="property")
    how = data.draw(st.sampled_from(("remove", "junk", "config", "source")), label="metadata mutation")
    if how == "remove":
        del props[key]
    elif how == "junk":
        props[key] = data.draw(st.sampled_from(("", "bogus", "-1", "99", "{", "null", "float8", "model", "stack")),
                               label="value")
    elif how == "config":
        props["hypermoe.config"] = mutate_json(data, json.loads(props["hypermoe.config"])).decode("utf-8", "replace")
        if data.draw(st.booleans(), label="source ref.init"):  # not the saved directory, whose config differs
            props["hypermoe.source"] = "default:seed=0"
    else:
        props["hypermoe.source"] = data.draw(st.sampled_from(("", "default:seed=0", "default:seed=x", "/nonexistent",
                                                              "/")), label="source")
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_onnx_file_readers(tiny_onnx, data):
    pristine = tiny_onnx.read_bytes()
    blob = mutate_bytes(data, pristine) if data.draw(st.booleans(), label="bytes") else mutate_metadata(data, pristine)
    with tempfile.TemporaryDirectory() as tmp:
        path, save = Path(tmp) / "m.onnx", Path(tmp) / "y.npy"
        path.write_bytes(blob)
        clean(lambda: exporter.read_metadata(path))
        runner = clean(lambda: OnnxRunner(path, "cpu"))
        if runner is not None:
            x = np.random.default_rng(0).standard_normal((1, 3, CFG.d_model)).astype(np.float32)
            clean(lambda: runner(x))
        cli(["verify", str(path), "--provider", "cpu", "--shapes", "1x4"], allowed=(0, 1, 2))
        if cli(["run", str(path), "--provider", "cpu", "--runs", "1", "--warmup", "0", "--seq", "3",
                "--save", str(save)]) == 0:
            assert np.load(save, allow_pickle=False).shape == (1, 3, CFG.d_model)  # complete and valid
        else:
            assert not save.exists()
        assert sorted(p.name for p in Path(tmp).iterdir()) == sorted(["m.onnx"] + (["y.npy"] if save.exists() else []))


# ---------------------------------------------------------------------------------------------
# .npy inputs → hypermoe run --input
# ---------------------------------------------------------------------------------------------


def mutate_input(data: st.DataObject) -> bytes:
    x = np.random.default_rng(1).standard_normal((2, 3, CFG.d_model)).astype(np.float32)
    how = data.draw(st.sampled_from(("bytes", "dtype", "shape", "nonfinite", "object", "huge header", "random",
                                     "npz")), label="input mutation")
    if how == "bytes":
        return mutate_bytes(data, npy_bytes(x))
    if how == "dtype":
        return npy_bytes(x.astype(data.draw(st.sampled_from(("float16", "float64", "int64", "bool", "complex64",
                                                             "<U2", ">f4")), label="dtype")))
    if how == "shape":
        return npy_bytes(data.draw(st.sampled_from((x[0], x[..., :5], x[None], x.reshape(-1), x[:, :0], x[:0])),
                                   label="array"))
    if how == "nonfinite":
        x[data.draw(st.integers(0, 1)), data.draw(st.integers(0, 2)), 0] = data.draw(
            st.sampled_from((np.nan, np.inf, -np.inf)), label="value")
        return npy_bytes(x)
    if how == "object":
        return npy_bytes(np.array([[x, "x"]], dtype=object))
    if how == "huge header":
        return lying_header(x, data.draw(st.sampled_from(((10**9, 10**3, 16), (2, 10**6, 16), (2, 4, 16))),
                                         label="declared shape"))
    if how == "random":
        return np.random.default_rng(data.draw(st.integers(0, 9), label="seed")).bytes(data.draw(st.integers(0, 300)))
    return npz_bytes({"x": npy_bytes(x)})


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_run_input(tiny_onnx, data):
    with tempfile.TemporaryDirectory() as tmp:
        path, save = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        path.write_bytes(mutate_input(data))
        if cli(["run", str(tiny_onnx), "--provider", "cpu", "--runs", "1", "--warmup", "0", "--input", str(path),
                "--save", str(save)]) == 0:
            x = np.load(path, allow_pickle=False)
            assert np.load(save, allow_pickle=False).shape == x.shape  # complete and valid
        else:
            assert not save.exists()


# ---------------------------------------------------------------------------------------------
# Conformance case folders → hypermoe conformance --cases-dir
# ---------------------------------------------------------------------------------------------


def mutate_manifest(data: st.DataObject, manifest: dict) -> bytes:
    """manifest.json with one case entry's field (or a top-level field) set to junk or removed."""
    manifest = json.loads(json.dumps(manifest))
    if data.draw(st.booleans(), label="top level"):
        return mutate_json(data, manifest)
    entry = manifest["cases"][data.draw(st.integers(0, len(manifest["cases"]) - 1), label="case")]
    key = data.draw(st.sampled_from(sorted(entry)), label="field")
    where = data.draw(st.sampled_from(("field", "inside")), label="where")
    if where == "inside" and isinstance(entry[key], dict) and entry[key]:
        inner = data.draw(st.sampled_from(sorted(entry[key])), label="inner field")
        entry[key][inner] = data.draw(st.sampled_from(JUNK), label="value")
    elif data.draw(st.booleans(), label="remove"):
        del entry[key]
    else:
        entry[key] = data.draw(st.sampled_from(JUNK), label="value")
    return json.dumps(manifest).encode()


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_conformance_cases_dir(data):
    with tempfile.TemporaryDirectory() as tmp:
        cases, report = Path(tmp) / "cases", Path(tmp) / "report.json"
        shutil.copytree(CASES_DIR, cases)
        manifest = json.loads((cases / "manifest.json").read_text())
        target = "manifest.json" if data.draw(st.booleans(), label="the manifest") else data.draw(
            st.sampled_from(sorted(c["file"] for c in manifest["cases"])), label="case file")
        original = (cases / target).read_bytes()
        if target == "manifest.json" and data.draw(st.booleans(), label="structure"):
            (cases / target).write_bytes(mutate_manifest(data, manifest))
        else:
            (cases / target).write_bytes(mutate_bytes(data, original))
        code = cli(["conformance", "--cases-dir", str(cases), "--quiet", "--report", str(report)], allowed=(0, 1, 2))
        if code == 2:
            assert not report.exists()
        else:
            assert json.loads(report.read_text())["exit_status"] == code  # complete and valid
        if target != "manifest.json" and (cases / target).read_bytes() != original:
            assert code == 2  # a case file's bytes are covered by its sha256: never accepted changed


# ---------------------------------------------------------------------------------------------
# What the property found, kept as plain examples (each failed before its fix)
# ---------------------------------------------------------------------------------------------


def test_npz_member_whose_header_claims_more_than_it_holds(model_dirs, tmp_path):
    """numpy allocated what the header said (MemoryError: 7.3 TiB); now refused from the sizes alone."""
    with np.load(model_dirs["layer"] / ref.io.WEIGHTS_FILE) as archive:
        arrays = {n: archive[n] for n in archive.files}
    shutil.copytree(model_dirs["layer"], tmp_path / "m")
    members = {n: npy_bytes(v) for n, v in arrays.items()}
    members["expert_embed"] = lying_header(arrays["expert_embed"], (10**12,))
    (tmp_path / "m" / ref.io.WEIGHTS_FILE).write_bytes(npz_bytes(members))
    with pytest.raises(ValueError, match=r"weights\.npz: not a readable \.npz weights file \(array 'expert_embed': its "
                                         r"header declares shape \(1000000000000,\) of float64 \(8000000000000 bytes\) "
                                         r"but 256 bytes follow it\)$"):
        ref.io.load_dir(tmp_path / "m")
    members["expert_embed"] = b"not an array"  # numpy returned these bytes as the "array" (AttributeError later)
    (tmp_path / "m" / ref.io.WEIGHTS_FILE).write_bytes(npz_bytes(members))
    with pytest.raises(ValueError, match=r"\(array 'expert_embed': the magic string is not correct"):
        ref.io.load_dir(tmp_path / "m")
    (tmp_path / "sd.npz").write_bytes(npz_bytes({"w": lying_header(np.zeros(4), (10**12,))}))
    with pytest.raises(ValueError, match=r"sd\.npz: not a readable \.npz state dict \(array 'w': its header declares"):
        convert.load_state_dict(tmp_path / "sd.npz")


@pytest.mark.parametrize("content, message", [
    (lying_header(np.zeros((2, 3, 16), np.float32), (10**9, 1000, 16)),
     "its header declares shape (1000000000, 1000, 16) of float32 (64000000000000 bytes) but 384 bytes follow it"),
    (npy_bytes(np.zeros((2, 3, 16), np.float32))[:43] + b"(" + npy_bytes(np.zeros((2, 3, 16), np.float32))[44:],
     "unreadable .npy header (TokenError: ('EOF in multi-line statement', (2, 0)))"),  # numpy's tokenizer error
    (npy_bytes(np.array([1.0, "x"], dtype=object)), "holds Python objects (object), stored pickled: not loaded"),
])
def test_run_input_npy_that_numpy_would_not_refuse_cleanly(tiny_onnx, tmp_path, content, message):
    (tmp_path / "x.npy").write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["run", str(tiny_onnx), "--provider", "cpu", "--input", str(tmp_path / "x.npy")]) == 2
    assert err.getvalue() == f"hypermoe run: error: {tmp_path / 'x.npy'}: not a readable .npy array ({message})\n"


@pytest.mark.parametrize("changes, message", [
    ({"hypermoe.kind": "moe"}, "metadata hypermoe.kind is 'moe', expected one of ('layer', 'stack', 'model')"),  # KeyError
    ({"hypermoe.dtype": ""}, "metadata hypermoe.dtype is '', expected one of ('float32', 'float16', 'bfloat16')"),
    ({"hypermoe.layer_index": "2"}, "metadata hypermoe.layer_index is '2', expected an int in [0, n_layers=2)"),
    ({"hypermoe.config": json.dumps({**CFG.to_dict(), "d_model": "16"})},
     "metadata hypermoe.config: config field 'd_model' must be an int, got '16'"),
    ({"hypermoe.config": json.dumps({**CFG.to_dict(), "d_model": 10**9}), "hypermoe.source": "default:seed=0"},
     "the recorded source's parameters (float64): config needs at least ~"),  # MemoryError in ref.init
    ({"hypermoe.source": "default:seed=x"}, "the recorded source 'default:seed=x' has no valid seed"),
])
def test_verify_metadata_edited_by_hand(tiny_onnx, tmp_path, changes, message):
    model = onnx.load(str(tiny_onnx))
    props = {p.key: p.value for p in model.metadata_props} | changes
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(tmp_path / "m.onnx"))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["verify", str(tmp_path / "m.onnx"), "--provider", "cpu"]) == 2
    assert err.getvalue().startswith("hypermoe verify: error: ") and message in err.getvalue(), err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_metadata_of_older_files_with_implementation_is_ignored(tiny_onnx, tmp_path):
    """Files exported before `--implementation` was removed record hypermoe.implementation: still read and verified."""
    from export.exporter import read_metadata

    model = onnx.load(str(tiny_onnx))
    props = {p.key: p.value for p in model.metadata_props} | {"hypermoe.implementation": "graph"}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert read_metadata(tmp_path / "m.onnx")["implementation"] == "graph"
    assert "implementation" not in read_metadata(tiny_onnx)  # no longer written
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["verify", str(tmp_path / "m.onnx"), "--provider", "cpu"]) == 0


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("spec_version"), "'spec_version' must be a string, got None"),  # KeyError after the run
    (lambda m: m["cases"][3].update(tags=None), "case topk_kN: field 'tags' is missing or invalid (None)"),
    (lambda m: m["cases"][0].update(kind="stack"), "case topk_k1: the stack case lists no array(s) expected.layers.0."),
    (lambda m: m["cases"][0]["dtypes"]["float32"].update(layers=[]), "case topk_k1: dtypes.float32.layers must be 1 "
                                                                      "object(s) of [atol, rtol] for output, logits"),
])
def test_conformance_manifest_edited_by_hand(tmp_path, edit, message):
    shutil.copytree(CASES_DIR, tmp_path / "cases")
    manifest = json.loads((CASES_DIR / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "cases" / "manifest.json").write_text(json.dumps(manifest))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["conformance", "--cases-dir", str(tmp_path / "cases")]) == 2
    assert err.getvalue().startswith(f"hypermoe conformance: error: conformance manifest {tmp_path / 'cases'}"
                                     f"/manifest.json: {message}"), err.getvalue()


def test_checkpoint_with_an_unsupported_zip_version(tmp_path):
    """A flipped bit in a zip header's "version needed to extract" (zipfile: NotImplementedError 'zip file version
    6.4', found by test_convert in a full-suite run) no longer escapes the .npz sniffing: torch reads the file."""
    buf = io.BytesIO()
    torch.save({n: torch.from_numpy(v) for n, v in dense_gpt2().items()}, buf)
    blob = bytearray(buf.getvalue())
    assert blob[:4] == b"PK\x03\x04"
    blob[4] = 64  # version needed to extract: 6.4 (zipfile supports ≤ 6.3)
    cd = blob.rfind(b"PK\x01\x02", 0, len(blob))  # the last central-directory entry (zipfile reads these)
    blob[cd + 6] = 64
    path = tmp_path / "sd.bin"
    path.write_bytes(bytes(blob))
    loaded = convert.load_state_dict(path)  # torch's reader ignores the field: the checkpoint is still readable
    assert sorted(loaded) == sorted(dense_gpt2())


# ---------------------------------------------------------------------------------------------
# generate and checkpoint: corrupted model directories, export folders and sharded checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_past(tmp_path_factory, model_dirs) -> Path:
    """The tiny model (vocabulary 32: not bytes) exported with past key/values: model.onnx + genai_config.json."""
    path = tmp_path_factory.mktemp("past") / "export"
    cfg, params, kind = ref.io.load_dir(model_dirs["model"])
    exporter.export_model(path, cfg, params, kind=kind, with_past=True, eos_token_id=3)
    return path


GENERATE = ["--max-new-tokens", "2", "--provider", "cpu"]


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_generate_command(model_dirs, tiny_past, data):
    """A corrupted model directory (torch), or export folder (model.onnx, genai_config.json, a tokenizer.json
    beside them), with a text prompt or ids: exit 0 or one line."""
    prompt = data.draw(st.sampled_from((["--prompt-ids", "1,2"], ["--prompt", "hi"])), label="prompt")
    with tempfile.TemporaryDirectory() as tmp:
        if data.draw(st.booleans(), label="model directory"):
            path = corrupted_dir(data, model_dirs["model"], Path(tmp))
        else:
            path = Path(tmp) / "export"
            shutil.copytree(tiny_past, path)
            target = data.draw(st.sampled_from(("model.onnx", "genai_config.json", "tokenizer.json")), label="file")
            file = path / target
            if target == "tokenizer.json":
                file.write_bytes(mutate_bytes(data, b'{"version": "1.0", "model": {"type": "WordLevel", '
                                                    b'"vocab": {"a": 0, "b": 1}, "unk_token": "a"}}'))
            elif target == "genai_config.json" and data.draw(st.booleans(), label="json"):
                file.write_bytes(mutate_json(data, json.loads(file.read_text())))
            else:
                file.write_bytes(mutate_bytes(data, file.read_bytes()))
        cli(["generate", str(path), *prompt, *GENERATE])


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_checkpoint_command(model_dirs, data):
    """from-model of a corrupted model directory, and to-model of a sharded checkpoint with a corrupted file:
    exit 0 or one line, and the output either absent or complete (it converts back)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if data.draw(st.booleans(), label="from-model"):
            path = corrupted_dir(data, model_dirs[data.draw(st.sampled_from(sorted(model_dirs)), label="kind")], tmp)
            if cli(["checkpoint", "from-model", str(path), str(tmp / "sharded")]) == 0:
                assert cli(["checkpoint", "to-model", str(tmp / "sharded"), str(tmp / "back")]) == 0
            else:
                assert not (tmp / "sharded").exists()
            return
        assert cli(["checkpoint", "from-model", str(model_dirs["model"]), str(tmp / "sharded")]) == 0
        files = sorted(p.name for p in (tmp / "sharded").iterdir())
        file = tmp / "sharded" / data.draw(st.sampled_from(files), label="file")
        if file.name == ref.io.CONFIG_FILE and data.draw(st.booleans(), label="json"):
            file.write_bytes(mutate_json(data, json.loads(file.read_text())))
        else:
            file.write_bytes(mutate_bytes(data, file.read_bytes()))
        if cli(["checkpoint", "to-model", str(tmp / "sharded"), str(tmp / "model")]) == 0:
            ref.io.load_dir(tmp / "model")
        else:
            assert not (tmp / "model").exists()


def test_every_option_has_a_help_line():
    """`hypermoe CMD --help` explains every option and argument (issue 20)."""
    import argparse

    from hypermoe.cli import build_parser

    missing = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += [(name, a.option_strings[0] if a.option_strings else a.dest) for a in sub._actions
                            if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, sorted(set(missing))
    export_help = " ".join(build_parser()._subparsers._group_actions[0].choices["export"].format_help().split())
    assert all(kind in export_help for kind in ("layer", "stack", "model")) and "default portable" in export_help


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-step run of the `tiny` preset (tests/test_train.py's corpus) with its checkpoint."""
    from tests.test_train import write_corpus

    folder = tmp_path_factory.mktemp("run")
    corpus = write_corpus(folder / "corpus")
    assert cli(["train", "--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-tokens",
                "64", "--data", str(corpus), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_train_resume_command(tiny_run, data):
    """train --resume of a run with one corrupted file (train.json, the checkpoint's state.json, optimizer.npz,
    rng.npz, or its model directory): exit 0 or one line naming the problem, never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(tiny_run, run)
        target = data.draw(st.sampled_from(("train.json", "checkpoint/state.json", "checkpoint/optimizer.npz",
                                            "checkpoint/rng.npz", "checkpoint/model")), label="file")
        if target == "checkpoint/model":
            shutil.rmtree(run / target)
            corrupted_dir(data, tiny_run / target, run / "checkpoint")
        else:
            file = run / target
            if file.suffix == ".json" and data.draw(st.booleans(), label="json"):
                file.write_bytes(mutate_json(data, json.loads(file.read_text())))
            elif file.name == "optimizer.npz" and data.draw(st.booleans(), label="arrays"):  # float32 moments
                with np.load(file, allow_pickle=False) as archive:
                    file.write_bytes(mutate_arrays(data, {n: archive[n] for n in archive.files}))
            else:
                file.write_bytes(mutate_bytes(data, file.read_bytes()))
        cli(["train", "--resume", str(run), "--steps", "3", "--quiet"])
