"""The fast in-place CPU steps (``kernels/*/step_cpu.py``, backend "torch") vs the references.

Each case runs the public op on two copies of one pool, ``backend="reference"`` and
``backend="torch"``: outputs and updated rows match to fp32 parity tolerance, rows not named
stay bit-identical. Rows cover the pool's slice (default rows, an explicit prefix, a run that
starts later) and the gather/scatter path (permuted, a subset, a non-contiguous pool).
"""

import pytest
import torch
from streamssm.kernels import conv1d_step, selective_scan_step, ssd_step
from streamssm.kernels.ssd import scan_cpu

from streamssm.testing import PARITY_FP32, assert_close

POOL = 7
# None: state_indices omitted (the pool has exactly b rows)
ROWS = {"default": None, "prefix": [0, 1, 2], "run": [3, 4, 5], "permuted": [2, 0, 1],
        "subset": [6, 1, 4], "single": [5]}


def run_both(op, pool: torch.Tensor, rows: list[int] | None, y_dtype: torch.dtype = torch.float32, **kwargs):
    """Run ``op`` with both backends on clones of ``pool``; compare y and the pools."""
    key = "conv_state" if op is conv1d_step else "ssm_state"
    idx = None if rows is None else torch.tensor(rows)
    pool_ref, pool_cpu = pool.clone(), pool.clone()
    y_ref = op(**{key: pool_ref}, **kwargs, state_indices=idx, backend="reference")
    y_cpu = op(**{key: pool_cpu}, **kwargs, state_indices=idx, backend="torch")
    assert y_cpu.dtype == y_ref.dtype
    rtol, atol = PARITY_FP32 if y_dtype == torch.float32 else (None, None)
    assert_close(f"{op.__name__} y", y_ref, y_cpu, y_dtype, rtol=rtol, atol=atol)
    assert_close(f"{op.__name__} pool", pool_ref, pool_cpu, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    named = range(pool.shape[0]) if rows is None else rows
    untouched = [r for r in range(pool.shape[0]) if r not in named]
    assert torch.equal(pool_cpu[untouched], pool[untouched]), "rows outside state_indices changed"
    assert not torch.equal(pool_cpu[list(named)], pool[list(named)]), "the step did not update the pool"


def pool_for(rows: list[int] | None, b: int, *shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(b if rows is None else POOL, *shape, generator=gen)


def batch_of(rows: list[int] | None) -> int:
    return 3 if rows is None else len(rows)


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("groups", [0, 1, 4])  # 0: B, C of shape (b, n)
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-softplus", "plain"])
def test_selective_scan_step_cpu(rows, groups, full):
    d, n, b = 12, 5, batch_of(rows)
    g = torch.Generator().manual_seed(groups)
    bc_shape = (b, n) if groups == 0 else (b, groups, n)
    delta = torch.randn(b, d, generator=g) * 8  # both softplus tails (threshold 20 included)
    run_both(
        selective_scan_step, pool_for(rows, b, d, n, gen=g), rows,
        u=torch.randn(b, d, generator=g), delta=delta if full else delta.abs(),
        A=-torch.rand(d, n, generator=g) * 4 - 0.1, B=torch.randn(*bc_shape, generator=g),
        C=torch.randn(*bc_shape[:-1], 2 * n, generator=g)[..., ::2],  # non-contiguous
        D=torch.randn(d, generator=g) if full else None, z=torch.randn(b, d, generator=g) if full else None,
        delta_bias=torch.randn(d, generator=g) if full else None, delta_softplus=full,
    )


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("d_shape", ["h", "hp", None])
@pytest.mark.parametrize("has_z", [True, False])
@pytest.mark.parametrize("c_scan", [True, False], ids=["C scan", "torch ops"])
def test_ssd_step_cpu(monkeypatch, rows, groups, d_shape, has_z, c_scan):
    """Both ways of the CPU step: the C scan one step long (where a compiler builds it) and the
    in-place PyTorch ops."""
    library, used = scan_cpu.library, []
    if c_scan and library() is None:
        pytest.skip("no C++ compiler builds the CPU scan here")
    monkeypatch.setattr(scan_cpu, "library", lambda: used.append(1) or (library() if c_scan else None))
    h, p, n, b = 4, 6, 5, batch_of(rows)
    g = torch.Generator().manual_seed(groups)
    D = {"h": torch.randn(h, generator=g), "hp": torch.randn(h, p, generator=g), None: None}[d_shape]
    xbc = torch.randn(b, h * p + 2 * groups * n, generator=g)  # B, C as the layer's non-contiguous slices
    B, C = xbc[:, h * p:].split(groups * n, dim=-1)
    run_both(
        ssd_step, pool_for(rows, b, h, p, n, gen=g), rows,
        x=xbc[:, :h * p].view(b, h, p), dt=torch.randn(b, h, generator=g) * 8, A=-torch.rand(h, generator=g) - 0.1,
        B=B.view(b, groups, n), C=C.view(b, groups, n), D=D,
        z=torch.randn(b, h, p, generator=g) if has_z else None, dt_bias=torch.randn(h, generator=g), dt_softplus=True,
    )
    assert used, "the CPU step did not ask for the C scan"


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("has_bias,activation", [(True, "silu"), (False, None)])
def test_conv1d_step_cpu(rows, width, has_bias, activation):
    d, b = 10, batch_of(rows)
    g = torch.Generator().manual_seed(width)
    run_both(
        conv1d_step, pool_for(rows, b, d, width - 1, gen=g), rows,
        x=torch.randn(b, d, generator=g), weight=torch.randn(d, width, generator=g),
        bias=torch.randn(d, generator=g) if has_bias else None, activation=activation,
    )


def test_bf16_inputs_with_fp32_state():
    """bf16 activations, fp32 SSM state (and a bf16 conv state): y at bf16 tolerance."""
    g = torch.Generator().manual_seed(3)
    bf, b, d, n, h, p = torch.bfloat16, 3, 8, 4, 2, 4
    rows = ROWS["subset"]
    run_both(
        selective_scan_step, torch.randn(POOL, d, n, generator=g), rows, bf,
        u=torch.randn(b, d, generator=g).to(bf), delta=torch.randn(b, d, generator=g).to(bf),
        A=-torch.rand(d, n, generator=g), B=torch.randn(b, n, generator=g).to(bf),
        C=torch.randn(b, n, generator=g).to(bf), D=torch.randn(d, generator=g), z=torch.randn(b, d, generator=g).to(bf),
        delta_bias=torch.randn(d, generator=g), delta_softplus=True,
    )
    run_both(
        ssd_step, torch.randn(POOL, h, p, n, generator=g), ROWS["run"], bf,
        x=torch.randn(b, h, p, generator=g).to(bf), dt=torch.randn(b, h, generator=g).to(bf), A=-torch.rand(h, generator=g),
        B=torch.randn(b, 1, n, generator=g).to(bf), C=torch.randn(b, 1, n, generator=g).to(bf),
        D=torch.randn(h, generator=g), z=None, dt_bias=None, dt_softplus=True,
    )
    run_both(conv1d_step, torch.randn(POOL, d, 3, generator=g).to(bf), rows, bf,
             x=torch.randn(b, d, generator=g).to(bf), weight=torch.randn(d, 4, generator=g), bias=None)


def test_non_contiguous_pool_takes_the_gather_path():
    """A strided pool (rows consecutive) is updated through one gather and one scatter."""
    g = torch.Generator().manual_seed(5)
    d, n, b = 6, 4, 3
    wide = torch.randn(POOL, d, 2 * n, generator=g)
    pool = wide[..., ::2]
    assert not pool.is_contiguous()
    args = {"u": torch.randn(b, d, generator=g), "delta": torch.rand(b, d, generator=g),
            "A": -torch.rand(d, n, generator=g), "B": torch.randn(b, n, generator=g), "C": torch.randn(b, n, generator=g)}
    expected = pool.clone()
    y_ref = selective_scan_step(expected, **args, state_indices=torch.tensor([1, 2, 3]), backend="reference")
    y = selective_scan_step(pool, **args, state_indices=torch.tensor([1, 2, 3]), backend="torch")
    assert_close("strided pool y", y_ref, y, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    assert_close("strided pool", expected, pool, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])


def test_repeated_steps_accumulate_like_the_reference():
    """Sixteen steps on the same rows (the generation loop): states stay within parity."""
    g = torch.Generator().manual_seed(11)
    d, n = 8, 4
    pool_ref = torch.zeros(POOL, d, n)
    pool_cpu = pool_ref.clone()
    idx = torch.tensor([2, 3])
    A = -torch.rand(d, n, generator=g)
    for _ in range(16):
        args = [torch.randn(2, d, generator=g), torch.randn(2, d, generator=g), A,
                torch.randn(2, n, generator=g), torch.randn(2, n, generator=g)]
        y_ref = selective_scan_step(pool_ref, *args, delta_softplus=True, state_indices=idx, backend="reference")
        y_cpu = selective_scan_step(pool_cpu, *args, delta_softplus=True, state_indices=idx, backend="torch")
        assert_close("repeated step y", y_ref, y_cpu, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    assert_close("repeated step pool", pool_ref, pool_cpu, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions and methods called inside it."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows,gathers", [(None, False), ([0, 1, 2], False), ([3, 4, 5], False),
                                          ([2, 0, 1], True), ([6, 1, 4], True)])
def test_consecutive_rows_update_the_pool_slice_without_gather(monkeypatch, rows, gathers):
    """backend "auto" on the CPU runs the fast step (not the reference), on the pool's slice
    for consecutive rows and through one gather + one scatter otherwise."""
    from streamssm.kernels.mamba1 import reference

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference step ran")

    monkeypatch.setattr(reference, "selective_scan_step_ref", no_reference)
    g = torch.Generator().manual_seed(1)
    b, d, n = 3, 4, 2
    pool = torch.randn(b if rows is None else POOL, d, n, generator=g)
    with _Calls() as calls:
        selective_scan_step(pool, torch.randn(b, d, generator=g), torch.rand(b, d, generator=g),
                            -torch.rand(d, n, generator=g), torch.randn(b, n, generator=g), torch.randn(b, n, generator=g),
                            state_indices=None if rows is None else torch.tensor(rows))
    assert ("index_select" in calls.names) == gathers
    assert ("index_copy_" in calls.names) == gathers
