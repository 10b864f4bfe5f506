"""hypermoe.bench.generation: the generation benchmark runs end to end on a tiny language model and produces every
row, ratio and target of its table; the CLI writes its outputs atomically and refuses to replace them without
--force. No timing is asserted (speed is measured in BENCHMARKS.md, never in tests)."""

import json

import pytest

import ref
from hypermoe.bench import generation as bg
from hypermoe.cli import main


def tiny_options(**changes) -> bg.Options:
    cfg = ref.tiny_config(top_k=1).replace(n_layers=2, vocab_size=64, max_seq_len=24, n_heads=2)
    base = dict(cfg=cfg, threads=1, decode_batches=(1, 3), new_tokens=4, prefill_reps=2, decode_reps=2,
                exports=("sparse", "sparse:int4:contrib"))
    return bg.Options(**{**base, **changes})


@pytest.fixture(scope="module")
def result():
    """One run with transformers' dense GPT-2, the sparse export, its int4 export with the shared-buffer attention
    and both torch backends."""
    messages = []
    out = bg.run(tiny_options(), progress=messages.append)
    assert any("exporting" in m for m in messages) and any("round 2/2" in m for m in messages)
    return out


@pytest.fixture(scope="module")
def torch_result():
    """The torch backends alone (no export, no dense model: a second or two)."""
    return bg.run(tiny_options(exports=(), dense=False, decode_batches=(2,), prefill_reps=1, decode_reps=1))


def test_groups_default_to_128_and_the_whole_context():
    opts = bg.Options()  # GPT-2 small: 1024 positions
    got = [(g.phase, g.batch, g.prompt, g.new_tokens, g.context) for g in bg.groups(opts)]
    assert got == [("prefill", 1, 128, 0, 0), ("prefill", 1, 1024, 0, 0),
                   ("decode", 1, 128, 33, 128), ("decode", 8, 128, 33, 128),
                   ("decode", 1, 991, 33, 1024), ("decode", 8, 991, 33, 1024)]
    cfg = bg.gpt2_small_config()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len, cfg.n_experts, cfg.top_k) == \
        (768, 12, 12, 50257, 1024, 8, 1)
    with pytest.raises(ValueError, match="does not fit"):
        bg.groups(bg.Options(prefill_prompts=(2048,)))
    with pytest.raises(ValueError, match="torch-kv"):
        bg.check_options(bg.Options(torch_backends=("torch-nocache",)))
    assert bg.Options().backends() == ("hf-gpt2", "ort-sparse", "ort-sparse:contrib", "ort-sparse:int8:acc4",
                                       "ort-sparse:int4:acc4", "ort-sparse:int4:acc4:contrib", "torch-kv", "torch-nocache")


def test_export_specs():
    assert bg.parse_export("fused") == {"flavour": "fused", "dtype": "float32", "quantize": None, "accuracy_level": 0,
                                        "attention": "standard"}
    assert bg.parse_export("sparse:int4:acc4:contrib") == {"flavour": "sparse", "dtype": "float32", "quantize": "int4",
                                                           "accuracy_level": 4, "attention": "contrib"}
    assert bg.parse_export("fused:bf16:int4")["dtype"] == "bfloat16"
    for bad, why in (("dense", "flavour"), ("sparse:int3", "'int3'"), ("sparse:int8:int4", "'int4'"),
                     ("sparse:contrib:contrib", "'contrib'"), ("fused:fp16:bf16", "'bf16'"), ("sparse:acc4", "applies to")):
        with pytest.raises(ValueError, match=why):
            bg.parse_export(bad)
    with pytest.raises(ValueError, match="must differ"):
        bg.check_options(tiny_options(exports=("sparse", "sparse")))
    with pytest.raises(ValueError, match="gate = 'switch'"):  # the benchmark's model is upcycled from a dense GPT-2
        bg.check_options(tiny_options(cfg=tiny_options().cfg.replace(gate="switch")))


