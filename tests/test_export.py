"""ONNX export (export/) against the reference: onnxruntime CPU and onnx.reference on random configs,
both flavours, both gates, capacity, k = N, several (batch, seq) on one file, 16-bit dtypes, exact ties,
metadata, the checker, and every bad input named in the task (corrupt file, config/weights mismatch,
unwritable path, missing CUDA library). Exports are slow (seconds each): they are cached per module and
hypothesis runs a handful of examples."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ref
from export import exporter, runtime, verify
from export.graph import colex_sets
from tests.strategies import configs, magnitude

SHAPES = ((2, 5), (1, 1), (3, 4), (1, 9), (2, 0))  # (batch, seq) run on ONE exported file each; T = 1 and T = 0 included
FEW = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """export(cfg, seed, **options) → path, one export per distinct argument set in this module."""
    directory, cache = tmp_path_factory.mktemp("onnx"), {}

    def export(cfg, seed=0, params=None, **options):
        options.setdefault("routing_outputs", True)
        key = (cfg.to_json(), seed, params is not None, tuple(sorted(options.items())))
        if key not in cache:
            path = directory / f"m{len(cache)}.onnx"
            kind = options.pop("kind", "layer")
            init = ref.init if kind == "layer" else ref.init_stack
            source = "" if params is not None else f"default:seed={seed}"  # what verify() reloads
            exporter.export_model(path, cfg, params if params is not None else init(cfg, seed=seed), kind=kind,
                                  source=source, **options)
            cache[key] = path
        return cache[key]

    return export


def run_and_compare(path, cfg, params, *, dtype="float32", layer_index=0, shapes=SHAPES, seed=0):
    """Run `path` on onnxruntime CPU for every shape; check routing exactly and outputs and gates within
    their error bounds (export/verify.py: scaled by the magnitudes involved) against ref (float64)."""
    runner = runtime.OnnxRunner(path, "cpu")
    rng = np.random.default_rng(seed)
    margins = verify.layer_margins(cfg, params, "layer", dtype, layer_index)
    for batch, seq in shapes:
        x = verify.inputs_with_margin(margins, (batch, seq, cfg.d_model), rng, verify.MARGIN_FACTOR,
                                      round_fn=lambda v: runtime.round_to(v, runner.input_type))
        want = verify.expected(cfg, params, "layer", x, dtype, layer_index)
        got = runner(x)
        case = f"{cfg} shape {(batch, seq)}"
        np.testing.assert_array_equal(got["selected_experts"], want.values["selected_experts"], err_msg=case)
        for name in ("gates", "output"):
            np.testing.assert_allclose(got[name], want.values[name], rtol=0, atol=want.bounds[name], err_msg=case)
    return runner


# ---------------------------------------------------------------------------------------------
# Random configs, both flavours
# ---------------------------------------------------------------------------------------------


@FEW
@given(cfg=configs(max_experts=6), seed=st.integers(0, 2**16))
def test_portable_matches_ref_on_random_configs(export_cache, cfg, seed):
    params = ref.init(cfg, seed=seed)
    run_and_compare(export_cache(cfg, seed), cfg, params, seed=seed)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=configs(max_experts=6, capacity=False).filter(lambda c: c.activation != "gelu"), seed=st.integers(0, 2**16))
def test_fused_matches_ref_on_random_configs(export_cache, cfg, seed):
    params = ref.init(cfg, seed=seed)
    path = export_cache(cfg, seed, flavour="fused")
    assert any(n.op_type == "MoE" and n.domain == "com.microsoft" for n in onnx.load(str(path)).graph.node)
    run_and_compare(path, cfg, params, seed=seed)


CASES = {
    "topk k=2": ref.tiny_config(),
    "switch": ref.tiny_config(gate="switch", top_k=1, expert_bias=False, activation="relu"),
    "switch capacity 1": ref.tiny_config(gate="switch", top_k=1, capacity=1, activation="gelu"),
    "k = N": ref.tiny_config(top_k=4, activation="silu", router_bias=True),
    "k = 1 topk (gate 1)": ref.tiny_config(top_k=1, n_experts=6),
    "plain MoE": ref.tiny_config(hyper_expert=False),
    "noisy gating + jitter (inference: no noise)": ref.tiny_config(noisy_gating=True, router_jitter=0.1),
}


# every case with the per-set constants; the factored form on three of them (exports are slow)
@pytest.mark.parametrize("name, hyper_form", [(name, "sets") for name in CASES] +
                         [(name, "factored") for name in ("topk k=2", "switch capacity 1", "k = N")])
def test_portable_cases(export_cache, name, hyper_form):
    cfg = CASES[name]
    params = ref.init(cfg, seed=1)
    run_and_compare(export_cache(cfg, 1, hyper_form=hyper_form), cfg, params, layer_index=0, seed=2)


def test_capacity_drops_tokens_in_the_exported_graph(export_cache):
    cfg = CASES["switch capacity 1"]
    params = ref.init(cfg, seed=1)
    x = np.random.default_rng(5).standard_normal((2, 9, cfg.d_model))
    want = ref.layer(cfg, params, x)
    assert not want.kept.all(), "the case must actually drop tokens"
    got = runtime.OnnxRunner(export_cache(cfg, 1, hyper_form="sets"), "cpu")(x)
    # float32 graph vs float64 ref: errors ~1e-6 of the magnitude S; 1e-4 · S (a dropped token handled wrongly
    # moves its row by O(S)); routing margin 0.04 here, far above float32's logit error
    np.testing.assert_allclose(got["output"], want.output, rtol=1e-4, atol=1e-4 * magnitude(want.output, x))


@pytest.mark.parametrize("name", ["topk k=2", "switch", "k = N"])
def test_fused_cases(export_cache, name):
    cfg = CASES[name]
    params = ref.init(cfg, seed=1)
    run_and_compare(export_cache(cfg, 1, flavour="fused"), cfg, params, seed=3)


def test_onnxruntime_moe_in_place_with_normalized_routing():
    """onnxruntime's CPU com.microsoft::MoE with its input an intermediate tensor and its output read by a node (so
    the planner may run it in place, MayInplace(0, 0)) computes FFN(x) with normalize_routing_weights=1, the setting
    the fused flavour uses (export/moe_op.py). With normalize_routing_weights=0, onnxruntime 1.31.1 returns
    p·FFN(0) there (it zero-fills the output, i.e. the input, before reading it): the cause of the fused switch-gate
    model's failure, measured once and documented in moe_op.py; not pinned here, so that a fixed onnxruntime
    does not fail the suite."""
    normalize = 1
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    T, d, f, N = 8, 4, 6, 3
    rng = np.random.default_rng(0)
    fc1, b1 = rng.standard_normal((N, f, d)).astype(np.float32), rng.standard_normal((N, f)).astype(np.float32)
    fc2, b2 = rng.standard_normal((N, d, f)).astype(np.float32), rng.standard_normal((N, d)).astype(np.float32)
    x, logits = rng.standard_normal((T, d)).astype(np.float32), rng.standard_normal((T, N)).astype(np.float32)
    zero = np.zeros(1, np.float32)
    nodes = [helper.make_node("Add", ["x", "zero"], ["x1"]),  # x1, y1: intermediate tensors, as inside a model
             helper.make_node("MoE", ["x1", "logits", "fc1", "b1", "fc2", "b2"], ["y1"], domain="com.microsoft", k=1,
                              activation_type="relu", normalize_routing_weights=normalize),
             helper.make_node("Add", ["y1", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, d]),
                                             helper.make_tensor_value_info("logits", TensorProto.FLOAT, [T, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, d])],
                              [numpy_helper.from_array(v, name) for v, name in
                               ((fc1, "fc1"), (b1, "b1"), (fc2, "fc2"), (b2, "b2"), (zero, "zero"))])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Adds
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x, "logits": logits})[0].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    e = p.argmax(-1)  # (T,) no ties in these draws
    v = x.astype(np.float64)  # (T, d)
    want = np.einsum("tf,tdf->td", np.maximum(np.einsum("td,tfd->tf", v, fc1[e]) + b1[e], 0), fc2[e]) + b2[e]  # weight 1
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * np.abs(want).max())  # float32 kernel, sums of ~10 terms


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cfg=configs(max_experts=6), seed=st.integers(0, 2**16))
def test_sparse_matches_ref_on_random_configs(export_cache, cfg, seed):
    """The sparse flavour (per-expert NonZero dispatch, standard ops) with its default HyperExpert form."""
    params = ref.init(cfg, seed=seed)
    path = export_cache(cfg, seed, flavour="sparse")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "NonZero" in ops and "MoE" not in ops
    run_and_compare(path, cfg, params, seed=seed)


# the sparse flavour on every case; the grouped HyperExpert form also with the portable flavour
@pytest.mark.parametrize("name, options", [(name, dict(flavour="sparse")) for name in CASES] +
                         [(name, dict(hyper_form="grouped")) for name in ("topk k=2", "switch capacity 1", "k = N")])
def test_sparse_and_grouped_cases(export_cache, name, options):
    cfg = CASES[name]
    params = ref.init(cfg, seed=1)
    path = export_cache(cfg, 1, **options)
    if cfg.hyper_expert:
        assert exporter.read_metadata(path)["hyper_form"] == "grouped"
    run_and_compare(path, cfg, params, seed=4)


def test_layer_index_and_stack(export_cache):
    cfg = ref.tiny_config(n_layers=3)
    params = ref.init(cfg, seed=4)
    run_and_compare(export_cache(cfg, 4, layer_index=2), cfg, params, layer_index=2, seed=4)
    stack_path = export_cache(cfg, 4, kind="stack", routing_outputs=False)
    report = verify.verify(stack_path, shapes=((2, 5), (1, 1)))
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize("flavour", ["portable", "fused"])
def test_model_export_matches_ref(tmp_path, flavour):
    """A saved transformer (kind "model", dense and HyperMoE blocks): token ids → logits vs ref.model."""
    from hypermoe.cli import main
    from ref import io
    from ref import model as ref_model

    cfg = ref.tiny_config(n_layers=2, moe_every=2, activation="relu")
    io.save_dir(tmp_path / "model", cfg, ref_model.init_model(cfg, seed=3), "model")
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "model"), "-o", str(out), "--flavour", flavour]) == 0
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["input_ids"]
    report = verify.verify(out, shapes=((2, 5), (1, 1), (1, cfg.max_seq_len)))
    assert report.ok and report.shapes[0].comparisons[0].name == "logits", "\n".join(report.lines())
    assert main(["run", str(out), "--provider", "cpu", "--seq", "7", "--runs", "1"]) == 0
    assert main(["run", str(out), "--seq", str(cfg.max_seq_len + 1)]) == 2


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, the portable graph on onnx.reference
# ---------------------------------------------------------------------------------------------


def test_dims_are_dynamic_and_named(export_cache):
    cfg = ref.tiny_config()
    model = onnx.load(str(export_cache(cfg, 1)))
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "hidden_states" and dims == ["batch", "seq", cfg.d_model]
    assert [o.name for o in model.graph.output] == ["output", "selected_experts", "gates"]
    assert model.ir_version == exporter.IR_VERSION
    assert {o.domain: o.version for o in model.opset_import}[""] >= 18


@pytest.mark.parametrize("hyper_form", ["sets", "factored"])
def test_portable_graph_ops_and_no_per_token_weights(export_cache, hyper_form):
    """Portable: standard ops only, no NonZero (a host sync on CUDA), and no intermediate tensor of the
    per-token weight shapes (T, d, a) / (T, a, d): the HyperExpert never materialises per-token weights."""
    cfg = ref.tiny_config(d_model=12, d_adapter=5)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(export_cache(cfg, 1, hyper_form=hyper_form))))
    assert {n.domain for n in model.graph.node} <= {""} and "NonZero" not in {n.op_type for n in model.graph.node}
    assert len(model.graph.value_info) > 20  # shape inference annotated the intermediates (the loop is not vacuous)
    for value in model.graph.value_info:
        dims = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        assert dims[1:] not in ([12, 5], [5, 12]) and 60 not in dims, f"{value.name} {dims}"


@pytest.mark.parametrize("options", [dict(hyper_form="sets"), dict(hyper_form="factored"), dict(flavour="fused"),
                                     dict(flavour="sparse"), dict(hyper_form="grouped")])
def test_zero_tokens(export_cache, options):
    """T = 0 (batch 0 or seq 0) runs through the graph itself and gives empty outputs."""
    cfg = ref.tiny_config()
    runner = runtime.OnnxRunner(export_cache(cfg, 1, **options), "cpu")
    for shape in [(2, 0), (0, 3)]:
        got = runner(np.zeros((*shape, cfg.d_model), np.float32))
        assert got["output"].shape == (*shape, cfg.d_model) and got["selected_experts"].shape == (*shape, cfg.top_k)


@pytest.mark.parametrize("flavour", ["portable", "fused", "sparse"])
def test_float16(export_cache, flavour):
    cfg = ref.tiny_config(activation="gelu_tanh")
    params = ref.init(cfg, seed=7)
    run_and_compare(export_cache(cfg, 7, flavour=flavour, dtype="float16"), cfg, params, dtype="float16", seed=7)


def test_bfloat16(export_cache):
    cfg = ref.tiny_config()
    params = ref.init(cfg, seed=7)
    path = export_cache(cfg, 7, dtype="bfloat16")
    try:
        runtime.OnnxRunner(path, "cpu")
    except ValueError as err:
        if "NOT_IMPLEMENTED" in str(err):
            pytest.skip(f"onnxruntime's CPU provider has no bfloat16 kernel for this graph: {err}")
        raise
    run_and_compare(path, cfg, params, dtype="bfloat16", seed=7)


def test_bfloat16_graph_on_reference_evaluator(export_cache):
    """bfloat16 coverage without a GPU: the portable bfloat16 graph under onnx.reference (ml_dtypes, which
    onnx itself depends on, supplies the numpy dtype) agrees with ref within the bfloat16 tolerance."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (an onnx dependency) provides numpy bfloat16")
    from onnx.reference import ReferenceEvaluator

    cfg = ref.tiny_config()
    params = ref.init(cfg, seed=7)
    x = verify.inputs_with_margin(verify.layer_margins(cfg, params, "layer", "bfloat16"), (2, 5, cfg.d_model),
                                  np.random.default_rng(7), verify.MARGIN_FACTOR,
                                  round_fn=lambda v: runtime.round_to(v, runtime.ONNX_BFLOAT16))
    output, selected, gates = ReferenceEvaluator(str(export_cache(cfg, 7, dtype="bfloat16"))).run(
        None, {"hidden_states": x.astype(ml_dtypes.bfloat16)})
    want = verify.expected(cfg, params, "layer", x, "bfloat16")
    assert output.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(selected, want.values["selected_experts"])
    np.testing.assert_allclose(output.astype(np.float64), want.values["output"], rtol=0, atol=want.bounds["output"])


