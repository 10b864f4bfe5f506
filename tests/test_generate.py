"""export/generate.py: OrtDecoder (onnxruntime, IOBinding) against the torch decoder and the reference, and the
`hypermoe generate` command.

Token equality between two implementations is gated: at each step, ref (float64) on the generated sequence
gives the logits and export.verify.expected their error bound δ for a float32 implementation (its measured
float32 rounding × 4 + a floor, verify's docstring), valid while every token's routing margin is ≥
verify.MARGIN_FACTOR ε_t. A greedy step is decidable when ref's top-2 gap exceeds 2δ (each side within δ of
ref cannot reorder them); a sampled step when every cdf value is farther than e^{2δ/T} - 1 from the uniform
draw (a logit error ≤ δ scales each probability by at most e^{±2δ/T}). Tokens must agree at decidable steps;
the first difference at an undecidable step ends that row's comparison (reported, neither pass nor fail).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.exporter import export_model
from export.generate import ByteTokenizer, OrtDecoder, export_token_ids, onnx_file, parse_ids
from export.verify import MARGIN_FACTOR, expected
from hypermoe.cli import main
from hypermoe.generation import Sampling, generate, left_pad
from ref import io as ref_io
from ref.config import tiny_config
from ref.model import init_model

WEIGHT_SCALE = 3.0  # matrices × 3: the default init's tiny model repeats one token; × 3 its greedy text varies
EOS_ID = 299  # declared in the export's genai_config.json; never produced by this model's greedy runs below


def tiny_lm(root: Path, *, eos_token_id: int | None = None, vocab_size: int = 300) -> tuple:
    """(cfg, params, model_dir, export_dir): a 2-block model (V = 300 by default: not bytes, so `generate` needs
    --prompt-ids or a tokenizer; 256: the byte vocabulary; context 48), saved as a model directory and exported
    with past key/values."""
    cfg = tiny_config(vocab_size=vocab_size, max_seq_len=48)
    params = {k: v * WEIGHT_SCALE if v.ndim >= 2 else v for k, v in init_model(cfg, seed=0).items()}
    model_dir, export_dir = root / "model", root / "export"
    ref_io.save_dir(model_dir, cfg, params, "model")
    export_model(export_dir, cfg, params, kind="model", with_past=True, eos_token_id=eos_token_id, pad_token_id=0)
    return cfg, params, model_dir, export_dir


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm"), eos_token_id=EOS_ID)


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("byte_lm"), vocab_size=256)


@pytest.fixture(scope="module")
def torch_decoder(lm):
    from hypermoe.model import HyperMoETransformer, TorchDecoder

    return TorchDecoder(HyperMoETransformer.from_dir(lm[2]).eval(), use_cache=True)


@pytest.fixture(scope="module")
def ort_decoder(lm):
    return OrtDecoder(lm[3], "cpu")


# ---------------------------------------------------------------------------------------------
# The gate (module docstring)
# ---------------------------------------------------------------------------------------------


def step_logits(cfg, params, prompts, tokens, dtype="float32"):
    """ref's logits (float64) before each generated token, their bound δ for an export in `dtype` and whether
    every token so far routes with margin ≥ MARGIN_FACTOR ε_t: ([(n_b, V)], δ, [(n_b,) bool]) per row b of n_b
    generated tokens."""
    seqs = [list(p) + list(t[:-1]) for p, t in zip(prompts, tokens)]
    full, mask = left_pad(seqs, 0)  # (B, M)
    want = expected(cfg, params, "model", full, dtype, attention_mask=mask)
    routed = np.minimum.accumulate(want.margins, axis=1) >= MARGIN_FACTOR  # (B, M) every real token so far
    logits, ok = [], []
    for b, (p, t) in enumerate(zip(prompts, tokens)):
        first = full.shape[1] - len(seqs[b]) + len(p) - 1  # the column whose logits chose t[0]
        logits.append(want.values["logits"][b, first:first + len(t)])
        ok.append(routed[b, first:first + len(t)])
    return logits, want.bounds["logits"], ok


def compare_tokens(got, want, decidable) -> tuple[int, int, list[str]]:
    """(identical tokens, of which decidable, undecidable first differences); AssertionError at a decidable one."""
    same = decided = 0
    undecided = []
    for b, (g, w) in enumerate(zip(got, want)):
        for n in range(min(len(g), len(w))):
            if g[n] != w[n]:
                assert not decidable[b][n], f"row {b} step {n}: tokens {g[n]} != {w[n]} at a decidable step"
                undecided.append(f"row {b} step {n}")
                break
            same += 1
            decided += bool(decidable[b][n])
        else:
            assert len(g) == len(w) or not decidable[b][min(len(g), len(w)) - 1], f"row {b}: lengths {len(g)} != {len(w)}"
    return same, decided, undecided


def greedy_decidable(cfg, params, prompts, tokens, dtype="float32"):
    logits, bound, routed = step_logits(cfg, params, prompts, tokens, dtype)
    out = []
    for z, ok in zip(logits, routed):
        top2 = -np.sort(-z, axis=-1)[:, :2]  # (n, 2)
        out.append((top2[:, 0] - top2[:, 1] > 2 * bound) & ok)
    return out


PROMPTS = [list(b"hello"), [1, 2], [250]]  # unequal lengths: left padding; "Hello": "H" routes on a near-tie


# ---------------------------------------------------------------------------------------------
# OrtDecoder
# ---------------------------------------------------------------------------------------------


def greedy_tokens_equal_torch(lm, decoder, torch_decoder) -> list[list[int]]:
    """24 greedy tokens of PROMPTS from `decoder` equal torch's at every decidable step, ≥ 60 of them decidable;
    → the tokens (also tests/test_generate_cuda.py)."""
    cfg, params, _, _ = lm
    got = generate(decoder, PROMPTS, max_new_tokens=24, max_length=cfg.max_seq_len).tokens
    want = generate(torch_decoder, PROMPTS, max_new_tokens=24, max_length=cfg.max_seq_len).tokens
    same, decided, undecided = compare_tokens(got, want, greedy_decidable(cfg, params, PROMPTS, got))
    assert decided >= 60, f"only {decided} decidable tokens of {same} identical ({undecided}): the test says little"
    return got


def test_greedy_tokens_equal_torch(lm, ort_decoder, torch_decoder):
    got = greedy_tokens_equal_torch(lm, ort_decoder, torch_decoder)
    assert len(set(map(tuple, got))) == 3 and len({t for row in got for t in row}) >= 3  # not one repeated token


@pytest.mark.parametrize("onnx_type", [1, 10, 16])  # float, float16, bfloat16 (carried as uint16 bits)
def test_last_position_copy(onnx_type):
    """_last_position copies the last position's rows out of (B, S, V) logits: a memory copy, so exact."""
    import onnxruntime as ort

    from export.generate import _last_position
    from export.runtime import from_bfloat16_bits, to_bfloat16_bits

    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)  # (B, S, V)
    host = {1: x, 10: x.astype(np.float16), 16: to_bfloat16_bits(x)}[onnx_type]
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), onnx_type, "cpu", 0)
    value.update_inplace(host)
    want = from_bfloat16_bits(host[:, -1]) if onnx_type == 16 else host[:, -1].astype(np.float32)
    got = _last_position(value, onnx_type)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_each_step_logits_within_bound_of_ref(lm, ort_decoder):
    check_step_logits(lm, ort_decoder)


