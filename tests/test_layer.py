"""hypermoe.layer against the NumPy reference (ref.layer) and its own invariants.

Routing is compared exactly first (inputs are drawn with a routing margin, tests/strategies.py), values after.
Every absolute tolerance is a multiple of the magnitude S of the values compared (tests/strategies.py):
float64 against ref 1e-10 · S (the same math in a different order: ≤ REORDER_K u S = 4.5e-13 S by the bound
in tests/strategies.py, observed ≤ 5e-14 over 2000 random cases; a wrong term moves outputs by ≥ 1e-2 S);
two paths of this layer against each other reorder_atol(S); float32: see FP32_TOL below.
Every draw is seeded (np.random.default_rng(seed), torch.manual_seed or a torch.Generator).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import ref
import hypermoe.layer as layer_module
from hypermoe.layer import MAX_TABLE_SETS, HyperMoELayer, HyperNetwork, params_from_ref, params_to_ref
from tests.strategies import (
    U32, U64, cases, configs, inputs_with_margin, layer_magnitude, magnitude, reorder_atol,
)

F64_TOL = dict(rtol=1e-10, atol=1e-10)  # atol is multiplied by the magnitude S of what is compared
# float32 vs the float64 reference. Every stage is O(1)–O(10) for the reference init; the longest chain is
# router → process → trunk → heads → two adapter matmuls, dot products of length ≤ 12, so each stage adds a
# few ulp (6e-8) of relative error times the magnitude. The check is |err| ≤ 2e-5·(1 + |ref|); the largest
# err / (1 + |ref|) observed over 2000 random cases is 1.7e-6 (12× margin), while a wrong gate, term or flipped
# selection moves outputs by ≥ 1e-2 at these sizes. As F64_TOL, atol is multiplied by S.
FP32_TOL = dict(rtol=2e-5, atol=2e-5)


def scaled(tol: dict, *values) -> dict:
    """`tol` with its atol multiplied by S = magnitude(*values)."""
    return dict(rtol=tol["rtol"], atol=tol["atol"] * magnitude(*values))


def make_layer(case, dtype=torch.float64, **kw) -> HyperMoELayer:
    return HyperMoELayer.from_ref(case.cfg, case.params, dtype=dtype, **kw).eval()


def check_against_ref(out, expected, tol, what=""):
    """Routing exactly, then values within `tol` with atol scaled by the reference's magnitudes S."""
    np.testing.assert_array_equal(out.routing.selected.numpy(), expected.selected, err_msg=f"selected {what}")
    np.testing.assert_array_equal(out.routing.kept.numpy(), expected.kept, err_msg=f"kept {what}")
    tol = scaled(tol, expected.output, expected.routed, expected.hyper, expected.logits)
    for name in ("gates", "probs", "logits"):
        np.testing.assert_allclose(getattr(out.routing, name).detach().double().numpy(), getattr(expected, name),
                                   **tol, err_msg=f"{name} {what}")
    np.testing.assert_allclose(out.output.detach().double().numpy(), expected.output, **tol, err_msg=f"output {what}")
    for name, value in expected.aux.items():
        np.testing.assert_allclose(out.aux[name].item(), value, **tol, err_msg=f"aux {name} {what}")


def run_modes(layer, x, layer_index=0, **kw) -> list:
    """The layer's paths: inference (cached adapters; the sorted dispatch, and the CPU's few-token dispatch forced
    here for every T), autograd recording (adapters per set present), the decode path (weights gathered per
    assignment, forced here for every T), cached or not.
    A list, not a generator: a generator suspended inside `no_grad` would leak the grad mode into its caller."""
    few_tokens = layer_module.FEW_TOKENS_CPU
    try:
        with torch.no_grad():
            layer_module.FEW_TOKENS_CPU = 0
            cached = layer(x, layer_index, **kw)
            layer_module.FEW_TOKENS_CPU = 10**9
            few = layer(x, layer_index, **kw) if x.device.type == "cpu" else cached
    finally:
        layer_module.FEW_TOKENS_CPU = few_tokens
    grouped = layer(x, layer_index, **kw)
    small, layer.small_tokens = layer.small_tokens, 10**9
    try:
        gathered = layer(x, layer_index, **kw)
        with torch.no_grad():
            gathered_cached = layer(x, layer_index, **kw)
    finally:
        layer.small_tokens = small
    return [("cached", cached), ("few", few), ("grouped", grouped), ("gathered", gathered),
            ("gathered-cached", gathered_cached)]


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------


