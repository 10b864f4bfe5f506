"""hypermoe.hf: a hypermoe model directory through transformers — AutoModelForCausalLM.from_pretrained's logits against
HyperMoETransformer's and ref's, the Cache contract, model.generate's greedy ids against `hypermoe generate` (torch
and onnxruntime), pipeline("text-generation") with the folder's tokenizer.json, and save/load round trips.

Greedy ids are compared as tests/test_generate.py does: at a step whose top-2 logit gap (ref, float64) exceeds twice
the float32 export's error bound the two runs must agree; the first difference at an undecidable step ends that row's
comparison; enough decidable steps are required for the test to say something.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="4.46.3")  # hypermoe.hf's oldest (pyproject's hf extra)
pytest.importorskip("tokenizers")

import tokenizers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline  # noqa: E402

import hypermoe.hf  # noqa: E402,F401  registers model_type "hypermoe"
import ref  # noqa: E402
from hypermoe.cli import main  # noqa: E402
from hypermoe.hf import HyperMoEForCausalLM, HyperMoEHFConfig, cached_pairs, new_cache  # noqa: E402
from hypermoe.model import HyperMoETransformer  # noqa: E402
from ref import io as ref_io  # noqa: E402
from ref import model as ref_model  # noqa: E402
from ref.config import tiny_config  # noqa: E402
from tests.strategies import magnitude  # noqa: E402
from tests.test_generate import compare_tokens, greedy_decidable  # noqa: E402
from tests.test_model import MARGIN, one_thread  # noqa: E402,F401  one_thread: the autouse fixture

WEIGHT_SCALE = 3.0  # as tests/test_generate.py: × 3 the tiny model's greedy text varies
PROMPTS = [list(b"hello"), list(b"to be or"), [250, 7]]
NEW = 16
# float64 torch (HyperMoETransformer, in any order of prefill and cached steps) vs ref.model: tests/test_model.py's
# bound, 1e-10 relative to the logits' magnitude S (measured ≤ 50 u S = 6e-15 S), valid while every token routes
# with margin ≥ MARGIN
RTOL64 = 1e-10
CACHE_FIELD = hypermoe.hf.CACHE_FIELD  # the output's cache: "cache" (transformers 5) or "past_key_values" (4.x)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what tokenizers' ByteLevel pre-tokenizer emits): the
    printable bytes stand for themselves, the others get the characters 256, 257, … in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def byte_tokenizer() -> tokenizers.Tokenizer:
    """A tokenizer.json whose ids are the UTF-8 bytes (id b = byte b, no merges): hypermoe's byte tokenizer as a
    Hugging Face tokenizer, so that `hypermoe generate --prompt` and transformers' pipeline encode alike."""
    vocab = {char: b for b, char in bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def tiny_params(cfg, dtype=np.float32) -> dict[str, np.ndarray]:
    return {k: (v * WEIGHT_SCALE if v.ndim >= 2 else v).astype(dtype) for k, v in ref_model.init_model(cfg, seed=0).items()}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(cfg, params, model_dir, export_dir): a 2-block byte-vocabulary model (V = 256, context 48) saved as a model
    directory with the byte tokenizer.json, and exported with past key/values."""
    root = tmp_path_factory.mktemp("hf")
    cfg = tiny_config(vocab_size=256, max_seq_len=48)
    params = tiny_params(cfg)
    model_dir, export_dir = root / "model", root / "export"
    ref_io.save_dir(model_dir, cfg, params, "model")
    byte_tokenizer().save(str(model_dir / "tokenizer.json"))
    assert main(["export", str(model_dir), "--with-past", "-o", str(export_dir)]) == 0
    return cfg, params, model_dir, export_dir


def test_bytes_to_unicode_is_tokenizers_alphabet():
    assert set(bytes_to_unicode().values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok = byte_tokenizer()
    text = "héllo, wörld"
    assert tok.encode(text).ids == list(text.encode()) and tok.decode(list(text.encode())) == text


# ---------------------------------------------------------------------------------------------
# The config and the folder
# ---------------------------------------------------------------------------------------------


def test_config_json_is_both_formats(lm):
    _, _, model_dir, _ = lm
    data = json.loads((model_dir / "config.json").read_text())
    assert data["model_type"] == "hypermoe" and data["architectures"] == ["HyperMoEForCausalLM"]
    assert ref_io.read_config(model_dir) == (lm[0], "model")
    config = AutoConfig.from_pretrained(model_dir)
    assert isinstance(config, HyperMoEHFConfig) and config.to_hypermoe() == lm[0]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (16, 2, 2, 256)
    assert config.top_k == 2  # experts per token, not a sampling setting:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.generation_config.top_k is None or model.generation_config.do_sample is False


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "gpt2", "model_type must be 'hypermoe'"),
    ("architectures", ["GPT2LMHeadModel"], "architectures must be"),
    ("eos_token_id", -1, "eos_token_id must be a token id"),
    ("pad_token_id", "0", "pad_token_id must be a token id"),
    ("use_cache", True, "unknown config field"),  # any other field is still an unknown-field error
])
def test_config_json_fields_checked(lm, tmp_path, field, value, match):
    data = json.loads((lm[2] / "config.json").read_text())
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        ref_io.read_config(tmp_path)


def test_refusals(lm, tmp_path):
    cfg, params, _, _ = lm
    ref_io.save_dir(tmp_path / "stack", tiny_config(), ref.init_stack(tiny_config(), seed=0), "stack")
    with pytest.raises(ValueError, match="kind 'model'"):
        HyperMoEForCausalLM.from_pretrained(tmp_path / "stack")
    with pytest.raises(ValueError, match="not a local hypermoe model directory"):
        HyperMoEForCausalLM.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="an ONNX export folder"):
        AutoModelForCausalLM.from_pretrained(lm[3])
    with pytest.raises(ValueError, match="unsupported argument"):
        HyperMoEForCausalLM.from_pretrained(lm[2], quantization_config={})
    with pytest.raises(ValueError, match="inputs_embeds"):
        AutoModelForCausalLM.from_pretrained(lm[2])(inputs_embeds=torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="exceeds config max_seq_len"):
        AutoModelForCausalLM.from_pretrained(lm[2])(torch.zeros(1, 49, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Logits and the cache
# ---------------------------------------------------------------------------------------------


def test_logits_equal_the_transformer_and_ref_with_a_cache(tmp_path):
    """float64: AutoModelForCausalLM's logits over a left-padded batch — one pass, and a prefill then two cached
    steps through a DynamicCache — equal HyperMoETransformer's and ref.model's within RTOL64 · S."""
    cfg = tiny_config(vocab_size=40, max_seq_len=16)
    params = tiny_params(cfg, np.float64)
    ref_io.save_dir(tmp_path / "m", cfg, params, "model", format="safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.float64 and not model.training
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    want, _, results = ref_model.forward(cfg, params, tokens, mask)  # (B, S, V), the definition
    assert all(ref.routing_margins(r.logits, cfg.top_k)[mask == 1].min() >= MARGIN for r in results.values())
    ids, am = torch.from_numpy(tokens), torch.from_numpy(mask)
    bound = RTOL64 * magnitude(want)
    whole = model(ids, attention_mask=am).logits.detach().numpy()
    direct = HyperMoETransformer.from_dir(tmp_path / "m")(ids, attention_mask=am).logits.detach().numpy()
    real = mask == 1
    assert np.abs(whole - want)[real].max() <= bound and np.abs(direct - want)[real].max() <= bound
    cache = new_cache(model.config)  # DynamicCache(config=...) in transformers 5, DynamicCache() in 4.x
    out = model(ids[:, :7], attention_mask=am[:, :7], cache=cache, use_cache=True)
    assert out[CACHE_FIELD] is cache and cache.get_seq_length() == 7
    steps = [out.logits]
    for t in (7, 8):
        steps.append(model(ids[:, t:t + 1], attention_mask=am[:, :t + 1], cache=cache).logits)
    assert cache.get_seq_length() == 9 and cached_pairs(cache)[0][0].shape == (2, cfg.n_heads, 9, cfg.d_model // cfg.n_heads)
    cached = torch.cat(steps, 1).detach().numpy()
    assert np.abs(cached - want)[real].max() <= bound
    legacy = model(ids[:, :7], attention_mask=am[:, :7], past_key_values=None, use_cache=True, cache=None)
    assert isinstance(legacy[CACHE_FIELD], DynamicCache)
    pairs = cached_pairs(legacy[CACHE_FIELD])  # as 4.x's tuple cache
    step = model(ids[:, 7:8], attention_mask=am[:, :8], past_key_values=pairs)
    assert isinstance(step[CACHE_FIELD], tuple) and step[CACHE_FIELD][0][0].shape[2] == 8
    assert np.abs(step.logits.detach().numpy()[:, 0] - want[:, 7])[real[:, 7]].max() <= bound


def test_labels_give_the_next_token_loss(lm):
    model = AutoModelForCausalLM.from_pretrained(lm[2])
    ids = torch.tensor([list(b"hello there")])
    out = model(ids, labels=ids)
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    want = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()
    assert abs(out.loss.item() - want.item()) <= 1e-5 * max(1.0, want.item())  # float32 log-softmax vs float64


# ---------------------------------------------------------------------------------------------
# generate, pipeline and `hypermoe generate`
# ---------------------------------------------------------------------------------------------


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


def cli_greedy(capsys, path, prompt: list[int], *extra) -> list[int]:
    code = main(["generate", str(path), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW),
                 "--print-ids", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [int(i) for i in out.splitlines()[1].split()[1:]]


@pytest.fixture(scope="module")
def hf_tokens(lm):
    model = AutoModelForCausalLM.from_pretrained(lm[2])
    return [hf_greedy(model, p) for p in PROMPTS]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_generate_equals_hypermoe_generate(lm, hf_tokens, capsys, backend):
    """transformers' model.generate (greedy, DynamicCache) gives `hypermoe generate`'s ids on the model directory
    (torch) and on its export --with-past (onnxruntime, CPU) at every decidable step, ≥ 30 of them decidable."""
    cfg, params, model_dir, export_dir = lm
    path, extra = (model_dir, ()) if backend == "torch" else (export_dir, ("--provider", "cpu"))
    theirs = [cli_greedy(capsys, path, p, *extra) for p in PROMPTS]
    same, decided, undecided = compare_tokens(hf_tokens, theirs, greedy_decidable(cfg, params, PROMPTS, hf_tokens))
    assert decided >= 30, f"only {decided} decidable tokens of {same} identical ({undecided})"
    assert len({t for row in hf_tokens for t in row}) >= 3  # not one repeated token


def test_export_folder_carries_tokenizer_and_config(lm, hf_tokens):
    """`hypermoe export MODEL --with-past` copies MODEL's tokenizer.json and writes Optimum's config.json fields;
    onnxruntime-genai's own tokenizer and generator run the folder: the prompt's ids and the greedy ids of
    transformers' generate (at decidable steps)."""
    cfg, params, model_dir, export_dir = lm
    assert (export_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert json.loads((export_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((export_dir / "config.json").read_text())
    assert config == {"model_type": "hypermoe", "num_hidden_layers": 2, "num_attention_heads": 2,
                      "num_key_value_heads": 2, "hidden_size": 16, "vocab_size": 256, "max_position_embeddings": 48,
                      "use_cache": True, "pad_token_id": 0}
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = og.Model(str(export_dir))
    tokenizer = og.Tokenizer(model)
    prompt = [int(t) for t in tokenizer.encode("hello")]
    assert prompt == PROMPTS[0]
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=len(prompt) + NEW, do_sample=False, batch_size=1)
    generator = og.Generator(model, search)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [[int(t) for t in generator.get_sequence(0)][len(prompt):]]
    same, decided, undecided = compare_tokens(theirs, hf_tokens[:1], greedy_decidable(cfg, params, PROMPTS[:1], theirs))
    assert decided >= 10, f"only {decided} decidable tokens of {same} identical ({undecided})"
    assert tokenizer.decode(np.array(prompt, dtype=np.int32)) == "hello"  # (the generated bytes are no valid UTF-8)


def test_pipeline_with_the_folders_tokenizer(lm, hf_tokens):
    pipe = pipeline("text-generation", model=str(lm[2]))
    assert isinstance(pipe.model, HyperMoEForCausalLM)
    text = pipe("hello", max_new_tokens=NEW, do_sample=False)[0]["generated_text"]
    assert text == byte_tokenizer().decode(PROMPTS[0] + hf_tokens[0])
    assert AutoTokenizer.from_pretrained(lm[2])("hello")["input_ids"] == PROMPTS[0]


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_save_pretrained_is_a_model_directory(lm, tmp_path):
    """from_pretrained → save_pretrained → HyperMoETransformer.from_dir / ref.io: the same parameters (copies);
    a transformers-made model → save_pretrained → from_pretrained: the same parameters and token ids."""
    cfg, params, model_dir, _ = lm
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "weights.safetensors").is_file()
    _, saved, kind = ref_io.load_dir(tmp_path / "out")
    assert kind == "model" and saved.keys() == params.keys()
    assert all(np.array_equal(saved[k], params[k]) for k in params)
    back = HyperMoETransformer.from_dir(tmp_path / "out")
    assert back.config == cfg
    with pytest.raises(ValueError, match="--force"):
        model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out", safe_serialization=False, force=True)
    assert (tmp_path / "out" / "weights.npz").is_file() and not (tmp_path / "out" / "weights.safetensors").exists()

    torch.manual_seed(1)
    fresh = HyperMoEForCausalLM(HyperMoEHFConfig.from_hypermoe(cfg, eos_token_id=10, pad_token_id=0))
    fresh.save_pretrained(tmp_path / "fresh")
    data = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert (data["eos_token_id"], data["pad_token_id"]) == (10, 0) and "bos_token_id" not in data
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh")
    assert loaded.config.eos_token_id == 10 and loaded.generation_config.eos_token_id == 10
    a, b = fresh.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    HyperMoETransformer.from_dir(tmp_path / "fresh")  # and hypermoe reads it


def test_dtype_and_device_arguments(lm):
    model = AutoModelForCausalLM.from_pretrained(lm[2], dtype=torch.float64)
    assert model.dtype == torch.float64
    assert AutoModelForCausalLM.from_pretrained(lm[2], dtype="auto").dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(lm[2], device_map="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="dtype"):
        AutoModelForCausalLM.from_pretrained(lm[2], dtype=torch.int32)


def test_hf_generators_script_agrees(lm):
    """scripts/hf_generators.py on the tiny model: hypermoe generate (torch, onnxruntime), transformers generate and
    pipeline, onnxruntime-genai — each one's ids equal transformers' generate at every decidable step."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("hf_generators", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "hf_generators.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg, params, model_dir, export_dir = lm
    results = script.generators(model_dir, "hello", NEW, export_dir)
    assert len(results) >= 4 and results["transformers pipeline"][1].startswith("hello")
    want = results["transformers generate"][0]
    decidable = greedy_decidable(cfg, params, PROMPTS[:1], [want])
    for name, (ids, _) in results.items():
        same, decided, undecided = compare_tokens([ids], [want], decidable)
        assert decided >= 10, f"{name}: only {decided} decidable tokens of {same} identical ({undecided})"
