"""hypermoe convert → whole language models (kind "model") and weights.safetensors directories.

(a) official GPT-2 HyperMoE: a synthetic GPT2LMHeadModel state dict with the official names (the HyperMoE
    parts from tests/test_convert.py, plus the GPT-2 body) converted to a model directory; ref.model.forward's
    logits equal a GPT-2 forward written out below directly on the official tensors (embeddings, pre-LN blocks,
    Conv1D attention split q | k | v, the official MoE of tests/test_convert.official_gpt2_moe, ln_f, tied or
    untied head), not via ref's functions;
(b) upcycling: transformers' own GPT2LMHeadModel (a small random config, built here, nothing downloaded),
    saved as HF ships it (save_pretrained's model.safetensors, which drops the tied head), as a safetensors
    state dict and as a torch .bin, upcycled by the CLI: HyperMoETransformer.from_dir and ref.model.forward
    give HF's logits;
(c) kind selection, unused tensors and their reasons, errors; weights.safetensors in saved directories.

Axis legend: B sequences, S positions, d model width, H heads, c = d / H, V vocabulary, P positions, L blocks;
the HyperMoE letters are tests/test_convert.py's.

Tolerance (float64). One evaluation of these models is ≤ 70 dependent stages (per block two LayerNorms of ≤ 3
stages, attention's 5 (qkv, scores, softmax, weighted sum, proj), the HyperMoE layer's ≤ 12
(tests/strategies.py); embeddings, ln_f and the head) of sums of ≤ 3d + 1 ≤ 49 terms, each stage's error ≤ γ_n ·
M (M ≤ 4 S as in tests/strategies.py, with the LayerNorm gains 1/sqrt(var + eps) = O(1) at these unit-variance
activations); two evaluations in different orders differ by ≤ 2 · 70 · 49 · 4 u S ≈ 2.7e4 u S = 6e-12 · S, S =
max(1, max |logit|). MODEL_ATOL = 1e-10 leaves a 15× margin; a misplaced tensor (a transposed c_attn, q and k
swapped, a wrong head, an expert that is not the dense MLP) moves logits by O(S). Measured: (a) ≤ 9e-14 · S (800
u S, 300 draws; the largest at d = 2, where a LayerNorm's gain can exceed 1), (b) ≤ 9e-16 · S (8 u S, k = 1, 2,
3, moe_every 1, 2, 5 seeds). Routing is discontinuous: (a) skips draws whose smallest routing margin (k-th minus
(k+1)-th router logit, any block) is below 1e-6, far above the ~1e-13 the router logits can move by (no draw was
skipped in 500); in (b) every expert is the same MLP, so the selection does not change the output.
"""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import ref
import ref.io
import ref.model
from hypermoe import convert
from hypermoe.cli import main
from hypermoe.model import HyperMoETransformer
from tests.strategies import magnitude
from tests.test_convert import official_gpt2_moe, official_gpt2_state, np_softmax, save_torch

MODEL_ATOL = 1e-10  # × S; derivation in the module docstring


# ---------------------------------------------------------------------------------------------
# A whole official GPT2LMHeadModel state dict, and its forward on the official tensors
# ---------------------------------------------------------------------------------------------


def whole_official_gpt2_state(rng, *, V, P, head="tied", buffers=False, prefix="transformer.", **sz):
    """GPT2LMHeadModel.state_dict() of the official HyperMoE fork: `prefix` + wte, wpe, h.{ℓ}.{ln_1, attn, ln_2,
    mlp (the official MoE)}, ln_f, param_gen; `lm_head.weight` beside the prefix: a copy of wte ("tied"), its
    own ("untied") or absent. buffers: also the attention mask buffers older transformers saved."""
    sd = official_gpt2_state(rng, prefix=prefix, extras=False, **sz)
    d = sz["d"]
    sd[prefix + "wte.weight"] = rng.standard_normal((V, d))
    sd[prefix + "wpe.weight"] = 0.5 * rng.standard_normal((P, d))
    sd[prefix + "ln_f.weight"] = 1 + 0.1 * rng.standard_normal(d)
    sd[prefix + "ln_f.bias"] = 0.1 * rng.standard_normal(d)
    for i in range(sz["L"]):
        h = f"{prefix}h.{i}."
        for ln in ("ln_1", "ln_2"):  # LayerNorm weights away from 1 and biases away from 0: a swap shows
            sd[h + ln + ".weight"] = 1 + 0.1 * rng.standard_normal(d)
            sd[h + ln + ".bias"] = 0.1 * rng.standard_normal(d)
        sd[h + "attn.c_attn.weight"] = rng.standard_normal((d, 3 * d)) / math.sqrt(d)  # Conv1D (in, out)
        sd[h + "attn.c_attn.bias"] = 0.1 * rng.standard_normal(3 * d)
        sd[h + "attn.c_proj.weight"] = rng.standard_normal((d, d)) / math.sqrt(d)
        sd[h + "attn.c_proj.bias"] = 0.1 * rng.standard_normal(d)
        sd[h + "mlp.mean"], sd[h + "mlp.std"] = np.zeros(1), np.ones(1)
        if buffers:
            sd[h + "attn.bias"] = np.tril(np.ones((P, P), dtype=bool))[None, None]  # (1, 1, P, P)
            sd[h + "attn.masked_bias"] = np.array(-1e4)
    lm_head = prefix.removesuffix("transformer.") + "lm_head.weight"
    if head == "tied":
        sd[lm_head] = sd[prefix + "wte.weight"].copy()
    elif head == "untied":
        sd[lm_head] = rng.standard_normal((V, d)) / math.sqrt(d)  # nn.Linear (V, d)
    return sd


