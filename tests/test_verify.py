"""export/verify.py: the per-output error bound passes a correct float32 export and the float32 reference
at output scales 1e-3 … 1e5, and fails an export checked against a source whose HyperExpert bias moved by
1e-3 of its scale (issue 10 §2). Tiny configs: one export per scale, cached for the module."""

from __future__ import annotations

import numpy as np
import pytest

import ref
from export import exporter, verify
from ref import io

SCALES = (1e-3, 1e-1, 1e1, 1e3, 1e5)
SHAPES = ((2, 8), (1, 1))
# output-side weights: the routed and HyperExpert outputs scale by s, the router and every input-side sum do not
OUTPUT_SIDE = ("experts.w2", "experts.b2", "hyper.w_up.weight", "hyper.w_up.bias", "hyper.b_up.weight", "hyper.b_up.bias")


def scaled(params, s):
    return {name: v * s if name.endswith(OUTPUT_SIDE) else v for name, v in params.items()}


def shifted(params):
    """One HyperExpert bias (hyper.b_up.bias, shared by a stack's layers) moved by 1e-3 of its scale."""
    b = params["hyper.b_up.bias"]
    return {**params, "hyper.b_up.bias": b + 1e-3 * np.abs(b).max()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, s) → (export path, source directory, shifted source directory); one export each."""
    root, cache = tmp_path_factory.mktemp("verify"), {}

    def get(kind, s):
        if (kind, s) not in cache:
            cfg = ref.tiny_config()
            init = ref.init if kind == "layer" else ref.init_stack
            params = scaled(init(cfg, seed=5), s)
            name = f"{kind}_{s:g}"
            source = io.save_dir(root / name, cfg, params, kind)
            wrong = io.save_dir(root / (name + "_shifted"), cfg, shifted(params), kind)
            path = exporter.export_model(root / (name + ".onnx"), cfg, params, kind=kind,
                                         routing_outputs=kind == "layer", source=str(source)).path
            cache[kind, s] = path, source, wrong
        return cache[kind, s]

    return get


def output_scale(report):
    return max(c.max_abs / c.max_rel for r in report.shapes for c in r.comparisons if c.name == "output" and c.max_rel)


@pytest.mark.parametrize("s", SCALES)
def test_correct_export_passes_and_shifted_source_fails(exported, s):
    path, source, wrong = exported("layer", s)
    report = verify.verify(path, source=source, provider="cpu", shapes=SHAPES)
    text = "\n".join(report.lines())
    assert report.ok, text
    assert 0.3 * s < output_scale(report) < 30 * s, text  # the outputs really have magnitude ~s
    # the bound is not barely met: measured ≤ 0.13 of it on these files (scripts/verify_scales.py)
    assert all(c.max_abs <= 0.25 * c.bound for r in report.shapes for c in r.comparisons if c.name == "output"), text

    bad = verify.verify(path, source=wrong, provider="cpu", shapes=SHAPES)
    text = "\n".join(bad.lines())
    assert not bad.ok and text.endswith("beyond its error bound"), text
    assert all(r.routing_agreement == 1.0 for r in bad.shapes), text  # routing agrees: the values catch it
    assert all(not c.ok for r in bad.shapes for c in r.comparisons if c.name == "output"), text


@pytest.mark.parametrize("s", SCALES)
def test_torch_float32_within_the_bound(s):
    """Another honest float32 implementation (hypermoe.layer in float32, its own summation order and kernels)
    meets the bound with room to spare: the bound is not too tight. (ref in float32 meets it by construction:
    the bound holds YARDSTICK × its deviation.) Measured ratios ≤ 0.18 (scripts/verify_scales.py)."""
    import torch

    from hypermoe.layer import HyperMoELayer

    for changes in ({}, {"gate": "switch", "top_k": 1}, {"top_k": 1}):
        cfg = ref.tiny_config(**changes)
        params = scaled(ref.init(cfg, seed=3), s)
        margins = verify.layer_margins(cfg, params, "layer", "float32")
        x = verify.inputs_with_margin(margins, (3, 40, cfg.d_model), np.random.default_rng(0), verify.MARGIN_FACTOR,
                                      round_fn=lambda v: v.astype(np.float32).astype(np.float64))
        want = verify.expected(cfg, params, "layer", x, "float32")
        layer = HyperMoELayer.from_ref(cfg, params, dtype=torch.float32).eval()
        with torch.no_grad():
            got = layer(torch.from_numpy(x.astype(np.float32)))
        for name, value in (("output", got.output), ("gates", got.routing.gates)):
            err = float(np.abs(value.double().numpy() - want.values[name]).max())
            assert err <= 0.5 * want.bounds[name], (changes, s, name, err, want.bounds[name])
        np.testing.assert_array_equal(got.routing.selected.numpy(), want.values["selected_experts"])


@pytest.mark.parametrize("s", (1e-1, 1e3, 1e5))
def test_stack_passes_and_shifted_source_fails(exported, s):
    """A stack's output is x + Σ layer outputs, so only scales ≥ 1 make the layers visible in it (at s = 1e-3
    the shift moves the output by ~1e-8 of |x|, below float32's resolution). Scaling every layer's output side
    makes the second layer's output ~s²; measured: correct ≤ 0.16 of the bound, shifted ≥ 14× it at s ≥ 0.1
    (scripts/verify_scales.py)."""
    path, source, wrong = exported("stack", s)
    report = verify.verify(path, source=source, provider="cpu", shapes=SHAPES)
    assert report.ok, "\n".join(report.lines())
    bad = verify.verify(path, source=wrong, provider="cpu", shapes=SHAPES)
    assert not bad.ok, "\n".join(bad.lines())


def test_margin_is_in_units_of_the_logit_error_bound():
    """Scaling the router by c scales the logits, their gaps and the logit-error bound alike: the margin (in
    units of ε_t) and hence the drawn inputs do not change, at any logit scale."""
    cfg = ref.tiny_config()
    params = ref.init(cfg, seed=2)
    x = np.random.default_rng(1).standard_normal((2, 6, cfg.d_model))
    base = verify.layer_margins(cfg, params, "layer", "float32")(x)
    for c in (2.0**-14, 2.0**14):  # powers of two: the float32 run (measured drift) scales exactly too
        m = verify.layer_margins(cfg, {**params, "router.weight": params["router.weight"] * c}, "layer", "float32")(x)
        np.testing.assert_allclose(m, base, rtol=1e-9)  # float64 ratios of quantities both scaled by c
    assert np.isfinite(base).all() and (base > 0).all()


def test_report_prints_the_bound_per_output(exported):
    path, source, _ = exported("layer", 1e-1)
    lines = verify.verify(path, source=source, provider="cpu", shapes=((1, 3),)).lines()
    output = next(line for line in lines if line.strip().startswith("output"))
    assert "max abs" in output and "(bound" in output and "max rel" in output and output.endswith("ok"), lines