@pytest.mark.slow
def test_run_produces_every_row(result):
    opts = tiny_options()
    backends = ["hf-gpt2", "ort-sparse", "ort-sparse:int4:contrib", "torch-kv", "torch-nocache"]
    rows = result["rows"]
    # prefill L = 24 (min(128, 24)) once, decode B ∈ {1, 3} at C = 24: one row per backend each
    assert [(r["phase"], r["batch"], r["prompt"], r["backend"]) for r in rows] == \
        [("prefill", 1, 24, b) for b in backends] + [("decode", B, 20, b) for B in (1, 3) for b in backends]
    assert [c["backend"] for c in result["checks"]] == backends
    assert [c["ok"] for c in result["checks"]] == [True, True, None, True, True]  # int4: reported, not judged
    for r in rows:
        assert r["reps"] == 2 and 0 < r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["x_vs_base"] > 0 and r["latency_ms"] > 0
        if r["phase"] == "decode":
            steps = (opts.nocache_new_tokens if r["backend"] == "torch-nocache" else opts.new_tokens) - 1
            assert r["steps"] == steps and r["context_range"] == [21, 20 + steps]
            # the same seed and (nearly) the same logits draw the same tokens: the upcycled model computes the dense
            # GPT-2's function (hypermoe/bench/generation_backends.py), so every float backend draws hf-gpt2's tokens
            assert r["tokens_compared"] == 2 * r["batch"] * (steps + 1)
            if "int4" not in r["backend"]:
                assert r["tokens_same"] == r["tokens_compared"]
    assert result["meta"]["base"] == "hf-gpt2" and result["meta"]["dense_parameters"] < result["meta"]["parameters"]
    # one context (24): no context ratio; torch-kv against the dense model at B = 1 and 3, the KV cache against
    # recomputing, the export's prefill against the dense model's
    assert [(t["target"], t["batch"]) for t in bg.targets(result)] == \
        [("ort-sparse:int4:contrib decode ≥ 3× hf-gpt2 (dense)", 1), ("torch-kv decode ≥ 0.9× hf-gpt2 (dense)", 1),
         ("torch KV cache × faster than recompute, per decoded token", 1),
         ("torch-kv decode ≥ 0.9× hf-gpt2 (dense)", 3), ("torch KV cache × faster than recompute, per decoded token", 3),
         ("ort-sparse prefill ≥ hf-gpt2 (dense)", 1), ("ort-sparse:int4:contrib prefill ≥ hf-gpt2 (dense)", 1)]
    text = bg.markdown(result)
    assert "| " + " | ".join(bg.COLUMNS) + " |" in text and "against `hf-gpt2`" in text
    assert text.count("\n| prefill |") == 5 and text.count("\n| decode |") == 10
    json.dumps(result)  # serialisable as written by --json


def test_torch_only_run(torch_result):
    rows = torch_result["rows"]
    assert [(r["phase"], r["batch"], r["backend"]) for r in rows] == \
        [(phase, B, b) for phase, B in (("prefill", 1), ("decode", 2)) for b in ("torch-kv", "torch-nocache")]
    assert [t["target"].split()[0] for t in bg.targets(torch_result)] == ["torch"]
    assert bg.markdown(torch_result).count("\n| decode |") == 2


def test_cli_writes_atomically_and_renders(torch_result, tmp_path, monkeypatch, capsys):
    """The CLI around run() (monkeypatched to a torch-only result): atomic --json/--markdown, refused without
    --force, --render of the JSON prints the same table, layer-only options refused."""
    seen = []
    monkeypatch.setattr(bg, "run", lambda opts, progress=None, workdir=None: seen.append(opts) or torch_result)
    out, md = tmp_path / "gen.json", tmp_path / "gen.md"
    assert main(["bench", "--generation", "--quick", "--threads", "1", "--json", str(out), "--markdown", str(md)]) == 0
    assert seen[0].cfg == bg.quick_config() and seen[0].threads == 1 and seen[0].exports == bg.Options().exports
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["meta"]["kind"] == bg.KIND and md.read_text() in printed
    assert written["meta"]["command"] == "hypermoe bench --generation --quick --threads 1"
    assert "- command: `hypermoe bench --generation --quick --threads 1`" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.json", "gen.md"]  # no staging leftovers
    before = out.read_text()
    assert main(["bench", "--generation", "--quick", "--json", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err and out.read_text() == before and len(seen) == 1
    assert main(["bench", "--generation", "--exports", "portable", "sparse:int4", "--no-dense", "--json", str(out),
                 "--force"]) == 0
    assert seen[1].exports == ("portable", "sparse:int4") and not seen[1].dense
    assert seen[1].cfg == bg.gpt2_small_config()
    capsys.readouterr()
    assert main(["bench", "--render", str(out)]) == 0
    assert capsys.readouterr().out.strip() == bg.markdown(json.loads(out.read_text())).strip()
    assert main(["bench", "--generation", "--tokens", "64"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["bench", "--exports", "sparse"]) == 2  # the layer benchmark has no exports option
    assert main(["bench", "--generation", "--exports", "sparse:int3"]) == 2
    assert "'int3'" in capsys.readouterr().err