def official_layer_norm(x, w, b, eps=1e-5):
    """torch.nn.LayerNorm: biased variance."""
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps) * w + b


def official_gpt2_lm(sd, prefix, tokens, *, k, H, L):
    """GPT2LMHeadModel.forward (eval) of the official fork on its tensors → (logits (B, S, V), the smallest
    routing margin of any block)."""
    B, S = tokens.shape
    wte = sd[prefix + "wte.weight"]
    h = wte[tokens] + sd[prefix + "wpe.weight"][:S]  # (B, S, d)
    d = h.shape[-1]
    c = d // H  # head width
    margin = np.inf
    for i in range(L):
        p = f"{prefix}h.{i}."
        x = official_layer_norm(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = x @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]  # Conv1D: (B, S, 3d)
        q, key, v = np.split(qkv, 3, axis=-1)  # GPT2Attention: qkv.split(split_size=d, dim=2)
        heads = lambda t: t.reshape(B, S, H, c).transpose(0, 2, 1, 3)  # noqa: E731  _split_heads: (B, H, S, c)
        w = heads(q) @ heads(key).transpose(0, 1, 3, 2) / math.sqrt(c)  # (B, H, S, S)
        w = np.where(np.tril(np.ones((S, S), dtype=bool)), w, np.finfo(w.dtype).min)  # GPT-2's mask value
        a = (np_softmax(w) @ heads(v)).transpose(0, 2, 1, 3).reshape(B, S, d)  # _merge_heads: (B, S, d)
        h = h + a @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        x = official_layer_norm(h, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        out, _, block_margin = official_gpt2_moe(sd, prefix, i, x, k)
        margin = min(margin, block_margin.min(initial=np.inf))
        h = h + out
    h = official_layer_norm(h, sd[prefix + "ln_f.weight"], sd[prefix + "ln_f.bias"])
    head = prefix.removesuffix("transformer.") + "lm_head.weight"
    return h @ (sd[head] if head in sd else wte).T, margin  # nn.Linear (V, d), tied or not: (B, S, V)


@st.composite
def model_sizes(draw):
    d = draw(st.sampled_from([2, 4, 6, 8]))
    return dict(d=d, f=draw(st.integers(1, 8)), N=draw(st.integers(1, 5)), e=draw(st.integers(1, 4)),
                p=draw(st.integers(1, 4)), h=draw(st.integers(1, 4)), l=draw(st.integers(1, 3)),
                g=draw(st.integers(1, 4)), a=draw(st.integers(1, 4)), L=draw(st.integers(1, 3)),
                V=draw(st.integers(2, 12)), P=draw(st.integers(1, 6)))


def tiny_whole(seed=0, **changes):
    sz = dict(d=4, f=6, N=3, e=2, p=3, h=2, l=2, g=3, a=2, L=2, V=7, P=5)
    sz.update(changes)
    return whole_official_gpt2_state(np.random.default_rng(seed), **sz)


# ---------------------------------------------------------------------------------------------
# (a) the official GPT-2 HyperMoE as a whole model
# ---------------------------------------------------------------------------------------------


@given(sz=model_sizes(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_official_gpt2_model_matches_official_forward(sz, data, seed):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, sz["N"]), label="k")
    H = data.draw(st.sampled_from([h for h in range(1, sz["d"] + 1) if sz["d"] % h == 0]), label="H")
    head = data.draw(st.sampled_from(["tied", "untied", "absent"]), label="head")
    prefix = data.draw(st.sampled_from(["transformer.", "module.transformer."]), label="prefix")
    sd = whole_official_gpt2_state(rng, head=head, prefix=prefix, **sz)
    B, S = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, sz["P"]), label="S")
    tokens = rng.integers(0, sz["V"], (B, S))
    want, margin = official_gpt2_lm(sd, prefix, tokens, k=k, H=H, L=sz["L"])
    assume(margin > 1e-6)  # the routing of every block is decided (see the module docstring)
    result = convert.from_official_gpt2(sd, top_k=k, n_heads=H, dtype=np.float64)  # kind "auto" → model
    cfg = result.config
    assert result.kind == "model" and result.ignored == []
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.n_heads, cfg.n_layers, cfg.tie_embeddings) == (
        sz["V"], sz["P"], H, sz["L"], head != "untied")
    got, _, _ = ref.model.forward(cfg, result.params, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=MODEL_ATOL * magnitude(want))


