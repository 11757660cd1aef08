"""Triton step kernels (conv1d, Mamba-1, SSD) vs the reference steps, on a state pool.

Each case runs the public op twice on copies of one pool, ``backend="reference"`` and
``backend="triton"`` (the interpreter on CPU), with pool rows in a non-sorted order: outputs
and updated rows must match, and every row not in ``state_indices`` must stay bit-identical.
"""

import pytest
import torch

from streamssm.kernels import conv1d_step, selective_scan_step, ssd_step
from streamssm.testing import assert_close

POOL = 6
ROWS = [4, 1, 3]  # non-contiguous, descending then ascending


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def run_both(op, pool: torch.Tensor, rows: list[int], dtype: torch.dtype, **kwargs):
    """Run ``op`` with both backends on clones of ``pool``; compare outputs and pools."""
    idx = torch.tensor(rows, device=pool.device)
    pool_ref, pool_tri = pool.clone(), pool.clone()
    key = "conv_state" if op is conv1d_step else "ssm_state"
    y_ref = op(**{key: pool_ref}, **kwargs, state_indices=idx, backend="reference")
    y_tri = op(**{key: pool_tri}, **kwargs, state_indices=idx, backend="triton")
    assert y_tri.dtype == y_ref.dtype
    assert_close(f"{op.__name__} y", y_ref, y_tri, dtype)
    assert_close(f"{op.__name__} updated rows", pool_ref[idx], pool_tri[idx], dtype)
    untouched = [r for r in range(pool.shape[0]) if r not in rows]
    assert torch.equal(pool_tri[untouched], pool[untouched]), "rows outside state_indices changed"
    assert not torch.equal(pool_tri[idx], pool[idx]), "the step did not update the pool"
    return y_tri


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("has_bias,activation", [(True, "silu"), (False, None)])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_conv1d_step(width, has_bias, activation, state_dtype):
    dev, d = device(), 10
    g = torch.Generator().manual_seed(width)
    pool = torch.randn(POOL, d, width - 1, generator=g).to(dev, state_dtype)
    x = strided(torch.randn(len(ROWS), d, generator=g).to(dev))
    weight = torch.randn(d, width, generator=g).to(dev)
    bias = torch.randn(d, generator=g).to(dev) if has_bias else None
    # a bf16 pool compares at bf16 tolerance (the interpreter rounds fp32 -> bf16 toward zero)
    run_both(conv1d_step, pool, ROWS, state_dtype, x=x, weight=weight, bias=bias, activation=activation)


@pytest.mark.parametrize("groups", [0, 1, 2])  # 0: B, C of shape (b, n)
@pytest.mark.parametrize("full", [True, False])  # D, z, delta_bias, softplus on / off
def test_selective_scan_step(groups, full):
    dev, d, n, b = device(), 12, 5, len(ROWS)
    g = torch.Generator().manual_seed(groups)
    pool = torch.randn(POOL, d, n, generator=g).to(dev)
    bc_shape = (b, n) if groups == 0 else (b, groups, n)
    kwargs = dict(
        u=strided(torch.randn(b, d, generator=g).to(dev)),
        delta=(torch.randn(b, d, generator=g) * 3).to(dev),  # wide range: both softplus branches
        A=-torch.rand(d, n, generator=g).to(dev) - 0.1,
        B=torch.randn(*bc_shape, generator=g).to(dev),
        C=torch.randn(*bc_shape, generator=g).to(dev),
        D=torch.randn(d, generator=g).to(dev) if full else None,
        z=torch.randn(b, d, generator=g).to(dev) if full else None,
        delta_bias=torch.randn(d, generator=g).to(dev) if full else None,
        delta_softplus=full,
    )
    if not full:
        kwargs["delta"] = kwargs["delta"].abs()
    run_both(selective_scan_step, pool, ROWS, torch.float32, **kwargs)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("d_shape", ["h", "hp", None])
@pytest.mark.parametrize("has_z", [True, False])
def test_ssd_step(groups, d_shape, has_z):
    dev, h, p, n, b = device(), 4, 6, 5, len(ROWS)
    g = torch.Generator().manual_seed(groups)
    pool = torch.randn(POOL, h, p, n, generator=g).to(dev)
    D = {"h": torch.randn(h, generator=g), "hp": torch.randn(h, p, generator=g), None: None}[d_shape]
    kwargs = dict(
        x=strided(torch.randn(b, h, p, generator=g).to(dev)),
        dt=(torch.randn(b, h, generator=g) * 3).to(dev),
        A=-torch.rand(h, generator=g).to(dev) - 0.1,
        B=torch.randn(b, groups, n, generator=g).to(dev),
        C=strided(torch.randn(b, groups, n, generator=g).to(dev)),
        D=None if D is None else D.to(dev),
        z=torch.randn(b, h, p, generator=g).to(dev) if has_z else None,
        dt_bias=torch.randn(h, generator=g).to(dev),
        dt_softplus=True,
    )
    run_both(ssd_step, pool, ROWS, torch.float32, **kwargs)


