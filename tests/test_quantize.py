"""export/quantize.py and export/quant_ops.py: the block-wise scheme (round-trip bound, onnxruntime's own bytes),
MatMulNBits on our bytes, quantised exports (sparse, fused, portable; int8 and int4; layer, stack, model, with past)
passing verify against the dequantised reference, a wrong quantised graph failing it, onnxruntime-genai running a
quantised with-past export, and the one-line errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ref
from export.exporter import export_model
from export.quantize import dequantise, dequantized_reference, quantise, roundtrip, unpack
from export.verify import verify
from hypermoe.cli import main
from ref import io as ref_io
from ref.model import init_model
from tests.strategies import configs

U32 = 2.0**-24


def _weights(seed: int, K: int, N: int, exponent: float, ties: bool) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((K, N)) * 10.0**exponent
    if ties:  # exact .5 quotients and equal |max| = |min| blocks: the rounding and sign conventions
        w = np.round(w * 4) / 4
        w[-1] = -w[0]
    return w.astype(np.float32)


shapes = dict(K=st.integers(1, 80), N=st.integers(1, 6), bits=st.sampled_from([4, 8]),
              block=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 2**32 - 1),
              exponent=st.floats(-4, 4), ties=st.booleans())


@given(**shapes)
def test_roundtrip_error_bound(K, N, bits, block, seed, exponent, ties):
    """|w - w'| ≤ |s| (1/2 + 2^(bits+2) u) per element, |s| (1 + 2^(bits+2) u) where the top code is clipped.
    Derivation: r = fl(w · fl(1/s)) = (w/s)(1 + δ), |δ| ≤ 2u + u², |w/s| ≤ 2^(bits-1); adding the zero point rounds
    once more (≤ 2^bits u); rounding to the code ≤ 1/2 (clipped: < 1); w' = fl(s q) adds ≤ 2^(bits-1) u |s|."""
    w = _weights(seed, K, N, exponent, ties)
    q = quantise(w, bits, block)
    s = np.repeat(np.abs(q.scales).astype(np.float64), block, axis=1)[:, :K].T  # (K, N) each element's |scale|
    err = np.abs(dequantise(q).astype(np.float64) - w)  # (K, N)
    clipped = (unpack(q).reshape(N, -1)[:, :K].T == 2**bits - 1) & (np.abs(w) >= s * (2 ** (bits - 1) - 0.5))
    slack = 2 ** (bits + 2) * U32
    assert np.all(err <= s * (np.where(clipped, 1.0, 0.5) + slack)), err.max()
    assert np.array_equal(roundtrip(w, bits, block), dequantise(q))


@given(**shapes)
def test_bytes_equal_onnxruntime_quantizer(K, N, bits, block, seed, exponent, ties):
    """Our codes and scales equal onnxruntime.quantization's (MatMulNBitsQuantizer's block quantiser, symmetric)
    for every real element; K's zero padding is not compared (its codes never meet an activation)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    w = _weights(seed, K, N, exponent, ties)
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
    q = quantise(w, bits, block)
    assert packed.shape == q.packed.shape and np.array_equal(scales, q.scales)
    theirs = unpack(q._replace(packed=packed)).reshape(N, -1)[:, :K]
    assert np.array_equal(theirs, unpack(q).reshape(N, -1)[:, :K])


@settings(max_examples=10)
@given(K=st.integers(1, 80), N=st.integers(1, 6), bits=st.sampled_from([4, 8]), block=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**32 - 1), T=st.integers(1, 5))
def test_matmulnbits_multiplies_by_the_dequantised_weights(K, N, bits, block, seed, T):
    """onnxruntime's MatMulNBits (accuracy_level 0, CPU) on our bytes = x · dequantise(W) within float32's bound
    for a K-term dot product: |error| ≤ γ_K Σ_k |x_k| |W'_kn|, γ_K = K u / (1 - K u)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    q = quantise(rng.standard_normal((K, N)).astype(np.float32), bits, block)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = dequantise(q).astype(np.float64)
    y = session.run(None, {"x": x})[0].astype(np.float64)
    gamma = K * U32 / (1 - K * U32)
    assert np.all(np.abs(y - x @ w) <= gamma * (np.abs(x) @ np.abs(w)) + 1e-30)


