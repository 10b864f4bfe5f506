"""hypermoe convert on checkpoint folders (issue 19 §1): config.json + weights (one file or shards) in, every
hyperparameter config.json stores read from it, nothing guessed.

- transformers' own GPT2LMHeadModel saved with save_pretrained (one model.safetensors, and sharded through
  max_shard_size) and upcycled from the folder gives the same model directory as the weights file with the flags;
- an official HyperMoE GPT-2 folder (the fork's config.json written by hand with its fields: use_moe, k, n_experts,
  experts_embedding_dim, ...; the state dict as tests/test_convert_model.py builds it) converts without --top-k to
  the k that config.json says (k = 2: the issue's silent 128 % error when k fell back to 1);
- a flag that contradicts config.json, a config.json that contradicts the tensors, and a value neither gives are
  errors (exit 2) naming both values / the missing one; the report names where each value came from.

Tolerance: logits of the converted model against the official forward on its tensors (float64), MODEL_ATOL ·
max|logit| as derived in tests/test_convert_model.py; same directory = same config and bitwise-equal weights (a
copy, no arithmetic: both paths read the same tensors and cast them once)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import ref.io
from hypermoe.cli import main
from tests.strategies import magnitude
from tests.test_convert import official_switch_state, save_torch
from tests.test_convert_model import MODEL_ATOL, official_gpt2_lm, whole_official_gpt2_state

transformers = pytest.importorskip("transformers", reason="transformers (the test extra) writes the HF folders")


def same_directory(a, b):
    cfg_a, params_a, kind_a = ref.io.load_dir(a)
    cfg_b, params_b, kind_b = ref.io.load_dir(b)
    assert (cfg_a, kind_a, sorted(params_a)) == (cfg_b, kind_b, sorted(params_b))
    for name in params_a:  # copies of the same tensors, cast once: equal bit for bit
        np.testing.assert_array_equal(params_a[name], params_b[name])


def hf_gpt2_folder(folder, *, V, P, d, L, H, eps, act, shard=None, seed=0):
    config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=d, n_layer=L, n_head=H,
                                     layer_norm_epsilon=eps, activation_function=act, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model


UPCYCLE = ["--from", "gpt2-mlp", "--experts", "3", "--top-k", "2", "--hyper-width", "4", "--d-adapter", "2"]


@settings(max_examples=6, deadline=None)
@given(d=st.sampled_from([4, 8]), H=st.sampled_from([1, 2, 4]), L=st.integers(1, 3), V=st.integers(8, 30),
       eps=st.sampled_from([1e-5, 1e-6, 0.01]), act=st.sampled_from(["gelu_new", "gelu", "relu", "silu"]))
def test_hf_folder_equals_file_and_flags(tmp_path_factory, d, H, L, V, eps, act):
    """A save_pretrained folder (one file and sharded) in = the weights file with the flags: the same directory."""
    root = tmp_path_factory.mktemp("hf")
    hf_gpt2_folder(root / "one", V=V, P=6, d=d, L=L, H=H, eps=eps, act=act)
    hf_gpt2_folder(root / "sharded", V=V, P=6, d=d, L=L, H=H, eps=eps, act=act, shard=200)
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    ours = {"gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}[act]
    bare = root / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((root / "one" / "model.safetensors").read_bytes())  # no config.json
    assert main(["convert", *UPCYCLE, str(bare / "model.safetensors"), "--heads", str(H), "--layer-norm-eps",
                 str(eps), "--activation", ours, "-o", str(root / "flags")]) == 0
    for src in ("one", "sharded"):
        assert main(["convert", *UPCYCLE, str(root / src), "-o", str(root / f"out-{src}")]) == 0
        same_directory(root / "flags", root / f"out-{src}")
    # the weights file with its config.json beside it reads that config.json; agreeing flags are fine
    assert main(["convert", *UPCYCLE, str(root / "one" / "model.safetensors"), "--heads", str(H),
                 "-o", str(root / "beside")]) == 0
    same_directory(root / "flags", root / "beside")


def official_folder(folder, *, k, H=2, eps=1e-5, seed=3, **changes):
    """The official fork's save_pretrained folder: GPT2Config's fields plus those its run_clm.py sets (setattr on
    the config, so save_pretrained writes them), and its GPT2LMHeadModel state dict as pytorch_model.bin."""
    sz = dict(d=4, f=16, N=4, e=2, p=3, h=2, l=2, g=3, a=2, L=2, V=7, P=5)
    sd = whole_official_gpt2_state(np.random.default_rng(seed), head="tied", **sz)
    folder.mkdir()
    save_torch(sd, folder / "pytorch_model.bin", dtype=torch.float64)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": sz["V"],
              "n_positions": sz["P"], "n_embd": sz["d"], "n_layer": sz["L"], "n_head": H, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": eps, "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "use_moe": "MoE", "k": k, "n_experts": sz["N"], "seed": 42, "experts_embedding": True,
              "use_hypernet": True, "experts_embedding_dim": sz["e"], "process_dim": sz["p"],
              "hypernet_input": sz["h"], "hypernetwork_bottleneck": sz["g"], "layer_emb_dim": sz["l"],
              "adapter_dim": sz["a"], "transformers_version": "4.30.2"}
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return sd


def test_official_k2_folder_gives_k2(tmp_path, capsys):
    """The issue's case: an official k = 2 checkpoint without --top-k used to convert with k = 1 (silently wrong
    logits); from its folder it converts with config.json's k = 2 and gives the official logits."""
    sd = official_folder(tmp_path / "ckpt", k=2)
    tokens = np.random.default_rng(3).integers(0, 7, (2, 5))
    want, margin = official_gpt2_lm(sd, "transformer.", tokens, k=2, H=2, L=2)
    assert margin > 1e-6
    assert main(["convert", "--from", "official-gpt2", str(tmp_path / "ckpt"), "--dtype", "float64",
                 "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "config.json k: top_k=2" in printed and "config.json n_head: n_heads=2" in printed
    assert "config.json activation_function: activation=gelu_tanh" in printed
    assert "d_model=4" in printed and "tensors' shapes = config.json n_embd" in printed
    cfg, params, kind = ref.io.load_dir(tmp_path / "out")
    assert (kind, cfg.top_k, cfg.n_heads, cfg.layer_norm_eps, cfg.tie_embeddings) == ("model", 2, 2, 1e-5, True)
    got, _, _ = ref.model.forward(cfg, params, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=MODEL_ATOL * magnitude(want))
    # the same as the weights file with the flags that used to be needed
    assert main(["convert", "--from", "official-gpt2", str(tmp_path / "ckpt"), "--dtype", "float64", "--top-k", "2",
                 "--heads", "2", "--layer-norm-eps", "1e-5", "--activation", "gelu_tanh",
                 "-o", str(tmp_path / "flags")]) == 0
    same_directory(tmp_path / "out", tmp_path / "flags")


@pytest.mark.parametrize("changes, argv, message", [
    ({}, ["--top-k", "1"], "--top-k 1 contradicts config.json's k = 2"),
    ({}, ["--heads", "4"], "--heads 4 contradicts config.json's n_head = 2"),
    ({}, ["--layer-norm-eps", "1e-6"], "--layer-norm-eps 1e-06 contradicts config.json's layer_norm_epsilon = 1e-05"),
    ({}, ["--activation", "relu"], "--activation relu contradicts config.json's activation_function = 'gelu_new' "
                                   "(= gelu_tanh)"),
    ({"n_experts": 5}, [], "config.json's n_experts = 5 contradicts the tensors, which give n_experts = 4"),
    ({"adapter_dim": 3}, [], "config.json's adapter_dim = 3 contradicts the tensors, which give d_adapter = 2"),
    ({"n_inner": 8}, [], "config.json's n_inner = 8 contradicts the tensors, which give d_ff = 16"),
    ({"tie_word_embeddings": False}, [], "tie_word_embeddings = false, but the checkpoint's lm_head.weight is absent"),
    ({"activation_function": "quick_gelu"}, [], "config.json's activation_function = 'quick_gelu' is not supported"),
    ({"use_moe": "none"}, [], "config.json's use_moe = 'none': not a HyperMoE checkpoint"),
    ({"model_type": "t5"}, [], "config.json's model_type is 't5'; --from official-gpt2 reads model_type 'gpt2'"),
    ({"scale_attn_by_inverse_layer_idx": True}, [], "scale_attn_by_inverse_layer_idx = True: not supported"),
    ({"k": None}, [], "--top-k is needed: config.json has no k"),
    ({"n_head": None}, [], "--heads H"),
])
def test_contradictions_and_missing_values(tmp_path, capsys, changes, argv, message):
    sd = official_folder(tmp_path / "ckpt", **{"k": 2, **changes})
    if "tie_word_embeddings" in changes:  # save_pretrained drops a tied head: absent here
        del sd["lm_head.weight"]
        save_torch(sd, tmp_path / "ckpt" / "pytorch_model.bin", dtype=torch.float64)
    if None in changes.values():
        config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None
                                                                   or k == "n_inner"}))
    assert main(["convert", "--from", "official-gpt2", str(tmp_path / "ckpt"), *argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_without_config_json_nothing_defaults(tmp_path, capsys):
    """A weights file with no config.json beside it: k, the activation, the heads and the eps are flags, required."""
    sd = official_folder(tmp_path / "ckpt", k=2)
    (tmp_path / "ckpt" / "config.json").unlink()
    path = str(tmp_path / "ckpt" / "pytorch_model.bin")
    full = ["--top-k", "2", "--activation", "gelu_tanh", "--heads", "2", "--layer-norm-eps", "1e-5"]
    for missing, message in (("--top-k", "--top-k is needed: there is no config.json beside the weights"),
                             ("--activation", "--activation is needed"), ("--heads", "--heads H"),
                             ("--layer-norm-eps", "pass --layer-norm-eps EPS")):
        i = full.index(missing)
        assert main(["convert", "--from", "official-gpt2", path, *full[:i], *full[i + 2:],
                     "-o", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert main(["convert", "--from", "official-gpt2", path, *full, "-o", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "(no config.json beside the weights)" in printed and "flag --top-k: top_k=2" in printed
    assert "the tensors' shapes: d_model=4" in printed
    assert len(sd)  # the state dict was written


def test_switch_folder(tmp_path, capsys):
    """An official Switch folder: capacity, activation, experts, router bias and sparse step from config.json."""
    sd = official_switch_state(np.random.default_rng(5), d=4, f=6, N=3, e=2, p=3, h=2, l=2, g=3, a=2, L=4)
    (tmp_path / "sw").mkdir()
    save_torch(sd, tmp_path / "sw" / "pytorch_model.bin")
    config = {"model_type": "switch_transformers", "d_model": 4, "d_ff": 6, "num_experts": 3, "expert_capacity": 5,
              "router_bias": False, "router_jitter_noise": 0.01, "dense_act_fn": "relu", "num_layers": 4,
              "num_decoder_layers": 4, "encoder_sparse_step": 2, "decoder_sparse_step": 2, "experts_embedding": True,
              "use_hypernet": True, "experts_embedding_dim": 2, "process_dim": 3, "hypernet_input": 2,
              "hypernetwork_bottleneck": 3, "layer_emb_dim": 2, "adapter_dim": 2}
    (tmp_path / "sw" / "config.json").write_text(json.dumps(config))
    assert main(["convert", "--from", "official-switch", str(tmp_path / "sw"), "--stack", "decoder",
                 "-o", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "config.json expert_capacity: capacity=5" in printed and "config.json dense_act_fn" in printed
    cfg, _, _ = ref.io.load_dir(tmp_path / "o")
    assert (cfg.capacity, cfg.activation, cfg.n_experts, cfg.moe_every) == (5, "relu", 3, 2)
    assert main(["convert", "--from", "official-switch", str(tmp_path / "sw"), "--stack", "decoder", "--capacity",
                 "64", "-o", str(tmp_path / "p")]) == 2
    assert "--capacity 64 contradicts config.json's expert_capacity = 5" in capsys.readouterr().err
    (tmp_path / "sw" / "config.json").write_text(json.dumps({**config, "decoder_sparse_step": 4}))
    assert main(["convert", "--from", "official-switch", str(tmp_path / "sw"), "--stack", "decoder",
                 "-o", str(tmp_path / "p")]) == 2
    assert "sparse step 4 makes blocks [1] sparse, but the tensors hold HyperMoE layers in blocks [1, 3]" in \
        capsys.readouterr().err


def test_shard_index_errors(tmp_path, capsys):
    hf_gpt2_folder(tmp_path / "s", V=9, P=4, d=4, L=2, H=2, eps=1e-5, act="gelu_new", shard=200)
    index = tmp_path / "s" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name, shard = next(iter(data["weight_map"].items()))
    for weight_map, message in (({**data["weight_map"], name: "../x.safetensors"}, "not a file name in the folder"),
                                ({**data["weight_map"], "extra.weight": shard}, "missing extra.weight"),
                                ({k: v for k, v in data["weight_map"].items() if k != name}, "not in the index")):
        index.write_text(json.dumps({**data, "weight_map": weight_map}))
        assert main(["convert", *UPCYCLE, str(tmp_path / "s"), "-o", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    assert main(["convert", *UPCYCLE, str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "has no config.json (pass the weights file itself, with the flags, instead)" in capsys.readouterr().err
