"""Mamba-3 over a whole chunk of a stream, in parallel, through two SSD scans.

The rotation folds into B and C. Measure angles from the start of the call,
Theta_t = sum_{s<=t} dt_s theta_s, and write the state in the rotated frame
S~_t = R_{Theta_t}^{-1} S_t. The recurrence of ``reference.py`` becomes a real one:

    S~_t = alpha_t S~_{t-1} + dt_t (1 - lam_t) alpha_t x_{t-1} B~_{t-1}^T + dt_t lam_t x_t B~_t^T
    y_t  = S~_t C~_t + D x_t,          B~_t = R_{Theta_t}^{-1} B_t,  C~_t = R_{Theta_t}^{-1} C_t

which is the sum of two SSD recurrences with the same decay (SSD adds dt_t x_t B_t^T per step):

    scan 1: inputs lam_t x_t,                 keys B~_t,      initial state S_0
    scan 2: inputs (1 - lam_t) alpha_t x_{t-1}, keys B~_{t-1},  initial state 0

x_{-1}, B_{-1} come from the carry; since Theta is 0 before the first step of the call, the
carried B_{-1} is already in the call's frame, and S~_0 = S_0. The final state is rotated back,
S_end = R_{Theta_end} (S~1_end + S~2_end). Both scans run through ``streamssm.kernels.ssd_scan``
(Triton forward + backward on GPU), so gradients reach every input, carried state included.
B and C become per head (the angle depends on each head's dt): groups = heads in the scans.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from streamssm.kernels import ssd_scan
from streamssm.kernels._common import Backend
from streamssm.kernels.mamba3.reference import rotate_pairs, split_carry


def mamba3_scan_chunked(
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
    """Same contract as :func:`~streamssm.kernels.mamba3.reference.mamba3_scan_ref`."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    dtf, lamf, xf = dt.float(), lam.float(), x.float()
    if initial_carry is None:
        initial_carry = x.new_zeros(b, h * p + g * n, dtype=torch.float32)
    x_prev0, B_prev0 = split_carry(initial_carry.float(), h, p, g, n)
    # Theta in float64, reduced mod 2 pi: in fp32 a Theta of 1e4 rad (a few thousand steps at
    # angles near pi) is off by ~1e-3 rad, and the relative angles Theta_t - Theta_s with it
    step_angle = dtf[..., None] * theta.float().repeat_interleave(rep, 2)
    angle = torch.cumsum(step_angle.double(), dim=1).remainder(2 * math.pi).float()  # (b, l, h, n/2)
    B_rot = rotate_pairs(B.float().repeat_interleave(rep, 2), -angle)  # (b, l, h, n)
    C_rot = rotate_pairs(C.float().repeat_interleave(rep, 2), -angle)
    B_prev = torch.cat([B_prev0.repeat_interleave(rep, 1)[:, None], B_rot[:, :-1]], dim=1)  # B~_{t-1}
    x_prev = torch.cat([x_prev0[:, None], xf[:, :-1]], dim=1)  # x_{t-1}
    alpha = torch.exp(dtf * A.float())  # (b, l, h)
    common = dict(chunk_size=chunk_size, return_final_state=True, backend=backend)
    # scan operands in the input dtype (bf16 in training, as for SSD); angles, dt and states stay fp32
    cdt = x.dtype
    y1, s1 = ssd_scan((lamf[..., None] * xf).to(cdt), dtf, A.float(), B_rot.to(cdt), C_rot.to(cdt),
                      initial_state=initial_state, **common)
    y2, s2 = ssd_scan((((1 - lamf) * alpha)[..., None] * x_prev).to(cdt), dtf, A.float(), B_prev.to(cdt),
                      C_rot.to(cdt), **common)
    y = y1.float() + y2.float()
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * xf
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final_state = rotate_pairs(s1 + s2, angle[:, -1][:, :, None, :])
    final_carry = torch.cat([xf[:, -1].flatten(1), B[:, -1].float().flatten(1)], dim=-1)
    return y, final_state, final_carry
