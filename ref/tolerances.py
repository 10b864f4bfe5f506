"""The rounding model of SPEC.md §7: unit roundoffs, rounding to the dtypes under test, and the error bounds of a
conforming implementation (ε_D on the router logits, the magnitude S its other errors scale with). The
conformance suite's tolerances (conformance/tolerances.py, whose docstring derives them) and export/verify.py's
bounds are both built from these; NumPy only.

Axis legend: T tokens, d model width, N experts.
"""

from __future__ import annotations

import numpy as np

import ref
from ref.config import HyperMoEConfig

DTYPES = ("float64", "float32", "float16", "bfloat16")
# unit roundoff u = 2^-(significand bits): the largest relative error of one rounding to nearest
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


# Rounding to the dtypes under test (NumPy has no bfloat16: emulated on float32 bit patterns)

def round_to(dtype: str, a: np.ndarray) -> np.ndarray:
    """`a` rounded to `dtype` (round to nearest even), returned as float64."""
    a = np.asarray(a, dtype=np.float64)
    if dtype == "float64":
        return a
    if dtype in ("float32", "float16"):
        return a.astype(dtype).astype(np.float64)
    if dtype == "bfloat16":  # keep the top 16 bits of the float32 pattern, rounding half to even
        bits = a.astype(np.float32).view(np.uint32)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
        return bits.view(np.float32).astype(np.float64)
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")


def representable(dtype: str, a: np.ndarray) -> bool:
    """Whether every entry of `a` is exactly representable in `dtype`."""
    return bool(np.array_equal(round_to(dtype, a), np.asarray(a, dtype=np.float64)))


def router_scales(cfg: HyperMoEConfig, lp: dict[str, np.ndarray], h: np.ndarray, inputs: dict[str, np.ndarray]
                  ) -> np.ndarray:
    """R_t = max over experts j of Σ_i |x̃_ti W_ij| (+ |ε_tj| (Σ_i |x_ti Wn_ij| + 1.01)) → (T,)."""
    xt = h.reshape(-1, cfg.d_model)  # (T, d)
    xj = xt * inputs["jitter"].reshape(xt.shape) if "jitter" in inputs else xt  # (T, d) router input
    R = np.abs(xj) @ np.abs(lp["router.weight"])  # (T, N)
    if "gate_noise" in inputs:
        eps = np.abs(inputs["gate_noise"].reshape(-1, cfg.n_experts))  # (T, N)
        R = R + eps * (np.abs(xt) @ np.abs(lp["router.noise_weight"]) + 1.01)  # softplus(z) ≤ |z| + log 2
    return R.max(axis=-1, initial=0.0)  # (T,)


def logit_error_bound(cfg: HyperMoEConfig, lp: dict[str, np.ndarray], R, dtype: str):
    """ε_D (derived in conformance/tolerances.py's docstring) for router scale(s) R (a float, or R_t per token → (T,))."""
    u = UNIT_ROUNDOFF[dtype]
    u_acc = UNIT_ROUNDOFF["float64" if dtype == "float64" else "float32"]
    b = lp.get("router.bias", np.zeros(cfg.n_experts))
    return (4 * u + (cfg.d_model + 2) * u_acc) * R + float(np.abs(b - round_to(dtype, b)).max() + u_acc * np.abs(b).max())


def magnitude(cfg: HyperMoEConfig, lp: dict[str, np.ndarray], h: np.ndarray, result, *, with_input: bool = True
              ) -> float:
    """S: the largest intermediate magnitude of one layer (input, any expert's FFN output, routed, HyperExpert,
    output); 0 for no tokens. Rounding errors of a conforming implementation are a few u_D of S.
    with_input=False leaves the input out: the output's own scale, for weights that make it much smaller
    than its input (export/verify.py)."""
    xt = h.reshape(-1, cfg.d_model)  # (T, d)
    ffn = [np.abs(ref.expert_ffn(cfg, lp, i, xt)).max(initial=0.0) for i in range(cfg.n_experts)]
    parts = (h, result.output, result.routed, result.hyper) if with_input else (result.output, result.routed, result.hyper)
    return float(max(*ffn, *(np.abs(a).max(initial=0.0) for a in parts)))