@given(cases())
def test_matches_ref_float64(case):
    expected = ref.layer(case.cfg, case.params, case.x, case.layer_index)
    layer = make_layer(case)
    for mode, out in run_modes(layer, torch.tensor(case.x), case.layer_index):
        assert out.output.dtype == torch.float64 and out.routing.selected.dtype == torch.int64
        check_against_ref(out, expected, F64_TOL, f"({mode}, {case.cfg})")


@given(cases(configs(noisy_gating=True) | configs(router_jitter=0.5)), st.booleans())
def test_random_draws_match_ref(case, training):
    """Explicit jitter / gate-noise draws are honoured in either mode, and compare with the reference."""
    rng = np.random.default_rng(case.seed)
    jitter = rng.uniform(0.5, 1.5, case.x.shape)
    noise = rng.standard_normal((*case.x.shape[:-1], case.cfg.n_experts)) if case.cfg.noisy_gating else None
    expected = ref.layer(case.cfg, case.params, case.x, case.layer_index, jitter=jitter, gate_noise=noise)
    layer = make_layer(case).train(training)
    out = layer(torch.tensor(case.x), case.layer_index, jitter=torch.tensor(jitter),
                gate_noise=None if noise is None else torch.tensor(noise))
    # explicit draws can make routing margins small; compare routing first, values only where it agrees
    np.testing.assert_allclose(out.routing.logits.detach().numpy(), expected.logits, **scaled(F64_TOL, expected.logits))
    margins = ref.routing_margins(expected.logits, case.cfg.top_k)
    if np.all(margins > 1e-8):
        check_against_ref(out, expected, F64_TOL, str(case.cfg))


@given(cases(margin=1e-3))
def test_matches_ref_float32(case):
    expected = ref.layer(case.cfg, case.params, case.x, case.layer_index)  # float64 truth
    layer = make_layer(case, dtype=torch.float32)
    for mode, out in run_modes(layer, torch.tensor(case.x, dtype=torch.float32), case.layer_index):
        assert out.output.dtype == torch.float32 and out.routing.probs.dtype == torch.float32
        check_against_ref(out, expected, FP32_TOL, f"({mode}, {case.cfg})")


@pytest.mark.parametrize("n_experts,top_k,tied,expected", [
    (4, 2, [0, 1, 2, 3], [0, 1]),  # all logits equal
    (4, 2, [1, 2, 3], [0, 1]),  # expert 0 largest, then a 3-way tie at the boundary
    (5, 1, [2, 4], [2]),  # top-1 tie
    (6, 3, [1, 3, 5], [1, 3, 5]),  # ties inside the selected set keep index order
    (3, 3, [0, 1, 2], [0, 1, 2]),  # k = N
])
def test_exact_ties_pick_lower_index(n_experts, top_k, tied, expected):
    cfg = ref.tiny_config(n_experts=n_experts, top_k=top_k, d_model=4)
    params = ref.init(cfg, seed=3)
    w = params["router.weight"]
    w[:] = -1.0  # untied experts: logits well below the tied ones for x > 0
    w[:, tied] = 2.0  # bitwise-equal columns → bitwise-equal logits
    if n_experts == 4 and tied == [1, 2, 3]:
        w[:, 0] = 3.0
    x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 4))) + 0.1
    result = ref.layer(cfg, params, x)
    layer = HyperMoELayer.from_ref(cfg, params).eval()
    out = layer(torch.tensor(x))
    np.testing.assert_array_equal(result.selected, np.broadcast_to(expected, result.selected.shape))
    np.testing.assert_array_equal(out.routing.selected.numpy(), result.selected)
    np.testing.assert_allclose(out.output.detach().numpy(), result.output, **scaled(F64_TOL, result.output, x))


