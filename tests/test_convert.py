"""hypermoe.convert: official HyperMoE checkpoints (GPT-2 and Switch layouts) and dense GPT-2 upcycling.

The synthetic state dicts below use the official names and shapes (github.com/Bumble666/Hyper_MoE,
read to confirm them; none of its code is used here). Two kinds of check:
(a) placement: tensors filled with distinct arange values arrive exactly where docs/convert.md says
    (transposed nn.Linear weights, stacked experts, row-major generator heads);
(b) behaviour: the converted layer / stack (ref.layer, ref.stack, and hypermoe's torch layer)
    equals the official forward written out below directly on the official tensors
    (x @ w_gate, softmax, top-k, Conv1D experts, nn.Linear as x @ W.T + b, heads reshaped row-major,
    Switch capacity by per-sequence cumsum), not via ref's step functions.

Axis legend: B sequences, S positions, T = B·S tokens, d, f, N, k, e = d_e, p = d_p, h = d_h, l = d_l,
g = d_g, a adapter width, L layers.
"""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import ref
import ref.io
from hypermoe import convert
from hypermoe.cli import main
from hypermoe.layer import HyperMoELayer, params_from_ref  # torch is a hard dependency of hypermoe
from tests.strategies import inputs_with_margin, magnitude, reorder_atol

# float64 throughout: only summation-order differences remain (≤ REORDER_K u S = 4.5e-13 S by the bound in
# tests/strategies.py, measured ≤ ~1e-14); a misplaced tensor moves outputs by O(S). RTOL relative, and
# ATOL · S with S = magnitude(expected): the official state dicts are N(0, 1), so magnitudes vary.
ATOL = RTOL = 1e-10


# ---------------------------------------------------------------------------------------------
# Synthetic official state dicts (official names and shapes, float64)
# ---------------------------------------------------------------------------------------------


def official_gpt2_state(rng, *, d, f, N, e, p, h, l, g, a, L, prefix="", hyper=True, extras=True):
    """GPT2Model-style keys: every block's `h.{ℓ}.mlp` is the official MoE, one `param_gen`."""
    sd = {}
    for i in range(L):
        m = f"{prefix}h.{i}.mlp."
        sd[m + "w_gate"] = rng.standard_normal((d, N))
        sd[m + "w_noise"] = rng.standard_normal((d, N))
        for j in range(N):
            ex = f"{m}experts.expert_{j}."
            sd[ex + "c_fc.weight"] = rng.standard_normal((d, f)) / math.sqrt(d)  # Conv1D (in, out)
            sd[ex + "c_fc.bias"] = 0.1 * rng.standard_normal(f)
            sd[ex + "c_proj.weight"] = rng.standard_normal((f, d)) / math.sqrt(f)
            sd[ex + "c_proj.bias"] = 0.1 * rng.standard_normal(d)
        if hyper:
            sd.update(official_embedding_state(rng, m, N=N, e=e, p=p, h=h))
            sd[m + "adapter_layer.adapter_down_manual.weight"] = rng.standard_normal((a, d))
            sd[m + "adapter_layer.adapter_down_manual.bias"] = rng.standard_normal(a)
            sd[m + "adapter_layer.adapter_up_manual.weight"] = rng.standard_normal((d, a))
            sd[m + "adapter_layer.adapter_up_manual.bias"] = rng.standard_normal(d)
        if extras:
            sd[m + "mean"], sd[m + "std"] = np.zeros(1), np.ones(1)
            sd[f"{prefix}h.{i}.ln_1.weight"] = np.ones(d)
            sd[f"{prefix}h.{i}.attn.c_attn.weight"] = rng.standard_normal((d, 3 * d))
    if hyper:
        sd.update(official_generator_state(rng, prefix + "param_gen.", d=d, h=h, l=l, g=g, a=a, L=L))
    if extras:
        sd[prefix + "wte.weight"] = rng.standard_normal((5, d))
        sd[prefix + "ln_f.bias"] = np.zeros(d)
    return sd


def official_switch_state(rng, *, d, f, N, e, p, h, l, g, a, L, router_bias=False, stacks=("encoder", "decoder")):
    """SwitchTransformers-style keys: sparse FF in the odd blocks (official `i % 2 == 1`), one
    `{stack}.param_gen` per stack, dense T5 FFs in the even blocks."""
    sd = {"shared.weight": rng.standard_normal((7, d))}
    for stack in stacks:
        ff = {"encoder": 1, "decoder": 2}[stack]
        for i in range(L):
            sd[f"{stack}.block.{i}.layer.0.SelfAttention.q.weight"] = rng.standard_normal((d, d))
            sd[f"{stack}.block.{i}.layer.{ff}.layer_norm.weight"] = np.ones(d)
            m = f"{stack}.block.{i}.layer.{ff}.mlp."
            if i % 2 == 0:  # dense block
                sd[m + "wi.weight"] = rng.standard_normal((f, d))
                sd[m + "wo.weight"] = rng.standard_normal((d, f))
                continue
            sd[m + "router.classifier.weight"] = rng.standard_normal((N, d))  # nn.Linear (out, in)
            if router_bias:
                sd[m + "router.classifier.bias"] = rng.standard_normal(N)
            for j in range(N):
                sd[f"{m}experts.expert_{j}.wi.weight"] = rng.standard_normal((f, d)) / math.sqrt(d)
                sd[f"{m}experts.expert_{j}.wo.weight"] = rng.standard_normal((d, f)) / math.sqrt(f)
            sd.update(official_embedding_state(rng, m, N=N, e=e, p=p, h=h))
            sd[m + "adapter_layer.adapter_down_manual.weight"] = rng.standard_normal((a, d))
        sd.update(official_generator_state(rng, f"{stack}.param_gen.", d=d, h=h, l=l, g=g, a=a, L=L))
    return sd


