"""Chunked Mamba-2 SSD scan in plain PyTorch: the standard SSD algorithm. It is the fast CPU path
(fp32 math) and, with ``compute_dtype=torch.float64``, the accurate reference of the GPU tests and
benchmarks at sizes where the sequential loop is too slow (S3: a million steps).

Shape legend:
    b batch, l length, h heads = g * q, g groups of B/C, q heads per group, p headdim,
    n dstate, c chunks in a block, t = i = j steps in a chunk (``chunk_size``)

Same recurrence as ``reference.py`` (per head a scalar decay a_t = dt_t A):
    S_t = exp(a_t) S_{t-1} + w_t x_t B_t^T,    y_t = S_t C_t + D x_t  [* silu(z_t)]
(w_t = dt_t, or the given input weight).

With Lc the cumulative log-decay inside a chunk and X_j = w_j x_j, one chunk is
    y_i  = sum_{j<=i} (C_i . B_j) exp(Lc_i - Lc_j) X_j      intra-chunk quadratic form
         + exp(Lc_i) C_i S_0                                 contribution of the carried state
    S_t' = exp(Lc_last) S_0 + sum_j exp(Lc_last - Lc_j) X_j B_j^T   state passed on
The quadratic and state terms are batched matmuls over all chunks of a block; only the state
passing loops over chunks. Blocks bound memory to about ``_BLOCK_ELEMENTS`` values of the
(b, h, c, t, t) decay matrix. A partial last chunk is padded with dt = 0 (decay 1, no input),
which leaves the state unchanged. With ``cu_seqlens`` each packed sequence runs from its own
initial state. Autograd differentiates every input, ``initial_state`` included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from streamssm.kernels._common import needs_grad

#: Upper bound on the elements of one block's (b, h, c, t, t) decay matrix.
_BLOCK_ELEMENTS = 1 << 22


def _scan_block(
    X: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of whole chunks, in the compute dtype of its inputs.

    X (b, c, t, g, q, p) = w * x; a (b, c, t, g, q) = dt * A; B, C (b, c, t, g, n);
    state (b, g, q, p, n). Returns y (b, c, t, g, q, p) without the D term, and the state
    after the block.
    """
    t = X.shape[2]
    Lc = a.permute(0, 3, 4, 1, 2).cumsum(-1)  # (b, g, q, c, t)
    causal = torch.ones(t, t, dtype=torch.bool, device=X.device).tril()
    seg = (Lc[..., :, None] - Lc[..., None, :]).masked_fill(~causal, float("-inf"))  # (b, g, q, c, i, j)
    CB = torch.einsum("bcign,bcjgn->bgcij", C, B)  # (b, g, c, i, j)
    M = CB[:, :, None] * torch.exp(seg)  # (b, g, q, c, i, j)
    y = torch.einsum("bgqcij,bcjgqp->bcigqp", M, X)  # intra-chunk
    to_end = torch.exp(Lc[..., -1:] - Lc)  # (b, g, q, c, t): decay from step j to the chunk end
    chunk_states = torch.einsum("bcjgqp,bgqcj,bcjgn->bcgqpn", X, to_end, B)  # (b, c, g, q, p, n)
    chunk_decay = torch.exp(Lc[..., -1])  # (b, g, q, c)
    starts = []
    for k in range(X.shape[1]):  # sequential state passing across chunks
        starts.append(state)
        state = chunk_decay[..., k, None, None] * state + chunk_states[:, k]
    S0 = torch.stack(starts, dim=1)  # (b, c, g, q, p, n): state entering each chunk
    y_off = torch.einsum("bcign,bcgqpn->bcigqp", C, S0) * torch.exp(Lc).permute(0, 3, 4, 1, 2)[..., None]
    return y + y_off, state


