"""hypermoe/decoding.py: TorchDecoder's steps (host-checked inputs, the unchecked forward, KVBuffer caches written in
place) against ref's one full pass; KVBuffer itself; a step's bad inputs as one-line errors.

Bound: float64, as tests/test_model.py's KV-cache test: the same math as ref in another order (other GEMM batches,
cached keys), 1e-10 · S with S the logits' magnitude, valid while every real token routes with margin ≥ MARGIN;
plus the float32 rounding of step()'s result (u32 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ref
from ref import model as ref_model
from hypermoe.blocks import KVBuffer
from hypermoe.model import HyperMoETransformer, TorchDecoder
from tests.strategies import U32, magnitude
from tests.test_model import model_configs, one_thread, unambiguous  # noqa: F401  one_thread: the autouse fixture


@settings(max_examples=30, deadline=None)
@given(model_configs(capacity=False, max_seq_len=8), st.data())
def test_steps_equal_one_full_pass(cfg, data):
    """Left-padded prompts prefilled, then one token per step through the decoder's buffers: the last position's
    logits of every step equal ref's full pass at that position; the buffers hold exactly the positions seen."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    params = ref_model.init_model(cfg, seed=int(rng.integers(2**31)))
    B, L = data.draw(st.integers(1, 3), label="B"), cfg.max_seq_len
    S0 = data.draw(st.integers(1, L), label="prefill")
    tokens = rng.integers(0, cfg.vocab_size, (B, L))
    mask = np.ones((B, L), dtype=np.int64)
    for b in range(B):
        mask[b, :rng.integers(0, S0)] = 0  # left padding inside the prompt, each row ≥ 1 real token
    positions = ref_model.default_positions(mask)
    want, _, results = ref_model.forward(cfg, params, tokens, mask, positions)
    assume(unambiguous(cfg, results, mask == 1))
    decoder = TorchDecoder(HyperMoETransformer.from_ref(cfg, params).eval())
    decoder.begin(B, L)
    got = [decoder.step(tokens[:, :S0], mask[:, :S0], positions[:, :S0])]
    for t in range(S0, L):
        got.append(decoder.step(tokens[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1]))
    got = np.stack(got, axis=1)  # (B, L - S0 + 1, V): positions S0 - 1 … L - 1
    # step() returns float32 (the Decoder protocol): the cast adds ≤ u32 relative to each logit
    np.testing.assert_allclose(got, want[:, S0 - 1:], rtol=U32 + 1e-10, atol=1e-10 * magnitude(want))
    assert all(buffer.length == L and buffer.key.shape == (B, cfg.n_heads, L, cfg.d_model // cfg.n_heads)
               for buffer in decoder._past)


def test_kv_buffer_writes_in_place():
    buffer = KVBuffer(2, 3, 5, 4, dtype=torch.float64)
    k, v = torch.randn(2, 3, 2, 4, dtype=torch.float64), torch.randn(2, 3, 2, 4, dtype=torch.float64)
    key, value = buffer.append(k, v)
    assert buffer.length == 2 and torch.equal(key, k) and torch.equal(value, v)
    key2, value2 = buffer.append(k[:, :, :1] + 1, v[:, :, :1] + 1)
    assert key2.shape == (2, 3, 3, 4) and key2.data_ptr() == key.data_ptr() == buffer.key.data_ptr()
    assert torch.equal(key2[:, :, :2], k) and torch.equal(value2[:, :, 2:], v[:, :, :1] + 1)
    with pytest.raises(ValueError, match="3 cached \\+ 3 new positions exceed the KV buffer's 5"):
        buffer.append(torch.zeros(2, 3, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 3, 4, dtype=torch.float64))


def test_bad_steps_are_one_line_errors():
    cfg = ref.tiny_config(max_seq_len=8)
    decoder = TorchDecoder(HyperMoETransformer.from_ref(cfg, ref_model.init_model(cfg, seed=1)).eval())
    ids, mask, pos = np.array([[1, 2]]), np.ones((1, 2), dtype=np.int64), np.array([[0, 1]])
    with pytest.raises(ValueError, match="call begin"):
        decoder.step(ids, mask, pos)
    decoder.begin(1, 4)
    cases = [((ids + cfg.vocab_size, mask, pos), "token ids must be in"),
             ((ids, mask[:, :1], pos), "attention_mask must have shape"),
             ((ids, mask * 2, pos), "values must be 0"),
             ((ids, mask, pos + cfg.max_seq_len), "position ids must be in"),
             ((ids.astype(float), mask, pos), "input_ids must be a 2-D integer"),
             ((np.array([[1, 2], [3, 4]]), np.ones((2, 2), dtype=np.int64), pos), "batch size 1"),
             ((np.array([[1, 2, 3, 4, 5]]), np.ones((1, 5), dtype=np.int64), np.arange(5)[None]), "max_length 4")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            decoder.step(*args)
        assert "\n" not in str(err.value)
    decoder.step(ids, mask, pos)  # the refusals left nothing behind: the prefill still runs at P = 0
    assert decoder._seen == 2 and all(buffer.length == 2 for buffer in decoder._past)
