"""Outputs are atomic and never silently replaced (ref/files.py and every command that writes): refused when
they exist unless --force, checked before any work, staged and renamed, nothing left behind on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import ref
import ref.io
from export import exporter
from hypermoe.cli import main
from ref.files import atomic_output, check_output

CFG = ref.tiny_config()
FORCE = "already exists; pass --force to replace it"


def leftovers(folder: Path) -> list[str]:
    """Staging folders (.NAME.tmp-PID-RANDOM) and set-aside directories (.NAME.old-PID-RANDOM) in `folder`."""
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name or ".old-" in name)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hypermoe {command}: error: "), err
    return err


def never(*args, **kwargs):
    raise AssertionError("called, but the output should have been refused first")


# ---------------------------------------------------------------------------------------------
# ref.files
# ---------------------------------------------------------------------------------------------


def test_a_file_is_renamed_in_only_at_the_end(tmp_path):
    dest = tmp_path / "out.txt"
    with atomic_output(dest) as tmp:
        tmp.write_text("new")
        assert tmp.name == dest.name and tmp.parent.parent == tmp_path and not dest.exists()
    assert dest.read_text() == "new" and leftovers(tmp_path) == []


def test_an_existing_file_is_refused_unless_force(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(ValueError, match=f"^{dest} {FORCE}$"):
        with atomic_output(dest) as tmp:
            raise AssertionError("the block must not run")
    with atomic_output(dest, force=True) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_a_failure_leaves_the_destination_as_it_was(tmp_path, error):
    (tmp_path / "old.txt").write_text("old")
    for name, force in (("old.txt", True), ("new.txt", False)):
        with pytest.raises(type(error)) as info:
            with atomic_output(tmp_path / name, force=force) as tmp:
                tmp.write_text("half")
                raise error
        if isinstance(error, KeyboardInterrupt):  # the CLI prints this note
            assert info.value.__notes__[-1] == f"nothing written to {tmp_path / name}"
    assert (tmp_path / "old.txt").read_text() == "old" and not (tmp_path / "new.txt").exists()
    assert leftovers(tmp_path) == []


def test_destinations_that_cannot_be_written_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    cases = {tmp_path / "missing" / "x": "output directory .*missing does not exist",
             tmp_path / "file" / "x": "file is not a directory",
             Path("/proc/x.onnx"): "cannot create files in /proc",
             tmp_path / "dir": "is a directory; give a file name"}
    for path, message in cases.items():
        for force in (False, True):  # --force never helps here
            with pytest.raises(ValueError, match=message):
                check_output(path, force=force)
    assert sorted(os.listdir(tmp_path)) == ["dir", "file"]


def test_sidecar_files_are_renamed_with_the_file_and_not_replaced_unless_force(tmp_path):
    dest = tmp_path / "m.onnx"
    with atomic_output(dest) as tmp:
        tmp.write_text("graph")
        (tmp.parent / "m.onnx.data").write_text("data")
    assert dest.read_text() == "graph" and (tmp_path / "m.onnx.data").read_text() == "data"
    dest.unlink()  # a stray data file without its graph is not replaced silently either
    with pytest.raises(ValueError, match=f"m.onnx.data {FORCE}"):
        with atomic_output(dest) as tmp:
            tmp.write_text("graph 2")
            (tmp.parent / "m.onnx.data").write_text("data 2")
    assert not dest.exists() and (tmp_path / "m.onnx.data").read_text() == "data" and leftovers(tmp_path) == []


def test_directories_replace_only_what_they_would_write(tmp_path):
    entries = ("config.json", "weights.npz")
    dest = tmp_path / "model"
    dest.mkdir()  # an empty directory counts as absent
    with atomic_output(dest, directory=True, entries=entries) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(ValueError, match=f"{dest} {FORCE}"):
        check_output(dest, directory=True, entries=entries)
    with atomic_output(dest, force=True, directory=True, entries=entries) as tmp:
        (tmp / "config.json").write_text("2")
        (tmp / "weights.npz").write_text("2")
    assert sorted(os.listdir(dest)) == list(entries) and (dest / "config.json").read_text() == "2"
    (dest / "notes.txt").write_text("mine")  # a folder of other files is never deleted, even with force
    with pytest.raises(ValueError, match="holds notes.txt besides config.json, weights.npz; not replaced, even with --force"):
        check_output(dest, force=True, directory=True, entries=entries)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# ref.io.save_dir and convert -o
# ---------------------------------------------------------------------------------------------


def test_save_dir_refuses_an_existing_model_unless_force(tmp_path, monkeypatch):
    dest = tmp_path / "m"
    ref.io.save_dir(dest, CFG, ref.init(CFG, seed=1), "layer")
    before = {name: (dest / name).read_bytes() for name in os.listdir(dest)}
    with pytest.raises(ValueError, match=f"{dest} {FORCE}"):
        ref.io.save_dir(dest, CFG, ref.init(CFG, seed=2), "layer")
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        ref.io.save_dir(dest, CFG, ref.init(CFG, seed=2), "layer", force=True)
    assert {name: (dest / name).read_bytes() for name in os.listdir(dest)} == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    ref.io.save_dir(dest, CFG, ref.init(CFG, seed=2), "layer", force=True)
    np.testing.assert_array_equal(ref.io.load_dir(dest)[1]["router.weight"], ref.init(CFG, seed=2)["router.weight"])
    assert leftovers(tmp_path) == []


def dense_gpt2_npz(path: Path, d: int = 4, f: int = 8, L: int = 2) -> str:
    rng = np.random.default_rng(0)
    sd = {"wte.weight": rng.standard_normal((9, d))}
    for i in range(L):
        sd.update({f"h.{i}.mlp.c_fc.weight": rng.standard_normal((d, f)), f"h.{i}.mlp.c_fc.bias": rng.standard_normal(f),
                   f"h.{i}.mlp.c_proj.weight": rng.standard_normal((f, d)), f"h.{i}.mlp.c_proj.bias": rng.standard_normal(d)})
    np.savez(path, **sd)
    return str(path)


def test_convert_refuses_an_existing_output_before_reading_and_replaces_it_with_force(tmp_path, capsys, monkeypatch):
    from hypermoe import convert

    sd = dense_gpt2_npz(tmp_path / "gpt2.npz")
    upcycle = ["convert", "--from", "gpt2-mlp", sd, "--experts", "2", "--top-k", "1", "--d-adapter", "2",
               "--activation", "gelu_tanh"]
    out = tmp_path / "out"
    assert main([*upcycle, "-o", str(out), "--seed", "1"]) == 0
    first = (out / "weights.npz").read_bytes()
    (tmp_path / "a_file").write_text("keep")
    with monkeypatch.context() as m:
        m.setattr(convert, "convert", never)  # refused before the state dict is read
        for dest in (out, tmp_path / "a_file"):
            assert main([*upcycle, "-o", str(dest), "--seed", "2"]) == 2
            assert one_error_line(capsys, "convert").endswith(f"{dest} {FORCE}\n")
    assert (out / "weights.npz").read_bytes() == first and (tmp_path / "a_file").read_text() == "keep"
    assert main([*upcycle, "-o", str(out), "--seed", "2", "--force"]) == 0
    assert (out / "weights.npz").read_bytes() != first
    assert main([*upcycle, "-o", str(tmp_path / "a_file"), "--seed", "2", "--force"]) == 0  # a file, replaced
    assert ref.io.load_config(tmp_path / "a_file")[1] == "stack" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# export, run --save
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny layer's directory and its export (one export for the module: each takes seconds)."""
    folder = tmp_path_factory.mktemp("tiny")
    ref.io.save_dir(folder / "layer", CFG, ref.init(CFG, seed=3), "layer")
    assert main(["export", str(folder / "layer"), "-o", str(folder / "layer.onnx")]) == 0
    return folder / "layer", folder / "layer.onnx"


