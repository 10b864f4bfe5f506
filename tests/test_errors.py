"""Bad input gets one line naming the problem, never a traceback or a misleading message (issue 10 §5):
configs too large for this machine, the project's own config.json given to bench, files of the wrong kind
given to convert, run and verify, and the demo's count of selection sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import ref
import ref.io
import ref.model
from export import exporter
from hypermoe import bench
from hypermoe.cli import main
from hypermoe.layer import HyperMoELayer
from hypermoe.model import HyperMoETransformer

CFG = ref.tiny_config()
HUGE = ref.HyperMoEConfig(d_model=10**9, n_heads=8)  # experts alone: 8 · 2 · 10⁹ · 3072 floats


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI: exit status 2 and exactly one line on stderr, `hypermoe CMD: error: ...`; that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"hypermoe {argv[0]}: error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "tiny.onnx"
    exporter.export_model(path, CFG, ref.init(CFG, seed=0))
    return path


# --- memory: one estimate from the parameter shapes, checked before anything is allocated ------------------


@pytest.mark.parametrize("kind", ["layer", "stack", "model"])
def test_param_bytes_is_what_ref_allocates(kind):
    cfg = ref.tiny_config(n_layers=3, moe_every=2, noisy_gating=True, router_bias=True)
    init = {"layer": ref.init, "stack": ref.init_stack, "model": ref.model.init_model}[kind]
    assert ref.param_bytes(cfg, kind, 8) == sum(v.nbytes for v in init(cfg, seed=0).values())


def test_param_bytes_is_what_the_torch_modules_allocate():
    assert ref.param_bytes(CFG, "layer", 4) == sum(p.numel() * 4 for p in HyperMoELayer(CFG).parameters())
    assert ref.param_bytes(CFG, "model", 8) == sum(
        p.numel() * 8 for p in HyperMoETransformer(CFG, dtype=torch.float64).parameters())


def test_check_memory_refuses_only_what_does_not_fit():
    needed = ref.check_memory(CFG, "layer", 4, what="x", available=10**12)
    assert needed == ref.param_bytes(CFG, "layer", 4)
    assert ref.check_memory(CFG, "layer", 4, what="x", available=needed) == needed  # exactly fits
    with pytest.raises(ValueError, match=rf"^x: config needs at least ~{needed / 1024:.1f} KiB for its parameters "
                                         r"\(float32\), more than this machine's 1\.0 KiB of available memory "
                                         r"\(largest parameter experts\.w1 \(4, 16, 32\)\); reduce d_model"):
        ref.check_memory(CFG, "layer", 4, what="x", available=1024)
    # the default (official-size) layer fits on any machine that runs the suite
    ref.check_memory(ref.HyperMoEConfig(), "layer", 8, what="default layer")


@pytest.mark.parametrize("cls", [HyperMoELayer, HyperMoETransformer])
def test_torch_modules_refuse_a_config_too_large_for_memory(cls):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: config needs at least ~[\d.]+ (TiB|PiB) for its "
                                         r"parameters \(float32\), more than this machine's [\d.]+ \w+ of available"):
        cls(HUGE)
    big = ref.HyperMoEConfig(n_experts=10**6, n_heads=8)  # ~19 TiB of parameters, within torch's size limits
    assert cls(big, device="meta") is not None  # nothing is allocated on the meta device: not checked


def dense_gpt2(d: int = 8, f: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"h.0.mlp.c_fc.weight": rng.standard_normal((d, f)), "h.0.mlp.c_fc.bias": np.zeros(f),
            "h.0.mlp.c_proj.weight": rng.standard_normal((f, d)), "h.0.mlp.c_proj.bias": np.zeros(d)}


@pytest.mark.parametrize("flag", ["--experts", "--d-adapter"])
def test_convert_refuses_a_huge_upcycle_before_allocating(tmp_path, capsys, flag):
    np.savez(tmp_path / "sd.npz", **dense_gpt2())
    sizes = {"--experts": "2", "--d-adapter": "4", flag: "1000000000"}
    line = error_line(capsys, ["convert", "--from", "gpt2-mlp", str(tmp_path / "sd.npz"), "-o", str(tmp_path / "out"),
                               "--top-k", "1", "--activation", "gelu_tanh",
                               *(x for item in sizes.items() for x in item)])
    assert "upcycling: config needs at least ~" in line and "(float64), more than this machine's" in line
    assert not (tmp_path / "out").exists()


def test_bench_refuses_a_huge_config(tmp_path, capsys):
    (tmp_path / "huge.json").write_text(HUGE.to_json())
    line = error_line(capsys, ["bench", "--quick", "--config", str(tmp_path / "huge.json")])
    assert "hypermoe bench: config needs at least ~" in line and "a forward pass on 1024 tokens" in line


def test_bench_takes_a_model_directory_config(tmp_path, capsys, monkeypatch):
    seen = []

    def fake_run(opts, progress=None):
        seen.append(opts.cfg)
        raise ValueError("stopped before running")

    monkeypatch.setattr(bench, "run", fake_run)
    model = tmp_path / "model"
    ref.io.save_dir(model, CFG, ref.init_stack(CFG, seed=0), "stack")  # config.json with kind and spec_version
    (tmp_path / "bare.json").write_text(CFG.to_json())
    for config in (model / "config.json", model, tmp_path / "bare.json"):
        assert error_line(capsys, ["bench", "--config", str(config)]).endswith("stopped before running")
    assert seen == [CFG, CFG, CFG]
    # the project's own file with sizes too large: the memory estimate, not "unknown config field(s): kind"
    (model / "config.json").write_text(json.dumps({"kind": "stack", "spec_version": ref.SPEC_VERSION, **HUGE.to_dict()}))
    monkeypatch.undo()
    assert "config needs at least ~" in error_line(capsys, ["bench", "--config", str(model / "config.json")])


# --- files of the wrong kind ---------------------------------------------------------------------------------


def test_convert_names_what_a_file_of_random_bytes_is(tmp_path, capsys):
    (tmp_path / "random.bin").write_bytes(bytes([0x97, 0xE4, 0x77, 0x24]) + np.random.default_rng(0).bytes(4092))
    line = error_line(capsys, ["convert", "--from", "official-gpt2", str(tmp_path / "random.bin"), "-o",
                               str(tmp_path / "out"), "--top-k", "1", "--activation", "gelu_tanh"])
    assert line.endswith("random.bin: unrecognised content (4096 bytes, starting 97 e4 77 24 "
                         f"{' '.join(f'{b:02x}' for b in (tmp_path / 'random.bin').read_bytes()[4:8])}); convert "
                         "reads torch checkpoints (.bin, .pt), .safetensors files and .npz archives of named arrays")
    assert "pickle" not in line


def test_convert_names_a_plain_pickle_without_classes(tmp_path, capsys):
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    line = error_line(capsys, ["convert", "--from", "official-gpt2", str(tmp_path / "plain.pkl"), "-o",
                               str(tmp_path / "out"), "--top-k", "1", "--activation", "gelu_tanh"])
    assert "plain.pkl: a pickle that is not a torch checkpoint" in line and "pickled code" not in line


@pytest.mark.parametrize("content, start", [(b"hello, text", "68 65 6c 6c 6f 2c 20 74"), (b"", "nothing: empty file")])
def test_run_input_that_is_not_npy(tiny_onnx, tmp_path, capsys, content, start):
    (tmp_path / "x.npy").write_bytes(content)
    line = error_line(capsys, ["run", str(tiny_onnx), "--input", str(tmp_path / "x.npy"), "--provider", "cpu"])
    assert line.endswith(f"x.npy: not a .npy file (starts with {start}; a .npy file starts with 93 4e 55 4d 50 59, "
                         "np.save writes one)")


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 3, 5), np.float32), "input dim 2 is 5, the model expects 16 (shape ['batch', 'seq', 16])"),
    (np.zeros((2, 3, 16), np.int64), "input must be floating point (the model takes tensor(float)), got int64"),
    (np.zeros((3, 16), np.float32), "input must be a numpy array of rank 3 ['batch', 'seq', 16], got (3, 16)"),
])
def test_run_input_of_the_wrong_shape_or_dtype(tiny_onnx, tmp_path, capsys, array, message):
    np.save(tmp_path / "x.npy", array)
    line = error_line(capsys, ["run", str(tiny_onnx), "--input", str(tmp_path / "x.npy"), "--provider", "cpu"])
    assert line.endswith(f"x.npy: {message}")


def test_verify_on_a_directory(tmp_path, capsys):
    line = error_line(capsys, ["verify", str(tmp_path)])
    assert line.endswith(f"{tmp_path} is a directory: verify takes the exported .onnx file, and --source {tmp_path} "
                         "for the model directory it was exported from")


def test_demo_prints_the_number_of_possible_sets(capsys):
    assert main(["demo", "--tokens", "3", "--batch", "1", "--top-k", "2"]) == 0
    assert f"of C(8, 2) = {math.comb(8, 2)} possible" in capsys.readouterr().out


def test_bench_quick_help_states_the_measured_duration(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "takes 2½–3 minutes on 2 cores" in help_text and "about a minute" not in help_text
