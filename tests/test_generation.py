"""hypermoe.generation (the loop, sampling) and the KV-cache decoding of hypermoe.model (TorchDecoder, generate):
the loop's inputs on a scripted decoder, sampling by construction and by frequency, and greedy decoding with the
cache against no cache and against ref.model's full passes (the definition) on random small configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ref
from ref import model as ref_model
from hypermoe.generation import GenerationResult, Sampling, generate, left_pad, next_tokens, token_probabilities
from hypermoe.model import HyperMoETransformer, TorchDecoder
from tests.strategies import U32, magnitude
from tests.test_model import MARGIN, model_configs, one_thread  # noqa: F401  one_thread: the autouse fixture

# float64 torch vs ref.model, the same math in another order: tests/test_model.py's bound (1e-10 S, measured
# ≤ 50 u S = 6e-15 S); TorchDecoder hands float32 logits to the loop, each off by a further ≤ U32 · S
TORCH_RTOL = 1e-10


# ---------------------------------------------------------------------------------------------
# The loop, on a scripted decoder
# ---------------------------------------------------------------------------------------------


class Scripted:
    """A Decoder whose next token is (last input token + 1) mod V; it records every call."""

    def __init__(self, V: int = 10):
        self.V, self.calls, self.begun = V, [], []

    def begin(self, batch_size, max_length):
        self.begun.append((batch_size, max_length))

    def step(self, input_ids, attention_mask, position_ids):
        self.calls.append((input_ids.copy(), attention_mask.copy(), position_ids.copy()))
        logits = np.zeros((input_ids.shape[0], self.V), dtype=np.float32)
        logits[np.arange(input_ids.shape[0]), (input_ids[:, -1] + 1) % self.V] = 10.0
        return logits


def test_loop_left_pads_feeds_positions_and_stops_at_eos():
    decoder = Scripted()
    result = generate(decoder, [[1, 2, 3], [5]], max_new_tokens=6, eos_token_ids=[6], pad_token_id=9)
    assert decoder.begun == [(2, 9)]
    assert result.tokens == [[4, 5, 6], [6]]  # the EOS is included; row 1 stopped at its first token
    (ids, mask, pos), (ids1, mask1, pos1), (ids2, mask2, pos2) = decoder.calls  # prefill + 2 steps: all done
    np.testing.assert_array_equal(ids, [[1, 2, 3], [9, 9, 5]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 0, 0]])  # real tokens before each; padding 0
    np.testing.assert_array_equal(ids1, [[4], [6]])  # the EOS is fed like any new token (Hugging Face's loop)
    np.testing.assert_array_equal(mask1, [[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(pos1, [[3], [1]])
    np.testing.assert_array_equal(ids2, [[5], [9]])  # after it, a finished row is fed pad_token_id
    np.testing.assert_array_equal(pos2, [[4], [2]])
    assert all(a.dtype == np.int64 for call in decoder.calls for a in call)
    assert result.prompt_tokens == 6 and len(result.step_seconds) == 2
    assert result.decode_seconds == pytest.approx(sum(result.step_seconds))
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.latency_ms == pytest.approx(1e3 * float(np.median(result.step_seconds)))


def test_loop_runs_max_new_tokens_without_eos():
    decoder = Scripted()
    result = generate(decoder, [[0], [3, 4]], max_new_tokens=4)
    assert result.tokens == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert len(decoder.calls) == 4 and len(result.step_seconds) == 3  # the last token is never fed
    empty = generate(decoder, [[0]], max_new_tokens=0)
    assert empty.tokens == [[]] and math.isnan(empty.latency_ms) and math.isnan(empty.decode_tokens_per_s)


@pytest.mark.parametrize("call, match", [
    (lambda d: generate(d, [], max_new_tokens=1), "prompts must be a non-empty sequence"),
    (lambda d: generate(d, "abc", max_new_tokens=1), "prompts must be a non-empty sequence"),
    (lambda d: generate(d, [[1], []], max_new_tokens=1), "prompt 1 must be a non-empty sequence"),
    (lambda d: generate(d, [[1, -2]], max_new_tokens=1), "prompt 0 token ids must be an int ≥ 0"),
    (lambda d: generate(d, [[1.5]], max_new_tokens=1), "prompt 0 token ids must be an int ≥ 0"),
    (lambda d: generate(d, [[1]], max_new_tokens=-1), "max_new_tokens must be an int ≥ 0"),
    (lambda d: generate(d, [[1]], max_new_tokens=True), "max_new_tokens must be an int ≥ 0"),
    (lambda d: generate(d, [[1]], max_new_tokens=1, pad_token_id=-1), "pad_token_id must be an int ≥ 0"),
    (lambda d: generate(d, [[1]], max_new_tokens=1, eos_token_ids=3), "eos_token_ids must be a sequence"),
    (lambda d: generate(d, [[1, 2]], max_new_tokens=3, max_length=4),
     r"longest prompt \(2 tokens\) \+ max_new_tokens \(3\) exceeds the context length 4"),
    (lambda d: generate(d, [[1]], max_new_tokens=1, sampling={"temperature": 1}), "sampling must be"),
    (lambda d: Sampling(temperature=-1.0), "temperature must be a finite number ≥ 0"),
    (lambda d: Sampling(temperature=float("nan")), "temperature must be a finite number ≥ 0"),
    (lambda d: Sampling(top_k=-1), "top_k must be an int ≥ 0"),
    (lambda d: Sampling(top_k=2.0), "top_k must be an int ≥ 0"),
    (lambda d: Sampling(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda d: Sampling(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda d: Sampling(seed=-3), "seed must be an int ≥ 0"),
    (lambda d: next_tokens(np.zeros(4), Sampling(), np.random.default_rng(0)), r"logits must have shape \(B, V\)"),
    (lambda d: next_tokens(np.zeros((1, 4), dtype=np.int64), Sampling(), np.random.default_rng(0)),
     "logits must be a floating-point"),
    (lambda d: next_tokens(np.full((1, 4), np.nan), Sampling(temperature=1.0), np.random.default_rng(0)), "NaN"),
    (lambda d: token_probabilities(np.zeros((1, 4)), Sampling()), "needs temperature > 0"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call(Scripted())
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_greedy_ties_go_to_the_lowest_id():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    rng = np.random.default_rng(0)
    for sampling in (Sampling(), Sampling(temperature=0.7, top_k=1), Sampling(temperature=2.0, top_p=1e-9)):
        np.testing.assert_array_equal(next_tokens(logits, sampling, rng), [1, 0], err_msg=str(sampling))


@st.composite
def sampling_cases(draw):
    """(logits (B, V) float64 with exact ties mixed in, Sampling with temperature > 0)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    B, V = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    logits = rng.standard_normal((B, V)) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    if V > 1 and draw(st.booleans()):
        logits[:, 1] = logits[:, 0]  # an exact tie
    sampling = Sampling(temperature=draw(st.sampled_from([0.25, 1.0, 3.0])), top_k=draw(st.integers(0, V + 1)),
                        top_p=draw(st.sampled_from([1e-6, 0.3, 0.9, 1.0])), seed=draw(st.integers(0, 100)))
    return logits, sampling


