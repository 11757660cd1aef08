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
which is the sequential recurrence). Memory per piece is O(b·d·n·chunk_size); every input is
differentiable, ``initial_state`` included. The recurrence's backward is written by hand
(``_ChunkedScanFn``): it keeps only each piece's states and exp(Lc) (two (b, d, n, t) tensors where autograd
kept ~8) and runs the adjoint recurrence with the same cumsum trick,

    lambda_t = dL/dh_t = exp(-Lc_t) * sum_{s>=t} g_s * exp(Lc_s),   g_s = C_s dy_s (+ carried dh at the end)

and Lc = A * cumsum(delta) (A is constant in time) costs a (b, d, t) cumsum, not a (b, d, n, t) one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Largest |sum of delta*A| inside one piece: exp(±60) keeps x * exp(-Lc), its running sum and
#: the gradients far from fp32 overflow (exp(88)).
LOG_DECAY_LIMIT = 60.0
#: Steps per piece of the traced path (:func:`_scan_fixed_pieces`), used under torch.compile/export.
TRACED_PIECE = 16


def _piece_length(dt: torch.Tensor, a_abs_max: torch.Tensor) -> int:
    """Longest prefix of ``dt`` (b, g, e, t) whose worst-case |cumulative log-decay| fits
    LOG_DECAY_LIMIT, at least 1. ``a_abs_max`` (g, e, 1): max_j |A[i, j]| per channel."""
    with torch.no_grad():
        bound = (dt.abs() * a_abs_max).cumsum(-1).amax(dim=(0, 1, 2))  # (t,), non-decreasing
        return max(1, int((bound <= LOG_DECAY_LIMIT).sum()))


class _ChunkedScanFn(torch.autograd.Function):
    """Core recurrence over pieces with a hand-written backward: it keeps each piece's states hs
    and exp(Lc) (two (b, g, e, n, t) tensors, where autograd kept ~8) and runs the adjoint recurrence with the
    same cumsum trick.

    Inputs: dt, du (b, g, e, l) fp32; A (g, e, n, 1); B, C (b, g, n, l) fp32; h0 (b, g, e, n).
    Outputs: y (b, g, e, l) = sum_n C_t h_t (no D, no gate), final state (b, g, e, n).
    """

    @staticmethod
    def forward(ctx, dt, du, A, B, C, h0, chunk_size: int):
        a_abs_max = A.abs().amax(dim=2)  # (g, e, 1)
        l = dt.shape[-1]
        bounds, states, ys = [], [], []
        h, start = h0, 0
        while start < l:
            end = start + _piece_length(dt[..., start:min(start + chunk_size, l)], a_abs_max)
            # contiguous piece slices: broadcast products of strided slices are ~5x slower on CPU
            dt_p, du_p, B_p, C_p = (t[..., start:end].contiguous() for t in (dt, du, B, C))
            hs, growth = _piece_states(dt_p, A, du_p[..., None, :] * B_p[:, :, None], h)
            ys.append((hs * C_p[:, :, None]).sum(3))
            bounds.append((start, end))
            states += [hs, growth]
            h = hs[..., -1]
            start = end
        ctx.bounds = bounds
        ctx.save_for_backward(dt, du, A, B, C, h0, *states)
        return torch.cat(ys, dim=-1), h

    @staticmethod
    def backward(ctx, dy, dh):
        dt, du, A, B, C, h0, *states = ctx.saved_tensors
        d_dt, d_du = torch.empty_like(dt), torch.empty_like(du)
        d_B, d_C = torch.empty_like(B), torch.empty_like(C)
        d_A = torch.zeros_like(A)
        carry = dh
        for i in reversed(range(len(ctx.bounds))):
            start, end = ctx.bounds[i]
            sl, hs, growth = slice(start, end), states[2 * i], states[2 * i + 1]
            h_start = states[2 * i - 2][..., -1] if i else h0  # (b, g, e, n)
            dt_p, du_p, B_p, C_p, dy_p = (t[..., sl].contiguous() for t in (dt, du, B, C, dy))
            dhs = dy_p[..., None, :] * C_p[:, :, None]  # (b, g, e, n, t)
            dhs[..., -1] += carry
            # R_t = lambda_t exp(Lc_t) = sum_{s>=t} dhs_s exp(Lc_s), lambda = dL/dh: a true reverse
            # cumsum ("total - cumsum" cancels, and exp(-Lc) would amplify the error)
            if end - start == 1:  # one step (growth = its decay, may underflow to 0)
                lam, R = dhs, dhs * growth
                d_ld = R * h_start[..., None]
            else:
                R = _cumsum_last((dhs * growth).flip(-1)).flip(-1)
                lam = R / growth
                # dL/d(delta_t A) = lambda_t decay_t h_{t-1} = R_t h_{t-1} / exp(Lc_{t-1}), exact
                # (not lambda_t (h_t - x_t), which cancels)
                d_ld = R.clone()
                d_ld[..., 1:] *= hs[..., :-1] / growth[..., :-1]
                d_ld[..., 0] *= h_start
            carry = R[..., 0]  # dL/dh at the piece's start = lambda_0 decay_0
            d_dt[..., sl] = (d_ld * A).sum(3)
            d_A += (d_ld * dt_p[..., None, :]).sum((0, 4))[..., None]
            d_du[..., sl] = (lam * B_p[:, :, None]).sum(3)
            d_B[..., sl] = (lam * du_p[..., None, :]).sum(2)
            d_C[..., sl] = (dy_p[..., None, :] * hs).sum(2)
        return d_dt, d_du, d_A, d_B, d_C, carry, None


