"""The decoder-only HyperMoE transformer: hypermoe.model (torch) against ref.model (NumPy) on random small
configs, saved directories, training, and input validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ref
import ref.io
from ref import model as ref_model
from hypermoe.generation import left_pad
from hypermoe.layer import params_to_ref
from hypermoe.model import HyperMoETransformer, attention_bias
from tests.strategies import configs, magnitude, reorder_atol

MARGIN = 1e-9  # float64: torch and NumPy router logits differ by ~1e-15, so a selection cannot flip


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are tiny: intra-op threads only add overhead (20× slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def model_configs(draw, **fixed) -> ref.HyperMoEConfig:
    """Random small model configs: moe_every 1 or 2 with at least one HyperMoE block, tied or untied,
    heads dividing d, both gates, capacity on/off, HyperExpert on/off (layer fields from configs()),
    training-only noise fields set (an eval-mode model must ignore them, as the reference does)."""
    moe_every = fixed.pop("moe_every", None) or draw(st.sampled_from([1, 2]))
    d = draw(st.integers(1, 12))
    values = dict(
        d_model=d, n_heads=draw(st.sampled_from([h for h in range(1, d + 1) if d % h == 0])),
        moe_every=moe_every, n_layers=draw(st.integers(moe_every, 3)), tie_embeddings=draw(st.booleans()),
        vocab_size=draw(st.integers(1, 12)), max_seq_len=draw(st.integers(1, 8)),
        noisy_gating=draw(st.booleans()), router_jitter=draw(st.sampled_from([0.0, 0.1])),  # unused in eval mode
    )
    values.update(fixed)
    return draw(configs(**values))


@st.composite
def model_cases(draw, cfg_strategy=None):
    """(cfg, float64 params from ref.model.init_model, tokens (B, S) int64)."""
    cfg = draw(cfg_strategy if cfg_strategy is not None else model_configs())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params = ref_model.init_model(cfg, seed=seed)
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, cfg.max_seq_len))
    return cfg, params, rng.integers(0, cfg.vocab_size, size=(B, S))


def unambiguous(cfg, results, real=None) -> bool:
    """Every HyperMoE block's routing margin in ref is at least MARGIN (at the tokens where `real` (B, S) is
    true, when given: padding outputs are meaningless and may route either way)."""
    return all(ref.routing_margins(r.logits, cfg.top_k)[... if real is None else real].min(initial=np.inf) >= MARGIN
               for r in results.values())


def assert_matches_ref(cfg, params, tokens, model, rtol=1e-10, atol=1e-10, **inputs):
    """Routing exactly, block by block; then gates (≤ 1), logits and aux losses within rtol and atol · S, S the
    magnitude of the compared values (torch and NumPy: the same math in a different order, float64 errors
    ≤ ~1e-13 S; 1e-10 S stays far below what a wrong block moves the logits by). `inputs`: attention_mask and
    position_ids, numpy arrays for both."""
    logits, aux, results = ref_model.forward(cfg, params, tokens, **inputs)
    out = model(torch.from_numpy(tokens), **{name: torch.from_numpy(v) for name, v in inputs.items()})
    assert sorted(out.routing) == sorted(results) == ref_model.moe_blocks(cfg)
    for block, result in results.items():  # routing decisions first, block by block
        routing = out.routing[block]
        np.testing.assert_array_equal(routing.selected.numpy(), result.selected, err_msg=f"block {block} selection")
        np.testing.assert_array_equal(routing.kept.numpy(), result.kept, err_msg=f"block {block} capacity")
        np.testing.assert_allclose(routing.gates.detach().numpy(), result.gates, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.logits.detach().numpy(), logits, rtol=rtol, atol=atol * magnitude(logits))
    assert sorted(out.aux) == sorted(aux)
    for name, value in aux.items():
        np.testing.assert_allclose(out.aux[name].item(), value, rtol=rtol, atol=atol * magnitude(value), err_msg=name)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe_every", [1, 2])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("hyper_expert", [True, False])
def test_state_dict_is_ref_param_table(moe_every, tie, hyper_expert):
    cfg = ref.tiny_config(n_layers=3, moe_every=moe_every, tie_embeddings=tie, hyper_expert=hyper_expert)
    torch.manual_seed(0)
    model = HyperMoETransformer(cfg, dtype=torch.float64)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == ref_model.model_param_shapes(cfg)
    assert ("lm_head.weight" in shapes) == (not tie)
    moe = [i for i, block in enumerate(model.blocks) if block.moe is not None]
    assert moe == ref_model.moe_blocks(cfg) == ([0, 1, 2] if moe_every == 1 else [1])
    # the hypernetwork is one module, counted once among the parameters
    assert sum(p.numel() for p in model.parameters()) == sum(int(np.prod(s)) for s in shapes.values())
    assert repr(model).count("HyperNetwork") == (1 if hyper_expert else 0)
    assert f"moe_blocks={moe}" in repr(model)
    for block in model.blocks:  # one hypernetwork object, referenced by every HyperMoE layer
        assert block.moe is None or block.moe.hypernetwork is model.hyper
    # reset_parameters: a training init, LayerNorms 1 and 0, everything else drawn
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(16, dtype=torch.float64))
    assert torch.equal(model.ln_f.bias, torch.zeros(16, dtype=torch.float64))
    assert model.token_embed.std().item() == pytest.approx(16**-0.5, rel=0.2)


def test_config_without_moe_block_is_rejected():
    cfg = ref.tiny_config(n_layers=1, moe_every=2)
    with pytest.raises(ValueError, match="moe_every"):
        ref_model.model_param_shapes(cfg)
    with pytest.raises(ValueError, match="moe_every"):
        HyperMoETransformer(cfg)


def test_init_model_is_deterministic_and_layer_norms_are_not_trivial():
    cfg = ref.tiny_config(tie_embeddings=False)
    a, b, c = ref_model.init_model(cfg, 3), ref_model.init_model(cfg, 3), ref_model.init_model(cfg, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["token_embed"], c["token_embed"])
    assert not np.allclose(a["ln_f.weight"], 1) and not np.allclose(a["blocks.0.ln2.bias"], 0)
    assert ref_model.init_model(cfg, 3, np.float32)["hyper.trunk.weight"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# torch against the reference
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(model_cases())
def test_matches_reference_float64(case):
    cfg, params, tokens = case
    assume(unambiguous(cfg, ref_model.forward(cfg, params, tokens)[2]))
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    assert_matches_ref(cfg, params, tokens, model)
    back = params_to_ref(model)
    assert sorted(back) == sorted(params) and all(np.array_equal(v, params[k]) for k, v in back.items())


@pytest.mark.parametrize("gate", ["topk", "switch"])
@pytest.mark.parametrize("moe_every", [1, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_matches_reference_tiny(gate, moe_every, tie):
    """Every combination of gate, moe_every and tying at least once, with d = 16 and 2 heads."""
    cfg = ref.tiny_config(gate=gate, top_k=1 if gate == "switch" else 2, capacity=3 if gate == "switch" else None,
                          n_layers=3, moe_every=moe_every, tie_embeddings=tie)
    params = ref_model.init_model(cfg, seed=7)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 9))
    results = ref_model.forward(cfg, params, tokens)[2]
    assert unambiguous(cfg, results)
    if gate == "switch":  # the capacity-drop path runs
        assert any(not r.kept.all() for r in results.values())
    assert_matches_ref(cfg, params, tokens, HyperMoETransformer.from_ref(cfg, params))


def test_matches_reference_float32():
    cfg = ref.tiny_config(n_layers=2, tie_embeddings=False)
    params64 = ref_model.init_model(cfg, seed=11)
    tokens = np.random.default_rng(11).integers(0, cfg.vocab_size, size=(3, 12))
    results = ref_model.forward(cfg, params64, tokens)[2]
    assert all(ref.routing_margins(r.logits, cfg.top_k).min() > 1e-3 for r in results.values())
    params32 = {k: v.astype(np.float32) for k, v in params64.items()}
    model = HyperMoETransformer.from_ref(cfg, params32)
    assert model.token_embed.dtype == torch.float32
    assert_matches_ref(cfg, params32, tokens, model, rtol=1e-4, atol=1e-4)


@settings(max_examples=10)
@given(model_cases(model_configs(max_seq_len=6)), st.data())
def test_causal(case, data):
    """Changing the token at position t changes no logit before t (capacity counts in sequence order,
    so it keeps this), in ref and in torch."""
    cfg, params, tokens = case
    t = data.draw(st.integers(0, tokens.shape[1] - 1))
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    model = HyperMoETransformer.from_ref(cfg, params).eval()  # eval: no jitter / gate noise drawn
    for run in (lambda x: ref_model.forward(cfg, params, x)[0],
                lambda x: model(torch.from_numpy(x)).logits.detach().numpy()):
        # not bit-equal: tokens are grouped by expert for the GEMMs, and the groups change with the token;
        # the same sums in another grouping: the reorder bound (tests/strategies.py) of the logits' magnitude
        # (LayerNorm keeps the blocks' inputs O(1), so the logits are the largest values of the final stage)
        before, after = run(tokens), run(changed)
        np.testing.assert_allclose(before[:, :t], after[:, :t], rtol=0, atol=reorder_atol(magnitude(before)))


@st.composite
def padded_cases(draw, cfg_strategy=None, left: bool | None = None):
    """(cfg, params, tokens (B, S), attention_mask (B, S) int64, position_ids (B, S) or None): masks left-padded
    (each row ≥ 1 real token) or any 0/1 pattern (rows of padding only included), all ones for a config with
    capacity; position_ids drawn in [0, max_seq_len) or the default."""
    cfg, params, tokens = draw(model_cases(cfg_strategy))
    B, S = tokens.shape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if cfg.capacity is not None:
        mask = np.ones((B, S), dtype=np.int64)
    elif left if left is not None else draw(st.booleans()):
        pads = rng.integers(0, S, size=B)  # (B,) ≤ S - 1 padding tokens per row
        mask = (np.arange(S)[None, :] >= pads[:, None]).astype(np.int64)  # (B, S)
    else:
        mask = rng.integers(0, 2, size=(B, S))
    positions = rng.integers(0, cfg.max_seq_len, size=(B, S)) if draw(st.booleans()) else None
    return cfg, params, tokens, mask, positions


@settings(max_examples=25)
@given(padded_cases())
def test_matches_reference_with_padding_and_positions(case):
    """ref and torch agree with an attention mask and position ids, padding rows included (a query that sees no
    key gets the finite uniform average of the values in both: finfo.min + score rounds to finfo.min)."""
    cfg, params, tokens, mask, positions = case
    inputs = {"attention_mask": mask} if positions is None else {"attention_mask": mask, "position_ids": positions}
    logits, _, results = ref_model.forward(cfg, params, tokens, **inputs)
    assume(unambiguous(cfg, results))
    assert np.isfinite(logits).all()  # assert_allclose would take NaN == NaN
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    assert_matches_ref(cfg, params, tokens, model, **inputs)
    assert bool(torch.isfinite(model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits).all())


def test_default_positions():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]])
    want = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 0, 2]])
    np.testing.assert_array_equal(ref_model.default_positions(mask), want)
    got = HyperMoETransformer.default_positions(torch.from_numpy(mask), 3, 2, 3)  # the last S = 3 of P + S = 5
    np.testing.assert_array_equal(got.numpy(), want[:, 2:])
    np.testing.assert_array_equal(HyperMoETransformer.default_positions(None, 2, 4, 3).numpy(), [[4, 5, 6]] * 2)


def test_attention_bias():
    """0 where key j ≤ P + i is a real token or j = P + i (the query itself, even a padding one), finfo.min
    elsewhere; ref and torch the same table (exact constants)."""
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 1]])  # (B, P + S) with P = 2, S = 2
    lo = np.finfo(np.float64).min
    want = np.array([[[lo, 0, 0, lo], [lo, 0, 0, 0]],
                     [[0, 0, 0, lo], [0, 0, lo, 0]]])[:, None]  # (B, 1, S, P + S); [1, 0, 2]: a padding query sees itself
    np.testing.assert_array_equal(ref_model.attention_bias(mask, 2, np.float64), want)
    got = attention_bias(torch.from_numpy(mask), 2, torch.float64)
    assert got.shape == (2, 1, 2, 4) and got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), want)
    lo32 = torch.finfo(torch.float32).min
    assert attention_bias(torch.from_numpy(mask).bool(), 2, torch.float32).min().item() == lo32


def test_padding_query_rows_stay_finite_in_float16():
    """A left-padding query sees only itself, so no row of the bias is all finfo.min: in float16, finfo.min plus a
    negative score rounds to −inf, and an all-masked row would make softmax NaN (which 0 · NaN would carry into real
    tokens through that position's key and value)."""
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])  # (B, S) left padding, P = 0
    bias = attention_bias(mask, 5, torch.float16)  # (B, 1, S, S)
    scores = torch.full((2, 1, 5, 5), -100.0, dtype=torch.float16) + bias  # finfo.min - 100 → −inf in float16
    assert torch.isinf(scores).any()  # the rounding this guards against does happen
    assert torch.isfinite(torch.softmax(scores.float(), dim=-1)).all()
    assert ((ref_model.attention_bias(mask.numpy(), 5, np.float16) == 0).any(axis=-1)).all()