def official_embedding_state(rng, m, *, N, e, p, h):
    return {
        m + "n_experts_embedding.weight": rng.standard_normal((N, e)),
        m + "embedding_process.0.weight": rng.standard_normal((p, e)) / math.sqrt(e),
        m + "embedding_process.0.bias": 0.1 * rng.standard_normal(p),
        m + "embedding_process.2.weight": rng.standard_normal((h, p)) / math.sqrt(p),
        m + "embedding_process.2.bias": 0.1 * rng.standard_normal(h),
    }


def official_generator_state(rng, gen, *, d, h, l, g, a, L):
    return {
        gen + "layer_embed.weight": rng.standard_normal((L, l)),
        gen + "decoder.linear1.weight": rng.standard_normal((g, h + l)) / math.sqrt(h + l),
        gen + "decoder.linear1.bias": 0.1 * rng.standard_normal(g),
        gen + "decoder.weight_up.weight": rng.standard_normal((a * d, g)) / math.sqrt(g * a),
        gen + "decoder.weight_up.bias": 0.1 * rng.standard_normal(a * d),
        gen + "decoder.weight_down.weight": rng.standard_normal((d * a, g)) / math.sqrt(g * d),
        gen + "decoder.weight_down.bias": 0.1 * rng.standard_normal(d * a),
        gen + "decoder.bias_up.weight": rng.standard_normal((d, g)) / math.sqrt(g),
        gen + "decoder.bias_up.bias": 0.1 * rng.standard_normal(d),
        gen + "decoder.bias_down.weight": rng.standard_normal((a, g)) / math.sqrt(g),
        gen + "decoder.bias_down.bias": 0.1 * rng.standard_normal(a),
    }


# ---------------------------------------------------------------------------------------------
# The official forward, written out on the official tensors
# ---------------------------------------------------------------------------------------------


def nn_linear(x, sd, name):
    """torch nn.Linear: x @ W.T + b, W: (out, in)."""
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def np_softmax(z):
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def gelu_new(u):  # GPT-2's ACT2FN["gelu_new"]
    return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def official_hyper_expert(sd, m, gen, layer, x, unselected):
    """The official HyperExpert: embeddings of the unselected experts summed, embedding_process,
    ParameterGenerator (layer_embed concatenated after z), AdapterLayer einsums. x (T, d), unselected (T, N)."""
    T, d = x.shape
    s = unselected.astype(x.dtype) @ sd[m + "n_experts_embedding.weight"]  # (T, e)
    z = nn_linear(np.maximum(nn_linear(s, sd, m + "embedding_process.0"), 0), sd, m + "embedding_process.2")
    lay = np.repeat(sd[gen + "layer_embed.weight"][layer][None], T, axis=0)  # (T, l)
    r = np.maximum(nn_linear(np.concatenate([z, lay], axis=-1), sd, gen + "decoder.linear1"), 0)  # (T, g)
    a = sd[gen + "decoder.bias_down.bias"].shape[0]
    dw = nn_linear(r, sd, gen + "decoder.weight_down").reshape(T, d, a)  # view(bsz, lg, input_dim, adapter_dim)
    uw = nn_linear(r, sd, gen + "decoder.weight_up").reshape(T, a, d)  # view(bsz, lg, adapter_dim, output_dim)
    db, ub = nn_linear(r, sd, gen + "decoder.bias_down"), nn_linear(r, sd, gen + "decoder.bias_up")
    hidden = np.maximum(np.einsum("tj,tjk->tk", x, dw) + db, 0)  # (T, a)
    return np.einsum("tk,tkj->tj", hidden, uw) + ub  # (T, d)


def official_gpt2_moe(sd, prefix, layer, x, k):
    """layers.py MoE.forward (eval): softmax(x @ w_gate), top-k, renormalise, Conv1D gelu_new experts,
    plus the HyperExpert of the unselected experts. x (B, S, d) → (output, selected (T, k), margin (T,))."""
    m, gen = f"{prefix}h.{layer}.mlp.", prefix + "param_gen."
    xt = x.reshape(-1, x.shape[-1])  # (T, d)
    probs = np_softmax(xt @ sd[m + "w_gate"])  # (T, N)
    order = np.argsort(-probs, axis=-1, kind="stable")
    top = order[:, :k]  # (T, k)
    gate = np.take_along_axis(probs, top, axis=-1)
    gate = gate / gate.sum(axis=-1, keepdims=True)
    y = np.zeros_like(xt)
    for t in range(xt.shape[0]):
        for slot in range(k):
            ex = f"{m}experts.expert_{top[t, slot]}."
            hid = gelu_new(xt[t] @ sd[ex + "c_fc.weight"] + sd[ex + "c_fc.bias"])
            y[t] += gate[t, slot] * (hid @ sd[ex + "c_proj.weight"] + sd[ex + "c_proj.bias"])
    unselected = np.ones(probs.shape, dtype=bool)
    np.put_along_axis(unselected, top, False, axis=-1)
    if m + "n_experts_embedding.weight" in sd:
        y = y + official_hyper_expert(sd, m, gen, layer, xt, unselected)
    N = probs.shape[1]
    logits = xt @ sd[m + "w_gate"]
    srt = -np.sort(-logits, axis=-1)
    margin = srt[:, k - 1] - srt[:, k] if k < N else np.full(xt.shape[0], np.inf)
    return y.reshape(x.shape), top, margin


