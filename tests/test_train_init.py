"""Issue 17's training pieces: the router-gradient trap (top-1 "topk" gates are 1, so the language-model loss never
reaches the router), fine-tuning from a model directory (--init), upcycling a dense hypermoe model
(convert --from hypermoe-dense), and the resume guards (threads restored, finished runs, damaged checkpoints)."""

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ref
import ref.io
from hypermoe import cli
from hypermoe.convert import upcycle_dense_model
from hypermoe.model import HyperMoETransformer
from hypermoe.train import (
    PRESETS, RouterGradientWarning, batch, open_corpus, read_log, router_gets_task_gradient, total_loss,
    train, train_offsets,
)
from tests.test_train import SMALL, corpus, one_thread, run_cli, tiny  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def router_lm_grads(cfg, seed=0):
    """The language-model loss's gradient (CE only, no aux terms) on every router weight of a fresh model."""
    torch.manual_seed(seed)
    model = HyperMoETransformer(cfg, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = model(tokens).logits  # (B, S, V)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    return [b.moe.router.weight.grad for b in model.blocks if b.moe is not None]


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 2**16), hyper=st.booleans())
def test_topk1_router_gets_exactly_zero_lm_gradient(n, seed, hyper):
    cfg = PRESETS["tiny"].replace(n_experts=n, top_k=1, gate="topk", hyper_expert=hyper)
    assert not router_gets_task_gradient(cfg)
    topk = router_lm_grads(cfg, seed)
    switch = router_lm_grads(cfg.replace(gate="switch"), seed)  # the same weights, gate = p: the task gradient
    # The gate p/p is 1 and its derivative 1/p − p/p² is 0 in exact arithmetic; autograd evaluates those two terms,
    # so what is left is their rounding: ≤ a few u of one term, u · |∂L/∂g| · |∂p/∂logit| / p, while the switch gate's
    # gradient is |∂L/∂g| · |∂p/∂logit|. With the selected p ≥ 1/N: |topk| ≤ 8 · N · u · max |switch| (float64).
    bound = 8 * n * np.finfo(np.float64).eps * max(float(g.abs().max()) for g in switch)
    assert max(float(g.abs().max()) for g in switch) > 0
    for grad in topk:
        assert grad is None or float(grad.abs().max()) <= bound


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 2**16), hyper=st.booleans(), switch=st.booleans())
def test_switch_k1_and_topk_k2_routers_get_lm_gradient(n, seed, hyper, switch):
    cfg = PRESETS["tiny"].replace(n_experts=n, top_k=1 if switch else 2, gate="switch" if switch else "topk",
                                  hyper_expert=hyper)
    assert router_gets_task_gradient(cfg)
    for grad in router_lm_grads(cfg, seed):
        assert grad is not None and float(grad.abs().max()) > 0


def test_presets_with_k1_use_a_router_that_learns():
    for name, cfg in PRESETS.items():
        assert router_gets_task_gradient(cfg), name


def test_training_warns_once_unless_acknowledged(corpus, tmp_path):
    topk1 = PRESETS["tiny"].replace(top_k=1)
    with pytest.warns(RouterGradientWarning, match="no gradient from the language-model loss"):
        train(tiny(corpus, model=topk1, steps=1), tmp_path / "a", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouterGradientWarning)
        train(tiny(corpus, model=topk1, steps=1, allow_router_without_task_gradient=True), tmp_path / "b",
              progress=False)
        train(tiny(corpus, model=topk1.replace(gate="switch"), steps=1), tmp_path / "c", progress=False)


def test_cli_warning_is_one_line_naming_the_fix(corpus, tmp_path, capsys):
    code, err = run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run", "--gate", "switch")
    assert code == 2 and "'top_k' must be 1 with gate='switch'" in err  # tiny is k = 2: the config check speaks
    code = cli.main(["train", *SMALL, "--data", str(corpus), "--out", str(tmp_path / "run"), "--quiet",
                     "--config", str(save_model(tmp_path / "k1", PRESETS["tiny"].replace(top_k=1)))])
    err = capsys.readouterr().err
    assert code == 0 and err.count("warning:") == 1 and "--gate switch" in err
    assert "--allow-router-without-task-gradient" in err
    assert "uses that directory's config.json only" in err  # --config MODEL_DIR: the weights start fresh


def save_model(path, cfg, seed=0):
    torch.manual_seed(seed)
    return HyperMoETransformer(cfg).save_dir(path)


