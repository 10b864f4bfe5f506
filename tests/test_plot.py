"""hypermoe.train.plot: `hypermoe plot` reads synthetic log.jsonl files (the format `hypermoe train` writes) and writes
valid PNGs; bad input (missing or corrupt log, existing output without --force) is one line and exit 2."""

from __future__ import annotations

import json
import struct

import pytest

from hypermoe.cli import main
from hypermoe.train.plot import plot_runs, read_run

pytest.importorskip("matplotlib", reason="hypermoe plot needs matplotlib (pip install '.[train]')")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, *, n_experts=4, blocks=(1, 3), hyper=True, as_list=False, steps=30, eval_every=10):
    """A run directory whose log.jsonl has a training line every step and an eval line every eval_every steps."""
    run_dir.mkdir()
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "lr": 1e-3, "loss": 5.5 / step**0.3, "grad_norm": 1.0, "tokens_per_s": 1e4})
        if step % eval_every == 0:
            fractions = {str(b): [(e + 1 + step / 10) for e in range(n_experts)] for b in blocks}
            fractions = {k: [v / sum(row) for v in row] for k, row in fractions.items()}
            record = {"step": step, "val_loss": 5.0 / step**0.3, "val_ppl": 100.0, "expert_fraction": fractions}
            if hyper:
                record["hyper_share"] = {str(b): 0.1 * step / steps for b in blocks}
            if as_list:
                record["expert_fraction"] = list(fractions.values())
                record.pop("hyper_share", None)
            lines.append(record)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_command_writes_valid_pngs(tmp_path, capsys):
    import matplotlib.image

    moe = write_run(tmp_path / "moe")
    hyper = write_run(tmp_path / "hyper", blocks=(1,), n_experts=8)
    out = tmp_path / "plots"
    assert main(["plot", str(moe), str(hyper), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["expert_load_layer1.png", "expert_load_layer3.png", "hyper_share.png", "loss.png"]
    printed = capsys.readouterr().out
    assert all(f"wrote {out / name}" in printed for name in names)
    for name in names:
        width, height = png_size(out / name)
        assert 200 <= width <= 4000 and 100 <= height <= 4000, (name, width, height)
        image = matplotlib.image.imread(out / name)
        assert image.shape[:2] == (height, width)
        assert image[..., :3].std() > 0.01, f"{name} is blank"  # something was drawn


def test_plot_is_deterministic_and_refuses_existing_output(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    out = tmp_path / "plots"
    first = plot_runs([run], out)
    data = {p: p.read_bytes() for p in first}
    assert main(["plot", str(run), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert {p: p.read_bytes() for p in first} == data
    assert plot_runs([run], out, force=True) == first
    assert {p: p.read_bytes() for p in first} == data  # same bytes: no timestamp or version stamp


def test_an_output_that_is_a_file_is_refused_even_with_force(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (tmp_path / "plots").write_text("a file")
    for force in ((), ("--force",)):
        assert main(["plot", str(run), "-o", str(tmp_path / "plots"), *force]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file: -o takes the directory" in err and "pass --force" not in err
    assert (tmp_path / "plots").read_text() == "a file"


def test_missing_keys_skip_plots_with_a_note(tmp_path, caplog):
    train_only = tmp_path / "dense"
    train_only.mkdir()
    (train_only / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n"
                                                  for s in range(1, 6)))
    listed = write_run(tmp_path / "listed", as_list=True)
    with caplog.at_level("WARNING", logger="hypermoe.train.plot"):
        paths = plot_runs([train_only, listed], tmp_path / "out")
    assert sorted(p.name for p in paths) == ["expert_load_layer0.png", "expert_load_layer1.png", "loss.png"]
    assert "hyper_share.png skipped" in caplog.text and "dense logged no 'expert_fraction'" in caplog.text


def test_missing_log_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.jsonl not found" in err
    assert main(["plot", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, message", [
    ('{"step": 3, "loss": 1.0', "log.jsonl:2: invalid JSON"),
    ('[1, 2]', "log.jsonl:2: expected a JSON object"),
    ('{"step": "x", "loss": 1.0}', "log.jsonl:2: 'step' must be an integer"),
    ('{"step": 3, "val_loss": 1.0, "expert_fraction": {"1": []}}', "log.jsonl:2: 'expert_fraction' of layer 1"),
])
def test_corrupt_line_names_file_and_line(tmp_path, capsys, bad, message):
    run = tmp_path / "run"
    run.mkdir()
    good = json.dumps({"step": 1, "loss": 2.0})
    (run / "log.jsonl").write_text(f"{good}\n{bad}\n{good}\n")
    assert main(["plot", str(run), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_partial_last_line_of_a_killed_run_is_skipped(tmp_path):
    run = write_run(tmp_path / "run", steps=10)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 11, "lo')
    assert [r["step"] for r in read_run(run).train] == list(range(1, 11))