def test_export_refuses_an_existing_file_before_work_and_replaces_it_with_force(tmp_path, tiny_export, capsys,
                                                                                monkeypatch):
    source, onnx_file = tiny_export
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    with monkeypatch.context() as m:
        m.setattr(exporter, "load_source", never)
        m.setattr(exporter, "_export_to", never)
        assert main(["export", str(source), "-o", str(dest)]) == 2
        assert one_error_line(capsys, "export").endswith(f"{dest} {FORCE}\n")
        for bad, message in ((["-o", "/proc/x.onnx"], "cannot create files in /proc"),
                             (["-o", str(tmp_path / "no" / "m.onnx")], "does not exist"),
                             (["-o", str(tmp_path / "x.onnx"), "--opset", "99"], "opset must be an int in [18, "),
                             (["-o", str(tmp_path / "x.onnx"), "--eos-token-id", "2"], "without --with-past there is"),
                             (["-o", str(tmp_path / "x.onnx"), "--pad-token-id", "0"], "add --with-past, or drop")):
            assert main(["export", str(source), *bad]) == 2
            assert message in one_error_line(capsys, "export")
    assert dest.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert main(["export", str(source), "-o", str(dest), "--force"]) == 0
    assert dest.read_bytes() == onnx_file.read_bytes() and leftovers(tmp_path) == []