def official_switch_moe(sd, stack, layer, x, capacity):
    """SwitchTransformersSparseMLP.forward (eval): top-1 router (argmax of softmax), capacity by per-sequence
    cumsum, dropped tokens pass through, output scaled by the max probability, plus the HyperExpert."""
    ff = {"encoder": 1, "decoder": 2}[stack]
    m, gen = f"{stack}.block.{layer}.layer.{ff}.mlp.", f"{stack}.param_gen."
    B, S, d = x.shape
    logits = nn_linear(x, sd, m + "router.classifier")  # (B, S, N)
    probs = np_softmax(logits)
    N = probs.shape[-1]
    index = probs.argmax(axis=-1)  # (B, S)
    onehot = np.eye(N, dtype=np.int64)[index]  # (B, S, N)
    mask = onehot * (np.cumsum(onehot, axis=-2) <= (capacity if capacity is not None else S + 1))
    nxt = x.copy()
    for j in range(N):
        rows = mask[..., j].astype(bool)
        ex = f"{m}experts.expert_{j}."
        nxt[rows] = np.maximum(x[rows] @ sd[ex + "wi.weight"].T, 0) @ sd[ex + "wo.weight"].T
    y = probs.max(axis=-1, keepdims=True) * nxt
    hyp = official_hyper_expert(sd, m, gen, layer, x.reshape(-1, d), onehot.reshape(-1, N) == 0)
    srt = -np.sort(-logits.reshape(-1, N), axis=-1)
    margin = srt[:, 0] - srt[:, 1] if N > 1 else np.full(B * S, np.inf)
    return y + hyp.reshape(x.shape), index.reshape(-1, 1), margin


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def sizes(draw, min_layers=1):
    N = draw(st.integers(1, 6))
    return dict(d=draw(st.integers(1, 8)), f=draw(st.integers(1, 8)), N=N, e=draw(st.integers(1, 5)),
                p=draw(st.integers(1, 5)), h=draw(st.integers(1, 5)), l=draw(st.integers(1, 4)),
                g=draw(st.integers(1, 5)), a=draw(st.integers(1, 5)), L=draw(st.integers(min_layers, 4)))


def layer_inputs(cfg, params, layer, rng, B, S):
    return inputs_with_margin(cfg, ref.layer_params(params, layer), (B, S, cfg.d_model), rng, margin=1e-3)


# ---------------------------------------------------------------------------------------------
# (b) behaviour: converted layers and stacks equal the official forward
# ---------------------------------------------------------------------------------------------


@given(sz=sizes(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_official_gpt2_layers_and_stack_match_official_forward(sz, data, seed):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, sz["N"]), label="k")
    B, S = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(0, 5), label="S")
    prefix = data.draw(st.sampled_from(["", "transformer.", "module.transformer."]), label="prefix")
    sd = official_gpt2_state(rng, prefix=prefix, **sz)
    result = convert.from_official_gpt2(sd, top_k=k, dtype=np.float64)
    cfg = result.config
    assert (cfg.n_layers, cfg.moe_every, cfg.top_k, cfg.gate, cfg.activation) == (sz["L"], 1, k, "topk", "gelu_tanh")
    for layer in range(sz["L"]):
        x = layer_inputs(cfg, result.params, layer, rng, B, S)
        want, top, _ = official_gpt2_moe(sd, prefix, layer, x, k)
        got = ref.layer(cfg, ref.layer_params(result.params, layer), x, layer)
        np.testing.assert_array_equal(got.selected.reshape(-1, k), top)
        np.testing.assert_allclose(got.output, want, rtol=RTOL, atol=ATOL * magnitude(want, x))
    # the stack: h ← h + moe_ℓ(h) for every block, layer embedding ℓ
    x = layer_inputs(cfg, result.params, 0, rng, B, S)
    h = x
    for layer in range(sz["L"]):
        out, _, margin = official_gpt2_moe(sd, prefix, layer, h, k)
        assume(margin.size == 0 or margin.min() > 1e-6)  # deeper layers' routing margins are not controlled
        h = h + out
    np.testing.assert_allclose(ref.stack(cfg, result.params, x)[0], h, rtol=RTOL, atol=ATOL * magnitude(h))


@given(sz=sizes(min_layers=2), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_official_switch_stack_matches_official_forward(sz, data, seed):
    rng = np.random.default_rng(seed)
    stack = data.draw(st.sampled_from(["encoder", "decoder"]), label="stack")
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 3)), label="capacity")
    router_bias = data.draw(st.booleans(), label="router_bias")
    B, S = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(0, 6), label="S")
    sd = official_switch_state(rng, router_bias=router_bias, **sz)
    result = convert.from_official_switch(sd, stack=stack, capacity=capacity, dtype=np.float64)
    cfg = result.config
    odd = [i for i in range(sz["L"]) if i % 2 == 1]
    assert ref.stack_layers(cfg) == odd and cfg.moe_every == (2 if sz["L"] > 2 else cfg.moe_every)
    assert (cfg.gate, cfg.capacity, cfg.expert_bias, cfg.activation, cfg.router_bias) == (
        "switch", capacity, False, "relu", router_bias)
    for layer in odd:
        x = layer_inputs(cfg, result.params, layer, rng, B, S)
        want, top, _ = official_switch_moe(sd, stack, layer, x, capacity)
        got = ref.layer(cfg, ref.layer_params(result.params, layer), x, layer)
        np.testing.assert_array_equal(got.selected.reshape(-1, 1), top)
        np.testing.assert_allclose(got.output, want, rtol=RTOL, atol=ATOL * magnitude(want, x))
    x = layer_inputs(cfg, result.params, odd[0], rng, B, S)
    h = x
    for layer in odd:
        out, _, margin = official_switch_moe(sd, stack, layer, h, capacity)
        assume(margin.size == 0 or margin.min() > 1e-6)
        h = h + out
    np.testing.assert_allclose(ref.stack(cfg, result.params, x)[0], h, rtol=RTOL, atol=ATOL * magnitude(h))


