"""Triton single step of the Mamba-1 selective scan over a state pool (in place).

Shape legend: b batch (live streams), d channels, n dstate, g groups of B/C, P pool rows.

    dt   = softplus(delta + delta_bias)                      (b, d)   bias / softplus optional
    S    = exp(dt * A) * S + (dt * u) B                      S = ssm_state[rows[i]] (d, n) fp32
    y    = (S C).sum(n) + D * u;  y *= silu(z)               (b, d)
    ssm_state[rows[i]] = S                                   in place; other pool rows untouched

Channel c reads B/C of group ``c // (d // g)``. Matches ``selective_scan_step_ref`` (fp32 math).
One program per (stream, block of channels) holding a (BLOCK_D, n) tile of the state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._triton import silu, softplus


@triton.jit
def _selective_scan_step_kernel(
    # pointers
    p_state, p_u, p_dt, p_A, p_B, p_C, p_D, p_z, p_dt_bias, p_y, p_rows,
    # dimensions
    d, n, chans_per_group_B, chans_per_group_C,
    # strides
    s_sp, s_sd, s_sn, s_ub, s_ud, s_dtb, s_dtd, s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_zb, s_zd, s_yb, s_yd,
    # meta-parameters
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0)  # stream
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_d, m_n = o_d < d, o_n < n
    m_dn = m_d[:, None] & m_n[None, :]
    row = tl.load(p_rows + i).to(tl.int64)
    p_s = p_state + row * s_sp + o_d[:, None] * s_sd + o_n[None, :] * s_sn
    b_s = tl.load(p_s, mask=m_dn, other=0.0)  # (BLOCK_D, BLOCK_N) fp32
    b_u = tl.load(p_u + i * s_ub + o_d * s_ud, mask=m_d, other=0.0).to(tl.float32)
    b_dt = tl.load(p_dt + i * s_dtb + o_d * s_dtd, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(p_dt_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = softplus(b_dt)
    b_A = tl.load(p_A + o_d[:, None] * s_Ad + o_n[None, :] * s_An, mask=m_dn, other=0.0)
    o_gB = o_d // chans_per_group_B  # group of each channel in B and in C
    o_gC = o_d // chans_per_group_C
    b_B = tl.load(p_B + i * s_Bb + o_gB[:, None] * s_Bg + o_n[None, :] * s_Bn, mask=m_dn, other=0.0).to(tl.float32)
    b_C = tl.load(p_C + i * s_Cb + o_gC[:, None] * s_Cg + o_n[None, :] * s_Cn, mask=m_dn, other=0.0).to(tl.float32)
    b_s = tl.exp(b_dt[:, None] * b_A) * b_s + (b_dt * b_u)[:, None] * b_B
    tl.store(p_s, b_s, mask=m_dn)
    b_y = tl.sum(b_s * b_C, axis=1)
    if HAS_D:
        b_y += b_u * tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(p_z + i * s_zb + o_d * s_zd, mask=m_d, other=0.0).to(tl.float32)
        b_y *= silu(b_z)
    tl.store(p_y + i * s_yb + o_d * s_yd, b_y.to(p_y.dtype.element_ty), mask=m_d)


def selective_scan_step_triton(
    ssm_state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    rows: torch.Tensor,
) -> torch.Tensor:
    """ssm_state (P, d, n) fp32 **updated in place** at ``rows`` (b,) int64; u, delta, z (b, d);
    A (d, n); B, C (b, n) or (b, g, n); D, delta_bias (d,). Returns y (b, d) in u.dtype.
    Inputs validated by ``selective_scan_step``."""
    b, d = u.shape
    n = A.shape[1]
    y = torch.empty(b, d, device=u.device, dtype=u.dtype)
    if b == 0:
        return y
    B3 = B if B.dim() == 3 else B.unsqueeze(1)  # (b, g, n)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(triton.next_power_of_2(d), 2048 // block_n))
    grid = (b, triton.cdiv(d, block_d))
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    _selective_scan_step_kernel[grid](
        ssm_state, u, delta, A, B3, C3, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, y, rows,
        d, n, d // B3.shape[1], d // C3.shape[1],
        *ssm_state.stride(), *u.stride(), *delta.stride(), *A.stride(),
        *B3.stride(), *C3.stride(), *zs, *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=delta_bias is not None,
        DT_SOFTPLUS=bool(delta_softplus), BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return y
