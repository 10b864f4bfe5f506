"""The README's serving path end to end, on a small dense GPT-2 built locally with transformers (no download):
hypermoe convert --from gpt2-mlp (model.safetensors) → export --with-past → verify → generate, each through the
CLI as a user runs it. The pieces have their own tests (test_convert_model, test_export_past, test_generate);
this one checks that each command takes the previous one's output as it is written.

What is asserted, and why it can fail:
- convert: the upcycled model (k = 1: every gate exactly 1, the HyperExpert's output heads zero) computes the
  dense GPT-2's logits; float32, two implementations of the same sums: the reorder bound REORDER_K·u·S of
  tests/strategies.py, S = max |logit| (measured ~2e-7·S).
- export + verify: verify's own checks (full passes, prefill + decode = one pass, greedy onnxruntime = torch),
  exit status 0 and its PASS line.
- generate: onnxruntime's greedy ids equal those of the PyTorch model directory (same loop, hypermoe.generation)
  and the float64 reference's argmax, for the steps whose top-2 logit gap exceeds twice export/verify.py's bound
  (4 × |ref float32 − ref float64| + 16·u·S); a step below it is undecidable and ends the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ref.io
import ref.model
from hypermoe.cli import main
from hypermoe.model import HyperMoETransformer
from tests.strategies import reorder_atol

transformers = pytest.importorskip("transformers", reason="transformers (the test extra) builds the dense GPT-2")

U32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A dense GPT-2 (V 300, P 64, d 32, 2 blocks, 4 heads) upcycled, exported with past and verified."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    dense = transformers.GPT2LMHeadModel(config).eval()
    dense.save_pretrained(root / "gpt2")
    assert main(["convert", "--from", "gpt2-mlp", str(root / "gpt2" / "model.safetensors"), "--experts", "4",
                 "--top-k", "1", "--heads", "4", "--hyper-width", "16", "--d-adapter", "8",
                 "-o", str(root / "hm")]) == 0
    assert main(["export", str(root / "hm"), "--with-past", "-o", str(root / "hm-onnx")]) == 0
    return root, dense


def test_upcycled_model_computes_the_dense_logits(served):
    root, dense = served
    ours = HyperMoETransformer.from_dir(root / "hm").eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, (2, 40)))
    with torch.no_grad():
        want, got = dense(ids).logits, ours(ids).logits  # (B, S, V)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=reorder_atol(float(want.abs().max()), U32))


def test_verify_passes(served, capsys):
    root, _ = served
    assert main(["verify", str(root / "hm-onnx")]) == 0
    out = capsys.readouterr().out
    assert "c. greedy tokens" in out and out.rstrip().endswith("PASS")


def test_generate_onnxruntime_equals_torch(served, capsys):
    root, _ = served
    prompt = "3,14,15,92,65"
    runs = {}
    for model in ("hm-onnx", "hm"):  # onnxruntime (the export), then PyTorch with the KV cache (the directory)
        assert main(["generate", str(root / model), "--prompt-ids", prompt, "--max-new-tokens", "12",
                     "--print-ids", "--provider", "cpu"]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("ids:"))
        runs[model] = [int(t) for t in line.split()[1:]]
    # the float64 reference decides which steps are decidable at float32's error: verify's bound per logit,
    # 4 × (ref float32's measured deviation) + 16·u·S; a top-2 gap below twice it could flip between two
    # correct float32 implementations
    cfg, params, _ = ref.io.load_dir(root / "hm")
    params64 = {name: np.asarray(v, dtype=np.float64) for name, v in params.items()}
    params32 = {name: np.asarray(v, dtype=np.float32) for name, v in params.items()}
    context = [int(t) for t in prompt.split(",")]
    decided = 0
    for want, got in zip(runs["hm"], runs["hm-onnx"]):
        logits = ref.model.forward(cfg, params64, np.array([context]))[0][0, -1]  # (V,)
        logits32 = ref.model.forward(cfg, params32, np.array([context]))[0][0, -1]  # (V,)
        bound = 4 * np.abs(logits32 - logits).max() + 16 * U32 * np.abs(logits).max()
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] <= 2 * bound:
            break  # undecidable from here on: the two may differ without either being wrong
        assert got == want, f"step {decided}: onnxruntime {got}, torch {want}"
        assert want == int(np.argmax(logits))  # and both are the reference's greedy choice
        context.append(want)
        decided += 1
    assert decided >= 8  # a comparison that decided nothing would prove nothing
