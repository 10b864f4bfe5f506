"""How much memory a config needs, estimated from its parameter shapes before anything is allocated, and
one check that refuses a config that cannot fit with a one-line ValueError giving the estimate.

The estimate is a lower bound: the bytes of the parameters (ref.io.expected_shapes, a product of shapes,
nothing allocated) times the copies the caller holds, plus, where the caller runs tokens, one layer's
forward working set. Only what is surely needed is counted, so a config that fits is never refused.
"""

from __future__ import annotations

import math
import os

from ref.config import HyperMoEConfig

DTYPE_NAMES = {2: "16-bit", 4: "float32", 8: "float64"}


def param_bytes(cfg: HyperMoEConfig, kind: str, dtype_bytes: int) -> int:
    """Bytes of the parameters of a layer, stack or model at `dtype_bytes` per value."""
    from ref.io import expected_shapes

    return dtype_bytes * sum(math.prod(shape) for shape in expected_shapes(cfg, kind).values())


def activation_bytes(cfg: HyperMoEConfig, tokens: int, dtype_bytes: int) -> int:
    """One layer forward on T tokens: x, output, routed and HyperExpert parts (T, d) each, logits and
    probabilities (T, N), the experts' hidden activations before and after the activation (T·k, f) and the
    adapter activations (T, a)."""
    c = cfg
    return dtype_bytes * tokens * (4 * c.d_model + 2 * c.n_experts + 2 * c.top_k * c.d_ff + c.d_adapter)


def available_memory() -> int | None:
    """Bytes this machine can give now: /proc/meminfo's MemAvailable, else the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def check_memory(cfg: HyperMoEConfig, kind: str, dtype_bytes: int, *, what: str, copies: int = 1, tokens: int = 0,
                 available: int | None = None, where: str = "this machine's") -> int:
    """ValueError when the parameters (× copies) plus one layer's forward on `tokens` tokens need more than
    `available` bytes (default: available_memory()). Returns the estimate in bytes."""
    params = param_bytes(cfg, kind, dtype_bytes) * copies
    needed = params + activation_bytes(cfg, tokens, dtype_bytes)
    available = available_memory() if available is None else available
    if available is None or needed <= available:
        return needed
    from ref.io import expected_shapes

    name, shape = max(expected_shapes(cfg, kind).items(), key=lambda item: math.prod(item[1]))
    parts = "its parameters" + (f" ({copies} copies)" if copies > 1 else "") + (
        f" and a forward pass on {tokens} tokens" if tokens else "")
    raise ValueError(f"{what}: config needs at least ~{human_bytes(needed)} for {parts} "
                     f"({DTYPE_NAMES.get(dtype_bytes, f'{dtype_bytes}-byte values')}), more than {where} "
                     f"{human_bytes(available)} of available memory (largest parameter {name} {shape}); "
                     "reduce d_model/d_ff/n_experts/d_adapter/d_generator/vocab_size/n_layers")