def _ssd_rows(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    state: torch.Tensor, chunk_size: int, w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, l, h, p); dt (b, l, h) after bias/softplus, input weights w (b, l, h) and state
    (b, h, p, n), all in the compute dtype; B, C (b, l, g, n). Returns y (b, l, h, p) in the
    compute dtype (no D/z) and the final state."""
    cd = dt.dtype
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = h // g
    t = min(chunk_size, l)
    chunks = -(-l // t)
    pad = chunks * t - l
    X = F.pad(x.to(cd) * w[..., None], (0, 0, 0, 0, 0, pad))  # (b, l', h, p); padded steps carry no input
    a = F.pad(dt * A, (0, 0, 0, pad))  # (b, l', h); log-decay 0 on padded steps
    Bf = F.pad(B.to(cd), (0, 0, 0, 0, 0, pad)).reshape(b, chunks, t, g, n)
    Cf = F.pad(C.to(cd), (0, 0, 0, 0, 0, pad)).reshape(b, chunks, t, g, n)
    X = X.reshape(b, chunks, t, g, q, p)
    a = a.reshape(b, chunks, t, g, q)
    state = state.reshape(b, g, q, p, n)
    per_block = max(1, _BLOCK_ELEMENTS // (b * h * t * t))  # chunks per block
    if chunks <= per_block:  # one block: no range() over symbolic sizes (a compiled call stays symbolic in b, l)
        y, state = _scan_block(X, a, Bf, Cf, state)
        return y.reshape(b, chunks * t, h, p)[:, :l], state.reshape(b, h, p, n)
    ys = []
    for c0 in range(0, chunks, per_block):
        c1 = min(c0 + per_block, chunks)
        y, state = _scan_block(X[:, c0:c1], a[:, c0:c1], Bf[:, c0:c1], Cf[:, c0:c1], state)
        ys.append(y)
    y = torch.cat(ys, dim=1).reshape(b, chunks * t, h, p)[:, :l]
    return y, state.reshape(b, h, p, n)


def ssd_scan_chunked(
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
    compute_dtype: torch.dtype | None = None,
    input_weight: torch.Tensor | None = None,
):
    """SSD scan by the chunked algorithm (same contract as ``ssd_scan_ref``).

    x, z: (b, l, h, p); dt, input_weight: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,), (h, p) or (b, l, h);
    initial_state: (b, h, p, n), or (num_seqs, h, p, n) with ``cu_seqlens`` (num_seqs+1,)
    (then b == 1). The math runs in ``compute_dtype`` (default fp32, float64 for float64 x).
    Returns y (b, l, h, p) in x.dtype, or in ``compute_dtype`` when it is given
    [, final_state like initial_state in the compute dtype].
    """
    def rows(x, dt, A, B, C, state, w):
        return _ssd_rows(x, dt, A, B, C, state, chunk_size, w)

    return scan_by_rows(rows, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens,
                        return_final_state, compute_dtype, input_weight)


def scan_by_rows(rows, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens, return_final_state,
                 compute_dtype, input_weight):
    """:func:`ssd_scan_chunked`'s work around ``rows(x, dt, A, B, C, state, w) -> (y, final state)``
    (``_ssd_rows``' contract, no chunk size): step sizes, packed sequences, the D and z terms."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    cd = compute_dtype or torch.promote_types(x.dtype, torch.float32)
    dtf = dt.to(cd)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(cd)
    if dt_softplus:
        dtf = F.softplus(dtf)
    wf = dtf if input_weight is None else input_weight.to(cd)
    Af = A.to(cd)
    if cu_seqlens is None:
        state = (
            initial_state.to(cd)
            if initial_state is not None
            else torch.zeros(b, h, p, n, device=x.device, dtype=cd)
        )
        y, final = rows(x, dtf, Af, B, C, state, wf)
    else:
        bounds = [int(v) for v in cu_seqlens.tolist()]
        ys, finals = [], []
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = (
                initial_state[i : i + 1].to(cd)
                if initial_state is not None
                else torch.zeros(1, h, p, n, device=x.device, dtype=cd)
            )
            if e == s:  # an empty sequence passes its initial state through
                finals.append(state)
                continue
            y_i, state = rows(x[:, s:e], dtf[:, s:e], Af, B[:, s:e], C[:, s:e], state, wf[:, s:e])
            ys.append(y_i)
            finals.append(state)
        y, final = torch.cat(ys, dim=1), torch.cat(finals, dim=0)
    if D is not None:
        Df = D.to(cd)
        y = y + x.to(cd) * (Df[:, None] if Df.dim() == 1 else Df[..., None] if Df.dim() == 3 else Df)
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(compute_dtype or x.dtype)
    return (y, final) if return_final_state else y


def inference_chunk_size(headdim: int, dstate: int, heads_per_group: int) -> int:
    """The chunk length (a power of two in [8, 128]) at which this scan's forward runs fastest
    without autograd, from the head's sizes p = headdim, n = dstate, q = heads per B/C group.

    Per token and head, the intra-chunk terms cost ~t (p + n / q) (the (t, t) decay and C B^T
    matrices) and the chunk states ~p n / t (each chunk's (p, n) state is materialised, passed
    and read back), so the best t grows as sqrt(p n / (p + n / q)); the factor 4 and the +4 (the
    exponentials, per-chunk op overhead) are fitted to this CPU (2026-12-07, 1 thread, 16-320
    steps): t = 16 for the demo's p = n = 16 (1.8x faster than its configured 64 per Streamer
    call of 16 streams x 160 steps), 32-64 for the 4 x d512 LM's p = 64, n = 128. With autograd
    the saved intermediates change the balance, so training keeps the configured chunk."""
    best = 4 * math.sqrt(headdim * dstate / (headdim + dstate / heads_per_group + 4))
    return 1 << min(7, max(3, round(math.log2(best))))


def ssd_scan_torch(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk_size: int = 256, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                   initial_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   return_final_state: bool = False, input_weight: torch.Tensor | None = None):
    """``ssd_scan``'s "torch" backend (:func:`ssd_scan_chunked`'s arguments). A call with gradients
    runs the chunked scan at ``chunk_size``. One without runs the sequential scan in C on a CPU with
    a C++ compiler (``scan_cpu.py``: 2-7x faster; D, z, dt bias and softplus inside it but for
    packed sequences or a per-token D), else (no compiler, under ``torch.compile``, float64) the
    chunked scan at :func:`inference_chunk_size`; results change only by rounding."""
    from streamssm.kernels.ssd import scan_cpu

    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, cu_seqlens, return_final_state, None,
            input_weight)
    if needs_grad(x, dt, A, B, C, D, z, dt_bias, initial_state, input_weight):
        return ssd_scan_chunked(*args[:5], chunk_size, *args[5:])
    p, n = x.shape[-1], B.shape[-1]
    if scan_cpu.applies(x, dt, A, B, C, D, z, dt_bias, initial_state, input_weight):
        if cu_seqlens is not None or (D is not None and D.dim() == 3):
            return scan_by_rows(scan_cpu.ssd_rows_sequential, *args)
        b, _, h, _ = x.shape
        state = (torch.zeros(b, h, p, n) if initial_state is None
                 else initial_state.to(torch.float32, copy=True).contiguous())
        y = scan_cpu.scan_into(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, input_weight).to(x.dtype)
        return (y, state) if return_final_state else y
    return ssd_scan_chunked(*args[:5], inference_chunk_size(p, n, x.shape[-2] // B.shape[-2]), *args[5:])
