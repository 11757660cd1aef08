"""The vectorizable exp, log, SiLU and softplus of the C kernels (kernels/cpu_math.py) against
float64 over their whole input ranges, through a library of loops built from the snippet."""

import ctypes

import pytest
import torch

from streamssm.kernels.cpu_library import build_library
from streamssm.kernels.cpu_math import VECTOR_MATH

FUNCTIONS = ("exp", "log", "silu", "softplus")
_WRAPPERS = VECTOR_MATH + "".join(
    f'extern "C" void apply_{name}(int64_t m, const float* x, float* y) '
    f"{{ for (int64_t i = 0; i < m; ++i) y[i] = streamssm_{name}(x[i]); }}\n"
    for name in FUNCTIONS)


@pytest.fixture(scope="module")
def math_library():
    lib = build_library("cpu_math_test", _WRAPPERS)
    if lib is None:
        pytest.skip("no C++ compiler builds the C kernels here")
    return lib


def apply(lib, name: str, x: torch.Tensor) -> torch.Tensor:
    x = x.float().contiguous()
    y = torch.empty_like(x)
    fn = getattr(lib, f"apply_{name}")
    fn(ctypes.c_int64(x.numel()), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()))
    return y


def test_exp_relative_error(math_library):
    """exp over [-87, 88] (the clamp's range) within 3 ulp-ish (4e-7 relative) of float64; beyond it
    clamped, no inf or denormal."""
    x = torch.linspace(-87.0, 88.0, 200_001)
    got, want = apply(math_library, "exp", x).double(), x.double().exp()
    assert ((got - want).abs() / want).max() < 4e-7
    edge = apply(math_library, "exp", torch.tensor([-1e4, -100.0, 100.0, 1e4]))
    assert torch.isfinite(edge).all() and (edge[:2] >= torch.finfo(torch.float32).tiny).all()


def test_log_relative_error(math_library):
    """log of positive normal floats from 1e-30 to 1e30 within 2e-7 absolute+relative of float64."""
    x = torch.logspace(-30, 30, 200_001)
    got, want = apply(math_library, "log", x).double(), x.double().log()
    assert ((got - want).abs() / want.abs().clamp_min(1.0)).max() < 2e-7


@pytest.mark.parametrize("name, reference", [("silu", torch.nn.functional.silu),
                                             ("softplus", torch.nn.functional.softplus)])
def test_activations_match_pytorch(math_library, name, reference):
    """SiLU and softplus (PyTorch's threshold 20 and its tiny outputs far left) within float32
    rounding of PyTorch's in float64 where exp does not clamp (x > -87); beyond, within |x| 2e-38."""
    x = torch.cat([torch.linspace(-100.0, 100.0, 100_001), torch.tensor([-30.0, -15.5, -14.5, 19.9, 20.1, 0.0])])
    got, want = apply(math_library, name, x).double(), reference(x.double())
    error = (got - want).abs()
    inside = x > -87.0
    assert (error[inside] / want[inside].abs().clamp_min(1e-30)).max() < 1e-6
    assert (error[~inside] / x[~inside].abs()).max() < 2e-38
