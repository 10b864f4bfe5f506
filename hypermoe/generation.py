"""The one generation loop of hypermoe: greedy or sampled decoding over any backend that implements `Decoder`
(hypermoe.model.TorchDecoder for PyTorch, the onnxruntime decoder of export/generate.py). NumPy only: importing
this module loads neither torch nor onnxruntime.

A prompt batch of unequal lengths is left-padded with pad_token_id (attention_mask 0 there), as Hugging Face
does for decoder-only models; a real token's position is the number of real tokens before it in its row
(SPEC.md §4.1), so every prompt is computed as if it ran alone. The first decoder step (prefill) takes the
padded prompts, every later step one new token per row; the decoder keeps its own KV cache. The timings are
onnxruntime-genai's benchmark metrics (prefill tokens/s, decode tokens/s, median per-token latency).

Axis legend: B sequences, L longest prompt, S new positions of a step, P cached positions, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ref import model as ref_model


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits of the last position (Hugging Face's order: temperature, then
    top-k, then top-p). temperature 0 is greedy (top_k and top_p are then unused)."""

    temperature: float = 0.0  # 0 → greedy argmax (ties → the lowest id); > 0 → sample from softmax(logits / T)
    top_k: int = 0  # keep the k most likely ids (ties → the lower ids); 0 = off
    top_p: float = 1.0  # keep the smallest most-likely-first prefix of ids whose probability reaches top_p; 1 = off
    seed: int = 0  # seeds np.random.default_rng: the same seed, logits and settings draw the same tokens

    def __post_init__(self) -> None:
        t, k, p, seed = self.temperature, self.top_k, self.top_p, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"sampling temperature must be a finite number ≥ 0, got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"sampling top_k must be an int ≥ 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1] (1 = off), got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"sampling seed must be an int ≥ 0, got {seed!r}")


def _check_logits(logits: np.ndarray) -> None:
    if not isinstance(logits, np.ndarray) or logits.dtype.kind != "f":
        raise ValueError(f"logits must be a floating-point numpy array, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (B, V) with B ≥ 1 and V ≥ 1, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or Inf")


def token_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """logits (B, V) → the distribution (B, V) float64 that next_tokens samples from when temperature > 0:
    softmax(logits / temperature), restricted to the top_k ids and then to the top_p nucleus, renormalised."""
    _check_logits(logits)
    if sampling.temperature == 0:
        raise ValueError("token_probabilities needs temperature > 0 (temperature 0 is greedy, no distribution)")
    z = logits.astype(np.float64) / sampling.temperature  # (B, V)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))  # (B, V), stable: the row maximum subtracted
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V) most likely first; ties → the lower id first
    ranked = np.take_along_axis(probs, order, axis=-1)  # (B, V) descending
    keep = np.ones_like(ranked, dtype=bool)  # (B, V), in ranked order
    if sampling.top_k > 0:
        keep[:, sampling.top_k:] = False
    if sampling.top_p < 1:
        kept = np.where(keep, ranked, 0.0)
        before = np.cumsum(kept, axis=-1) - kept  # (B, V): mass of the more likely kept ids
        # the nucleus is measured after top-k, renormalised as Hugging Face's chained warpers see it;
        # an id is kept while the mass before it is below top_p, so the most likely id always stays
        keep &= before < sampling.top_p * kept.sum(axis=-1, keepdims=True)
    out = np.zeros_like(probs)
    np.put_along_axis(out, order, np.where(keep, ranked, 0.0), axis=-1)
    return out / out.sum(axis=-1, keepdims=True)  # (B, V)


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) of the last position → next ids (B,) int64: argmax when temperature is 0 (ties → the lowest
    id, np.argmax's first occurrence), else one draw per row from token_probabilities (one rng.random() per row,
    by inverse CDF, so a seed fixes the tokens)."""
    if sampling.temperature == 0:
        _check_logits(logits)
        return logits.argmax(axis=-1).astype(np.int64)  # (B,)
    probs = token_probabilities(logits, sampling)  # (B, V)
    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    u = rng.random(probs.shape[0]) * cdf[:, -1]  # (B,) in [0, total)
    # the first id whose cdf exceeds u; an id of probability 0 has its predecessor's cdf, so it is never the first
    ids = (cdf <= u[:, None]).sum(axis=-1)  # (B,)
    last = probs.shape[1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)  # (B,) the last id of probability > 0
    return np.minimum(ids, last).astype(np.int64)  # u rounded up to the total: that last id


class Decoder(Protocol):
    """A backend the loop drives. begin() drops any cache; step() runs the S new tokens of every row after the P
    positions it has seen since begin() and returns the logits of the last new position."""

    def begin(self, batch_size: int, max_length: int) -> None:
        """A new batch of `batch_size` rows; max_length = longest prompt + new tokens, the longest context the
        steps will reach (a backend may preallocate its cache)."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, S) int64, attention_mask (B, P + S) int64 (1 = real, 0 = padding), position_ids (B, S)
        int64 → logits (B, V) float32 of the last position; extends the decoder's KV cache by the S positions."""


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each prompt; a row stops after its first EOS, which is included
    prompt_tokens: int  # B × L: the tokens of the padded prefill batch (onnxruntime-genai: batch × prompt length)
    prefill_seconds: float  # the first step, the padded prompts
    decode_seconds: float  # the later steps, one token per row each
    step_seconds: list[float] = field(default_factory=list)  # each later step

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens fed per second in the decode steps: B per step (finished rows included, as they are computed)."""
        B = len(self.tokens)
        return B * len(self.step_seconds) / self.decode_seconds if self.decode_seconds > 0 else math.nan

    @property
    def latency_ms(self) -> float:
        """The median time of one decode step, in milliseconds (NaN without decode steps)."""
        return float(np.median(self.step_seconds)) * 1e3 if self.step_seconds else math.nan


def _check_id(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be an int ≥ 0, got {value!r}")
    return int(value)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """prompts → (input_ids (B, L) int64, attention_mask (B, L) int64): each prompt right-aligned, pad_token_id and
    mask 0 before it."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty sequence of token-id sequences, got {type(prompts).__name__}")
    rows = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)) or len(prompt) == 0:
            raise ValueError(f"prompt {b} must be a non-empty sequence of token ids")
        rows.append([_check_id(t, f"prompt {b} token ids") for t in prompt])
    L = max(len(r) for r in rows)
    ids = np.full((len(rows), L), pad_token_id, dtype=np.int64)  # (B, L)
    mask = np.zeros((len(rows), L), dtype=np.int64)  # (B, L)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    return ids, mask


