"""The vectorizable exp, log, SiLU and softplus of the C kernels (kernels/cpu_math.py) against
float64 over their whole input ranges, through a library of loops built from the snippet."""

import ctypes

import pytest
import torch

from streamssm.kernels.cpu_library import build_library
from streamssm.kernels.cpu_math import ROWS16, VECTOR_MATH

FUNCTIONS = ("exp", "log", "silu", "softplus")
_WRAPPERS = VECTOR_MATH + ROWS16 + "".join(
    f'extern "C" void apply_{name}(int64_t m, const float* x, float* y) '
    f"{{ for (int64_t i = 0; i < m; ++i) y[i] = streamssm_{name}(x[i]); }}\n"
    for name in FUNCTIONS) + r"""
// 16 at a time (m a multiple of 16): the vector exp, and the sum of each of 16 vectors' lanes
extern "C" void apply_exp16(int64_t m, const float* x, float* y) {
    for (int64_t i = 0; i < m; i += 16) {
        float16v v;
        std::memcpy(&v, x + i, sizeof v);
        v = streamssm_exp16(v);
        std::memcpy(y + i, &v, sizeof v);
    }
}
extern "C" void apply_sum_rows16(int64_t m, const float* x, float* y) {  // x (m / 256, 16, 16) -> y (m / 256, 16)
    for (int64_t i = 0; i < m; i += 256) {
        float16v rows[16];
        std::memcpy(rows, x + i, sizeof rows);
        const float16v sums = streamssm_sum_rows16(rows);
        std::memcpy(y + i / 16, &sums, sizeof sums);
    }
}
"""


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


def test_vector_exp_equals_the_scalar_exp_to_rounding(math_library):
    """The 16-lane exp over [-87, 88] within the scalar exp's bound of float64, and clamped alike."""
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_000), torch.tensor([-1e4, -100.0, 100.0, 1e4] * 4)])
    got, want = apply(math_library, "exp16", x).double(), x.double().clamp(-87.0, 88.0).exp()
    assert ((got - want).abs() / want).max() < 4e-7


def test_sum_rows16_sums_each_vector(math_library):
    """Lane r of the tree's result is the sum of the 16 lanes of vector r (in order: no permutation)."""
    x = torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0] = torch.arange(256.0).view(16, 16)  # exact sums: any permutation of the rows would show
    y = torch.empty(8, 16)
    lib = math_library
    lib.apply_sum_rows16(ctypes.c_int64(x.numel()), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()))
    assert torch.equal(y[0], x[0].sum(-1))
    torch.testing.assert_close(y, x.sum(-1), rtol=1e-6, atol=1e-5)


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
