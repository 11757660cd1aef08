"""SSD backward of the chunk outputs and chunk states: gradients of C, of x and B, of dt and Acs.

Shape legend: L packed tokens, H heads, G groups, P headdim, N dstate, T chunks, Q chunk_size.
Inputs per chunk c and head: dy (gradient of the ungated output), S_in = state entering the
chunk, dS = gradient of the state leaving it (from the state-passing backward). With
decay_ts = exp(Acs_t - Acs_s) for s <= t, k_ts = decay_ts dt_s (dy_t . x_s) per head and
K_ts = sum of k_ts over the heads of a group (dL/d(C_t . B_s))::

    dC_t   = sum_h exp(Acs_t) dy_t S_in + sum_{s <= t} K_ts B_s
    dB_s   = sum_h exp(Acs_last - Acs_s) dt_s x_s dS + sum_{t >= s} K_ts C_t
    dx_s   = dt_s [sum_{t >= s} (C_t . B_s) decay_ts dy_t + exp(Acs_last - Acs_s) dS B_s] + D dy_s
    ddt_s  = x_s . dx_s (without D) / dt_s                       (the dt * x products)
    dAcs_t = dy_t . (exp(Acs_t) S_in C_t) + sum_s M_ts - sum_t' M_t't - W_t,
             M_ts = k_ts (C_t . B_s),  W_s = exp(Acs_last - Acs_s) dt_s <dS, x_s B_s^T>,  dAcs_last += sum_s W_s

Both sums of M (rows and columns) come from the one M of the dC kernel: they cancel in dA. The
column terms equal dt_s ddt_s - W_s in exact arithmetic, but ddt's products read C_t . B_s decay_ts
rounded to bf16 (dA's error vs float64 was 5e-2 that way at S1, H100, 2026-12-07; 1e-3 from one M),
and recomputing x_s . dy_t in the dx kernel for them cost it 280 µs at S1.

Two kernels over (chunk, group, BLOCK_T-row block). The dC kernel (rows t) walks the chunk's
column tiles s and, inside, the group's heads: each head's k and M once, K summed over the heads
in registers, so K·B (and later Kᵀ·C) is one product per group rather than one per head; it
writes dC and K (T, G, Q, Q; in B's dtype, fp32 where added atomically) and adds the dAcs terms
atomically, per head and column tile (a register row per head spilled, 2026-12-07).
Pointers are a scalar per chunk plus int32 offsets inside it: int64 pointer tensors held across
the loops spilled both kernels (ptxas -v, sm_90); the dC kernel's loop over the state entering
the chunk is not pipelined (prefetching the next head's fp32 state tile spilled its 8-warp configs).
The dx kernel (rows s) loops over the heads for dx, ddt, dAcs, dD and the state parts of dB, then
adds Kᵀ·C once. The products C_t . B_s are read from the per-chunk, per-group CB (T, G, Q, Q) of
``bmm_chunk.py`` (recomputed for the backward). Where a group's heads are split over several
programs (to fill the GPU), dB, dC and K are summed with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs, interpreting
from streamssm.kernels.ssd.chunk_state import dot_precision
from streamssm.kernels.ssd.chunks import ChunkLayout
from streamssm.kernels.ssd.skip import PER_TOKEN, skip_kind, skip_weight


# (BLOCK_T rows of the program, BLOCK_I steps per inner-loop tile, warps, stages), per kernel. 32-row
# tiles with 8 warps do not spill on sm_90 at N <= 128 (ptxas -v); the others trade spills for two
# blocks per SM; 64 rows feed Hopper's m64 warpgroup MMA. The lists hold the best of a 54-config
# sweep per kernel at S1 (H100, 2026-12-06, benchmarks/sweep_ssd_configs.py): dx 1.67 -> 1.28 ms with one
# stage instead of two, dC 0.81 -> 0.77 ms with 16-step inner tiles and three stages; the earlier
# shared list stays in both for other shapes. Every BLOCK_T >= _GPU_MIN_BLOCK_T.
# Autotuning reruns the kernels: the accumulated outputs are restored. Interpreter: unequal tiles,
# so the tests cover both orders.
_SHARED = [(32, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)]
_DC_TILES = _SHARED + [(64, 16, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3)]
_DX_TILES = _SHARED + [(64, 32, 4, 1), (128, 32, 8, 1), (64, 16, 4, 1)]


def _configs(tiles: list[tuple[int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_T": bt, "BLOCK_I": bi}, num_warps=w, num_stages=s) for bt, bi, w, s in tiles]


_INTERPRET_CONFIG = triton.Config({"BLOCK_T": 16, "BLOCK_I": 32})
_GPU_MIN_BLOCK_T = 32  # the fewest rows of any GPU config: dD_part holds a row of partials per block
_MIN_BLOCK_T = 16 if interpreting() else _GPU_MIN_BLOCK_T
_KEY = ["H", "P", "N", "CHUNK", "heads_per_prog", "DOT_PREC", "ATOMIC"]


@triton.jit
def _bwd_program(p_cstart, p_clen, P, N, heads_per_group, heads_per_prog,
                 BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, LAST_BLOCKS_FIRST: tl.constexpr):
    """Grid (chunks, groups x head splits, BLOCK_T-step blocks of a chunk). Returns the chunk, its
    length and first token, the group, the first of the program's heads, the block's first step
    (past the chunk's end when the program has nothing to do), steps o_t (BLOCK_T,) and their
    mask, o_p (BLOCK_P,), m_p, o_n (BLOCK_N,), m_n. The GPU starts programs in grid order, the
    block axis slowest: LAST_BLOCKS_FIRST gives the chunks' last blocks the first programs (the
    dC kernel's work grows with the block, and the heaviest started last left a tail)."""
    i_c = tl.program_id(0)
    num_split = heads_per_group // heads_per_prog
    i_g, i_split = tl.program_id(1) // num_split, tl.program_id(1) % num_split
    clen = tl.load(p_clen + i_c)
    i_b = tl.num_programs(2) - 1 - tl.program_id(2) if LAST_BLOCKS_FIRST else tl.program_id(2)
    t0 = i_b * BLOCK_T
    o_t = t0 + tl.arange(0, BLOCK_T)
    o_p = tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    return (i_c, clen, tl.load(p_cstart + i_c), i_g, i_g * heads_per_group + i_split * heads_per_prog, t0,
            o_t, o_t < clen, o_p, o_p < P, o_n, o_n < N)


@triton.autotune(configs=autotune_configs(_configs(_DC_TILES), _INTERPRET_CONFIG), key=_KEY,
                 restore_value=["p_dC", "p_dcb"], reset_to_zero=["p_ddA_row", "p_ddA_col"])
@triton.jit
def _chunk_scan_bwd_dc_kernel(
    # pointers
    p_x,  # (L, H, P)
    p_B, p_C,  # (L, G, N)
    p_dy,  # (L, H, P) gradient of the ungated output
    p_dt_out, p_dA_cs,  # (T, H, Q) fp32
    p_states,  # (T, H, P, N) fp32 states entering each chunk
    p_cb,  # (T, G, Q, Q) C_t . B_s, causal part (bmm_chunk.py)
    p_dC,  # (L, G, N) fp32 out (zeroed when ATOMIC)
    p_dcb,  # (T, G, Q, Q) out: K, causal part, in B's dtype (the products that read it take it so), fp32 and
            # zeroed when ATOMIC
    p_ddA_row,  # (T, H, Q) fp32, zeroed: the t-indexed dAcs terms, added atomically per head and column tile
    p_ddA_col,  # (T, H, Q) fp32, zeroed: the s-indexed in-chunk dAcs terms, added atomically
    p_cstart, p_clen,
    # dimensions
    H, G, P, N, heads_per_group, heads_per_prog,
    # strides
    s_x_l, s_x_h, s_x_p, s_b_l, s_b_g, s_b_n, s_c_l, s_c_g, s_c_n, s_dy_l, s_dy_h, s_dy_p,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, ATOMIC: tl.constexpr,
):
    i_c, clen, start, i_g, h0, t0, o_t, m_t, o_p, m_p, o_n, m_n = _bwd_program(
        p_cstart, p_clen, P, N, heads_per_group, heads_per_prog, BLOCK_T, BLOCK_P, BLOCK_N, True)
    if t0 >= clen:
        return
    m_tn = m_t[:, None] & m_n[None, :]
    m_tp = m_t[:, None] & m_p[None, :]
    # scalar pointers to the chunk's first token (int64), then int32 offsets inside the chunk
    p_x, p_dy = p_x + start * s_x_l, p_dy + start * s_dy_l
    p_B, p_C = p_B + start * s_b_l + i_g * s_b_g, p_C + start * s_c_l + i_g * s_c_g
    o_dy = o_t[:, None] * s_dy_l + o_p[None, :] * s_dy_p  # (BLOCK_T, BLOCK_P)
    heads = (i_c.to(tl.int64) * H + h0) * CHUNK  # offset of the program's first head in the (T, H, Q) tables
    p_dA_cs, p_dt_out, p_ddA_row, p_ddA_col = p_dA_cs + heads, p_dt_out + heads, p_ddA_row + heads, p_ddA_col + heads
    b_C = tl.load(p_C + o_t[:, None] * s_c_l + o_n[None, :] * s_c_n, mask=m_tn, other=0.0)
    acc_dC = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for hh in tl.range(0, heads_per_prog, num_stages=1):  # through the state entering the chunk
        i_h = h0 + hh
        b_acs_t = tl.load(p_dA_cs + hh * CHUNK + o_t, mask=m_t, other=0.0)
        b_dy = tl.load(p_dy + i_h * s_dy_h + o_dy, mask=m_tp, other=0.0)
        b_S = tl.load(p_states + ((i_c.to(tl.int64) * H + i_h) * P + o_p[:, None]) * N + o_n[None, :],
                      mask=m_p[:, None] & m_n[None, :], other=0.0)  # (BLOCK_P, BLOCK_N)
        b_dcs = tl.dot(b_dy, b_S.to(b_dy.dtype), input_precision=DOT_PREC) * tl.exp(b_acs_t)[:, None]
        tl.atomic_add(p_ddA_row + hh * CHUNK + o_t, tl.sum(b_dcs * b_C.to(tl.float32), axis=1), mask=m_t,
                      sem="relaxed")
        acc_dC += b_dcs
    cb_g = (i_c.to(tl.int64) * G + i_g) * CHUNK * CHUNK  # this chunk's and group's CB and K
    p_cb, p_dcb = p_cb + cb_g, p_dcb + cb_g
    for s0 in range(0, tl.minimum(t0 + BLOCK_T, clen), BLOCK_I):  # in-chunk: column tiles, then heads
        o_s = s0 + tl.arange(0, BLOCK_I)
        m_s = o_s < clen
        # rows past the chunk's end masked too: their exp(Acs_t - Acs_s) (Acs_t read as 0) overflows to inf
        # where the chunk decays by more than e^88, and 0 * inf would reach K
        causal = (o_t[:, None] >= o_s[None, :]) & m_s[None, :] & m_t[:, None]
        o_ts = o_t[:, None] * CHUNK + o_s[None, :]  # rows t, columns s of CB and K
        b_cb = tl.load(p_cb + o_ts, mask=causal, other=0.0).to(tl.float32)
        acc_k = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
        for hh in range(0, heads_per_prog):
            i_h = h0 + hh
            base = hh * CHUNK
            b_acs_t = tl.load(p_dA_cs + base + o_t, mask=m_t, other=0.0)
            b_acs_s = tl.load(p_dA_cs + base + o_s, mask=m_s, other=0.0)
            b_dt_s = tl.load(p_dt_out + base + o_s, mask=m_s, other=0.0)
            b_dy = tl.load(p_dy + i_h * s_dy_h + o_dy, mask=m_tp, other=0.0)  # (BLOCK_T, BLOCK_P)
            b_xt = tl.load(p_x + i_h * s_x_h + o_s[None, :] * s_x_l + o_p[:, None] * s_x_p,
                           mask=m_p[:, None] & m_s[None, :], other=0.0)  # (BLOCK_P, BLOCK_I)
            b_k = tl.dot(b_dy, b_xt.to(b_dy.dtype), input_precision=DOT_PREC)  # (t, s): dy_t . x_s
            b_k *= tl.exp(tl.where(causal, b_acs_t[:, None] - b_acs_s[None, :], float("-inf"))) * b_dt_s[None, :]
            b_m = b_k * b_cb
            tl.atomic_add(p_ddA_row + base + o_t, tl.sum(b_m, axis=1), mask=m_t, sem="relaxed")
            tl.atomic_add(p_ddA_col + base + o_s, -tl.sum(b_m, axis=0), mask=m_s, sem="relaxed")
            acc_k += b_k
        b_Bs = tl.load(p_B + o_s[:, None] * s_b_l + o_n[None, :] * s_b_n,
                       mask=m_s[:, None] & m_n[None, :], other=0.0)  # (BLOCK_I, BLOCK_N)
        acc_dC += tl.dot(acc_k.to(b_Bs.dtype), b_Bs, input_precision=DOT_PREC)
        m_ts = m_t[:, None] & m_s[None, :]
        if ATOMIC:  # several programs share this group's heads
            tl.atomic_add(p_dcb + o_ts, acc_k, mask=m_ts, sem="relaxed")
        else:
            tl.store(p_dcb + o_ts, acc_k.to(p_dcb.dtype.element_ty), mask=m_ts)
    p_dC += start * (G * N) + i_g * N
    o_dC = o_t[:, None] * (G * N) + o_n[None, :]
    if ATOMIC:
        tl.atomic_add(p_dC + o_dC, acc_dC, mask=m_tn, sem="relaxed")
    else:
        tl.store(p_dC + o_dC, acc_dC, mask=m_tn)


@triton.autotune(configs=autotune_configs(_configs(_DX_TILES), _INTERPRET_CONFIG), key=_KEY,
                 restore_value=["p_ddA_cs", "p_ddA_last", "p_dB"], reset_to_zero=["p_dD_part"])
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    # pointers
    p_x,  # (L, H, P)
    p_B, p_C,  # (L, G, N)
    p_dy,  # (L, H, P) gradient of the ungated output
    p_D,  # (H,), (H, P) or (L, H) fp32 (skip.py), or dummy
    p_dt_out, p_dA_cs,  # (T, H, Q) fp32
    p_dstates,  # (T, H, P, N) fp32 gradient of the state leaving each chunk
    p_cb,  # (T, G, Q, Q) C_t . B_s, causal part (bmm_chunk.py)
    p_dcb,  # (T, G, Q, Q) K from the dC kernel
    p_dx,  # (L, H, P) out, contiguous
    p_dB,  # (L, G, N) out, contiguous (fp32 and zeroed when ATOMIC)
    p_ddA_cs,  # (T, H, Q) fp32 in: the dC kernel's t-indexed terms; out: dAcs
    p_ddA_col,  # (T, H, Q) fp32 in: the dC kernel's s-indexed terms
    p_ddt,  # (T, H, Q) fp32 out: gradient of dt through the dt * x products
    p_ddA_last,  # (T, H) fp32, accumulated atomically
    p_dD_part,  # (T * num_sb, H, P) fp32 out: partial sums of dy * x; per-token D: (L, H), dD itself
    p_cstart, p_clen,
    # dimensions
    H, G, P, N, heads_per_group, heads_per_prog,
    # strides
    s_x_l, s_x_h, s_x_p, s_b_l, s_b_g, s_b_n, s_c_l, s_c_g, s_c_n, s_dy_l, s_dy_h, s_dy_p,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    D_KIND: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC: tl.constexpr,
):
    i_c, clen, start, i_g, h0, s0, o_s, m_s, o_p, m_p, o_n, m_n = _bwd_program(  # its work shrinks with the block
        p_cstart, p_clen, P, N, heads_per_group, heads_per_prog, BLOCK_T, BLOCK_P, BLOCK_N, False)
    if s0 >= clen:
        return
    m_sn = m_s[:, None] & m_n[None, :]
    m_sp = m_s[:, None] & m_p[None, :]
    # scalar pointers to the chunk's first token (int64), then int32 offsets inside the chunk
    p_x, p_dy, p_dx = p_x + start * s_x_l, p_dy + start * s_dy_l, p_dx + start * (H * P)
    p_B, p_C = p_B + start * s_b_l + i_g * s_b_g, p_C + start * s_c_l + i_g * s_c_g
    if D_KIND == 3:  # per token: (L, H)
        p_D, p_dD_part = p_D + start * H, p_dD_part + start * H
    b_B = tl.load(p_B + o_s[:, None] * s_b_l + o_n[None, :] * s_b_n, mask=m_sn, other=0.0)
    cb_g = (i_c.to(tl.int64) * G + i_g) * CHUNK * CHUNK  # this chunk's and group's CB and K
    p_cb, p_dcb = p_cb + cb_g, p_dcb + cb_g
    acc_dB = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for hh in range(0, heads_per_prog):
        i_h = h0 + hh
        base = (i_c.to(tl.int64) * H + i_h) * CHUNK
        b_acs_s = tl.load(p_dA_cs + base + o_s, mask=m_s, other=0.0)
        b_dt_s = tl.load(p_dt_out + base + o_s, mask=m_s, other=0.0)
        a_last = tl.load(p_dA_cs + base + clen - 1)
        b_x = tl.load(p_x + i_h * s_x_h + o_s[:, None] * s_x_l + o_p[None, :] * s_x_p, mask=m_sp, other=0.0)
        b_dS = tl.load(p_dstates + ((i_c.to(tl.int64) * H + i_h) * P + o_p[:, None]) * N + o_n[None, :],
                       mask=m_p[:, None] & m_n[None, :], other=0.0)  # (BLOCK_P, BLOCK_N)
        b_wl = tl.exp(tl.where(m_s, a_last - b_acs_s, float("-inf")))
        b_dS = b_dS.to(b_B.dtype)
        acc_dx = tl.dot(b_B, tl.trans(b_dS), input_precision=DOT_PREC) * b_wl[:, None]
        acc_dB += tl.dot(b_x.to(b_dS.dtype), b_dS, input_precision=DOT_PREC) * (b_wl * b_dt_s)[:, None]
        b_w = b_dt_s * tl.sum(b_x.to(tl.float32) * acc_dx, axis=1)
        for t0 in range(s0, clen, BLOCK_I):
            o_t = t0 + tl.arange(0, BLOCK_I)
            m_t = o_t < clen
            b_dy = tl.load(p_dy + i_h * s_dy_h + o_t[:, None] * s_dy_l + o_p[None, :] * s_dy_p,
                           mask=m_t[:, None] & m_p[None, :], other=0.0)  # (BLOCK_I, BLOCK_P)
            b_acs_t = tl.load(p_dA_cs + base + o_t, mask=m_t, other=0.0)
            causal = (o_t[None, :] >= o_s[:, None]) & m_t[None, :]
            b_decay = tl.exp(tl.where(causal, b_acs_t[None, :] - b_acs_s[:, None], float("-inf")))  # (s, t)
            b_cbt = tl.load(p_cb + o_t[None, :] * CHUNK + o_s[:, None], mask=causal & m_s[:, None], other=0.0)  # (s, t)
            acc_dx += tl.dot((b_cbt.to(tl.float32) * b_decay).to(b_dy.dtype), b_dy, input_precision=DOT_PREC)
        tl.store(p_ddt + base + o_s, tl.sum(acc_dx * b_x.to(tl.float32), axis=1), mask=m_s)
        b_dx = acc_dx * b_dt_s[:, None]
        if D_KIND != 0:
            b_dys = tl.load(p_dy + i_h * s_dy_h + o_s[:, None] * s_dy_l + o_p[None, :] * s_dy_p,
                            mask=m_sp, other=0.0).to(tl.float32)
            b_dx += b_dys * skip_weight(p_D, o_s, m_s, i_h, o_p, m_p, H, P, D_KIND)
            if D_KIND == 3:  # the whole headdim is in this program: dD of each token, no partials
                tl.store(p_dD_part + o_s * H + i_h, tl.sum(b_dys * b_x.to(tl.float32), axis=1), mask=m_s)
            else:
                o_part = ((i_c.to(tl.int64) * tl.num_programs(2) + tl.program_id(2)) * H + i_h) * P + o_p
                tl.store(p_dD_part + o_part, tl.sum(b_dys * b_x.to(tl.float32), axis=0), mask=m_p)
        tl.store(p_dx + i_h * P + o_s[:, None] * (H * P) + o_p[None, :], b_dx.to(p_dx.dtype.element_ty), mask=m_sp)
        b_terms = tl.load(p_ddA_cs + base + o_s, mask=m_s, other=0.0) + tl.load(p_ddA_col + base + o_s, mask=m_s,
                                                                                 other=0.0)
        tl.store(p_ddA_cs + base + o_s, b_terms - b_w, mask=m_s)
        tl.atomic_add(p_ddA_last + i_c.to(tl.int64) * H + i_h, tl.sum(b_w), sem="relaxed")
    if h0 == i_g * heads_per_group:  # in-chunk dB_s = sum_t K_ts C_t: once per group, by its first head split
        for t0 in range(s0, clen, BLOCK_I):
            o_t = t0 + tl.arange(0, BLOCK_I)
            m_t = o_t < clen
            causal = (o_t[None, :] >= o_s[:, None]) & m_t[None, :]
            b_kt = tl.load(p_dcb + o_t[None, :] * CHUNK + o_s[:, None], mask=causal & m_s[:, None], other=0.0)  # (s, t)
            b_C = tl.load(p_C + o_t[:, None] * s_c_l + o_n[None, :] * s_c_n,
                          mask=m_t[:, None] & m_n[None, :], other=0.0)  # (BLOCK_I, BLOCK_N)
            acc_dB += tl.dot(b_kt.to(b_C.dtype), b_C, input_precision=DOT_PREC)
    p_dB += start * (G * N) + i_g * N
    o_dB = o_s[:, None] * (G * N) + o_n[None, :]
    if ATOMIC:  # several programs share this group's heads
        tl.atomic_add(p_dB + o_dB, acc_dB, mask=m_sn, sem="relaxed")
    else:
        tl.store(p_dB + o_dB, acc_dB.to(p_dB.dtype.element_ty), mask=m_sn)


