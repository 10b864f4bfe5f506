"""NaN/±Inf (SPEC.md §3.9, issue 10 §4): exported graphs get finite input only (OnnxRunner refuses the rest,
naming the first bad token); NaN/Inf weights are refused by the loader, convert and export, naming the tensor."""

from __future__ import annotations

import numpy as np
import pytest

import ref
import ref.io
from export import exporter
from export.runtime import OnnxRunner
from hypermoe.cli import main

CFG = ref.tiny_config(activation="gelu_tanh")  # every flavour exports it (fused has no erf GELU)
FLAVOURS = ("portable", "sparse", "fused")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """flavour → path of the tiny layer exported in that flavour (ref.init seed 0)."""
    directory = tmp_path_factory.mktemp("nonfinite")
    params = ref.init(CFG, seed=0)
    paths = {}
    for flavour in FLAVOURS:
        paths[flavour] = directory / f"{flavour}.onnx"
        exporter.export_model(paths[flavour], CFG, params, flavour=flavour)
    return paths


def bad_input(value: float) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((2, 3, CFG.d_model)).astype(np.float32)  # (batch, seq, d)
    x[1, 2, 5] = value
    x[1, 2, 7] = value
    return x


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_runner_refuses_nonfinite_input_naming_the_token(exported, flavour, value):
    runner = OnnxRunner(exported[flavour], "cpu")
    with pytest.raises(ValueError, match=r"^input has NaN/Inf at token \(batch 1, position 2\), 1 of 6 token\(s\) "
                                         r"non-finite; exported graphs take finite input only \(SPEC\.md §3\.9\)$"):
        runner(bad_input(value))
    x = bad_input(value)
    x[0, 1, 0] = value  # two bad tokens: the first in (batch, position) order is named
    with pytest.raises(ValueError, match=r"at token \(batch 0, position 1\), 2 of 6"):
        runner(x)
    out = runner(bad_input(0.5))["output"]  # the same runner still runs finite input
    assert out.shape == (2, 3, CFG.d_model) and np.isfinite(out).all()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_why_the_runner_checks_the_graphs_themselves_do_not(exported, flavour):
    """What export/README.md says the graphs do with a NaN token when nothing refuses it."""
    runner = OnnxRunner(exported[flavour], "cpu")
    x = bad_input(np.nan)
    if flavour == "fused":  # that token's row is NaN, silently; every other row is finite
        out = runner.session.run(["output"], {"hidden_states": x})[0]
        bad_rows = ~np.isfinite(out).all(axis=-1)  # (batch, seq)
        assert bad_rows.tolist() == [[False, False, False], [False, False, True]]
    else:  # the whole batch fails inside onnxruntime
        with pytest.raises(Exception, match="GatherElements"):
            runner.session.run(["output"], {"hidden_states": x})


def test_float16_overflow_counts_as_nonfinite(tmp_path):
    path = tmp_path / "fp16.onnx"
    exporter.export_model(path, CFG, ref.init(CFG, seed=0), dtype="float16")
    x = bad_input(0.5)
    x[0, 2, 1] = 7e4  # finite in float32, +Inf in float16 (max 65504)
    with pytest.raises(ValueError, match=r"input has NaN/Inf after rounding to float16 at token \(batch 0, position 2\)"):
        OnnxRunner(path, "cpu")(x)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_run_command_refuses_nonfinite_input(exported, flavour, tmp_path, capsys):
    np.save(tmp_path / "x.npy", bad_input(np.inf))
    code = main(["run", str(exported[flavour]), "--input", str(tmp_path / "x.npy"), "--provider", "cpu",
                 "--runs", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hypermoe run: error: input has NaN/Inf at token (batch 1, position 2)")


# --- weights -------------------------------------------------------------------------------------


def layer_dir_with(tmp_path, name: str, value: float, count: int = 1):
    params = ref.init(CFG, seed=0)
    params[name].reshape(-1)[:count] = value
    path = tmp_path / "model"
    path.mkdir()
    ref.io.save_dir(tmp_path / "clean", CFG, ref.init(CFG, seed=0), "layer")  # config.json as the project writes it
    (path / ref.io.CONFIG_FILE).write_text((tmp_path / "clean" / ref.io.CONFIG_FILE).read_text())
    np.savez(path / ref.io.WEIGHTS_FILE, **params)
    return path


def test_load_dir_refuses_nan_weights_naming_the_tensor(tmp_path):
    path = layer_dir_with(tmp_path, "experts.w2", np.nan, count=3)
    with pytest.raises(ValueError, match=r"weights\.npz: parameter 'experts\.w2' holds 3 NaN/Inf value\(s\) of "
                                         rf"{CFG.n_experts * CFG.d_ff * CFG.d_model}; weights must be finite$"):
        ref.io.load_dir(path)


def test_export_command_refuses_a_model_dir_with_inf_weights(tmp_path, capsys):
    path = layer_dir_with(tmp_path, "hyper.w_up.bias", -np.inf)
    code = main(["export", str(path), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "parameter 'hyper.w_up.bias' holds 1 NaN/Inf value(s)" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_params_with_inf_fails_before_exporting(tmp_path):
    params = ref.init(CFG, seed=0)
    params["router.weight"][3, 1] = np.inf
    with pytest.raises(ValueError, match=r"^parameter 'router\.weight' holds 1 NaN/Inf value\(s\) of 64; weights must be finite$"):
        exporter.export_model(tmp_path / "m.onnx", CFG, params)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def dense_gpt2(d: int = 8, f: int = 16, L: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    state = {}
    for i in range(L):
        state.update({f"h.{i}.mlp.c_fc.weight": rng.standard_normal((d, f)), f"h.{i}.mlp.c_fc.bias": np.zeros(f),
                      f"h.{i}.mlp.c_proj.weight": rng.standard_normal((f, d)), f"h.{i}.mlp.c_proj.bias": np.zeros(d)})
    return state


@pytest.mark.parametrize("value, why", [(np.nan, "a NaN in the checkpoint"), (1e39, "float64 → float32 overflow")])
def test_convert_refuses_nonfinite_weights(tmp_path, capsys, value, why):
    state = dense_gpt2()
    state["h.1.mlp.c_proj.bias"][2] = value
    np.savez(tmp_path / "sd.npz", **state)
    code = main(["convert", "--from", "gpt2-mlp", str(tmp_path / "sd.npz"), "-o", str(tmp_path / "out"),
                 "--experts", "2", "--top-k", "1", "--activation", "gelu_tanh"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, why
    # the dense bias is copied into both experts: 2 bad values in our stacked parameter
    assert "converted parameter 'layers.1.experts.b2' holds 2 NaN/Inf value(s) of 16" in err, why
    assert not (tmp_path / "out").exists()
