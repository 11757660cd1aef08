"""SSD stage 1: step sizes and their decay cumsum inside each chunk, and its backward.

Shape legend: L packed tokens, H heads, T chunks, Q chunk_size.

    dt_t   = softplus(dt_t + dt_bias)        (bias and softplus optional)
    Acs_t  = sum_{s <= t in chunk} dt_s * A  (log-decay from the chunk start to step t)
    w_t    = dt_t, or the given input weight  (what multiplies x_t B_t^T in the state update)

w and Acs are written per chunk as (T, H, Q) fp32 (past a short chunk's end w is 0 and Acs
stays flat); the later stages read w as "dt_out".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._triton import softplus, softplus_grad
from streamssm.kernels.ssd.chunks import ChunkLayout


@triton.jit
def _chunk_program(p_cstart, p_clen, H, CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (chunks, head blocks). Returns the chunk index (int64), its first token and length,
    steps o_q (BLOCK_Q,), heads o_h (BLOCK_H,) and their mask m_h, the (BLOCK_Q, BLOCK_H) mask m
    of valid (step, head) pairs and their offsets o_buf into the (T, H, Q) buffers."""
    i_c = tl.program_id(0).to(tl.int64)
    o_q = tl.arange(0, BLOCK_Q)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    clen = tl.load(p_clen + i_c)
    m = (o_q < clen)[:, None] & m_h[None, :]
    o_buf = i_c * H * CHUNK + o_h[None, :] * CHUNK + o_q[:, None]
    return i_c, tl.load(p_cstart + i_c), clen, o_q, o_h, m_h, m, o_buf


@triton.jit
def _step_sizes(p_dt, p_dt_bias, start, o_q, o_h, m_h, m, s_dt_l, s_dt_h,
                HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr):
    """(BLOCK_Q, BLOCK_H) fp32 step sizes softplus(dt + dt_bias) of a chunk, 0 outside mask m."""
    b_dt = tl.load(p_dt + (start + o_q)[:, None] * s_dt_l + o_h[None, :] * s_dt_h, mask=m, other=0.0)
    b_dt = b_dt.to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(p_dt_bias + o_h, mask=m_h, other=0.0)[None, :]
    if DT_SOFTPLUS:
        b_dt = softplus(b_dt)
    return tl.where(m, b_dt, 0.0)


@triton.jit
def _chunk_cumsum_fwd_kernel(
    # pointers
    p_dt,  # (L, H) raw step sizes
    p_w,  # (L, H) input weights or dummy
    p_A,  # (H,) fp32
    p_dt_bias,  # (H,) fp32 or dummy
    p_dt_out,  # (T, H, Q) fp32 input weights (the processed step sizes without p_w)
    p_dA_cs,  # (T, H, Q) fp32 cumsum of dt * A inside the chunk
    p_cstart,  # (T,) int64 first token of each chunk
    p_clen,  # (T,) int32 tokens in each chunk
    # dimensions
    H,
    # strides
    s_dt_l, s_dt_h, s_w_l, s_w_h,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_W: tl.constexpr,
):
    i_c, start, clen, o_q, o_h, m_h, m, o_buf = _chunk_program(p_cstart, p_clen, H, CHUNK, BLOCK_Q, BLOCK_H)
    b_dt = _step_sizes(p_dt, p_dt_bias, start, o_q, o_h, m_h, m, s_dt_l, s_dt_h, HAS_DT_BIAS, DT_SOFTPLUS)
    b_A = tl.load(p_A + o_h, mask=m_h, other=0.0)
    b_cs = tl.cumsum(b_dt * b_A[None, :], axis=0)
    if HAS_W:
        b_w = tl.load(p_w + (start + o_q)[:, None] * s_w_l + o_h[None, :] * s_w_h, mask=m, other=0.0)
        b_w = b_w.to(tl.float32)
    else:
        b_w = b_dt
    m_buf = (o_q < CHUNK)[:, None] & m_h[None, :]
    tl.store(p_dt_out + o_buf, b_w, mask=m_buf)
    tl.store(p_dA_cs + o_buf, b_cs, mask=m_buf)


