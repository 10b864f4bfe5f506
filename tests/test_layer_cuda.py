"""hypermoe.layer on CUDA: the key properties of tests/test_layer.py on the GPU (fp64/fp32 vs ref, bf16/fp16 vs
fp32 where routing agrees, CUDA vs CPU, ties, the three paths, determinism, training, gradients). Skipped with a
reason where torch sees no GPU; scripts/gpu_check.sh runs this file unattended on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import ref
from hypermoe.layer import HyperMoELayer, params_to_ref
from tests.strategies import U32, cases, inputs_with_margin, layer_magnitude, magnitude, reorder_atol
from tests.test_layer import F64_TOL, FP32_TOL, check_against_ref, run_modes

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: torch.cuda.is_available() is False"),
]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 matmuls would round fp32 inputs to 10 mantissa bits; the fp32 tolerances assume true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def cuda_layer(case, dtype, **kw) -> HyperMoELayer:
    return HyperMoELayer.from_ref(case.cfg, case.params, dtype=dtype, device=CUDA, **kw).eval()


def to_cpu(out):
    """HyperMoEOutput with every tensor moved to the CPU (check_against_ref reads numpy)."""
    return type(out)(out.output.detach().cpu(), type(out.routing)(*(t.detach().cpu() for t in out.routing)),
                     {k: v.detach().cpu() for k, v in out.aux.items()})


@settings(max_examples=20)
@given(cases())
def test_cuda_matches_ref_float64_and_float32(case):
    expected = ref.layer(case.cfg, case.params, case.x, case.layer_index)
    for dtype, tol in ((torch.float64, F64_TOL), (torch.float32, FP32_TOL)):
        layer = cuda_layer(case, dtype)
        x = torch.tensor(case.x, dtype=dtype, device=CUDA)
        for mode, out in run_modes(layer, x, case.layer_index):
            assert out.output.device.type == "cuda"
            check_against_ref(to_cpu(out), expected, tol, f"({mode}, {dtype}, {case.cfg})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_cuda_16bit_close_to_float32_where_routing_agrees(dtype, top_k):
    cfg = ref.tiny_config(n_experts=8, top_k=top_k, d_model=64, d_ff=128)
    params = ref.init(cfg, seed=4, dtype=np.float32)
    layer32 = HyperMoELayer.from_ref(cfg, params, device=CUDA).eval()
    layer16 = HyperMoELayer.from_ref(cfg, params, dtype=dtype, device=CUDA).eval()
    torch.manual_seed(4)  # seeds the CUDA generator too
    x = torch.randn(8, 64, cfg.d_model, device=CUDA)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a, b = layer32(x), layer16(x.to(dtype))
        assert b.output.dtype == dtype and b.routing.probs.dtype == torch.float32  # router math in float32
        same = (a.routing.selected == b.routing.selected).all(-1)
        assert same.float().mean() > 0.9
        scale = a.output[same].abs().max().item()
        torch.testing.assert_close(b.output[same].float(), a.output[same], rtol=0.05, atol=0.05 * scale)
    b.output.float().square().mean().backward()
    assert layer16.hyper.w_down.weight.grad is not None


def test_cuda_equals_cpu_float32():
    cfg = ref.tiny_config(n_experts=8, top_k=2, d_model=32, d_ff=64)
    params = ref.init(cfg, seed=6, dtype=np.float32)
    x = inputs_with_margin(cfg, params, (4, 33, cfg.d_model), np.random.default_rng(6), 1e-3).astype(np.float32)
    cpu = HyperMoELayer.from_ref(cfg, params).eval()
    gpu = HyperMoELayer.from_ref(cfg, params, device=CUDA).eval()
    # float32 on two devices: the same sums in another order (cuBLAS may split K), the reorder bound
    # (tests/strategies.py) in u = 2^-24 of the layer's magnitude S
    atol = reorder_atol(layer_magnitude(cfg, params, x), U32)
    for (mode, a), (_, b) in zip(run_modes(cpu, torch.tensor(x)), run_modes(gpu, torch.tensor(x, device=CUDA))):
        assert torch.equal(a.routing.selected, b.routing.selected.cpu()), mode
        torch.testing.assert_close(b.output.cpu(), a.output, rtol=0, atol=atol, msg=mode)


def test_cuda_exact_ties_pick_lower_index():
    cfg = ref.tiny_config(n_experts=6, top_k=2, d_model=4)
    params = ref.init(cfg, seed=3)
    params["router.weight"][:] = 1.0  # every logit equal for every token
    layer = HyperMoELayer.from_ref(cfg, params, device=CUDA).eval()
    torch.manual_seed(3)
    x = torch.rand(3, 50, 4, dtype=torch.float64, device=CUDA) + 0.1
    for mode, out in run_modes(layer, x):
        assert (out.routing.selected[..., 0] == 0).all() and (out.routing.selected[..., 1] == 1).all(), mode


def test_cuda_deterministic_and_training_step():
    cfg = ref.tiny_config(n_experts=8, top_k=2, d_model=32, d_ff=64)
    torch.manual_seed(0)
    layer = HyperMoELayer(cfg, device=CUDA)
    x = torch.randn(4, 128, cfg.d_model, device=CUDA)
    first = layer(x).output
    for _ in range(3):
        assert torch.equal(layer(x).output, first)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    target = torch.tanh(x @ torch.randn(cfg.d_model, cfg.d_model, device=CUDA))
    losses = []
    for _ in range(30):
        loss = (layer(x).output - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0]


def test_cuda_gradients_equal_cpu_float64():
    cfg = ref.tiny_config(gate="switch", top_k=1, capacity=3, n_experts=4)
    params = ref.init(cfg, seed=2)
    x = inputs_with_margin(cfg, params, (2, 9, cfg.d_model), np.random.default_rng(2), 1e-2)
    grads = []
    for device in ("cpu", CUDA):
        layer = HyperMoELayer.from_ref(cfg, params, device=device).train()
        xt = torch.tensor(x, device=device, requires_grad=True)
        out = layer(xt)
        (out.output.square().sum() + out.aux["switch_balance"]).backward()
        grads.append({"x": xt.grad.cpu(), **{n: p.grad.cpu() for n, p in layer.named_parameters()}})
    for name in grads[0]:  # float64, the same math in another order: 1e-10 of each gradient's magnitude
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-10 * magnitude(grads[0][name]),
                                   msg=name)


def test_cuda_device_mismatch_is_value_error():
    layer = HyperMoELayer(ref.tiny_config(), device=CUDA)
    with pytest.raises(ValueError, match="cuda"):
        layer(torch.randn(2, 3, 16))
    assert set(params_to_ref(layer)) == set(ref.param_shapes(layer.config))  # moves to numpy from the GPU