def test_bfloat16_bits_round_to_nearest_even():
    import torch

    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(runtime.to_bfloat16_bits(x), want)


def test_portable_graph_on_reference_evaluator(export_cache):
    from onnx.reference import ReferenceEvaluator

    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=2, activation="gelu")
    params = ref.init(cfg, seed=8)
    session = ReferenceEvaluator(str(export_cache(cfg, 8)))
    x = verify.inputs_with_margin(verify.layer_margins(cfg, params, "layer", "float32"), (2, 6, cfg.d_model),
                                  np.random.default_rng(8), verify.MARGIN_FACTOR,
                                  round_fn=lambda v: v.astype(np.float32).astype(np.float64))
    output, selected, gates = session.run(None, {"hidden_states": x.astype(np.float32)})
    want = verify.expected(cfg, params, "layer", x, "float32")
    np.testing.assert_array_equal(selected, want.values["selected_experts"])
    np.testing.assert_allclose(output, want.values["output"], rtol=0, atol=want.bounds["output"])


def test_set_ranks_cover_every_set():
    for N, k in [(1, 1), (4, 2), (6, 3), (8, 1), (5, 5)]:
        sets = colex_sets(N, k)
        assert len(sets) == math.comb(N, k) == len({tuple(s) for s in sets.tolist()})
        ranks = [sum(math.comb(v, i + 1) for i, v in enumerate(s)) for s in sets.tolist()]
        assert ranks == list(range(len(sets)))


