"""SSD stage 1: step sizes and their decay cumsum inside each chunk, and its backward.

Shape legend: L packed tokens, H heads, T chunks, Q chunk_size.

    dt_t   = softplus(dt_t + dt_bias)        (bias and softplus optional)
    Acs_t  = sum_{s <= t in chunk} dt_s * A  (log-decay from the chunk start to step t)

Both are written per chunk as (T, H, Q) fp32 (past a short chunk's end dt is 0 and Acs stays flat).
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
def _chunk_cumsum_fwd_kernel(
    # pointers
    p_dt,  # (L, H) raw step sizes
    p_A,  # (H,) fp32
    p_dt_bias,  # (H,) fp32 or dummy
    p_dt_out,  # (T, H, Q) fp32 processed step sizes
    p_dA_cs,  # (T, H, Q) fp32 cumsum of dt * A inside the chunk
    p_cstart,  # (T,) int64 first token of each chunk
    p_clen,  # (T,) int32 tokens in each chunk
    # dimensions
    H,
    # strides
    s_dt_l, s_dt_h,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):
    i_c, start, clen, o_q, o_h, m_h, m, o_buf = _chunk_program(p_cstart, p_clen, H, CHUNK, BLOCK_Q, BLOCK_H)
    b_dt = tl.load(p_dt + (start + o_q)[:, None] * s_dt_l + o_h[None, :] * s_dt_h, mask=m, other=0.0)
    b_dt = b_dt.to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(p_dt_bias + o_h, mask=m_h, other=0.0)[None, :]
    if DT_SOFTPLUS:
        b_dt = softplus(b_dt)
    b_dt = tl.where(m, b_dt, 0.0)
    b_A = tl.load(p_A + o_h, mask=m_h, other=0.0)
    b_cs = tl.cumsum(b_dt * b_A[None, :], axis=0)
    m_buf = (o_q < CHUNK)[:, None] & m_h[None, :]
    tl.store(p_dt_out + o_buf, b_dt, mask=m_buf)
    tl.store(p_dA_cs + o_buf, b_cs, mask=m_buf)


@triton.jit
def _chunk_cumsum_bwd_kernel(
    # pointers
    p_ddA_cs,  # (T, H, Q) fp32 gradient of Acs (all but the chunk-end terms)
    p_ddA_last,  # (T, H) fp32 gradient of Acs at the chunk's last step
    p_ddt_in,  # (T, H, Q) fp32 gradient of the processed dt through the dt * x products
    p_dt,  # (L, H) raw step sizes
    p_dt_bias,  # (H,) fp32 or dummy
    p_dt_out,  # (T, H, Q) fp32 processed step sizes
    p_A,  # (H,) fp32
    p_ddt,  # (L, H) out: gradient of the raw dt
    p_dA_part,  # (T, H) fp32 out: per-chunk gradient of A
    p_dbias_part,  # (T, H) fp32 out: per-chunk gradient of dt_bias
    p_cstart, p_clen,
    # dimensions
    H,
    # strides
    s_dt_l, s_dt_h, s_ddt_l, s_ddt_h,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):
    i_c, start, clen, o_q, o_h, m_h, m, o_buf = _chunk_program(p_cstart, p_clen, H, CHUNK, BLOCK_Q, BLOCK_H)
    b_dacs = tl.load(p_ddA_cs + o_buf, mask=m, other=0.0)
    b_last = tl.load(p_ddA_last + i_c * H + o_h, mask=m_h, other=0.0)
    b_dacs += tl.where(o_q[:, None] == clen - 1, b_last[None, :], 0.0)
    # d(dt_s * A) = sum_{t >= s} dAcs_t: reverse cumsum inside the chunk
    b_da = tl.cumsum(b_dacs, axis=0, reverse=True)
    b_A = tl.load(p_A + o_h, mask=m_h, other=0.0)
    b_dtp = tl.load(p_dt_out + o_buf, mask=m, other=0.0)
    b_ddt = tl.load(p_ddt_in + o_buf, mask=m, other=0.0) + b_A[None, :] * b_da
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
                      layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """dt (L, H) -> (dt_out, dA_cs), both (T, H, Q) fp32."""
    H = dt.shape[1]
    dt_out = torch.empty(layout.num_chunks, H, layout.chunk_size, device=dt.device, dtype=torch.float32)
    dA_cs = torch.empty_like(dt_out)
    block_q, block_h, grid = _blocks(layout, H)
    _chunk_cumsum_fwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, dA_cs, layout.starts, layout.lengths,
        H, dt.stride(0), dt.stride(1),
        CHUNK=layout.chunk_size, BLOCK_Q=block_q, BLOCK_H=block_h,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
    )
    return dt_out, dA_cs


def _chunk_cumsum_bwd(ddA_cs: torch.Tensor, ddA_last: torch.Tensor, ddt_in: torch.Tensor, dt: torch.Tensor,
                      A: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_out: torch.Tensor,
                      layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (ddt (L, H) in dt's dtype, dA (H,) fp32, ddt_bias (H,) fp32 or None)."""
    H = dt.shape[1]
    ddt = torch.empty(dt.shape, device=dt.device, dtype=dt.dtype)
    dA_part = torch.empty(layout.num_chunks, H, device=dt.device, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part) if dt_bias is not None else dA_part
    block_q, block_h, grid = _blocks(layout, H)
    _chunk_cumsum_bwd_kernel[grid](
        ddA_cs, ddA_last, ddt_in, dt, dt_bias if dt_bias is not None else A, dt_out, A, ddt, dA_part, dbias_part,
        layout.starts, layout.lengths,
        H, dt.stride(0), dt.stride(1), ddt.stride(0), ddt.stride(1),
        CHUNK=layout.chunk_size, BLOCK_Q=block_q, BLOCK_H=block_h,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
    )
    return ddt, dA_part.sum(0), dbias_part.sum(0) if dt_bias is not None else None
