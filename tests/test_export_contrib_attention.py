"""The with-past export with `--attention contrib` (export/attention_op.py: com.microsoft::GroupQueryAttention, past and
present one max_length buffer; export/shared_buffer.py: OrtDecoder's side): the kernel's semantics as the eager op
states them, decode steps against ref's one full pass on random small models (left padding included), greedy ids
equal the standard export's and torch's at decidable steps (tests/test_generate.py's gate), onnxruntime-genai runs it,
verify passes it and fails a wrong scale, bad uses are one-line errors. Exports take seconds: few examples."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import attention_op, verify
from export.bounds import MARGIN_FACTOR, compare
from export.exporter import export_model
from export.generate import OrtDecoder
from export.verify_past import _left_padded
from hypermoe.cli import main
from hypermoe.generation import generate
from ref import model as ref_model
from ref.config import tiny_config
from tests.strategies import U32, reorder_atol
from tests.test_generate import (  # noqa: F401 (lm: the fixture)
    EOS_ID, PROMPTS, WEIGHT_SCALE, compare_tokens, greedy_decidable, lm,
)

FEW = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# The kernel: onnxruntime's CPU GroupQueryAttention = the eager op (the semantics the module docstring states)
# ---------------------------------------------------------------------------------------------


def gqa_session(H: int, c: int):
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    d = H * c
    node = h.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tot"], ["o", "ok", "ov"],
                       domain="com.microsoft", num_heads=H, kv_num_heads=H, scale=1 / np.sqrt(c))
    inputs = [h.make_tensor_value_info(n, T.FLOAT, ["B", "S", d]) for n in "qkv"]
    inputs += [h.make_tensor_value_info(n, T.FLOAT, ["B", H, "M", c]) for n in ("pk", "pv")]
    inputs += [h.make_tensor_value_info("sk", T.INT32, ["B"]), h.make_tensor_value_info("tot", T.INT32, [])]
    outputs = [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("o", "ok", "ov")]
    model = h.make_model(h.make_graph([node], "gqa", inputs, outputs),
                         opset_imports=[h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@FEW
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([8, 16]), st.data())
def test_kernel_equals_the_eager_op(B, H, c, data):
    """A right-padded prompt (rows of drawn lengths), then decode steps of one token per row, on ONE buffer bound
    as past and present: onnxruntime's outputs and buffer equal the eager op's (float32 vs float64)."""
    import onnxruntime as ort

    S = data.draw(st.integers(2, 5))
    lengths = data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B))
    steps, M = data.draw(st.integers(0, 3)), 12
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    session, d = gqa_session(H, c), H * c
    buffers = [np.zeros((B, H, M, c), np.float32) for _ in range(2)]  # (B, H, M, c), the OrtValues' memory
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
    ref_buffers = [torch.zeros(B, H, M, c, dtype=torch.float64) for _ in range(2)]
    seqlens, total = np.array(lengths) - 1, S
    for step in range(steps + 1):
        S_now = S if step == 0 else 1
        q, k, v = (rng.standard_normal((B, S_now, d)).astype(np.float32) for _ in range(3))
        io = session.io_binding()
        for name, a in (("q", q), ("k", k), ("v", v), ("sk", seqlens.astype(np.int32)), ("tot", np.array(total, np.int32))):
            io.bind_cpu_input(name, a)
        io.bind_output("o")  # get_outputs() follows the binding order
        for name, out, value in (("pk", "ok", values[0]), ("pv", "ov", values[1])):
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(out, value)
        session.run_with_iobinding(io)
        got = io.get_outputs()[0].numpy()  # (B, S, d)
        want, *ref_buffers = attention_op.group_query_attention(
            *(torch.from_numpy(a).double() for a in (q, k, v)), *ref_buffers, torch.from_numpy(seqlens).int(),
            torch.tensor(total, dtype=torch.int32), H, 1 / np.sqrt(c))
        real = np.arange(S_now)[None, :] <= seqlens[:, None] if step == 0 else np.ones((B, 1), bool)  # (B, S)
        magnitude = float(np.abs(v).max() * (1 + np.abs(q).max() * np.abs(k).max() * np.sqrt(c))) + 1
        assert np.abs(got - want.numpy())[real].max() <= reorder_atol(magnitude, U32)
        for b, r in zip(buffers, ref_buffers):
            for row in range(B):
                n = seqlens[row] + 1
                np.testing.assert_array_equal(b[row, :, :n], r.numpy()[row, :, :n].astype(np.float32))
        seqlens, total = seqlens + 1, total + 1


# ---------------------------------------------------------------------------------------------
# Exported models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contrib(lm, tmp_path_factory):
    """tests/test_generate.py's `lm` (2 blocks, d 16, 2 heads: c 8) exported again with --attention contrib."""
    cfg, params, model_dir, _ = lm
    out = tmp_path_factory.mktemp("contrib") / "export"
    assert main(["export", str(model_dir), "--with-past", "--attention", "contrib", "--logits", "all", "-o", str(out),
                 "--eos-token-id", str(EOS_ID), "--pad-token-id", "0"]) == 0
    return out