def test_dequantized_reference_unties_the_head():
    cfg = ref.tiny_config()  # tied embeddings
    params = init_model(cfg, seed=0)
    cfg2, p2 = dequantized_reference(cfg, params, 4, 16)
    assert cfg.tie_embeddings and not cfg2.tie_embeddings
    assert np.array_equal(p2["token_embed"], params["token_embed"])  # the lookup stays float
    assert np.array_equal(p2["lm_head.weight"], roundtrip(params["token_embed"].T, 4, 16))
    for name in ("blocks.0.moe.router.weight", "blocks.0.moe.expert_embed", "hyper.trunk.weight", "blocks.0.ln1.weight",
                 "blocks.0.attn.qkv.bias"):
        assert np.array_equal(p2[name], params[name]), name  # float: router, HyperExpert, LayerNorm, biases
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.moe.experts.w1"):
        assert not np.array_equal(p2[name], params[name]), name


# ---------------------------------------------------------------------------------------------
# Exports against verify
# ---------------------------------------------------------------------------------------------

CFG = ref.tiny_config(d_model=32, d_ff=64, max_seq_len=24)  # d and f multiples of 16 and 32 (QMoE, portable)


def _verified(path, **kwargs):
    report = verify(path, shapes=((2, 5), (1, 1)), **kwargs)
    return report


@pytest.mark.parametrize("kind,flavour,quantize,block", [
    ("layer", "sparse", "int8", 32), ("layer", "fused", "int4", 16), ("layer", "portable", "int4", 32),
    ("stack", "sparse", "int4", 16), ("model", "sparse", "int8", 16), ("model", "fused", "int4", 32),
])
def test_quantised_export_passes_verify(tmp_path, kind, flavour, quantize, block):
    init = {"layer": ref.init, "stack": ref.init_stack, "model": init_model}[kind]
    params = init(CFG, seed=3)
    path = tmp_path / "q.onnx"
    export_model(path, CFG, params, kind=kind, flavour=flavour, quantize=quantize, block_size=block,
                 source="default:seed=3")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert (meta["hypermoe.quantize"], meta["hypermoe.block_size"]) == (quantize, str(block))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MatMulNBits" in ops or "QMoE" in ops
    assert ("QMoE" in ops) == (flavour == "fused")
    report = _verified(path)
    assert report.ok, "\n".join(report.lines())
    assert report.quantization and "max |Δ|" in report.quantization[0]


def test_dense_blocks_and_untied_head(tmp_path):
    """A dense MLP block (moe_every 2) and an untied lm_head are quantised too, and verify passes (portable)."""
    cfg = CFG.replace(moe_every=2, tie_embeddings=False)
    path = tmp_path / "q.onnx"
    export_model(path, cfg, init_model(cfg, seed=4), kind="model", flavour="portable", quantize="int8", block_size=16,
                 source="default:seed=4")
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert {"blocks.0.mlp.w1.packed", "lm_head.weight.packed"} <= names, sorted(names)
    report = _verified(path)
    assert report.ok, "\n".join(report.lines())


