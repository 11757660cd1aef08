"""Chunked parallel Mamba-1 selective scan in plain PyTorch: the fast CPU path.

Shape legend:
    b batch, d dim (channels), l length, n dstate, g groups of B/C, e = d // g channels per
    group, t steps of one piece (at most ``chunk_size``)

Same recurrence as ``reference.py`` (fp32 math):
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t h_t + D u_t  [* silu(z_t)]

Within a piece of t steps starting from the carried state h_0, with the cumulative log-decay
Lc_t = sum_{s<=t} delta_s A (per channel and state index) and x_s = delta_s B_s u_s:

    h_t = exp(Lc_t) * (h_0 + sum_{s<=t} x_s * exp(-Lc_s))

so a piece costs one ``cumsum`` over time instead of t sequential steps; pieces follow each
other with a sequential carry of h. The factor exp(-Lc_s) is finite only while |Lc| stays
inside fp32's exponent range (e^±88), so a chunk is cut into pieces whose total |delta A|
is at most ``LOG_DECAY_LIMIT`` (a bound over all channels: with delta*|A| <= 0.5 a piece is a
whole chunk of 128 steps; with huge decays it shrinks, in the worst case to single steps,
which is the sequential recurrence). Memory per piece is O(b·d·n·chunk_size); autograd
differentiates every input, ``initial_state`` included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Largest |sum of delta*A| inside one piece: exp(±60) keeps x * exp(-Lc), its running sum and
#: the gradients far from fp32 overflow (exp(88)).
LOG_DECAY_LIMIT = 60.0


def _piece_length(dt: torch.Tensor, a_abs_max: torch.Tensor) -> int:
    """Longest prefix of ``dt`` (b, g, e, t) whose worst-case |cumulative log-decay| fits
    LOG_DECAY_LIMIT, at least 1. ``a_abs_max`` (g, e, 1): max_j |A[i, j]| per channel."""
    with torch.no_grad():
        bound = (dt.abs() * a_abs_max).cumsum(-1).amax(dim=(0, 1, 2))  # (t,), non-decreasing
        return max(1, int((bound <= LOG_DECAY_LIMIT).sum()))


def selective_scan_chunked(
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
    chunk_size: int = 128,
):
    """Selective scan, chunk-parallel over time (same contract as ``selective_scan_ref``).

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,);
    initial_state: (b, d, n) fp32; chunk_size: steps per piece at most (memory per piece is
    about 4·b·d·n·chunk_size fp32 values). Returns y (b, d, l) in u.dtype
    [, final_state (b, d, n) fp32].
    """
    b, d, l = u.shape
    n = A.shape[1]
    Bg = (B if B.dim() == 4 else B.unsqueeze(1)).float()  # (b, g, n, l)
    Cg = (C if C.dim() == 4 else C.unsqueeze(1)).float()  # (b, g, n, l)
    g = Bg.shape[1]
    e = d // g
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.float()
    dt_g = dt.reshape(b, g, e, l)  # (b, g, e, l)
    du_g = (dt * uf).reshape(b, g, e, l)  # (b, g, e, l)
    A_g = A.float().reshape(g, e, n, 1)  # (g, e, n, 1): broadcasts over time
    a_abs_max = A_g.abs().amax(dim=2)  # (g, e, 1)
    h = (
        initial_state.float().reshape(b, g, e, n)
        if initial_state is not None
        else u.new_zeros(b, g, e, n, dtype=torch.float32)
    )
    ys = []
    start = 0
    while start < l:
        end = min(start + chunk_size, l)
        end = start + _piece_length(dt_g[..., start:end], a_abs_max)
        log_decay = dt_g[..., None, start:end] * A_g  # (b, g, e, n, t)
        x = du_g[..., None, start:end] * Bg[:, :, None, :, start:end]  # (b, g, e, n, t)
        if end - start == 1:
            hs = torch.exp(log_decay) * h[..., None] + x
        else:
            cum = log_decay.cumsum(-1)  # Lc_t
            # x * exp(-Lc) rather than x / exp(Lc): the backward of a division squares exp(Lc)
            hs = torch.exp(cum) * ((x * torch.exp(-cum)).cumsum(-1) + h[..., None])  # (b, g, e, n, t)
        ys.append((hs * Cg[:, :, None, :, start:end]).sum(3))  # (b, g, e, t)
        h = hs[..., -1]
        start = end
    y = torch.cat(ys, dim=-1).reshape(b, d, l)
    if D is not None:
        y = y + uf * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h.reshape(b, d, n)) if return_final_state else y
