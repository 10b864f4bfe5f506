"""hypermoe.train: training lowers the loss, exact resume, checkpoints, aux-loss coefficients, the frozen-heads
ablation, and the errors of `hypermoe train`. Tiny configs on a synthetic byte corpus written here."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from hypermoe import cli
from hypermoe.model import HyperMoETransformer
from hypermoe.train import (
    HYPER_HEADS, PRESETS, TrainConfig, build_model, build_optimizer, evaluate, load_checkpoint, lr_at, open_corpus,
    read_log, save_checkpoint, total_loss, train,
)

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "Every cloud has a silver lining, and the early bird catches the worm. ") * 60


def write_corpus(path, text=TEXT, dtype="uint8"):
    path.mkdir()
    data = np.frombuffer(text.encode(), dtype=np.uint8).astype(dtype)
    n = len(data)
    splits = {"train": data[: n * 8 // 10], "val": data[n * 8 // 10: n * 9 // 10], "test": data[n * 9 // 10:]}
    for name, arr in splits.items():
        (path / f"{name}.bin").write_bytes(arr.tobytes())
    meta = {"vocab_size": 256, "dtype": dtype, "source": "synthetic test text",
            "sha256": {name: hashlib.sha256(arr.tobytes()).hexdigest() for name, arr in splits.items()}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(corpus, **changes):
    base = dict(model=PRESETS["tiny"], data=str(corpus), steps=6, batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, eval_every=0, eval_tokens=512, checkpoint_every=3, log_every=1)
    return TrainConfig(**{**base, **changes})


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir) if "loss" in r]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(model=PRESETS["tiny"], data="x", steps=10, warmup_steps=2, lr=1.0, min_lr=0.1, seq_len=16)
    assert [lr_at(cfg, s) for s in (1, 2)] == [0.5, 1.0]
    assert lr_at(cfg, 6) == pytest.approx(0.55)  # halfway through the decay: (lr + min_lr) / 2
    assert lr_at(cfg, 10) == pytest.approx(0.1)


def test_training_lowers_validation_loss(corpus, tmp_path):
    cfg = tiny(corpus, steps=40, batch_size=8, seq_len=32, eval_every=40, log_every=10)
    before = evaluate(cfg, build_model(cfg), open_corpus(corpus).val)["val_loss"]
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.val_loss < before - 1.0, (before, result.val_loss)
    evals = [r for r in read_log(tmp_path / "run") if "val_loss" in r]
    assert evals[-1]["val_loss"] == result.val_loss
    for fractions in evals[-1]["expert_fraction"].values():  # per HyperMoE block, over the N experts
        assert len(fractions) == cfg.model.n_experts and sum(fractions) == pytest.approx(1.0)
    assert all(0 < share < 1 for share in evals[-1]["hyper_share"].values())
    test = [r for r in read_log(tmp_path / "run") if "test_loss" in r]  # the held-out split, once, at the end
    assert len(test) == 1 and test[0]["step"] == cfg.steps and abs(test[0]["test_loss"] - result.val_loss) < 1.0


def test_resume_equals_uninterrupted_run_bitwise(corpus, tmp_path, one_thread):
    # dropout, router jitter and noisy gating: draws from torch's generator, whose state the checkpoint holds
    model = PRESETS["tiny"].replace(dropout=0.1, router_jitter=0.05, noisy_gating=True)
    cfg = tiny(corpus, model=model)
    train(cfg, tmp_path / "a", progress=False)

    def kill_after_step_4(record):  # as a SIGTERM would: past the checkpoint at 3, step 4 already logged
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=False, callback=kill_after_step_4)
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 3
    train(cfg, tmp_path / "b", resume=True, progress=False)
    assert len(losses(tmp_path / "a")) == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bitwise: same computation, one thread
    val = [[r["val_loss"] for r in read_log(tmp_path / run) if "val_loss" in r] for run in "ab"]
    assert val[0] == val[1]


def test_checkpoint_round_trip(corpus, tmp_path):
    cfg = tiny(corpus)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    tokens = torch.from_numpy(np.frombuffer(TEXT[:32].encode(), np.uint8).astype(np.int64).reshape(2, 16))
    loss, _ = total_loss(cfg, model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    optimizer.step()
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", cfg, 1, model, optimizer)

    loaded = HyperMoETransformer.from_dir(tmp_path / "run/checkpoint/model")
    model.eval(), loaded.eval()
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    model2 = build_model(cfg.replace(seed=1))  # other initial weights, all overwritten by the checkpoint
    optimizer2 = build_optimizer(cfg, model2)
    assert load_checkpoint(tmp_path / "run", cfg, model2, optimizer2) == 1
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], optimizer2.state[p2][key]), key
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in optimizer2.param_groups]


@pytest.mark.parametrize("aux, field", [("switch_balance", "balance_coef"), ("z_loss", "z_loss_coef"),
                                        ("cv_balance", "balance_coef")])
def test_aux_coefficient_adds_its_gradient(corpus, aux, field):
    c = 0.37
    balance = "cv_balance" if aux == "cv_balance" else "switch_balance"
    cfg0 = tiny(corpus, balance_coef=0.0, z_loss_coef=0.0, balance_loss=balance)
    model = build_model(cfg0)
    tokens = torch.from_numpy(np.frombuffer(TEXT[:66].encode(), np.uint8).astype(np.int64).reshape(2, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]

    params = list(model.parameters())

    def grads(loss_fn):  # aux reaches only the routers and what feeds them: zeros for the rest
        found = torch.autograd.grad(loss_fn(model(x)), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, found)])

    g_lm = grads(lambda out: total_loss(cfg0, out, y)[0])
    g_aux = grads(lambda out: out.aux[aux])
    g_total = grads(lambda out: total_loss(cfg0.replace(**{field: c}), out, y)[0])
    assert g_aux.abs().max() > 0
    scale = (g_lm.abs() + c * g_aux.abs()).max()
    torch.testing.assert_close(g_total, g_lm + c * g_aux, rtol=0, atol=1e-5 * float(scale))


def test_freeze_hyper_heads_keeps_the_hyper_expert_zero(corpus, tmp_path):
    cfg = tiny(corpus, freeze_hyper_heads=True, eval_every=3)
    train(cfg, tmp_path / "run", progress=False)
    model = HyperMoETransformer.from_dir(tmp_path / "run/checkpoint/model")
    heads = {n: p for n, p in model.named_parameters() if n.startswith(HYPER_HEADS)}
    assert len(heads) == 8 and all(not p.any() for p in heads.values())
    moved = [n for n, p in model.named_parameters() if n.startswith("hyper.trunk")]
    assert moved  # the rest of the hypernetwork exists (and gets no useful gradient)
    x = torch.randn(2, 5, cfg.model.d_model, generator=torch.Generator().manual_seed(0))
    layer = model.blocks[0].moe
    selected = layer(x, 0).routing.selected.reshape(-1, cfg.model.top_k)
    assert not layer._hyper_expert(x.reshape(-1, cfg.model.d_model), selected, 0).any()
    shares = [r["hyper_share"] for r in read_log(tmp_path / "run") if "hyper_share" in r]
    assert shares and all(v == 0.0 for s in shares for v in s.values())


@pytest.mark.parametrize("model", [PRESETS["tiny"].replace(hyper_expert=False),  # plain MoE
                                   PRESETS["tiny"].replace(hyper_expert=False, n_experts=1, top_k=1)])  # dense
def test_variants_train(corpus, tmp_path, model):
    result = train(tiny(corpus, model=model, steps=3), tmp_path / "run", progress=False)
    assert np.isfinite(result.loss) and np.isfinite(result.val_loss)
    last_eval = [r for r in read_log(tmp_path / "run") if "hyper_share" in r][-1]
    assert all(v == 0.0 for v in last_eval["hyper_share"].values())


# --- `hypermoe train` errors: exit 2, one line naming the problem ---

def run_cli(capsys, *args):
    code = cli.main(["train", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err.strip()


SMALL = ["--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64"]


def test_cli_trains_and_refuses_existing_out(corpus, tmp_path, capsys):
    assert cli.main(["train", *map(str, SMALL), "--data", str(corpus), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "step 2, loss" in capsys.readouterr().out
    code, err = run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and "already exists" in err and "--force" in err and "\n" not in err
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run", "--force")[0] == 0


def test_cli_missing_corpus(tmp_path, capsys):
    code, err = run_cli(capsys, *SMALL, "--data", tmp_path / "nope", "--out", tmp_path / "run")
    assert code == 2 and "corpus directory" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_cli_corrupt_corpus(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", dtype="uint16")
    with open(corpus / "train.bin", "ab") as fh:
        fh.write(b"\x00")  # an odd number of bytes for uint16 tokens
    code, err = run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and "train.bin" in err and "not a multiple of 2" in err


def test_cli_corpus_changed_after_meta(corpus, tmp_path, capsys):
    (corpus / "val.bin").write_bytes(b"x" * 500)
    code, err = run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and "val.bin" in err and "sha256" in err


def test_cli_resume_with_changed_hyperparameters(corpus, tmp_path, capsys):
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run")[0] == 0
    code, err = run_cli(capsys, "--resume", tmp_path / "run", "--lr", "0.5", "--seed", "3")
    assert code == 2 and "lr, seed" in err and "train.json" in err
    code, _ = run_cli(capsys, "--resume", tmp_path / "run", "--steps", "3")  # steps may change
    assert code == 0 and [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [2, 3]  # last steps


def test_cli_resume_from_checkpoint_of_another_config(corpus, tmp_path, capsys):
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "b", "--no-hyper-expert")[0] == 0
    shutil.rmtree(tmp_path / "a/checkpoint")
    shutil.copytree(tmp_path / "b/checkpoint", tmp_path / "a/checkpoint")
    code, err = run_cli(capsys, "--resume", tmp_path / "a", "--steps", "3")
    assert code == 2 and "another model config" in err and "hyper_expert" in err


def test_config_validation_names_the_field(corpus):
    with pytest.raises(ValueError, match="'seq_len'"):
        tiny(corpus, seq_len=64)
    with pytest.raises(ValueError, match="'balance_loss'"):
        tiny(corpus, balance_loss="z_loss")
    with pytest.raises(ValueError, match="'freeze_hyper_heads'"):
        tiny(corpus, model=PRESETS["tiny"].replace(hyper_expert=False), freeze_hyper_heads=True)


def test_the_corpus_tokenizer_goes_into_the_model_directory(corpus, tmp_path):
    """A corpus whose meta.json names a tokenizer.json (scripts/fetch_corpus.py --tokenizer bpe): the run's checkpoint
    model directory carries a copy; a tokenizer.json changed after meta.json is refused when the corpus is opened."""
    text = '{"version": "1.0", "model": {"type": "BPE"}}\n'  # only copied and hashed here (tests/test_hf.py loads one)
    (corpus / "tokenizer.json").write_text(text)
    meta = json.loads((corpus / "meta.json").read_text())
    meta["tokenizer"] = {"kind": "bpe", "file": "tokenizer.json", "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (corpus / "meta.json").write_text(json.dumps(meta))
    train(tiny(corpus, steps=3), tmp_path / "run", progress=False)
    assert (tmp_path / "run/checkpoint/model/tokenizer.json").read_text() == text
    HyperMoETransformer.from_dir(tmp_path / "run/checkpoint/model")  # still a model directory
    (corpus / "tokenizer.json").write_text(text + " ")
    with pytest.raises(ValueError, match="tokenizer.json: sha256 differs"):
        open_corpus(corpus)