@pytest.mark.parametrize("variant", ["gpt2", "switch"])
def test_converted_weights_in_the_torch_layer_match_official_forward(variant):
    rng = np.random.default_rng(7)
    sz = dict(d=8, f=12, N=4, e=5, p=6, h=7, l=3, g=9, a=4, L=4)
    if variant == "gpt2":
        sd = official_gpt2_state(rng, **sz)
        result = convert.from_official_gpt2(sd, top_k=2, dtype=np.float64)
    else:
        sd = official_switch_state(rng, **sz)
        result = convert.from_official_switch(sd, stack="encoder", capacity=2, dtype=np.float64)
    cfg = result.config
    worst = 0.0
    for layer in ref.stack_layers(cfg):
        x = layer_inputs(cfg, result.params, layer, rng, 2, 5)
        if variant == "gpt2":
            want = official_gpt2_moe(sd, "", layer, x, 2)[0]
        else:
            want = official_switch_moe(sd, "encoder", layer, x, 2)[0]
        module = HyperMoELayer(cfg, dtype=torch.float64).eval()  # its state_dict names are ref.param_shapes'
        module.load_state_dict(params_from_ref(ref.layer_params(result.params, layer)))
        with torch.no_grad():
            got = module(torch.from_numpy(x), layer).output.numpy()
        S = magnitude(want, x)  # float64, the same math in another order: ≤ 4.5e-13 S (tests/strategies.py)
        worst = max(worst, float(np.abs(got - want).max()) / S)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * S)
    assert worst < 1e-9  # relative to S


# ---------------------------------------------------------------------------------------------
# (a) placement: known patterns arrive where documented
# ---------------------------------------------------------------------------------------------


def arange_state(sd):
    """Each tensor filled with distinct values: a running arange, so any misplaced entry shows."""
    out, start = {}, 0.0
    for key in sorted(sd):
        size = int(np.prod(sd[key].shape))
        out[key] = (start + np.arange(size, dtype=np.float64)).reshape(sd[key].shape)
        start += size
    return out


def test_gpt2_placement_of_every_tensor():
    d, f, N, e, p, h, l, g, a, L = 3, 5, 4, 2, 3, 4, 2, 6, 2, 3
    sd = arange_state(official_gpt2_state(np.random.default_rng(0), d=d, f=f, N=N, e=e, p=p, h=h, l=l, g=g, a=a, L=L))
    res = convert.from_official_gpt2(sd, keep_noise=True, dtype=np.float64)
    P = res.params
    for i in range(L):
        m = f"h.{i}.mlp."
        np.testing.assert_array_equal(P[f"layers.{i}.router.weight"], sd[m + "w_gate"])  # as is, (d, N)
        np.testing.assert_array_equal(P[f"layers.{i}.router.noise_weight"], sd[m + "w_noise"])
        for j in range(N):
            ex = f"{m}experts.expert_{j}."
            np.testing.assert_array_equal(P[f"layers.{i}.experts.w1"][j], sd[ex + "c_fc.weight"])  # Conv1D as is
            np.testing.assert_array_equal(P[f"layers.{i}.experts.b1"][j], sd[ex + "c_fc.bias"])
            np.testing.assert_array_equal(P[f"layers.{i}.experts.w2"][j], sd[ex + "c_proj.weight"])
            np.testing.assert_array_equal(P[f"layers.{i}.experts.b2"][j], sd[ex + "c_proj.bias"])
        np.testing.assert_array_equal(P[f"layers.{i}.expert_embed"], sd[m + "n_experts_embedding.weight"])
        np.testing.assert_array_equal(P[f"layers.{i}.process.w1"], sd[m + "embedding_process.0.weight"].T)
        np.testing.assert_array_equal(P[f"layers.{i}.process.b1"], sd[m + "embedding_process.0.bias"])
        np.testing.assert_array_equal(P[f"layers.{i}.process.w2"], sd[m + "embedding_process.2.weight"].T)
        np.testing.assert_array_equal(P[f"layers.{i}.process.b2"], sd[m + "embedding_process.2.bias"])
    check_generator_placement(P, sd, "param_gen.", d=d, a=a)
    # w_noise kept: not reported; mean/std and the manual adapter: reported with a reason
    assert sorted(res.unused) == sorted(k for k in sd if k.endswith(("mean", "std")) or "adapter_layer" in k)
    assert all(res.unused.values())
    assert sorted(res.ignored) == sorted(k for k in sd if not (".mlp." in k or k.startswith("param_gen.")))


def check_generator_placement(P, sd, gen, *, d, a):
    np.testing.assert_array_equal(P["hyper.layer_embed"], sd[gen + "layer_embed.weight"])
    for ours, theirs in (("trunk", "linear1"), ("w_down", "weight_down"), ("w_up", "weight_up"),
                         ("b_down", "bias_down"), ("b_up", "bias_up")):
        np.testing.assert_array_equal(P[f"hyper.{ours}.weight"], sd[f"{gen}decoder.{theirs}.weight"].T)
        np.testing.assert_array_equal(P[f"hyper.{ours}.bias"], sd[f"{gen}decoder.{theirs}.bias"])
    # row-major heads, entry by entry: our generated W_down[i, j] is official output row i·a + j,
    # our W_up[j, i] is official output row j·d + i
    Wd, Wu = sd[gen + "decoder.weight_down.weight"], sd[gen + "decoder.weight_up.weight"]
    ours_d = P["hyper.w_down.weight"].reshape(-1, d, a)  # (g, d, a)
    ours_u = P["hyper.w_up.weight"].reshape(-1, a, d)  # (g, a, d)
    for i in range(d):
        for j in range(a):
            np.testing.assert_array_equal(ours_d[:, i, j], Wd[i * a + j])
            np.testing.assert_array_equal(ours_u[:, j, i], Wu[j * d + i])