def test_body_placement_and_unused_tensors():
    """arange-filled body tensors arrive where docs/convert.md's GPT-2 table says; everything not converted is
    reported with its reason."""
    sd = tiny_whole(head="untied", buffers=True)
    body = sorted(n for n in sd if not re.search(r"\.mlp\.|param_gen|attn\.(bias|masked_bias)$", n))
    for i, name in enumerate(body):
        sd[name] = np.arange(sd[name].size, dtype=np.float64).reshape(sd[name].shape) + 1000 * i
    res = convert.from_official_gpt2(sd, n_heads=2, dtype=np.float64)
    P = res.params
    as_is = {"token_embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
             "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}
    for i in range(2):
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj")):
            as_is.update({f"blocks.{i}.{ours}.weight": f"transformer.h.{i}.{theirs}.weight",
                          f"blocks.{i}.{ours}.bias": f"transformer.h.{i}.{theirs}.bias"})
    for ours, theirs in as_is.items():
        np.testing.assert_array_equal(P[ours], sd[theirs], err_msg=ours)
    np.testing.assert_array_equal(P["lm_head.weight"], sd["lm_head.weight"].T)  # nn.Linear (V, d) → (d, V)
    # the HyperMoE layers are the stack conversion's, renamed layers.{ℓ}.X → blocks.{ℓ}.moe.X
    stack = convert.from_official_gpt2(sd, kind="stack", dtype=np.float64)
    for name, value in stack.params.items():
        ours = name if name.startswith("hyper.") else "blocks.{}.moe.{}".format(*name[len("layers."):].split(".", 1))
        np.testing.assert_array_equal(P[ours], value, err_msg=name)
    assert set(P) == set(ref.model.model_param_shapes(res.config))
    reasons = res.unused
    assert "causal-mask" in reasons["transformer.h.1.attn.bias"]
    assert "causal-mask" in reasons["transformer.h.0.attn.masked_bias"]
    assert "w_noise" in " ".join(reasons) and "transformer.h.0.mlp.mean" in reasons
    assert not any(key.startswith("lm_head") for key in reasons)  # untied: converted
    tied = convert.from_official_gpt2(tiny_whole(), n_heads=2)
    assert "tied" in tied.unused["lm_head.weight"] and tied.config.tie_embeddings


def test_kind_selection():
    sd = tiny_whole()
    model = convert.from_official_gpt2(sd, n_heads=2)
    assert model.kind == "model"
    stack = convert.from_official_gpt2(sd, kind="stack")  # the HyperMoE layers alone, as before
    assert stack.kind == "stack" and "transformer.wte.weight" in stack.ignored and stack.config.n_heads == 1
    partial = {k: v for k, v in sd.items() if "wpe" not in k}  # no wpe: not a whole LM
    assert convert.from_official_gpt2(partial).kind == "stack"
    with pytest.raises(ValueError, match=r"missing official tensor 'transformer\.wpe\.weight'"):
        convert.from_official_gpt2(partial, kind="model", n_heads=2)
    with pytest.raises(ValueError, match="kind must be one of"):
        convert.from_official_gpt2(sd, kind="layer")


def test_model_errors():
    with pytest.raises(ValueError, match=r"needs its number of attention heads.*--heads H"):
        convert.from_official_gpt2(tiny_whole())
    with pytest.raises(ValueError, match=r"config field 'n_heads' \(3\) must divide d_model \(4\)"):
        convert.from_official_gpt2(tiny_whole(), n_heads=3)
    sd = tiny_whole()
    sd["transformer.h.0.crossattention.c_attn.weight"] = np.zeros((4, 8))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) in a whole GPT-2 model .*crossattention"):
        convert.from_official_gpt2(sd, n_heads=2)
    sd = tiny_whole()
    sd["transformer.param_gen.layer_embed.weight"] = np.zeros((3, 2))  # 3 rows for 2 blocks: a third block missing
    with pytest.raises(ValueError, match=r"blocks \[0, 1\] of 3: this pattern is not expressible"):
        convert.from_official_gpt2(sd, n_heads=2)
    sd = tiny_whole()  # block 0 dense, block 1 HyperMoE: moe_every 2 over a 3-row table, but only 2 blocks
    for key in [k for k in sd if k.startswith("transformer.h.0.mlp.")]:
        del sd[key]
    sd["transformer.param_gen.layer_embed.weight"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match="2 blocks but the hypernetwork's layer-embedding table has 3 rows"):
        convert.from_official_gpt2(sd, n_heads=2)
    assert convert.from_official_gpt2(sd, kind="stack").config.moe_every == 2  # fine as a stack
    sd = tiny_whole()
    sd["transformer.h.1.attn.c_attn.weight"] = np.zeros((4, 4))
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn\.weight has shape \(4, 4\), expected \(4, 12\)"):
        convert.from_official_gpt2(sd, n_heads=2)
    sd = tiny_whole()
    sd["transformer.wte.weight"] = np.zeros((7, 5))
    with pytest.raises(ValueError, match="width 5, but the HyperMoE layers have d = 4"):
        convert.from_official_gpt2(sd, n_heads=2)