def test_attention_bias_exports_with_dynamic_past():
    """torch.export traces the attention with bias and past for dynamic B, S, P; the program then runs with P = 0."""
    from torch.export import Dim, export

    cfg = ref.tiny_config()
    torch.manual_seed(0)
    model = HyperMoETransformer(cfg, dtype=torch.float64).eval()

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model.blocks[0].attn

        def forward(self, x, mask, key, value):
            return self.attn(x, bias=attention_bias(mask, x.shape[1], x.dtype), past=(key, value))

    B, S, P, L = Dim("B"), Dim("S"), Dim("P"), Dim("L")
    past = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    program = export(Attention(), (torch.randn(2, 3, 16, dtype=torch.float64), torch.ones(2, 7, dtype=torch.int64),
                                   past, past),
                     dynamic_shapes={"x": {0: B, 1: S}, "mask": {0: B, 1: L},
                                     "key": {0: B, 2: P}, "value": {0: B, 2: P}})
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    empty = torch.zeros(1, 2, 0, 8, dtype=torch.float64)
    out, (key, value) = program.module()(x, torch.ones(1, 5, dtype=torch.int64), empty, empty)
    want, (want_key, _) = model.blocks[0].attn(x)  # the is_causal fast path
    assert key.shape == (1, 2, 5, 8)
    # the same formula, SDPA with an explicit mask vs is_causal: the reorder bound of the output's magnitude
    torch.testing.assert_close(out, want, rtol=0, atol=reorder_atol(magnitude(want)))
    torch.testing.assert_close(key, want_key, rtol=0, atol=reorder_atol(magnitude(want_key)))