def test_switch_placement_of_every_tensor():
    d, f, N, e, p, h, l, g, a, L = 3, 5, 3, 2, 3, 4, 2, 6, 2, 5
    sd = arange_state(official_switch_state(np.random.default_rng(0), d=d, f=f, N=N, e=e, p=p, h=h, l=l, g=g,
                                            a=a, L=L, router_bias=True))
    res = convert.from_official_switch(sd, stack="decoder", capacity=None, dtype=np.float64)
    P = res.params
    assert res.config.n_layers == L and res.config.moe_every == 2
    assert sorted({k.split(".")[1] for k in P if k.startswith("layers.")}) == ["1", "3"]
    for i in (1, 3):
        m = f"decoder.block.{i}.layer.2.mlp."
        np.testing.assert_array_equal(P[f"layers.{i}.router.weight"], sd[m + "router.classifier.weight"].T)
        np.testing.assert_array_equal(P[f"layers.{i}.router.bias"], sd[m + "router.classifier.bias"])
        for j in range(N):
            np.testing.assert_array_equal(P[f"layers.{i}.experts.w1"][j], sd[f"{m}experts.expert_{j}.wi.weight"].T)
            np.testing.assert_array_equal(P[f"layers.{i}.experts.w2"][j], sd[f"{m}experts.expert_{j}.wo.weight"].T)
        np.testing.assert_array_equal(P[f"layers.{i}.expert_embed"], sd[m + "n_experts_embedding.weight"])
        np.testing.assert_array_equal(P[f"layers.{i}.process.w1"], sd[m + "embedding_process.0.weight"].T)
        np.testing.assert_array_equal(P[f"layers.{i}.process.w2"], sd[m + "embedding_process.2.weight"].T)
    check_generator_placement(P, sd, "decoder.param_gen.", d=d, a=a)
    assert sorted(res.unused) == sorted(k for k in sd if k.startswith("decoder.") and "adapter_layer" in k)
    assert not any(k.startswith("decoder.param_gen.") or ".mlp.router." in k and "decoder" in k for k in res.ignored)
    assert any(k.startswith("encoder.param_gen.") for k in res.ignored)  # the other stack is not touched


def test_generated_weights_are_the_official_heads_reshaped_row_major():
    """ref.generate on converted weights = the official head outputs .view(d, a) / .view(a, d)."""
    rng = np.random.default_rng(3)
    sd = official_gpt2_state(rng, d=4, f=3, N=3, e=2, p=3, h=5, l=2, g=6, a=3, L=2)
    res = convert.from_official_gpt2(sd, dtype=np.float64)
    z = rng.standard_normal((7, 5))
    w_down, b_down, w_up, b_up = ref.generate(res.config, res.params, z, 1)
    r = np.maximum(nn_linear(np.concatenate([z, np.repeat(sd["param_gen.layer_embed.weight"][1:2], 7, 0)], -1),
                             sd, "param_gen.decoder.linear1"), 0)
    # the same sums (g = 6 terms) in another layout, transposed weights: the reorder bound of the magnitudes
    for got, head, shape in ((w_down, "weight_down", (7, 4, 3)), (w_up, "weight_up", (7, 3, 4)),
                             (b_down, "bias_down", (7, 3)), (b_up, "bias_up", (7, 4))):
        want = nn_linear(r, sd, f"param_gen.decoder.{head}").reshape(shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=reorder_atol(magnitude(want, r)), err_msg=head)


def test_gpt2_noise_weights_reported_unless_kept_and_float32_output():
    sd = official_gpt2_state(np.random.default_rng(1), d=4, f=3, N=3, e=2, p=2, h=2, l=2, g=2, a=2, L=2)
    res = convert.from_official_gpt2(sd)
    assert not res.config.noisy_gating and "layers.0.router.noise_weight" not in res.params
    assert "h.0.mlp.w_noise" in res.unused and "h.1.mlp.w_noise" in res.unused
    assert {v.dtype for v in res.params.values()} == {np.dtype(np.float32)}
    ref64 = convert.from_official_gpt2(sd, dtype=np.float64).params
    for name, value in res.params.items():
        np.testing.assert_array_equal(value, ref64[name].astype(np.float32))


def test_plain_moe_checkpoint_without_hypernetwork():
    rng = np.random.default_rng(2)
    sd = official_gpt2_state(rng, d=4, f=3, N=3, e=2, p=2, h=2, l=2, g=2, a=2, L=3, hyper=False)
    res = convert.from_official_gpt2(sd, top_k=2, dtype=np.float64)
    assert not res.config.hyper_expert and res.config.n_layers == 3
    assert not any(k.startswith("hyper.") for k in res.params)
    x = layer_inputs(res.config, res.params, 2, rng, 2, 4)
    want = official_gpt2_moe(sd, "", 2, x, 2)[0]
    np.testing.assert_allclose(ref.layer(res.config, ref.layer_params(res.params, 2), x, 2).output, want,
                               rtol=RTOL, atol=ATOL * magnitude(want, x))


# ---------------------------------------------------------------------------------------------
# Upcycling dense GPT-2 MLPs
# ---------------------------------------------------------------------------------------------


