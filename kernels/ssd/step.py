"""Triton single step of the Mamba-2 SSD recurrence over a state pool (in place).

Shape legend: b batch (live streams), h heads, p headdim, n dstate, g groups of B/C, P pool rows.

    dt   = softplus(dt + dt_bias)                          (b, h)   bias / softplus optional
    S    = exp(dt * A) * S + dt * x B^T                    S = ssm_state[rows[i], head] (p, n) fp32
    y    = S C + D * x;  y *= silu(z)                      (b, h, p)
    ssm_state[rows[i]] = S                                 in place; other pool rows untouched

Head k reads B/C of group ``k // (h // g)``. Matches ``ssd_step_ref`` (fp32 math). One program
per (stream, head, block of headdim) holding a (BLOCK_P, n) tile of the state: the step is
memory-bound on reading and writing the fp32 state once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._triton import silu, softplus


@triton.jit
def _ssd_step_kernel(
    # pointers
    p_state, p_x, p_dt, p_A, p_B, p_C, p_D, p_z, p_dt_bias, p_y, p_rows,
    # dimensions
    p, n, heads_per_group,
    # strides
    s_sp, s_sh, s_sp_, s_sn, s_xb, s_xh, s_xp, s_dtb, s_dth,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Dh, s_Dp, s_zb, s_zh, s_zp, s_yb, s_yh, s_yp,
    # meta-parameters
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0)  # stream
    hd = tl.program_id(1)  # head
    o_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < p, o_n < n
    m_pn = m_p[:, None] & m_n[None, :]
    row = tl.load(p_rows + i).to(tl.int64)
    p_s = p_state + row * s_sp + hd * s_sh + o_p[:, None] * s_sp_ + o_n[None, :] * s_sn
    b_s = tl.load(p_s, mask=m_pn, other=0.0)  # (BLOCK_P, BLOCK_N) fp32
    b_dt = tl.load(p_dt + i * s_dtb + hd * s_dth).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(p_dt_bias + hd).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = softplus(b_dt)
    b_dA = tl.exp(b_dt * tl.load(p_A + hd).to(tl.float32))
    grp = hd // heads_per_group
    b_B = tl.load(p_B + i * s_Bb + grp * s_Bg + o_n * s_Bn, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(p_C + i * s_Cb + grp * s_Cg + o_n * s_Cn, mask=m_n, other=0.0).to(tl.float32)
    b_x = tl.load(p_x + i * s_xb + hd * s_xh + o_p * s_xp, mask=m_p, other=0.0).to(tl.float32)
    b_s = b_s * b_dA + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_s, b_s, mask=m_pn)
    b_y = tl.sum(b_s * b_C[None, :], axis=1)  # (BLOCK_P,)
    if HAS_D:
        b_y += b_x * tl.load(p_D + hd * s_Dh + o_p * s_Dp, mask=m_p, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(p_z + i * s_zb + hd * s_zh + o_p * s_zp, mask=m_p, other=0.0).to(tl.float32)
        b_y *= silu(b_z)
    tl.store(p_y + i * s_yb + hd * s_yh + o_p * s_yp, b_y.to(p_y.dtype.element_ty), mask=m_p)


def _block_p(p: int, n: int, streams_x_heads: int) -> int:
    """Headdim rows per program: 1024 state elements (4 KiB fp32) per program, 2048 once there
    are >= 1024 (stream, head) pairs. Measured on the H100 (H24 P64 N128, graph, µs/call:
    BLOCK_P 8 vs 16): 8 streams 4.38 vs 4.55; 64: 36.6 vs 36.6; 256: 150.8 vs 149.0; 512: 300.0 vs 294.1."""
    elements = 2048 if streams_x_heads >= 1024 else 1024
    return max(1, min(triton.next_power_of_2(p), elements // triton.next_power_of_2(n)))


def ssd_step_triton(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    rows: torch.Tensor,
    block_p: int | None = None,
) -> torch.Tensor:
    """ssm_state (P, h, p, n) fp32 **updated in place** at ``rows`` (b,) int64; x, z (b, h, p);
    dt (b, h); A (h,); B, C (b, g, n); D (h,) or (h, p); dt_bias (h,). Returns y (b, h, p) in
    x.dtype. ``block_p`` overrides the headdim tile (benchmarks). Validated by ``ssd_step``."""
    b, h, p = x.shape
    n = B.shape[2]
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    if b == 0:
        return y
    block_n = triton.next_power_of_2(n)
    block_p = block_p or _block_p(p, n, b * h)
    if D is not None:
        s_D = (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))
    else:
        s_D = (0, 0)
    s_z = z.stride() if z is not None else (0, 0, 0)
    grid = (b, h, triton.cdiv(p, block_p))
    _ssd_step_kernel[grid](
        ssm_state, x, dt, A, B, C, D if D is not None else A, z if z is not None else x,
        dt_bias if dt_bias is not None else A, y, rows,
        p, n, h // B.shape[1],
        *ssm_state.stride(), *x.stride(), *dt.stride(),
        *B.stride(), *C.stride(), *s_D, *s_z, *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=bool(dt_softplus), BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=4,
    )
    return y