@settings(max_examples=20)
@given(padded_cases(model_configs(capacity=False), left=True))
def test_left_padding_equals_each_prompt_alone(case):
    """Each row of a left-padded batch, at its real positions, equals that prompt run alone (ref and torch)."""
    cfg, params, tokens, mask, _ = case
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    padded = ref_model.forward(cfg, params, tokens, mask)[0]  # (B, S, V)
    torched = model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.detach().numpy()
    for b in range(tokens.shape[0]):
        real = mask[b] == 1
        alone, _, results = ref_model.forward(cfg, params, tokens[b:b + 1, real])  # (1, s, V)
        # routing near a tie could flip between the two groupings (tokens are grouped by expert for the GEMMs)
        if not unambiguous(cfg, results):
            continue
        # the same formula on another batch: masked keys add exact zeros, the rest is summed in another grouping
        atol = 1e-10 * magnitude(alone)  # assert_matches_ref's float64 bound
        np.testing.assert_allclose(padded[b, real], alone[0], rtol=1e-10, atol=atol, err_msg=f"ref row {b}")
        np.testing.assert_allclose(torched[b, real], alone[0], rtol=1e-10, atol=atol, err_msg=f"torch row {b}")


@settings(max_examples=25)
@given(padded_cases(model_configs(capacity=False, max_seq_len=8)), st.data())
def test_kv_cache_matches_full_pass(case, data):
    """Prefill S0 positions, then chunks of 1–3 tokens with the cache: the logits of every real position equal one
    full pass of ref (the definition) and the routing of every real token is ref's (margin ≥ MARGIN); present
    holds P + S positions in Optimum's layout. Custom position ids are passed chunk by chunk."""
    cfg, params, tokens, mask, positions = case
    B, S = tokens.shape
    real = mask == 1
    logits, _, results = ref_model.forward(cfg, params, tokens, mask, positions)
    assume(unambiguous(cfg, results, real))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, S - 1), max_size=4)) if S > 1 else []))
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    past, start = None, 0
    H, c = cfg.n_heads, cfg.d_model // cfg.n_heads
    got = np.zeros_like(logits)
    for end in [*cuts, S]:
        inputs = {"attention_mask": torch.from_numpy(mask[:, :end])}
        if positions is not None:
            inputs["position_ids"] = torch.from_numpy(positions[:, start:end])
        out = model(torch.from_numpy(tokens[:, start:end]), past_key_values=past, use_cache=True, **inputs)
        got[:, start:end] = out.logits.detach().numpy()
        for block, result in results.items():
            here = real[:, start:end]  # (B, S') the real tokens of this chunk
            np.testing.assert_array_equal(out.routing[block].selected.numpy()[here],
                                          result.selected[:, start:end][here], err_msg=f"block {block} selection")
        past = out.past_key_values
        assert len(past) == cfg.n_layers
        assert all(t.shape == (B, H, end, c) for pair in past for t in pair)
        start = end
    # as assert_matches_ref: float64, the same math in another order (another batch for every GEMM, a cached key
    # instead of a recomputed one, masked keys adding exact zeros): 1e-10 S, far below a stale cache's error
    np.testing.assert_allclose(got[real], logits[real], rtol=1e-10, atol=1e-10 * magnitude(logits[real]))
    assert model(torch.from_numpy(tokens[:, :1])).past_key_values is None  # use_cache off: no cache returned