# --- --init: fine-tuning from a model directory ---

def test_init_starts_from_the_model_directory(corpus, tmp_path):
    """The first logged loss (before update 1) is the loaded model's loss on update 1's batch."""
    model_dir = save_model(tmp_path / "model", PRESETS["tiny"], seed=7)
    cfg = tiny(corpus, init=str(model_dir), steps=1, seed=3)
    train(cfg, tmp_path / "run", progress=False)
    logged = [r for r in read_log(tmp_path / "run") if "loss" in r][0]
    model = HyperMoETransformer.from_dir(model_dir)
    data = open_corpus(corpus)
    x, y = batch(data.train, train_offsets(cfg, 1, len(data.train)), cfg.seq_len, cfg.model.vocab_size)
    with torch.no_grad():
        expected, _ = total_loss(cfg, model(torch.from_numpy(x)), torch.from_numpy(y))
    # the same float32 forward on the same weights and batch; only the threads' reduction order may differ:
    # |Δloss| ≤ a few ulps of the loss' terms (CE ≈ log V ≈ 5.5; aux terms summed over 2 blocks)
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-5)
    fresh = tiny(corpus, steps=1, seed=3)  # the same run without --init starts elsewhere
    train(fresh, tmp_path / "fresh", progress=False)
    assert abs(read_log(tmp_path / "fresh")[0]["loss"] - logged["loss"]) > 1e-3
    assert json.loads((tmp_path / "run/train.json").read_text())["init"] == str(model_dir)


def test_cli_init_refuses_a_contradicting_config(corpus, tmp_path, capsys):
    model_dir = save_model(tmp_path / "model", PRESETS["tiny"])
    args = ["--init", model_dir, "--data", corpus, "--out", tmp_path / "run", "--steps", "1", "--batch-size", "2",
            "--seq-len", "16", "--eval-tokens", "64"]
    code, err = run_cli(capsys, *args, "--config", "cpu-small")
    assert code == 2 and "contradicts --init" in err and "d_model" in err and "\n" not in err
    code, err = run_cli(capsys, *args, "--no-hyper-expert")
    assert code == 2 and "--hyper-expert" in err and "contradict" in err
    code, err = run_cli(capsys, "--init", tmp_path / "nope", "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and "nope" in err
    assert run_cli(capsys, *args, "--config", "tiny")[0] == 0  # repeating the directory's config is fine


# --- upcycling a dense hypermoe model ---

@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 6), hyper=st.booleans())
def test_upcycled_topk1_model_computes_the_dense_logits(seed, n, hyper):
    dense_cfg = PRESETS["tiny"].replace(n_experts=1, top_k=1, hyper_expert=False)
    params = ref.model.init_model(dense_cfg, seed=seed)  # float64
    up = upcycle_dense_model(dense_cfg, params, n_experts=n, top_k=1, hyper_expert=hyper, seed=seed + 1,
                             dtype=np.float64)
    tokens = np.random.default_rng(seed).integers(0, dense_cfg.vocab_size, (2, 10))
    dense = ref.model.forward(dense_cfg, params, tokens)[0]  # (B, S, V)
    ours = ref.model.forward(up.config, up.params, tokens)[0]
    # every gate is exactly 1, every expert the dense MLP, the HyperExpert's W_up/b_up heads 0: the same float64
    # operations up to the order of the expert matmul's batch; bound: a few ulps of the logits' magnitude
    assert np.max(np.abs(ours - dense)) <= 64 * np.finfo(np.float64).eps * np.max(np.abs(dense))
    for name in params:
        if ".moe." not in name:
            np.testing.assert_array_equal(up.params[name], params[name])  # copied, not recomputed


def test_upcycled_moe_and_hypermoe_share_their_routers():
    dense_cfg = PRESETS["tiny"].replace(n_experts=1, top_k=1, hyper_expert=False)
    params = ref.model.init_model(dense_cfg, seed=0)
    moe = upcycle_dense_model(dense_cfg, params, n_experts=4, top_k=1, gate="switch", hyper_expert=False)
    hyper = upcycle_dense_model(dense_cfg, params, n_experts=4, top_k=1, gate="switch", hyper_expert=True)
    routers = [name for name in moe.params if ".router." in name]
    assert routers and all(np.array_equal(moe.params[n], hyper.params[n]) for n in routers)
    assert all(not np.any(hyper.params[n]) for n in ("hyper.w_up.weight", "hyper.b_up.weight"))