def check_step_logits(lm, decoder):
    """Prefill a left-padded batch, then one token per step with the cache fed back on the device: every step's
    last-position logits equal ref's one full pass (float64) within the bound, on rows whose routing is decided."""
    cfg, params, _, _ = lm
    ort_decoder = decoder
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 12))  # (B, L)
    mask = np.ones_like(ids)
    mask[1, :4], mask[2, :11] = 0, 0
    positions = np.where(mask != 0, np.cumsum(mask, axis=1) - 1, 0)
    want = expected(cfg, params, "model", ids, "float32", attention_mask=mask)
    routed = np.minimum.accumulate(want.margins, axis=1) >= MARGIN_FACTOR  # (B, L)
    S0 = 6
    ort_decoder.begin(3, 12)
    got = [ort_decoder.step(ids[:, :S0], mask[:, :S0], positions[:, :S0])]  # (B, V) at column S0 - 1
    for t in range(S0, 12):
        got.append(ort_decoder.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1]))
    got = np.stack(got, axis=1)  # (B, 7, V): columns S0 - 1 … 11
    ref_logits = want.values["logits"][:, S0 - 1:]
    check = (mask[:, S0 - 1:] != 0) & routed[:, S0 - 1:]  # (B, 7) real and decided positions
    assert check.sum() >= 14
    err = np.abs(got - ref_logits).max(axis=-1)[check]
    assert err.max() <= want.bounds["logits"], f"max |ort - ref| {err.max():.3g} > bound {want.bounds['logits']:.3g}"
    assert got.dtype == np.float32 and got.shape[-1] == cfg.vocab_size


