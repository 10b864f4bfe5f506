"""The checks of a with-past export beyond full passes (export.graph.ExportModelWithPast), run by export.verify:
one full pass through its OrtDecoder, a prefill plus one-token steps against ref's one full pass, and greedy
tokens of onnxruntime against PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ref import HyperMoEConfig
from ref.tolerances import round_to as round_to_dtype
from export.bounds import MARGIN_FACTOR, Expected, compare, expected, inputs_with_margin


# ---------------------------------------------------------------------------------------------
# With past key/values: one graph for prefill and decode (export.graph.ExportModelWithPast)
# ---------------------------------------------------------------------------------------------

DECODE_LENGTH = 16  # check_decode: prefill half of it, then one token per step (capped at max_seq_len)
GREEDY_STEPS = 32  # check_greedy: new tokens per prompt (capped by max_seq_len - the longest prompt)


class PastCheck(NamedTuple):
    """A with-past export's check beyond full passes: decode consistency or greedy tokens."""
    name: str
    max_abs: float | None  # max |onnx - ref| over the compared logits; None where tokens are compared
    bound: float  # the logits' error bound on these inputs (export/verify.py's docstring)
    detail: str
    ok: bool


def full_pass(decoder, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One full pass (past length 0, no padding, positions 0 … S-1) of a with-past export through its OrtDecoder
    → {"logits": (B, S, V) float32}: the plain model's interface, which verify's shape loop runs ((B, 1, V), the
    last position's, from an export with logits "last": verify compares those)."""
    B, S = input_ids.shape
    decoder.begin(B, S)
    positions = np.broadcast_to(np.arange(S), (B, S))
    return {"logits": decoder.step(input_ids, np.ones((B, S), dtype=np.int64), positions, all_positions=True)}


def _left_padded(cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], dtype: str, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, Expected]:
    """Token ids (B, L) for a left-padded batch (mask (B, L)) whose real tokens all have routing margin ≥
    MARGIN_FACTOR ε_t, and ref's Expected for them (the ids under mask 0 are random too: they must not matter)."""
    drawn: dict[str, Expected] = {}

    def margins(ids: np.ndarray) -> np.ndarray:
        drawn["want"] = expected(cfg, params, "model", ids, dtype, attention_mask=mask)
        return drawn["want"].margins

    ids = inputs_with_margin(margins, mask.shape, rng, MARGIN_FACTOR, vocab_size=cfg.vocab_size)
    return ids, drawn["want"]


def check_decode(decoder, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], dtype: str,
                 rng: np.random.Generator) -> PastCheck:
    """Prefill S0 tokens, then one token per step through the OrtDecoder (its present fed back as past on the
    device): every real position's logits must match ref's one full pass (float64, ref.model.forward with the
    attention mask) within the full pass's bound. Three rows, left-padded by 0, S0/2 and S0 - 1 positions
    (positions by ref.model.default_positions). An export with logits "last" gives the prefill's last position
    and each step's: positions S0 - 1 … L - 1 are compared (every row is real there)."""
    from ref import model as ref_model

    total = min(cfg.max_seq_len, DECODE_LENGTH)
    S0 = total // 2
    pads = (0, S0 // 2, S0 - 1)
    mask = np.ones((len(pads), total), dtype=np.int64)  # (B, L)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    positions = ref_model.default_positions(mask)  # (B, L)
    ids, want = _left_padded(cfg, params, dtype, mask, rng)
    decoder.begin(len(pads), total)
    steps = [decoder.step(ids[:, :S0], mask[:, :S0], positions[:, :S0], all_positions=True)]  # prefill, past length 0
    for t in range(S0, total):
        steps.append(decoder.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], all_positions=True))
    got = np.concatenate(steps, axis=1)  # (B, L, V), or (B, L - S0 + 1, V) from a "last" export
    first = total - got.shape[1]  # the first position compared: 0, or S0 - 1
    real = mask[:, first:] != 0
    c = compare("logits", got[real], want.values["logits"][:, first:][real], want.bounds["logits"])
    lengths = sorted({shape[2] for shape in decoder.cache_shapes})  # every present's P + S
    lengths_ok = lengths == [total]
    detail = (f"over {int(real.sum())} real positions; rows left-padded by {', '.join(map(str, pads))}"
              + ("" if lengths_ok else f"; present lengths {lengths} != {total}: FAIL"))
    return PastCheck(f"b. prefill {S0} + {total - S0} one-token steps vs one full pass", c.max_abs, c.bound, detail,
                     c.ok and lengths_ok)