@settings(max_examples=50)
@given(sampling_cases())
def test_token_probabilities_by_construction(case):
    """The kept ids are the top_k most likely (ties → lower ids first), then the shortest such prefix reaching top_p
    of their mass; among kept ids the probabilities are softmax(logits / T) renormalised."""
    logits, sampling = case
    probs = token_probabilities(logits, sampling)
    B, V = logits.shape
    # float64 softmax and normalisation: each probability within a few ulps; 64 u covers V ≤ 12 summands
    tol = 64 * 2.0**-53
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=tol)
    for b in range(B):
        order = np.lexsort((np.arange(V), -logits[b]))  # most likely first, ties → lower id
        full = np.exp((logits[b] - logits[b].max()) / sampling.temperature)
        full /= full.sum()
        ranked = full[order]
        n = V if sampling.top_k == 0 else min(sampling.top_k, V)
        mass = np.cumsum(ranked[:n])
        # nucleus: the first m ranked ids, m the smallest with mass ≥ top_p · (mass of the top-k)
        m = n if sampling.top_p >= 1 else int(np.argmax(mass >= sampling.top_p * mass[-1] * (1 - tol))) + 1
        kept = order[:m]
        assert set(np.flatnonzero(probs[b])) <= set(kept)
        want = np.zeros(V)
        want[kept] = full[kept] / full[kept].sum()
        np.testing.assert_allclose(probs[b], want, rtol=1e-12, atol=tol)