def test_interface_metadata_and_genai_config(lm, contrib):
    cfg = lm[0]
    model = onnx.load(str(contrib / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == cfg.n_layers
    past = {i.name for i in model.graph.input if i.name.startswith("past_key_values.")}
    readers = [n.op_type for n in model.graph.node if past & set(n.input)]
    assert readers == ["GroupQueryAttention"] * cfg.n_layers, readers  # the cache is read by GQA only, one per block
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["hypermoe.attention"] == "contrib" and meta["hypermoe.with_past"] == "1"
    H, c = cfg.n_heads, cfg.d_model // cfg.n_heads
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == ["batch_size", H, "max_sequence_length", c], (value.name, dims)
    config = json.loads((contrib / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    standard = json.loads((lm[3] / "genai_config.json").read_text())
    assert standard["search"]["past_present_share_buffer"] is False
    assert OrtDecoder(contrib, "cpu").shared_buffer and not OrtDecoder(lm[3], "cpu").shared_buffer


def test_decode_writes_the_one_buffer_in_place(contrib):
    decoder = OrtDecoder(contrib, "cpu")
    decoder.begin(2, 10)
    first = [v.data_ptr() for v in decoder._past.values()]
    ids, mask = np.array([[0, 5, 6], [7, 8, 9]]), np.array([[0, 1, 1], [1, 1, 1]])
    decoder.step(ids, mask, ref_model.default_positions(mask))
    for t in range(3):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        decoder.step(np.array([[1], [2]]), mask, mask.sum(axis=1, keepdims=True) - 1)
    assert [v.data_ptr() for v in decoder._past.values()] == first
    assert decoder.cache_shapes == [(2, 2, 10, 8)] * 4


@FEW
@given(st.integers(1, 3), st.sampled_from([8, 16]), st.integers(1, 3), st.sampled_from(["portable", "fused", "sparse"]),
       st.integers(1, 3), st.data())
def test_decode_steps_equal_a_full_pass(tmp_path_factory, H, c, n_layers, flavour, B, data):
    """Random small models, any flavour, logits of every position or of the last: a left-padded prefill (drawn
    lengths) then one-token steps through OrtDecoder equal ref's one full pass (float64) within the full pass's bound,
    routing margins ≥ MARGIN_FACTOR ε. ("last": the prefill's row is each sequence's last prompt position, which
    OrtDecoder's right-padding for the shared buffer moved: the graph must pick each row's last real token.)"""
    cfg = tiny_config(d_model=H * c, n_heads=H, n_layers=n_layers, vocab_size=40, max_seq_len=24,
                      gate=data.draw(st.sampled_from(["topk", "switch"])), top_k=1)
    params = ref_model.init_model(cfg, seed=data.draw(st.integers(0, 99)))
    out = tmp_path_factory.mktemp("hyp") / "export"
    logits = data.draw(st.sampled_from(["all", "last"]))
    export_model(out, cfg, params, kind="model", with_past=True, attention="contrib", flavour=flavour, logits=logits)
    S0, total = data.draw(st.integers(1, 6)), data.draw(st.integers(7, 12))
    lengths = data.draw(st.lists(st.integers(1, S0), min_size=B, max_size=B))
    mask = np.ones((B, total), dtype=np.int64)  # (B, L)
    for b, n in enumerate(lengths):
        mask[b, :S0 - n] = 0
    positions = ref_model.default_positions(mask)
    ids, want = _left_padded(cfg, params, "float32", mask, np.random.default_rng(data.draw(st.integers(0, 99))))
    decoder = OrtDecoder(out, "cpu")
    decoder.begin(B, total)
    steps = [decoder.step(ids[:, :S0], mask[:, :S0], positions[:, :S0], all_positions=True)]
    for t in range(S0, total):
        steps.append(decoder.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], all_positions=True))
    got, real = np.concatenate(steps, axis=1), mask != 0  # (B, L, V) | (B, L - S0 + 1, V)
    if logits == "last":  # the positions computed: S0 - 1 (the prefill's last, real in every row), then each step's
        real = np.zeros_like(real)
        real[:, S0 - 1:] = True
        got = np.concatenate([np.zeros((B, S0 - 1, got.shape[2]), got.dtype), got], axis=1)  # (B, L, V)
    c = compare("logits", got[real], want.values["logits"][real], want.bounds["logits"])
    assert c.ok, f"max abs {c.max_abs:.3g} > bound {c.bound:.3g}"
    assert np.all(want.margins[real] >= MARGIN_FACTOR)


def test_a_chunk_after_the_past_at_batch_1(lm, contrib):
    """GQA takes S > 1 after a past at batch 1: prefill 4, then a chunk of 5, equal ref's one full pass."""
    cfg, params = lm[0], lm[1]
    ids, want = _left_padded(cfg, params, "float32", np.ones((1, 9), np.int64), np.random.default_rng(1))
    decoder = OrtDecoder(contrib, "cpu")
    decoder.begin(1, 9)
    got = [decoder.step(ids[:, :4], np.ones((1, 4), np.int64), np.arange(4)[None], all_positions=True),
           decoder.step(ids[:, 4:], np.ones((1, 9), np.int64), np.arange(4, 9)[None], all_positions=True)]
    c = compare("logits", np.concatenate(got, axis=1), want.values["logits"], want.bounds["logits"])
    assert c.ok, f"max abs {c.max_abs:.3g} > bound {c.bound:.3g}"


def test_greedy_ids_equal_the_standard_exports_and_torchs(lm, contrib):
    from hypermoe.model import HyperMoETransformer, TorchDecoder

    cfg, params, model_dir, standard = lm
    options = dict(max_new_tokens=24, max_length=cfg.max_seq_len)
    got = generate(OrtDecoder(contrib, "cpu"), PROMPTS, **options).tokens
    decidable = greedy_decidable(cfg, params, PROMPTS, got)
    for other in (OrtDecoder(standard, "cpu"), TorchDecoder(HyperMoETransformer.from_dir(model_dir).eval(), use_cache=True)):
        same, decided, undecided = compare_tokens(got, generate(other, PROMPTS, **options).tokens, decidable)
        assert decided >= 60, f"only {decided} decidable tokens of {same} identical ({undecided})"


def test_genai_runs_it_with_our_greedy_ids(lm, contrib):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                             "(pip install --no-deps onnxruntime-genai==0.18.0)")
    cfg, params = lm[0], lm[1]
    L, new = max(map(len, PROMPTS)), 20
    right = np.zeros((len(PROMPTS), L), dtype=np.int32)  # genai right-pads (tests/test_genai.py)
    for b, p in enumerate(PROMPTS):
        right[b, :len(p)] = p
    model = og.Model(str(contrib))
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=L + new, do_sample=False, batch_size=len(PROMPTS))
    generator = og.Generator(model, search)
    generator.append_tokens(right)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = []
    for b in range(len(PROMPTS)):
        row = [int(t) for t in generator.get_sequence(b)][L:]
        theirs.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)
    ours = generate(OrtDecoder(contrib, "cpu"), PROMPTS, max_new_tokens=new, eos_token_ids=[EOS_ID],
                    max_length=cfg.max_seq_len).tokens
    same, decided, undecided = compare_tokens(theirs, ours, greedy_decidable(cfg, params, PROMPTS, ours))
    assert decided >= 50, f"only {decided} decidable tokens of {same} identical ({undecided})"


