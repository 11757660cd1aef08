"""add_rms_norm: the Triton kernel (CPU interpreter; CUDA when present) vs its reference, and the
fused step epilogue equal to the unfused residual blocks."""

import pytest
import torch

from streamssm.kernels import add_rms_norm
from streamssm.kernels.norm.reference import add_rms_norm_ref
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import assert_close

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}


def close(name: str, expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    assert_close(name, expected, actual, rtol=rtol, atol=atol)


@pytest.mark.parametrize("b, d", [(1, 16), (3, 40), (5, 96)])  # d not a power of two: masked tail
def test_kernel_matches_reference_fp32(b, d):
    gen = torch.Generator().manual_seed(b * d)
    x, y = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    w = torch.randn(d, generator=gen)
    h, out = add_rms_norm(x, y, w, 1e-5, backend="triton")
    h_ref, out_ref = add_rms_norm_ref(x, y, w, 1e-5)
    assert torch.equal(h, h_ref)  # the add rounds the same way
    close("normed", out_ref, out, torch.float32)


def test_strided_rows_and_empty_batch():
    x = torch.randn(4, 24)[::2]  # row stride 48
    y = torch.randn(2, 48)[:, :24]
    w = torch.rand(24)
    h, out = add_rms_norm(x, y, w, 1e-6, backend="triton")
    close("strided", add_rms_norm_ref(x, y, w, 1e-6)[1], out, torch.float32)
    h0, out0 = add_rms_norm(torch.zeros(0, 8), torch.zeros(0, 8), torch.ones(8), 1e-5, backend="triton")
    assert h0.shape == out0.shape == (0, 8)


def test_gradients_go_through_the_reference():
    x, y = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    h, out = add_rms_norm(x, y, w, 1e-5, backend="triton")
    (h.sum() + (out * torch.arange(8.0)).sum()).backward()
    grads = [t.grad.clone() for t in (x, y, w)]
    for t in (x, y, w):
        t.grad = None
    h, out = add_rms_norm_ref(x, y, w, 1e-5)
    (h.sum() + (out * torch.arange(8.0)).sum()).backward()
    for got, t in zip(grads, (x, y, w)):
        close("grad", t.grad, got, torch.float32)


def test_shape_errors_name_the_tensor():
    with pytest.raises(Exception, match="add_rms_norm: y must have shape"):
        add_rms_norm(torch.zeros(2, 4), torch.zeros(2, 5), torch.ones(4), 1e-5)
    with pytest.raises(Exception, match="add_rms_norm: weight must have shape"):
        add_rms_norm(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(3), 1e-5)


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_fused_step_epilogue_equals_residual_blocks(block):
    """Backbone.step_pool (fused add + next norm) == the residual blocks stepped one by one."""
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(block=block, d_model=16, n_layers=3, d_state=8, headdim=8, vocab_size=5)).eval()
    bb = model.backbone
    pool_a, pool_b = bb.init_state(4), bb.init_state(4)
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 16)
            fused = bb.step_pool(x, pool_a, rows)
            h = x
            for layer, layer_pool in zip(bb.layers, pool_b):
                h = layer.step_pool(h, layer_pool, rows)
            close("step features", bb.norm_f(h), fused, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(dtype):
    x, y = torch.randn(64, 512, device="cuda", dtype=dtype), torch.randn(64, 512, device="cuda", dtype=dtype)
    w = torch.randn(512, device="cuda", dtype=dtype)
    h, out = add_rms_norm(x, y, w, 1e-5)
    h_ref, out_ref = add_rms_norm_ref(x.double(), y.double(), w.double(), 1e-5)
    close("h", h_ref.to(dtype).float(), h.float(), dtype)
    close("normed", out_ref.float(), out.float(), dtype)


def _forward_pair(block: str, device: str, dtype: torch.dtype):
    """Backbone.forward (fused add + next norm) and the residual blocks run one by one, no gradients."""
    torch.manual_seed(0)
    cfg = ModelConfig(block=block, d_model=64, n_layers=3, d_state=16, headdim=16, vocab_size=5)
    bb = SSMModel(cfg).to(device=device, dtype=dtype).eval().backbone
    x = torch.randn(2, 24, 64, device=device, dtype=dtype)
    state = bb.init_state(2, device, dtype)
    with torch.no_grad():
        fused, fused_state = bb(x, state)
        h, states = x, []
        for layer, layer_state in zip(bb.layers, state):
            h, s = layer(h, layer_state)
            states.append(s)
        return (fused, fused_state), (bb.norm_f(h), tuple(states))


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_fused_forward_equals_residual_blocks(block):
    (fused, fused_state), (plain, plain_state) = _forward_pair(block, "cpu", torch.float32)
    close("forward features", plain, fused, torch.float32)
    for got, want in zip(fused_state, plain_state):
        close("forward ssm state", want.ssm, got.ssm, torch.float32)


@pytest.mark.gpu
def test_fused_forward_on_gpu():
    (fused, _), (plain, _) = _forward_pair("mamba2", "cuda", torch.bfloat16)
    close("gpu forward features", plain.float(), fused.float(), torch.bfloat16)