def test_a_failed_check_leaves_nothing_and_an_existing_file_untouched(tmp_path, tiny_export, monkeypatch):
    source, _ = tiny_export
    cfg, params, _ = ref.io.load_dir(source)
    (tmp_path / "old.onnx").write_bytes(b"old")
    seen = []

    def failing_check(path, *, name=None):
        seen.append(Path(path))
        assert Path(path).is_file()  # the staged file exists and is the one checked
        raise ValueError(f"{name}: ONNX check failed: simulated")

    monkeypatch.setattr(exporter, "check_file", failing_check)
    for name, force in (("new.onnx", False), ("old.onnx", True)):
        with pytest.raises(ValueError, match=f"{tmp_path / name}: ONNX check failed: simulated"):
            exporter.export_model(tmp_path / name, cfg, params, force=force)
    assert [p.parent.name.startswith(f".{p.name}.tmp-") for p in seen] == [True, True]
    assert sorted(os.listdir(tmp_path)) == ["old.onnx"] and (tmp_path / "old.onnx").read_bytes() == b"old"


def test_external_data_is_staged_and_named_by_its_final_name(tmp_path, tiny_export, monkeypatch):
    source, _ = tiny_export
    cfg, params, _ = ref.io.load_dir(source)
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)  # every export takes the external-data path
    result = exporter.export_model(tmp_path / "m.onnx", cfg, params)
    assert result.external_data and sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}
    exporter.check_file(tmp_path / "m.onnx")  # the renamed pair still checks


def test_run_save_is_checked_before_running_and_replaced_only_with_force(tmp_path, tiny_export, capsys, monkeypatch):
    from export import runtime

    _, onnx_file = tiny_export
    dest = tmp_path / "y.npy"
    np.save(dest, np.zeros(1))
    before = dest.read_bytes()
    run = ["run", str(onnx_file), "--batch", "1", "--seq", "3", "--runs", "1", "--warmup", "0", "--provider", "cpu"]
    with monkeypatch.context() as m:
        m.setattr(runtime, "OnnxRunner", never)
        assert main([*run, "--save", str(dest)]) == 2
        assert one_error_line(capsys, "run").endswith(f"{dest} {FORCE}\n")
    assert dest.read_bytes() == before
    assert main([*run, "--save", str(dest), "--force"]) == 0
    assert np.load(dest).shape == (1, 3, CFG.d_model)
    assert main([*run, "--save", str(tmp_path / "z")]) == 0  # numpy's convention: .npy appended
    assert sorted(os.listdir(tmp_path)) == ["y.npy", "z.npy"]


def test_conformance_report_is_refused_unless_force(tmp_path, capsys):
    dest = tmp_path / "report.json"
    dest.write_text("old")
    argv = ["conformance", "--impl", "ref", "--cases", "tie_*", "--quiet", "--report", str(dest)]
    assert main(argv) == 2
    assert one_error_line(capsys, "conformance").endswith(f"{dest} {FORCE}\n") and dest.read_text() == "old"
    assert main([*argv, "--force"]) == 0
    assert isinstance(json.loads(dest.read_text()), dict) and leftovers(tmp_path) == []


def test_bench_outputs_are_refused_before_the_run(tmp_path, capsys, monkeypatch):
    from hypermoe import bench

    (tmp_path / "b.md").write_text("old")
    monkeypatch.setattr(bench, "run", never)
    assert main(["bench", "--quick", "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")]) == 2
    assert one_error_line(capsys, "bench").endswith(f"{tmp_path / 'b.md'} {FORCE}\n")
    assert sorted(os.listdir(tmp_path)) == ["b.md"]


