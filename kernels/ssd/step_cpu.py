"""Fast in-place Mamba-2 (SSD) step for the CPU ("torch" backend of ``ssd_step``).

Shape legend: b batch, h heads, p headdim, n dstate, g groups of B/C (h % g == 0), r = h/g.

Same math as ``reference.py``'s :func:`ssd_step_ref` (the oracle) in fp32, with the
(b, h, p, n) state updated in place and no (b, h, n) repeat of B/C:

    dA     = exp(dt * A)                                   (b, h): one scalar per head
    state *= dA[..., None, None];  state += (dt * x)[..., None] * B   (B per group, broadcast)
    y      = (state * C) @ ones(n)                         (C per group; BLAS reduction over n,
                                                            faster here than a batched GEMV)

Where a C++ compiler builds ``scan_cpu.py``'s library, a contiguous state takes its C scan one
step long instead (one pass over the state where the ops above make four; dt bias, softplus, D and
the gate inside it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamssm.kernels.ssd import scan_cpu


def ssd_step_cpu(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One time step; **updates ``state`` (b, h, p, n) fp32, contiguous, in place** (a slice
    of the pool or a gathered copy). x, z (b, h, p); dt (b, h); A, dt_bias (h,) fp32;
    B, C (b, g, n); D (h,) or (h, p) fp32. Returns y (b, h, p) in x.dtype."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    if state.is_contiguous() and scan_cpu.applies(state, x, dt, A, B, C, D, z, dt_bias):
        # the sequential scan in C, one step long: one pass over the state, D and z inside
        one = (lambda t: None if t is None else t[:, None])
        y = scan_cpu.scan_into(state, one(x), one(dt), A, one(B), one(C), D, one(z), dt_bias, dt_softplus)
        return y.view(b, h, p).to(x.dtype)
    xf, dtf = x.float(), dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias
    if dt_softplus:
        dtf = F.softplus(dtf)
    r = h // g
    state.mul_(torch.exp(dtf * A)[..., None, None])
    state_g = state.view(b, g, r, p, n)  # (b, g, r, p, n)
    state_g.addcmul_((dtf[..., None] * xf).view(b, g, r, p, 1), B.float().reshape(b, g, 1, 1, n))
    prod = torch.mul(state_g, C.float().reshape(b, g, 1, 1, n))  # (b, g, r, p, n)
    y = torch.mv(prod.view(b * h * p, n), prod.new_ones(n)).view(b, h, p)  # sum over n
    if D is not None:
        y.addcmul_(xf, D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y.mul_(F.silu(z.float()))
    return y.to(x.dtype)