def test_cli_official_gpt2_model_in_the_torch_model(tmp_path, capsys):
    """The CLI's model directory in HyperMoETransformer.from_dir (weights.npz and weights.safetensors) gives the
    official forward's logits."""
    sd = tiny_whole(seed=3, head="tied", buffers=True, N=4)
    path = save_torch(sd, tmp_path / "pytorch_model.bin", dtype=torch.float64)
    tokens = np.random.default_rng(3).integers(0, 7, (2, 5))
    want, margin = official_gpt2_lm(sd, "transformer.", tokens, k=2, H=2, L=2)
    assert margin > 1e-6
    for fmt in ("npz", "safetensors"):
        out = tmp_path / fmt
        assert main(["convert", "--from", "official-gpt2", path, "-o", str(out), "--top-k", "2", "--heads", "2",
                     "--layer-norm-eps", "1e-5", "--activation", "gelu_tanh", "--dtype", "float64", "--format", fmt]) == 0
        printed = capsys.readouterr().out
        assert "kind model" in printed and "lm_head.weight: the LM head" in printed and "causal-mask" in printed
        assert sorted(p.name for p in out.iterdir()) == ["config.json", ref.io.FORMATS[fmt]]
        with torch.no_grad():
            got = HyperMoETransformer.from_dir(out)(torch.from_numpy(tokens)).logits.numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=MODEL_ATOL * magnitude(want))
    assert main(["convert", "--from", "official-gpt2", path, "-o", str(tmp_path / "x"), "--top-k", "2",
                 "--activation", "gelu_tanh", "--layer-norm-eps", "1e-5"]) == 2
    assert "--heads H" in capsys.readouterr().err
    assert main(["convert", "--from", "official-gpt2", path, "-o", str(tmp_path / "x"), "--kind", "stack",
                 "--heads", "2"]) == 2
    assert "apply to a whole model" in capsys.readouterr().err
    assert main(["convert", "--from", "official-switch", path, "-o", str(tmp_path / "x"), "--heads", "2"]) == 2
    assert "--heads" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# (b) upcycling transformers' GPT2LMHeadModel
# ---------------------------------------------------------------------------------------------

V, P, D, H, L = 40, 12, 16, 4, 3


@pytest.fixture(scope="module")
def hf_gpt2():
    """A small GPT2LMHeadModel of transformers with random weights (float64): LayerNorms away from 1 / 0,
    biases non-zero, weights N(0, 1/fan_in), so that every tensor matters to the logits."""
    transformers = pytest.importorskip("transformers")  # the "test" extra
    config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=L, n_head=H, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():  # lm_head is wte (tied): drawn once
            draw = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if ".ln_" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * draw)
            elif param.dim() == 1:
                param.copy_(0.1 * draw)
            else:  # Conv1D (in, out) and the embeddings (rows, d): fan-in rows resp. d
                param.copy_(draw / math.sqrt(param.shape[0] if "wte" not in name and "wpe" not in name else D))
    return model