@settings(max_examples=30)
@given(sampling_cases())
def test_sampling_is_seeded_and_draws_only_kept_ids(case):
    logits, sampling = case
    draws = [next_tokens(logits, sampling, np.random.default_rng(sampling.seed)) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    probs = token_probabilities(logits, sampling)
    assert (probs[np.arange(len(logits)), draws[0]] > 0).all()
    assert draws[0].dtype == np.int64


def test_sampling_frequencies_match_the_distribution():
    """20 000 draws (one batch of copies of a row, seed 0) against token_probabilities: each id's frequency within
    5 binomial standard deviations sqrt(p (1 − p) / n) (+ 1/n for p near 0), so a correct sampler passes for
    nearly every seed (P(|z| > 5) < 6e-7 per id), and a wrong temperature or filter (≥ 0.02 off) fails."""
    logits = np.tile(np.array([2.0, 1.0, 1.0, 0.0, -1.0, 0.5]), (20000, 1))
    for sampling in (Sampling(temperature=1.0), Sampling(temperature=0.5, top_k=4),
                     Sampling(temperature=2.0, top_p=0.7)):
        p = token_probabilities(logits[:1], sampling)[0]
        tokens = next_tokens(logits, sampling, np.random.default_rng(0))
        freq = np.bincount(tokens, minlength=len(p)) / len(tokens)
        bound = 5 * np.sqrt(p * (1 - p) / len(tokens)) + 1 / len(tokens)
        assert (np.abs(freq - p) <= bound).all(), (sampling, freq, p)


# ---------------------------------------------------------------------------------------------
# KV-cache decoding against no cache and against ref.model
# ---------------------------------------------------------------------------------------------


def ref_greedy(cfg, params, prompts, n: int):
    """The definition: n greedy tokens per prompt, each from one full ref.model pass over the left-padded prompts
    and the tokens so far. → (tokens (B, n), smallest top-2 logit gap relative to the logits' magnitude,
    whether every real token of the final pass routes with margin ≥ MARGIN)."""
    ids, mask = left_pad(prompts, 0)
    gap = np.inf
    for _ in range(n):
        logits, _, results = ref_model.forward(cfg, params, ids, mask)
        last = logits[:, -1]  # (B, V)
        top2 = -np.sort(-last, axis=-1)[:, :2]
        if last.shape[1] > 1:
            gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()) / magnitude(last))
        ids = np.concatenate([ids, last.argmax(-1)[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    real = mask[:, :-1] == 1
    routed = all(ref.routing_margins(r.logits, cfg.top_k)[real].min() >= MARGIN for r in results.values())
    return ids[:, -n:], gap, routed


@settings(max_examples=25)
@given(st.integers(4, 12).flatmap(lambda V: model_configs(capacity=False, max_seq_len=12, vocab_size=V)),
       st.integers(0, 2**32 - 1), st.data())
def test_greedy_with_cache_equals_no_cache_and_ref(cfg, seed, data):
    """8 greedy tokens of a left-padded batch: with the cache, without, and ref's full passes give the same ids,
    asserted when every step's top-2 gap exceeds both runs' error (2 (1e-10 + U32) S: the float64 bound plus the
    float32 rounding of the decoder's logits) and every real token routes with margin ≥ MARGIN; else redrawn."""
    params = ref_model.init_model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=data.draw(st.integers(1, 4))).tolist()
               for _ in range(data.draw(st.integers(1, 3)))]
    want, gap, routed = ref_greedy(cfg, params, prompts, 8)
    assume(routed and gap > 2 * (TORCH_RTOL + U32))
    model = HyperMoETransformer.from_ref(cfg, params).eval()
    for use_cache in (True, False):
        result = generate(TorchDecoder(model, use_cache=use_cache), prompts, max_new_tokens=8,
                          max_length=cfg.max_seq_len)
        np.testing.assert_array_equal(np.array(result.tokens), want, err_msg=f"use_cache={use_cache}")


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_tie_goes_to_the_lower_expert_with_and_without_cache(top_k):
    """Experts 1 and 2 get zero router columns and the same bias 10 (exact: 0 · x sums to 0 in any order), expert 0
    bias 20 when k = 2: every token ties at the k-th place, and SPEC §3.2 selects the lower index (1) in ref, in a
    full torch pass, in every cached step and in the no-cache recomputation."""
    cfg = ref.tiny_config(n_layers=2, n_experts=4, top_k=top_k, router_bias=True, max_seq_len=16, vocab_size=16)
    params = ref_model.init_model(cfg, seed=4)
    for block in ref_model.moe_blocks(cfg):
        w, b = params[f"blocks.{block}.moe.router.weight"], params[f"blocks.{block}.moe.router.bias"]
        w[:, :3] = 0.0
        b[:3] = [20.0, 10.0, 10.0] if top_k == 2 else [-30.0, 10.0, 10.0]
    want_selected = [0, 1] if top_k == 2 else [1]
    prompts = [[3, 1, 4, 1], [5, 9]]
    tokens, gap, _ = ref_greedy(cfg, params, prompts, 8)
    assert gap > 2 * (TORCH_RTOL + U32)  # this fixed case's greedy tokens are unambiguous
    ids, mask = left_pad(prompts, 0)
    full = np.concatenate([ids, tokens], axis=1)
    mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    for result in ref_model.forward(cfg, params, full, mask)[2].values():
        assert (result.selected == want_selected).all()

    model = HyperMoETransformer.from_ref(cfg, params).eval()
    seen = []  # every routing a step computed
    for block in model.blocks:
        block.moe.register_forward_hook(lambda module, args, out: seen.append(out.routing.selected))
    for use_cache in (True, False):
        seen.clear()
        result = generate(TorchDecoder(model, use_cache=use_cache), prompts, max_new_tokens=8)
        np.testing.assert_array_equal(np.array(result.tokens), tokens)
        assert len(seen) == 2 * 8 and all((s == torch.tensor(want_selected)).all() for s in seen)


def test_model_generate_with_mask_eos_and_sampling():
    cfg = ref.tiny_config(max_seq_len=16, vocab_size=16)
    params = ref_model.init_model(cfg, seed=6)
    model = HyperMoETransformer.from_ref(cfg, params).train()
    prompts = [[3, 1, 4, 1], [5, 9]]
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, 0))
    want, gap, routed = ref_greedy(cfg, params, prompts, 6)
    assert routed and gap > 2 * (TORCH_RTOL + U32)
    out = model.generate(ids, 6, attention_mask=mask)
    assert model.training and out.shape == (2, 10) and torch.equal(out[:, :4], ids)
    np.testing.assert_array_equal(out[:, 4:].numpy(), want)
    assert torch.equal(model.generate(ids, 6, attention_mask=mask, use_cache=False), out)
    # EOS: row 0 stops at its first `eos`, then its row is filled with pad_token_id
    eos = int(want[0, 1])
    stopped = model.generate(ids, 6, attention_mask=mask, eos_token_id=eos, pad_token_id=15)
    first = [list(row).index(eos) + 1 if eos in row else 6 for row in want.tolist()]
    assert stopped.shape == (2, 4 + max(first))
    for b in range(2):
        assert stopped[b, 4:4 + first[b]].tolist() == want[b, :first[b]].tolist()
        assert (stopped[b, 4 + first[b]:] == 15).all()
    # seeded sampling repeats, with the cache or without
    sampling = Sampling(temperature=1.0, top_k=5, seed=3)
    drawn = model.generate(ids, 6, attention_mask=mask, sampling=sampling)
    assert torch.equal(drawn, model.generate(ids, 6, attention_mask=mask, sampling=sampling, use_cache=False))
    with pytest.raises(ValueError, match="attention_mask must be left padding"):
        model.generate(ids, 2, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model.generate(ids, 13, attention_mask=mask)


def test_torch_decoder_refusals_and_capacity_without_cache():
    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=2, max_seq_len=8)
    params = ref_model.init_model(cfg, seed=8)
    model = HyperMoETransformer.from_ref(cfg, params)
    with pytest.raises(ValueError, match="capacity cannot decode with a KV cache"):
        TorchDecoder(model)
    decoder = TorchDecoder(model, use_cache=False)
    with pytest.raises(ValueError, match="training mode"):
        decoder.begin(1, 4)
    model.eval()
    with pytest.raises(ValueError, match="max_length 9 exceeds config max_seq_len"):
        decoder.begin(1, 9)
    prompt = [[1, 2, 3]]
    want, gap, routed = ref_greedy(cfg, params, prompt, 4)
    assert routed and gap > 2 * (TORCH_RTOL + U32)
    result = generate(decoder, prompt, max_new_tokens=4)
    assert isinstance(result, GenerationResult) and result.tokens == want.tolist()
    with pytest.raises(ValueError, match="a config with capacity refuses padding"):
        generate(decoder, [[1, 2, 3], [4]], max_new_tokens=2)


def test_generation_imports_without_torch():
    """The loop is shared with onnxruntime: importing it loads neither torch nor onnxruntime."""
    import subprocess
    import sys

    code = ("import sys, hypermoe.generation; loaded = {'torch', 'onnxruntime'} & set(sys.modules); "
            "assert not loaded, sorted(loaded)")
    subprocess.run([sys.executable, "-c", code], check=True)