# ---------------------------------------------------------------------------------------------
# Exact ties
# ---------------------------------------------------------------------------------------------


def tied_params(cfg, seed):
    params = ref.init(cfg, seed=seed)
    params["router.weight"] = np.zeros_like(params["router.weight"])  # every logit exactly 0: an N-way tie
    return params


def test_ties_pick_lower_index_in_portable_graph_torch_and_reference_evaluator(export_cache):
    import torch
    from onnx.reference import ReferenceEvaluator

    from hypermoe.layer import HyperMoELayer

    cfg = ref.tiny_config(top_k=2)
    params = tied_params(cfg, 9)
    path = export_cache(cfg, 9, params=params)
    x = np.random.default_rng(9).standard_normal((2, 5, cfg.d_model)).astype(np.float32)
    want = ref.layer(cfg, params, x.astype(np.float64))
    np.testing.assert_array_equal(want.selected, np.broadcast_to([0, 1], (2, 5, 2)))
    got = runtime.OnnxRunner(path, "cpu")(x)
    np.testing.assert_array_equal(got["selected_experts"], want.selected)
    np.testing.assert_allclose(got["output"], want.output, rtol=1e-4, atol=1e-4 * magnitude(want.output, x))  # float32
    evaluated = ReferenceEvaluator(str(path)).run(None, {"hidden_states": x})
    np.testing.assert_array_equal(evaluated[1], want.selected)
    layer = HyperMoELayer.from_ref(cfg, params).eval()
    with torch.no_grad():
        torch_sel = layer(torch.from_numpy(x.astype(np.float64))).routing.selected.numpy()
    np.testing.assert_array_equal(torch_sel, want.selected)


