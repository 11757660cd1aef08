"""Causal depthwise conv1d in Triton: forward and backward, conv state in and out.

Shape legend: b batch, d channels, l length, w kernel width (2..4, constexpr W).

With xpad = concat(initial_state, x) along time (the state holds the previous w-1 inputs):
    pre_s = bias + sum_k weight[:, k] * xpad[s + k]       s = 0..l-1, k = 0..w-1
    y_s   = silu(pre_s) (or pre_s)
    final state = xpad[l .. l+w-2]
Backward, with dpre_s = dy_s * act'(pre_s) (pre recomputed, never stored):
    dxpad[p] = sum_k weight[:, k] * dpre[p - k]  (+ d final[p - l] for the last w-1 positions)
    dx_t = dxpad[t + w - 1] = sum_j weight[:, w-1-j] * dpre[t + j]
    d initial_state_j = dxpad[j];  dweight_k = sum_s dpre_s xpad[s + k];  dbias = sum_s dpre_s
Forward programs own (batch, BLOCK_D channels, BLOCK_L steps): on time-contiguous x they load
the w shifted windows as tiles; on channel-last x (how the Mamba blocks pass their in_proj
slices) they load each row of BLOCK_D contiguous channels once and slide the window along time
in registers, and the last program in time writes the final state.
A backward program owns (one segment of time, BLOCK_D channels, batch) and walks its steps from
the first to the last, like the channel-last forward: per step pre and dpre once, the
dweight/dbias terms from the same inputs, and dxpad[t] = dx_{t-w+1} from dpre_t and the w-1
previous dpre kept in registers, so dx comes w-1 steps late: the w-1 steps after the segment
finish its last rows, and segment 0's first w-1 steps give d initial_state. Channel-last x is read
a row of BLOCK_D contiguous channels at a time, time-contiguous x as (BLOCK_D, 8) tiles, each
thread loading 8 steps of a channel (16 bytes of bf16) and splitting them into steps in registers
(its dx rows stored as a tile one tile late). Each input byte is read
once (plus w-1 rows per segment); dweight/dbias are summed per program into a partial buffer
(b x segments, 5, d) that the launcher reduces with one sum (no atomics).
Any strides in and out: y and dx are laid out like x (``_empty_in_layout_of``; dy is read in x's
order); the tiles of the time-contiguous kernels are long in time, those of the channel-last ones
wide in channels, so both read whole lines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs, interpreting
from streamssm.kernels._triton import silu, silu_grad


#: (BLOCK_D, BLOCK_L, warps) of the time-contiguous forward: long in time, so loads read whole lines.
_FWD_TILES = ((16, 128, 4), (8, 128, 4), (16, 64, 4), (32, 64, 4))
#: (BLOCK_D, BLOCK_L, warps) of the channel-last forward: a row of BLOCK_D channels holds 8 per
#: thread (16-byte bf16 loads) or 4; all BLOCK_L rows are loaded before the first is summed.
_FWD_CL_TILES = ((256, 16, 1), (256, 32, 1), (512, 16, 2), (512, 32, 2), (1024, 16, 4), (128, 16, 1), (128, 32, 1),
                 (256, 64, 2))
#: (BLOCK_D, BLOCK_L, warps[, register cap]) of the backward by layout (channel-last?).
#: Time-contiguous: 8-step tiles (a thread loads 8 steps of a channel, 16 bytes of bf16, and splits
#: them in registers: ~60 registers on sm_90, Triton 3.6), 1 or 2 channels per thread, BLOCK_L / 8
#: of them per loop step (16: the whole 32-byte sector of a channel). Channel-last: rows of BLOCK_D
#: channels, 2 per thread (~250 registers; capped at 168: 12 warps per SM instead of 8, ~30 bytes
#: spilled) or 4 (255); a tile's BLOCK_L rows of x and dy are loaded before the first is used
#: (32-row tiles spill).
_BWD_TILES = {False: ((64, 8, 2), (64, 16, 2), (128, 16, 4), (32, 16, 1), (64, 16, 1), (128, 16, 2)),
              True: ((64, 16, 1), (128, 16, 2), (256, 16, 4), (128, 16, 1), (64, 8, 1), (128, 8, 2), (64, 16, 1, 168),
                     (128, 16, 2, 168))}
#: Backward segments are a multiple of every BLOCK_L (interpreter: 16-step tiles, the time-contiguous
#: ones two 8-step halves, in 32-step segments).
SEGMENT_UNIT = 16 if interpreting() else max(t[1] for tiles in _BWD_TILES.values() for t in tiles)
#: Backward programs per SM the segment length aims for (each walks its tiles one after the other),
#: counted in programs of 64 channels (~8-12 resident per SM: ~3 waves of them, so a short last
#: wave costs less; segments stay >= 16 steps).
PROGRAMS_PER_SM = 32


@triton.jit
def _load_xpad(p_x, p_init, o_d, m_d, p, length, s_xd, s_xl, s_id, s_il,
               W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xpad at positions p (P,) int64 for channels o_d -> (BLOCK_D, P) fp32 (0 outside)."""
    t = p - (W - 1)
    m = m_d[:, None] & ((t >= 0) & (t < length))[None, :]
    v = tl.load(p_x + o_d[:, None].to(tl.int64) * s_xd + t[None, :] * s_xl, mask=m, other=0.0).to(tl.float32)
    if HAS_INIT:
        mi = m_d[:, None] & ((p >= 0) & (p < W - 1))[None, :]
        v += tl.load(p_init + o_d[:, None] * s_id + p[None, :] * s_il, mask=mi, other=0.0).to(tl.float32)
    return v