def test_capacity_drops_tokens_like_ref():
    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=1, n_experts=2)
    params = ref.init(cfg, seed=1)
    x = inputs_with_margin(cfg, params, (3, 6, cfg.d_model), np.random.default_rng(1), 1e-3)
    expected = ref.layer(cfg, params, x)
    assert not expected.kept.all()  # 6 tokens, 2 experts of capacity 1: drops happen
    layer = HyperMoELayer.from_ref(cfg, params).eval()
    for mode, out in run_modes(layer, torch.tensor(x)):
        check_against_ref(out, expected, F64_TOL, mode)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _gradcheck_layer(cfg, mode):
    params = ref.init(cfg, seed=5)
    x = inputs_with_margin(cfg, params, (2, 3, cfg.d_model), np.random.default_rng(5), 0.05)
    layer = HyperMoELayer.from_ref(cfg, params).train()
    layer.small_tokens = 10**9 if mode == "gathered" else 0
    names = list(params)
    tensors = [torch.tensor(params[n], requires_grad=True) for n in names]

    def fn(x, *values):
        out = functional_call(layer, dict(zip(names, values)), (x,))
        return (out.output, *out.aux.values())

    xt = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (xt, *tensors), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    ref.tiny_config(n_heads=1, d_model=3, d_ff=4, n_experts=3, top_k=2, activation="gelu", router_bias=True,
                    d_adapter=2,
                    d_expert_embed=2, d_process=3, d_hyper=2, d_layer_embed=2, d_generator=3, n_layers=1),
    ref.tiny_config(n_heads=1, d_model=3, d_ff=4, n_experts=3, top_k=1, gate="switch", capacity=2, activation="silu",
                    expert_bias=False, d_adapter=2, d_expert_embed=2, d_process=3, d_hyper=2, d_layer_embed=2,
                    d_generator=3, n_layers=1),
], ids=["topk", "switch-capacity"])
@pytest.mark.parametrize("mode", ["sorted", "gathered"])
def test_gradcheck(cfg, mode):
    """float64 finite differences for the input and every parameter (router, experts, embeddings, process,
    hypernetwork), through the output and the three aux losses."""
    _gradcheck_layer(cfg, mode)


def _naive_hyper_expert(layer, x2, selected, layer_index):
    """The official formulation: per-token generated W_down (T, d, a), W_up (T, a, d), applied by bmm."""
    cfg = layer.config
    unselected = torch.ones(x2.shape[0], cfg.n_experts, dtype=x2.dtype).scatter(-1, selected, 0.0)  # (T, N)
    z = layer.process(unselected @ layer.expert_embed)  # (T, h)
    w_down, b_down, w_up, b_up = layer.hypernetwork(z, layer_index)
    hidden = torch.relu(torch.einsum("td,tda->ta", x2, w_down) + b_down)
    return torch.einsum("ta,tad->td", hidden, w_up) + b_up


