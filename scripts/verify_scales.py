"""The figures of export/verify.py's docstring: at output scales 1e-3 … 1e5, a correct float32 export's error
and a shifted source's error, each divided by verify's bound (max over outputs and shapes), for a tiny layer
and a tiny 2-layer stack (weights of the output side scaled by s, as tests/test_verify.py does), plus the
torch layer in float32 (another honest implementation) against the same bound.

    python3 scripts/verify_scales.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import ref  # noqa: E402
from export import exporter, verify  # noqa: E402
from hypermoe.layer import HyperMoELayer  # noqa: E402
from ref import io  # noqa: E402
from test_verify import SHAPES, scaled, shifted  # noqa: E402  (one definition of the scaling and the shift)


def worst(report) -> float:
    return max(c.max_abs / c.bound for r in report.shapes for c in r.comparisons if c.bound > 0)


def torch_ratio(cfg, params) -> float:
    layer = HyperMoELayer.from_ref(cfg, params, dtype=torch.float32).eval()
    x = verify.inputs_with_margin(verify.layer_margins(cfg, params, "layer", "float32"), (3, 40, cfg.d_model),
                                  np.random.default_rng(0), verify.MARGIN_FACTOR,
                                  round_fn=lambda v: v.astype(np.float32).astype(np.float64))
    want = verify.expected(cfg, params, "layer", x, "float32")
    with torch.no_grad():
        got = layer(torch.from_numpy(x.astype(np.float32))).output.double().numpy()
    return float(np.abs(got - want.values["output"]).max() / want.bounds["output"])


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="hypermoe-verify-scales-"))
    print("kind   scale   correct/bound  shifted/bound  torch-fp32/bound")
    for kind in ("layer", "stack"):
        for s in (1e-3, 1e-1, 1e1, 1e3, 1e5):
            cfg = ref.tiny_config()
            params = scaled((ref.init if kind == "layer" else ref.init_stack)(cfg, seed=5), s)
            name = f"{kind}_{s:g}"
            source = io.save_dir(root / name, cfg, params, kind)
            wrong = io.save_dir(root / (name + "_shifted"), cfg, shifted(params), kind)
            path = exporter.export_model(root / (name + ".onnx"), cfg, params, kind=kind, source=str(source)).path
            good = verify.verify(path, source=source, provider="cpu", shapes=SHAPES)
            bad = verify.verify(path, source=wrong, provider="cpu", shapes=SHAPES)
            fp32 = f"{torch_ratio(cfg, params):.3f}" if kind == "layer" else "-"
            print(f"{kind:6s} {s:<7g} {worst(good):<14.3f} {worst(bad):<14.3f} {fp32}", flush=True)


if __name__ == "__main__":
    main()
