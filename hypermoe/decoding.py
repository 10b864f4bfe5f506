"""TorchDecoder: a HyperMoETransformer (hypermoe/model.py) as the PyTorch backend of hypermoe.generation's loop.

The loop hands each step numpy arrays it built; they are checked here, on the host, with ref.model's checks (the
ones export/generate.py's OrtDecoder runs), once per step and before anything reaches the device. The model then
runs its unchecked path (HyperMoETransformer.forward_unchecked) on inputs this decoder built itself: no host
synchronisation for validation (the public forward's min/max and mask reductions), no auxiliary losses, and ln_f
and the head for the last position only. The attention bias is chosen on the host too (is_causal without padding
or past). The KV cache is one hypermoe.blocks.KVBuffer per block, allocated in begin() for max_length positions
and written in place: a step copies its S new positions, never the P cached ones (the model's past_key_values
tuples are concatenated each step).

Axis legend: B sequences, S new positions of a step, P cached positions, H heads, c head width, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from hypermoe.generation import check_step
from hypermoe.blocks import KVBuffer, attention_bias


class TorchDecoder:
    """The hypermoe.generation.Decoder of a HyperMoETransformer (eval mode): step() runs the new tokens after its
    KV cache and keeps the cache it returns. use_cache=False keeps the token history instead and recomputes all of
    it each step (the no-cache baseline, and the only way for a config with capacity)."""

    def __init__(self, model, *, use_cache: bool = True) -> None:
        if use_cache and model.config.capacity is not None:
            raise ValueError("a config with capacity cannot decode with a KV cache (capacity counts the tokens of "
                             "each sequence); use use_cache=False")
        self.model, self.use_cache = model, use_cache
        self._past: tuple[KVBuffer, ...] | None = None  # use_cache: every block's keys and values, preallocated
        self._history: tuple[torch.Tensor, torch.Tensor] | None = None  # no cache: (ids, positions), each (B, P)
        self._batch = self._max_length = self._seen = 0

    def begin(self, batch_size: int, max_length: int) -> None:
        if self.model.training:
            raise ValueError("the model is in training mode (dropout, router noise): call model.eval() first")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        if max_length > self.model.config.max_seq_len:
            raise ValueError(f"max_length {max_length} exceeds config max_seq_len ({self.model.config.max_seq_len})")
        self._past = self._history = None
        self._batch, self._max_length, self._seen = int(batch_size), max_length, 0
        if self.use_cache:  # one buffer of max_length per block: a step writes its S positions, copies no past
            cfg, embed = self.model.config, self.model.token_embed
            self._past = tuple(KVBuffer(self._batch, cfg.n_heads, max_length, cfg.d_model // cfg.n_heads,
                                        device=embed.device, dtype=embed.dtype) for _ in range(cfg.n_layers))

    @torch.no_grad()
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """input_ids (B, S), attention_mask (B, P + S), position_ids (B, S) → the last position's logits (B, V)."""
        ids, mask, pos = check_step(self.model.config, input_ids, attention_mask, position_ids, batch=self._batch,
                                    past=self._seen, max_length=self._max_length)
        model, S = self.model, ids.shape[1]
        device, dtype = model.token_embed.device, model.token_embed.dtype
        ids_t, mask_t, pos_t = (torch.from_numpy(a).to(device) for a in (ids, mask, pos))  # (B, S), (B, P + S), (B, S)
        if self.use_cache:
            causal = self._seen == 0 and bool(mask.all())  # no past, no padding: the is_causal fast path
            bias = None if causal else attention_bias(mask_t, S, dtype)  # (B, 1, S, P + S)
            for buffer in self._past:
                buffer.length = self._seen  # a step that failed half-way leaves no stale positions
            out = model.forward_unchecked(ids_t, pos_t, bias, self._past, use_cache=False, logits_to_keep=1, aux=False)
        else:
            if self._history is not None:
                ids_t = torch.cat([self._history[0], ids_t], 1)  # (B, P + S)
                pos_t = torch.cat([self._history[1], pos_t], 1)
            self._history = ids_t, pos_t
            bias = None if bool(mask.all()) else attention_bias(mask_t, ids_t.shape[1], dtype)  # (B, 1, P + S, P + S)
            out = model.forward_unchecked(ids_t, pos_t, bias, None, use_cache=False, logits_to_keep=1, aux=False)
        self._seen += S
        return out.logits[:, -1].float().cpu().numpy()  # (B, V)


__all__ = ["TorchDecoder"]