def test_kv_cache_bad_input():
    cfg = ref.tiny_config(max_seq_len=8)
    params = ref_model.init_model(cfg, seed=2)
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    past = model(tokens, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"context of 3 cached \+ 6 new positions exceeds config max_seq_len \(8\)"):
        model(torch.zeros(2, 6, dtype=torch.int64), past_key_values=past)
    with pytest.raises(ValueError, match=r"past_key_values must be 2 \(key, value\) pairs"):
        model(tokens, past_key_values=past[:1])
    with pytest.raises(ValueError, match=r"past_key_values\[1\] value must have shape \(B, H, P, c\)"):
        model(tokens, past_key_values=(past[0], (past[1][0], past[1][1][:, :, :2])))
    with pytest.raises(ValueError, match=r"past_key_values\[0\] key must have shape"):
        model(tokens[:1], past_key_values=past)  # B = 1 against a cache of 2 rows
    with pytest.raises(ValueError, match=r"past_key_values\[0\] key is torch.float32"):
        model(tokens, past_key_values=tuple((k.float(), v) for k, v in past))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, P \+ S\) = \(2, 4\)"):
        model(tokens[:, :1], past_key_values=past, attention_mask=torch.ones(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="attention_mask values must be 0"):
        model(tokens, attention_mask=torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="attention_mask must be an integer or bool"):
        model(tokens, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"position ids must be in \[0, max_seq_len=8\)"):
        model(tokens, position_ids=torch.tensor([[0, 1, 8], [0, 1, 2]]))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(B, S\)"):
        model(tokens, position_ids=torch.zeros(2, 2, dtype=torch.int64))
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    for call in (lambda: ref_model.forward(cfg, params, tokens.numpy(), mask[:, :2]),
                 lambda: ref_model.forward(cfg, params, tokens.numpy(), mask * 3),
                 lambda: ref_model.forward(cfg, params, tokens.numpy(), mask.astype(float))):
        with pytest.raises(ValueError, match="attention_mask"):
            call()
    with pytest.raises(ValueError, match=r"position ids must be in \[0, max_seq_len=8\)"):
        ref_model.forward(cfg, params, tokens.numpy(), position_ids=np.full((2, 3), 8))


def test_capacity_refuses_cache_and_padding():
    """Capacity counts the tokens of each sequence: a cached step (which sees only its new tokens) or padding
    (which would be counted) would change it, so both are refused; an all-ones mask is fine."""
    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=2, max_seq_len=8)
    params = ref_model.init_model(cfg, seed=3)
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert_matches_ref(cfg, params, tokens.numpy(), model, attention_mask=np.ones((2, 3), dtype=np.int64))
    past = model(tokens, use_cache=True).past_key_values  # returning a cache is harmless
    with pytest.raises(ValueError, match="capacity refuses past_key_values and padding"):
        model(tokens, past_key_values=past)
    with pytest.raises(ValueError, match="capacity refuses past_key_values and padding"):
        model(tokens, attention_mask=mask)
    with pytest.raises(ValueError, match="capacity refuses padding"):
        ref_model.forward(cfg, params, tokens.numpy(), mask.numpy())


