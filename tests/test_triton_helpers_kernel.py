"""The shared ``@triton.jit`` helpers (``kernels/_triton.py``) against torch, elementwise in fp32.

softplus is checked in relative error down to x = -80, where log(1 + e^x) computed plainly is
already 0 (below x ~ -17): the kernels' step sizes keep their relative accuracy.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from streamssm.kernels._triton import silu, silu_grad, softplus, softplus_grad

BLOCK = 256


@triton.jit
def _helpers_kernel(p_x, p_sp, p_dsp, p_silu, p_dsilu, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(p_x + o, mask=m, other=0.0)
    tl.store(p_sp + o, softplus(x), mask=m)
    tl.store(p_dsp + o, softplus_grad(x), mask=m)
    tl.store(p_silu + o, silu(x), mask=m)
    tl.store(p_dsilu + o, silu_grad(x), mask=m)


def _inputs() -> torch.Tensor:
    edges = torch.tensor([-80.0, -30.0, -17.5, -1e-6, 0.0, 1e-6, 19.99, 20.0, 20.01, 80.0])
    x = torch.cat([torch.linspace(-80, 80, 1601), edges])
    return x.to("cuda" if torch.cuda.is_available() else "cpu")


def _run_helpers(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: torch.empty_like(x) for k in ("softplus", "softplus_grad", "silu", "silu_grad")}
    _helpers_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, *out.values(), x.numel(), BLOCK=BLOCK)
    return out


def _torch_values(x: torch.Tensor) -> dict[str, torch.Tensor]:
    xd = x.double().requires_grad_()
    sp, si = F.softplus(xd), F.silu(xd)
    (dsp,) = torch.autograd.grad(sp.sum(), xd)
    (dsi,) = torch.autograd.grad(si.sum(), xd)
    return {"softplus": sp.detach(), "softplus_grad": dsp, "silu": si.detach(), "silu_grad": dsi}


@pytest.mark.parametrize("name, rtol, atol", [
    ("softplus", 1e-6, 0.0),  # relative everywhere: tiny step sizes included
    ("softplus_grad", 1e-6, 0.0),
    ("silu", 4e-6, 1e-30),
    ("silu_grad", 4e-6, 1e-7),  # crosses zero near x = -1.28
])
def test_helper_matches_torch(name, rtol, atol):
    x = _inputs()
    got, want = _run_helpers(x)[name], _torch_values(x)[name]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_softplus_is_torch_threshold():
    """Above 20 softplus is x itself and its gradient exactly 1, as in torch."""
    x = _inputs()
    out = _run_helpers(x)
    above = x > 20
    assert torch.equal(out["softplus"][above], x[above])
    assert torch.equal(out["softplus_grad"][above], torch.ones_like(x[above]))