def test_verify_passes_and_a_wrong_scale_fails(lm, contrib, tmp_path):
    report = verify.verify(contrib, source=lm[2], provider="cpu")
    assert report.ok, "\n".join(report.lines())
    assert [c.ok for c in report.past_checks] == [True, True]
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(contrib, wrong)
    model = onnx.load(str(wrong / "model.onnx"))
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            next(a for a in node.attribute if a.name == "scale").f *= 1.25
    onnx.save(model, str(wrong / "model.onnx"))
    report = verify.verify(wrong, source=lm[2], provider="cpu")
    assert not report.ok and not report.past_checks[0].ok


def test_bad_uses_are_one_line_errors(lm, contrib, tmp_path, capsys):
    model_dir = str(lm[2])
    assert main(["export", model_dir, "--attention", "contrib", "-o", str(tmp_path / "x.onnx")]) != 0
    assert "add --with-past" in capsys.readouterr().err
    assert main(["export", model_dir, "--with-past", "--attention", "contrib", "--dtype", "bfloat16",
                 "-o", str(tmp_path / "bf16")]) != 0
    assert "float32 and float16" in capsys.readouterr().err
    cfg4 = tiny_config(n_heads=4)  # c = 4
    with pytest.raises(ValueError, match="multiple of 8"):
        export_model(tmp_path / "c4", cfg4, ref_model.init_model(cfg4), kind="model", with_past=True,
                     attention="contrib")
    with pytest.raises(ValueError, match="attention must be one of"):
        export_model(tmp_path / "y", lm[0], lm[1], kind="model", with_past=True, attention="flash")
    decoder = OrtDecoder(contrib, "cpu")
    decoder.begin(2, 8)
    with pytest.raises(ValueError, match="left padding"):  # a hole in a prompt
        decoder.step(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 0, 1], [1, 1, 1]]), np.zeros((2, 3), np.int64))
    decoder.begin(2, 8)
    decoder.step(np.array([[1, 2], [3, 4]]), np.array([[0, 1], [1, 1]]), np.array([[0, 0], [0, 1]]))
    with pytest.raises(ValueError, match="batch size 1"):
        decoder.step(np.array([[1, 2], [3, 4]]), np.array([[0, 1, 1, 1], [1, 1, 1, 1]]), np.array([[1, 2], [2, 3]]))
    with pytest.raises(ValueError, match="padding only in the first step"):
        decoder.step(np.array([[1], [3]]), np.array([[0, 1, 0], [1, 1, 1]]), np.array([[1], [2]]))


def test_float16_passes_verify(tmp_path):
    """GroupQueryAttention's float16 CPU kernel within verify's float16 bounds. The unscaled init: with the ×3 weights
    of tests/test_generate.py a float16 with-past export fails with either attention (GatherElements index out of
    range in onnxruntime, on main too: not this feature's)."""
    from ref import io

    cfg = tiny_config(max_seq_len=48, vocab_size=64)
    params = ref_model.init_model(cfg, seed=0)
    io.save_dir(tmp_path / "model", cfg, params, "model")
    export_model(tmp_path / "f16", cfg, params, kind="model", with_past=True, attention="contrib", dtype="float16",
                 source=str(tmp_path / "model"))
    report = verify.verify(tmp_path / "f16", provider="cpu")
    assert report.ok, "\n".join(report.lines())