def test_dropout_only_in_training():
    cfg = ref.tiny_config(dropout=0.5)
    params = ref_model.init_model(cfg, seed=1)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 6))
    model = HyperMoETransformer.from_ref(cfg, params)
    model.eval()
    assert_matches_ref(cfg, params, tokens, model)
    model.train()
    torch.manual_seed(0)
    logits = model(torch.from_numpy(tokens)).logits.detach().numpy()
    assert not np.allclose(logits, ref_model.forward(cfg, params, tokens)[0])


# ---------------------------------------------------------------------------------------------
# Saved directories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip(tmp_path, dtype):
    cfg = ref.tiny_config(tie_embeddings=False, moe_every=2, n_layers=2)
    torch.manual_seed(0)
    model = HyperMoETransformer(cfg, dtype=dtype).eval()
    model.save_dir(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["kind"] == "model"
    loaded = HyperMoETransformer.from_dir(tmp_path / "m").eval()
    assert loaded.config == cfg and loaded.token_embed.dtype == dtype
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    a, b = model(tokens), loaded(tokens)
    assert torch.equal(a.logits, b.logits)
    # the reference reads the same directory
    cfg2, params, kind = ref.io.load_dir(tmp_path / "m")
    assert kind == "model" and cfg2 == cfg
    assert all(torch.equal(torch.from_numpy(params[k]), v) for k, v in model.state_dict().items())


def test_tampered_weights_are_rejected(tmp_path):
    cfg = ref.tiny_config()
    torch.manual_seed(0)  # the values do not matter, only the file's names and shapes
    HyperMoETransformer(cfg).save_dir(tmp_path)
    weights = tmp_path / "weights.npz"
    with np.load(weights) as archive:
        params = {k: archive[k] for k in archive.files}

    params["blocks.1.attn.qkv.weight"] = params["blocks.1.attn.qkv.weight"][:, :-1]  # a wrong shape
    np.savez(weights, **params)
    with pytest.raises(ValueError, match=r"weights\.npz.*blocks\.1\.attn\.qkv\.weight"):
        HyperMoETransformer.from_dir(tmp_path)

    del params["blocks.1.attn.qkv.weight"]  # a missing parameter
    np.savez(weights, **params)
    with pytest.raises(ValueError, match=r"missing parameter.*blocks\.1\.attn\.qkv\.weight"):
        HyperMoETransformer.from_dir(tmp_path)

    weights.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"weights\.npz"):
        HyperMoETransformer.from_dir(tmp_path)

    np.savez(weights, token_embed=np.array([object()], dtype=object))  # a pickled array is never loaded
    with pytest.raises(ValueError, match=r"weights\.npz"):
        HyperMoETransformer.from_dir(tmp_path)