def _piece_states(dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States hs and exp(Lc) (b, g, e, n, t) of one piece from h0 (b, g, e, n): dt (b, g, e, t), A (g, e, n, 1),
    x = delta B u (b, g, e, n, t). Lc = A * cumsum(dt) (A is constant in time: one small cumsum)."""
    if dt.shape[-1] == 1:
        decay = torch.exp(dt[..., None, :] * A)
        return decay * h0[..., None] + x, decay
    growth = torch.exp(dt.cumsum(-1)[..., None, :] * A)  # exp(Lc), in [e^-60, 1]
    return (_cumsum_last(x / growth) + h0[..., None]).mul_(growth), growth


def _cumsum_last(x: torch.Tensor) -> torch.Tensor:
    """cumsum over the last axis, through a 2-D view: on CPU ~2.3x faster than ``cumsum(-1)`` of
    the 5-D tensor (and out of place: in-place ``cumsum_`` is ~10x slower)."""
    return x.reshape(-1, x.shape[-1]).cumsum(-1).view(x.shape)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., t) -> (..., t, t): [i, j] = sum_{j < k <= i} a_k for j <= i, -inf above the
    diagonal. A masked cumsum (no difference of two long cumsums, so no cancellation)."""
    t = a.shape[-1]
    rep = a[..., None, :].expand(*a.shape, t).transpose(-1, -2)  # [i, j] = a_i
    below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    seg = rep.masked_fill(~below, 0).cumsum(-2)
    return seg.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def _piece_segsum(a: torch.Tensor) -> torch.Tensor:
    """:func:`_segsum` of short pieces a (..., t) as one product with a constant 0/1 matrix
    (t, t * t): t^3 multiply-adds per row, a matmul forward and backward. Under inductor on CPU a
    cumsum is an ATen call; the masked cumsum over the pieces' (t, t) matrices (16x the scan's
    values) was ~30 % of a compiled Mamba training step (issue 19)."""
    t = a.shape[-1]
    k, i, j = (torch.arange(t, device=a.device).view(shape) for shape in ((t, 1, 1), (1, t, 1), (1, 1, t)))
    inside = ((j < k) & (k <= i)).reshape(t, t * t).to(a.dtype)  # (k, i * t + j)
    seg = (a.reshape(-1, t) @ inside).view(*a.shape, t)  # (..., i, j)
    return seg.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def _scan_fixed_pieces(dt: torch.Tensor, du: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       h0: torch.Tensor, piece: int = TRACED_PIECE) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of :class:`_ChunkedScanFn` (same inputs and outputs) without a
    data-dependent piece length or host sync, for torch.compile / torch.export to trace.

    Time is cut into K pieces of ``piece`` steps (zero-padded: dt 0 keeps the state). Inside a
    piece, h_t = sum_{s<=t} exp(segsum(a)_{t,s}) x_s with a = delta A, x = delta B u; the pieces'
    end states are joined by the same segsum over the K piece decays. Every exponent is <= 0, so
    nothing overflows whatever the decays. Memory O(b·d·n·l·piece); autograd does the backward.
    """
    b, g, e, l = dt.shape
    n = A.shape[2]
    k = -(-l // piece)
    pad = k * piece - l
    dt, du, B, C = (F.pad(t, (0, pad)) for t in (dt, du, B, C))
    dtp = dt.reshape(b, g, e, 1, k, piece)  # (b, g, e, 1, K, P)
    a = dtp * A[..., None]  # (b, g, e, n, K, P): log-decay of each step
    x = du.reshape(b, g, e, 1, k, piece) * B.reshape(b, g, 1, n, k, piece)  # (b, g, e, n, K, P)
    h_loc = (torch.exp(_piece_segsum(a)) * x[..., None, :]).sum(-1)  # (b, g, e, n, K, P): from a zero state
    lc = a.cumsum(-1)  # (b, g, e, n, K, P): log-decay since the piece's start
    ltot = lc[..., -1]  # (b, g, e, n, K)
    h_end = (torch.exp(_segsum(ltot)) * h_loc[..., -1][..., None, :]).sum(-1)
    h_end = h_end + torch.exp(ltot.cumsum(-1)) * h0[..., None]  # (b, g, e, n, K): state after each piece
    h_start = torch.cat([h0[..., None], h_end[..., :-1]], dim=-1)  # (b, g, e, n, K)
    hs = h_loc + torch.exp(lc) * h_start[..., None]  # (b, g, e, n, K, P)
    y = (hs * C.reshape(b, g, 1, n, k, piece)).sum(3).reshape(b, g, e, k * piece)[..., :l]
    return y, h_end[..., -1]


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
    if delta_softplus:  # contiguous: softplus_backward's fake and CPU kernels disagree on the
        dt = F.softplus(dt.contiguous())  # strides of a channel-last dt (breaks compiled backward)
    uf = u.float()
    dt_g = dt.reshape(b, g, e, l)  # (b, g, e, l)
    du_g = (dt * uf).reshape(b, g, e, l)  # (b, g, e, l)
    A_g = A.float().reshape(g, e, n, 1)  # (g, e, n, 1): broadcasts over time
    h = (
        initial_state.float().reshape(b, g, e, n)
        if initial_state is not None
        else u.new_zeros(b, g, e, n, dtype=torch.float32)
    )
    if torch.compiler.is_compiling():  # traced: no data-dependent piece length
        y, h = _scan_fixed_pieces(dt_g, du_g, A_g, Bg, Cg, h)
    else:
        y, h = _ChunkedScanFn.apply(dt_g, du_g, A_g, Bg, Cg, h, chunk_size)
    y = y.reshape(b, d, l)
    if D is not None:
        y = y + uf * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, h.reshape(b, d, n)) if return_final_state else y