def test_fused_flavour_ties_go_to_the_highest_index(export_cache):
    """Documented limitation: on exact ties the com.microsoft::MoE CPU kernel runs the HIGHEST-index experts
    while the graph's own selection (HyperExpert, selected_experts) keeps the lowest, as SPEC.md says. The fused
    output is then the highest experts' routed output plus the lowest set's HyperExpert."""
    cfg = ref.tiny_config(top_k=2)
    params = tied_params(cfg, 9)
    path = export_cache(cfg, 9, params=params, flavour="fused")
    assert any(exporter.read_metadata(path)["notes"].count("HIGHEST") for _ in [0])
    x = np.random.default_rng(9).standard_normal((2, 5, cfg.d_model))
    got = runtime.OnnxRunner(path, "cpu")(x.astype(np.float32))
    want = ref.layer(cfg, params, x)
    np.testing.assert_array_equal(got["selected_experts"], want.selected)  # the graph's selection: lowest
    assert not np.allclose(got["output"], want.output, atol=1e-3)  # the fused output differs from ref
    xt = x.reshape(-1, cfg.d_model)
    highest = np.broadcast_to([3, 2], (xt.shape[0], 2))
    routed_high = ref.routed_output(cfg, params, xt, highest, want.gates.reshape(-1, 2), np.ones(len(xt), bool))
    fused = (routed_high + want.hyper.reshape(-1, cfg.d_model)).reshape(x.shape)
    np.testing.assert_allclose(got["output"], fused, rtol=1e-4, atol=1e-4 * magnitude(fused, x))  # float32 vs float64