def test_layer_directory_is_not_a_model(tmp_path):
    cfg = ref.tiny_config()
    ref.io.save_dir(tmp_path, cfg, ref.init(cfg), "layer")
    with pytest.raises(ValueError, match="kind"):
        HyperMoETransformer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# Training and generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hyper_expert", [True, False])
def test_training_lowers_the_loss(hyper_expert):
    """Adam on a toy next-token task (next = (token + 1) mod V) with the switch balance loss added:
    the loss falls well below its start, and every parameter (the shared hypernetwork included) learns."""
    cfg = ref.tiny_config(hyper_expert=hyper_expert, n_layers=2, top_k=1, vocab_size=16, max_seq_len=16)
    torch.manual_seed(0)
    model = HyperMoETransformer(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = torch.randint(0, cfg.vocab_size, (16, 1))
    sequence = (start + torch.arange(cfg.max_seq_len + 1)) % cfg.vocab_size  # (16, 17)
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(40):
        out = model(inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        optimizer.zero_grad()
        (loss + 0.01 * out.aux["switch_balance"]).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    if hyper_expert:
        assert any(name.startswith("hyper.") for name in before)


def test_generate_is_greedy():
    cfg = ref.tiny_config(max_seq_len=8)
    torch.manual_seed(0)
    model = HyperMoETransformer(cfg).train()
    prompt = torch.randint(0, cfg.vocab_size, (2, 3))
    out = model.generate(prompt, 5)  # fills the context: 3 + 5 = max_seq_len
    assert out.shape == (2, 8) and torch.equal(out[:, :3], prompt) and model.training
    model.eval()
    with torch.no_grad():  # float32 logits: greedy agrees when the top-2 gap exceeds both runs' reorder error
        for t in (3, 7):
            top2 = model(out[:, :t]).logits[:, -1].topk(2).values
            assert bool((top2[:, 0] - top2[:, 1] > 1e-4).all())
            assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))
    # learned positions cannot be cropped once keys are cached: a longer context is refused
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        model.generate(prompt, 6)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, match", [
    (np.zeros((1, 4), dtype=np.float32), "integer"),
    (np.zeros((1, 4), dtype=bool), "integer"),
    (np.array([[0, 1, 32]]), r"\[0, vocab_size=32\)"),
    (np.array([[0, -1, 2]]), r"\[0, vocab_size=32\)"),
    (np.zeros((1, 33), dtype=np.int64), "max_seq_len"),
    (np.zeros(4, dtype=np.int64), r"shape \(B, S\)"),
    (np.zeros((2, 0), dtype=np.int64), r"shape \(B, S\)"),
])
def test_bad_tokens(tokens, match):
    cfg = ref.tiny_config()
    params = ref_model.init_model(cfg)
    with pytest.raises(ValueError, match=match):
        ref_model.forward(cfg, params, tokens)
    with pytest.raises(ValueError, match=match):
        HyperMoETransformer.from_ref(cfg, params)(torch.from_numpy(tokens))