@pytest.mark.parametrize("max_table_sets", [MAX_TABLE_SETS, 0], ids=["grouped", "factored"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_grouped_hyper_expert_gradients_equal_per_token(top_k, max_table_sets):
    cfg = ref.tiny_config(n_experts=4, top_k=top_k, d_model=6, d_adapter=3)
    torch.manual_seed(0)  # the layer's init, x2, the sets and the output gradient
    layer = HyperMoELayer(cfg, dtype=torch.float64).train()
    layer.max_table_sets = max_table_sets
    x2 = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    selected = torch.stack([torch.randperm(4)[:top_k] for _ in range(40)])  # (T, k) random distinct
    params = [x2, *layer.parameters()]
    fast = layer._hyper_expert(x2, selected, 1)
    naive = _naive_hyper_expert(layer, x2, selected, 1)
    # the same sums grouped differently (tables per set vs per-token weights): reorder_atol of the magnitudes
    torch.testing.assert_close(fast, naive, rtol=0, atol=reorder_atol(magnitude(x2, naive)))
    weight = torch.randn_like(fast)  # a real (non-constant) output gradient
    g_fast = torch.autograd.grad((fast * weight).sum(), params, allow_unused=True)
    g_naive = torch.autograd.grad((naive * weight).sum(), params, allow_unused=True)
    for p, a, b in zip(["x", *dict(layer.named_parameters())], g_fast, g_naive):
        if b is None:
            assert a is None or not a.any(), p
        else:  # backward: twice the stages, sums over ≤ 48 tokens: ≤ 4× the forward bound, of the gradient's S
            torch.testing.assert_close(a, b, rtol=0, atol=reorder_atol(4 * magnitude(b)), msg=p)


@pytest.mark.parametrize("cfg", [
    ref.tiny_config(n_experts=4, top_k=1),  # k = 1: experts and HyperExpert in one dispatch
    ref.tiny_config(n_experts=4, top_k=1, gate="switch", capacity=3),  # ... with dropped tokens
    ref.tiny_config(n_experts=5, top_k=2),
], ids=["k=1", "switch-capacity", "k=2"])
def test_layer_gradients_equal_per_token_formulation(cfg):
    """The whole layer (fast path) against the plain MoE layer sharing its router and experts plus the
    official per-token HyperExpert: same output, same gradients for the input and every parameter."""
    torch.manual_seed(1)
    layer = HyperMoELayer(cfg, dtype=torch.float64).train()
    plain = HyperMoELayer(cfg.replace(hyper_expert=False), dtype=torch.float64).train()
    plain.router, plain.experts = layer.router, layer.experts  # the same Parameter objects
    x = torch.randn(3, 16, cfg.d_model, dtype=torch.float64, requires_grad=True)
    fast = layer(x, 1)
    selected = fast.routing.selected.reshape(-1, cfg.top_k)
    naive = plain(x, 1).output + _naive_hyper_expert(layer, x.reshape(-1, cfg.d_model), selected, 1).reshape(x.shape)
    assert not fast.routing.kept.all() if cfg.capacity else True
    S = layer_magnitude(cfg, params_to_ref(layer), x, 1)
    torch.testing.assert_close(fast.output, naive, rtol=0, atol=reorder_atol(S))  # same sums, other grouping
    weight = torch.randn_like(naive)
    params = [x, *layer.parameters()]
    g_fast = torch.autograd.grad((fast.output * weight).sum(), params)
    g_naive = torch.autograd.grad((naive * weight).sum(), params)
    for name, a, b in zip(["x", *dict(layer.named_parameters())], g_fast, g_naive):
        # backward: twice the stages, sums over ≤ 48 tokens: ≤ 4× the forward bound, of the gradient's S
        torch.testing.assert_close(a, b, rtol=0, atol=reorder_atol(4 * magnitude(b)), msg=name)


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------


@given(cases(configs(capacity=False), max_tokens=8), st.data())
def test_token_permutation_equivariance(case, data):
    x = torch.tensor(case.x).reshape(-1, case.cfg.d_model)  # (T, d): one sequence of T tokens
    perm = torch.tensor(data.draw(st.permutations(range(x.shape[0]))), dtype=torch.long)
    layer = make_layer(case)
    with torch.no_grad():
        a, b = layer(x, case.layer_index), layer(x[perm], case.layer_index)
    assert torch.equal(a.routing.selected[perm], b.routing.selected)
    S = layer_magnitude(case.cfg, case.params, case.x, case.layer_index)
    torch.testing.assert_close(a.output[perm], b.output, rtol=0, atol=reorder_atol(S))  # rows in other GEMM groups


@given(cases(), st.data())
def test_expert_relabelling_invariance(case, data):
    """Renaming experts (router columns, expert weights, embeddings) changes indices only; outputs equal."""
    N = case.cfg.n_experts
    perm = np.array(data.draw(st.permutations(range(N))))  # new expert i = old expert perm[i]
    params = dict(case.params)
    for name in ("router.weight", "router.bias", "router.noise_weight"):
        if name in params:
            params[name] = params[name][..., perm]
    for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2", "expert_embed"):
        if name in params:
            params[name] = params[name][perm]
    a = make_layer(case)(torch.tensor(case.x), case.layer_index)
    b = HyperMoELayer.from_ref(case.cfg, params).eval()(torch.tensor(case.x), case.layer_index)
    inv = np.argsort(perm)
    np.testing.assert_array_equal(np.sort(inv[a.routing.selected.numpy()], -1), np.sort(b.routing.selected.numpy(), -1))
    # the same sums with the experts (and the selected slots) in another order: the reorder bound, and for the
    # aux losses (sums over tokens and experts of terms ≤ max(1, |aux|)) the same bound of their magnitude
    S = layer_magnitude(case.cfg, case.params, case.x, case.layer_index)
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=reorder_atol(S))
    for name in a.aux:
        torch.testing.assert_close(a.aux[name], b.aux[name], rtol=0, atol=reorder_atol(magnitude(a.aux[name]) * S))


@given(cases(configs(capacity=False)), st.integers(0, 20))
def test_batch_invariance_without_capacity(case, cut):
    """Without capacity every token is independent: a slice of the batch gives the same rows."""
    x = torch.tensor(case.x).reshape(-1, case.cfg.d_model)
    cut = min(cut, x.shape[0])
    layer = make_layer(case)
    with torch.no_grad():
        full = layer(x, case.layer_index).output
        parts = torch.cat([layer(x[:cut], case.layer_index).output, layer(x[cut:], case.layer_index).output])
    S = layer_magnitude(case.cfg, case.params, case.x, case.layer_index)
    torch.testing.assert_close(parts, full, rtol=0, atol=reorder_atol(S))  # the same rows in smaller GEMMs


@given(cases(configs(hyper_expert=True)))
def test_zero_hypernetwork_heads_give_plain_moe(case):
    params = dict(case.params)
    for head in ("w_down", "w_up", "b_down", "b_up"):
        for part in ("weight", "bias"):
            params[f"hyper.{head}.{part}"] = np.zeros_like(params[f"hyper.{head}.{part}"])
    plain_cfg = case.cfg.replace(hyper_expert=False)
    plain_params = {n: v for n, v in params.items() if n in ref.param_shapes(plain_cfg)}
    x = torch.tensor(case.x)
    hyper = HyperMoELayer.from_ref(case.cfg, params).eval()
    plain = HyperMoELayer.from_ref(plain_cfg, plain_params).eval()
    for (mode, a), (_, b) in zip(run_modes(hyper, x, case.layer_index), run_modes(plain, x, case.layer_index)):
        assert torch.equal(a.output, b.output), mode  # ê = relu(0)·0 + 0 = 0 exactly


@given(cases(configs(hyper_expert=True)))
def test_adapter_cache_equals_uncached(case):
    x = torch.tensor(case.x)
    cached, uncached = make_layer(case), make_layer(case, cache_adapters=False)
    with torch.no_grad():
        for index in {case.layer_index, 0}:  # also a second layer index through the same cache
            a, b = cached(x, index), uncached(x, index)
            # the cache generates all C(N, k) sets at once, the uncached path the U present: same math per row
            S = layer_magnitude(case.cfg, case.params, case.x, index)
            torch.testing.assert_close(a.output, b.output, rtol=0, atol=reorder_atol(S))


def test_adapter_cache_invalidation():
    """The adapter cache follows in-place updates, load_state_dict and .to(dtype). Each check compares the
    cached layer with a fresh uncached clone: the same sums grouped differently (all C(N, k) sets at once vs
    the sets present), so they differ by ≤ reorder_atol(S) (tests/strategies.py: ≤ 12 dependent stages of
    ≤ 33 terms, two evaluations, 4096 u S), S the layer's largest magnitude on x under the current weights
    (input, expert outputs, routed part, HyperExpert, output; ref in float64). The state loaded below is
    N(0, 1) in every entry, not the reference init, so outputs reach ~100: a fixed atol of 1e-13 failed there
    (4.5e-13 seen), the bound scaled by S does not. A stale cache would be off by O(S)."""
    cfg = ref.tiny_config()
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)  # the layer's own init
    layer = HyperMoELayer(cfg, dtype=torch.float64).eval()
    x = torch.randn(3, 5, cfg.d_model, dtype=torch.float64, generator=gen)

    def fresh(index=0, dtype=torch.float64):
        clone = HyperMoELayer(cfg, dtype=dtype, cache_adapters=False).eval()
        clone.load_state_dict(layer.state_dict())
        return clone(x.to(dtype), index).output

    def bound(index=0, u=U64):
        return dict(rtol=0, atol=reorder_atol(layer_magnitude(cfg, params_to_ref(layer), x, index), u))

    with torch.no_grad():
        layer(x)  # fills the cache for layer 0
        assert 0 in layer._adapter_cache
        layer.hyper.w_up.bias.add_(0.5)  # in-place update (an optimizer step)
        torch.testing.assert_close(layer(x).output, fresh(), **bound())
        layer.expert_embed.mul_(2.0)
        torch.testing.assert_close(layer(x).output, fresh(), **bound())
        state = {n: torch.randn(t.shape, dtype=t.dtype, generator=gen) for n, t in layer.state_dict().items()}
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x).output, fresh(), **bound())
        torch.testing.assert_close(layer(x, 1).output, fresh(1), **bound(1))  # other layer index
        layer.float()  # .to(dtype): new storage
        torch.testing.assert_close(layer(x.float()).output, fresh(0, torch.float32), **bound(0, U32))