def test_softplus_extremes_and_bf16_inputs():
    """dt far in both softplus tails, bf16 inputs with an fp32 state."""
    dev, h, p, n, b = device(), 2, 4, 8, 2
    g = torch.Generator().manual_seed(7)
    pool = torch.randn(POOL, h, p, n, generator=g).to(dev)
    bf = torch.bfloat16
    run_both(
        ssd_step, pool, [5, 0], bf,
        x=torch.randn(b, h, p, generator=g).to(dev, bf), dt=torch.tensor([[-30.0, 25.0], [-8.0, 0.5]]).to(dev, bf),
        A=-torch.rand(h, generator=g).to(dev), B=torch.randn(b, 1, n, generator=g).to(dev, bf),
        C=torch.randn(b, 1, n, generator=g).to(dev, bf), D=torch.randn(h, generator=g).to(dev),
        z=None, dt_bias=None, dt_softplus=True,
    )


def test_steps_repeat_over_time_match_the_reference():
    """Several consecutive steps on the same pool rows accumulate like the reference."""
    dev, d, n = device(), 8, 4
    g = torch.Generator().manual_seed(11)
    pool_ref = torch.zeros(POOL, d, n, device=dev)
    pool_tri = pool_ref.clone()
    idx = torch.tensor([2, 5], device=dev)
    A = -torch.rand(d, n, generator=g).to(dev)
    for _ in range(4):
        args = [torch.randn(2, d, generator=g).to(dev), torch.rand(2, d, generator=g).to(dev), A,
                torch.randn(2, n, generator=g).to(dev), torch.randn(2, n, generator=g).to(dev)]
        y_ref = selective_scan_step(pool_ref, *args, state_indices=idx, backend="reference")
        y_tri = selective_scan_step(pool_tri, *args, state_indices=idx, backend="triton")
        assert_close("repeated step y", y_ref, y_tri)
    assert_close("repeated step pool", pool_ref, pool_tri)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 512])
def test_ssd_step_bf16_benchmark_shape_gpu(batch):
    """The benchmark layer (H24 P64 N128), bf16 inputs, pool of 2 x batch rows, random rows."""
    h, p, n = 24, 64, 128
    g = torch.Generator().manual_seed(batch)
    pool = torch.randn(2 * batch, h, p, n, generator=g).cuda()
    rows = torch.randperm(2 * batch, generator=g)[:batch].tolist()
    bf = torch.bfloat16
    run_both(
        ssd_step, pool, rows, bf,
        x=torch.randn(batch, h, p, generator=g).cuda().to(bf), dt=torch.randn(batch, h, generator=g).cuda().to(bf),
        A=-torch.rand(h, generator=g).cuda() * 8, B=torch.randn(batch, 1, n, generator=g).cuda().to(bf),
        C=torch.randn(batch, 1, n, generator=g).cuda().to(bf), D=torch.randn(h, generator=g).cuda(),
        z=torch.randn(batch, h, p, generator=g).cuda().to(bf), dt_bias=torch.randn(h, generator=g).cuda(),
        dt_softplus=True,
    )


@pytest.mark.gpu
def test_mamba1_and_conv_step_bf16_gpu():
    g = torch.Generator().manual_seed(0)
    bf, b, d, n = torch.bfloat16, 64, 1536, 16
    pool = torch.randn(128, d, n, generator=g).cuda()
    rows = torch.randperm(128, generator=g)[:b].tolist()
    run_both(
        selective_scan_step, pool, rows, bf,
        u=torch.randn(b, d, generator=g).cuda().to(bf), delta=torch.randn(b, d, generator=g).cuda().to(bf),
        A=-torch.rand(d, n, generator=g).cuda(), B=torch.randn(b, n, generator=g).cuda().to(bf),
        C=torch.randn(b, n, generator=g).cuda().to(bf), D=torch.randn(d, generator=g).cuda(),
        z=torch.randn(b, d, generator=g).cuda().to(bf), delta_bias=torch.randn(d, generator=g).cuda(),
        delta_softplus=True,
    )
    conv_pool = torch.randn(128, d, 3, generator=g).cuda().to(bf)
    run_both(conv1d_step, conv_pool, rows, bf, x=torch.randn(b, d, generator=g).cuda().to(bf),
             weight=torch.randn(d, 4, generator=g).cuda(), bias=torch.randn(d, generator=g).cuda())


@pytest.mark.parametrize("block_p", [2, 16])
def test_ssd_step_headdim_tiles(block_p):
    """Other headdim tiles than the default (partial last tile at p=6; whole p in one tile)."""
    from streamssm.kernels.ssd.reference import ssd_step_ref
    from streamssm.kernels.ssd.step import ssd_step_triton

    dev, h, p, n, b = device(), 2, 6, 4, 2
    g = torch.Generator().manual_seed(block_p)
    pool = torch.randn(POOL, h, p, n, generator=g).to(dev)
    rows = torch.tensor([3, 1], device=dev)
    args = [torch.randn(b, h, p, generator=g).to(dev), torch.rand(b, h, generator=g).to(dev),
            -torch.rand(h, generator=g).to(dev), torch.randn(b, 1, n, generator=g).to(dev),
            torch.randn(b, 1, n, generator=g).to(dev), torch.randn(h, p, generator=g).to(dev), None, None]
    y_ref, new_ref = ssd_step_ref(pool[rows], *args[:5], D=args[5])
    out = pool.clone()
    y = ssd_step_triton(out, *args, False, rows, block_p=block_p)
    assert_close("ssd tile y", y_ref, y)
    assert_close("ssd tile state", new_ref, out[rows])
    assert torch.equal(out[[0, 2, 4, 5]], pool[[0, 2, 4, 5]])