def dense_gpt2_state(rng, d, f, L, prefix=""):
    sd = {prefix + "wte.weight": rng.standard_normal((9, d))}
    for i in range(L):
        m = f"{prefix}h.{i}.mlp."
        sd.update({m + "c_fc.weight": rng.standard_normal((d, f)), m + "c_fc.bias": rng.standard_normal(f),
                   m + "c_proj.weight": rng.standard_normal((f, d)), m + "c_proj.bias": rng.standard_normal(d),
                   f"{prefix}h.{i}.attn.c_attn.weight": rng.standard_normal((d, 3 * d))})
    return sd


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 5), data=st.data())
def test_upcycled_experts_are_the_dense_mlp(seed, N, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, N), label="k")
    L, d, f = data.draw(st.integers(1, 4), label="L"), data.draw(st.integers(1, 6), label="d"), 5
    moe_every = data.draw(st.integers(1, L), label="moe_every")
    sd = dense_gpt2_state(rng, d, f, L, prefix="transformer.")
    res = convert.upcycle_gpt2_mlp(sd, n_experts=N, top_k=k, seed=seed % 1000, moe_every=moe_every,
                                   d_adapter=3, d_expert_embed=4, d_process=4, d_hyper=4, d_generator=4,
                                   dtype=np.float64)
    cfg = res.config
    assert (cfg.n_experts, cfg.top_k, cfg.n_layers, cfg.moe_every, cfg.d_adapter) == (N, k, L, moe_every, 3)
    fresh = ref.init_stack(cfg, seed=seed % 1000)  # everything but the experts is ref's init with that seed,
    zero_heads = {"hyper.w_up.weight", "hyper.w_up.bias", "hyper.b_up.weight", "hyper.b_up.bias"}  # but these: 0
    for name, value in res.params.items():
        if name in zero_heads:
            assert not value.any(), name
        elif ".experts." not in name:
            np.testing.assert_array_equal(value, fresh[name])
    for layer in ref.stack_layers(cfg):
        m = f"transformer.h.{layer}.mlp."
        x = rng.standard_normal((2, 3, d))
        # every expert is the dense MLP and the gates sum to 1, so the routed part is the dense MLP
        dense = gelu_new(x @ sd[m + "c_fc.weight"] + sd[m + "c_fc.bias"]) @ sd[m + "c_proj.weight"] + sd[m + "c_proj.bias"]
        got = ref.layer(cfg, ref.layer_params(res.params, layer), x, layer)
        # Σ g_i FFN(x) = FFN(x) up to the gates' sum 1 ± k u and the reorder bound: 1e-9 · S covers both
        np.testing.assert_allclose(got.routed, dense, rtol=RTOL, atol=1e-9 * magnitude(dense, x))
        assert not got.hyper.any()  # W_up = 0, b_up = 0: the HyperExpert adds exactly 0, the layer is the dense MLP
    stays_dense = [i for i in range(L) if not cfg.is_moe_block(i)]
    assert sorted(res.unused) == sorted(f"transformer.h.{i}.mlp.{n}" for i in stays_dense
                                        for n in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"))


# ---------------------------------------------------------------------------------------------
# Files and the CLI
# ---------------------------------------------------------------------------------------------


def save_torch(sd, path, dtype=torch.float32):
    torch.save({k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}, path)
    return str(path)


def test_cli_official_gpt2_round_trip(tmp_path, capsys):
    sd = official_gpt2_state(np.random.default_rng(4), d=4, f=6, N=3, e=2, p=3, h=2, l=2, g=3, a=2, L=2)
    path = save_torch(sd, tmp_path / "pytorch_model.bin", dtype=torch.float64)
    assert main(["convert", "--from", "official-gpt2", path, "-o", str(tmp_path / "out"), "--top-k", "2",
                 "--activation", "gelu_tanh", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "h.0.mlp.w_noise" in out and "adapter_layer" in out and "--verbose" in out
    cfg, params, kind = ref.io.load_dir(tmp_path / "out")
    direct = convert.from_official_gpt2(sd, top_k=2, dtype=np.float64)
    assert kind == "stack" and cfg == direct.config
    for name in direct.params:
        np.testing.assert_array_equal(params[name], direct.params[name])


def test_cli_official_switch_npz_and_bf16_torch(tmp_path, capsys):
    sd = official_switch_state(np.random.default_rng(5), d=4, f=6, N=3, e=2, p=3, h=2, l=2, g=3, a=2, L=4)
    np.savez(tmp_path / "sd.npz", **sd)
    assert main(["convert", "--from", "official-switch", str(tmp_path / "sd.npz"), "-o", str(tmp_path / "a"),
                 "--stack", "encoder", "--capacity", "64", "--activation", "relu", "--verbose"]) == 0
    assert "decoder.param_gen.layer_embed.weight" in capsys.readouterr().out  # --verbose lists the other stack
    cfg, params, _ = ref.io.load_dir(tmp_path / "a")
    assert (cfg.capacity, cfg.moe_every, cfg.n_layers, cfg.gate) == (64, 2, 4, "switch")
    # bfloat16 checkpoints load as float32 values of the bf16 numbers
    path = save_torch(sd, tmp_path / "sd.pt", dtype=torch.bfloat16)
    assert main(["convert", "--from", "official-switch", path, "-o", str(tmp_path / "b"), "--stack", "encoder",
                 "--capacity", "none", "--activation", "relu"]) == 0
    cfg_b, params_b, _ = ref.io.load_dir(tmp_path / "b")
    assert cfg_b.capacity is None
    key = "encoder.block.1.layer.1.mlp.router.classifier.weight"
    bf16 = torch.from_numpy(sd[key]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(params_b["layers.1.router.weight"], bf16.T)


def test_cli_upcycle(tmp_path, capsys):
    sd = dense_gpt2_state(np.random.default_rng(6), 4, 8, 3)
    path = save_torch(sd, tmp_path / "gpt2.pt")
    assert main(["convert", "--from", "gpt2-mlp", path, "--experts", "4", "--top-k", "2", "--seed", "3",
                 "--d-adapter", "2", "--hyper-width", "5", "--activation", "gelu_tanh", "-o", str(tmp_path / "up")]) == 0
    cfg, params, _ = ref.io.load_dir(tmp_path / "up")
    assert (cfg.n_experts, cfg.top_k, cfg.d_adapter, cfg.d_generator, cfg.n_layers) == (4, 2, 2, 5, 3)
    np.testing.assert_array_equal(params["layers.2.experts.w1"][3], sd["h.2.mlp.c_fc.weight"].astype(np.float32))


@pytest.mark.parametrize("argv, message", [
    (["--stack", "encoder"], "--stack"),  # a Switch-only flag for a GPT-2 checkpoint
    (["--experts", "3"], "--experts"),
])
def test_cli_rejects_flags_of_another_source(tmp_path, capsys, argv, message):
    sd = official_gpt2_state(np.random.default_rng(0), d=2, f=2, N=2, e=2, p=2, h=2, l=2, g=2, a=2, L=1)
    path = save_torch(sd, tmp_path / "sd.pt")
    assert main(["convert", "--from", "official-gpt2", path, "-o", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "does not apply" in err.replace("do(es)", "does")


def test_cli_switch_requires_stack_and_capacity(tmp_path, capsys):
    sd = official_switch_state(np.random.default_rng(0), d=2, f=2, N=2, e=2, p=2, h=2, l=2, g=2, a=2, L=2)
    np.savez(tmp_path / "sd.npz", **sd)
    assert main(["convert", "--from", "official-switch", str(tmp_path / "sd.npz"), "-o", str(tmp_path / "o"),
                 "--stack", "encoder", "--activation", "relu"]) == 2
    assert "--capacity is needed" in capsys.readouterr().err
    assert main(["convert", "--from", "official-switch", str(tmp_path / "sd.npz"), "-o", str(tmp_path / "o"),
                 "--stack", "encoder", "--capacity", "0", "--activation", "relu"]) == 2
    assert "--capacity must be an int ≥ 1" in capsys.readouterr().err


def test_unknown_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--from", "official-t5", "x.pt", "-o", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'official-t5'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown source 'official-t5'"):
        convert.convert(tmp_path / "x.pt", "official-t5")


# ---------------------------------------------------------------------------------------------
# Errors: missing / misshapen tensors, impossible layouts, files that are no state dict
# ---------------------------------------------------------------------------------------------


def small_gpt2():
    return official_gpt2_state(np.random.default_rng(8), d=4, f=3, N=3, e=2, p=2, h=2, l=2, g=2, a=2, L=3)


def test_one_misshapen_tensor_is_the_one_blamed():
    """Block 0's c_fc (d, f - 1): the sizes come from the shape the blocks agree on, so only that tensor is named
    (it used to set f, and every correct tensor of the other blocks was reported misshapen instead)."""
    sd = dense_gpt2_state(np.random.default_rng(0), d=4, f=6, L=3)
    sd["h.0.mlp.c_fc.weight"] = sd["h.0.mlp.c_fc.weight"][:, :5]
    with pytest.raises(ValueError, match=r"^misshapen official tensor\(s\): h\.0\.mlp\.c_fc\.weight has shape "
                                         r"\(4, 5\), expected \(4, 6\)$"):
        convert.upcycle_gpt2_mlp(sd, n_experts=2, top_k=1, kind="stack")
    sd = small_gpt2()
    sd["h.2.mlp.experts.expert_0.c_fc.weight"] = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"^misshapen official tensor\(s\): h\.2\.mlp\.experts\.expert_0\.c_fc"
                                         r"\.weight has shape \(4, 2\), expected \(4, 3\)$"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    sd["h.0.mlp.experts.expert_0.c_fc.weight"] = np.zeros((4, 2))  # block 0, the anchor: the same
    with pytest.raises(ValueError, match=r"^misshapen official tensor\(s\): h\.0\.mlp\.experts\.expert_0\.c_fc"
                                         r"\.weight has shape \(4, 2\), expected \(4, 3\)$"):
        convert.from_official_gpt2(sd)


def test_a_directory_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ValueError, match=r"hf is a directory: convert reads one checkpoint file \(\.safetensors"):
        convert.load_state_dict(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert main(["convert", "--from", "gpt2-mlp", str(tmp_path / "hf"), "--experts", "2", "--top-k", "1",
                 "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'hf'}: a checkpoint folder holds config.json and its weights" in err  # folders: config.json
    assert "this one has no config.json (pass the weights file itself, with the flags, instead)" in err


def test_missing_tensors_are_named():
    sd = small_gpt2()
    del sd["h.1.mlp.experts.expert_2.c_proj.bias"], sd["param_gen.decoder.bias_up.weight"]
    with pytest.raises(ValueError, match=r"missing official tensor\(s\): .*h\.1\.mlp\.experts\.expert_2\.c_proj\.bias"
                                         r".*param_gen\.decoder\.bias_up\.weight"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    del sd["param_gen.layer_embed.weight"]
    with pytest.raises(ValueError, match=r"param_gen\.layer_embed\.weight"):
        convert.from_official_gpt2(sd)
    with pytest.raises(ValueError, match=r"no official GPT-2 HyperMoE blocks found"):
        convert.from_official_gpt2({"wte.weight": np.zeros((3, 4))})
    sd = official_switch_state(np.random.default_rng(0), d=2, f=2, N=2, e=2, p=2, h=2, l=2, g=2, a=2, L=2,
                               stacks=("encoder",))
    with pytest.raises(ValueError, match="no official Switch HyperMoE blocks in the decoder stack"):
        convert.from_official_switch(sd, stack="decoder", capacity=None)


@pytest.mark.parametrize("key, shape, message", [
    ("h.2.mlp.experts.expert_1.c_fc.weight", (3, 4),
     r"h\.2\.mlp\.experts\.expert_1\.c_fc\.weight has shape \(3, 4\), expected \(4, 3\)"),
    ("h.0.mlp.embedding_process.2.weight", (2, 3), r"embedding_process\.2\.weight has shape \(2, 3\), expected \(2, 2\)"),
    ("param_gen.decoder.weight_up.weight", (6, 2), r"weight_up\.weight has shape \(6, 2\), expected \(8, 2\)"),
    ("param_gen.decoder.weight_down.weight", (6, 2), r"weight_down\.weight' has 6 rows, not a multiple of d = 4"),
    ("h.0.mlp.w_gate", (4, 3, 1), r"w_gate has shape \(4, 3, 1\), expected \(4, 3\)"),  # the other blocks set d, N
])
def test_misshapen_tensors_are_named(key, shape, message):
    sd = small_gpt2()
    sd[key] = np.zeros(shape)
    with pytest.raises(ValueError, match=message):
        convert.from_official_gpt2(sd)


def test_layouts_that_cannot_be_expressed_are_refused():
    sd = small_gpt2()
    sd["h.1.mlp.experts.expert_0.wi_0.weight"] = np.zeros((3, 4))  # not in the GPT-2 layout
    with pytest.raises(ValueError, match=r"unexpected official tensor.*expert_0\.wi_0\.weight"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    sd["h.0.mlp.experts.expert_3.c_fc.weight"] = np.zeros((4, 3))  # a 4th expert, the router has N = 3
    with pytest.raises(ValueError, match=r"unexpected official tensor.*h\.0\.mlp\.experts\.expert_3\.c_fc\.weight"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    for key in [k for k in sd if k.startswith("h.2.mlp.") and ("embedding" in k or "adapter" in k)]:
        del sd[key]  # block 2 a plain MoE layer, blocks 0 and 1 HyperMoE
    with pytest.raises(ValueError, match="block 0 has expert embeddings but block 2 does not"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    for key in [k for k in sd if k.startswith("h.1.mlp.")]:  # block 1 dense: pattern {0, 2} of 3
        del sd[key]
    with pytest.raises(ValueError, match=r"blocks \[0, 2\] of 3: this pattern is not expressible by moe_every"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    sd["module.h.0.mlp.w_gate"] = sd["h.0.mlp.w_gate"]
    with pytest.raises(ValueError, match="several prefixes"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    sd["h.3.attn.c_attn.weight"] = np.zeros((4, 12))  # a 4th block but a 3-row layer table
    with pytest.raises(ValueError, match="4 blocks but param_gen.layer_embed.weight only 3 rows"):
        convert.from_official_gpt2(sd)
    sd = small_gpt2()
    sd["h.1.mlp.w_gate"] = sd["h.1.mlp.w_gate"].astype(np.int64)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.w_gate' has dtype int64"):
        convert.from_official_gpt2(sd)
    with pytest.raises(ValueError, match="top_k"):
        convert.from_official_gpt2(small_gpt2(), top_k=4)
    with pytest.raises(ValueError, match="stack must be 'encoder' or 'decoder'"):
        convert.from_official_switch(small_gpt2(), stack="both", capacity=None)


class NotATensor:  # a pickled instance of this class must never be constructed by the loader
    constructed = False

    def __setstate__(self, state):
        NotATensor.constructed = True


def test_files_that_are_no_state_dict(tmp_path):
    (tmp_path / "text.bin").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.bin: unrecognised content \(23 bytes, starting 68 65 6c"):
        convert.load_state_dict(tmp_path / "text.bin")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: not a state dict .* got list"):
        convert.load_state_dict(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"entry 'step' is a int, not a tensor"):
        convert.load_state_dict(tmp_path / "mixed.pt")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one\.npz: a single \.npy array, not a state dict"):
        convert.load_state_dict(tmp_path / "one.npz")
    with pytest.raises(FileNotFoundError):
        convert.load_state_dict(tmp_path / "absent.pt")
    # a wrapped training checkpoint is unwrapped
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "wrapped.pt")
    assert list(convert.load_state_dict(tmp_path / "wrapped.pt")) == ["w"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on plain pickle files
def test_pickled_objects_are_refused_without_running_them(tmp_path, capsys):
    obj = NotATensor()
    torch.save({"w": torch.zeros(2), "evil": obj}, tmp_path / "objects.pt")
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump({"w": obj}, fh)
    for name, detail in (("objects.pt", r"Unsupported global: GLOBAL \S*NotATensor"),
                         ("plain.pkl", "Unsupported operand")):
        with pytest.raises(ValueError, match=rf"{name}: refused: .*would execute pickled code .*{detail}"):
            convert.load_state_dict(tmp_path / name)
        assert main(["convert", "--from", "official-gpt2", str(tmp_path / name), "-o", str(tmp_path / "o"),
                     "--top-k", "1", "--activation", "gelu_tanh"]) == 2
        assert "refused" in capsys.readouterr().err
    assert not NotATensor.constructed
    assert not (tmp_path / "o").exists()


class CallsAFunction:  # pickled as a call of os.makedirs: a loader that ran it would create the folder
    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.makedirs, (self.folder,)


def test_a_pickled_function_call_in_a_zip_checkpoint_is_refused(tmp_path, capsys):
    """torch 2.13 refuses a function of a blocked module (os, posix) with a message of its own ("Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked"), not "WeightsUnpickler error: …": the refusal is
    read from the file's data.pkl, not from torch's wording."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": CallsAFunction(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused: .*would execute pickled code .*references "
                                         r"(os|posix)\.makedirs"):
        convert.load_state_dict(tmp_path / "evil.pt")
    assert main(["convert", "--from", "official-gpt2", str(tmp_path / "evil.pt"), "-o", str(tmp_path / "o"),
                 "--top-k", "1", "--activation", "gelu_tanh"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "not a torch checkpoint" not in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o").exists()
    assert convert.pickle_global(tmp_path / "evil.pt") in ("os.makedirs", "posix.makedirs")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    assert convert.pickle_global(tmp_path / "plain.pt") == ""  # torch's own globals (tensor rebuilds) are no finding


def test_config_json_written_by_the_cli_is_a_stack(tmp_path):
    sd = small_gpt2()
    np.savez(tmp_path / "sd.npz", **sd)
    assert main(["convert", "--from", "official-gpt2", str(tmp_path / "sd.npz"), "-o", str(tmp_path / "o"),
                 "--top-k", "1", "--activation", "gelu_tanh"]) == 0
    data = json.loads((tmp_path / "o" / "config.json").read_text())
    assert data["kind"] == "stack" and data["n_layers"] == 3 and data["moe_every"] == 1
