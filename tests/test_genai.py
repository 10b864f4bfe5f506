"""export/genai.py: the genai_config.json of a with-past export, and onnxruntime-genai's own generator running
our graph: its greedy tokens must equal `hypermoe generate`'s (OrtDecoder + hypermoe.generation.generate),
gated on ref's top-2 logit gap as in tests/test_generate.py.

onnxruntime-genai is optional: `pip install --no-deps onnxruntime-genai==0.18.0` (--no-deps: its package
requires the CPU `onnxruntime`, which would overwrite onnxruntime-gpu's files; the genai library loads the
libonnxruntime of whichever onnxruntime package is installed, and 0.18.0 runs on onnxruntime-gpu 1.31.1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.exporter import past_names
from export.genai import genai_config
from hypermoe.generation import generate
from ref.config import tiny_config
from tests.test_generate import EOS_ID, compare_tokens, greedy_decidable, lm, ort_decoder  # noqa: F401 (fixtures)


def test_genai_config_fields():
    cfg = tiny_config(n_layers=3, n_heads=4, d_model=32)
    config = genai_config(cfg, eos_token_id=5, pad_token_id=1, context_length=20)
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "decoder" and decoder["filename"] == "model.onnx"
    assert (model["eos_token_id"], model["pad_token_id"], model["context_length"], model["vocab_size"]) == (5, 1, 20, 32)
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"], decoder["hidden_size"]) == (3, 4, 8, 32)
    inputs, outputs = past_names(cfg.n_layers)  # the exporter's names, through genai's %d templates
    assert [decoder["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")] == inputs[:3]
    assert [decoder["inputs"][k] % i for i in range(3) for k in ("past_key_names", "past_value_names")] == inputs[3:]
    assert [decoder["outputs"][k] % i for i in range(3) for k in ("present_key_names", "present_value_names")] == outputs[1:]
    assert decoder["outputs"]["logits"] == outputs[0]
    assert config["search"]["past_present_share_buffer"] is False and config["search"]["do_sample"] is False
    assert config["search"]["max_length"] == 20
    assert "eos_token_id" not in genai_config(cfg, eos_token_id=None, pad_token_id=0, context_length=20)["model"]
    json.dumps(config)
    for kwargs, message in [(dict(eos_token_id=32), "eos_token_id"), (dict(pad_token_id=-1), "pad_token_id"),
                            (dict(context_length=cfg.max_seq_len + 1), "context_length"),
                            (dict(filename="../m.onnx"), "filename")]:
        with pytest.raises(ValueError, match=message):
            genai_config(cfg, **{"eos_token_id": None, "pad_token_id": 0, "context_length": 8, **kwargs})


def test_export_writes_genai_config(lm):
    cfg, _, _, export_dir = lm
    written = json.loads((export_dir / "genai_config.json").read_text())
    assert written == genai_config(cfg, eos_token_id=EOS_ID, pad_token_id=0, context_length=cfg.max_seq_len)


def test_genai_greedy_tokens_equal_ours(lm, ort_decoder):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                             "(pip install --no-deps onnxruntime-genai==0.18.0)")
    cfg, params, _, export_dir = lm
    prompts = [list(b"hello"), [1, 2], [250]]
    L, new = max(map(len, prompts)), 20
    # genai 0.18 (DefaultPositionInputs) takes RIGHT padding: trailing pad ids get mask 0, everything up to a
    # row's last non-pad token is real with positions 0, 1, …; its next token's position is the real count, as
    # ours after left padding. Both layouts compute the same thing (padding masked out).
    right = np.zeros((len(prompts), L), dtype=np.int32)
    for b, p in enumerate(prompts):
        right[b, :len(p)] = p
    model = og.Model(str(export_dir))  # reads genai_config.json; CPU (its provider_options are empty)
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=L + new, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, search)
    generator.append_tokens(right)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = []
    for b in range(len(prompts)):
        row = [int(t) for t in generator.get_sequence(b)][L:]
        theirs.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)  # genai pads a finished row
    ours = generate(ort_decoder, prompts, max_new_tokens=new, eos_token_ids=[EOS_ID], max_length=cfg.max_seq_len).tokens
    same, decided, undecided = compare_tokens(theirs, ours, greedy_decidable(cfg, params, prompts, ours))
    assert decided >= 50, f"only {decided} decidable tokens of {same} identical ({undecided})"
