"""gated_rms_norm: the Triton kernel (CPU interpreter; CUDA when present) vs its reference, the
dispatch (gradients and traced calls take the reference) and GatedRMSNorm through it."""

import pytest
import torch

from streamssm.errors import ShapeError
from streamssm.kernels.norm import gated_rms_norm
from streamssm.kernels.norm.reference import gated_rms_norm_ref
from streamssm.layers.norm import GatedRMSNorm
from streamssm.testing import assert_close, assert_script_compiles_for_sm90

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}


def inputs(shape, dtype=torch.float32, device="cpu", seed=0, z_pad=0):
    """y (*shape), z a slice of a wider tensor (rows strided, as Mamba-2's in_proj slice), weight."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    y = torch.randn(*shape, generator=g).to(device, dtype)
    z = (3 * torch.randn(*shape[:-1], d + z_pad, generator=g)).to(device, dtype)[..., z_pad:]
    w = torch.rand(d, generator=g).add(0.5).to(device)
    return y, z, w


@pytest.mark.parametrize("shape, groups", [((3, 16), 1), ((2, 5, 40), 1), ((2, 3, 96), 4), ((1, 7, 24), 3)],
                         ids=["2d", "3d-masked", "groups4", "groups3-masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference(shape, groups, dtype):
    y, z, w = inputs(shape, dtype, z_pad=7)
    assert not z.is_contiguous()
    got = gated_rms_norm(y, z, w, 1e-5, groups, backend="triton")
    ref = gated_rms_norm_ref(y, z, w, 1e-5, groups)
    assert got.shape == y.shape and got.dtype == dtype
    rtol, atol = TOL[dtype]
    assert_close("gated norm", ref.float(), got.float(), rtol=rtol, atol=atol)


def test_fp32_weight_with_bf16_activations_and_empty_rows():
    y, z, w = inputs((4, 32), torch.bfloat16)
    assert_close("bf16", gated_rms_norm_ref(y, z, w, 1e-6).float(),
                 gated_rms_norm(y, z, w, 1e-6, backend="triton").float(), rtol=1.6e-2, atol=1.6e-2)
    empty = gated_rms_norm(torch.zeros(0, 3, 8), torch.zeros(0, 3, 8), torch.ones(8), 1e-5, backend="triton")
    assert empty.shape == (0, 3, 8)


def test_gradients_and_ungated_calls_go_through_the_reference():
    y, z, w = inputs((3, 2, 8))
    y.requires_grad_()
    out = gated_rms_norm(y, z, w, 1e-5, backend="triton")
    (dy,) = torch.autograd.grad((out * torch.arange(8.0)).sum(), y)
    y_ref = y.detach().requires_grad_()
    (dy_ref,) = torch.autograd.grad((gated_rms_norm_ref(y_ref, z, w, 1e-5) * torch.arange(8.0)).sum(), y_ref)
    assert_close("grad", dy_ref, dy, rtol=1e-5, atol=1e-5)
    assert torch.equal(gated_rms_norm(y.detach(), None, w, 1e-5, backend="triton"),
                       gated_rms_norm_ref(y.detach(), None, w, 1e-5))


def test_module_equals_reference():
    norm = GatedRMSNorm(24, eps=1e-5, groups=2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z, _ = inputs((2, 4, 24), z_pad=3)
    assert torch.equal(norm(y, z), gated_rms_norm_ref(y, z, norm.weight, 1e-5, 2))


def test_shape_errors_name_the_problem():
    with pytest.raises(ShapeError, match="gated_rms_norm: z must have"):
        gated_rms_norm(torch.zeros(2, 4), torch.zeros(2, 5), torch.ones(4), 1e-5)
    with pytest.raises(ShapeError, match="gated_rms_norm: weight must have shape"):
        gated_rms_norm(torch.zeros(2, 6), torch.zeros(2, 6), torch.ones(6), 1e-5, groups=4)


SM90_COMPILE = """
from streamssm.kernels.norm.gated_rms_norm import _gated_rms_norm_kernel as kernel
from streamssm.testing import compile_for_sm90

for half, groups in (("*bf16", 1), ("*fp32", 2)):
    compile_for_sm90(kernel, dict(TWO_ROUNDINGS=groups > 1, BLOCK_S=1024 // groups),
                     lambda a: "*fp32" if a == "p_w" else half, 4, scalars={"eps": "fp32"})
"""


def test_kernel_compiles_for_sm90():
    """The kernel compiles to sm_90 binaries, bf16 and fp32 (Triton's bundled ptxas, no GPU)."""
    assert_script_compiles_for_sm90(SM90_COMPILE)


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 4])
def test_serving_shape_on_gpu(groups):
    """The 4 x d512 LM's output norm: 16 streams x 320 tokens x 1024 channels, bf16, z a slice
    of the in_proj output."""
    y, z, w = inputs((16, 320, 1024), torch.bfloat16, device="cuda", z_pad=1296)
    with torch.no_grad():
        got = gated_rms_norm(y, z, w, 1e-5, groups)
    ref = gated_rms_norm_ref(y, z, w, 1e-5, groups)
    assert_close("gpu gated norm", ref.float(), got.float(), rtol=1.6e-2, atol=1.6e-2)
    assert (got != ref).float().mean() < 0.01  # rounding differs on a few elements at most
