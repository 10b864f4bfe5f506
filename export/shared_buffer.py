"""export.generate.OrtDecoder's side of a with-past export whose attention is "contrib" (export/attention_op.py:
com.microsoft::GroupQueryAttention, past and present one max_length buffer): the per-block key and value buffers,
bound as both past input and present output every step, and the prefill's move from left to right padding.

Why the move: GroupQueryAttention keeps each row's tokens contiguous from buffer position 0 and reads a row's
length from attention_mask's row sum, so a prompt batch must be right-padded (a left-padded row is computed as if
its first tokens were the real ones). hypermoe.generation left-pads (Hugging Face's convention), so the prefill's
rows are rotated left by their padding (positions keep their values: the count of real tokens before), and its
logits rotated back. Later steps append one real token per row (the new mask columns are 1): the buffer stays
right-padded, and the mask's row sums, the only thing the graph reads of it, are the same in either layout.

Axis legend: B sequences, S new positions, P positions seen, M = max_length, H heads, c head width, V vocabulary.
"""

from __future__ import annotations

import numpy as np


def is_shared(meta: dict[str, str]) -> bool:
    """Whether an export's metadata (export.exporter.read_metadata) says its past and present share one buffer."""
    return meta.get("attention") == "contrib"


def buffers(names: list[str], shape: tuple[int, int, int, int], host_dtype, device: str, device_id: int) -> dict:
    """One zeroed (B, H, M, c) OrtValue per past input name, on the provider's device (bound as past and present)."""
    import onnxruntime as ort

    # (B, H, M, c) each: positions never written are never read; zeroed anyway. One array per name: on the CPU an
    # OrtValue from numpy wraps the array's memory, so one shared array would make every block's cache the same
    return {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=host_dtype), device, device_id) for name in names}


def align_prefill(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, ...]:
    """A first step's left-padded (B, S) ids, mask and positions → the same rows right-padded, and each row's
    padding (B,) to undo it with `restore`. ValueError for a mask that is not left padding (0 … 0 1 … 1)."""
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("attention_mask of the first step must be left padding (0 … 0 then 1 … 1 in each row): "
                         "--attention contrib keeps each row's tokens contiguous (GroupQueryAttention)")
    pad = (mask == 0).sum(axis=1)  # (B,)
    rows = (np.arange(ids.shape[1])[None, :] + pad[:, None]) % ids.shape[1]  # (B, S): rotate left by pad
    return (*(np.take_along_axis(a, rows, axis=1) for a in (ids, mask, positions)), pad)


def restore(logits: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """logits (B, S, V) of right-padded rows → the left-padded layout the caller gave (rotate right by pad)."""
    S = logits.shape[1]
    rows = (np.arange(S)[None, :] - pad[:, None]) % S  # (B, S)
    return np.take_along_axis(logits, rows[:, :, None], axis=1)  # (B, S, V)


def check_later_step(mask: np.ndarray, real: np.ndarray, seen: int, S: int) -> None:
    """A step after the first: its S new mask columns must be 1 and the earlier ones hold `real` (B,) tokens per row
    (the buffer holds each row's tokens contiguously); S > 1 needs B = 1 (GroupQueryAttention: "batch_size must be
    1 when sequence_length > 1 and past context is given")."""
    if not (mask[:, seen:] == 1).all() or not (mask[:, :seen].sum(axis=1) == real).all():
        raise ValueError("attention_mask after the first step must keep the earlier columns and add 1s for the new "
                         "tokens: --attention contrib allows padding only in the first step's prompts")
    if S > 1 and mask.shape[0] > 1:
        raise ValueError(f"--attention contrib: {S} new positions after a past need batch size 1 (onnxruntime's "
                         f"GroupQueryAttention), got {mask.shape[0]}")
