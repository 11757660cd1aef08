"""Triton single step of the causal depthwise conv1d over a state pool (in place).

Shape legend: b batch (live streams), d channels, w kernel width (2..4), P pool rows.

    window = [conv_state[rows[i]], x[i]]            (d, w)  state cast to x.dtype first
    y[i]   = act(bias + sum_k weight[:, k] * window[:, k])
    conv_state[rows[i]] = window[:, 1:]             in place; other pool rows untouched

Matches ``conv1d_step_ref`` (fp32 math). One program per (stream, block of channels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._triton import silu


@triton.jit
def _conv1d_step_kernel(
    # pointers
    p_x, p_state, p_w, p_bias, p_y, p_rows,
    # dimensions
    d,
    # strides
    s_xb, s_xd, s_sp, s_sd, s_sw, s_wd, s_ww, s_yb, s_yd,
    # meta-parameters
    W: tl.constexpr,  # kernel width
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # stream
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < d
    row = tl.load(p_rows + i).to(tl.int64)
    p_s = p_state + row * s_sp + o_d * s_sd  # this stream's pool row
    b_x = tl.load(p_x + i * s_xb + o_d * s_xd, mask=m_d, other=0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    # window column k = state column k (k < W-1), then x; the state shifts left by one
    for k in tl.static_range(W - 1):
        b_s = tl.load(p_s + k * s_sw, mask=m_d, other=0.0).to(b_x.dtype)
        acc += b_s.to(tl.float32) * tl.load(p_w + o_d * s_wd + k * s_ww, mask=m_d, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(p_s + (k - 1) * s_sw, b_s.to(p_state.dtype.element_ty), mask=m_d)
    acc += b_x.to(tl.float32) * tl.load(p_w + o_d * s_wd + (W - 1) * s_ww, mask=m_d, other=0.0).to(tl.float32)
    tl.store(p_s + (W - 2) * s_sw, b_x.to(p_state.dtype.element_ty), mask=m_d)
    if SILU:
        acc = silu(acc)
    tl.store(p_y + i * s_yb + o_d * s_yd, acc.to(p_y.dtype.element_ty), mask=m_d)


def conv1d_step_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    rows: torch.Tensor,
) -> torch.Tensor:
    """x (b, d); conv_state (P, d, w-1) **updated in place** at ``rows`` (b,) int64;
    weight (d, w); bias (d,). Returns y (b, d) in x.dtype. Inputs validated by ``conv1d_step``."""
    b, d = x.shape
    w = weight.shape[1]
    y = torch.empty(b, d, device=x.device, dtype=x.dtype)
    if b == 0:
        return y
    block_d = min(256, triton.next_power_of_2(d))
    grid = (b, triton.cdiv(d, block_d))
    _conv1d_step_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, y, rows,
        d,
        x.stride(0), x.stride(1), *conv_state.stride(), *weight.stride(), y.stride(0), y.stride(1),
        W=w, HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_D=block_d,
    )
    return y