def check_greedy(decoder, cfg: HyperMoEConfig, params: Mapping[str, np.ndarray], dtype: str,
                 rng: np.random.Generator) -> PastCheck:
    """Greedy tokens of onnxruntime (the OrtDecoder) and PyTorch (hypermoe.model.TorchDecoder, float32, the export's
    parameters rounded to its dtype) through the same hypermoe.generation.generate, 3 left-padded prompts.

    A step is decidable when ref's (float64, on the generated sequence) top-2 logit gap exceeds 2 × the logits'
    bound (each side within the bound of ref cannot reorder them) and every real token up to it has routing
    margin ≥ MARGIN_FACTOR ε_t. Tokens must be equal at decidable steps; a difference at an undecidable step
    ends that row's comparison and is reported, neither pass nor fail."""
    import torch

    from hypermoe.generation import generate, left_pad
    from hypermoe.model import HyperMoETransformer, TorchDecoder

    L = min(8, cfg.max_seq_len // 4)  # longest prompt
    steps = min(GREEDY_STEPS, cfg.max_seq_len - L)
    mask = np.zeros((3, L), dtype=np.int64)
    for b, n in enumerate((L, max(1, L // 2), 1)):
        mask[b, L - n:] = 1
    ids, _ = _left_padded(cfg, params, dtype, mask, rng)
    prompts = [row[m != 0].tolist() for row, m in zip(ids, mask)]
    p32 = {name: round_to_dtype(dtype, v).astype(np.float32) for name, v in params.items()}
    model = HyperMoETransformer.from_ref(cfg, p32, dtype=torch.float32).eval()
    options = dict(max_new_tokens=steps, max_length=cfg.max_seq_len)
    got = generate(decoder, prompts, **options).tokens
    torch_tokens = generate(TorchDecoder(model, use_cache=True), prompts, **options).tokens

    full, full_mask = left_pad([p + g[:-1] for p, g in zip(prompts, got)], 0)  # the sequences that made each step
    want = expected(cfg, params, "model", full, dtype, attention_mask=full_mask)
    bound = want.bounds["logits"]
    top2 = -np.sort(-want.values["logits"], axis=-1)[..., :2]  # (B, L', 2)
    gap_ok = top2[..., 0] - top2[..., 1] > 2 * bound  # (B, L')
    routing_ok = np.minimum.accumulate(want.margins, axis=1) >= MARGIN_FACTOR  # (B, L'): every token so far
    decidable = (gap_ok & routing_ok)[:, L - 1:]  # (B, steps): step n's logits sit at padded position L - 1 + n
    same = decided = 0
    differ, undecidable = [], []
    for b in range(len(prompts)):
        for n in range(steps):
            if got[b][n] == torch_tokens[b][n]:
                same += 1
                decided += bool(decidable[b, n])
            else:
                (differ if decidable[b, n] else undecidable).append(f"prompt {b} step {n}")
                break
    detail = (f"{len(prompts)} prompts × {steps} steps: {same} tokens identical ({decided} decidable: top-2 gap > "
              f"2·bound and routing margins ≥ {MARGIN_FACTOR:g} ε)")
    if undecidable:
        detail += f"; differ where undecidable (not compared after): {', '.join(undecidable)}"
    if differ:
        detail += f"; DIFFER where decidable: {', '.join(differ)}"
    return PastCheck("c. greedy tokens, onnxruntime vs torch", None, bound, detail, not differ)
