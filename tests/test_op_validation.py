"""Public ops reject bad input with a ShapeError/ConfigError naming the op and the argument."""

import pytest
import torch

from streamssm.errors import ConfigError, ShapeError
from streamssm.kernels import (
    causal_conv1d,
    conv1d_step,
    mamba3_scan,
    mamba3_step,
    selective_scan,
    selective_scan_step,
    ssd_scan,
    ssd_step,
)


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


def mamba1_step_inputs(b=2, d=4, n=3, g=None):
    bc = (b, n) if g is None else (b, g, n)
    return dict(ssm_state=torch.zeros(b, d, n), u=torch.randn(b, d), delta=torch.rand(b, d), A=-torch.rand(d, n),
                B=torch.randn(bc), C=torch.randn(bc))


def ssd_step_inputs(b=2, h=2, p=3, g=1, n=4):
    return dict(ssm_state=torch.zeros(b, h, p, n), x=torch.randn(b, h, p), dt=torch.rand(b, h), A=-torch.rand(h),
                B=torch.randn(b, g, n), C=torch.randn(b, g, n))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(D=torch.ones(5)), "selective_scan_step: D must have shape \\(4\\)"),
        (dict(D=torch.ones(1)), "selective_scan_step: D must have shape"),  # broadcast silently before
        (dict(D=torch.ones(4, dtype=torch.float64)), "selective_scan_step: D must have dtype"),
        (dict(z=torch.randn(2, 5)), "selective_scan_step: z must have shape \\(2, 4\\)"),
        (dict(z=torch.randn(1, 4)), "selective_scan_step: z must have shape"),
        (dict(delta_bias=torch.zeros(3)), "selective_scan_step: delta_bias must have shape \\(4\\)"),
        (dict(delta_bias=torch.zeros(4, dtype=torch.float16)), "selective_scan_step: delta_bias must have dtype"),
        (dict(B=torch.randn(2, 3, 3), C=torch.randn(2, 3, 3)), "selective_scan_step: B groups: 4 is not divisible"),
    ],
)
def test_selective_scan_step_names_the_bad_argument(change, needle, backend):
    """The step took wrongly shaped D / z / delta_bias / groups to an indexing error deep inside
    (or broadcast them silently); now the same checks and words as selective_scan's."""
    with pytest.raises(ShapeError, match=needle):
        selective_scan_step(**(mamba1_step_inputs() | change), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(D=torch.ones(3)), "ssd_step: D must have shape \\(2\\)"),
        (dict(D=torch.ones(2, 4)), "ssd_step: D must have shape \\(2, 3\\)"),
        (dict(D=torch.ones(1)), "ssd_step: D must have shape"),  # broadcast silently before
        (dict(D=torch.ones(2, dtype=torch.float64)), "ssd_step: D must have dtype"),
        (dict(z=torch.randn(2, 2, 1)), "ssd_step: z must have shape \\(2, 2, 3\\)"),
        (dict(z=torch.randn(2, 6)), "ssd_step: z must have shape"),
        (dict(dt_bias=torch.zeros(1)), "ssd_step: dt_bias must have shape \\(2\\)"),
        (dict(dt_bias=torch.zeros(2, dtype=torch.bfloat16)), "ssd_step: dt_bias must have dtype"),
        (dict(B=torch.randn(2, 3, 4), C=torch.randn(2, 3, 4)), "ssd_step: heads: 2 is not divisible"),
    ],
)
def test_ssd_step_names_the_bad_argument(change, needle, backend):
    """As selective_scan_step: ssd_scan's checks of D / z / dt_bias / groups, reused."""
    with pytest.raises(ShapeError, match=needle):
        ssd_step(**(ssd_step_inputs() | change), backend=backend)


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(bias=torch.zeros(3)), "conv1d_step: bias must have shape \\(4\\)"),
        (dict(weight=torch.randn(4, 6), conv_state=torch.zeros(2, 4, 5)), "conv1d_step: weight width must be 2..4"),
        (dict(activation="gelu"), "conv1d_step: activation"),
    ],
)
def test_conv1d_step_names_the_bad_argument(change, needle):
    args = dict(x=torch.randn(2, 4), conv_state=torch.zeros(2, 4, 2), weight=torch.randn(4, 3)) | change
    with pytest.raises(ShapeError, match=needle):
        conv1d_step(**args, backend="torch")


@pytest.mark.parametrize("op, inputs", [(selective_scan_step, mamba1_step_inputs(g=2)),
                                        (ssd_step, ssd_step_inputs(g=2))])
def test_step_ops_accept_their_documented_optional_shapes(op, inputs):
    """Grouped B/C and every optional tensor of the right shape pass (D (h, p) for ssd_step)."""
    if op is ssd_step:
        extra = dict(D=torch.ones(2, 3), z=torch.randn(2, 2, 3), dt_bias=torch.zeros(2))
    else:
        extra = dict(D=torch.ones(4), z=torch.randn(2, 4), delta_bias=torch.zeros(4))
    y = op(**inputs, **extra, backend="torch")
    assert y.shape == inputs["u" if op is selective_scan_step else "x"].shape
