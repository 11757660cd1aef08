"""Mamba-1 selective scan in Triton: forward and backward, initial state in, final state out.

Shape legend:
    b batch, d dim (channels), l length, n dstate (padded to N_PAD), g groups of B/C,
    T chunk length (checkpoint interval), TT / TB steps per tile, S segments (time ranges run
    by separate programs)

Recurrence (see ``reference.py``), per channel and state index, fp32:
    dt_t = softplus(delta_t + delta_bias);  x_t = exp(dt_t A);  b_t = dt_t u_t B_t
    h_t  = x_t h_{t-1} + b_t;  y_t = C_t . h_t + D u_t;  y_t *= silu(z_t)

Work split: time per thread. A program is one warp (or two) owning (batch, 32 channels, one
segment of whole chunks); each thread owns one channel and its n states in registers and
walks time step after step, as the CUDA kernel's threads do. u, delta, z come in (32, TT)
tiles, TT consecutive steps per thread (one 16-byte load; TT = 8 for 16-bit inputs), loaded a
tile ahead; inside a tile the steps are unrolled and a step's column is a register read
(``_column``). B and C are copied once per call into fp32 rows (b, g, l, N_PAD), so that a
step's B_t is one contiguous row every thread reads. Sums over n (y) stay in-thread. The
autotuner may also pick BLOCK_D 16 or 8 for a one-warp program: then 2 or 4 threads share a
channel, each holding part of its states (a sum over n adds one or two shuffles), and the same
channels run in 2x or 4x the warps at fewer registers each.
When batch x channel blocks cannot give every SM sub-partition a warp (long sequences at
small batch), time is also split into S segments: each segment's local end state is
computed from zero (the forward kernel with STATE_ONLY), a short serial pass over segments
gives every segment its true start state (``_selective_scan_state_passing_kernel``), and then
all segments run the output pass in parallel.

Backward never stores the (b, d, l, n) expansion. The forward saves the state at the start
of every chunk (b, l/T, d, n) fp32 = 4n/T bytes per (b, d, l) element. The backward walks the
chunks in reverse; per chunk it walks forward from the checkpoint leaving the state at every
TB-step tile start in a per-program scratch, then per tile in reverse recomputes the TB
states (kept in registers) and steps the adjoint  g_t = C_t dye_t + x_{t+1} g_{t+1}  back
through them. The adjoint carried between steps is q = dL/dh_{t-1} = x_t g_t; at t = 0 it is
the gradient of the initial state. Backward segments get their end adjoint from the reverse
passes ``_selective_scan_adjoint_state_kernel`` + state passing. dB_t, dC_t (summed over the
warp's channels by shuffles) and dA, dD, d(delta_bias) are accumulated with fp32 atomics.

Performance note (H100 80GB HBM3, Triton 3.6; bf16, no z, CUDA graph; fwd / fwd+bwd ms): 2026-12-07,
mamba-ssm's CUDA scan in the same call: M1 0.763 / 4.97 (mamba-ssm 0.827 / 4.46: 0.90x fwd+bwd), M2
1.438 / 7.57 (1.358 / 6.45: 0.85x), M3 10.98 / 60.1 (10.94 / 69.1: 1.15x); the one-channel-per-thread
kernels before: M1 1.232 / 8.93, M2 2.042 / 12.0. What paid: 4-step reverse tiles in the backward
(M1 backward kernel 4.78 -> 4.14 ms at BLOCK_D 16), and narrower one-warp programs (BLOCK_D 16 / 8),
i.e. more warps in flight. A step of the walk is latency-bound, not issue-bound (M1 backward before:
~3600 cycles per step against ~820 instructions, ~40 % of them the shuffle sums of dB_t, dC_t), and
at M1 batch x channel blocks gave each SM ~3 warps of 32 channels: at 16 channels a program the M1
backward kernel took 4.97 ms instead of 8.24 (8 channels: 7.70), the output pass of the forward 0.76
ms at 8 channels instead of 1.21. Forcing time segments instead (S = 2, 8: the same extra warps at
the price of the segment passes) was slower at M1 and M2. The ``prefetch.global.L1`` hints
(``prefetch_l1``, left out in the interpreter) fetch B/C rows a tile ahead (forward) or a few
reverse tiles ahead (backward); prefetching the state each reverse tile starts from as well made
no difference (M1 5.86 vs 5.83 ms fwd+bwd without, M2 8.78 vs 8.84; H100, 2026-12-07) and is gone.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from streamssm.errors import ConfigError
from streamssm.kernels._common import autotune_configs, interpreting
from streamssm.kernels._triton import LN2, LOG2E, prefetch_l1, silu, silu_grad, softplus, softplus_grad

#: Chunk length T on the GPU (checkpoint interval) and in the interpreter (small tests).
CHUNK_GPU = 64
CHUNK_INTERPRET = 16
#: ... and on the GPU for sequences of at least CHUNK_LONG_FROM steps: fewer checkpoints and chunk
#: passes. H100, bf16, fwd+bwd in a CUDA graph (``bench_selective_scan.py --chunks 128,256``,
#: 2026-12-07): M2 (2 x 2048 x 16,384) 7.55 -> 6.90 ms (two runs: 0.91x), M3 (1 x 512 x 2^20)
#: 60.4 -> 54.5 ms (0.90x) and peak memory 3.77 -> 3.44 GiB; at M1 (8 x 1536 x 4,096) 64 stays
#: (4.92 against 5.11 ms at 256, 5.03 at 128)
CHUNK_LONG = 256
CHUNK_LONG_FROM = 16384
#: One-warp programs per SM the launchers aim for before they split time into segments: one per
#: SM sub-partition (a warp walking time keeps its sub-partition's exponential unit busy).
WARPS_PER_SM = 4
#: The backward's reverse tiles prefetch the B/C rows of the tile this many tiles ahead into L1.
BWD_PREFETCH_TILES = 4


# ----------------------------------------------------------------------------- config helpers


def _configs() -> list:
    configs = [
        triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=1)
        for bd, w in ((2, 2), (4, 4), (8, 4), (8, 8), (16, 8))
    ]
    return autotune_configs(configs, triton.Config({"BLOCK_D": 8}, num_warps=1, num_stages=1))


def _bwd_configs() -> list:
    """One warp, so that the per-step sums over channels stay warp shuffles: a channel per thread
    (BLOCK_D 32), or per 2 / 4 threads (16 / 8), each holding half / a quarter of its n states:
    twice / four times the warps for the same channels, at fewer registers per thread (ptxas,
    sm_90, n 16, bf16: 255 registers + 336 B spilled at 32; 249 and none at 16; 250 at 8)."""
    return autotune_configs([triton.Config({"BLOCK_D": bd}, num_warps=1, num_stages=1) for bd in (32, 16, 8)])


def _reverse_tile(TT: int) -> int:
    """Steps of the backward's reverse tiles (TB), whose states and decays stay in registers (2 x TB x
    BLOCK_D x N_PAD / 32 values a thread): 4, or the walk tile TT where that is shorter (the walk
    leaves a state every TB steps inside its tiles). Autotuned beside BLOCK_D on the H100
    (2026-12-07), 4 steps beat 2 at every shape timed: the M1 backward kernel 4.14 ms against 4.78
    at BLOCK_D 16, M2 4.50 / 5.45, M3 36.2 / 42.3, the best config at the GPU test shapes by 10-17 %;
    8 steps spilled (16 x 8: ~1 KB) and lost (M1 5.50 ms at 8 x 8). A fixed TB halves the scratch of
    tile states that had to be sized for the shortest tile on offer."""
    return min(4, TT)


def _fwd_configs() -> list:
    """A channel per thread (BLOCK_D = 32 x warps), the n states of a channel in its registers; or
    a channel per 2 / 4 threads of one warp (BLOCK_D 16 / 8: 173 / 128 registers instead of 255),
    which gives long sequences at small batch more warps in flight."""
    configs = [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=1)
               for bd, w in ((32, 1), (64, 2), (16, 1), (8, 1))]
    return autotune_configs(configs, configs[0])


# ----------------------------------------------------------------------------- shared jit helpers


@triton.jit
def _program_channels(dim_per_group, groups, BLOCK_D: tl.constexpr):
    """Grid axis 0 runs over (batch, group), axis 1 over channel blocks inside the group.

    Returns batch index (int64), group index, channel offsets (BLOCK_D,) and their mask."""
    pid_bg = tl.program_id(0)
    o_j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    grp = pid_bg % groups
    return (pid_bg // groups).to(tl.int64), grp, grp * dim_per_group + o_j, o_j < dim_per_group


@triton.jit
def _program_slot(dim_per_group, BLOCK_D: tl.constexpr):
    """Linear id (int64) of the program's (batch x group, channel block)."""
    return tl.program_id(0).to(tl.int64) * tl.cdiv(dim_per_group, BLOCK_D) + tl.program_id(1)


