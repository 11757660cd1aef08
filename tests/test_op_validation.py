"""Public ops reject bad input with a ShapeError/ConfigError naming the op and the argument."""

import pytest
import torch

from streamssm.errors import ConfigError, ShapeError
from streamssm.kernels import causal_conv1d, selective_scan, ssd_scan, ssd_step


def mamba1_inputs(b=1, d=4, n=3, l=5):
    return dict(u=torch.randn(b, d, l), delta=torch.rand(b, d, l), A=-torch.rand(d, n),
                B=torch.randn(b, n, l), C=torch.randn(b, n, l))


def ssd_inputs(b=1, l=6, h=2, p=3, g=1, n=4):
    return dict(x=torch.randn(b, l, h, p), dt=torch.rand(b, l, h), A=-torch.rand(h),
                B=torch.randn(b, l, g, n), C=torch.randn(b, l, g, n))


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(delta=torch.rand(1, 4, 6)), "selective_scan: delta must have shape"),
        (dict(A=-torch.rand(4, 3, dtype=torch.float64)), "selective_scan: A must have dtype"),
        (dict(B=torch.randn(1, 3, 3, 5)), "B groups"),
        (dict(initial_state=torch.zeros(1, 4, 2)), "selective_scan: initial_state must have shape"),
        (dict(u=torch.randn(4, 5)), "selective_scan: u must have shape"),
    ],
)
def test_selective_scan_names_the_bad_argument(change, needle):
    with pytest.raises(ShapeError, match=needle):
        selective_scan(**(mamba1_inputs() | change))


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(dt=torch.rand(1, 6, 3)), "ssd_scan: dt must have shape"),
        (dict(B=torch.randn(1, 6, 3, 4), C=torch.randn(1, 6, 3, 4)), "heads"),
        (dict(C=torch.randn(1, 6, 1, 5)), "ssd_scan: C must have shape"),
        (dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), "cu_seqlens must rise"),
        (dict(cu_seqlens=torch.tensor([0, 2, 6]), initial_state=torch.zeros(1, 2, 3, 4)), "initial_state"),
    ],
)
def test_ssd_scan_names_the_bad_argument(change, needle):
    with pytest.raises(ShapeError, match=needle):
        ssd_scan(**(ssd_inputs() | change))


def test_ssd_scan_rejects_bad_chunk_size():
    with pytest.raises(ConfigError, match="chunk_size"):
        ssd_scan(**ssd_inputs(), chunk_size=0)


def test_causal_conv1d_checks_width_and_activation():
    x = torch.randn(1, 4, 7)
    with pytest.raises(ShapeError, match="width must be 2..4"):
        causal_conv1d(x, torch.randn(4, 5))
    with pytest.raises(ShapeError, match="activation"):
        causal_conv1d(x, torch.randn(4, 3), activation="gelu")


def test_step_without_indices_needs_matching_pool():
    pool = torch.zeros(5, 2, 3, 4)
    with pytest.raises(ShapeError, match="pass state_indices"):
        ssd_step(pool, torch.randn(2, 2, 3), torch.rand(2, 2), -torch.rand(2), torch.randn(2, 1, 4),
                 torch.randn(2, 1, 4))


def test_triton_backend_refuses_when_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="triton"):
        causal_conv1d(torch.randn(1, 4, 7), torch.randn(4, 3), backend="triton")