@given(cfg=configs(max_experts=4, capacity=False), bits=st.sampled_from([4, 8]), block=st.sampled_from([16, 32]))
@settings(max_examples=3, deadline=None)
def test_random_layer_configs_pass_verify(tmp_path_factory, cfg, bits, block):
    path = tmp_path_factory.mktemp("rand") / "q.onnx"
    export_model(path, cfg, ref.init(cfg, seed=1), flavour="sparse", quantize=f"int{bits}", block_size=block,
                 source="default:seed=1")
    report = _verified(path)
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize("flavour,quantize", [("sparse", "int4"), ("fused", "int8")])
def test_accuracy_level_4_is_report_only(tmp_path, flavour, quantize):
    """int8 activations: the kernels leave the dequantised reference's bounds (which is why verify only reports);
    fused int8 is allowed there."""
    path = tmp_path / "q.onnx"
    export_model(path, CFG, ref.init(CFG, seed=3), flavour=flavour, quantize=quantize, block_size=16,
                 accuracy_level=4, source="default:seed=3")
    levels = {a.i for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    report = _verified(path)
    assert report.report_only and report.ok, "\n".join(report.lines())
    assert not all(c.ok for r in report.shapes for c in r.comparisons)  # beyond float32's bounds, as measured
    assert "REPORT ONLY" in report.lines()[-1]


def _rewrite(src, dst, change) -> None:
    model = onnx.load(str(src))
    change(model)
    onnx.save(model, str(dst))


def test_wrong_quantised_graph_fails_verify(tmp_path):
    """Scales one block off, and a zero point of 129 instead of 128: both exports fail verify."""
    params = ref.init(CFG, seed=3)
    good = tmp_path / "good.onnx"
    export_model(good, CFG, params, flavour="sparse", quantize="int8", block_size=16, source="default:seed=3")
    assert _verified(good).ok

    def shift_scales(model):
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        init = next(t for t in model.graph.initializer if t.name == node.input[2])
        scales = onnx.numpy_helper.to_array(init)
        N = next(a.i for a in node.attribute if a.name == "N")
        init.CopyFrom(onnx.numpy_helper.from_array(np.roll(scales.reshape(N, -1), 1, axis=1).reshape(-1), init.name))

    def zero_point(model):
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                init = next(t for t in model.graph.initializer if t.name == node.input[2])
                name = node.input[2] + "_zp"
                model.graph.initializer.append(onnx.numpy_helper.from_array(
                    np.full(onnx.numpy_helper.to_array(init).shape, 129, np.uint8), name))
                node.input.append(name)

    for change in (shift_scales, zero_point):
        bad = tmp_path / f"{change.__name__}.onnx"
        _rewrite(good, bad, change)
        assert not _verified(bad).ok, change.__name__


# ---------------------------------------------------------------------------------------------
# With past: verify and onnxruntime-genai
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantised_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlm")
    cfg = ref.tiny_config(d_model=32, d_ff=64, vocab_size=300, max_seq_len=48)
    params = init_model(cfg, seed=0)
    ref_io.save_dir(root / "model", cfg, params, "model")
    export_model(root / "export", cfg, params, kind="model", with_past=True, flavour="sparse", quantize="int4",
                 block_size=16, source=str(root / "model"))
    return cfg, params, root / "export"


def test_quantised_with_past_passes_verify(quantised_lm):
    report = verify(quantised_lm[2], shapes=((2, 5),))
    assert report.ok and len(report.past_checks) == 2, "\n".join(report.lines())


def test_fused_with_past_passes_verify(tmp_path):
    cfg = ref.tiny_config(d_model=32, d_ff=64, max_seq_len=40)
    export_model(tmp_path / "export", cfg, init_model(cfg, seed=5), kind="model", with_past=True, flavour="fused",
                 quantize="int4", block_size=16, source="default:seed=5")
    report = verify(tmp_path / "export", shapes=((2, 5),))
    assert report.ok and len(report.past_checks) == 2, "\n".join(report.lines())


def test_genai_runs_quantised_with_past(quantised_lm):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from export.generate import OrtDecoder
    from hypermoe.generation import generate
    from tests.test_generate import compare_tokens, greedy_decidable

    cfg, params, export_dir = quantised_lm
    cfg2, params2 = dequantized_reference(cfg, params, 4, 16)  # what the export computes
    prompts, new = [[5, 6, 7], [250]], 16
    right = np.zeros((len(prompts), 3), dtype=np.int32)
    for b, p in enumerate(prompts):
        right[b, :len(p)] = p
    model = og.Model(str(export_dir))
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=3 + new, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, search)
    generator.append_tokens(right)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [[int(t) for t in generator.get_sequence(b)][3:] for b in range(len(prompts))]
    ours = generate(OrtDecoder(export_dir, "cpu"), prompts, max_new_tokens=new, max_length=cfg.max_seq_len).tokens
    same, decided, _ = compare_tokens(theirs, ours, greedy_decidable(cfg2, params2, prompts, ours))
    assert decided >= 16, f"only {decided} decidable tokens of {same} identical"


# ---------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--block-size", "32"], "--block-size and --accuracy-level apply to --quantize"),
    (["--accuracy-level", "4"], "apply to --quantize"),
    (["--quantize", "int4", "--block-size", "24"], "power of two"),
    (["--quantize", "int4", "--block-size", "8"], "power of two"),
    (["--quantize", "int8", "--dtype", "float16"], "float32 only"),
    (["--quantize", "int8", "--flavour", "fused"], "int4 only"),
    (["--quantize", "int4", "--flavour", "fused", "--block-size", "64"], "multiples of the block size 64"),
    (["--quantize", "int4", "--flavour", "portable", "--block-size", "128"], "multiple of the block"),
])
def test_cli_errors(tmp_path, capsys, extra, message):
    model_dir = tmp_path / "model"
    ref_io.save_dir(model_dir, CFG, init_model(CFG, seed=0), "model")
    code = main(["export", str(model_dir), "-o", str(tmp_path / "m.onnx"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_quantised(tmp_path, capsys):
    model_dir = tmp_path / "layer"
    ref_io.save_dir(model_dir, CFG, ref.init(CFG, seed=0), "layer")
    out = tmp_path / "q.onnx"
    assert main(["export", str(model_dir), "-o", str(out), "--flavour", "sparse", "--quantize", "int4",
                 "--block-size", "16", "--verify"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "sparse int4 block 16" in printed and "quantisation's effect" in printed and printed.rstrip().endswith("PASS")