def test_upcycling_refuses_a_model_that_is_not_dense():
    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match="needs a dense model directory"):
        upcycle_dense_model(cfg, ref.model.init_model(cfg), n_experts=4, top_k=1)


def test_cli_convert_hypermoe_dense(tmp_path, capsys):
    dense = save_model(tmp_path / "dense", PRESETS["tiny"].replace(n_experts=1, top_k=1, hyper_expert=False))
    assert cli.main(["convert", "--from", "hypermoe-dense", str(dense), "--experts", "4", "--top-k", "1", "--gate",
                     "switch", "-o", str(tmp_path / "up")]) == 0
    cfg, _, kind = ref.io.load_dir(tmp_path / "up")
    assert (kind, cfg.n_experts, cfg.gate, cfg.hyper_expert) == ("model", 4, "switch", True)
    assert cli.main(["convert", "--from", "hypermoe-dense", str(dense / "config.json"), "--experts", "4",
                     "--top-k", "1", "-o", str(tmp_path / "x")]) == 2
    assert "takes a model directory" in capsys.readouterr().err


# --- resume guards (issue 20 items 2, 3, 7) ---

def test_threads_are_part_of_the_run(corpus, tmp_path, capsys, one_thread):
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run", "--threads", "1")[0] == 0
    assert json.loads((tmp_path / "run/train.json").read_text())["threads"] == 1
    torch.set_num_threads(2)
    assert run_cli(capsys, "--resume", tmp_path / "run", "--steps", "3")[0] == 0  # the README's command, no --threads
    assert torch.get_num_threads() == 1


def test_resuming_a_finished_run_is_refused(corpus, tmp_path, capsys):
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run")[0] == 0
    before = (tmp_path / "run/train.json").read_text()
    code, err = run_cli(capsys, "--resume", tmp_path / "run")
    assert code == 2 and "finished" in err and "--steps" in err
    code, err = run_cli(capsys, "--resume", tmp_path / "run", "--steps", "1")
    assert code == 2 and "step 2" in err and "--steps 1" in err
    assert (tmp_path / "run/train.json").read_text() == before  # train.json never disagrees with the checkpoint


@pytest.mark.parametrize("damage", ["state", "optimizer"])
def test_damaged_checkpoint_names_the_file(corpus, tmp_path, capsys, damage):
    assert run_cli(capsys, *SMALL, "--data", corpus, "--out", tmp_path / "run")[0] == 0
    file = tmp_path / "run/checkpoint" / ("state.json" if damage == "state" else "optimizer.npz")
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    code, err = run_cli(capsys, "--resume", tmp_path / "run", "--steps", "3")
    assert code == 2 and file.name in err and "\n" not in err


def test_summary_tokens_per_s_excludes_evaluation(corpus, tmp_path, monkeypatch):
    """A fake clock: every perf_counter call advances it by 1 s, every evaluation by 1000 s. The summary's rate counts
    only training time, so it stays far above tokens / 1000 s (with evaluation time it would be below)."""
    import hypermoe.train.loop as module  # the loop's clock and its evaluate

    clock = [0.0]

    def tick():
        clock[0] += 1.0
        return clock[0]

    real_evaluate = module.evaluate

    def slow_evaluate(*args, **kwargs):
        clock[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(module.time, "perf_counter", tick)
    monkeypatch.setattr(module, "evaluate", slow_evaluate)
    cfg = tiny(corpus, steps=4, eval_every=1, checkpoint_every=0, log_every=1)
    result = train(cfg, tmp_path / "run", progress=False)
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    assert result.tokens_per_s > tokens / 100  # ≤ a few clock ticks per step, not 4 × 1000 s of evaluation
    assert all(r["tokens_per_s"] > cfg.batch_size * cfg.seq_len / 100 for r in read_log(tmp_path / "run")
               if "tokens_per_s" in r)


# --- the experiment's statistics ---

def test_t_quantile_matches_closed_forms():
    from experiment_report import paired, t_quantile

    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    mean, low, high, n = paired([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
    assert (mean, n) == (pytest.approx(4 / 3), 3) and low < mean < high


def test_protocol_b_corpus_halves_are_disjoint():
    from fetch_corpus import WORK_SETS, WORKS

    assert not set(WORK_SETS["a"]) & set(WORK_SETS["b"])
    assert sorted(WORK_SETS["a"] + WORK_SETS["b"]) == sorted(WORKS) and len(WORK_SETS["a"]) == 21
