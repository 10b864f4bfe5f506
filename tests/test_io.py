"""Saved model directories (ref/io.py, SPEC.md §6): config.json + weights.npz round trip for the "layer"
and "stack" kinds, and every way a directory can be wrong gives a clear error naming the file."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ref
from ref import io as rio
from tests.strategies import configs

CFG = ref.tiny_config()


@pytest.fixture
def layer_dir(tmp_path: Path) -> Path:
    rio.save_dir(tmp_path / "m", CFG, ref.init(CFG, seed=3), "layer")
    return tmp_path / "m"


def rewrite_config(path: Path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (path / "config.json").write_text(json.dumps(data))


def rewrite_weights(path: Path, arrays: dict) -> None:
    with open(path / "weights.npz", "wb") as fh:
        np.savez(fh, **arrays)


# --- round trip ---


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs(), st.sampled_from(["layer", "stack"]), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1), st.integers(1, 2))
def test_round_trip(tmp_path_factory, cfg, kind, dtype, seed, moe_every):
    path = tmp_path_factory.mktemp("rt")
    cfg = cfg.replace(moe_every=moe_every)  # 2: a stack of the odd layers only
    params = (ref.init if kind == "layer" else ref.init_stack)(cfg, seed=seed, dtype=dtype)
    if not params:  # a stack with no HyperMoE layer and no hypernetwork has nothing to save
        return
    rio.save_dir(path, cfg, params, kind)
    cfg2, params2, kind2 = rio.load_dir(path)
    assert (cfg2, kind2) == (cfg, kind)
    assert set(params2) == set(params)
    for name in params:
        assert params2[name].dtype == dtype
        np.testing.assert_array_equal(params2[name], params[name])
    assert rio.load_config(path) == (cfg, kind)


def test_round_trip_reproduces_the_layer_output(layer_dir):
    cfg, params, kind = rio.load_dir(layer_dir)
    x = np.random.default_rng(0).standard_normal((2, 5, CFG.d_model))
    np.testing.assert_array_equal(ref.layer(cfg, params, x).output, ref.layer(CFG, ref.init(CFG, seed=3), x).output)


def test_config_json_content(layer_dir):
    data = json.loads((layer_dir / "config.json").read_text())
    assert data["kind"] == "layer" and data["spec_version"] == ref.SPEC_VERSION
    assert data["d_model"] == CFG.d_model
    with np.load(layer_dir / "weights.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(ref.param_shapes(CFG))


def test_missing_kind_and_version_default_to_layer_and_current(layer_dir):
    rewrite_config(layer_dir, kind=None, spec_version=None)
    assert rio.load_config(layer_dir) == (CFG, "layer")


def test_compatible_minor_version_loads(layer_dir):
    major = ref.SPEC_VERSION.split(".")[0]
    rewrite_config(layer_dir, spec_version=f"{major}.99.3")
    assert rio.load_dir(layer_dir)[0] == CFG


# --- missing files ---


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        rio.load_dir(tmp_path / "nothing")


def test_missing_weights(layer_dir):
    (layer_dir / "weights.npz").unlink()
    with pytest.raises(FileNotFoundError, match="weights.npz: no such file"):
        rio.load_dir(layer_dir)


def test_missing_config(layer_dir):
    (layer_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        rio.load_dir(layer_dir)


# --- bad config.json ---


@pytest.mark.parametrize("text", ["", "{", "not json", b"\xff\xfe\x00garbage"])
def test_config_not_json(layer_dir, text):
    target = layer_dir / "config.json"
    target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        rio.load_dir(layer_dir)


def test_config_not_an_object(layer_dir):
    (layer_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object"):
        rio.load_dir(layer_dir)


@pytest.mark.parametrize("kind", ["model2", "Layer", ""])
def test_unknown_kind(layer_dir, kind):
    rewrite_config(layer_dir, kind=kind)
    with pytest.raises(ValueError, match=f"config.json: unknown kind {kind!r}"):
        rio.load_dir(layer_dir)


def test_unknown_kind_on_save(tmp_path):
    with pytest.raises(ValueError, match="unknown model kind 'layers'"):
        rio.save_dir(tmp_path, CFG, ref.init(CFG), "layers")


@pytest.mark.parametrize("version", ["2.0.0", "0.9.0", "10.0"])
def test_incompatible_spec_version(layer_dir, version):
    rewrite_config(layer_dir, spec_version=version)
    with pytest.raises(ValueError, match=f"spec version {version} is incompatible"):
        rio.load_dir(layer_dir)


def test_unknown_config_field(layer_dir):
    rewrite_config(layer_dir, d_modle=16)
    with pytest.raises(ValueError, match=r"config.json: unknown config field\(s\): d_modle"):
        rio.load_dir(layer_dir)


def test_invalid_config_value(layer_dir):
    rewrite_config(layer_dir, top_k=7)
    with pytest.raises(ValueError, match=r"config.json: config field 'top_k' \(7\) must be ≤ n_experts"):
        rio.load_dir(layer_dir)


# --- bad weights.npz ---


def test_truncated_npz(layer_dir):
    target = layer_dir / "weights.npz"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz weights file"):
        rio.load_dir(layer_dir)


def test_corrupted_npz(layer_dir):
    target = layer_dir / "weights.npz"
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zero a stretch inside some array's bytes: the zip CRC fails
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz weights file"):
        rio.load_dir(layer_dir)


@pytest.mark.parametrize("content", [b"", b"hello, weights", b"PK\x03\x04 not really a zip"])
def test_not_an_npz(layer_dir, content):
    (layer_dir / "weights.npz").write_bytes(content)
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz weights file"):
        rio.load_dir(layer_dir)


def test_a_plain_npy_is_not_an_npz(layer_dir):
    with open(layer_dir / "weights.npz", "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz weights file"):
        rio.load_dir(layer_dir)


class Boom:
    """Unpickling this would run code: the loader must never get that far."""

    def __reduce__(self):
        return (pytest.fail, ("weights.npz was unpickled",))


def test_object_array_npz_is_rejected_without_unpickling(layer_dir):
    arrays = dict(np.load(layer_dir / "weights.npz"))
    arrays["router.weight"] = np.array([Boom()], dtype=object)
    with open(layer_dir / "weights.npz", "wb") as fh:
        np.savez(fh, **arrays)  # np.savez pickles object arrays
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz weights file"):
        rio.load_dir(layer_dir)


def test_pickle_file_as_weights_is_rejected(layer_dir):
    (layer_dir / "weights.npz").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz weights file"):
        rio.load_dir(layer_dir)


def test_empty_npz(layer_dir):
    rewrite_weights(layer_dir, {})
    with pytest.raises(ValueError, match="weights.npz: holds no arrays"):
        rio.load_dir(layer_dir)


def test_missing_weight(layer_dir):
    arrays = dict(np.load(layer_dir / "weights.npz"))
    del arrays["hyper.w_up.bias"]
    rewrite_weights(layer_dir, arrays)
    with pytest.raises(ValueError, match=r"weights.npz does not match config.json: missing parameter\(s\): hyper.w_up.bias"):
        rio.load_dir(layer_dir)


def test_extra_weight(layer_dir):
    arrays = dict(np.load(layer_dir / "weights.npz"))
    arrays["router.bias"] = np.zeros(CFG.n_experts)
    rewrite_weights(layer_dir, arrays)
    with pytest.raises(ValueError, match=r"does not match config.json: unexpected parameter\(s\) for this config: router.bias"):
        rio.load_dir(layer_dir)


def test_wrong_shape(layer_dir):
    arrays = dict(np.load(layer_dir / "weights.npz"))
    arrays["expert_embed"] = np.zeros((CFG.n_experts, CFG.d_expert_embed + 1))
    rewrite_weights(layer_dir, arrays)
    with pytest.raises(ValueError, match=r"does not match config.json: parameter 'expert_embed' has shape \(4, 9\), expected \(4, 8\)"):
        rio.load_dir(layer_dir)


def test_mixed_dtypes(layer_dir):
    arrays = dict(np.load(layer_dir / "weights.npz"))
    arrays["router.weight"] = arrays["router.weight"].astype(np.float32)
    rewrite_weights(layer_dir, arrays)
    with pytest.raises(ValueError, match=r"weights.npz: weights mix dtypes \['float32', 'float64'\]"):
        rio.load_dir(layer_dir)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex128])
def test_non_float_weights(layer_dir, dtype):
    arrays = {k: v.astype(dtype) for k, v in np.load(layer_dir / "weights.npz").items()}
    rewrite_weights(layer_dir, arrays)
    with pytest.raises(ValueError, match=f"weights.npz: weights must be float32 or float64, got {np.dtype(dtype)}"):
        rio.load_dir(layer_dir)


def test_config_and_weights_disagree(layer_dir):
    # the weights of a 4-expert layer, a config that says 5 experts
    rewrite_config(layer_dir, n_experts=5)
    with pytest.raises(ValueError, match=r"does not match config.json: parameter 'router.weight' has shape \(16, 4\), expected \(16, 5\)"):
        rio.load_dir(layer_dir)


def test_layer_weights_with_stack_kind(layer_dir):
    rewrite_config(layer_dir, kind="stack")
    with pytest.raises(ValueError, match=r"does not match config.json: missing parameter\(s\): layers.0"):
        rio.load_dir(layer_dir)


def test_hyper_expert_flag_disagrees(layer_dir):
    rewrite_config(layer_dir, hyper_expert=False)
    with pytest.raises(ValueError, match=r"does not match config.json: unexpected parameter\(s\) for this config: expert_embed"):
        rio.load_dir(layer_dir)


# --- save_dir checks its input too ---


def test_save_rejects_bad_params(tmp_path):
    params = ref.init(CFG)
    with pytest.raises(ValueError, match=r"missing parameter\(s\): router.weight"):
        rio.save_dir(tmp_path / "a", CFG, {k: v for k, v in params.items() if k != "router.weight"}, "layer")
    with pytest.raises(ValueError, match=r"weights must all be float32 or all float64, got \['float32', 'float64'\]"):
        rio.save_dir(tmp_path / "b", CFG, {**params, "router.weight": params["router.weight"].astype(np.float32)}, "layer")
    with pytest.raises(ValueError, match=r"weights must all be float32 or all float64, got \['int64'\]"):
        rio.save_dir(tmp_path / "c", CFG, {k: v.astype(np.int64) for k, v in params.items()}, "layer")
    with pytest.raises(ValueError, match=r"parameter 'router.weight' has shape \(16, 3\), expected \(16, 4\)"):
        rio.save_dir(tmp_path / "d", CFG, {**params, "router.weight": np.zeros((16, 3))}, "layer")
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing written on failure


def test_saved_npz_is_deterministic_and_unpickle_free(tmp_path):
    params = ref.init(CFG)
    rio.save_dir(tmp_path / "a", CFG, params, "layer")
    rio.save_dir(tmp_path / "b", CFG, params, "layer")
    assert (tmp_path / "a" / "weights.npz").read_bytes() == (tmp_path / "b" / "weights.npz").read_bytes()
    with zipfile.ZipFile(io.BytesIO((tmp_path / "a" / "weights.npz").read_bytes())) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())