# ---------------------------------------------------------------------------------------------
# hypermoe main: its temporary directory
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_main(tmp_path, monkeypatch):
    """`hypermoe main` on a tiny layer, its temporary directories made under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(exporter, "default_model", lambda seed=0: (CFG, ref.init(CFG, seed=seed), "layer"))
    return ["main", "--provider", "cpu", "--seq", "4", "--runs", "1"]


def test_main_removes_its_temporary_directory_unless_keep(tmp_path, tiny_main, capsys):
    assert main(tiny_main) == 0
    assert "(removed at exit; --keep or --workdir keeps it)" in capsys.readouterr().out
    assert os.listdir(tmp_path / "tmp") == []
    assert main([*tiny_main, "--keep"]) == 0
    kept = capsys.readouterr().out.strip().splitlines()[-1]
    assert kept.startswith("kept ") and os.listdir(kept[len("kept "):]) == ["hypermoe.onnx"]


def test_main_removes_its_temporary_directory_when_interrupted(tmp_path, tiny_main, capsys, monkeypatch):
    from export import verify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify", interrupted)
    assert main(tiny_main) == 130
    assert capsys.readouterr().err == "hypermoe main: interrupted (SIGINT)\n"
    assert os.listdir(tmp_path / "tmp") == []


def test_main_times_both_runtimes_with_the_same_threads_and_says_how_many(tiny_main, capsys, monkeypatch):
    """onnxruntime's session and torch's timed calls run with --threads (torch's count restored after), and the
    report states the count, the warm-up and the runs for each."""
    import torch

    from export import runtime
    from hypermoe.layer import HyperMoELayer

    sessions, calls = [], []
    original_init, original_forward = runtime.OnnxRunner.__init__, HyperMoELayer.forward

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        sessions.append(self.session.get_session_options().intra_op_num_threads)

    def forward(self, *args, **kwargs):
        calls.append(torch.get_num_threads())
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(runtime.OnnxRunner, "__init__", init)
    monkeypatch.setattr(HyperMoELayer, "forward", forward)
    before = torch.get_num_threads()
    assert main([*tiny_main, "--runs", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert sessions == [1] and calls == [1] * (3 + 4) and torch.get_num_threads() == before
    assert "onnxruntime CPU (1 CPU thread): (1, 4, 16), 4 warm-up runs, median of 3:" in out
    assert "PyTorch eager (CPU, 1 CPU thread, hypermoe.layer, float32, timed after onnxruntime, 4 warm-up runs, " \
           "median of 3)" in out
    assert main([*tiny_main, "--threads", "0"]) == 2 and "--threads must be ≥ 1" in capsys.readouterr().err


def test_main_workdir_refuses_an_existing_export_unless_force(tmp_path, tiny_main, capsys, monkeypatch):
    (tmp_path / "hypermoe.onnx").write_bytes(b"old")
    with monkeypatch.context() as m:
        m.setattr(exporter, "_export_to", never)
        assert main([*tiny_main, "--workdir", str(tmp_path)]) == 2
        assert one_error_line(capsys, "main").endswith(f"{tmp_path / 'hypermoe.onnx'} {FORCE}\n")
    assert main([*tiny_main, "--workdir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "hypermoe.onnx").read_bytes() != b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("torch_kept_it", [True, False], ids=["in-the-chain", "swallowed"])
def test_an_interrupt_turned_into_another_error_is_reported_as_interrupted(tmp_path, monkeypatch, capsys,
                                                                           torch_kept_it):
    """SIGTERM while torch.onnx.export imports torch._dynamo: the handler's Terminated raised inside that import left
    a module half initialised and torch raised an AttributeError instead, which the exporter wrapped ("torch.onnx
    export failed", exit 2). Here torch.onnx.export is replaced by that sequence, deterministically: the real
    handler raising, then torch's error, with the interrupt in its context or gone. Exit 143, one line."""
    import torch

    from hypermoe import cli

    def export_interrupted_in_an_import(*args, **kwargs):
        try:
            cli._terminate(signal.SIGTERM, None)  # what the installed SIGTERM handler does
        except KeyboardInterrupt:
            if torch_kept_it:
                raise AttributeError("partially initialized module 'torch._dynamo' has no attribute 'config' "
                                     "(most likely due to a circular import)")
        raise AttributeError("partially initialized module 'torch._dynamo' has no attribute 'config'")

    ref.io.save_dir(tmp_path / "layer", CFG, ref.init(CFG, seed=0), "layer")
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"previous export")
    monkeypatch.setattr(torch.onnx, "export", export_interrupted_in_an_import)
    assert main(["export", str(tmp_path / "layer"), "-o", str(dest), "--force"]) == 143
    note = f"; nothing written to {dest}" if torch_kept_it else ""  # the note travels with the KeyboardInterrupt
    assert capsys.readouterr().err == f"hypermoe export: interrupted (SIGTERM){note}\n"
    assert dest.read_bytes() == b"previous export" and leftovers(tmp_path) == []
    monkeypatch.setattr(torch.onnx, "export", never)  # the next command starts with no signal received
    assert main(["export", str(tmp_path / "layer"), "-o", str(dest), "--force"]) == 2


# ---------------------------------------------------------------------------------------------
# Signals: a real process, killed in the middle of an export
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_export_leaves_the_existing_file_and_no_temporaries(tmp_path):
    """SIGTERM once the staging folder exists (the export has started): exit 143, one line, the previous file
    byte-identical, no staging folder left. Waits are bounded by polling, nothing asserts on wall time."""
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"previous export")
    code = "import sys; from hypermoe.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code, "export", "-o", str(dest), "--force"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The export's staging folder, seen twice 0.2 s apart: check_output's probe folder lives microseconds,
        # the export's lives for the ~10 s of the export. Bounded generously for a loaded 2-core machine.
        deadline, seen = time.monotonic() + 120, None
        while proc.poll() is None and time.monotonic() < deadline:
            now = leftovers(tmp_path)
            if now and now == seen:
                break
            seen = now
            time.sleep(0.2)
        assert proc.poll() is None and leftovers(tmp_path), "the export never started (or finished first)"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"hypermoe export: interrupted (SIGTERM); nothing written to {dest}"
    assert dest.read_bytes() == b"previous export" and sorted(os.listdir(tmp_path)) == ["m.onnx"]