@triton.jit
def _chunk_cumsum_bwd_kernel(
    # pointers
    p_ddA_cs,  # (T, H, Q) fp32 gradient of Acs (all but the chunk-end terms)
    p_ddA_last,  # (T, H) fp32 gradient of Acs at the chunk's last step
    p_ddt_in,  # (T, H, Q) fp32 gradient of the input weights (dt_out) through the w * x products
    p_dt,  # (L, H) raw step sizes
    p_dt_bias,  # (H,) fp32 or dummy
    p_dt_out,  # (T, H, Q) fp32 input weights
    p_A,  # (H,) fp32
    p_ddt,  # (L, H) out: gradient of the raw dt
    p_dw,  # (L, H) out: gradient of the input weights, or dummy
    p_dA_part,  # (T, H) fp32 out: per-chunk gradient of A
    p_dbias_part,  # (T, H) fp32 out: per-chunk gradient of dt_bias
    p_cstart, p_clen,
    # dimensions
    H,
    # strides
    s_dt_l, s_dt_h, s_ddt_l, s_ddt_h, s_dw_l, s_dw_h,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_W: tl.constexpr,
):
    i_c, start, clen, o_q, o_h, m_h, m, o_buf = _chunk_program(p_cstart, p_clen, H, CHUNK, BLOCK_Q, BLOCK_H)
    b_dacs = tl.load(p_ddA_cs + o_buf, mask=m, other=0.0)
    b_last = tl.load(p_ddA_last + i_c * H + o_h, mask=m_h, other=0.0)
    b_dacs += tl.where(o_q[:, None] == clen - 1, b_last[None, :], 0.0)
    # d(dt_s * A) = sum_{t >= s} dAcs_t: reverse cumsum inside the chunk
    b_da = tl.cumsum(b_dacs, axis=0, reverse=True)
    b_A = tl.load(p_A + o_h, mask=m_h, other=0.0)
    b_dw = tl.load(p_ddt_in + o_buf, mask=m, other=0.0)
    if HAS_W:  # dt sets only the decay; the input weights have their own gradient
        b_dtp = _step_sizes(p_dt, p_dt_bias, start, o_q, o_h, m_h, m, s_dt_l, s_dt_h, HAS_DT_BIAS, DT_SOFTPLUS)
        tl.store(p_dw + (start + o_q)[:, None] * s_dw_l + o_h[None, :] * s_dw_h,
                 b_dw.to(p_dw.dtype.element_ty), mask=m)
        b_ddt = b_A[None, :] * b_da
    else:
        b_dtp = tl.load(p_dt_out + o_buf, mask=m, other=0.0)
        b_ddt = b_dw + b_A[None, :] * b_da
    tl.store(p_dA_part + i_c * H + o_h, tl.sum(b_dtp * b_da, axis=0), mask=m_h)
    if DT_SOFTPLUS:
        b_raw = tl.load(p_dt + (start + o_q)[:, None] * s_dt_l + o_h[None, :] * s_dt_h, mask=m, other=0.0)
        b_raw = b_raw.to(tl.float32)
        if HAS_DT_BIAS:
            b_raw += tl.load(p_dt_bias + o_h, mask=m_h, other=0.0)[None, :]
        b_ddt *= softplus_grad(b_raw)
    b_ddt = tl.where(m, b_ddt, 0.0)
    tl.store(p_ddt + (start + o_q)[:, None] * s_ddt_l + o_h[None, :] * s_ddt_h,
             b_ddt.to(p_ddt.dtype.element_ty), mask=m)
    if HAS_DT_BIAS:
        tl.store(p_dbias_part + i_c * H + o_h, tl.sum(b_ddt, axis=0), mask=m_h)


def _blocks(layout: ChunkLayout, H: int) -> tuple[int, int, tuple[int, int]]:
    block_q = max(16, triton.next_power_of_2(layout.chunk_size))
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // block_q))
    return block_q, block_h, (layout.num_chunks, triton.cdiv(H, block_h))


def _chunk_cumsum_fwd(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                      layout: ChunkLayout, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dt, w (L, H) -> (dt_out: the input weights w, or the processed dt without w; dA_cs), both
    (T, H, Q) fp32."""
    H = dt.shape[1]
    dt_out = torch.empty(layout.num_chunks, H, layout.chunk_size, device=dt.device, dtype=torch.float32)
    dA_cs = torch.empty_like(dt_out)
    block_q, block_h, grid = _blocks(layout, H)
    w_or_dt = w if w is not None else dt
    _chunk_cumsum_fwd_kernel[grid](
        dt, w_or_dt, A, dt_bias if dt_bias is not None else A, dt_out, dA_cs, layout.starts, layout.lengths,
        H, dt.stride(0), dt.stride(1), w_or_dt.stride(0), w_or_dt.stride(1),
        CHUNK=layout.chunk_size, BLOCK_Q=block_q, BLOCK_H=block_h,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_W=w is not None,
    )
    return dt_out, dA_cs


def _chunk_cumsum_bwd(ddA_cs: torch.Tensor, ddA_last: torch.Tensor, ddt_in: torch.Tensor, dt: torch.Tensor,
                      A: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_out: torch.Tensor,
                      layout: ChunkLayout, w: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (ddt (L, H) in dt's dtype, dA (H,) fp32, ddt_bias (H,) fp32 or None, dw (L, H) in
    w's dtype or None)."""
    H = dt.shape[1]
    ddt = torch.empty(dt.shape, device=dt.device, dtype=dt.dtype)
    dw = torch.empty(w.shape, device=w.device, dtype=w.dtype) if w is not None else ddt
    dA_part = torch.empty(layout.num_chunks, H, device=dt.device, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part) if dt_bias is not None else dA_part
    block_q, block_h, grid = _blocks(layout, H)
    _chunk_cumsum_bwd_kernel[grid](
        ddA_cs, ddA_last, ddt_in, dt, dt_bias if dt_bias is not None else A, dt_out, A, ddt, dw, dA_part, dbias_part,
        layout.starts, layout.lengths,
        H, dt.stride(0), dt.stride(1), ddt.stride(0), ddt.stride(1), dw.stride(0), dw.stride(1),
        CHUNK=layout.chunk_size, BLOCK_Q=block_q, BLOCK_H=block_h,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_W=w is not None,
    )
    return ddt, dA_part.sum(0), dbias_part.sum(0) if dt_bias is not None else None, dw if w is not None else None
