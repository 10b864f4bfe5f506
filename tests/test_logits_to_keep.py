"""Last-token logits in torch (issue 21 §3): HyperMoETransformer.forward(..., logits_to_keep=n) and
HyperMoEForCausalLM.forward's logits_to_keep, against the full run at the kept positions.

Bound. Everything up to the final LayerNorm is the same computation on the same shapes in both runs (routing,
presents and aux are compared exactly); only ln_f (row-wise) and the head GEMM then run on n rows instead of S,
which BLAS may block and sum in another order: two evaluations of one formula in a different grouping,
tests/strategies.py's reorder_atol of the logits' magnitude (the head is one dot product of length d per logit,
well inside REORDER_K's allowance for 12 stages of 33 terms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ref
from ref import model as ref_model
from hypermoe.model import HyperMoETransformer, TorchDecoder
from tests.strategies import U32, U64, magnitude, reorder_atol
from tests.test_model import model_configs, one_thread, padded_cases  # noqa: F401  one_thread: the autouse fixture


@settings(max_examples=40, deadline=None)
@given(padded_cases(model_configs(capacity=False, max_seq_len=8)), st.data())
def test_kept_logits_equal_the_full_runs(case, data):
    """Random configs, shapes, padding, positions, a cache of P ≥ 0 positions and n in [0, S + 2]: logits
    (B, min(n, S) or S, V) equal the full run's last positions within the reorder bound (float64 and float32);
    routing, aux and presents are the full run's exactly (the same computation)."""
    cfg, params, tokens, mask, positions = case
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    model = HyperMoETransformer.from_ref(cfg, params, dtype=dtype).eval()
    B, L = tokens.shape
    P = data.draw(st.integers(0, L - 1), label="P")  # positions run before, into the cache
    n = data.draw(st.integers(0, L - P + 2), label="n")
    past, kw = None, {}
    if P:
        past = model(torch.from_numpy(tokens[:, :P]), attention_mask=torch.from_numpy(mask[:, :P]),
                     use_cache=True).past_key_values
    kw["attention_mask"] = torch.from_numpy(mask)
    if positions is not None:
        kw["position_ids"] = torch.from_numpy(positions[:, P:])
    new = torch.from_numpy(tokens[:, P:])  # (B, S)
    with torch.no_grad():
        full = model(new, past_key_values=past, use_cache=True, **kw)
        kept = model(new, past_key_values=past, use_cache=True, logits_to_keep=n, **kw)
    S = L - P
    want = full.logits if n == 0 else full.logits[:, -n:]  # (B, min(n, S), V)
    assert kept.logits.shape == (B, S if n == 0 else min(n, S), cfg.vocab_size)
    u = U64 if dtype == torch.float64 else U32
    np.testing.assert_allclose(kept.logits.numpy(), want.numpy(), rtol=0, atol=reorder_atol(magnitude(full.logits), u))
    for a, b in zip(full.past_key_values, kept.past_key_values):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for block, r in full.routing.items():
        assert torch.equal(r.selected, kept.routing[block].selected) and torch.equal(r.gates, kept.routing[block].gates)
    assert all(torch.equal(full.aux[k], kept.aux[k]) for k in full.aux)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1", None, torch.tensor(1), np.array([1])])
def test_bad_logits_to_keep(bad):
    model = HyperMoETransformer(ref.tiny_config()).eval()
    with pytest.raises(ValueError, match="logits_to_keep must be an int ≥ 0") as err:
        model(torch.tensor([[1, 2, 3]]), logits_to_keep=bad)
    assert "\n" not in str(err.value)


def test_numpy_int_is_accepted():
    model = HyperMoETransformer(ref.tiny_config()).eval()
    assert model(torch.tensor([[1, 2, 3]]), logits_to_keep=np.int64(2)).logits.shape == (1, 2, 32)


def test_torch_decoder_asks_for_the_last_position(monkeypatch):
    """TorchDecoder.step runs forward_unchecked with logits_to_keep=1 and aux=False (with and without the cache)
    and returns the last position's (B, V)."""
    cfg = ref.tiny_config(max_seq_len=8)
    model = HyperMoETransformer.from_ref(cfg, ref_model.init_model(cfg, seed=1)).eval()
    seen, run = [], model.forward_unchecked

    def spy(*args, **kwargs):
        seen.append((kwargs["logits_to_keep"], kwargs["aux"]))
        return run(*args, **kwargs)

    monkeypatch.setattr(model, "forward_unchecked", spy)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    mask, pos = np.ones_like(ids), np.broadcast_to(np.arange(3), (2, 3))
    want = model(torch.from_numpy(ids)).logits[:, -1].detach().numpy()
    for use_cache in (True, False):
        decoder = TorchDecoder(model, use_cache=use_cache)
        decoder.begin(2, 4)
        got = decoder.step(ids, mask, pos)
        assert got.shape == (2, cfg.vocab_size)
        np.testing.assert_allclose(got, want, rtol=0, atol=reorder_atol(magnitude(want), U32))
    assert seen == [(0, True), (1, False), (1, False)]  # the full forward for `want`, then the two decoders


def test_hf_forward_and_generate_keep_the_last_logits():
    """transformers' generate passes logits_to_keep=1 (forward's signature has it); forward honours it and refuses
    it with labels; greedy ids are those of the full-logits forward."""
    pytest.importorskip("transformers", minversion="4.46.3")
    from hypermoe.hf import HyperMoEForCausalLM, HyperMoEHFConfig

    cfg = ref.tiny_config(max_seq_len=16)
    transformer = HyperMoETransformer.from_ref(cfg, ref_model.init_model(cfg, seed=3)).eval()
    model = HyperMoEForCausalLM(HyperMoEHFConfig.from_hypermoe(cfg), transformer=transformer).eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(last.detach().numpy(), full[:, -1:].detach().numpy(), rtol=0,
                               atol=reorder_atol(magnitude(full), U32))
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model(ids, labels=ids, logits_to_keep=1)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    hook.remove()
    assert seen and all(n == 1 for n in seen), seen
    want = ids
    for _ in range(5):  # greedy with every position's logits, no cache
        want = torch.cat([want, model(want, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, want)
