"""Public ops reject bad input with a ShapeError/ConfigError naming the op and the argument."""

import pytest
import torch

from streamssm.errors import ConfigError, ShapeError
from streamssm.kernels import causal_conv1d, mamba3_scan, mamba3_step, selective_scan, ssd_scan, ssd_step


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


def mamba3_inputs(b=1, l=6, h=2, p=3, g=1, n=4):
    return ssd_inputs(b, l, h, p, g, n) | dict(lam=torch.rand(b, l, h), theta=torch.randn(b, l, g, n // 2))


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(B=torch.randn(1, 6, 3, 4), C=torch.randn(1, 6, 3, 4), theta=torch.randn(1, 6, 3, 2)),
         "mamba3_scan: heads: 2 is not divisible"),  # the same check and words as ssd_scan's
        (dict(D=torch.rand(2, 4)), "mamba3_scan: D must have shape"),
        (dict(lam=torch.rand(1, 6, 3)), "mamba3_scan: lam must have shape"),
    ],
)
def test_mamba3_scan_names_the_bad_argument(change, needle):
    with pytest.raises(ShapeError, match=needle):
        mamba3_scan(**(mamba3_inputs() | change))


def test_mamba3_scan_names_itself_for_a_bad_chunk_size():
    """The chunk size went unchecked to the inner ssd_scan, whose error named the wrong op."""
    with pytest.raises(ConfigError, match="mamba3_scan: chunk_size must be positive"):
        mamba3_scan(**mamba3_inputs(), chunk_size=0)


def test_mamba3_step_checks_the_carry_pool():
    t = {k: v[:, 0] for k, v in mamba3_inputs(b=2).items() if k != "A"}
    with pytest.raises(ShapeError, match="mamba3_step: carry must have shape"):
        mamba3_step(torch.zeros(2, 2, 3, 4), torch.zeros(2, 5), A=-torch.rand(2), **t)


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
