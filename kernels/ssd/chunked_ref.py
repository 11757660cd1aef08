"""Chunked SSD in plain PyTorch (the state-space-duality form), in any compute dtype.

Same semantics as :func:`ssd_scan_ref` for batch rows (no ``cu_seqlens``), vectorised over
chunks: the GPU tests and benchmarks run it in float64 as the accurate reference at sizes
where the sequential loop is too slow (S3: a million steps). ``segment_chunks`` bounds the
memory of one pass (the (Q, Q) in-chunk matrices) by carrying the state across segments.

Shape legend: b batch, l length, h heads, p headdim, g groups, n dstate, c chunks, Q chunk_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segment(x, dt, A, B, C, state, q):
    """One segment of rows (b, m, ...) from ``state`` (b, h, p, n). Returns (y (b, m, h, p), state)."""
    b, m, h, p = x.shape
    g = B.shape[2]
    nc = -(-m // q)
    pad = nc * q - m
    if pad:  # zero dt and inputs past the end: no decay, no contribution
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    xc = x.reshape(b, nc, q, h, p)
    dtc = dt.reshape(b, nc, q, h)
    Bc = B.reshape(b, nc, q, g, -1).repeat_interleave(h // g, dim=3)  # (b, c, Q, h, n)
    Cc = C.reshape(b, nc, q, g, -1).repeat_interleave(h // g, dim=3)  # (b, c, Q, h, n)
    acs = torch.cumsum(dtc * A, dim=2)  # (b, c, Q, h)
    acs_h = acs.permute(0, 1, 3, 2)  # (b, c, h, Q)
    seg = acs_h[..., :, None] - acs_h[..., None, :]  # (b, c, h, Q_t, Q_s)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    cb = torch.einsum("bcthn,bcshn->bchts", Cc, Bc) * decay * dtc.permute(0, 1, 3, 2)[..., None, :]
    y = torch.einsum("bchts,bcshp->bcthp", cb, xc)
    w = torch.exp(acs[:, :, -1:, :] - acs) * dtc  # (b, c, Q, h)
    chunk_states = torch.einsum("bcsh,bcshp,bcshn->bchpn", w, xc, Bc)
    chunk_decay = torch.exp(acs[:, :, -1, :])  # (b, c, h)
    prev = []
    for i in range(nc):
        prev.append(state)
        state = chunk_decay[:, i, :, None, None] * state + chunk_states[:, i]
    prev_states = torch.stack(prev, dim=1)  # (b, c, h, p, n)
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cc, prev_states) * torch.exp(acs)[..., None]
    return y.reshape(b, nc * q, h, p)[:, :m], state


def ssd_chunked_ref(
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
    return_final_state: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    segment_chunks: int | None = None,
):
    """Chunked SSD computed in ``compute_dtype`` (differentiable with autograd).

    x, z: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p);
    initial_state: (b, h, p, n). Returns y (b, l, h, p) in ``compute_dtype``
    [, final_state (b, h, p, n) in ``compute_dtype``].
    """
    cd = compute_dtype
    b, l, h, p = x.shape
    n = B.shape[-1]
    dtf = dt.to(cd)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(cd)
    if dt_softplus:
        dtf = F.softplus(dtf)
    xf, Af, Bf, Cf = x.to(cd), A.to(cd), B.to(cd), C.to(cd)
    state = initial_state.to(cd) if initial_state is not None else x.new_zeros(b, h, p, n, dtype=cd)
    step = l if segment_chunks is None else segment_chunks * chunk_size
    ys = []
    for s in range(0, l, step):
        e = min(l, s + step)
        y_s, state = _segment(xf[:, s:e], dtf[:, s:e], Af, Bf[:, s:e], Cf[:, s:e], state, chunk_size)
        ys.append(y_s)
    y = torch.cat(ys, dim=1)
    if D is not None:
        Df = D.to(cd)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return (y, state) if return_final_state else y