# ---------------------------------------------------------------------------------------------
# Metadata, checker, external data, refusals and bad input
# ---------------------------------------------------------------------------------------------


def test_metadata_round_trip(export_cache):
    cfg = CASES["switch"]
    path = export_cache(cfg, 1, flavour="fused")
    meta = exporter.read_metadata(path)
    assert exporter.metadata_config(meta) == cfg
    assert meta["spec_version"] == ref.SPEC_VERSION and meta["flavour"] == "fused" and meta["kind"] == "layer"
    session_meta = runtime.open_session(path, "cpu")[0].get_modelmeta()
    assert ref.HyperMoEConfig.from_json(session_meta.custom_metadata_map["hypermoe.config"]) == cfg
    exporter.check_file(path)  # the checker (full) and strict shape inference pass on the file


def test_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)
    cfg = ref.tiny_config()
    result = exporter.export_model(tmp_path / "m.onnx", cfg, ref.init(cfg, seed=0), routing_outputs=True,
                                   source="default:seed=0")
    assert result.external_data and (tmp_path / "m.onnx.data").is_file()
    assert verify.verify(result.path, provider="cpu", shapes=((1, 3),)).ok
    size = (tmp_path / "m.onnx.data").stat().st_size
    with pytest.raises(ValueError, match="already exists; pass --force"):  # never replaced without asking
        exporter.export_model(tmp_path / "m.onnx", cfg, ref.init(cfg, seed=0), routing_outputs=True,
                              source="default:seed=0")
    exporter.export_model(tmp_path / "m.onnx", cfg, ref.init(cfg, seed=0), routing_outputs=True, source="default:seed=0",
                          force=True)
    assert (tmp_path / "m.onnx.data").stat().st_size == size  # re-export replaces the data file, no append