@triton.jit
def _dt(raw, m, SOFTPLUS: tl.constexpr):
    """dt of a (BLOCK_D, T) tile from delta + delta_bias (fp32), 0 where ~m."""
    dt = raw
    if SOFTPLUS:
        dt = softplus(raw)
    return tl.where(m, dt, 0.0)


@triton.jit
def _load_dt(p_delta, p_bias, o_d, m_d, o_t, m_t, s_dd, s_dl,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta tile (BLOCK_D, T) -> (dt fp32 with 0 where masked, pre-softplus value)."""
    m = m_d[:, None] & m_t[None, :]
    raw = tl.load(p_delta + o_d[:, None] * s_dd + o_t[None, :] * s_dl, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return _dt(raw, m, SOFTPLUS), raw


@triton.jit
def _column(X, o_tt, j: tl.constexpr):
    """Column j (R,) of a (R, TT) tile. The tiles are loaded TT consecutive steps per thread, so
    the select and the sum with -0.0 (x + -0.0 == x) fold away to a register read."""
    return tl.sum(tl.where(o_tt[None, :] == j, X, -0.0), axis=1)


@triton.jit
def _load_bc(p_M, o_n, m_n, o_t, m_t, s_n, s_l):
    """B or C tile as (N_PAD, T) fp32, zero where masked."""
    m = m_n[:, None] & m_t[None, :]
    return tl.load(p_M + o_n[:, None] * s_n + o_t[None, :] * s_l, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_A2(p_A, o_d, o_n, m_dn, s_Ad, s_An):
    """A * log2(e) (BLOCK_D, N_PAD) fp32, 0 where ~m_dn (exponentials are taken with exp2)."""
    return tl.load(p_A + o_d[:, None] * s_Ad + o_n[None, :] * s_An, mask=m_dn, other=0.0) * LOG2E


@triton.jit
def _program_segment(dim_per_group, groups, dstate, n_chunks, chunks_per_seg, n_segments,
                     T: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where a (batch x group, channel block, segment) program works (grid as in ``_grid3``).

    Returns batch (int64), group, segment; channels o_d (BLOCK_D,), their mask m_d; states o_n
    (N_PAD,); the (BLOCK_D, N_PAD) tile's mask m_dn and offsets o_dn into a (d, n) state; the
    segment's row o_seg of (b, S) arrays, its chunks [c0, c1) and its first step t0 (int64)."""
    pid_b, grp, o_d, m_d = _program_channels(dim_per_group, groups, BLOCK_D)
    pid_s = tl.program_id(2)
    o_n = tl.arange(0, N_PAD)
    m_dn = m_d[:, None] & (o_n < dstate)[None, :]
    c0 = pid_s * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    return (pid_b, grp, pid_s, o_d, m_d, o_n, m_dn, o_d[:, None] * dstate + o_n[None, :],
            pid_b * n_segments + pid_s, c0, c1, c0.to(tl.int64) * T)


@triton.jit
def _channel_params(p_A, p_D, p_bias, o_d, m_d, o_n, m_dn, s_Ad, s_An,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The block's A * log2(e) (BLOCK_D, N_PAD), D and delta_bias (BLOCK_D,) fp32 (zeros when absent)."""
    if HAS_D:
        Dv = tl.load(p_D + o_d, mask=m_d, other=0.0)
    else:
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(p_bias + o_d, mask=m_d, other=0.0)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return _load_A2(p_A, o_d, o_n, m_dn, s_Ad, s_An), Dv, bias


# ----------------------------------------------------------------------------- kernels


@triton.autotune(configs=_configs(), key=["dim", "dstate", "T", "HAS_Z"])
@triton.jit
def _selective_scan_adjoint_state_kernel(
    p_dy, p_delta, p_A, p_C, p_z, p_bias, p_loc, p_dsum,
    # dimensions
    length, dim, dstate, dim_per_group, groups, n_chunks, chunks_per_seg, n_segments,
    # strides: dy, delta, z are (b, d, l); A (d, n); C (b, g, n, l)
    s_wb, s_wd, s_wl, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_Mb, s_Mg, s_Mn, s_Ml,
    # meta
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward segments: adjoint at a segment's start from zero after it, and its sum of dt.

    q_start = sum_t exp(A cum_t) C_t dy_t silu(z_t), cum_t = dt summed up to t inside the segment.
    Writes loc (b, S, d, n) fp32 and dsum (b, S, d) fp32.
    """
    pid_b, grp, pid_s, o_d, m_d, o_n, m_dn, o_dn, o_seg, c0, c1, t0 = _program_segment(
        dim_per_group, groups, dstate, n_chunks, chunks_per_seg, n_segments, T, N_PAD, BLOCK_D)
    m_n = o_n < dstate
    A2 = _load_A2(p_A, o_d, o_n, m_dn, s_Ad, s_An)
    p_dy += pid_b * s_wb
    p_delta += pid_b * s_db
    p_z += pid_b * s_zb
    p_C += pid_b * s_Mb + grp * s_Mg
    acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    tot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        o_t = c * T + tl.arange(0, T).to(tl.int64)
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        dt = _load_dt(p_delta, p_bias, o_d, m_d, o_t, m_t, s_dd, s_dl, HAS_BIAS, SOFTPLUS)[0]
        w = tl.load(p_dy + o_d[:, None] * s_wd + o_t[None, :] * s_wl, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(p_z + o_d[:, None] * s_zd + o_t[None, :] * s_zl, mask=m, other=0.0).to(tl.float32)
            w = w * silu(z)
        Ct = _load_bc(p_C, o_n, m_n, o_t, m_t, s_Mn, s_Ml)
        cum = tl.cumsum(dt, axis=1)
        s_tile = tl.sum(dt, axis=1)
        tile = tl.sum(tl.exp2(cum[:, None, :] * A2[:, :, None]) * w[:, None, :] * Ct[None, :, :], axis=2)
        acc = tl.exp2(s_tile[:, None] * A2) * acc + tile
        tot += s_tile
    tl.store(p_loc + o_seg * dim * dstate + o_dn, acc, mask=m_dn)
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
    A2 = _load_A2(p_A, o_d, o_n, m_dn, s_Ad, s_An)
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


@triton.autotune(configs=_fwd_configs(), key=["dim", "dstate", "T", "TT", "HAS_Z", "STATE_ONLY"])
@triton.jit
def _selective_scan_fwd_kernel(
    # pointers: B, C are the fp32 row copies (b, g, rows, N_PAD), one contiguous row per step
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_seg, p_y, p_ckpt, p_out, p_dsum,
    # dimensions
    length, dim, dstate, dim_per_group, groups, n_chunks, chunks_per_seg, n_segments,
    # strides: u, delta, z (b, d, l); A (d, n); rows (b, g). y is contiguous (b, d, l)
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_Rb, s_Rg,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STATE_ONLY: tl.constexpr, STORE_CKPT: tl.constexpr,
    T: tl.constexpr, TT: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Walk one (batch, channel block, segment) through time, one step after the other.

    Each thread owns a channel and its N_PAD states. Time goes by tiles of TT steps: the
    (BLOCK_D, TT) tiles of u, delta (and z) are loaded one tile ahead, TT contiguous steps per
    thread; inside a tile the TT steps are unrolled, each reading one row of B (and C) loaded a
    step ahead from L1, where the previous tile prefetched them. Output pass (STATE_ONLY=False):
    y from the segment's start state seg (b, S, d, n), the state at every chunk start into ckpt
    (b, n_chunks, d, n) when STORE_CKPT, the final state (b, d, n) into out by the last segment.
    STATE_ONLY: the segment's end state from zero into out = loc (b, S, d, n) and its sum of dt
    into dsum (b, S, d).
    """
    pid_b, grp, pid_s, o_d, m_d, o_n, m_dn, o_dn, o_seg, c0, c1, t0 = _program_segment(
        dim_per_group, groups, dstate, n_chunks, chunks_per_seg, n_segments, T, N_PAD, BLOCK_D)
    A2, Dv, bias = _channel_params(p_A, p_D, p_bias, o_d, m_d, o_n, m_dn, s_Ad, s_An, HAS_D, HAS_BIAS, BLOCK_D)
    p_u += pid_b * s_ub + o_d[:, None] * s_ud
    p_delta += pid_b * s_db + o_d[:, None] * s_dd
    p_z += pid_b * s_zb + o_d[:, None] * s_zd
    p_y += pid_b * dim * length + o_d[:, None] * length
    p_B += pid_b * s_Rb + grp * s_Rg + t0 * N_PAD
    p_C += pid_b * s_Rb + grp * s_Rg + t0 * N_PAD
    if STATE_ONLY:
        h = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
        tot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    else:
        h = tl.load(p_seg + o_seg * dim * dstate + o_dn, mask=m_dn, other=0.0)
    o_tt = tl.arange(0, TT)
    m_nx = m_d[:, None] & (t0 + o_tt < length)[None, :]
    u_nx = tl.load(p_u + (t0 + o_tt)[None, :] * s_ul, mask=m_nx, other=0.0)
    dl_nx = tl.load(p_delta + (t0 + o_tt)[None, :] * s_dl, mask=m_nx, other=0.0)
    B_nx = tl.load(p_B + o_n)
    if not STATE_ONLY:
        C_nx = tl.load(p_C + o_n)
        if HAS_Z:
            z_nx = tl.load(p_z + (t0 + o_tt)[None, :] * s_zl, mask=m_nx, other=0.0)
    for c in range(c0, c1):
        if STORE_CKPT:
            tl.store(p_ckpt + (pid_b * n_chunks + c) * dim * dstate + o_dn, h, mask=m_dn)
        for k in range(T // TT):
            # p_B, p_C point at this tile's first row: the next tile's rows into L1 meanwhile
            prefetch_l1(p_B + TT * N_PAD, TT * N_PAD, (TT * N_PAD + 31) // 32)
            if not STATE_ONLY:
                prefetch_l1(p_C + TT * N_PAD, TT * N_PAD, (TT * N_PAD + 31) // 32)
            o_t = t0 + ((c - c0) * T + k * TT) + o_tt
            m = m_d[:, None] & (o_t < length)[None, :]
            m_nx = m_d[:, None] & (o_t + TT < length)[None, :]
            u = u_nx.to(tl.float32)
            raw = dl_nx.to(tl.float32)
            u_nx = tl.load(p_u + (o_t + TT)[None, :] * s_ul, mask=m_nx, other=0.0)
            dl_nx = tl.load(p_delta + (o_t + TT)[None, :] * s_dl, mask=m_nx, other=0.0)
            if HAS_BIAS:
                raw += bias[:, None]
            dt = _dt(raw, m, SOFTPLUS)
            du = dt * u
            Y = tl.zeros((BLOCK_D, TT), dtype=tl.float32)
            for j in tl.static_range(TT):
                # masked steps have dt = 0: x = 1, b = 0, so h passes through unchanged
                Bj = B_nx
                p_B += N_PAD
                B_nx = tl.load(p_B + o_n)
                dtj = _column(dt, o_tt, j)
                h = tl.exp2(dtj[:, None] * A2) * h + _column(du, o_tt, j)[:, None] * Bj[None, :]
                if not STATE_ONLY:
                    Cj = C_nx
                    p_C += N_PAD
                    C_nx = tl.load(p_C + o_n)
                    Y = tl.where(o_tt[None, :] == j, tl.sum(h * Cj[None, :], axis=1)[:, None], Y)
            if STATE_ONLY:
                tot += tl.sum(dt, axis=1)
            else:
                if HAS_D:
                    Y += Dv[:, None] * u
                if HAS_Z:
                    z = z_nx.to(tl.float32)
                    z_nx = tl.load(p_z + (o_t + TT)[None, :] * s_zl, mask=m_nx, other=0.0)
                    Y = Y * silu(z)
                tl.store(p_y + o_t[None, :], Y.to(p_y.dtype.element_ty), mask=m)
    if STATE_ONLY:
        tl.store(p_out + o_seg * dim * dstate + o_dn, h, mask=m_dn)
        tl.store(p_dsum + o_seg * dim + o_d, tot, mask=m_d)
    elif pid_s == n_segments - 1:
        tl.store(p_out + pid_b * dim * dstate + o_dn, h, mask=m_dn)


@triton.autotune(configs=_bwd_configs(), key=["dim", "dstate", "T", "TT", "TB", "HAS_Z"],
                 reset_to_zero=["p_dA", "p_dB", "p_dC", "p_dD", "p_dbias"])
@triton.jit
def _selective_scan_bwd_kernel(
    # pointers: inputs (B, C: fp32 rows (b, g, rows, N_PAD) as in the forward)
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_ckpt, p_dy, p_qend, p_scratch,
    # pointers: outputs (du, ddelta, dz contiguous (b, d, l); dB, dC fp32 rows like B, C; dA (d, n),
    # dD, dbias (d,) fp32, all accumulated atomically; dh0 (b, d, n) fp32)
    p_du, p_ddelta, p_dz, p_dA, p_dB, p_dC, p_dD, p_dbias, p_dh0,
    # dimensions
    length, dim, dstate, dim_per_group, groups, n_chunks, chunks_per_seg, n_segments,
    # strides (dy is contiguous (b, d, l))
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_Rb, s_Rg,
    # meta
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, TT: tl.constexpr, TB: tl.constexpr, N_PAD: tl.constexpr, PF_AHEAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gradients of one (batch, channel block, segment), chunks in reverse; a channel per thread
    (per 2 / 4 threads at BLOCK_D 16 / 8).

    Per chunk: walk forward from its checkpoint, leaving the state at every TB-step tile start in
    scratch (b, S, T/TB, d, N_PAD); then per tile in reverse: recompute its TB states (kept in
    registers) and step the adjoint g_t = C_t dye_t + x_{t+1} g_{t+1} back through them. q, the
    adjoint entering a step from the later ones, is dL/d(initial state) at the end of segment 0.
    qend (b, S, d, n): the adjoint after the segment's last step. dB, dC rows are summed over
    the block's channels, then added atomically.
    """
    tl.static_assert(TB <= TT, "a reverse tile must fit in a walk tile (the walk leaves a state every TB steps)")
    pid_b, grp, pid_s, o_d, m_d, o_n, m_dn, o_dn, o_seg, c0, c1, t0 = _program_segment(
        dim_per_group, groups, dstate, n_chunks, chunks_per_seg, n_segments, T, N_PAD, BLOCK_D)
    A2, Dv, bias = _channel_params(p_A, p_D, p_bias, o_d, m_d, o_n, m_dn, s_Ad, s_An, HAS_D, HAS_BIAS, BLOCK_D)
    p_u += pid_b * s_ub + o_d[:, None] * s_ud
    p_delta += pid_b * s_db + o_d[:, None] * s_dd
    p_z += pid_b * s_zb + o_d[:, None] * s_zd
    o_dl = pid_b * dim * length + o_d[:, None] * length
    p_dy += o_dl
    p_du += o_dl
    p_ddelta += o_dl
    p_dz += o_dl
    o_rows = pid_b * s_Rb + grp * s_Rg
    p_B += o_rows
    p_C += o_rows
    p_dB += o_rows
    p_dC += o_rows
    # scratch (programs, T/TB, BLOCK_D, N_PAD), a slot per program; the n index is permuted
    # (5 n mod N_PAD) so that no axis looks contiguous and the state keeps its layout
    o_perm = tl.arange(0, BLOCK_D)[:, None] * N_PAD + (o_n * 5 % N_PAD)[None, :]
    p_scratch += ((_program_slot(dim_per_group, BLOCK_D) * n_segments + pid_s) * (T // TB)) * (BLOCK_D * N_PAD)
    p_scratch += o_perm
    q = tl.load(p_qend + o_seg * dim * dstate + o_dn, mask=m_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, N_PAD), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    o_tb = tl.arange(0, TB)
    o_tt = tl.arange(0, TT)
    # loads one tile ahead: u, delta by TT steps forward (the chunk walks, *_nx); u, delta, dy, z by TB
    # steps backward (the reverse tiles, *_nb)
    o_nx = t0 + (c1 - 1 - c0) * T + o_tt
    m_nx = m_d[:, None] & (o_nx < length)[None, :]
    u_nx = tl.load(p_u + o_nx[None, :] * s_ul, mask=m_nx, other=0.0)
    dl_nx = tl.load(p_delta + o_nx[None, :] * s_dl, mask=m_nx, other=0.0)
    o_nb = t0 + (c1 - c0) * T - TB + o_tb
    m_nb = m_d[:, None] & (o_nb < length)[None, :]
    u_nb = tl.load(p_u + o_nb[None, :] * s_ul, mask=m_nb, other=0.0)
    dl_nb = tl.load(p_delta + o_nb[None, :] * s_dl, mask=m_nb, other=0.0)
    dy_nb = tl.load(p_dy + o_nb[None, :], mask=m_nb, other=0.0)
    if HAS_Z:
        z_nb = tl.load(p_z + o_nb[None, :] * s_zl, mask=m_nb, other=0.0)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        tc = t0 + (c - c0) * T
        # forward over the chunk: the state at each TB-step tile start into scratch. The chunk's
        # B and C rows into L1 first (the walk reads B right away, the reverse tiles C after it)
        prefetch_l1(p_B + tc * N_PAD, T * N_PAD, (T * N_PAD + 31) // 32)
        prefetch_l1(p_C + tc * N_PAD, T * N_PAD, (T * N_PAD + 31) // 32)
        h = tl.load(p_ckpt + (pid_b * n_chunks + c) * dim * dstate + o_dn, mask=m_dn, other=0.0)
        for k in range(T // TT):
            o_t = tc + k * TT + o_tt
            m = m_d[:, None] & (o_t < length)[None, :]
            u = u_nx.to(tl.float32)
            raw = dl_nx.to(tl.float32)
            # next: this chunk's next tile, after its last one the previous chunk's first
            o_nx = tl.where(k < T // TT - 1, o_t + TT, o_t - (T + (T - TT)))
            m_nx = m_d[:, None] & ((o_nx >= t0) & (o_nx < length))[None, :]
            u_nx = tl.load(p_u + o_nx[None, :] * s_ul, mask=m_nx, other=0.0)
            dl_nx = tl.load(p_delta + o_nx[None, :] * s_dl, mask=m_nx, other=0.0)
            if HAS_BIAS:
                raw += bias[:, None]
            dt = _dt(raw, m, SOFTPLUS)
            du = dt * u
            for j in tl.static_range(TT):
                if j % TB == 0:
                    tl.store(p_scratch + (k * (TT // TB) + j // TB) * (BLOCK_D * N_PAD), h)
                Bj = tl.load(p_B + (tc + k * TT + j) * N_PAD + o_n)
                h = tl.exp2(_column(dt, o_tt, j)[:, None] * A2) * h + _column(du, o_tt, j)[:, None] * Bj[None, :]
        # tiles in reverse: recompute the tile's states, then step the adjoint back through them
        for kk in range(T // TB):
            k = T // TB - 1 - kk
            ts = tc + k * TB
            # rows of the tile PF_AHEAD tiles on (earlier in time; past the chunk start that is the
            # next chunk's, also read next) back into L1 in case the walk's traffic evicted them
            ts_pf = tl.maximum(ts - PF_AHEAD * TB, 0) * N_PAD
            prefetch_l1(p_B + ts_pf, TB * N_PAD, (TB * N_PAD + 31) // 32)
            prefetch_l1(p_C + ts_pf, TB * N_PAD, (TB * N_PAD + 31) // 32)
            o_t = ts + o_tb
            m = m_d[:, None] & (o_t < length)[None, :]
            u = u_nb.to(tl.float32)
            raw = dl_nb.to(tl.float32)
            dy = dy_nb.to(tl.float32)
            # next: the tile before (past the chunk start, the previous chunk's last)
            m_nb = m_d[:, None] & ((o_t - TB >= t0) & (o_t - TB < length))[None, :]
            u_nb = tl.load(p_u + (o_t - TB)[None, :] * s_ul, mask=m_nb, other=0.0)
            dl_nb = tl.load(p_delta + (o_t - TB)[None, :] * s_dl, mask=m_nb, other=0.0)
            dy_nb = tl.load(p_dy + (o_t - TB)[None, :], mask=m_nb, other=0.0)
            if HAS_BIAS:
                raw += bias[:, None]
            dt = _dt(raw, m, SOFTPLUS)
            du = dt * u
            if HAS_Z:
                z = z_nb.to(tl.float32)
                z_nb = tl.load(p_z + (o_t - TB)[None, :] * s_zl, mask=m_nb, other=0.0)
                dye = dy * silu(z)
            else:
                dye = dy
            h = tl.load(p_scratch + k * (BLOCK_D * N_PAD))
            H = ()  # the tile's states and decays, kept in registers
            X = ()
            for j in tl.static_range(TB):
                Bj = tl.load(p_B + (ts + j) * N_PAD + o_n)
                x = tl.exp2(_column(dt, o_tb, j)[:, None] * A2)
                h = x * h + _column(du, o_tb, j)[:, None] * Bj[None, :]
                H = H + (h,)
                X = X + (x,)
            DU = tl.zeros((BLOCK_D, TB), dtype=tl.float32)
            DDT = tl.zeros((BLOCK_D, TB), dtype=tl.float32)
            YP = tl.zeros((BLOCK_D, TB), dtype=tl.float32)
            for j in tl.static_range(TB - 1, -1, -1):
                hj = H[j]
                Bj = tl.load(p_B + (ts + j) * N_PAD + o_n)
                Cj = tl.load(p_C + (ts + j) * N_PAD + o_n)
                dtj = _column(dt, o_tb, j)
                duj = _column(du, o_tb, j)
                dyej = _column(dye, o_tb, j)
                g = dyej[:, None] * Cj[None, :] + q
                gxh = g * (hj - duj[:, None] * Bj[None, :])  # g_t x_t h_{t-1}
                dA_acc += gxh * dtj[:, None]
                gB = tl.sum(g * Bj[None, :], axis=1)
                ddt = LN2 * tl.sum(gxh * A2, axis=1) + _column(u, o_tb, j) * gB  # A = A2 ln 2
                DDT = tl.where(o_tb[None, :] == j, ddt[:, None], DDT)
                DU = tl.where(o_tb[None, :] == j, (dtj * gB)[:, None], DU)
                if HAS_Z:
                    YP = tl.where(o_tb[None, :] == j, tl.sum(hj * Cj[None, :], axis=1)[:, None], YP)
                tl.atomic_add(p_dB + (ts + j) * N_PAD + o_n, tl.sum(g * duj[:, None], axis=0), sem="relaxed")
                tl.atomic_add(p_dC + (ts + j) * N_PAD + o_n, tl.sum(hj * dyej[:, None], axis=0), sem="relaxed")
                q = X[j] * g
            if HAS_D:
                DU += Dv[:, None] * dye
                dD_acc += tl.sum(dye * u, axis=1)
            if HAS_Z:
                if HAS_D:
                    YP += Dv[:, None] * u
                dz = dy * YP * silu_grad(z)
                tl.store(p_dz + o_t[None, :], dz.to(p_dz.dtype.element_ty), mask=m)
            if SOFTPLUS:
                DDT = DDT * softplus_grad(raw)
            DDT = tl.where(m, DDT, 0.0)
            dbias_acc += tl.sum(DDT, axis=1)
            tl.store(p_du + o_t[None, :], DU.to(p_du.dtype.element_ty), mask=m)
            tl.store(p_ddelta + o_t[None, :], DDT.to(p_ddelta.dtype.element_ty), mask=m)
    tl.atomic_add(p_dA + o_d[:, None] * dstate + o_n[None, :], dA_acc, mask=m_dn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(p_dD + o_d, dD_acc, mask=m_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, dbias_acc, mask=m_d, sem="relaxed")
    if pid_s == 0:
        tl.store(p_dh0 + pid_b * dim * dstate + o_dn, q, mask=m_dn)


# ----------------------------------------------------------------------------- launchers


def _chunk_len(chunk: int | None, length: int) -> int:
    """The chunk length T: ``chunk`` (checked), else the default for ``length``-step sequences."""
    if chunk is not None:
        if chunk < 2 or chunk & (chunk - 1):
            raise ConfigError(f"selective_scan: chunk must be a power of two >= 2, got {chunk}")
        return chunk
    if interpreting():
        return CHUNK_INTERPRET
    return CHUNK_LONG if length >= CHUNK_LONG_FROM else CHUNK_GPU


def _num_segments(batch: int, dim: int, n_chunks: int, device: torch.device,
                  channels_per_program: int, programs_per_sm: int) -> int:
    """Split time into segments only when batch x channel blocks cannot fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * triton.cdiv(dim, channels_per_program)
    return max(1, min(n_chunks, programs_per_sm * sms // programs, 65535))


def _grid3(batch: int, groups: int, dim: int, segments: int):
    """(batch x groups, channel blocks per group, segments)."""
    return lambda meta: (batch * groups, triton.cdiv(dim // groups, meta["BLOCK_D"]), segments)


def _pass_grid(batch: int, dim: int):
    return (batch, triton.cdiv(dim, 16))


def _bc_strides(M: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(M.stride())  # (b, g, n, l)


def _dims(u: torch.Tensor, A: torch.Tensor, B4: torch.Tensor, T: int, segments: int):
    b, d, l = u.shape
    n_chunks = triton.cdiv(l, T)
    cps = triton.cdiv(n_chunks, max(1, min(segments, n_chunks)))
    return b, d, l, A.shape[1], B4.shape[1], n_chunks, cps, triton.cdiv(n_chunks, cps)


def _tile(T: int, *tensors: torch.Tensor | None) -> int:
    """Steps per tile of the forward walks: one 16-byte load of u / delta / z per thread and tile."""
    return min(T, 16 // max(t.element_size() for t in tensors if t is not None))


def _bc_rows(M4: torch.Tensor, rows: int, n_pad: int) -> torch.Tensor:
    """B or C (b, g, n, l) -> fp32 (b, g, rows, n_pad), zero past n and l: one contiguous row per step."""
    b, g, n, l = M4.shape
    out = torch.empty(b, g, rows, n_pad, device=M4.device, dtype=torch.float32)
    out[:, :, :l, :n] = M4.transpose(2, 3)
    out[:, :, l:] = 0
    if n_pad > n:
        out[..., n:] = 0
    return out


def _selective_scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, softplus, h0, store_ckpt, segments, T):
    """Launch the forward passes. Returns y (b, d, l), final (b, d, n), ckpt (b, l/T, d, n) | None.

    ``segments`` None: one time segment per channel block unless they cannot fill the GPU (one
    warp per SM sub-partition: a warp's sequential walk keeps its exponential unit busy)."""
    b, d, l = u.shape
    if segments is None:
        segments = _num_segments(b, d, triton.cdiv(l, T), u.device, 32, WARPS_PER_SM)
    b, d, l, n, g, n_chunks, cps, S = _dims(u, A, B4, T, segments)
    n_pad = triton.next_power_of_2(n)
    TT = _tile(T, u, delta, z)
    f32 = dict(device=u.device, dtype=torch.float32)
    rows = n_chunks * T + T  # the walk reads one row ahead and prefetches a tile (TT <= T rows) ahead
    Br, Cr = _bc_rows(B4, rows, n_pad), _bc_rows(C4, rows, n_pad)
    seg = torch.empty(b, S, d, n, **f32)
    if h0 is None:
        seg[:, 0].zero_()
    else:
        seg[:, 0].copy_(h0)
    zz = z if z is not None else u
    dims = (l, d, n, d // g, g, n_chunks, cps, S)
    args = (*dims, *u.stride(), *delta.stride(), *zz.stride(), *A.stride(), *Br.stride()[:2])
    meta = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=softplus, T=T, TT=TT, N_PAD=n_pad)
    if S > 1:
        loc = torch.empty(b, S, d, n, **f32)
        dsum = torch.empty(b, S, d, **f32)
        _selective_scan_fwd_kernel[_grid3(b, g, d, S)](
            u, delta, A, Br, Cr, D, zz, delta_bias, seg, u, seg, loc, dsum, *args,
            STATE_ONLY=True, STORE_CKPT=False, **meta,
        )
        _selective_scan_state_passing_kernel[_pass_grid(b, d)](
            seg, loc, dsum, A, d, n, S, *A.stride(), REVERSE=False, N_PAD=n_pad, BLOCK_D=16,
        )
    y = torch.empty(b, d, l, device=u.device, dtype=u.dtype)
    final = torch.empty(b, d, n, **f32)
    ckpt = torch.empty(b, n_chunks, d, n, **f32) if store_ckpt else final
    _selective_scan_fwd_kernel[_grid3(b, g, d, S)](
        u, delta, A, Br, Cr, D, zz, delta_bias, seg, y, ckpt, final, final, *args,
        STATE_ONLY=False, STORE_CKPT=store_ckpt, **meta,
    )
    return y, final, (ckpt if store_ckpt else None)


def _selective_scan_bwd(dy, dfinal, u, delta, A, B4, C4, D, z, delta_bias, softplus, ckpt, segments, T):
    """Launch the backward passes. Returns du, ddelta, dA, dB4, dC4, dD, dz, dbias, dh0."""
    b, d, l = u.shape
    if segments is None:
        segments = _num_segments(b, d, triton.cdiv(l, T), u.device, 32, WARPS_PER_SM)
    b, d, l, n, g, n_chunks, cps, S = _dims(u, A, B4, T, segments)
    n_pad = triton.next_power_of_2(n)
    f32 = dict(device=u.device, dtype=torch.float32)
    dy = dy.contiguous()
    zz = z if z is not None else u
    dims = (l, d, n, d // g, g, n_chunks, cps, S)
    qend = torch.empty(b, S, d, n, **f32)
    if dfinal is None:
        qend[:, S - 1].zero_()
    else:
        qend[:, S - 1].copy_(dfinal)
    if S > 1:
        loc = torch.empty(b, S, d, n, **f32)
        dsum = torch.empty(b, S, d, **f32)
        _selective_scan_adjoint_state_kernel[_grid3(b, g, d, S)](
            dy, delta, A, C4, zz, delta_bias, loc, dsum, *dims,
            *dy.stride(), *delta.stride(), *zz.stride(), *A.stride(), *_bc_strides(C4),
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            T=T, N_PAD=n_pad,
        )
        _selective_scan_state_passing_kernel[_pass_grid(b, d)](
            qend, loc, dsum, A, d, n, S, *A.stride(), REVERSE=True, N_PAD=n_pad, BLOCK_D=16,
        )
    rows = n_chunks * T + 1
    Br, Cr = _bc_rows(B4, rows, n_pad), _bc_rows(C4, rows, n_pad)
    TT = _tile(T, u, delta, z)
    TB = _reverse_tile(TT)
    # a slot of BLOCK_D channels and T / TB tile states per program, sized for 32: every BLOCK_D of
    # _bwd_configs divides 32, so cdiv(d / g, BLOCK_D) * BLOCK_D <= cdiv(d / g, 32) * 32 channel slots per group
    scratch = torch.empty(b * g * triton.cdiv(d // g, 32) * S * (T // TB) * 32 * n_pad, **f32)
    du = torch.empty(b, d, l, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(b, d, l, device=u.device, dtype=delta.dtype)
    dz = torch.empty(b, d, l, device=u.device, dtype=z.dtype) if z is not None else du
    dA = torch.zeros(d, n, **f32)
    dBr = torch.zeros_like(Br)
    dCr = torch.zeros_like(Cr)
    dD = torch.zeros(d, **f32)
    dbias = torch.zeros(d, **f32)
    dh0 = torch.empty(b, d, n, **f32)
    _selective_scan_bwd_kernel[_grid3(b, g, d, S)](
        u, delta, A, Br, Cr, D, zz, delta_bias, ckpt, dy, qend, scratch,
        du, ddelta, dz, dA, dBr, dCr, dD, dbias, dh0, *dims,
        *u.stride(), *delta.stride(), *zz.stride(), *A.stride(), *Br.stride()[:2],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        T=T, TT=TT, TB=TB, N_PAD=n_pad, PF_AHEAD=BWD_PREFETCH_TILES,
    )
    dB4 = dBr[:, :, :l, :n].transpose(2, 3)
    dC4 = dCr[:, :, :l, :n].transpose(2, 3)
    return du, ddelta, dA, dB4, dC4, dD, (dz if z is not None else None), dbias, dh0


# ----------------------------------------------------------------------------- entry point


def _as_groups(M: torch.Tensor) -> torch.Tensor:
    """B/C (b, n, l) -> (b, 1, n, l) view; (b, g, n, l) unchanged."""
    return M.unsqueeze(1) if M.dim() == 3 else M


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
    length T, a power of two (default on the GPU 64, 256 from 16,384 steps; 16 in the interpreter).
    Returns y (b, d, l) in u.dtype [, final_state (b, d, n) fp32].
    """
    from streamssm.kernels.library import selective_scan_op  # the registered op (imports this module)

    y, final = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, segments,
                                 _chunk_len(chunk, u.shape[-1]))
    return (y, final) if return_final_state else y
