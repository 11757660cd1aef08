"""Mamba-1 selective scan in Triton: forward and backward, initial state in, final state out.

Shape legend:
    b batch, d dim (channels), l length, n dstate (padded to N_PAD), g groups of B/C,
    T chunk length (time tile), c chunk index, S segments (time ranges run by separate programs)

Recurrence (see ``reference.py``), per channel and state index, fp32:
    dt_t = softplus(delta_t + delta_bias);  x_t = exp(dt_t A);  b_t = dt_t u_t B_t
    h_t  = x_t h_{t-1} + b_t;  y_t = C_t . h_t + D u_t;  y_t *= silu(z_t)

Work split. A program owns (batch, BLOCK_D channels, one segment of whole chunks) and keeps
the (BLOCK_D, n) state in registers. Inside a chunk the T steps are combined in parallel by
an associative scan over the affine maps h -> x h + b; chunks follow each other serially.
When batch x channel blocks alone cannot fill the GPU (long sequences at batch 1), time is
also split into S segments: each segment's local end state is computed from zero
(``_selective_scan_chunk_state_kernel``), a short serial pass over segments gives every
segment its true start state (``_selective_scan_state_passing_kernel``), and then all
segments run the output pass in parallel (``_selective_scan_fwd_kernel``).

Backward never stores the (b, d, l, n) expansion. The forward saves the state at the start
of every chunk (b, l/T, d, n) fp32 = 4n/T bytes per (b, d, l) element. The backward walks the
chunks in reverse, recomputes the chunk's states from its checkpoint, and runs the adjoint
recurrence  g_t = C_t dy_t + x_{t+1} g_{t+1}  as a reverse associative scan. The adjoint
carried between chunks is q = dL/dh_{start-1} = x_0 g_0; at t = 0 it is the gradient of the
initial state. Segments of the backward use the same three passes in reverse time.
dB, dC (summed over channels) and dA, dD, d(delta_bias) (summed over batch and time) are
accumulated with fp32 atomics.

Performance note (H100, Triton 3.6): ``tl.associative_scan`` lays the scanned time axis one
step per lane (sizePerThread 1 along T, checked in the TTGIR), so each chunk's scan costs
log2(T) rounds of warp shuffles (~15 shuffles per exp2 at T=64) and, at T=64 with 4 warps, a
cross-warp pass through shared memory. That, not memory traffic, bounds these kernels today.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from streamssm.errors import ConfigError
from streamssm.kernels._common import autotune_configs, interpreting

#: Chunk length T on the GPU (checkpoint interval) and in the interpreter (small tests).
CHUNK_GPU = 64
CHUNK_INTERPRET = 16
#: Programs per SM the launcher aims for before it splits time into segments.
PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------- config helpers


def _configs() -> list:
    configs = [
        triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=1)
        for bd, w in ((2, 2), (4, 4), (8, 4), (8, 8), (16, 8))
    ]
    return autotune_configs(configs, triton.Config({"BLOCK_D": 8}, num_warps=1, num_stages=1))


# ----------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 then h -> a2 h + b2 (also right-to-left when scanned in reverse)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _program_channels(dim_per_group, groups, BLOCK_D: tl.constexpr):
    """Grid axis 0 runs over (batch, group), axis 1 over channel blocks inside the group.

    Returns batch index (int64), group index, channel offsets (BLOCK_D,) and their mask."""
    pid_bg = tl.program_id(0)
    o_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    grp = pid_bg % groups
    return (pid_bg // groups).to(tl.int64), grp, grp * dim_per_group + o_j, o_j < dim_per_group


@triton.jit
def _load_dt(p_delta, p_bias, o_d, m_d, o_t, m_t, s_dd, s_dl,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta tile (BLOCK_D, T) -> (dt fp32 with 0 where masked, pre-softplus value)."""
    m = m_d[:, None] & m_t[None, :]
    raw = tl.load(p_delta + o_d[:, None] * s_dd + o_t[None, :] * s_dl, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
    return tl.where(m, dt, 0.0), raw


@triton.jit
def _load_bc(p_M, o_n, m_n, o_t, m_t, s_n, s_l):
    """B or C tile as (N_PAD, T) fp32, zero where masked."""
    m = m_n[:, None] & m_t[None, :]
    return tl.load(p_M + o_n[:, None] * s_n + o_t[None, :] * s_l, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_A(p_A, o_d, m_d, o_n, m_n, s_Ad, s_An):
    """A (BLOCK_D, N_PAD) fp32 and A * log2(e) (exponentials are taken with exp2)."""
    A = tl.load(p_A + o_d[:, None] * s_Ad + o_n[None, :] * s_An, mask=m_d[:, None] & m_n[None, :], other=0.0)
    return A, A * 1.4426950408889634


@triton.jit
def _chunk_states(dt, u, A2, Bt, h0):
    """States h_t of one chunk (BLOCK_D, N_PAD, T) from its start state h0 (BLOCK_D, N_PAD).

    Time is the last (fastest) axis, so each thread scans a run of consecutive steps.
    Also returns x = exp(dt A) and b = dt u B, the coefficients of h_t = x_t h_{t-1} + b_t."""
    x = tl.exp2(dt[:, None, :] * A2[:, :, None])
    bb = (dt * u)[:, None, :] * Bt[None, :, :]
    xs, bs = tl.associative_scan((x, bb), axis=2, combine_fn=_affine_combine)
    return bs + xs * h0[:, :, None], x, bb


# ----------------------------------------------------------------------------- kernels


@triton.autotune(configs=_configs(), key=["dim", "dstate", "T", "REVERSE"])
@triton.jit
def _selective_scan_chunk_state_kernel(
    # pointers: w = u (forward) or dy (backward); M = B (forward) or C (backward)
    p_w, p_delta, p_A, p_M, p_z, p_bias, p_loc, p_dsum,
    # dimensions
    length, dim, dstate, dim_per_group, groups, n_chunks, chunks_per_seg, n_segments,
    # strides: w, delta, z are (b, d, l); A (d, n); M (b, g, n, l)
    s_wb, s_wd, s_wl, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_Mb, s_Mg, s_Mn, s_Ml,
    # meta
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    T: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Local state of one segment started from zero, and the segment's sum of dt.

    Forward (REVERSE=False): h_end = sum_t exp(A (S - cum_t)) dt_t u_t B_t (state at the end).
    Backward (REVERSE=True): q_start = sum_t exp(A cum_t) C_t dy_t silu(z_t) (adjoint at start).
    Writes loc (b, S, d, n) fp32 and dsum (b, S, d) fp32.
    """
    pid_b, grp, o_d, m_d = _program_channels(dim_per_group, groups, BLOCK_D)
    pid_s = tl.program_id(2)
    o_n = tl.arange(0, N_PAD)
    m_n = o_n < dstate
    A, A2 = _load_A(p_A, o_d, m_d, o_n, m_n, s_Ad, s_An)
    p_w += pid_b * s_wb
    p_delta += pid_b * s_db
    p_z += pid_b * s_zb
    p_M += pid_b * s_Mb + grp * s_Mg
    c0 = pid_s * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    tot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, c1 - c0):
        if REVERSE:
            c = c1 - 1 - i
        else:
            c = c0 + i
        o_t = c * T + tl.arange(0, T).to(tl.int64)
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        dt, _ = _load_dt(p_delta, p_bias, o_d, m_d, o_t, m_t, s_dd, s_dl, HAS_BIAS, SOFTPLUS)
        w = tl.load(p_w + o_d[:, None] * s_wd + o_t[None, :] * s_wl, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(p_z + o_d[:, None] * s_zd + o_t[None, :] * s_zl, mask=m, other=0.0).to(tl.float32)
            w = w * z * tl.sigmoid(z)
        if not REVERSE:
            w = w * dt
        Mt = _load_bc(p_M, o_n, m_n, o_t, m_t, s_Mn, s_Ml)
        cum = tl.cumsum(dt, axis=1)
        s_tile = tl.sum(dt, axis=1)
        if REVERSE:
            e = cum
        else:
            e = s_tile[:, None] - cum
        tile = tl.sum(tl.exp2(e[:, None, :] * A2[:, :, None]) * w[:, None, :] * Mt[None, :, :], axis=2)
        acc = tl.exp2(s_tile[:, None] * A2) * acc + tile
        tot += s_tile
    o_seg = pid_b * n_segments + pid_s
    m_dn = m_d[:, None] & m_n[None, :]
    tl.store(p_loc + (o_seg * dim + o_d[:, None]) * dstate + o_n[None, :], acc, mask=m_dn)
    tl.store(p_dsum + o_seg * dim + o_d, tot, mask=m_d)


@triton.jit
def _selective_scan_state_passing_kernel(
    p_io, p_loc, p_dsum, p_A,
    dim, dstate, n_segments, s_Ad, s_An,
    REVERSE: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Serial pass over segments; io, loc (b, S, d, n) fp32, dsum (b, S, d).

    Forward: io[0] holds the initial state; io[s] = exp(A dsum[s-1]) io[s-1] + loc[s-1].
    Backward: io[S-1] holds dL/d(final state); io[s-1] = exp(A dsum[s]) io[s] + loc[s].
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    o_n = tl.arange(0, N_PAD)
    m_n = o_n < dstate
    m_dn = m_d[:, None] & m_n[None, :]
    A, A2 = _load_A(p_A, o_d, m_d, o_n, m_n, s_Ad, s_An)
    o_dn = o_d[:, None] * dstate + o_n[None, :]
    base = pid_b * n_segments
    if REVERSE:
        h = tl.load(p_io + (base + n_segments - 1) * dim * dstate + o_dn, mask=m_dn, other=0.0)
    else:
        h = tl.load(p_io + base * dim * dstate + o_dn, mask=m_dn, other=0.0)
    for i in range(1, n_segments):
        if REVERSE:
            src = n_segments - i
            dst = src - 1
        else:
            src = i - 1
            dst = i
        dsum = tl.load(p_dsum + (base + src) * dim + o_d, mask=m_d, other=0.0)
        loc = tl.load(p_loc + (base + src) * dim * dstate + o_dn, mask=m_dn, other=0.0)
        h = tl.exp2(dsum[:, None] * A2) * h + loc
        tl.store(p_io + (base + dst) * dim * dstate + o_dn, h, mask=m_dn)


@triton.autotune(configs=_configs(), key=["dim", "dstate", "T", "HAS_Z"])
@triton.jit
def _selective_scan_fwd_kernel(
    # pointers
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_seg, p_y, p_ckpt, p_final,
    # dimensions
    length, dim, dstate, dim_per_group, groups, n_chunks, chunks_per_seg, n_segments,
    # strides: u, delta, z (b, d, l); A (d, n); B, C (b, g, n, l). y is contiguous (b, d, l)
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_CKPT: tl.constexpr, T: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Output pass: y for one (batch, channel block, segment) from the segment's start state.

    seg (b, S, d, n) start states; ckpt (b, n_chunks, d, n) state at every chunk start
    (written when STORE_CKPT); final (b, d, n) written by the last segment.
    """
    pid_b, grp, o_d, m_d = _program_channels(dim_per_group, groups, BLOCK_D)
    pid_s = tl.program_id(2)
    o_n = tl.arange(0, N_PAD)
    m_n = o_n < dstate
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * dstate + o_n[None, :]
    A, A2 = _load_A(p_A, o_d, m_d, o_n, m_n, s_Ad, s_An)
    if HAS_D:
        Dv = tl.load(p_D + o_d, mask=m_d, other=0.0)
    p_u += pid_b * s_ub
    p_delta += pid_b * s_db
    p_z += pid_b * s_zb
    p_B += pid_b * s_Bb + grp * s_Bg
    p_C += pid_b * s_Cb + grp * s_Cg
    p_y += pid_b * dim * length
    h = tl.load(p_seg + (pid_b * n_segments + pid_s) * dim * dstate + o_dn, mask=m_dn, other=0.0)
    c0 = pid_s * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    o_tt = tl.arange(0, T).to(tl.int64)
    for c in range(c0, c1):
        if STORE_CKPT:
            tl.store(p_ckpt + (pid_b * n_chunks + c) * dim * dstate + o_dn, h, mask=m_dn)
        o_t = c * T + o_tt
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        dt, _ = _load_dt(p_delta, p_bias, o_d, m_d, o_t, m_t, s_dd, s_dl, HAS_BIAS, SOFTPLUS)
        u = tl.load(p_u + o_d[:, None] * s_ud + o_t[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)
        Bt = _load_bc(p_B, o_n, m_n, o_t, m_t, s_Bn, s_Bl)
        Ct = _load_bc(p_C, o_n, m_n, o_t, m_t, s_Cn, s_Cl)
        hs, _, _ = _chunk_states(dt, u, A2, Bt, h)
        y = tl.sum(hs * Ct[None, :, :], axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(p_z + o_d[:, None] * s_zd + o_t[None, :] * s_zl, mask=m, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(p_y + o_d[:, None] * length + o_t[None, :], y.to(p_y.dtype.element_ty), mask=m)
        # masked steps have x = 1, b = 0, so the last column is the state after the last valid step
        h = tl.sum(tl.where((o_tt == T - 1)[None, None, :], hs, 0.0), axis=2)
    if pid_s == n_segments - 1:
        tl.store(p_final + pid_b * dim * dstate + o_dn, h, mask=m_dn)


@triton.autotune(configs=_configs(), key=["dim", "dstate", "T", "HAS_Z"],
                 reset_to_zero=["p_dA", "p_dB", "p_dC", "p_dD", "p_dbias"])
@triton.jit
def _selective_scan_bwd_kernel(
    # pointers: inputs
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_ckpt, p_dy, p_qend,
    # pointers: outputs (du, ddelta, dz contiguous (b, d, l); dB, dC fp32 (b, g, n, l); dA (d, n),
    # dD, dbias (d,) fp32 accumulated atomically; dh0 (b, d, n) fp32)
    p_du, p_ddelta, p_dz, p_dA, p_dB, p_dC, p_dD, p_dbias, p_dh0,
    # dimensions
    length, dim, dstate, dim_per_group, groups, n_chunks, chunks_per_seg, n_segments,
    # strides (dy is contiguous (b, d, l))
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of one (batch, channel block, segment), walking its chunks in reverse.

    qend (b, S, d, n): adjoint dL/dh at the segment's end coming from later steps."""
    pid_b, grp, o_d, m_d = _program_channels(dim_per_group, groups, BLOCK_D)
    pid_s = tl.program_id(2)
    o_n = tl.arange(0, N_PAD)
    m_n = o_n < dstate
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * dstate + o_n[None, :]
    A, A2 = _load_A(p_A, o_d, m_d, o_n, m_n, s_Ad, s_An)
    if HAS_D:
        Dv = tl.load(p_D + o_d, mask=m_d, other=0.0)
    p_u += pid_b * s_ub
    p_delta += pid_b * s_db
    p_z += pid_b * s_zb
    p_B += pid_b * s_Bb + grp * s_Bg
    p_C += pid_b * s_Cb + grp * s_Cg
    p_dy += pid_b * dim * length
    p_du += pid_b * dim * length
    p_ddelta += pid_b * dim * length
    p_dz += pid_b * dim * length
    p_dBC = (pid_b * groups + grp) * dstate * length
    q = tl.load(p_qend + (pid_b * n_segments + pid_s) * dim * dstate + o_dn, mask=m_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    c0 = pid_s * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    o_tt = tl.arange(0, T).to(tl.int64)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        o_t = c * T + o_tt
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        o_dt = o_d[:, None] * length + o_t[None, :]
        dt, raw = _load_dt(p_delta, p_bias, o_d, m_d, o_t, m_t, s_dd, s_dl, HAS_BIAS, SOFTPLUS)
        # dt of the next step inside this chunk (0 at the chunk's last step, so x_next = 1 there)
        m_tn = (o_tt < T - 1) & (o_t + 1 < length)
        dt_next, _ = _load_dt(p_delta, p_bias, o_d, m_d, o_t + 1, m_tn, s_dd, s_dl, HAS_BIAS, SOFTPLUS)
        u = tl.load(p_u + o_d[:, None] * s_ud + o_t[None, :] * s_ul, mask=m, other=0.0).to(tl.float32)
        Bt = _load_bc(p_B, o_n, m_n, o_t, m_t, s_Bn, s_Bl)
        Ct = _load_bc(p_C, o_n, m_n, o_t, m_t, s_Cn, s_Cl)
        h0 = tl.load(p_ckpt + (pid_b * n_chunks + c) * dim * dstate + o_dn, mask=m_dn, other=0.0)
        hs, x, bb = _chunk_states(dt, u, A2, Bt, h0)
        dy = tl.load(p_dy + o_dt, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(p_z + o_d[:, None] * s_zd + o_t[None, :] * s_zl, mask=m, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            y_pre = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y_pre += Dv[:, None] * u
            dz = dy * y_pre * sz * (1.0 + z * (1.0 - sz))
            tl.store(p_dz + o_dt, dz.to(p_dz.dtype.element_ty), mask=m)
            dye = dy * z * sz
        else:
            dye = dy
        # adjoint g_t = C_t dye_t + x_{t+1} g_{t+1}, with q entering after the chunk's last step
        x_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        ga, gv = tl.associative_scan((x_next, dye[:, None, :] * Ct[None, :, :]), axis=2,
                                     combine_fn=_affine_combine, reverse=True)
        g = gv + ga * q[:, :, None]
        g_xh = g * (hs - bb)  # g_t * x_t h_{t-1}
        dA_acc += tl.sum(g_xh * dt[:, None, :], axis=2)
        gB = tl.sum(g * Bt[None, :, :], axis=1)
        ddt = tl.sum(g_xh * A[:, :, None], axis=1) + u * gB
        du = dt * gB
        if HAS_D:
            du += Dv[:, None] * dye
            dD_acc += tl.sum(dye * u, axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(p_du + o_dt, du.to(p_du.dtype.element_ty), mask=m)
        tl.store(p_ddelta + o_dt, ddt.to(p_ddelta.dtype.element_ty), mask=m)
        m_tn2 = m_n[:, None] & m_t[None, :]
        o_tn = p_dBC + o_n[:, None] * length + o_t[None, :]
        dBt = tl.sum(g * (dt * u)[:, None, :], axis=0)
        tl.atomic_add(p_dB + o_tn, dBt, mask=m_tn2, sem="relaxed")
        dCt = tl.sum(hs * dye[:, None, :], axis=0)
        tl.atomic_add(p_dC + o_tn, dCt, mask=m_tn2, sem="relaxed")
        q = tl.sum(tl.where((o_tt == 0)[None, None, :], x * g, 0.0), axis=2)
    tl.atomic_add(p_dA + o_d[:, None] * dstate + o_n[None, :], dA_acc, mask=m_dn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(p_dD + o_d, dD_acc, mask=m_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, dbias_acc, mask=m_d, sem="relaxed")
    if pid_s == 0:
        tl.store(p_dh0 + pid_b * dim * dstate + o_dn, q, mask=m_dn)


# ----------------------------------------------------------------------------- launchers


def _chunk_len(chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 2 or chunk & (chunk - 1):
            raise ConfigError(f"selective_scan: chunk must be a power of two >= 2, got {chunk}")
        return chunk
    return CHUNK_INTERPRET if interpreting() else CHUNK_GPU


def _num_segments(batch: int, dim: int, n_chunks: int, device: torch.device) -> int:
    """Split time into segments only when batch x channel blocks cannot fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * triton.cdiv(dim, 8)
    return max(1, min(n_chunks, triton.cdiv(PROGRAMS_PER_SM * sms, programs), 65535))


def _grid3(batch: int, groups: int, dim: int, segments: int):
    """(batch x groups, channel blocks per group, segments)."""
    return lambda meta: (batch * groups, triton.cdiv(dim // groups, meta["BLOCK_D"]), segments)


def _pass_grid(batch: int, dim: int):
    return (batch, triton.cdiv(dim, 16))


def _bc_strides(M: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(M.stride())  # (b, g, n, l)


def _dims(u: torch.Tensor, A: torch.Tensor, B4: torch.Tensor, T: int, segments: int | None):
    b, d, l = u.shape
    g = B4.shape[1]
    n_chunks = triton.cdiv(l, T)
    if segments is None:
        segments = _num_segments(b, d, n_chunks, u.device)
    cps = triton.cdiv(n_chunks, max(1, min(segments, n_chunks)))
    return b, d, l, A.shape[1], g, n_chunks, cps, triton.cdiv(n_chunks, cps)


def _selective_scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, softplus, h0, store_ckpt, segments, T):
    """Launch the forward passes. Returns y (b, d, l), final (b, d, n), ckpt (b, l/T, d, n) | None, S."""
    b, d, l, n, g, n_chunks, cps, S = _dims(u, A, B4, T, segments)
    n_pad = triton.next_power_of_2(n)
    f32 = dict(device=u.device, dtype=torch.float32)
    seg = torch.empty(b, S, d, n, **f32)
    if h0 is None:
        seg[:, 0].zero_()
    else:
        seg[:, 0].copy_(h0)
    zz = z if z is not None else u
    dims = (l, d, n, d // g, g, n_chunks, cps, S)
    strides_udz = (*u.stride(), *delta.stride(), *zz.stride())
    if S > 1:
        loc = torch.empty(b, S, d, n, **f32)
        dsum = torch.empty(b, S, d, **f32)
        _selective_scan_chunk_state_kernel[_grid3(b, g, d, S)](
            u, delta, A, B4, zz, delta_bias, loc, dsum, *dims,
            *strides_udz, *A.stride(), *_bc_strides(B4),
            HAS_Z=False, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, REVERSE=False,
            T=T, N_PAD=n_pad,
        )
        _selective_scan_state_passing_kernel[_pass_grid(b, d)](
            seg, loc, dsum, A, d, n, S, *A.stride(), REVERSE=False, N_PAD=n_pad, BLOCK_D=16,
        )
    y = torch.empty(b, d, l, device=u.device, dtype=u.dtype)
    final = torch.empty(b, d, n, **f32)
    ckpt = torch.empty(b, n_chunks, d, n, **f32) if store_ckpt else final
    _selective_scan_fwd_kernel[_grid3(b, g, d, S)](
        u, delta, A, B4, C4, D, zz, delta_bias, seg, y, ckpt, final, *dims,
        *strides_udz, *A.stride(), *_bc_strides(B4), *_bc_strides(C4),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        STORE_CKPT=store_ckpt, T=T, N_PAD=n_pad,
    )
    return y, final, (ckpt if store_ckpt else None), S


def _selective_scan_bwd(dy, dfinal, u, delta, A, B4, C4, D, z, delta_bias, softplus, ckpt, segments, T):
    """Launch the backward passes. Returns du, ddelta, dA, dB4, dC4, dD, dz, dbias, dh0."""
    b, d, l, n, g, n_chunks, cps, S = _dims(u, A, B4, T, segments)
    n_pad = triton.next_power_of_2(n)
    f32 = dict(device=u.device, dtype=torch.float32)
    dy = dy.contiguous()
    zz = z if z is not None else u
    dims = (l, d, n, d // g, g, n_chunks, cps, S)
    strides_udz = (*u.stride(), *delta.stride(), *zz.stride())
    qend = torch.empty(b, S, d, n, **f32)
    if dfinal is None:
        qend[:, S - 1].zero_()
    else:
        qend[:, S - 1].copy_(dfinal)
    if S > 1:
        loc = torch.empty(b, S, d, n, **f32)
        dsum = torch.empty(b, S, d, **f32)
        _selective_scan_chunk_state_kernel[_grid3(b, g, d, S)](
            dy, delta, A, C4, zz, delta_bias, loc, dsum, *dims,
            *dy.stride(), *delta.stride(), *zz.stride(), *A.stride(), *_bc_strides(C4),
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, REVERSE=True,
            T=T, N_PAD=n_pad,
        )
        _selective_scan_state_passing_kernel[_pass_grid(b, d)](
            qend, loc, dsum, A, d, n, S, *A.stride(), REVERSE=True, N_PAD=n_pad, BLOCK_D=16,
        )
    du = torch.empty(b, d, l, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(b, d, l, device=u.device, dtype=delta.dtype)
    dz = torch.empty(b, d, l, device=u.device, dtype=z.dtype) if z is not None else du
    dA = torch.zeros(d, n, **f32)
    dB4 = torch.zeros(b, g, n, l, **f32)
    dC4 = torch.zeros(b, C4.shape[1], n, l, **f32)
    dD = torch.zeros(d, **f32)
    dbias = torch.zeros(d, **f32)
    dh0 = torch.empty(b, d, n, **f32)
    _selective_scan_bwd_kernel[_grid3(b, g, d, S)](
        u, delta, A, B4, C4, D, zz, delta_bias, ckpt, dy, qend,
        du, ddelta, dz, dA, dB4, dC4, dD, dbias, dh0, *dims,
        *strides_udz, *A.stride(), *_bc_strides(B4), *_bc_strides(C4),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        T=T, N_PAD=n_pad,
    )
    return du, ddelta, dA, dB4, dC4, dD, (dz if z is not None else None), dbias, dh0


# ----------------------------------------------------------------------------- autograd


def _as_groups(M: torch.Tensor) -> torch.Tensor:
    """B/C (b, n, l) -> (b, 1, n, l) view; (b, g, n, l) unchanged."""
    return M.unsqueeze(1) if M.dim() == 3 else M


class SelectiveScanFn(torch.autograd.Function):
    """Selective scan with gradients for u, delta, A, B, C, D, z, delta_bias and initial_state."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, segments, chunk):
        B4, C4 = _as_groups(B), _as_groups(C)
        if B4.shape[1] != C4.shape[1]:
            # one group count per program: repeat both to the least common multiple (divides d)
            g = math.lcm(B4.shape[1], C4.shape[1])
            B4 = B4.repeat_interleave(g // B4.shape[1], dim=1)
            C4 = C4.repeat_interleave(g // C4.shape[1], dim=1)
        needs_grad = any(ctx.needs_input_grad)
        y, final, ckpt, S = _selective_scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus,
                                                initial_state, needs_grad, segments, chunk)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, ckpt)
            ctx.softplus, ctx.segments, ctx.chunk = delta_softplus, S, chunk
            ctx.b_shape, ctx.c_shape = B.shape, C.shape
            ctx.has_h0 = initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, delta, A, B4, C4, D, z, delta_bias, ckpt = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        du, ddelta, dA, dB4, dC4, dD, dz, dbias, dh0 = _selective_scan_bwd(
            dy, dfinal, u, delta, A, B4, C4, D, z, delta_bias, ctx.softplus, ckpt, ctx.segments, ctx.chunk)
        dB = _ungroup(dB4, ctx.b_shape).to(B4.dtype)
        dC = _ungroup(dC4, ctx.c_shape).to(C4.dtype)
        return (du, ddelta, dA, dB, dC,
                dD if D is not None else None, dz, dbias if delta_bias is not None else None,
                None, dh0 if ctx.has_h0 else None, None, None)


def _ungroup(dM4: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast group axis back and restore the caller's (b, n, l) or (b, g, n, l) shape."""
    if len(shape) == 3:
        return dM4.sum(1)  # (b, g, n, l) -> (b, n, l)
    g = shape[1]
    if dM4.shape[1] != g:
        dM4 = dM4.unflatten(1, (g, dM4.shape[1] // g)).sum(2)  # (b, g, r, n, l) -> (b, g, n, l)
    return dM4


def selective_scan_triton(
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
    segments: int | None = None,
    chunk: int | None = None,
):
    """Selective scan on the Triton kernels (inputs validated by ``streamssm.kernels.selective_scan``).

    u, delta, z: (b, d, l) fp32/fp16/bf16; A: (d, n) fp32; B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,) fp32; initial_state: (b, d, n) fp32. ``segments`` forces the number of
    time segments run in parallel (default: chosen from the GPU size); ``chunk`` the chunk
    length T, a power of two (default 64 on the GPU, 16 in the interpreter).
    Returns y (b, d, l) in u.dtype [, final_state (b, d, n) fp32].
    """
    y, final = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                     initial_state, segments, _chunk_len(chunk))
    return (y, final) if return_final_state else y