def test_torch_export_is_refused_with_one_line_pointing_to_export_layer():
    """torch.export / torch.onnx.export(dynamo=True) of the layer stop up front with one line naming the
    exportable formulation (export/layer.py's ExportLayer, `hypermoe export`), not a data-dependent-shape
    error from deep inside the sorted dispatch. The layer still runs eagerly afterwards."""
    import warnings

    from hypermoe.layer import EXPORT_REFUSAL

    cfg = ref.tiny_config()
    layer = HyperMoELayer.from_ref(cfg, ref.init(cfg, seed=4), dtype=torch.float32).eval()
    x = torch.randn(2, 3, cfg.d_model)
    assert "\n" not in EXPORT_REFUSAL and "hypermoe export" in EXPORT_REFUSAL and "ExportLayer" in EXPORT_REFUSAL
    with pytest.raises(ValueError) as err:  # the default (non-strict) torch.export: our ValueError as is
        torch.export.export(layer, (x,))
    assert str(err.value) == EXPORT_REFUSAL
    with pytest.raises(Exception) as err:  # strict (Dynamo) mode wraps it, message included
        torch.export.export(layer, (x,), strict=True)
    assert EXPORT_REFUSAL in str(err.value)
    with warnings.catch_warnings(), pytest.raises(Exception) as err:  # torch.onnx wraps it too
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x,), dynamo=True, verbose=False, report=False)
    assert EXPORT_REFUSAL in str(err.value)
    assert layer(x).output.shape == x.shape  # eager forward unaffected