def test_bad_params():
    cfg = ref.tiny_config()
    params = ref_model.init_model(cfg)
    tokens = np.zeros((1, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="missing parameter.*ln_f.bias"):
        ref_model.forward(cfg, {k: v for k, v in params.items() if k != "ln_f.bias"}, tokens)
    with pytest.raises(ValueError, match="lm_head"):
        HyperMoETransformer.from_ref(cfg, {**params, "lm_head.weight": np.zeros((16, 32))})
    with pytest.raises(ValueError, match="float32 or .*float64"):
        HyperMoETransformer.from_ref(cfg, {k: v.astype(np.float16) for k, v in params.items()})


def test_bfloat16_runs_and_saves_as_float32(tmp_path):
    """16-bit models run (the router in float32, §3.1) and save their weights as float32."""
    cfg = ref.tiny_config(n_layers=2)
    torch.manual_seed(0)
    model = HyperMoETransformer(cfg, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model(tokens)
    assert out.logits.dtype == torch.bfloat16 and bool(torch.isfinite(out.logits).all())
    assert out.routing[0].probs.dtype == torch.float32
    model.save_dir(tmp_path)
    assert ref.io.load_dir(tmp_path)[1]["token_embed"].dtype == np.float32
    loaded = HyperMoETransformer.from_dir(tmp_path, dtype=torch.bfloat16).eval()
    assert torch.equal(loaded(tokens).logits, out.logits)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")
def test_cuda_matches_reference_and_trains():
    cfg = ref.tiny_config(n_layers=3, moe_every=2, gate="switch", top_k=1, capacity=3, tie_embeddings=False)
    params = ref_model.init_model(cfg, seed=5)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 9))
    logits, aux, results = ref_model.forward(cfg, params, tokens)
    assert unambiguous(cfg, results)
    model = HyperMoETransformer.from_ref(cfg, params, device="cuda")
    with pytest.raises(ValueError, match="tokens are on cpu"):
        model(torch.from_numpy(tokens))
    out = model(torch.from_numpy(tokens).cuda())
    for block, result in results.items():
        np.testing.assert_array_equal(out.routing[block].selected.cpu().numpy(), result.selected)
    np.testing.assert_allclose(out.logits.detach().cpu().numpy(), logits, rtol=1e-10, atol=1e-10 * magnitude(logits))
    loss = out.logits.logsumexp(-1).mean() + out.aux["switch_balance"]
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
