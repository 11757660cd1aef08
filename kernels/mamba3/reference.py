"""Sequential reference of the Mamba-3 scan: exponential-trapezoidal discretization with a
complex-valued (rotating) state.

Shape legend:
    b batch, l length, h heads, p headdim, g groups of B/C (h % g == 0), n dstate (even)

Recurrence, per head, with the state S (p, n) read as n/2 complex numbers per row
(pairs (2k, 2k+1) = real, imaginary part); fp32 throughout:
    alpha_t = exp(dt_t * A)                    decay (A < 0, dt_t > 0)
    R_t     = rotation of every pair by dt_t * theta_t[k]   (theta from the input: data-dependent)
    beta_t  = (1 - lam_t) * dt_t * alpha_t     weight of the previous input (trapezoid, left end)
    gamma_t = lam_t * dt_t                     weight of the current input (trapezoid, right end)
    S_t = alpha_t R_t S_{t-1} + beta_t R_t (x_{t-1} B_{t-1}^T) + gamma_t x_t B_t^T
    y_t = S_t C_t + D * x_t,  then y_t *= silu(z_t) when z is given

With lam_t = 1 and theta = 0 this is Mamba-2's SSD recurrence (the Euler rule of
kernels/ssd/reference.py). The previous input (x_{t-1}, B_{t-1}) is part of the carried state
("carry", (b, h*p + g*n) fp32, zeros at the start of a stream), so a stream can be split
into chunks anywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate_pairs(v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of ``v`` (..., n) by ``angle`` (..., n/2)."""
    pairs = v.unflatten(-1, (-1, 2))  # (..., n/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def mamba3_rotary_ref(B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, theta: torch.Tensor,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B, C (b, l, g, n) rotated into each head's frame, R(-Theta_t) with Theta_t = sum_{s<=t}
    dt_s theta_s (mod 2 pi): B~, C~ (b, l, h, n) in ``out_dtype`` and the final angle (b, h, n/2)
    fp32. dt (b, l, h) fp32; theta (b, l, g, n/2). Angles accumulate in float64: in fp32 a Theta
    of 1e4 rad (a few thousand steps at angles near pi) is off by ~1e-3 rad."""
    rep = dt.shape[2] // B.shape[2]
    step = dt.float()[..., None] * theta.float().repeat_interleave(rep, 2)  # (b, l, h, n/2)
    angle = torch.cumsum(step.double(), dim=1).remainder(2 * math.pi).float()
    B_rot = rotate_pairs(B.float().repeat_interleave(rep, 2), -angle).to(out_dtype)
    C_rot = rotate_pairs(C.float().repeat_interleave(rep, 2), -angle).to(out_dtype)
    return B_rot, C_rot, angle[:, -1]


def split_carry(carry: torch.Tensor, h: int, p: int, g: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """carry (b, h*p + g*n) -> previous x (b, h, p), previous B (b, g, n)."""
    x_prev, B_prev = carry.split([h * p, g * n], dim=-1)
    return x_prev.unflatten(-1, (h, p)), B_prev.unflatten(-1, (g, n))


def mamba3_step_ref(
    state: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One time step. state (b, h, p, n) fp32; carry (b, h*p + g*n) fp32; x, z (b, h, p);
    dt, lam (b, h) (dt > 0, lam in [0, 1]); A (h,); B, C (b, g, n); theta (b, g, n/2) rad per
    unit dt. Returns ``(y (b, h, p) in x.dtype, new_state, new_carry)``; inputs are untouched."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    rep = h // g
    xf, dtf, lamf = x.float(), dt.float(), lam.float()
    x_prev, B_prev = split_carry(carry.float(), h, p, g, n)
    angle = dtf[..., None] * theta.float().repeat_interleave(rep, 1)  # (b, h, n/2)
    alpha = torch.exp(dtf * A.float())  # (b, h)
    beta = (1 - lamf) * dtf * alpha
    gamma = lamf * dtf
    Bh, Bph, Ch = (M.float().repeat_interleave(rep, 1) for M in (B, B_prev, C))  # (b, h, n)
    rotated = rotate_pairs(state, angle[:, :, None, :])  # R_t S_{t-1}
    prev_in = x_prev[..., None] * rotate_pairs(Bph, angle)[:, :, None, :]  # R_t x_{t-1} B_{t-1}^T
    new = alpha[..., None, None] * rotated + beta[..., None, None] * prev_in \
        + gamma[..., None, None] * xf[..., None] * Bh[:, :, None, :]
    y = (new * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * xf
    if z is not None:
        y = y * F.silu(z.float())
    new_carry = torch.cat([xf.flatten(1), B.float().flatten(1)], dim=-1)
    return y.to(x.dtype), new, new_carry


def mamba3_scan_ref(
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
):
    """The whole sequence, one step at a time. x, z (b, l, h, p); dt, lam (b, l, h);
    B, C (b, l, g, n); theta (b, l, g, n/2); states as in :func:`mamba3_step_ref`.
    Returns y (b, l, h, p) [, final_state (b, h, p, n), final_carry (b, h*p + g*n)]."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    carry = x.new_zeros(b, h * p + g * n, dtype=torch.float32) if initial_carry is None else initial_carry.float()
    ys = []
    for t in range(l):
        y, state, carry = mamba3_step_ref(state, carry, x[:, t], dt[:, t], A, B[:, t], C[:, t], lam[:, t],
                                          theta[:, t], D, None if z is None else z[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1)
    return (y, state, carry) if return_final_state else y