def test_factored_fallback_matches_ref():
    """C(N, k) above the table threshold: the factored per-token form, still the reference's numbers."""
    cfg = ref.tiny_config(n_experts=12, top_k=6)  # C(12, 6) = 924 > MAX_TABLE_SETS
    assert math.comb(12, 6) > MAX_TABLE_SETS
    params = ref.init(cfg, seed=2)
    x = inputs_with_margin(cfg, params, (2, 7, cfg.d_model), np.random.default_rng(2), 1e-3)
    expected = ref.layer(cfg, params, x, 1)
    layer = HyperMoELayer.from_ref(cfg, params).eval()
    assert layer._sets is None
    for mode, out in run_modes(layer, torch.tensor(x), 1):
        check_against_ref(out, expected, F64_TOL, mode)


def test_deterministic_run_after_run():
    """Bitwise: the same layer on the same input in the same process takes the same kernels (no atomics)."""
    cfg = ref.tiny_config(n_experts=8, top_k=2)
    torch.manual_seed(2)
    layer = HyperMoELayer(cfg)
    x = torch.randn(4, 9, cfg.d_model)
    first = layer(x)
    for _ in range(3):
        again = layer(x)
        assert torch.equal(first.output, again.output) and torch.equal(first.routing.selected, again.routing.selected)