#: programs (32-row blocks x head splits) each kernel aims for before it splits a group's heads: the dC
#: kernel's splits add K and dC with atomics (3 of every 4 of its fp32 atomics at S1 when split in two)
DX_TARGET_PROGRAMS = 2048
DC_TARGET_PROGRAMS = 1024


def _heads_per_program(heads_per_group: int, programs: int, target: int, interpreter_split_from: int = 2) -> int:
    """Heads one program loops over: all of its group's, unless that leaves fewer than ``target``
    programs; then the largest divisor that meets it, or 1 (dB, dC and K then summed with atomics).
    Interpreter: half of an even group of at least ``interpreter_split_from`` heads, so that the
    tests meet each kernel's split and whole paths."""
    if interpreting():
        split = heads_per_group % 2 == 0 and heads_per_group >= interpreter_split_from
        return heads_per_group // 2 if split else heads_per_group
    divisors = (d for d in range(heads_per_group, 0, -1) if heads_per_group % d == 0)
    return next((d for d in divisors if programs * (heads_per_group // d) >= target), 1)


def _chunk_scan_bwd(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, cb: torch.Tensor, dy: torch.Tensor,
                    D: torch.Tensor | None, dt_out: torch.Tensor, dA_cs: torch.Tensor, prev_states: torch.Tensor,
                    dstates: torch.Tensor, ddA_last: torch.Tensor, layout: ChunkLayout):
    """Gradients of the in-chunk part and of the chunk states.

    x, dy (L, H, P); B, C (L, G, N); cb (T, G, Q, Q) from ``_chunk_cb_fwd``. Returns (dx, dB, dC,
    ddA_cs (T, H, Q), ddt_direct (T, H, Q), dD or None); ``ddA_last`` (T, H) gets the chunk-end terms added in place.
    dC is fp32, and dB too when the dx kernel splits a group's heads over programs (atomics), else in
    B's dtype: the caller casts them once its own temporaries are freed, so that the casts' copies do
    not add to the backward's peak memory (they did at S1: 16 MiB).
    """
    L, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    block_p, block_n = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
    T, Q = layout.num_chunks, layout.chunk_size
    num_tb = triton.cdiv(Q, _MIN_BLOCK_T)  # most row blocks of any config
    heads_per_group = H // G
    dc_heads = _heads_per_program(heads_per_group, T * G * num_tb, DC_TARGET_PROGRAMS, interpreter_split_from=4)
    dx_heads = _heads_per_program(heads_per_group, T * G * num_tb, DX_TARGET_PROGRAMS)
    dc_atomic, dx_atomic = dc_heads < heads_per_group, dx_heads < heads_per_group
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(L, H, P, device=x.device, dtype=x.dtype)
    dB = torch.zeros(L, G, N, **f32) if dx_atomic else torch.empty(L, G, N, device=x.device, dtype=B.dtype)
    dC = (torch.zeros if dc_atomic else torch.empty)(L, G, N, **f32)
    # K: dL/d(C_t . B_s) summed over each group's heads, in B's dtype as K.B and K^T.C read it (16 MiB less at S1)
    dcb = torch.zeros(T, G, Q, Q, **f32) if dc_atomic else torch.empty(T, G, Q, Q, device=x.device, dtype=B.dtype)
    ddA_cs = torch.zeros(T, H, Q, **f32)
    ddA_col = torch.zeros(T, H, Q, **f32)
    ddt = torch.empty_like(ddA_cs)
    kind = skip_kind(D)
    if kind == PER_TOKEN:
        dD_part = torch.empty(L, H, **f32)
    elif D is not None:
        dD_part = torch.zeros(T * num_tb, H, P, **f32)
    else:
        dD_part = ddt
    prec = dot_precision(x.dtype)
    strides = (x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
               C.stride(0), C.stride(1), C.stride(2), dy.stride(0), dy.stride(1), dy.stride(2))

    def grid(heads_per_prog):
        return lambda meta: (T, G * (heads_per_group // heads_per_prog), triton.cdiv(Q, meta["BLOCK_T"]))

    _chunk_scan_bwd_dc_kernel[grid(dc_heads)](
        x, B, C, dy, dt_out, dA_cs, prev_states, cb, dC, dcb, ddA_cs, ddA_col, layout.starts, layout.lengths,
        H, G, P, N, heads_per_group, dc_heads, *strides,
        CHUNK=Q, BLOCK_P=block_p, BLOCK_N=block_n,
        DOT_PREC=prec, ATOMIC=dc_atomic,
    )
    _chunk_scan_bwd_dx_kernel[grid(dx_heads)](
        x, B, C, dy, D if D is not None else ddt, dt_out, dA_cs, dstates, cb, dcb, dx, dB, ddA_cs, ddA_col, ddt,
        ddA_last, dD_part, layout.starts, layout.lengths,
        H, G, P, N, heads_per_group, dx_heads, *strides,
        CHUNK=Q, BLOCK_P=block_p, BLOCK_N=block_n,
        D_KIND=kind, DOT_PREC=prec, ATOMIC=dx_atomic,
    )
    dD = None
    if kind == PER_TOKEN:
        dD = dD_part  # (L, H)
    elif D is not None:
        dD = dD_part.sum(0)  # (H, P)
        if D.dim() == 1:
            dD = dD.sum(-1)
    return dx, dB, dC, ddA_cs, ddt, dD
