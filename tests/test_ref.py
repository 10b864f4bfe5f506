"""Tests of the NumPy reference (ref/semantics.py) against SPEC.md §3.

(a) hand cases: every expected number is derived in the test from first principles (identity-like
    experts, logits with known softmax, embeddings with known sums, hypernetwork heads that generate
    known matrices), never by calling the step under test;
(b) invariants over random configs and shapes (hypothesis, tests/strategies.py);
(c) bad input: ValueError whose message names the problem.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import ref
from ref import HyperMoEConfig
from tests.strategies import REORDER_K, U64, cases, configs, layer_magnitude, reorder_atol


def zero_params(cfg: HyperMoEConfig, dtype=np.float64) -> dict[str, np.ndarray]:
    """Every parameter of a standalone layer, all zeros: tests set the few entries they need."""
    return {name: np.zeros(shape, dtype) for name, shape in ref.param_shapes(cfg).items()}


def hand_config(**changes) -> HyperMoEConfig:
    """A 1-wide, bias-free, relu layer without HyperExpert unless a test asks for one."""
    base = dict(d_model=1, d_ff=1, n_experts=2, top_k=1, gate="topk", expert_bias=False, activation="relu",
                hyper_expert=False, n_heads=1, d_expert_embed=1, d_process=1, d_hyper=1, d_layer_embed=1,
                d_generator=1, d_adapter=1, n_layers=1)
    base.update(changes)
    return HyperMoEConfig(**base)


def scaled_identity_experts(params, d: int, scales) -> None:
    """Expert i: W1 = I, W2 = c_i·I, so with relu and x ≥ 0, FFN_i(x) = c_i·x (d_ff = d)."""
    for i, c in enumerate(scales):
        params["experts.w1"][i] = np.eye(d)
        params["experts.w2"][i] = c * np.eye(d)


# =============================================================================================
# (a) hand-derived cases
# =============================================================================================


def test_identity_experts_route_by_the_larger_logit():
    cfg = hand_config(d_model=3, d_ff=3)
    params = zero_params(cfg)
    scaled_identity_experts(params, 3, [1.0, 2.0])  # FFN_0(x) = x, FFN_1(x) = 2x for x ≥ 0
    params["router.weight"][:] = np.eye(3)[:, :2]  # logits = (x_0, x_1)
    x = np.array([[1.0, 2.0, 3.0],  # logits (1, 2): expert 1, gate 1 (k = 1, "topk") → 2x
                  [3.0, 1.0, 1.0]])  # logits (3, 1): expert 0 → x
    result = ref.layer(cfg, params, x)
    np.testing.assert_array_equal(result.selected, [[1], [0]])
    np.testing.assert_array_equal(result.gates, [[1.0], [1.0]])
    np.testing.assert_allclose(result.output, [[2.0, 4.0, 6.0], [3.0, 1.0, 1.0]], rtol=1e-15)
    np.testing.assert_array_equal(result.hyper, 0.0)


def test_known_logits_give_known_probabilities_gates_and_mixture():
    # logits (0, ln 2, ln 3): p = (1, 2, 3)/6; top-2 = experts 2, 1; renormalised gates (3/5, 2/5)
    cfg = hand_config(d_model=3, d_ff=3, n_experts=3, top_k=2)
    params = zero_params(cfg)
    params["router.weight"][:] = np.eye(3)
    scaled_identity_experts(params, 3, [1.0, 10.0, 100.0])
    x = np.array([[0.0, math.log(2), math.log(3)]])
    result = ref.layer(cfg, params, x)
    np.testing.assert_allclose(result.probs, [[1 / 6, 2 / 6, 3 / 6]], rtol=1e-14)
    np.testing.assert_array_equal(result.selected, [[2, 1]])
    np.testing.assert_allclose(result.gates, [[3 / 5, 2 / 5]], rtol=1e-14)
    # y = 3/5 · 100 x + 2/5 · 10 x = 64 x
    np.testing.assert_allclose(result.output, 64 * x, rtol=1e-14)

    # the same logits with "switch" (k = 1): expert 2, gate = p_2 = 1/2, y = 1/2 · 100 x
    cfg = cfg.replace(gate="switch", top_k=1)
    result = ref.layer(cfg, params, x)
    np.testing.assert_array_equal(result.selected, [[2]])
    np.testing.assert_allclose(result.gates, [[0.5]], rtol=1e-14)
    np.testing.assert_allclose(result.output, 50 * x, rtol=1e-14)


def test_softmax_is_stable_for_huge_logits():
    cfg = hand_config(d_model=2, d_ff=2)
    params = zero_params(cfg)
    params["router.weight"][:] = np.eye(2)
    x = np.array([[1000.0, 0.0], [-1000.0, -1000.0]])  # exp(1000) overflows a naive softmax
    result = ref.layer(cfg, params, x)
    np.testing.assert_allclose(result.probs, [[1.0, 0.0], [0.5, 0.5]], atol=1e-300)
    np.testing.assert_array_equal(result.selected, [[0], [0]])
    # z-loss: logsumexp(1000, 0) = 1000 (+ e^-1000), logsumexp(-1000, -1000) = -1000 + ln 2
    expected = (1000.0**2 + (-1000 + math.log(2)) ** 2) / 2
    assert result.aux["z_loss"] == pytest.approx(expected, rel=1e-14)


def test_router_bias_jitter_and_gate_noise_enter_the_logits_as_specified():
    cfg = hand_config(d_model=2, d_ff=2, router_bias=True, noisy_gating=True)
    params = zero_params(cfg)
    params["router.weight"][:] = [[1.0, 0.0], [0.0, 1.0]]
    params["router.bias"][:] = [0.5, -0.5]
    params["router.noise_weight"][:] = [[0.0, 0.0], [0.0, 1.0]]  # noise scale of expert 1: softplus(x_1) + 0.01
    x = np.array([[1.0, 2.0]])
    jitter = np.array([[3.0, 0.5]])  # router input (3, 1); experts would see (1, 2)
    noise = np.array([[0.0, 2.0]])
    scaled_identity_experts(params, 2, [1.0, 7.0])  # FFN_1(x) = 7x for x ≥ 0
    result = ref.layer(cfg, params, x, jitter=jitter, gate_noise=noise)
    softplus_2 = math.log1p(math.exp(2.0))  # the noise weight reads the plain x_1 = 2, not the jittered 1
    expected = [3.0 + 0.5, 1.0 - 0.5 + 2.0 * (softplus_2 + 0.01)]  # (3.5, 4.77...): expert 1
    np.testing.assert_allclose(result.logits, [expected], rtol=1e-14)
    np.testing.assert_array_equal(result.selected, [[1]])
    np.testing.assert_allclose(result.output, [[7.0, 14.0]], rtol=1e-15)  # the expert sees the plain x
    # without the draws: the clean logits (inference)
    np.testing.assert_allclose(ref.layer(cfg, params, x).logits, [[1.5, 1.5]], rtol=1e-14)


def test_selection_embedding_is_the_plain_sum_over_unselected_experts():
    E = np.array([[1.0, 0.0], [0.0, 10.0], [100.0, 0.0], [0.0, 1000.0]])
    selected = np.array([[0], [3], [2, ], [1]])  # k = 1: sum of the other three rows
    s = ref.selection_embedding({"expert_embed": E}, selected)
    np.testing.assert_array_equal(s, [[100.0, 1010.0], [101.0, 10.0], [1.0, 1010.0], [101.0, 1000.0]])
    s2 = ref.selection_embedding({"expert_embed": E}, np.array([[2, 0], [1, 3]]))  # k = 2, order irrelevant
    np.testing.assert_array_equal(s2, [[0.0, 1010.0], [101.0, 0.0]])
    s4 = ref.selection_embedding({"expert_embed": E}, np.array([[3, 1, 0, 2]]))  # k = N: nothing unselected
    np.testing.assert_array_equal(s4, [[0.0, 0.0]])


def test_generated_matrices_are_row_major():
    # d = 2, a = 3, g = 1. Trunk: weight 0, bias 1 → r = relu(1) = 1. Head weights = arange, biases 0, so
    # flat W_down = (0..5) and flat W_up = (0..5). Row-major: W_down = [[0,1,2],[3,4,5]] (d, a),
    # W_up = [[0,1],[2,3],[4,5]] (a, d). Experts are zero, so output = HyperExpert.
    cfg = hand_config(d_model=2, d_ff=2, d_adapter=3, hyper_expert=True)
    params = zero_params(cfg)
    params["hyper.trunk.bias"][:] = 1.0
    params["hyper.w_down.weight"][0] = np.arange(6.0)
    params["hyper.w_up.weight"][0] = np.arange(6.0)
    x = np.array([[1.0, 2.0]])
    # x W_down = (1·0 + 2·3, 1·1 + 2·4, 1·2 + 2·5) = (6, 9, 12); relu keeps it;
    # (6, 9, 12) W_up = (6·0 + 9·2 + 12·4, 6·1 + 9·3 + 12·5) = (66, 93).
    # (Column-major would give W_down = [[0,2,4],[1,3,5]], x W_down = (2, 8, 14): a different answer.)
    result = ref.layer(cfg, params, x)
    np.testing.assert_array_equal(result.routed, 0.0)
    np.testing.assert_allclose(result.output, [[66.0, 93.0]], rtol=1e-15)

    # the bias heads: b_down = r Gd + gd, b_up = r Gu + gu, with r = 1
    params["hyper.b_down.weight"][0] = [-7.0, 0.0, 1.0]  # hidden = relu((6, 9, 12) + (-7, 0, 1)) = (0, 9, 13)
    params["hyper.b_up.bias"][:] = [0.5, -0.5]
    # (0, 9, 13) W_up + b_up = (9·2 + 13·4 + 0.5, 9·3 + 13·5 - 0.5) = (70.5, 91.5)
    np.testing.assert_allclose(ref.layer(cfg, params, x).output, [[70.5, 91.5]], rtol=1e-15)


def test_hyper_expert_depends_on_the_unselected_set_and_the_layer():
    # d = e = p = h = g = a = l = 1, N = 3, k = 1. E = (1, 2, 4); the process passes s through (weights 1,
    # biases 0, positive values); trunk weight (1 for z, 2 for the layer embedding), L = (0, 5):
    #   s = sum of the unselected E, z = s, r = z + 2 L_ℓ, W_down = W_up = r, biases 0 → ê = x r² (x > 0).
    cfg = hand_config(n_experts=3, router_bias=True, hyper_expert=True, n_layers=2)
    params = zero_params(cfg)
    params["router.weight"][:] = [[1.0, -1.0, 0.0]]
    params["router.bias"][:] = [0.0, 0.0, 3.0]
    params["expert_embed"][:, 0] = [1.0, 2.0, 4.0]
    params["process.w1"][:] = 1.0
    params["process.w2"][:] = 1.0
    params["hyper.trunk.weight"][:, 0] = [1.0, 2.0]  # row 0 multiplies z, row 1 the layer embedding
    params["hyper.layer_embed"][:, 0] = [0.0, 5.0]
    params["hyper.w_down.weight"][:] = 1.0
    params["hyper.w_up.weight"][:] = 1.0
    x = np.array([[1.0], [4.0]])  # logits (1, -1, 3) → expert 2, s = 1 + 2 = 3; (4, -4, 3) → expert 0, s = 6
    result = ref.layer(cfg, params, x, 0)
    np.testing.assert_array_equal(result.selected, [[2], [0]])
    np.testing.assert_allclose(result.hyper, [[1 * 3.0**2], [4 * 6.0**2]], rtol=1e-15)
    result = ref.layer(cfg, params, x, 1)  # r = s + 2·5 (the other concatenation order would give 2s + 5)
    np.testing.assert_allclose(result.hyper, [[1 * 13.0**2], [4 * 16.0**2]], rtol=1e-15)


def test_capacity_drop_rule_on_a_hand_made_batch():
    # "switch", N = 2, C = 1, d = f = 1: FFN_0(x) = x, FFN_1(x) = 3x (x > 0).
    # logits = (x, 2): expert 0 when x > 2, expert 1 when x < 2.
    cfg = hand_config(gate="switch", capacity=1, router_bias=True)
    params = zero_params(cfg)
    scaled_identity_experts(params, 1, [1.0, 3.0])
    params["router.weight"][:] = [[1.0, 0.0]]
    params["router.bias"][:] = [0.0, 2.0]
    x = np.array([[3.0, 1.0, 4.0, 1.5],  # experts 0, 1, 0, 1 → positions 1, 1, 2, 2 → kept T, T, F, F
                  [1.0, 3.0, 1.0, 3.0]])[..., None]  # a second sequence counts from zero again: T, T, F, F
    result = ref.layer(cfg, params, x)
    np.testing.assert_array_equal(result.selected[..., 0], [[0, 1, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(result.kept, [[True, True, False, False], [True, True, False, False]])

    def p_max(v: float) -> float:  # the selected expert's probability for logits (v, 2)
        return 1 / (1 + math.exp(-abs(v - 2)))

    # kept: p · FFN_i(x); dropped: p · x (passes through, scaled by its probability)
    expected = [[p_max(3) * 3, p_max(1) * 3 * 1, p_max(4) * 4, p_max(1.5) * 1.5],
                [p_max(1) * 3 * 1, p_max(3) * 3, p_max(1) * 1, p_max(3) * 3]]
    np.testing.assert_allclose(result.routed[..., 0], expected, rtol=1e-14)
    np.testing.assert_allclose(result.gates[..., 0], [[p_max(v) for v in row] for row in x[..., 0]], rtol=1e-14)


def test_aux_losses_on_a_hand_example():
    # N = 2, k = 1, router = identity. Token A: logits (ln 3, 0) → p = (3/4, 1/4), expert 0.
    # Token B: logits (0, 0) → p = (1/2, 1/2), a tie → expert 0 (the lower index).
    cfg = hand_config(d_model=2, d_ff=2)
    params = zero_params(cfg)
    params["router.weight"][:] = np.eye(2)
    x = np.array([[math.log(3), 0.0], [0.0, 0.0]])
    aux = ref.layer(cfg, params, x).aux
    # f = (1, 0), P = ((3/4 + 1/2)/2, (1/4 + 1/2)/2) = (5/8, 3/8): N Σ f P = 2 · 5/8
    assert aux["switch_balance"] == pytest.approx(5 / 4, rel=1e-14)
    # logsumexp: ln 4 and ln 2 → mean of squares = ((2 ln 2)² + (ln 2)²)/2
    assert aux["z_loss"] == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-14)
    # "topk" gates with k = 1 are 1: importance = load = (2, 0); unbiased var = 2, mean² = 1
    assert aux["cv_balance"] == pytest.approx(2 * 2 / (1 + 1e-10), rel=1e-14)

    # "switch": importance = (3/4 + 1/2, 0) = (5/4, 0): var = 25/32, mean² = 25/64 → cv² = 2 (with 1e-10)
    aux = ref.layer(cfg.replace(gate="switch"), params, x).aux
    assert aux["cv_balance"] == pytest.approx((25 / 32) / (25 / 64 + 1e-10) + 2 / (1 + 1e-10), rel=1e-14)
    assert aux["switch_balance"] == pytest.approx(5 / 4, rel=1e-14)

    # N = 3, k = 2: f sums to k. Tokens (ln 1, ln 2, ln 3) → S = {2, 1}; (ln 3, ln 2, ln 1) → S = {0, 1}.
    cfg = hand_config(d_model=3, d_ff=3, n_experts=3, top_k=2)
    params = zero_params(cfg)
    params["router.weight"][:] = np.eye(3)
    x = np.log([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    aux = ref.layer(cfg, params, x).aux
    # f = (1/2, 1, 1/2), P = (1/3, 1/3, 1/3): 3 · Σ f P = 2
    assert aux["switch_balance"] == pytest.approx(2.0, rel=1e-14)
    # gates: token 1 (3/5 on 2, 2/5 on 1), token 2 (3/5 on 0, 2/5 on 1): importance = (3/5, 4/5, 3/5),
    # mean 2/3, unbiased var = ((1/15)² · 2 + (2/15)²)/2 = 3/225; load = (1, 2, 1): var 1/3, mean 4/3
    expected = (3 / 225) / (4 / 9 + 1e-10) + (1 / 3) / (16 / 9 + 1e-10)
    assert aux["cv_balance"] == pytest.approx(expected, rel=1e-12)


def test_exact_ties_pick_the_lower_index_all_zero_router():
    cfg = ref.tiny_config(n_experts=6, top_k=3)
    params = ref.init(cfg, seed=1)
    params["router.weight"][:] = 0.0  # every logit is exactly 0
    x = np.random.default_rng(0).standard_normal((5, cfg.d_model))
    result = ref.layer(cfg, params, x)
    np.testing.assert_array_equal(result.selected, np.tile([0, 1, 2], (5, 1)))
    np.testing.assert_allclose(result.gates, 1 / 3, rtol=1e-15)


# =============================================================================================
# (b) invariants over random configs and shapes
# =============================================================================================


def flat(case):
    return case.x.reshape(-1, case.cfg.d_model)


@given(cases(configs(capacity=False)), st.randoms(use_true_random=False))
def test_permuting_tokens_permutes_outputs(case, rnd):
    x = flat(case)[None]  # (1, T, d): one sequence
    perm = list(range(x.shape[1]))
    rnd.shuffle(perm)
    a = ref.layer(case.cfg, case.params, x, case.layer_index)
    b = ref.layer(case.cfg, case.params, x[:, perm], case.layer_index)
    np.testing.assert_array_equal(b.selected, a.selected[:, perm])
    # the same sums with the rows in another order (BLAS may block them differently): the reorder bound of
    # tests/strategies.py, REORDER_K u S with S the layer's largest magnitude
    S = layer_magnitude(case.cfg, case.params, x, case.layer_index)
    np.testing.assert_allclose(b.output, a.output[:, perm], rtol=0, atol=reorder_atol(S))
    for name in a.aux:  # a sum over tokens in another order: the same bound relative to max(1, |aux|)
        assert b.aux[name] == pytest.approx(a.aux[name], rel=REORDER_K * U64, abs=REORDER_K * U64)


@given(cases(configs(noisy_gating=True)), st.booleans(), st.randoms(use_true_random=False))
def test_relabelling_experts_changes_only_the_labels(case, with_noise, rnd):
    cfg, params, x = case.cfg, case.params, case.x
    N = cfg.n_experts
    perm = list(range(N))
    rnd.shuffle(perm)  # new expert j is old expert perm[j]
    new = dict(params)
    for name in ("router.weight", "router.bias", "router.noise_weight"):
        if name in params:
            new[name] = params[name][..., perm]
    for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2", "expert_embed"):
        if name in params:
            new[name] = params[name][perm]
    noise = np.random.default_rng(case.seed).standard_normal((*x.shape[:-1], N)) if with_noise else None
    a = ref.layer(cfg, params, x, case.layer_index, gate_noise=noise)
    assume(np.all(ref.routing_margins(a.logits, cfg.top_k) > 1e-6))  # the noise may have made a near-tie
    b = ref.layer(cfg, new, x, case.layer_index, gate_noise=None if noise is None else noise[..., perm])
    old_of_new = np.asarray(perm)
    # the same experts (in old labels), the same gate for each: compare sorted by old label, because the
    # order inside S may differ between two selected experts whose logits are within rounding of each other
    a_order, b_labels = np.argsort(a.selected, -1), old_of_new[b.selected]
    b_order = np.argsort(b_labels, -1)
    np.testing.assert_array_equal(np.take_along_axis(b_labels, b_order, -1), np.take_along_axis(a.selected, a_order, -1))
    np.testing.assert_allclose(np.take_along_axis(b.gates, b_order, -1), np.take_along_axis(a.gates, a_order, -1),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.probs, a.probs[..., perm], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(b.kept, a.kept)
    # the same sums over experts in another order: the reorder bound (tests/strategies.py) of the magnitudes
    S = layer_magnitude(cfg, params, x, case.layer_index, gate_noise=noise)
    np.testing.assert_allclose(b.output, a.output, rtol=0, atol=reorder_atol(S))
    for name in a.aux:
        assert b.aux[name] == pytest.approx(a.aux[name], rel=REORDER_K * U64, abs=REORDER_K * U64)


@given(cases(configs(hyper_expert=True)))
def test_zero_hypernetwork_heads_give_exactly_the_plain_moe(case):
    cfg, params = case.cfg, dict(case.params)
    for head in ("w_down", "w_up", "b_down", "b_up"):
        for part in ("weight", "bias"):
            params[f"hyper.{head}.{part}"] = np.zeros_like(params[f"hyper.{head}.{part}"])
    plain_cfg = cfg.replace(hyper_expert=False)
    plain_params = {name: params[name] for name in ref.param_shapes(plain_cfg)}
    a = ref.layer(cfg, params, case.x, case.layer_index)
    b = ref.layer(plain_cfg, plain_params, case.x)
    np.testing.assert_array_equal(a.hyper, 0.0)
    np.testing.assert_array_equal(a.output, b.output)
    np.testing.assert_array_equal(a.selected, b.selected)


@given(cases(configs(hyper_expert=True).map(lambda c: c.replace(top_k=c.n_experts) if c.gate == "topk" else c)
             .filter(lambda c: c.top_k == c.n_experts)))
def test_all_experts_selected_gives_zero_selection_embedding(case):
    cfg = case.cfg
    result = ref.layer(cfg, case.params, case.x, case.layer_index)
    np.testing.assert_array_equal(ref.selection_embedding(case.params, result.selected.reshape(-1, cfg.top_k)), 0.0)
    # so the expert embeddings cannot matter
    other = dict(case.params, expert_embed=case.params["expert_embed"] + 5.0)
    np.testing.assert_array_equal(ref.layer(cfg, other, case.x, case.layer_index).output, result.output)


@given(cases(configs().filter(lambda c: c.gate == "topk")))
def test_topk_gates_are_positive_ordered_and_sum_to_one(case):
    result = ref.layer(case.cfg, case.params, case.x, case.layer_index)
    np.testing.assert_allclose(result.gates.sum(-1), 1.0, rtol=1e-12)
    assert np.all(result.gates > 0)
    assert np.all(np.diff(result.gates, axis=-1) <= 0)  # largest logit first ⇒ largest gate first
    np.testing.assert_allclose(result.probs.sum(-1), 1.0, rtol=1e-12)


@given(cases(configs(capacity=True).filter(lambda c: c.capacity is not None), max_tokens=12))
def test_capacity_keeps_at_most_C_first_tokens_and_drops_to_g_times_x(case):
    cfg, x = case.cfg, case.x
    result = ref.layer(cfg, case.params, x, case.layer_index)
    free = ref.layer(cfg.replace(capacity=None), case.params, x, case.layer_index)
    S = x.shape[-2]
    experts = result.selected[..., 0].reshape(-1, S) if S else []  # (sequences, S)
    kept = result.kept.reshape(-1, S) if S else []
    for seq_experts, seq_kept in zip(experts, kept):
        for i in range(cfg.n_experts):
            mine = seq_kept[seq_experts == i]
            assert mine.sum() <= cfg.capacity
            # the kept ones are the first ones in sequence order
            assert np.all(mine == (np.arange(mine.size) < cfg.capacity))
    dropped = ~result.kept
    np.testing.assert_array_equal(result.routed[dropped], result.gates[dropped] * x[dropped])
    # the same expert on a different subset of rows: BLAS may round differently, within the reorder bound
    S = layer_magnitude(cfg.replace(capacity=None), case.params, x, case.layer_index)
    np.testing.assert_allclose(result.routed[~dropped], free.routed[~dropped], rtol=0, atol=reorder_atol(S))
    # a dropped token keeps its selection, its HyperExpert and the aux losses
    np.testing.assert_array_equal(result.hyper, free.hyper)
    np.testing.assert_array_equal(result.selected, free.selected)
    assert result.aux == free.aux


# float32 vs float64. Inputs are O(1), widths ≤ 12, and a token goes through ≤ 8 dependent matmuls /
# activations, each adding a few float32 roundings (unit roundoff 6e-8) relative to the largest value:
# over 400 random cases the worst |f32 - f64| / max(1, max|f64|) measured 4.8e-7. 1e-5 leaves 20× room
# and is still ~100× below what a wrong formula or layout produces. The routing margin (≥ 1e-3) is far
# above float32's logit error (~1e-6), so the selection must agree exactly: it is checked, not assumed.
F32_TOL = 1e-5


@given(cases())
def test_float32_agrees_with_float64(case):
    p32 = {name: v.astype(np.float32) for name, v in case.params.items()}
    a = ref.layer(case.cfg, case.params, case.x, case.layer_index)
    b = ref.layer(case.cfg, p32, case.x.astype(np.float32), case.layer_index)
    np.testing.assert_array_equal(b.selected, a.selected)
    np.testing.assert_array_equal(b.kept, a.kept)
    for name in ("output", "routed", "hyper", "gates", "probs"):
        got, want = getattr(b, name), getattr(a, name)
        assert got.dtype == np.float32, name
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=F32_TOL, atol=F32_TOL * scale, err_msg=name)
    for name in a.aux:
        assert b.aux[name] == pytest.approx(a.aux[name], rel=F32_TOL, abs=F32_TOL)


@given(configs(), st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_exact_ties_pick_the_lower_index(cfg, seed, T):
    # Integer-valued inputs and router columns with duplicates: every logit is an exact small integer, so
    # duplicated columns tie bit for bit. The expected order is derived with Python integers.
    rng = np.random.default_rng(seed)
    params = ref.init(cfg, seed=seed)
    distinct = rng.integers(-2, 3, size=(cfg.d_model, max(1, cfg.n_experts // 2)))
    columns = rng.integers(0, distinct.shape[1], size=cfg.n_experts)  # several experts share a column
    params["router.weight"] = distinct[:, columns].astype(np.float64)
    if cfg.router_bias:
        params["router.bias"] = rng.integers(-1, 2, size=cfg.n_experts).astype(np.float64)
    x = rng.integers(-3, 4, size=(T, cfg.d_model)).astype(np.float64)
    result = ref.layer(cfg, params, x)
    for t in range(T):
        logits = [sum(int(x[t, j]) * int(params["router.weight"][j, i]) for j in range(cfg.d_model))
                  + (int(params["router.bias"][i]) if cfg.router_bias else 0) for i in range(cfg.n_experts)]
        expected = sorted(range(cfg.n_experts), key=lambda i: (-logits[i], i))[:cfg.top_k]
        assert result.selected[t].tolist() == expected, (logits, result.selected[t])


@given(configs(), st.sampled_from([(0, None), (0, 3, None), (2, 0, None), (0, 0, None), (1, 2, 0, None)]))
def test_zero_tokens_work_for_every_shape(cfg, shape):
    shape = tuple(cfg.d_model if s is None else s for s in shape)
    lead = shape[:-1]
    x = np.zeros(shape)
    result = ref.layer(cfg, ref.init(cfg), x)
    assert result.output.shape == shape and result.routed.shape == shape and result.hyper.shape == shape
    assert result.selected.shape == (*lead, cfg.top_k) and result.selected.dtype == np.int64
    assert result.gates.shape == (*lead, cfg.top_k)
    assert result.probs.shape == result.logits.shape == (*lead, cfg.n_experts)
    assert result.kept.shape == lead
    assert result.aux == {"switch_balance": 0.0, "z_loss": 0.0, "cv_balance": 0.0}
    h, results = ref.stack(cfg, ref.init_stack(cfg), x)
    assert h.shape == shape and len(results) == len(ref.stack_layers(cfg))


@given(cases(configs(max_experts=1)))
def test_single_expert(case):
    cfg = case.cfg
    result = ref.layer(cfg, case.params, case.x, case.layer_index)
    T = flat(case).shape[0]
    np.testing.assert_array_equal(result.selected, 0)
    np.testing.assert_array_equal(result.probs, 1.0)
    np.testing.assert_array_equal(result.gates, 1.0)
    if T:
        assert result.aux["switch_balance"] == 1.0
        assert result.aux["cv_balance"] == 0.0
        assert result.aux["z_loss"] == pytest.approx(float(np.mean(result.logits**2)), rel=1e-12)
    # the routed part is expert 0 (or x for a dropped token); with a HyperExpert, s = 0
    if cfg.hyper_expert:
        other = dict(case.params, expert_embed=case.params["expert_embed"] * 3.0)
        np.testing.assert_array_equal(ref.layer(cfg, other, case.x, case.layer_index).output, result.output)


@given(cases(configs(hyper_expert=True, n_layers=3)), st.integers(0, 2))
def test_stack_shares_the_hypernetwork_layer_embedding_only_moves_its_layer(case, changed):
    cfg = case.cfg
    assume(flat(case).shape[0] > 0)
    params = ref.init_stack(cfg, seed=case.seed)
    params["hyper.trunk.bias"] = params["hyper.trunk.bias"] + 10.0  # keep the trunk's relu open, so a change shows
    h, results = ref.stack(cfg, params, case.x)
    # the stack is the layers in order, sharing hyper.*, with the residual between them
    inputs, expected_h = [], case.x
    for i, result in zip(ref.stack_layers(cfg), results):
        inputs.append(expected_h)
        np.testing.assert_array_equal(result.output, ref.layer(cfg, ref.layer_params(params, i), expected_h, i).output)
        expected_h = expected_h + result.output
    np.testing.assert_array_equal(h, expected_h)

    moved = dict(params)
    moved["hyper.layer_embed"] = params["hyper.layer_embed"].copy()
    moved["hyper.layer_embed"][changed] += 1.0
    for i, h_in, result in zip(ref.stack_layers(cfg), inputs, results):
        again = ref.layer(cfg, ref.layer_params(moved, i), h_in, i)
        np.testing.assert_array_equal(again.routed, result.routed)
        if i == changed:
            assert not np.allclose(again.hyper, result.hyper, rtol=0, atol=1e-9)
        else:
            np.testing.assert_array_equal(again.hyper, result.hyper)


@pytest.mark.parametrize("cfg", [ref.tiny_config(), ref.tiny_config(top_k=1), ref.tiny_config(gate="switch", top_k=1),
                                 HyperMoEConfig()], ids=["tiny", "tiny-k1", "tiny-switch", "default"])
def test_init_makes_every_part_matter(cfg):
    params = ref.init(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, cfg.d_model))
    result = ref.layer(cfg, params, x)

    def rms(v):
        return float(np.sqrt(np.mean(v**2)))

    assert 0.1 <= rms(result.hyper) / rms(result.routed) <= 10
    # the set-dependent part of the generated weights: for every possible selected set, the deviation from
    # the mean over sets is at least 10 % of the weights (measured 0.24–0.52 on these configs, seed 0)
    sets = np.array(list(itertools.combinations(range(cfg.n_experts), cfg.top_k)))
    z = ref.process(params, ref.selection_embedding(params, sets))
    generated = ref.generate(cfg, params, z, 0)
    for name, w in zip(("W_down", "b_down", "W_up", "b_up"), generated):
        assert rms(w - w.mean(axis=0)) >= 0.1 * rms(w), name


# =============================================================================================
# (c) bad input → ValueError naming the problem
# =============================================================================================

TINY = ref.tiny_config()
TINY_PARAMS = ref.init(TINY, seed=0)
X = np.random.default_rng(0).standard_normal((2, 3, TINY.d_model))


def without(params, name):
    return {k: v for k, v in params.items() if k != name}


BAD_LAYER_CALLS = {
    "list input": (dict(x=X.tolist()), "input must be a numpy array"),
    "1-d input": (dict(x=X[0, 0]), r"at least 2 dims, got shape \(16,\)"),
    "wrong width": (dict(x=X[..., :5]), "input's last dim is 5, config d_model is 16"),
    "int input": (dict(x=X.astype(np.int64)), "input dtype must be float32 or float64, got int64"),
    "float16 input": (dict(x=X.astype(np.float16)), "input dtype must be float32 or float64, got float16"),
    "NaN input": (dict(x=np.where(X > 1, np.nan, X)), "input contains NaN or Inf"),
    "Inf input": (dict(x=np.where(X > 1, np.inf, X)), "input contains NaN or Inf"),
    "missing parameter": (dict(params=without(TINY_PARAMS, "process.b1")), r"missing parameter\(s\): process.b1"),
    "extra parameter": (dict(params={**TINY_PARAMS, "router.bias": np.zeros(4)}),
                        r"unexpected parameter\(s\) for this config: router.bias"),
    "misshapen parameter": (dict(params={**TINY_PARAMS, "experts.w1": np.zeros((4, 32, 16))}),
                            r"parameter 'experts.w1' has shape \(4, 32, 16\), expected \(4, 16, 32\)"),
    "float32 parameter, float64 input": (dict(params={**TINY_PARAMS, "router.weight": TINY_PARAMS["router.weight"].astype(np.float32)}),
                                         "parameter 'router.weight' has dtype float32, the input has float64"),
    "list parameter": (dict(params={**TINY_PARAMS, "process.b2": [0.0] * 8}), "parameter 'process.b2' must be a numpy array"),
    "layer_index too large": (dict(layer_index=2), r"layer_index must be an int in \[0, n_layers=2\), got 2"),
    "negative layer_index": (dict(layer_index=-1), r"layer_index must be an int in \[0, n_layers=2\), got -1"),
    "float layer_index": (dict(layer_index=1.0), r"layer_index must be an int .* got 1.0"),
    "bool layer_index": (dict(layer_index=True), r"layer_index must be an int .* got True"),
    "gate_noise without noisy_gating": (dict(gate_noise=np.zeros((2, 3, 4))), "gate_noise given but config field 'noisy_gating' is False"),
    "jitter of the wrong shape": (dict(jitter=np.ones((2, 3, 15))), r"jitter must have the input's shape \(2, 3, 16\)"),
    "jitter of the wrong dtype": (dict(jitter=np.ones((2, 3, 16), np.float32)), "jitter must have .* dtype float64"),
    "NaN jitter": (dict(jitter=np.full((2, 3, 16), np.nan)), "jitter must be a finite numpy array"),
    "list jitter": (dict(jitter=np.ones((2, 3, 16)).tolist()), "jitter must be a finite numpy array"),
}


@pytest.mark.parametrize("case", BAD_LAYER_CALLS, ids=str)
def test_bad_layer_input_is_a_value_error_naming_the_problem(case):
    changes, message = BAD_LAYER_CALLS[case]
    call = dict(cfg=TINY, params=TINY_PARAMS, x=X, layer_index=0) | changes
    with pytest.raises(ValueError, match=message):
        ref.layer(**call)


def test_bad_gate_noise_with_noisy_gating():
    cfg = TINY.replace(noisy_gating=True)
    params = ref.init(cfg)
    with pytest.raises(ValueError, match=r"gate_noise must have shape \(2, 3, 4\) and dtype float64"):
        ref.layer(cfg, params, X, gate_noise=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="gate_noise must be a finite numpy array"):
        ref.layer(cfg, params, X, gate_noise=np.full((2, 3, 4), np.inf))
    with pytest.raises(ValueError, match="missing parameter.*router.noise_weight"):
        ref.layer(cfg, TINY_PARAMS, X)


def test_bad_stack_input():
    params = ref.init_stack(TINY)
    with pytest.raises(ValueError, match="input dtype must be float32 or float64, got float16"):
        ref.stack(TINY, params, X.astype(np.float16))
    with pytest.raises(ValueError, match="input contains NaN"):
        ref.stack(TINY, params, np.full_like(X, np.nan))
    with pytest.raises(ValueError, match=r"missing parameter\(s\): layers.1.router.weight"):
        ref.stack(TINY, without(params, "layers.1.router.weight"), X)
    with pytest.raises(ValueError, match=r"unexpected parameter\(s\) for this config: router.weight"):
        ref.stack(TINY, {**params, "router.weight": params["layers.0.router.weight"]}, X)
    with pytest.raises(ValueError, match="parameter 'hyper.trunk.bias' has dtype float32"):
        ref.stack(TINY, {**params, "hyper.trunk.bias": params["hyper.trunk.bias"].astype(np.float32)}, X)