# ---------------------------------------------------------------------------------------------
# Training, randomness, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    ref.tiny_config(hyper_expert=False),
    ref.tiny_config(noisy_gating=True),
    ref.tiny_config(gate="switch", top_k=1, capacity=6, router_jitter=0.1),
], ids=["moe", "hypermoe-noisy", "hypermoe-switch"])
def test_training_lowers_loss(cfg):
    torch.manual_seed(0)
    layer = HyperMoELayer(cfg).train()
    x = torch.randn(8, 8, cfg.d_model)
    target = torch.tanh(x @ torch.randn(cfg.d_model, cfg.d_model))  # a fixed toy regression
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = layer(x)
        loss = (out.output - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        (loss + 1e-2 * out.aux["switch_balance"] + 1e-3 * out.aux["z_loss"]).backward()
        if cfg.hyper_expert:
            assert layer.hyper.w_down.weight.grad.abs().sum() > 0 and layer.expert_embed.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    layer.eval()
    with torch.no_grad():  # the inference (cached) path sees the trained parameters
        uncached = HyperMoELayer.from_ref(cfg, params_to_ref(layer), cache_adapters=False).eval()
        S = layer_magnitude(cfg, params_to_ref(layer), x)  # float32: the reorder bound in u = 2^-24
        torch.testing.assert_close(layer(x).output, uncached(x).output, rtol=0, atol=reorder_atol(S, U32))


def test_training_mode_draws_noise_eval_does_not():
    cfg = ref.tiny_config(noisy_gating=True, router_jitter=0.2)
    torch.manual_seed(3)
    layer = HyperMoELayer(cfg, dtype=torch.float64)
    x = torch.randn(2, 6, cfg.d_model, dtype=torch.float64)
    layer.train()
    torch.manual_seed(1)
    a = layer(x).routing.logits
    torch.manual_seed(1)
    b = layer(x).routing.logits
    c = layer(x).routing.logits
    assert torch.equal(a, b) and not torch.equal(a, c)  # drawn from torch's RNG
    layer.eval()
    params = params_to_ref(layer)
    expected = ref.layer(cfg, params, x.numpy())  # no draws
    np.testing.assert_allclose(layer(x).routing.logits.detach().numpy(), expected.logits, **scaled(F64_TOL, expected.logits))


def test_bfloat16_cpu_close_to_float32_where_routing_agrees():
    cfg = ref.tiny_config(n_experts=4, top_k=2, d_model=32, d_ff=64)
    params = ref.init(cfg, seed=4, dtype=np.float32)
    layer32 = HyperMoELayer.from_ref(cfg, params).eval()
    layer16 = HyperMoELayer.from_ref(cfg, params, dtype=torch.bfloat16).eval()
    x = torch.randn(4, 16, cfg.d_model, generator=torch.Generator().manual_seed(4))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a, b = layer32(x), layer16(x.bfloat16())
        assert b.output.dtype == torch.bfloat16
        assert b.routing.probs.dtype == b.routing.gates.dtype == torch.float32  # router math in float32
        same = (a.routing.selected == b.routing.selected).all(-1)
        assert same.float().mean() > 0.9
        # bf16 keeps 8 bits: ~0.4% per rounding; the output is O(1) after ~8 roundings in a chain
        scale = a.output[same].abs().max().item()
        torch.testing.assert_close(b.output[same].float(), a.output[same], rtol=0.05, atol=0.05 * scale)
    b.output.float().sum().backward()  # backward runs in bf16


# ---------------------------------------------------------------------------------------------
# Bad inputs, NaN policy
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    cfg = ref.tiny_config()
    torch.manual_seed(6)  # the values do not matter here, only that each call is rejected
    layer = HyperMoELayer(cfg)
    x = torch.randn(2, 3, cfg.d_model)
    bad = [
        ((torch.randn(2, 3, 5),), "d_model"),
        ((torch.ones(2, 3, cfg.d_model, dtype=torch.int64),), "dtype"),
        ((torch.randn(cfg.d_model),), "at least 2 dims"),
        ((x.double(),), "parameter dtype"),
        ((x.half(),), "dtype"),
        ((x.numpy(),), "torch.Tensor"),
        ((torch.randn(2, 3, cfg.d_model, device="meta"),), "meta"),
        ((x, 2), "layer_index"),
        ((x, -1), "layer_index"),
        ((x, True), "layer_index"),
        ((x, 0.0), "layer_index"),
    ]
    for args, words in bad:
        with pytest.raises(ValueError, match=words):
            layer(*args)
    with pytest.raises(ValueError, match="jitter"):
        layer(x, jitter=torch.ones(2, 3))
    with pytest.raises(ValueError, match="noisy_gating"):
        layer(x, gate_noise=torch.zeros(2, 3, cfg.n_experts))
    with pytest.raises(ValueError, match="gate_noise"):
        HyperMoELayer(cfg.replace(noisy_gating=True))(x, gate_noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        HyperMoELayer(cfg, check_finite=True)(torch.full((1, 2, cfg.d_model), float("nan")))
    with pytest.raises(ValueError, match="hyper_expert"):
        HyperMoELayer(cfg.replace(hyper_expert=False), hyper=HyperNetwork(cfg))
    with pytest.raises(ValueError, match="d_adapter"):
        HyperMoELayer(cfg, hyper=HyperNetwork(cfg.replace(d_adapter=3)))
    with pytest.raises(ValueError, match="hyper_expert"):
        HyperNetwork(cfg.replace(hyper_expert=False))
    with pytest.raises(ValueError, match="missing"):
        layer.load_ref({"router.weight": np.zeros((cfg.d_model, cfg.n_experts))})
    with pytest.raises(ValueError, match="shape"):
        layer.load_ref({**ref.init(cfg), "experts.w1": np.zeros((1, 2, 3))})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tokens_stay_in_their_rows(value):
    cfg = ref.tiny_config(n_experts=4, top_k=2)
    torch.manual_seed(7)
    layer = HyperMoELayer(cfg).eval()
    x = torch.randn(1, 10, cfg.d_model)
    bad = x.clone()
    bad[0, 3, 2] = value
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            clean, dirty = layer(x).output, layer(bad).output
        assert not torch.isfinite(dirty[0, 3]).all()
        rows = [i for i in range(10) if i != 3]
        # float32; the clean rows may sit in other GEMM groups once token 3 routes elsewhere: reorder bound
        # (a leak of the bad token would be NaN/Inf, caught whatever the tolerance)
        S = layer_magnitude(cfg, params_to_ref(layer), x)
        torch.testing.assert_close(dirty[0, rows], clean[0, rows], rtol=0, atol=reorder_atol(S, U32))
        assert (layer(bad).routing.selected >= 0).all() and (layer(bad).routing.selected < 4).all()


# ---------------------------------------------------------------------------------------------
# Parameters, state dicts, saved directories, export
# ---------------------------------------------------------------------------------------------


@given(configs())
@settings(max_examples=15)
def test_state_dict_names_are_refs(cfg):
    layer = HyperMoELayer(cfg)
    shapes = {n: tuple(t.shape) for n, t in layer.state_dict().items()}
    assert shapes == ref.param_shapes(cfg)
    assert set(params_to_ref(layer)) == set(ref.param_shapes(cfg))


def test_shared_hypernetwork_is_referenced_not_registered():
    cfg = ref.tiny_config(n_layers=2)
    torch.manual_seed(8)
    hyper = HyperNetwork(cfg)
    assert set(hyper.state_dict()) == {n[len("hyper."):] for n in ref.semantics.hyper_param_shapes(cfg)}
    layers = torch.nn.ModuleList([HyperMoELayer(cfg, hyper=hyper) for _ in range(2)])
    assert not any(n.startswith("hyper") for n in layers[0].state_dict())
    assert layers[0].hypernetwork is hyper and layers[1].hypernetwork is hyper
    assert set(params_to_ref(layers[0])) == set(ref.param_shapes(cfg))  # standalone view includes hyper.*
    # the standalone view computes what ref computes with the shared hypernetwork
    x = torch.randn(2, 4, cfg.d_model, dtype=torch.float64)
    hyper.double(), layers.double()
    expected = ref.layer(cfg, params_to_ref(layers[1]), x.numpy(), 1)
    np.testing.assert_allclose(layers[1](x, 1).output.detach().numpy(), expected.output,
                               **scaled(F64_TOL, expected.output, expected.routed, expected.hyper))
    # load_ref writes the hyper.* entries into the shared hypernetwork
    params = ref.init(cfg, seed=9)
    layers[0].load_ref(params)
    np.testing.assert_array_equal(hyper.w_up.bias.detach().numpy(), params["hyper.w_up.bias"])
    assert "shared_hyper=True" in repr(layers[0])


def test_ref_round_trip_and_directories(tmp_path):
    cfg = ref.tiny_config(router_bias=True, noisy_gating=True)
    params = ref.init(cfg, seed=7)
    assert set(params_from_ref(params)) == set(params)
    layer = HyperMoELayer.from_ref(cfg, params)
    assert layer.router.weight.dtype == torch.float64
    back = params_to_ref(layer)
    assert all(np.array_equal(back[n], params[n]) for n in params)  # copied, not computed
    layer.save_dir(tmp_path / "layer")
    loaded = HyperMoELayer.from_dir(tmp_path / "layer")
    assert loaded.config == cfg
    x = torch.randn(2, 3, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(loaded.eval()(x).output, layer.eval()(x).output)
    HyperMoELayer(cfg, dtype=torch.bfloat16).save_dir(tmp_path / "bf16")  # saved as float32
    assert HyperMoELayer.from_dir(tmp_path / "bf16").router.weight.dtype == torch.float32
    ref.io.save_dir(tmp_path / "stack", cfg, ref.init_stack(cfg), "stack")
    with pytest.raises(ValueError, match="kind"):
        HyperMoELayer.from_dir(tmp_path / "stack")


def test_everything_on_the_requested_device():
    """Buffers (set tables) follow `device=` like the parameters."""
    cfg = ref.tiny_config()
    layer = HyperMoELayer(cfg, device="meta")
    assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])


@pytest.mark.parametrize("cfg", [ref.tiny_config(), ref.tiny_config(gate="switch", top_k=1, capacity=1),
                                 ref.tiny_config(hyper_expert=False, top_k=1)], ids=["topk", "switch", "moe"])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0), (1, 1), (2, 1)])
def test_zero_and_one_token(cfg, shape):
    params = ref.init(cfg, seed=11)
    x = inputs_with_margin(cfg, params, (*shape, cfg.d_model), np.random.default_rng(11), 1e-3)
    expected = ref.layer(cfg, params, x)
    layer = HyperMoELayer.from_ref(cfg, params).eval()
    for mode, out in run_modes(layer, torch.tensor(x)):
        assert out.output.shape == x.shape and out.routing.selected.shape == (*shape, cfg.top_k)
        check_against_ref(out, expected, F64_TOL, mode)
    layer.train()(torch.tensor(x, requires_grad=True)).output.sum().backward()  # backward on empty / one token


def test_reset_parameters_and_repr():
    cfg = ref.tiny_config()
    torch.manual_seed(10)
    layer = HyperMoELayer(cfg)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    layer.reset_parameters()
    assert all(not torch.equal(before[n], t) for n, t in layer.state_dict().items())
    text = repr(layer)
    assert "n_experts=4" in text and "top_k=2" in text and "d_adapter=4" in text and "HyperNetwork" in text
