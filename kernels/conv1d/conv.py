"""Causal depthwise conv1d in Triton: forward and backward, conv state in and out.

Shape legend: b batch, d channels, l length, w kernel width (2..4, constexpr W).

With xpad = concat(initial_state, x) along time (the state holds the previous w-1 inputs):
    pre_s = bias + sum_k weight[:, k] * xpad[s + k]       s = 0..l-1, k = 0..w-1
    y_s   = silu(pre_s) (or pre_s)
    final state = xpad[l .. l+w-2]
Backward, with dpre_s = dy_s * act'(pre_s) (pre recomputed, never stored):
    dxpad[p] = sum_k weight[:, k] * dpre[p - k]  (+ d final[p - l] for the last w-1 positions)
    dx_t = dxpad[t + w - 1];  d initial_state_j = dxpad[j];  dweight_k = sum dpre_s xpad[s + k]
Programs own (batch, BLOCK_D channels, BLOCK_L steps); dweight/dbias are summed with fp32 atomics.
Any strides in and out: y and dx are laid out like x (``_empty_in_layout_of``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs
from streamssm.kernels._triton import silu, silu_grad


def _configs() -> list:
    configs = [
        triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=4)
        for bd, bl in ((16, 128), (32, 64), (8, 256), (32, 128))
    ]
    return autotune_configs(configs, triton.Config({"BLOCK_D": 8, "BLOCK_L": 32}, num_warps=1))


@triton.jit
def _load_xpad(p_x, p_init, o_d, m_d, p, length, s_xd, s_xl, s_id, s_il,
               W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xpad at positions p (P,) int64 for channels o_d -> (BLOCK_D, P) fp32 (0 outside)."""
    t = p - (W - 1)
    m = m_d[:, None] & ((t >= 0) & (t < length))[None, :]
    v = tl.load(p_x + o_d[:, None] * s_xd + t[None, :] * s_xl, mask=m, other=0.0).to(tl.float32)
    if HAS_INIT:
        mi = m_d[:, None] & ((p >= 0) & (p < W - 1))[None, :]
        v += tl.load(p_init + o_d[:, None] * s_id + p[None, :] * s_il, mask=mi, other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre(p_x, p_init, p_w, p_bias, o_d, m_d, s, length, s_xd, s_xl, s_id, s_il, s_wd, s_wk,
         W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Pre-activation at output positions s (P,) -> (BLOCK_D, P) fp32."""
    acc = tl.zeros((o_d.shape[0], s.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(p_w + o_d * s_wd + k * s_wk, mask=m_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * _load_xpad(p_x, p_init, o_d, m_d, s + k, length, s_xd, s_xl, s_id, s_il, W, HAS_INIT)
    if HAS_BIAS:
        acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _dpre(p_x, p_init, p_w, p_bias, p_dy, o_d, m_d, s, length, s_xd, s_xl, s_id, s_il, s_wd, s_wk, s_gd, s_gl,
          W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """dL/dpre at output positions s (P,) -> (BLOCK_D, P) fp32, 0 outside [0, length)."""
    m = m_d[:, None] & ((s >= 0) & (s < length))[None, :]
    dy = tl.load(p_dy + o_d[:, None] * s_gd + s[None, :] * s_gl, mask=m, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre(p_x, p_init, p_w, p_bias, o_d, m_d, s, length, s_xd, s_xl, s_id, s_il, s_wd, s_wk,
                   W, HAS_INIT, HAS_BIAS)
        dy = dy * silu_grad(pre)
    return dy


@triton.jit
def _dxpad(p_x, p_init, p_w, p_bias, p_dy, p_dfinal, o_d, m_d, p, length,
           s_xd, s_xl, s_id, s_il, s_wd, s_wk, s_gd, s_gl,
           W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
           HAS_DFINAL: tl.constexpr):
    """dL/dxpad at positions p (P,) -> (BLOCK_D, P) fp32."""
    acc = tl.zeros((o_d.shape[0], p.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(p_w + o_d * s_wd + k * s_wk, mask=m_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * _dpre(p_x, p_init, p_w, p_bias, p_dy, o_d, m_d, p - k, length,
                                   s_xd, s_xl, s_id, s_il, s_wd, s_wk, s_gd, s_gl, W, HAS_INIT, HAS_BIAS, SILU)
    if HAS_DFINAL:
        j = p - length
        mf = m_d[:, None] & ((j >= 0) & (j < W - 1))[None, :]
        acc += tl.load(p_dfinal + o_d[:, None] * (W - 1) + j[None, :], mask=mf, other=0.0).to(tl.float32)
    return acc


@triton.autotune(configs=_configs(), key=["dim", "W"])
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
    tl.store(p_y + o_d[:, None] * s_yd + s[None, :] * s_yl, pre.to(p_y.dtype.element_ty), mask=m)


@triton.autotune(configs=_configs(), key=["dim", "W"], reset_to_zero=["p_dw", "p_dbias"])
@triton.jit
def _causal_conv1d_bwd_kernel(
    # pointers: inputs as in the forward; dy (b, d, l); dfinal contiguous (b, d, w-1)
    p_x, p_init, p_w, p_bias, p_dy, p_dfinal,
    # outputs: dx (b, d, l); dinit contiguous (b, d, w-1); dw (d, w), dbias (d,) fp32
    p_dx, p_dinit, p_dw, p_dbias,
    # dimensions
    length, dim,
    # strides
    s_xb, s_xd, s_xl, s_ib, s_id, s_il, s_wd, s_wk, s_gb, s_gd, s_gl, s_dxb, s_dxd, s_dxl,
    # meta
    W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(2)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    s = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    m = m_d[:, None] & (s < length)[None, :]
    p_x += pid_b * s_xb
    p_init += pid_b * s_ib
    p_dy += pid_b * s_gb
    p_dx += pid_b * s_dxb
    p_dfinal += pid_b * dim * (W - 1)
    p_dinit += pid_b * dim * (W - 1)
    args = (s_xd, s_xl, s_id, s_il, s_wd, s_wk, s_gd, s_gl)
    # weight and bias gradients from this tile's dpre
    dpre = _dpre(p_x, p_init, p_w, p_bias, p_dy, o_d, m_d, s, length, *args, W, HAS_INIT, HAS_BIAS, SILU)
    for k in tl.static_range(W):
        xk = _load_xpad(p_x, p_init, o_d, m_d, s + k, length, s_xd, s_xl, s_id, s_il, W, HAS_INIT)
        tl.atomic_add(p_dw + o_d * W + k, tl.sum(dpre * xk, axis=1), mask=m_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, tl.sum(dpre, axis=1), mask=m_d, sem="relaxed")
    # input gradient at xpad positions s + w - 1 (= x positions s)
    dx = _dxpad(p_x, p_init, p_w, p_bias, p_dy, p_dfinal, o_d, m_d, s + (W - 1), length, *args,
                W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL)
    tl.store(p_dx + o_d[:, None] * s_dxd + s[None, :] * s_dxl, dx.to(p_dx.dtype.element_ty), mask=m)
    if HAS_INIT:
        if pid_l == 0:
            j = tl.arange(0, 4).to(tl.int64)
            di = _dxpad(p_x, p_init, p_w, p_bias, p_dy, p_dfinal, o_d, m_d, j, length, *args,
                        W, HAS_INIT, HAS_BIAS, SILU, HAS_DFINAL)
            mi = m_d[:, None] & (j < W - 1)[None, :]
            tl.store(p_dinit + o_d[:, None] * (W - 1) + j[None, :], di.to(p_dinit.dtype.element_ty), mask=mi)


def _grid(b: int, d: int, l: int):
    return lambda meta: (b, triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(l, meta["BLOCK_L"]))


def _empty_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """An empty (b, d, l) tensor in x's memory order: channel-last when x is a transposed
    (b, l, d) view (channels its fastest axis, as Mamba blocks hand over in_proj slices), else
    contiguous. The block then reads the result back as a (b, l, d) view without a copy."""
    b, d, l = x.shape
    if x.stride(1) == 1 and x.stride(2) != 1:
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


class CausalConv1dFn(torch.autograd.Function):
    """Causal depthwise conv1d with gradients for x, weight, bias and initial_state."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, activation):
        b, d, l = x.shape
        w = weight.shape[1]
        init = initial_state if initial_state is not None else x  # placeholder pointer when absent
        y = _empty_in_layout_of(x)
        _causal_conv1d_fwd_kernel[_grid(b, d, l)](
            x, init, weight, bias, y, l, d, *x.stride(), *init.stride()[:3], *weight.stride(), *y.stride(),
            W=w, HAS_INIT=initial_state is not None, HAS_BIAS=bias is not None, SILU=activation == "silu",
        )
        final = _final_state(x, initial_state, w)
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.silu = activation == "silu"
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, initial_state = ctx.saved_tensors
        b, d, l = x.shape
        w = weight.shape[1]
        dy = torch.zeros_like(x) if dy is None else dy
        dfinal = None if dfinal is None else dfinal.contiguous()
        init = initial_state if initial_state is not None else x
        dx = _empty_in_layout_of(x)
        dinit = torch.empty(b, d, w - 1, device=x.device, dtype=init.dtype) if initial_state is not None else dx
        dw = torch.zeros(d, w, device=x.device, dtype=torch.float32)
        dbias = torch.zeros(d, device=x.device, dtype=torch.float32)
        _causal_conv1d_bwd_kernel[_grid(b, d, l)](
            x, init, weight, bias, dy, dfinal if dfinal is not None else dy,
            dx, dinit, dw, dbias, l, d, *x.stride(), *init.stride()[:3], *weight.stride(), *dy.stride(), *dx.stride(),
            W=w, HAS_INIT=initial_state is not None, HAS_BIAS=bias is not None, SILU=ctx.silu,
            HAS_DFINAL=dfinal is not None,
        )
        return (dx, dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
                dinit if initial_state is not None else None, None)


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
    y, final = CausalConv1dFn.apply(x, weight, bias, initial_state, activation)
    return (y, final) if return_final_state else y
