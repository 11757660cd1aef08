"""Triton single step of Mamba-3 over a state pool, updating the pool rows in place.

One program per (stream, head): it loads that head's state S (p, n) as real/imaginary
halves (columns 2k / 2k+1), rotates every pair by dt * theta, decays, adds the trapezoid's two
input terms and reads out y = S C + D x (see ``reference.py``). The carry (previous x and B)
is shared by the heads of a group, so the launcher writes the new carry after the kernel.

Shapes: state pool (cap, h, p, n) fp32; carry pool (cap, h*p + g*n) fp32; x, z (b, h, p);
dt, lam (b, h); B, C (b, g, n); theta (b, g, n/2); D (h, p) fp32; rows (b,) int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._triton import silu


@triton.jit
def _mamba3_step_kernel(
    # pointers
    p_state, p_carry, p_x, p_dt, p_A, p_B, p_C, p_lam, p_theta, p_D, p_z, p_y, p_rows,
    # dimensions
    H, P, G, N2,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = i_h // (H // G)
    N = 2 * N2
    row = tl.load(p_rows + i_b).to(tl.int64)
    o_p = tl.arange(0, BLOCK_P)
    o_k = tl.arange(0, BLOCK_N2)
    m_p = o_p < P
    m_k = o_k < N2
    m_pk = m_p[:, None] & m_k[None, :]

    dt = tl.load(p_dt + i_b * H + i_h).to(tl.float32)
    lam = tl.load(p_lam + i_b * H + i_h).to(tl.float32)
    alpha = tl.exp(dt * tl.load(p_A + i_h))
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    angle = dt * tl.load(p_theta + (i_b * G + i_g) * N2 + o_k, mask=m_k, other=0.0).to(tl.float32)
    cos = tl.cos(angle)
    sin = tl.sin(angle)

    p_s = p_state + (row * H + i_h) * P * N + o_p[:, None] * N + 2 * o_k[None, :]
    b_re = tl.load(p_s, mask=m_pk, other=0.0)
    b_im = tl.load(p_s + 1, mask=m_pk, other=0.0)
    p_c = p_carry + row * (H * P + G * N)
    b_xp = tl.load(p_c + i_h * P + o_p, mask=m_p, other=0.0)
    b_bp_re = tl.load(p_c + H * P + i_g * N + 2 * o_k, mask=m_k, other=0.0)
    b_bp_im = tl.load(p_c + H * P + i_g * N + 2 * o_k + 1, mask=m_k, other=0.0)
    o_in = (i_b * G + i_g) * N + 2 * o_k
    b_B_re = tl.load(p_B + o_in, mask=m_k, other=0.0).to(tl.float32)
    b_B_im = tl.load(p_B + o_in + 1, mask=m_k, other=0.0).to(tl.float32)
    b_C_re = tl.load(p_C + o_in, mask=m_k, other=0.0).to(tl.float32)
    b_C_im = tl.load(p_C + o_in + 1, mask=m_k, other=0.0).to(tl.float32)
    b_x = tl.load(p_x + (i_b * H + i_h) * P + o_p, mask=m_p, other=0.0).to(tl.float32)

    rot_re = b_re * cos[None, :] - b_im * sin[None, :]  # R_t S_{t-1}
    rot_im = b_re * sin[None, :] + b_im * cos[None, :]
    bp_re = b_bp_re * cos - b_bp_im * sin  # R_t B_{t-1}
    bp_im = b_bp_re * sin + b_bp_im * cos
    new_re = alpha * rot_re + beta * b_xp[:, None] * bp_re[None, :] + gamma * b_x[:, None] * b_B_re[None, :]
    new_im = alpha * rot_im + beta * b_xp[:, None] * bp_im[None, :] + gamma * b_x[:, None] * b_B_im[None, :]
    tl.store(p_s, new_re, mask=m_pk)
    tl.store(p_s + 1, new_im, mask=m_pk)

    b_y = tl.sum(new_re * b_C_re[None, :] + new_im * b_C_im[None, :], axis=1)
    if HAS_D:
        b_y += tl.load(p_D + i_h * P + o_p, mask=m_p, other=0.0) * b_x
    if HAS_Z:
        b_z = tl.load(p_z + (i_b * H + i_h) * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_y = b_y * silu(b_z)
    tl.store(p_y + (i_b * H + i_h) * P + o_p, b_y.to(p_y.dtype.element_ty), mask=m_p)


def mamba3_step_triton(state, carry, x, dt, A, B, C, lam, theta, D, z, rows) -> torch.Tensor:
    """Launch one step; updates ``state`` and ``carry`` pools in place at ``rows``; returns y (b, h, p)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    x, dt, B, C, lam, theta = (t.contiguous() for t in (x, dt, B, C, lam, theta))
    z = None if z is None else z.contiguous()
    D = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D).float().contiguous()
    y = torch.empty_like(x)
    _mamba3_step_kernel[(b, h)](
        state, carry, x, dt, A.float().contiguous(), B, C, lam, theta,
        D if D is not None else x, z if z is not None else x, y, rows,
        h, p, g, n // 2,
        HAS_D=D is not None, HAS_Z=z is not None,
        BLOCK_P=triton.next_power_of_2(p), BLOCK_N2=triton.next_power_of_2(n // 2),
    )
    carry.index_copy_(0, rows, torch.cat([x.float().flatten(1), B.float().flatten(1)], dim=-1))
    return y