@triton.jit
def _tap(p_w, o_d, m_d, k, s_wd, s_wk):
    """weight[:, k] for channels o_d -> (BLOCK_D,) fp32."""
    return tl.load(p_w + o_d * s_wd + k * s_wk, mask=m_d, other=0.0).to(tl.float32)


@triton.jit
def _pre(p_x, p_init, p_w, p_bias, o_d, m_d, s, length, s_xd, s_xl, s_id, s_il, s_wd, s_wk,
         W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Pre-activation at output positions s (P,) -> (BLOCK_D, P) fp32, from the W windows
    xpad[s + k] loaded as tiles."""
    acc = tl.zeros((o_d.shape[0], s.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        xk = _load_xpad(p_x, p_init, o_d, m_d, s + k, length, s_xd, s_xl, s_id, s_il, W, HAS_INIT)
        acc += _tap(p_w, o_d, m_d, k, s_wd, s_wk)[:, None] * xk
    if HAS_BIAS:
        acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return acc


def _configs(tiles, interpret_tile) -> list:
    """Autotune configs of (BLOCK_D, BLOCK_L, warps[, register cap]) tiles; ``interpret_tile`` alone
    in the interpreter."""
    bd, bl = interpret_tile
    return autotune_configs([triton.Config({"BLOCK_D": t[0], "BLOCK_L": t[1]}, num_warps=t[2],
                                           maxnreg=t[3] if len(t) > 3 else None) for t in tiles],
                            triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=1))


def _tuning(tiles: dict) -> dict:
    """``triton.autotune`` arguments for the configs of both layouts (``tiles`` by CHANNEL_LAST), a
    launch trying only those of its own (CHANNEL_LAST is also a key); one 8-channel 16-step config
    in the interpreter."""
    by_layout = {cl: _configs(t, (8, 16)) for cl, t in tiles.items()}

    def prune(configs, named_args, **kwargs):
        return by_layout[bool(kwargs["CHANNEL_LAST"])]

    return {"configs": _configs(tiles[False] + tiles[True], (8, 16)), "key": ["dim", "W", "CHANNEL_LAST"],
            "prune_configs_by": {"early_config_prune": prune}}


@triton.autotune(configs=_configs(_FWD_TILES, (8, 8)), key=["dim", "W"])
@triton.jit
def _causal_conv1d_fwd_kernel(
    # pointers: x (b, d, l); init (b, d, w-1); weight (d, w); bias (d,); y (b, d, l)
    p_x, p_init, p_w, p_bias, p_y,
    # dimensions
    length, dim,
    # strides
    s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_wd, s_wk, s_yb, s_yd, s_yl,
    # meta
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Time-contiguous x: (BLOCK_D, BLOCK_L) tiles, the W shifted windows loaded as tiles."""
    pid_b = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    s = tl.program_id(2).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    p_x += pid_b * s_xb
    p_init += pid_b * s_ib
    p_y += pid_b * s_yb
    pre = _pre(p_x, p_init, p_w, p_bias, o_d, m_d, s, length, s_xd, s_xl, s_id, s_il, s_wd, s_wk,
               W, HAS_INIT, HAS_BIAS)
    if SILU:
        pre = silu(pre)
    m = m_d[:, None] & (s < length)[None, :]
    tl.store(p_y + o_d[:, None].to(tl.int64) * s_yd + s[None, :] * s_yl, pre.to(p_y.dtype.element_ty), mask=m)


@triton.jit
def _xpad_row(p_x, p_init, q, length, m_d, s_xl, s_il, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xpad[q] at the scalar position q (int64) for the channels of the pointer rows p_x, p_init
    -> (BLOCK_D,) fp32 (0 outside)."""
    t = q - (W - 1)
    v = tl.load(p_x + t * s_xl, mask=m_d & (t >= 0) & (t < length), other=0.0).to(tl.float32)
    if HAS_INIT:
        v += tl.load(p_init + q * s_il, mask=m_d & (q < W - 1), other=0.0).to(tl.float32)
    return v


@triton.autotune(configs=_configs(_FWD_CL_TILES, (8, 4)), key=["dim", "W"])
@triton.jit
def _causal_conv1d_fwd_cl_kernel(
    # pointers: x (b, d, l) channel-last; init (b, d, w-1); weight (d, w); bias (d,); y (b, d, l)
    # channel-last; final (b, d, w-1) contiguous
    p_x, p_init, p_w, p_bias, p_y, p_final,
    # dimensions
    length, dim,
    # strides
    s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_wd, s_wk, s_yb, s_yd, s_yl,
    # meta
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Channel-last x: a program reads its BLOCK_L rows of BLOCK_D contiguous channels once (all
    loads issued up front), the W-1 rows before them (from x, or the initial state at the start),
    and slides the window along time in registers. The last program in time also writes the final
    state xpad[l .. l+w-2] (no separate copy). Grid (time blocks, channel blocks, batch): time
    first, so long sequences fit the grid and neighbours share their w-1 boundary rows in L2."""
    pid_b = tl.program_id(2).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    s0 = tl.program_id(0).to(tl.int64) * BLOCK_L
    p_x += pid_b * s_xb + o_d * s_xd
    p_init += pid_b * s_ib + o_d * s_id
    p_y += pid_b * s_yb + o_d * s_yd
    rows = ()
    for i in tl.static_range(BLOCK_L):
        rows = rows + (tl.load(p_x + (s0 + i) * s_xl, mask=m_d & (s0 + i < length), other=0.0),)
    # r1, r2, r3: the inputs 1, 2, 3 steps before the current one (xpad[t + w - 2 - j])
    r1 = _xpad_row(p_x, p_init, s0 + W - 2, length, m_d, s_xl, s_il, W, HAS_INIT)
    r2 = tl.zeros_like(r1)
    r3 = tl.zeros_like(r1)
    if W > 2:
        r2 = _xpad_row(p_x, p_init, s0 + W - 3, length, m_d, s_xl, s_il, W, HAS_INIT)
    if W > 3:
        r3 = _xpad_row(p_x, p_init, s0, length, m_d, s_xl, s_il, W, HAS_INIT)
    w_last = _tap(p_w, o_d, m_d, W - 1, s_wd, s_wk)
    w_1 = _tap(p_w, o_d, m_d, W - 2, s_wd, s_wk)
    w_2 = tl.zeros_like(w_1)
    w_3 = tl.zeros_like(w_1)
    if W > 2:
        w_2 = _tap(p_w, o_d, m_d, W - 3, s_wd, s_wk)
    if W > 3:
        w_3 = _tap(p_w, o_d, m_d, W - 4, s_wd, s_wk)
    if HAS_BIAS:
        bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    for i in tl.static_range(BLOCK_L):
        cur = rows[i].to(tl.float32)
        acc = tl.zeros_like(cur)  # taps summed oldest first, as the time-contiguous kernel sums
        if W > 3:
            acc += w_3 * r3
        if W > 2:
            acc += w_2 * r2
        acc += w_1 * r1
        acc += w_last * cur
        if HAS_BIAS:
            acc += bias
        if SILU:
            acc = silu(acc)
        tl.store(p_y + (s0 + i) * s_yl, acc.to(p_y.dtype.element_ty), mask=m_d & (s0 + i < length))
        r3 = r2
        r2 = r1
        r1 = cur
    if tl.program_id(0) == tl.num_programs(0) - 1:
        p_f = p_final + pid_b * dim * (W - 1) + o_d * (W - 1)
        for j in tl.static_range(W - 1):
            v = _xpad_row(p_x, p_init, length + j, length, m_d, s_xl, s_il, W, HAS_INIT)
            tl.store(p_f + j, v.to(p_final.dtype.element_ty), mask=m_d)


@triton.jit
def _store_partials(p_part, dim, m_d, a0, a1, a2, a3, a_b, W: tl.constexpr):
    """One program's dweight[:, k] sums a_k (k < w) and dbias sum a_b, (BLOCK_D,) fp32, into its
    (5, d) rows of the partial buffer (p_part at row 0, its channels)."""
    tl.store(p_part, a0, mask=m_d)
    tl.store(p_part + dim, a1, mask=m_d)
    if W > 2:
        tl.store(p_part + 2 * dim, a2, mask=m_d)
    if W > 3:
        tl.store(p_part + 3 * dim, a3, mask=m_d)
    tl.store(p_part + 4 * dim, a_b, mask=m_d)


@triton.jit
def _lag(j: tl.constexpr, v0, v1, v2, v3):
    """v_j for a constexpr j in 0..3 (the rows 0..3 steps back, or the taps 0..3)."""
    if j == 0:
        return v0
    elif j == 1:
        return v1
    elif j == 2:
        return v2
    else:
        return v3


@triton.jit
def _bwd_step(x_t, dy_t, j: tl.constexpr, carry, taps, fin, bias, n_len, n_acc, MASKED: tl.constexpr,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_DFINAL: tl.constexpr):
    """Step j of a block from row t0: x_t, dy_t the rows at t = t0 + j, (BLOCK_D,) fp32 (0 past the end).

    carry = (r1, r2, r3, d1, d2, d3, a0, a1, a2, a3, a_b): r_i = x_{t-i}, d_i = dpre_{t-i}, the
    dweight[:, k] and dbias sums; taps = weight[:, 0..3] (0 for k >= w); fin = d final[:, 0..2].
    MASKED: only steps j < n_acc count in dweight/dbias (later ones: the next segment's) and
    d final[j - n_len] is added (n_len = l - t0). Returns (dxpad[t] = sum_k weight[:, k] dpre_{t-k}
    (+ d final) = dx_{t-w+1}, the carry after the step).
    """
    r1, r2, r3, d1, d2, d3, a0, a1, a2, a3, a_b = carry
    k0, k1, k2, k3 = taps
    pre = tl.zeros_like(x_t)
    for k in tl.static_range(W):  # taps oldest first, as the forwards sum
        pre += _lag(k, k0, k1, k2, k3) * _lag(W - 1 - k, x_t, r1, r2, r3)
    if HAS_BIAS:
        pre += bias
    dpre = dy_t
    if SILU:
        dpre = dy_t * silu_grad(pre)
    dxp = k0 * dpre
    for k in tl.static_range(1, W):
        dxp += _lag(k, k0, k1, k2, k3) * _lag(k, dpre, d1, d2, d3)
    own = tl.where(j < n_acc, dpre, 0.0) if MASKED else dpre
    a0 += own * _lag(W - 1, x_t, r1, r2, r3)
    a1 += own * _lag(W - 2, x_t, r1, r2, r3)
    if W > 2:
        a2 += own * _lag(W - 3, x_t, r1, r2, r3)
    if W > 3:
        a3 += own * x_t  # xpad[t + 3] for w = 4
    a_b += own
    if MASKED and HAS_DFINAL:  # the last w-1 inputs are the final state
        f0, f1, f2 = fin
        for i in tl.static_range(W - 1):
            dxp += tl.where(j - n_len == i, _lag(i, f0, f1, f2, f2), 0.0)
    return dxp, (x_t, r1, r2, dpre, d1, d2, a0, a1, a2, a3, a_b)


@triton.jit
def _block_bounds(t0, s_end, length, N: tl.constexpr, W: tl.constexpr):
    """int32 offsets from row t0 of a block of N steps: (n_len, n_acc): rows from n_len = l - t0 on
    are past the sequence, rows from n_acc = s_end - t0 on are the next segment's (both clamped)."""
    n_len = tl.minimum(length - t0, N + W).to(tl.int32)
    n_acc = tl.maximum(tl.minimum(s_end - t0, N + W), -W).to(tl.int32)
    return n_len, n_acc


@triton.jit
def _bwd_cl_rows(p_x, p_dy, p_dx, p_dinit, t0, s0, s_end, length, carry, taps, fin, bias, m_d, s_xl, s_gl, s_dxl,
                 N: tl.constexpr, MASKED: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_DFINAL: tl.constexpr):
    """Channel-last x: N steps from row t0 (int64) of the segment [s0, s_end), its N rows of x and
    dy (BLOCK_D contiguous channels each) loaded first. Step j writes dxpad[t0 + j] as dx row
    t0 + j - (w-1) from the segment's start on (and, MASKED, up to s_end) and, at t0 = 0, d
    initial_state[j] for j < w-1. Unmasked: whole tiles inside the segment; MASKED: the steps after
    them (rows from l on read as 0). Returns the carry (``_bwd_step``)."""
    j_lo = tl.maximum(s0 - t0 + (W - 1), 0).to(tl.int32)  # w-1 in the segment's first tile, else 0
    n_len, n_acc = _block_bounds(t0, s_end, length, N, W)
    p_x += t0 * s_xl
    p_dy += t0 * s_gl
    p_dx += (t0 - (W - 1)) * s_dxl
    xs = ()
    gs = ()
    for j in tl.static_range(N):
        m = m_d & (j < n_len) if MASKED else m_d
        xs = xs + (tl.load(p_x + j * s_xl, mask=m, other=0.0),)
        gs = gs + (tl.load(p_dy + j * s_gl, mask=m, other=0.0),)
    for j in tl.static_range(N):
        dxp, carry = _bwd_step(xs[j].to(tl.float32), gs[j].to(tl.float32), j, carry, taps, fin, bias, n_len, n_acc,
                               MASKED, W, HAS_BIAS, SILU, HAS_DFINAL)
        m = m_d
        if j < W - 1:
            m = m & (j >= j_lo)
        if MASKED:
            m = m & (j - (W - 1) < n_acc)
        tl.store(p_dx + j * s_dxl, dxp.to(p_dx.dtype.element_ty), mask=m)
        if HAS_INIT and j < W - 1:
            tl.store(p_dinit + j, dxp.to(p_dinit.dtype.element_ty), mask=m_d & (t0 == 0))
    return carry


@triton.jit
def _halves(t, BLOCK_D: tl.constexpr, n: tl.constexpr):
    """(BLOCK_D, n) -> its first and its last n/2 steps, (BLOCK_D, n/2) each: register moves where
    a thread holds a channel's n steps (one 16-byte bf16 load of 8)."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_D, 2, n // 2)), (0, 2, 1)))


@triton.jit
def _cat(a, b, BLOCK_D: tl.constexpr, n: tl.constexpr):
    """(BLOCK_D, n/2) twice -> (BLOCK_D, n), a's steps first (the inverse of ``_halves``)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BLOCK_D, n))


@triton.jit
def _columns8(t, BLOCK_D: tl.constexpr):
    """(BLOCK_D, 8) -> its 8 steps (BLOCK_D,) in time order."""
    a, b = _halves(t, BLOCK_D, 8)
    a0, a1 = _halves(a, BLOCK_D, 4)
    b0, b1 = _halves(b, BLOCK_D, 4)
    c0, c1 = tl.split(a0)
    c2, c3 = tl.split(a1)
    c4, c5 = tl.split(b0)
    c6, c7 = tl.split(b1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _tile8(c, BLOCK_D: tl.constexpr):
    """8 steps (BLOCK_D,) in time order -> (BLOCK_D, 8) (the inverse of ``_columns8``)."""
    lo = _cat(tl.join(c[0], c[1]), tl.join(c[2], c[3]), BLOCK_D, 4)
    hi = _cat(tl.join(c[4], c[5]), tl.join(c[6], c[7]), BLOCK_D, 4)
    return _cat(lo, hi, BLOCK_D, 8)


@triton.jit
def _bwd_time_tile(p_x, p_dy, p_dx, p_dinit, t0, s0, s_end, length, carry, pend, taps, fin, bias, m_d, s_xl, s_gl,
                   s_dxl, MASKED: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SILU: tl.constexpr, HAS_DFINAL: tl.constexpr, BLOCK_D: tl.constexpr):
    """Time-contiguous x: the 8 steps from row t0 (int64, a multiple of 8) of the segment [s0,
    s_end), x and dy loaded as (BLOCK_D, 8) tiles and split into their steps. The dx rows
    [t0 - 8, t0) of the segment are stored as one tile: dxpad steps w-1..7 of the tile before
    (pend, 9-w of them) and 0..w-2 of this one. d initial_state at t0 = 0; MASKED as in
    ``_bwd_cl_rows``. Returns (carry, pend of this tile)."""
    o_l = tl.arange(0, 8)
    m = m_d[:, None] & ((t0 + o_l) < length)[None, :] if MASKED else m_d[:, None]
    xs = _columns8(tl.load((p_x + t0 * s_xl)[:, None] + o_l[None, :] * s_xl, mask=m, other=0.0), BLOCK_D)
    gs = _columns8(tl.load((p_dy + t0 * s_gl)[:, None] + o_l[None, :] * s_gl, mask=m, other=0.0), BLOCK_D)
    n_len, n_acc = _block_bounds(t0, s_end, length, 8, W)
    dxps = ()
    for j in tl.static_range(8):
        dxp, carry = _bwd_step(xs[j].to(tl.float32), gs[j].to(tl.float32), j, carry, taps, fin, bias, n_len, n_acc,
                               MASKED, W, HAS_BIAS, SILU, HAS_DFINAL)
        dxps = dxps + (dxp,)
        if HAS_INIT and j < W - 1:
            tl.store(p_dinit + j, dxp.to(p_dinit.dtype.element_ty), mask=m_d & (t0 == 0))
    rows = ()
    for j in tl.static_range(8):
        rows = rows + ((pend[j] if j < 9 - W else dxps[j - (9 - W)]),)
    u = t0 - 8 + o_l
    mu = m_d[:, None] & ((u >= s0) & (u < s_end))[None, :]
    tl.store((p_dx + (t0 - 8) * s_dxl)[:, None] + o_l[None, :] * s_dxl, _tile8(rows, BLOCK_D).to(p_dx.dtype.element_ty),
             mask=mu)
    pend = ()
    for j in tl.static_range(9 - W):
        pend = pend + (dxps[j + W - 1],)
    return carry, pend


@triton.jit
def _bwd_steps(p_x, p_dy, p_dx, p_dinit, t0, s0, s_end, length, carry, pend, taps, fin, bias, m_d, s_xl, s_gl, s_dxl,
               N: tl.constexpr, MASKED: tl.constexpr, CHANNEL_LAST: tl.constexpr, W: tl.constexpr,
               HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_DFINAL: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """N steps from row t0 in x's layout: N rows (``_bwd_cl_rows``) or N / 8 tiles of 8 steps
    (``_bwd_time_tile``). Returns (carry, pend)."""
    if CHANNEL_LAST:
        carry = _bwd_cl_rows(p_x, p_dy, p_dx, p_dinit, t0, s0, s_end, length, carry, taps, fin, bias, m_d, s_xl, s_gl,
                             s_dxl, N, MASKED, W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL)
    else:
        for h in tl.static_range(0, N, 8):
            carry, pend = _bwd_time_tile(p_x, p_dy, p_dx, p_dinit, t0 + h, s0, s_end, length, carry, pend, taps, fin,
                                         bias, m_d, s_xl, s_gl, s_dxl, MASKED, W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL,
                                         BLOCK_D)
    return carry, pend


@triton.autotune(**_tuning(_BWD_TILES))
@triton.jit
def _causal_conv1d_bwd_kernel(
    # pointers: inputs as in the forward; dy (b, d, l); dfinal contiguous (b, d, w-1)
    p_x, p_init, p_w, p_bias, p_dy, p_dfinal,
    # outputs: dx (b, d, l); dinit contiguous (b, d, w-1); part (b x segments, 5, d) fp32: per
    # program the sums over its steps of dweight[:, k] (rows k < w) and dbias (row 4)
    p_dx, p_dinit, p_part,
    # dimensions: seg_len steps per segment, a multiple of BLOCK_L
    length, dim, seg_len,
    # strides
    s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_wd, s_wk, s_gb, s_gd, s_gl, s_dxb, s_dxd, s_dxl,
    # meta
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, CHANNEL_LAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients of one (segment, channel block, batch), steps first to last (``_bwd_step``): the
    segment's whole BLOCK_L-step tiles without row masks, then its partial tile (the sequence's
    end) and the steps after it, which finish its last dx rows (their dpre counted by the next
    segment). Channel-last x: rows of BLOCK_D channels (``_bwd_cl_rows``); time-contiguous x:
    8-step tiles split into steps (``_bwd_time_tile``), BLOCK_L / 8 of them per tile. Grid
    (segments, channel blocks, batch).
    """
    tl.static_assert(CHANNEL_LAST or BLOCK_L % 8 == 0)
    pid_s = tl.program_id(0)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = tl.program_id(2).to(tl.int64)
    m_d = o_d < dim
    o_d64 = o_d.to(tl.int64)  # time-contiguous: channel strides of l, d * l may pass 2^31
    p_x += pid_b * s_xb + o_d64 * s_xd
    p_init += pid_b * s_ib + o_d * s_id
    p_dy += pid_b * s_gb + o_d64 * s_gd
    p_dx += pid_b * s_dxb + o_d64 * s_dxd
    p_dfinal += pid_b * dim * (W - 1) + o_d * (W - 1)
    p_dinit += pid_b * dim * (W - 1) + o_d * (W - 1)
    s0 = pid_s.to(tl.int64) * seg_len
    s_end = tl.minimum(s0 + seg_len, length)
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    taps = (_tap(p_w, o_d, m_d, 0, s_wd, s_wk), _tap(p_w, o_d, m_d, 1, s_wd, s_wk),
            _tap(p_w, o_d, m_d, 2, s_wd, s_wk) if W > 2 else zero,
            _tap(p_w, o_d, m_d, 3, s_wd, s_wk) if W > 3 else zero)
    fin = (zero, zero, zero)
    if HAS_DFINAL:
        fin = (tl.load(p_dfinal, mask=m_d, other=0.0).to(tl.float32),
               tl.load(p_dfinal + 1, mask=m_d & (W > 2), other=0.0).to(tl.float32),
               tl.load(p_dfinal + 2, mask=m_d & (W > 3), other=0.0).to(tl.float32))
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32) if HAS_BIAS else zero
    # r_i = x_{s0-i} (xpad[s0 + w-1-i]: the initial state before the sequence); d_i = dpre_{s0-i}:
    # 0 at the sequence's start, unknown (its dx rows not ours) before a later segment
    r1 = _xpad_row(p_x, p_init, s0 + W - 2, length, m_d, s_xl, s_il, W, HAS_INIT)
    r2 = _xpad_row(p_x, p_init, s0 + W - 3, length, m_d, s_xl, s_il, W, HAS_INIT) if W > 2 else zero
    r3 = _xpad_row(p_x, p_init, s0, length, m_d, s_xl, s_il, W, HAS_INIT) if W > 3 else zero
    carry = (r1, r2, r3, zero, zero, zero, zero, zero, zero, zero, zero)
    pend = ()  # time-contiguous: dxpad steps w-1..7 of the last tile, its dx rows not yet stored
    for _ in tl.static_range(9 - W):
        pend = pend + (zero,)
    args = (taps, fin, bias, m_d, s_xl, s_gl, s_dxl)
    n_full = (s_end - s0) // BLOCK_L
    for i in range(n_full):
        carry, pend = _bwd_steps(p_x, p_dy, p_dx, p_dinit, s0 + i * BLOCK_L, s0, s_end, length, carry, pend, *args,
                                 BLOCK_L, False, CHANNEL_LAST, W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL, BLOCK_D)
    t0 = s0 + n_full * BLOCK_L
    if t0 < s_end:  # a partial tile: the sequence ends inside it
        carry, pend = _bwd_steps(p_x, p_dy, p_dx, p_dinit, t0, s0, s_end, length, carry, pend, *args,
                                 BLOCK_L, True, CHANNEL_LAST, W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL, BLOCK_D)
        t0 += BLOCK_L
    # the steps after: the segment's last dx rows (channel-last: w-1 rows; time-contiguous: a tile,
    # which stores the tile before)
    carry, pend = _bwd_steps(p_x, p_dy, p_dx, p_dinit, t0, s0, s_end, length, carry, pend, *args,
                             W - 1 if CHANNEL_LAST else 8, True, CHANNEL_LAST, W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL,
                             BLOCK_D)
    _store_partials(p_part + (pid_b * tl.num_programs(0) + pid_s) * 5 * dim + o_d, dim, m_d, carry[6], carry[7],
                    carry[8], carry[9], carry[10], W)


def _grid(b: int, d: int, l: int):
    return lambda meta: (b, triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(l, meta["BLOCK_L"]))


def _grid_time_first(b: int, d: int, l: int):
    return lambda meta: (triton.cdiv(l, meta["BLOCK_L"]), triton.cdiv(d, meta["BLOCK_D"]), b)


def _channel_last(x: torch.Tensor) -> bool:
    """x (b, d, l) is a transposed (b, l, d) view: channels are its fastest axis."""
    return x.stride(1) == 1 and x.stride(2) != 1


def _segment_len(b: int, d: int, l: int, device: torch.device) -> int:
    """Steps per backward program: a multiple of SEGMENT_UNIT, as long as the GPU allows while
    still giving it ~PROGRAMS_PER_SM programs of 64 channels (the interpreter: two 16-step tiles,
    so small tests cross tiles and segments)."""
    if device.type != "cuda":
        return 2 * SEGMENT_UNIT
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    segments = max(1, PROGRAMS_PER_SM * sms // (b * triton.cdiv(d, 64)))
    return SEGMENT_UNIT * triton.cdiv(triton.cdiv(l, segments), SEGMENT_UNIT)


def _causal_conv1d_fwd(x, weight, bias, initial_state, silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns y (b, d, l) in x's memory order and dtype, and the final state
    (b, d, w-1) contiguous in x.dtype (written by the channel-last kernel itself)."""
    b, d, l = x.shape
    w = weight.shape[1]
    init = initial_state if initial_state is not None else x  # placeholder pointer when absent
    y = _empty_in_layout_of(x)
    args = (l, d, *x.stride(), *init.stride()[:3], *weight.stride(), *y.stride())
    meta = dict(W=w, HAS_INIT=initial_state is not None, HAS_BIAS=bias is not None, SILU=silu)
    if _channel_last(x):
        final = x.new_empty(b, d, w - 1)
        _causal_conv1d_fwd_cl_kernel[_grid_time_first(b, d, l)](x, init, weight, bias, y, final, *args, **meta)
        return y, final
    _causal_conv1d_fwd_kernel[_grid(b, d, l)](x, init, weight, bias, y, *args, **meta)
    return y, _final_state(x, initial_state, w)


def _causal_conv1d_bwd(dy, dfinal, x, weight, bias, initial_state, silu: bool):
    """Launch the backward. dy (b, d, l) any strides (copied into x's memory order if its fastest
    axis differs); dfinal (b, d, w-1) contiguous or None. Returns dx (b, d, l) in x's memory order,
    dweight (d, w) fp32, dbias (d,) fp32, dinit (b, d, w-1) or None."""
    b, d, l = x.shape
    w = weight.shape[1]
    init = initial_state if initial_state is not None else x
    dx = _empty_in_layout_of(x)
    dinit = torch.empty(b, d, w - 1, device=x.device, dtype=init.dtype) if initial_state is not None else dx
    channel_last = _channel_last(x)
    if dy.stride(1 if channel_last else 2) != 1:  # dy in x's memory order, so the kernel reads whole lines
        dy = torch.empty_like(dx, dtype=dy.dtype).copy_(dy)
    seg_len = _segment_len(b, d, l, x.device)
    n_seg = triton.cdiv(l, seg_len)
    part = torch.empty(b * n_seg, 5, d, device=x.device, dtype=torch.float32)
    _causal_conv1d_bwd_kernel[lambda meta: (n_seg, triton.cdiv(d, meta["BLOCK_D"]), b)](
        x, init, weight, bias, dy, dfinal if dfinal is not None else dy, dx, dinit, part, l, d, seg_len,
        *x.stride(), *init.stride()[:3], *weight.stride(), *dy.stride(), *dx.stride(),
        W=w, HAS_INIT=initial_state is not None, HAS_BIAS=bias is not None, SILU=silu,
        HAS_DFINAL=dfinal is not None, CHANNEL_LAST=channel_last,
    )
    dwb = part.sum(0)  # (5, d)
    return dx, dwb[:w].t(), dwb[4], (dinit if initial_state is not None else None)


def _empty_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """An empty (b, d, l) tensor in x's memory order: channel-last when x is a transposed
    (b, l, d) view (channels its fastest axis, as Mamba blocks hand over in_proj slices), else
    contiguous. The block then reads the result back as a (b, l, d) view without a copy."""
    b, d, l = x.shape
    if _channel_last(x):
        return torch.empty(b, l, d, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(b, d, l, device=x.device, dtype=x.dtype)


def _final_state(x: torch.Tensor, init: torch.Tensor | None, w: int) -> torch.Tensor:
    """The last w-1 columns of concat(init, x): (b, d, w-1), a fresh tensor in x.dtype."""
    b, d, l = x.shape
    out = x.new_empty(b, d, w - 1)
    if l >= w - 1:
        out.copy_(x[..., l - (w - 1):])
    else:
        head = init[..., l:].to(x.dtype) if init is not None else x.new_zeros(b, d, w - 1 - l)
        out.copy_(torch.cat([head, x], dim=-1))
    return out


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
):
    """Causal depthwise conv1d on the Triton kernels (validated by ``streamssm.kernels.causal_conv1d``).

    x (b, d, l); weight (d, w), 2 <= w <= 4; bias (d,); initial_state (b, d, w-1).
    Returns y (b, d, l) in x.dtype [, final_state (b, d, w-1) in x.dtype].
    """
    from streamssm.kernels.library import causal_conv1d_fwd  # the registered op (imports this module)

    y, final = causal_conv1d_fwd(x, weight, bias, initial_state, activation == "silu")
    return (y, final) if return_final_state else y