def hf_checkpoint(model, form, folder):
    """The model's weights as a file the way users have them: save_pretrained's model.safetensors (HF drops the
    tied lm_head), a safetensors state dict (with the head), or a torch .bin state dict."""
    from safetensors.torch import save_file

    folder.mkdir()
    if form == "save_pretrained":
        model.save_pretrained(folder)
        return folder / "model.safetensors"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if form == "safetensors":
        save_file(state, folder / "model.safetensors")
        return folder / "model.safetensors"
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


@pytest.mark.parametrize("form", ["save_pretrained", "safetensors", "bin"])
@pytest.mark.parametrize("moe_every, k", [(1, 1), (2, 2), (1, 3)])
def test_upcycled_hf_gpt2_computes_the_dense_logits(hf_gpt2, tmp_path, capsys, form, moe_every, k):
    """Every upcycled block's experts are its MLP and the HyperExpert's W_up / b_up heads are 0, so the model's
    logits are HF's: with k = 1 up to summation order only (gate 1, HyperExpert exactly 0), with k > 1 also the
    renormalised gates' sum 1 ± k·u (both far inside MODEL_ATOL)."""
    path = hf_checkpoint(hf_gpt2, form, tmp_path / "ckpt")
    out = tmp_path / "up"
    assert main(["convert", "--from", "gpt2-mlp", str(path), "--experts", "4", "--top-k", str(k), "--moe-every",
                 str(moe_every), "--heads", str(H), "--d-adapter", "3", "--hyper-width", "6", "--dtype", "float64",
                 "--seed", "5", "--layer-norm-eps", "1e-5", "--activation", "gelu_tanh", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kind model" in printed and ("lm_head.weight: the LM head" in printed) == (form != "save_pretrained")
    cfg, params, kind = ref.io.load_dir(out)
    assert kind == "model" and (cfg.vocab_size, cfg.max_seq_len, cfg.n_heads, cfg.n_layers, cfg.moe_every) == (
        V, P, H, L, moe_every)
    assert cfg.tie_embeddings and (cfg.top_k, cfg.n_experts, cfg.activation) == (k, 4, "gelu_tanh")
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, V, (3, P)))
    with torch.no_grad():
        want = hf_gpt2(tokens).logits.numpy()
        got = HyperMoETransformer.from_dir(out)(tokens).logits.numpy()
    S = magnitude(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=MODEL_ATOL * S)
    np.testing.assert_allclose(ref.model.forward(cfg, params, tokens.numpy())[0], want, rtol=0, atol=MODEL_ATOL * S)


def test_upcycled_model_layout(hf_gpt2, tmp_path):
    state = convert.load_state_dict(hf_checkpoint(hf_gpt2, "bin", tmp_path / "c"))
    res = convert.upcycle_gpt2_mlp(state, n_experts=2, top_k=1, moe_every=2, n_heads=H, d_adapter=2,
                                   d_expert_embed=3, d_process=3, d_hyper=3, d_generator=3, dtype=np.float64)
    assert res.kind == "model" and list(res.unused) == ["lm_head.weight"]
    np.testing.assert_array_equal(res.params["blocks.0.mlp.w1"], state["transformer.h.0.mlp.c_fc.weight"])  # dense
    np.testing.assert_array_equal(res.params["blocks.1.moe.experts.w2"][1], state["transformer.h.1.mlp.c_proj.weight"])
    for name in ("hyper.w_up.weight", "hyper.w_up.bias", "hyper.b_up.weight", "hyper.b_up.bias"):
        assert not res.params[name].any()
    assert res.params["hyper.w_down.weight"].any()  # the other heads are ref's init
    stack = convert.upcycle_gpt2_mlp(state, n_experts=2, top_k=1, moe_every=2, kind="stack", d_adapter=2,
                                     d_expert_embed=3, d_process=3, d_hyper=3, d_generator=3, dtype=np.float64)
    assert stack.kind == "stack" and "transformer.h.0.mlp.c_fc.weight" in stack.unused  # dense, not in a stack