def generate(decoder: Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             max_length: int | None = None) -> GenerationResult:
    """Up to max_new_tokens new tokens for each prompt (B prompts of token ids, any lengths ≥ 1).

    Prompts are left-padded with pad_token_id to the longest, L. A row stops after its first token in
    eos_token_ids (that token included); finished rows are fed pad_token_id until every row is done or
    max_new_tokens is reached. max_length: the longest context the decoder takes (a model's max_seq_len):
    L + max_new_tokens beyond it is refused, as learned positions cannot be cropped with a KV cache."""
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a hypermoe.generation.Sampling, got {type(sampling).__name__}")
    max_new_tokens = _check_id(max_new_tokens, "max_new_tokens")
    pad_token_id = _check_id(pad_token_id, "pad_token_id")
    if isinstance(eos_token_ids, (str, bytes)) or not isinstance(eos_token_ids, (Sequence, np.ndarray)):
        raise ValueError(f"eos_token_ids must be a sequence of token ids, got {type(eos_token_ids).__name__}")
    eos = np.array([_check_id(t, "eos_token_ids") for t in eos_token_ids], dtype=np.int64)
    ids, mask = left_pad(prompts, pad_token_id)  # (B, L)
    B, L = ids.shape
    if max_length is not None:
        max_length = _check_id(max_length, "max_length")
        if L + max_new_tokens > max_length:
            raise ValueError(f"longest prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"length {max_length}")
    result = GenerationResult([[] for _ in range(B)], B * L, 0.0, 0.0)
    if max_new_tokens == 0:
        return result
    rng = np.random.default_rng(sampling.seed)
    positions = np.where(mask != 0, np.cumsum(mask, axis=-1) - 1, 0)  # (B, L): real tokens before each, padding 0
    decoder.begin(B, L + max_new_tokens)
    start = time.perf_counter()
    logits = decoder.step(ids, mask, positions)  # (B, V) prefill
    result.prefill_seconds = time.perf_counter() - start
    done = np.zeros(B, dtype=bool)  # (B,)
    real = mask.sum(axis=-1)  # (B,) real tokens so far: the next one's position
    for n in range(max_new_tokens):
        new = np.where(done, pad_token_id, next_tokens(logits, sampling, rng))  # (B,)
        for b in np.flatnonzero(~done):
            result.tokens[b].append(int(new[b]))
        done |= np.isin(new, eos)
        if done.all() or n == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)  # (B, P + 1)
        start = time.perf_counter()
        logits = decoder.step(new[:, None], mask, real[:, None])  # (B, V) one token per row
        result.step_seconds.append(time.perf_counter() - start)
        real = real + 1
    result.decode_seconds = float(sum(result.step_seconds))
    return result


__all__ = ["Decoder", "GenerationResult", "Sampling", "generate", "left_pad", "next_tokens", "token_probabilities"]


def check_step(cfg, input_ids, attention_mask, position_ids, *, batch: int, past: int,
               max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Decoder step's inputs (input_ids (B, S), attention_mask (B, P + S), position_ids (B, S)) as writable
    C-contiguous int64 copies, after ref.model's checks (ids in [0, V), mask 0/1 of width P + S, positions in
    [0, max_seq_len)) and begin()'s batch size and max_length: the one check of TorchDecoder and OrtDecoder."""
    if not batch:
        raise ValueError("call begin(batch_size, max_length) before step()")
    arrays = []
    for name, a in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "iub" or a.ndim != 2:
            raise ValueError(f"{name} must be a 2-D integer numpy array, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        arrays.append(np.array(a, dtype=np.int64, order="C"))  # a copy: writable, as torch.from_numpy wants
    ids, mask, positions = arrays
    if ids.shape[0] != batch:
        raise ValueError(f"input_ids must have begin()'s batch size {batch}, got shape {ids.shape}")
    ref_model.check_tokens(cfg, ids)  # (B, S), S ≥ 1, ids in [0, V)
    S = ids.shape[1]
    if past + S > max_length:
        raise ValueError(f"{past} cached + {S} new positions exceed begin()'s max_length {max_length}")
    ref_model.check_attention_mask(cfg, ids, mask, past=past)  # (B, P + S), values 0/1; capacity: no padding
    ref_model.check_positions(cfg, ids, positions)  # (B, S), in [0, max_seq_len)
    return ids, mask, positions