def test_all_positions_option(lm):
    """step(..., all_positions=True) (what verify compares) returns every position's logits the graph computes
    ((B, 1, V) from this export, logits "last"; tests/test_export_past.py runs an "all" one): its last position is
    exactly the default step's (B, V), on the prefill and on a decode step's refilled buffer."""
    cfg = lm[0]
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 6))
    mask, positions = np.ones_like(ids), np.broadcast_to(np.arange(6), (2, 6))
    last, full = OrtDecoder(lm[3], "cpu"), OrtDecoder(lm[3], "cpu")
    for decoder in (last, full):
        decoder.begin(2, 6)
    for a, b in ((0, 4), (4, 5), (5, 6)):  # prefill of 4, then two one-token steps
        want = last.step(ids[:, a:b], mask[:, :b], positions[:, a:b])  # (B, V)
        got = full.step(ids[:, a:b], mask[:, :b], positions[:, a:b], all_positions=True)  # (B, S, V)
        assert full.logits == "last" and got.shape == (2, 1, cfg.vocab_size) and got.dtype == np.float32
        assert np.array_equal(got[:, -1], want)
    assert full.cache_shapes == last.cache_shapes == [(2, cfg.n_heads, 6, cfg.d_model // cfg.n_heads)] * (2 * cfg.n_layers)
    kept = got.copy()
    full.begin(2, 6)
    full.step(ids[:, :4], mask[:, :4], positions[:, :4])
    full.step(ids[:, 4:5], mask[:, :5], positions[:, 4:5])  # refills the decode steps' logits buffer
    assert np.array_equal(got, kept)  # a copy, not a view of that buffer


def test_sampled_tokens_equal_torch(lm, ort_decoder, torch_decoder):
    cfg, params, _, _ = lm
    sampling = Sampling(temperature=0.8, seed=7)
    steps = 16
    got = generate(ort_decoder, PROMPTS, max_new_tokens=steps, sampling=sampling).tokens
    want = generate(torch_decoder, PROMPTS, max_new_tokens=steps, sampling=sampling).tokens
    logits, bound, routed = step_logits(cfg, params, PROMPTS, got)
    eta = np.expm1(2 * bound / sampling.temperature)  # the largest change of any cdf value (module docstring)
    rng = np.random.default_rng(sampling.seed)
    draws = np.stack([rng.random(len(PROMPTS)) for _ in range(steps)], axis=1)  # (B, steps): next_tokens' draws
    decidable = []
    for b, (z, ok) in enumerate(zip(logits, routed)):
        p = np.exp((z - z.max(axis=-1, keepdims=True)) / sampling.temperature)
        cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)  # (n, V)
        decidable.append((np.abs(cdf - draws[b, :len(z), None]).min(axis=-1) > eta) & ok)
    same, decided, undecided = compare_tokens(got, want, decidable)
    assert decided >= 30, f"only {decided} decidable of {same} identical ({undecided})"


def test_eos_stops_a_row(lm, ort_decoder):
    cfg = lm[0]
    free = generate(ort_decoder, PROMPTS, max_new_tokens=8).tokens
    eos = free[0][1]  # row 0's second token
    stopped = generate(ort_decoder, PROMPTS, max_new_tokens=8, eos_token_ids=[eos]).tokens
    for row, full in zip(stopped, free):  # each row: up to and including its first EOS (same backend, same logits)
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]
    assert len(stopped[0]) <= 2 < len(free[0]) and cfg.vocab_size > eos


