"""Block-wise weight quantisation for onnxruntime's MatMulNBits and QMoE, and the float model a quantised export
computes (`dequantized_reference`): the ONE formulation that the export's packed weights and verify's reference
both come from. NumPy only.

Axis legend:  K input width of a matmul (the quantised axis)  N output width  E experts
    nb = ceil(K / block) blocks per column  blob = block · bits / 8 bytes per block

The scheme is onnxruntime's own symmetric one (onnxruntime.quantization's MatMulNBitsQuantizer, MLAS
MlasQuantizeBlockwise; tests/test_quantize.py checks our bytes equal its bytes), per (column n, block b):
    m      = the block's value of largest |w|, its sign kept (max if |max| > |min|, else min: MLAS's rule)
    scale  = m / -2^(bits-1)              float32, may be negative: m itself maps to q = -2^(bits-1) exactly
    stored = clip(roundf(w · (1/scale) + 2^(bits-1)), 0, 2^bits - 1)   in float32 (MLAS; exact .5 goes up)
                                          i.e. q = stored - 2^(bits-1) over the default zero point of the
                                          ops (8 for int4, 128 for int8): no zero-point tensor
    w'     = float32(scale · (stored - 2^(bits-1)))      the weight the kernel multiplies by
This deviates from "scale = max|w| / (2^(bits-1) - 1)": it uses the whole range −2^(bits−1) … 2^(bits−1) − 1
(8/7 finer steps for int4) and is byte-identical to onnxruntime's quantiser. Error: |w − w'| ≤ |scale|/2 for
every element that is not clipped; only a value of the opposite sign and the same |w| as m is clipped
(w/scale = 2^(bits-1)), with error |scale|. An all-zero block has scale 0 and stores the zero point.

Layouts. MatMulNBits (y = x W, W (K, N)): B uint8 (N, nb, blob), scales float32 (N·nb,), K zero-padded to
nb·block. 4 bits: two values per byte, the even element in the low nibble. QMoE: weights uint8 (E, N, K·bits/8)
(nn.Linear layout, i.e. (N, nb·blob) per expert, no padding: K must be a multiple of the block), scales
(E, N, nb).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ref import HyperMoEConfig

BITS = {"int8": 8, "int4": 4}  # --quantize choice → bits
DEFAULT_BLOCK = 32  # onnxruntime-genai's builder's default


def check_block(bits: int, block_size: int) -> None:
    """ValueError unless bits ∈ {4, 8} and block_size is a power of two ≥ 16 (MatMulNBits' and QMoE's rule)."""
    if bits not in BITS.values():
        raise ValueError(f"quantisation bits must be 4 or 8, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two ≥ 16 (onnxruntime MatMulNBits / QMoE), got {block_size!r}")


class Quantized(NamedTuple):
    packed: np.ndarray  # uint8 (N, nb, blob): MatMulNBits' B
    scales: np.ndarray  # float32 (N, nb)
    K: int
    N: int
    bits: int
    block_size: int


def _codes(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w (K, N) → (stored codes uint8 (N, nb, block), scales float32 (N, nb)), the module docstring's scheme."""
    check_block(bits, block_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"a quantised weight must be 2-D (K, N), got shape {w.shape}")
    K, N = w.shape
    nb = -(-K // block_size)
    half = 2 ** (bits - 1)
    blocks = np.pad(w, ((0, nb * block_size - K), (0, 0))).T.reshape(N, nb, block_size)  # (N, nb, block) zero-padded
    top, bottom = blocks.max(axis=-1), blocks.min(axis=-1)  # (N, nb)
    m = np.where(np.abs(top) > np.abs(bottom), top, bottom)  # (N, nb) largest |w|, the negative one on a tie (MLAS)
    scales = (m / np.float32(-half)).astype(np.float32)  # (N, nb)
    inverse = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)  # 0 for an all-zero block
    # as MLAS, in float32: w · (1/scale) + zero point, then roundf (half away from zero; ≥ 0 here, so half up)
    shifted = (blocks * inverse[..., None]).astype(np.float32) + np.float32(half)  # (N, nb, block)
    whole = np.floor(shifted)  # x - floor(x) is exact in float32; floor(x + 0.5) is not (x = 0.5 - 2^-25)
    stored = np.clip(whole + (shifted - whole >= np.float32(0.5)), 0, 2 * half - 1)  # (N, nb, block) roundf
    return stored.astype(np.uint8), scales


