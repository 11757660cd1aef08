"""Sequential reference of the Mamba-1 selective scan (the spec every other path must match).

Shape legend:
    b batch, d dim (channels), l length, n dstate, g groups of B/C (d % g == 0)

Recurrence, per channel i and state index j (fp32 throughout):
    delta_t = softplus(delta_t + delta_bias)          (bias / softplus optional)
    h_t     = exp(delta_t * A[i, j]) * h_{t-1} + delta_t * B_t[j] * u_t
    y_t     = sum_j C_t[j] * h_t[j] + D[i] * u_t
    y_t     = y_t * silu(z_t)                           (when z is given)
Channel i reads B/C of group ``i // (d // g)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _group_rows(M: torch.Tensor, d: int) -> torch.Tensor:
    """Step-time B/C: (b, n) or (b, g, n) -> (b, d, n), repeating each group d//g times."""
    if M.dim() == 2:
        M = M.unsqueeze(1)  # (b, 1, n)
    return M.repeat_interleave(d // M.shape[1], dim=1)


def selective_scan_step_ref(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step. state (b, d, n) fp32; u, delta, z (b, d); B, C (b, n) or (b, g, n).

    Returns ``(y (b, d) in u.dtype, new_state (b, d, n) fp32)``; ``state`` is not modified.
    """
    d = u.shape[1]
    uf, dt = u.float(), delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    Bd = _group_rows(B.float(), d)  # (b, d, n)
    Cd = _group_rows(C.float(), d)  # (b, d, n)
    dA = torch.exp(dt.unsqueeze(-1) * A.float())  # (b, d, n)
    new_state = dA * state.float() + (dt * uf).unsqueeze(-1) * Bd
    y = (new_state * Cd).sum(-1)  # (b, d)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), new_state


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Selective scan by looping :func:`selective_scan_step_ref` over time.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,);
    initial_state: (b, d, n) fp32. Returns y (b, d, l) [, final_state (b, d, n) fp32].
    """
    b, d, l = u.shape
    n = A.shape[1]
    h = (
        initial_state.float()
        if initial_state is not None
        else torch.zeros(b, d, n, device=u.device, dtype=torch.float32)
    )
    ys = []
    for t in range(l):
        y_t, h = selective_scan_step_ref(
            h, u[..., t], delta[..., t], A, B[..., t], C[..., t],
            D=D, z=None if z is None else z[..., t], delta_bias=delta_bias,
            delta_softplus=delta_softplus,
        )
        ys.append(y_t)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
    return (y, h) if return_final_state else y