def test_fused_refusals(tmp_path):
    for changes, word in [(dict(gate="switch", top_k=1, capacity=2), "capacity"), (dict(activation="gelu"), "gelu")]:
        cfg = ref.tiny_config(**changes)
        with pytest.raises(ValueError, match=word):
            exporter.export_model(tmp_path / "x.onnx", cfg, ref.init(cfg), flavour="fused")


def test_export_failures_are_one_line_value_errors(tmp_path):
    cfg = ref.tiny_config()
    with pytest.raises(ValueError, match="opset"):
        exporter.export_model(tmp_path / "x.onnx", cfg, ref.init(cfg), opset=17)
    with pytest.raises(ValueError, match="routing outputs"):
        exporter.export_model(tmp_path / "x.onnx", cfg, ref.init_stack(cfg), kind="stack", routing_outputs=True)


def test_corrupt_and_truncated_files(export_cache, tmp_path):
    good = export_cache(ref.tiny_config(), 1).read_bytes()
    for name, data in [("garbage.onnx", b"this is not a protobuf" * 10), ("truncated.onnx", good[: len(good) // 2])]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=name):
            exporter.read_metadata(path)
        with pytest.raises(ValueError, match=name):
            runtime.OnnxRunner(path, "cpu")
        with pytest.raises(ValueError, match=name):
            verify.verify(path)
    with pytest.raises(FileNotFoundError):
        runtime.OnnxRunner(tmp_path / "missing.onnx", "cpu")


def test_verify_fails_loudly_on_wrong_weights(export_cache, tmp_path, capsys):
    """The verifier can fail: the same config with other weights → exit status 1 and a FAIL report."""
    from hypermoe.cli import main
    from ref import io

    cfg = ref.tiny_config()
    path = export_cache(cfg, 1)
    io.save_dir(tmp_path / "other_weights", cfg, ref.init(cfg, seed=2), "layer")
    assert main(["verify", str(path), "--source", str(tmp_path / "other_weights"), "--provider", "cpu"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "routing agreement" in text


def test_config_weights_mismatch(export_cache, tmp_path):
    from ref import io

    cfg = ref.tiny_config()
    path = export_cache(cfg, 1)
    other = ref.tiny_config(n_experts=5)
    io.save_dir(tmp_path / "other", other, ref.init(other), "layer")
    with pytest.raises(ValueError, match="does not match"):
        verify.verify(path, source=tmp_path / "other")
    # a model directory whose weights do not fit its own config
    io.save_dir(tmp_path / "broken", cfg, ref.init(cfg), "layer")
    (tmp_path / "broken" / "config.json").write_text(other.to_json().replace("{", '{"kind": "layer",', 1))
    with pytest.raises(ValueError, match="does not match"):
        exporter.load_source(tmp_path / "broken")


def test_unwritable_output_paths(tmp_path):
    cfg = ref.tiny_config()
    params = ref.init(cfg)
    (tmp_path / "afile").write_text("x")
    for bad, word in [(tmp_path / "no" / "such" / "dir.onnx", "does not exist"), (tmp_path, "is a directory"),
                      (tmp_path / "afile" / "m.onnx", "afile is not a directory")]:
        with pytest.raises(ValueError, match=word):
            exporter.export_model(bad, cfg, params)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r"cannot create files in .*locked \(Permission denied\)"):
            exporter.export_model(locked / "m.onnx", cfg, params)


def test_missing_cuda_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(runtime, "_gpu_count", lambda: (1, ""))
    monkeypatch.setattr(runtime, "cuda_libraries", lambda: ["libhypermoe_missing_cublas.so.99"])
    with pytest.raises(ValueError, match="libhypermoe_missing_cublas.so.99"):
        runtime.choose_provider("cuda")
    provider, notice = runtime.choose_provider("auto")
    assert provider == "cpu" and "libhypermoe_missing_cublas.so.99" in notice and "\n" not in notice
    with pytest.raises(ValueError, match="provider must be one of"):
        runtime.choose_provider("tpu")


def test_no_gpu_falls_back_quietly(monkeypatch, capfd):
    monkeypatch.setattr(runtime, "_gpu_count", lambda: (0, "no NVIDIA driver (libcuda.so.1 not found)"))
    assert runtime.choose_provider("auto") == ("cpu", "notice: running on the CPU provider: no NVIDIA driver "
                                                      "(libcuda.so.1 not found)")
    with pytest.raises(ValueError, match="--provider cuda"):
        runtime.choose_provider("cuda")
    assert capfd.readouterr().err == ""  # onnxruntime was never asked for the CUDA provider


def test_runner_rejects_bad_inputs(export_cache):
    cfg = ref.tiny_config()
    runner = runtime.OnnxRunner(export_cache(cfg, 1), "cpu")
    for bad in [np.zeros((2, 3, cfg.d_model + 1), np.float32), np.zeros((3, cfg.d_model), np.float32),
                np.zeros((1, 2, cfg.d_model), np.int64)]:
        with pytest.raises(ValueError):
            runner(bad)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_export_verify_run(tmp_path, capsys):
    from hypermoe.cli import main
    from ref import io

    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=3)
    io.save_dir(tmp_path / "model", cfg, ref.init(cfg, seed=2), "layer")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "model"), "-o", str(out), "--routing-outputs", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "HyperExpert form sets" in text and "PASS" in text
    assert main(["verify", str(out), "--shapes", "1x3,2x2"]) == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 4, cfg.d_model)).astype(np.float32))
    assert main(["run", str(out), "--provider", "cpu", "--input", str(tmp_path / "x.npy"), "--runs", "2",
                 "--save", str(tmp_path / "y.npy")]) == 0
    assert "tokens/s" in capsys.readouterr().out and np.load(tmp_path / "y.npy").shape == (2, 4, cfg.d_model)
    assert main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "f.onnx"), "--flavour", "fused"]) == 2
    assert "capacity" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "model"), "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nothing.onnx")]) == 2


@pytest.mark.slow
def test_main_on_the_default_layer(tmp_path, capsys):
    """`hypermoe main`: the default layer (official sizes) exported, verified against ref, run, reported."""
    from hypermoe.cli import main

    assert main(["main", "--workdir", str(tmp_path), "--seq", "16", "--runs", "2", "--provider", "cpu"]) == 0
    text = capsys.readouterr().out
    # on the CPU provider the default flavour is sparse, whose HyperExpert form is the grouped one
    assert "sparse" in text and "HyperExpert form grouped" in text
    assert "routing agreement 100.0%" in text and "FAIL" not in text
    assert "tokens/s" in text and text.rstrip().splitlines()[-1].startswith("PASS")