def quantise(w: np.ndarray, bits: int, block_size: int = DEFAULT_BLOCK) -> Quantized:
    """w (K, N) float (y = x w) → MatMulNBits' packed B (N, nb, blob) uint8 and scales (N, nb) float32."""
    codes, scales = _codes(w, bits, block_size)  # (N, nb, block)
    K, N = np.shape(w)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (N, nb, block/2) even element in the low nibble
    return Quantized(np.ascontiguousarray(codes, dtype=np.uint8), scales, K, N, bits, block_size)


def unpack(q: Quantized) -> np.ndarray:
    """The stored codes (N, nb, block) uint8 of a Quantized."""
    if q.bits == 8:
        return q.packed
    low, high = q.packed & 0x0F, q.packed >> 4  # (N, nb, block/2)
    return np.stack([low, high], axis=-1).reshape(q.N, -1, q.block_size)


def dequantise(q: Quantized) -> np.ndarray:
    """The float32 weight (K, N) the kernels multiply by: scale · (stored − zero point), one float32 rounding."""
    half = 2 ** (q.bits - 1)
    values = q.scales[..., None] * (unpack(q).astype(np.float32) - np.float32(half))  # (N, nb, block) float32
    return values.reshape(q.N, -1)[:, :q.K].T.astype(np.float32)  # (K, N)


def roundtrip(w: np.ndarray, bits: int, block_size: int = DEFAULT_BLOCK) -> np.ndarray:
    """dequantise(quantise(w)): what a quantised export uses in place of w (K, N), float32."""
    return dequantise(quantise(w, bits, block_size))


def qmoe_weights(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacked expert weights w (E, K, N) (x @ w_e) → QMoE's (uint8 (E, N, K·bits/8), scales float32 (E, N, nb)).
    K must be a multiple of block_size (QMoE does not pad)."""
    E, K, N = w.shape
    if K % block_size:
        raise ValueError(f"QMoE needs the experts' input widths to be multiples of the block size: K = {K} is not "
                         f"a multiple of {block_size} (pick a block size dividing d_model and d_ff, or flavour sparse)")
    qs = [quantise(w[e], bits, block_size) for e in range(E)]
    return (np.stack([q.packed.reshape(N, -1) for q in qs]), np.stack([q.scales for q in qs]))


# ---------------------------------------------------------------------------------------------
# Which parameters are quantised, and the reference of a quantised export
# ---------------------------------------------------------------------------------------------

def quantised_names(names) -> list[str]:
    """The (K, N)-matrix parameters a quantised export replaces by their block-quantised copies: the routed
    experts (experts.w1/w2, stacked (N, K, N') per expert), the attention's qkv and proj, the dense MLPs, the LM
    head (lm_head.weight; with tied embeddings the head is token_embedᵀ, handled by dequantized_reference).
    Stays float: the router (routing decisions), the HyperExpert's hypernetwork and embeddings, token and position
    embeddings, LayerNorms, every bias."""
    keep = []
    for name in names:
        if name.endswith(("experts.w1", "experts.w2")) or name == "lm_head.weight":
            keep.append(name)
        elif name.startswith("blocks.") and (name.endswith((".attn.qkv.weight", ".attn.proj.weight"))
                                             or name.endswith((".mlp.w1", ".mlp.w2"))):
            keep.append(name)
    return keep


def dequantized_reference(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], bits: int,
                          block_size: int = DEFAULT_BLOCK) -> tuple[HyperMoEConfig, dict[str, np.ndarray]]:
    """(cfg2, params2) such that ref on them computes exactly what a quantised export computes with exact
    arithmetic: every quantised matrix replaced by roundtrip(·) (experts per expert, each (K, N) with K the input
    width). Tied embeddings: the head becomes an untied lm_head = roundtrip(token_embedᵀ) (cfg2 unties), the
    embedding lookup keeps the float token_embed."""
    check_block(bits, block_size)
    out = {name: np.asarray(v) for name, v in params.items()}
    for name in quantised_names(out):
        w = out[name]
        if w.ndim == 3:  # stacked experts (E, K, N)
            out[name] = np.stack([roundtrip(w[e], bits, block_size) for e in range(w.shape[0])]).astype(w.dtype)
        else:
            out[name] = roundtrip(w, bits, block_size).astype(w.dtype)
    if cfg.tie_embeddings and "token_embed" in out:
        out["lm_head.weight"] = roundtrip(out["token_embed"].T, bits, block_size).astype(out["token_embed"].dtype)
        cfg = cfg.replace(tie_embeddings=False)
    return cfg, out
