"""Mamba-3 ops (trapezoidal discretization, rotating complex state): validated, dispatched.

    mamba3_scan   x, z (b, l, h, p); dt, lam (b, l, h); B, C (b, l, g, n); theta (b, l, g, n/2)
    mamba3_step   one step over a state pool, **in place** at ``state_indices``

States: ``ssm`` (b, h, p, n) fp32 and ``carry`` (b, h*p + g*n) fp32 (the previous step's x and
B). The recurrence is written in ``reference.py``; ``chunked.py`` runs it as two SSD scans
(Triton on CUDA), ``step.py`` is the Triton step kernel.
"""

from __future__ import annotations

import torch

from streamssm.errors import ShapeError
from streamssm.kernels._common import Backend, check_positive_length, check_tensor, choose_backend, pool_rows

FP32 = (torch.float32,)


def _check_common(op: str, x_shape: tuple, B: torch.Tensor, C: torch.Tensor, theta: torch.Tensor, A: torch.Tensor,
                  D: torch.Tensor | None, device: torch.device) -> tuple[int, int]:
    """Checks shared by scan and step (B/C/theta carry the time dim or not); returns (g, n)."""
    h, p = x_shape[-2], x_shape[-1]
    lead = x_shape[:-2]
    check_tensor(op, "B", B, (*lead, None, None), device=device)
    g, n = B.shape[-2], B.shape[-1]
    if h % g:
        raise ShapeError(f"{op}: heads={h} must be divisible by the groups of B ({g})")
    if n % 2:
        raise ShapeError(f"{op}: d_state n={n} must be even (pairs form the complex state)")
    check_tensor(op, "C", C, (*lead, g, n), device=device)
    check_tensor(op, "theta", theta, (*lead, g, n // 2), device=device)
    check_tensor(op, "A", A, (h,), FP32, device=device)
    if D is not None:
        check_tensor(op, "D", D, (h,) if D.dim() == 1 else (h, p), FP32, device=device)
    return g, n


def mamba3_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    initial_carry: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    backend: Backend = "auto",
):
    """Mamba-3 over a chunk. dt > 0 (softplus applied by the caller), lam in [0, 1], theta in
    rad per unit dt. Returns y (b, l, h, p) [, final_state (b, h, p, n), final_carry]."""
    op = "mamba3_scan"
    check_tensor(op, "x", x, (None, None, None, None))
    b, l, h, p = x.shape
    check_positive_length(op, "x", l)
    g, n = _check_common(op, x.shape, B, C, theta, A, D, x.device)
    check_tensor(op, "dt", dt, (b, l, h), device=x.device)
    check_tensor(op, "lam", lam, (b, l, h), device=x.device)
    check_tensor(op, "z", z, (b, l, h, p), device=x.device, optional=True)
    check_tensor(op, "initial_state", initial_state, (b, h, p, n), FP32, device=x.device, optional=True)
    check_tensor(op, "initial_carry", initial_carry, (b, h * p + g * n), FP32, device=x.device, optional=True)
    args = (x, dt, A, B, C, lam, theta, D, z, initial_state, initial_carry, return_final_state)
    resolved = choose_backend(op, backend, x.device)
    if resolved == "reference":
        from streamssm.kernels.mamba3.reference import mamba3_scan_ref

        return mamba3_scan_ref(*args)
    from streamssm.kernels.mamba3.chunked import mamba3_scan_chunked

    return mamba3_scan_chunked(*args, chunk_size=chunk_size, backend=resolved)


def mamba3_step(
    ssm_state: torch.Tensor,
    carry: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """One step; **updates ``ssm_state`` (pool, h, p, n) and ``carry`` (pool, h*p + g*n) in
    place** at ``state_indices`` (b,) (default 0..b-1). x, z (b, h, p); dt, lam (b, h);
    B, C (b, g, n); theta (b, g, n/2). Returns y (b, h, p)."""
    op = "mamba3_step"
    check_tensor(op, "x", x, (None, None, None))
    b, h, p = x.shape
    g, n = _check_common(op, x.shape, B, C, theta, A, D, x.device)
    check_tensor(op, "dt", dt, (b, h), device=x.device)
    check_tensor(op, "lam", lam, (b, h), device=x.device)
    check_tensor(op, "z", z, (b, h, p), device=x.device, optional=True)
    check_tensor(op, "ssm_state", ssm_state, (None, h, p, n), FP32, device=x.device)
    check_tensor(op, "carry", carry, (ssm_state.shape[0], h * p + g * n), FP32, device=x.device)
    for name, pool in (("ssm_state", ssm_state), ("carry", carry)):
        if not pool.is_contiguous():
            raise ShapeError(f"{op}: {name} must be contiguous (it is updated in place)")
    rows = pool_rows(op, ssm_state, b, state_indices)
    if choose_backend(op, backend, x.device) == "triton":
        from streamssm.kernels.mamba3.step import mamba3_step_triton

        return mamba3_step_triton(ssm_state, carry, x, dt, A, B, C, lam, theta, D, z, rows)
    from streamssm.kernels.mamba3.reference import mamba3_step_ref

    y, new_state, new_carry = mamba3_step_ref(ssm_state.index_select(0, rows), carry.index_select(0, rows), x, dt, A,
                                              B, C, lam, theta, D, z)
    ssm_state.index_copy_(0, rows, new_state)
    carry.index_copy_(0, rows, new_carry)
    return y


__all__ = ["mamba3_scan", "mamba3_step"]
