"""Sequential reference of the Mamba-2 state-space-duality (SSD) scan.

Shape legend:
    b batch, l length, h heads, p headdim, g groups of B/C (h % g == 0), n dstate

Recurrence, per head (scalar decay per head and step; fp32 throughout):
    dt_t = softplus(dt_t + dt_bias)                      (bias / softplus optional)
    S_t  = exp(dt_t * A) * S_{t-1} + w_t * x_t B_t^T     S: (p, n); w_t = dt_t, or the
                                                          given input weight (Mamba-3's trapezoid)
    y_t  = S_t C_t + D * x_t                             D per head or per (head, headdim)
    y_t  = y_t * silu(z_t)                               (when z is given)
Head k reads B/C of group ``k // (h // g)``. With ``cu_seqlens`` (batch 1) the rows hold
several sequences back to back; the state restarts from that sequence's initial state at
each boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_step_ref(
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
    input_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step. state (b, h, p, n) fp32; x, z (b, h, p); dt, input_weight (b, h); B, C (b, g, n);
    D (h,), (h, p) or any factor that broadcasts against x (the scan's per-token D: (b, h, 1)).

    The math runs in fp32, or in float64 when x or state is float64 (an exact reference).
    Returns ``(y (b, h, p) in x.dtype, new_state (b, h, p, n) in that compute dtype)``;
    ``state`` is untouched.
    """
    h = x.shape[1]
    cd = torch.promote_types(torch.promote_types(x.dtype, state.dtype), torch.float32)
    xf, dtf = x.to(cd), dt.to(cd)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(cd)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bh = B.to(cd).repeat_interleave(h // B.shape[1], dim=1)  # (b, h, n)
    Ch = C.to(cd).repeat_interleave(h // C.shape[1], dim=1)  # (b, h, n)
    dA = torch.exp(dtf * A.to(cd))  # (b, h)
    wf = dtf if input_weight is None else input_weight.to(cd)
    new_state = state.to(cd) * dA[..., None, None] + (wf[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = (new_state * Ch[:, :, None, :]).sum(-1)  # (b, h, p)
    if D is not None:
        Df = D.to(cd)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype), new_state


def _ssd_scan_rows(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, w):
    """Loop ssd_step_ref over time for (b, l, ...) rows starting from ``state``; a per-token D
    (b, l, h) goes to each step as a (b, h, 1) factor of x."""
    ys = []
    for t in range(x.shape[1]):
        y_t, state = ssd_step_ref(
            state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D[:, t, :, None] if D is not None and D.dim() == 3 else D,
            z=None if z is None else z[:, t], dt_bias=dt_bias, dt_softplus=dt_softplus,
            input_weight=None if w is None else w[:, t],
        )
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y, state


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_final_state: bool = False,
    input_weight: torch.Tensor | None = None,
):
    """SSD by looping :func:`ssd_step_ref` over time (``chunk_size`` is ignored here).

    x, z: (b, l, h, p); dt, input_weight: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,), (h, p)
    or per token (b, l, h); initial_state: (b, h, p, n), or (num_seqs, h, p, n) with ``cu_seqlens``
    (num_seqs+1,). Returns y (b, l, h, p) [, final_state: same layout as initial_state, fp32
    (float64 for float64 x)].
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    cd = torch.promote_types(x.dtype, torch.float32)
    if cu_seqlens is None:
        state = (
            initial_state.to(cd)
            if initial_state is not None
            else torch.zeros(b, h, p, n, device=x.device, dtype=cd)
        )
        y, state = _ssd_scan_rows(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, input_weight)
        return (y, state) if return_final_state else y
    bounds = [int(v) for v in cu_seqlens.tolist()]
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = (
            initial_state[i : i + 1].to(cd)
            if initial_state is not None
            else torch.zeros(1, h, p, n, device=x.device, dtype=cd)
        )
        y_i, state = _ssd_scan_rows(
            x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D[:, s:e] if D is not None and D.dim() == 3 else D,
            None if z is None else z[:, s:e], dt_bias, dt_softplus, state,
            None if input_weight is None else input_weight[:, s:e],
        )
        ys.append(y_i)
        finals.append(state)
    y = torch.cat(ys, dim=1)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y