# ---------------------------------------------------------------------------------------------
# (c) safetensors: state dicts in, weights.safetensors out
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layer", "stack", "model"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_safetensors_directory_round_trip(tmp_path, kind, dtype):
    cfg = ref.tiny_config()
    params = {"layer": ref.init, "stack": ref.init_stack, "model": ref.model.init_model}[kind](cfg, seed=1, dtype=dtype)
    ref.io.save_dir(tmp_path / "m", cfg, params, kind, format="safetensors")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "weights.safetensors"]
    cfg2, loaded, kind2 = ref.io.load_dir(tmp_path / "m")
    assert (cfg2, kind2) == (cfg, kind) and loaded.keys() == params.keys()
    for name, value in params.items():
        assert loaded[name].dtype == dtype
        np.testing.assert_array_equal(loaded[name], value)
    # --force replaces the whole directory: the old weights file does not stay next to the new one
    ref.io.save_dir(tmp_path / "m", cfg, params, kind, force=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "weights.npz"]
    with pytest.raises(ValueError, match="unknown weights format 'pt'"):
        ref.io.save_dir(tmp_path / "n", cfg, params, kind, format="pt")


def write_safetensors(path, header: dict, data: bytes, length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("header, data, length, message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), 10**12,
     "header claims 1000000000000 bytes"),
    ({"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}, bytes(8), None,
     r"tensor 'w': shape \(1000000000,\) of F32 \(4000000000 bytes\) .* does not fit the 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None, r"tensor 'w': shape \(3,\) of F32"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "tensor 'w': unknown dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "not lists of ints"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "gap or overlap at byte 0"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), None, "cover 4 of the 8 data bytes"),
    ({"w": [1, 2]}, b"", None, "header entry is not"),
    (["w"], b"", None, "header is a JSON list"),
    ({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), None, "BF16 has no numpy equivalent"),
])
def test_safetensors_headers_are_checked_before_reading(tmp_path, header, data, length, message):
    cfg = ref.tiny_config()
    ref.io.save_dir(tmp_path / "m", cfg, ref.init(cfg, seed=0), "layer", format="safetensors")
    write_safetensors(tmp_path / "m" / "weights.safetensors", header, data, length)
    with pytest.raises(ValueError, match=r"weights\.safetensors: not a readable \.safetensors weights file .*"
                                         + message):
        ref.io.load_dir(tmp_path / "m")


def test_safetensors_directory_errors(tmp_path, monkeypatch):
    cfg = ref.tiny_config()
    params = ref.init(cfg, seed=0)
    ref.io.save_dir(tmp_path / "m", cfg, params, "layer", format="safetensors")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="2 bytes, shorter than the 8-byte header length"):
        ref.io.load_dir(tmp_path / "m")
    ref.io.save_dir(tmp_path / "m", cfg, params, "layer", format="safetensors", force=True)
    with open(tmp_path / "m" / "weights.npz", "wb") as fh:
        np.savez(fh, **params)
    with pytest.raises(ValueError, match="holds both weights.npz and weights.safetensors; keep one"):
        ref.io.load_dir(tmp_path / "m")
    (tmp_path / "m" / "weights.npz").unlink()
    monkeypatch.setitem(sys.modules, "safetensors", None)  # the package not installed
    with pytest.raises(ValueError, match="needs the 'safetensors' package"):
        ref.io.load_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="needs the 'safetensors' package"):
        ref.io.save_dir(tmp_path / "n", cfg, params, "layer", format="safetensors")
    assert not (tmp_path / "n").exists()
    ref.io.save_dir(tmp_path / "n", cfg, params, "layer")  # numpy alone reads and writes weights.npz
    assert ref.io.load_dir(tmp_path / "n")[2] == "layer"


def test_safetensors_state_dicts(tmp_path):
    """convert reads .safetensors state dicts (bfloat16 as float32 values), checking the header first."""
    from safetensors.torch import save_file

    sd = tiny_whole(seed=2)
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items() if v.dtype != bool},
              tmp_path / "bf16.safetensors")
    state = convert.load_state_dict(tmp_path / "bf16.safetensors")
    key = "transformer.h.0.mlp.w_gate"
    assert state[key].dtype == np.float32
    np.testing.assert_array_equal(state[key], torch.from_numpy(sd[key]).to(torch.bfloat16).float().numpy())
    assert convert.from_official_gpt2(state, n_heads=2).kind == "model"
    blob = (tmp_path / "bf16.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file \(tensor .* does not fit"):
        convert.load_state_dict(tmp_path / "cut.safetensors")
    (tmp_path / "long.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{" + bytes(20))
    with pytest.raises(ValueError, match=r"long\.safetensors: not a readable safetensors file \(its header claims"):
        convert.load_state_dict(tmp_path / "long.safetensors")