def test_decoder_refuses_bad_steps(lm, ort_decoder):
    cfg = lm[0]
    one = np.ones((1, 1), dtype=np.int64)
    fresh = OrtDecoder(lm[3] / "model.onnx", "cpu")
    with pytest.raises(ValueError, match="begin"):
        fresh.step(one, one, one * 0)
    ort_decoder.begin(1, 4)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ort_decoder.step(one, np.ones((1, 2), dtype=np.int64), one * 0)
    with pytest.raises(ValueError, match="token ids must be in"):
        ort_decoder.step(one * cfg.vocab_size, one, one * 0)
    with pytest.raises(ValueError, match="position ids"):
        ort_decoder.step(one, one, one * cfg.max_seq_len)
    with pytest.raises(ValueError, match="max_length"):
        ort_decoder.step(np.ones((1, 5), dtype=np.int64), np.ones((1, 5), dtype=np.int64), np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="max_length must be"):
        ort_decoder.begin(1, cfg.max_seq_len + 1)


def test_export_directory_resolution(lm, tmp_path):
    export_dir = lm[3]
    assert onnx_file(export_dir) == export_dir / "model.onnx"
    assert export_token_ids(export_dir) == ((EOS_ID,), 0)
    assert export_token_ids(export_dir / "model.onnx") == ((EOS_ID,), 0)  # the genai_config.json beside it
    assert export_token_ids(lm[2]) == ((), 0)  # a model directory
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "../x.onnx"}}}))
    with pytest.raises(ValueError, match="filename must be a file name"):
        onnx_file(bad)
    (bad / "genai_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        onnx_file(bad)


def test_byte_tokenizer_round_trip_and_partial_utf8():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    assert tok.decode(tok.encode("✓")[:2]) == "\ufffd"  # a cut UTF-8 sequence: replaced, no error
    assert tok.decode([104, 300, 105]) == "h\ufffdi"  # an id beyond the bytes
    assert parse_ids("1, 2,3", "x") == [1, 2, 3]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_ids("1,a", "x")


# ---------------------------------------------------------------------------------------------
# hypermoe generate
# ---------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_text_prompt_on_both_backends(byte_lm, capsys):
    cfg, params, model_dir, export_dir = byte_lm
    prompt = list("hello".encode())
    direct = generate(OrtDecoder(export_dir, "cpu"), [prompt], max_new_tokens=12).tokens[0]
    code, out, _ = run_cli(capsys, export_dir, "--prompt", "hello", "--max-new-tokens", 12, "--print-ids",
                           "--provider", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ByteTokenizer().decode(prompt + direct)
    assert lines[1] == "ids: " + " ".join(map(str, direct))  # same backend, inputs and threads: same tokens
    assert "onnxruntime" in out and "CPU" in out and "prefill" in out and "decode" in out and "p90" in out
    assert "tokenizer UTF-8 bytes" in out
    code, out, _ = run_cli(capsys, model_dir, "--prompt", "hello", "--max-new-tokens", 12, "--print-ids")
    assert code == 0 and "torch" in out
    torch_ids = [int(i) for i in out.splitlines()[1].split()[1:]]
    compare_tokens([torch_ids], [direct], greedy_decidable(cfg, params, [prompt], [torch_ids]))


def test_cli_prompt_ids_batch_and_onnx_file(lm, capsys):
    export_dir = lm[3]
    code, out, _ = run_cli(capsys, export_dir / "model.onnx", "--prompt-ids", "1,2,3", "--max-new-tokens", 5,
                           "--batch", 3, "--print-ids", "--provider", "cpu")
    assert code == 0
    ids = next(line for line in out.splitlines() if line.startswith("ids:"))
    assert "batch 3 × prompt 3 tokens" in out and len(ids.split()) == 6


def test_cli_tokenizer_json(lm, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    words = "the cat sat on a mat and dog ran far".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    code, out, _ = run_cli(capsys, lm[3], "--prompt", "the cat sat", "--tokenizer", path, "--max-new-tokens", 4,
                           "--print-ids", "--provider", "cpu")
    assert code == 0
    assert out.startswith("the cat sat")
    assert "prompt 3 tokens" in out


def test_cli_errors(lm, byte_lm, tmp_path, capsys, monkeypatch):
    cfg, _, model_dir, export_dir = lm
    bytes_dir = byte_lm[3]  # text prompts: a byte-vocabulary model
    plain = onnx.load(str(export_dir / "model.onnx"))
    keep = [p for p in plain.metadata_props if p.key != "hypermoe.with_past"]
    del plain.metadata_props[:]
    plain.metadata_props.extend(keep)
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    (tmp_path / "garbage.json").write_text("{]")
    cases = [
        ((tmp_path / "missing", "--prompt", "x"), "no such file or directory"),
        ((tmp_path / "plain.onnx", "--prompt", "x"), "not a with-past export"),
        ((bytes_dir, "--prompt", "x" * cfg.max_seq_len), "exceeds the model's context"),
        ((export_dir, "--prompt-ids", "1,2", "--max-new-tokens", cfg.max_seq_len), "exceeds the model's context"),
        ((export_dir, "--prompt-ids", f"1,{cfg.vocab_size}"), "vocab_size"),
        ((export_dir, "--prompt-ids", "1,-2"), "comma-separated integers|token ids ≥ 0"),
        ((export_dir, "--prompt", "x", "--temperature", "-1"), "temperature"),
        ((export_dir, "--prompt", "x", "--temperature", "1", "--top-p", "0"), "top_p"),
        ((export_dir, "--prompt", "x", "--top-k", "-1"), "top_k"),
        ((export_dir, "--prompt", "x", "--max-new-tokens", "0"), "max-new-tokens"),
        ((bytes_dir, "--prompt", "x", "--eos-id", 256), "eos-id"),
        ((bytes_dir, "--prompt", ""), "no tokens"),
        ((export_dir, "--prompt", "x"), r"vocabulary has 300 ids, not the 256 bytes .*: give --tokenizer "
                                        r"tokenizer\.json \(the model's own\), or --prompt-ids"),
        ((model_dir, "--prompt", "x"), "vocabulary has 300 ids"),
        ((export_dir, "--prompt", "x", "--tokenizer", tmp_path), "is a directory without a tokenizer.json"),
        ((export_dir, "--prompt", "x", "--tokenizer", tmp_path / "none.json"), "no such file"),
        ((export_dir, "--prompt", "x", "--tokenizer", tmp_path / "garbage.json"), "tokenizers package can read"),
        ((model_dir, "--prompt", "x", "--provider", "cuda"), "torch"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv, *(("--provider", "cpu") if "--provider" not in argv else ()))
        assert code == 2, (argv, out, err)
        assert err.startswith("hypermoe generate: error:") and len(err.strip().splitlines()) == 1, (argv, err)
        assert __import__("re").search(message, err), (argv, err)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if not installed
    code, _, err = run_cli(capsys, export_dir, "--prompt", "x", "--tokenizer", tmp_path / "garbage.json")
    assert code == 2 and "pip install 'hypermoe[serve]'" in err


def test_cli_no_tokenizer_prints_ids(lm, capsys):
    """A model whose vocabulary is not bytes, given --prompt-ids and no tokenizer: the output is the ids, never
    their bytes decoded as text."""
    code, out, _ = run_cli(capsys, lm[3], "--prompt-ids", "1,2,3", "--max-new-tokens", 4, "--provider", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("ids: ") and len(lines[0].split()) == 5 and "tokenizer none (ids only)" in out


def test_cli_tokenizer_of_the_model_folder(lm, tmp_path, capsys):
    """tokenizer.json beside the model (its export or model directory) is used without --tokenizer; --tokenizer
    also takes that directory."""
    tokenizers = pytest.importorskip("tokenizers")
    import shutil

    words = "the cat sat on a mat and dog ran far".split()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    export_dir = tmp_path / "export"
    shutil.copytree(lm[3], export_dir)
    tok.save(str(export_dir / "tokenizer.json"))
    for argv in ((export_dir,), (export_dir / "model.onnx",), (lm[3], "--tokenizer", export_dir)):
        code, out, err = run_cli(capsys, *argv, "--prompt", "the cat sat", "--max-new-tokens", 3, "--provider", "cpu")
        assert code == 0, (argv, err)
        assert out.startswith("the cat sat") and f"tokenizer {export_dir / 'tokenizer.json'}" in out, (argv, out)
