"""SSD stage 2: the state each chunk adds on its own, and the same contraction for the backward.

Shape legend: L packed tokens, H heads, G groups, P headdim, N dstate, T chunks, Q chunk_size.

Forward (``for_bwd=False``), per chunk and head, with Acs the in-chunk decay cumsum::

    states[c] = sum_s exp(Acs_last - Acs_s) * dt_s * x_s B_s^T          (P, N)

Backward (``for_bwd=True``): the gradient that the outputs of chunk c send to the state
entering it::

    dstates[c] = sum_t exp(Acs_t) * dy_t C_t^T                           (P, N)

Both are ``u^T (P, Q) @ (v * w) (Q, N)`` with u = x or dy (L, H, P) and v = B or C (L, G, N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs
from streamssm.kernels.ssd.chunks import ChunkLayout

_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bk, w, s in [(64, 8, 3), (64, 4, 3)]  # 8 warps: no register spills on sm_90 at N <= 128 (ptxas -v)
]


@triton.autotune(configs=autotune_configs(_CONFIGS, triton.Config({"BLOCK_K": 16})),
                 key=["P", "N", "CHUNK", "FOR_BWD", "DOT_PREC"])
@triton.jit
def _chunk_state_fwd_kernel(
    # pointers
    p_u,  # (L, H, P) x (forward) or dy (backward)
    p_v,  # (L, G, N) B (forward) or C (backward)
    p_dt_out,  # (T, H, Q) fp32 processed dt
    p_dA_cs,  # (T, H, Q) fp32 decay cumsum
    p_out,  # (T, H, P, N) fp32
    p_cstart, p_clen,
    # dimensions
    H, P, N, heads_per_group,
    # strides
    s_u_l, s_u_h, s_u_p, s_v_l, s_v_g, s_v_n,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    FOR_BWD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_c, i_h, i_pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_nb = tl.cdiv(N, BLOCK_N)
    i_p, i_n = i_pn // num_nb, i_pn % num_nb
    i_g = i_h // heads_per_group
    start = tl.load(p_cstart + i_c)
    clen = tl.load(p_clen + i_c)
    base = (i_c.to(tl.int64) * H + i_h) * CHUNK
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < P, o_n < N
    a_last = tl.load(p_dA_cs + base + clen - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, clen, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < clen
        tok = start + o_k
        b_u = tl.load(p_u + tok[None, :] * s_u_l + i_h * s_u_h + o_p[:, None] * s_u_p,
                      mask=m_p[:, None] & m_k[None, :], other=0.0)  # (BLOCK_P, BLOCK_K)
        b_v = tl.load(p_v + tok[:, None] * s_v_l + i_g * s_v_g + o_n[None, :] * s_v_n,
                      mask=m_k[:, None] & m_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        b_acs = tl.load(p_dA_cs + base + o_k, mask=m_k, other=0.0)
        if FOR_BWD:
            b_w = tl.exp(tl.where(m_k, b_acs, float("-inf")))
        else:
            b_w = tl.exp(tl.where(m_k, a_last - b_acs, float("-inf")))
            b_w *= tl.load(p_dt_out + base + o_k, mask=m_k, other=0.0)
        b_v = (b_v.to(tl.float32) * b_w[:, None]).to(b_u.dtype)
        acc += tl.dot(b_u, b_v, input_precision=DOT_PREC)
    o_out = ((i_c.to(tl.int64) * H + i_h) * P + o_p[:, None]) * N + o_n[None, :]
    tl.store(p_out + o_out, acc, mask=m_p[:, None] & m_n[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; low-precision runs keep fp32 operands in tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_state_fwd(u: torch.Tensor, v: torch.Tensor, dt_out: torch.Tensor, dA_cs: torch.Tensor,
                     layout: ChunkLayout, for_bwd: bool = False) -> torch.Tensor:
    """u (L, H, P), v (L, G, N) -> per-chunk states (T, H, P, N) fp32 (see module docstring)."""
    _, H, P = u.shape
    G, N = v.shape[1], v.shape[2]
    out = torch.empty(layout.num_chunks, H, P, N, device=u.device, dtype=torch.float32)
    block_p = max(16, min(64, triton.next_power_of_2(P)))
    block_n = max(16, min(128, triton.next_power_of_2(N)))
    grid = (layout.num_chunks, H, triton.cdiv(P, block_p) * triton.cdiv(N, block_n))
    _chunk_state_fwd_kernel[grid](
        u, v, dt_out, dA_cs, out, layout.starts, layout.lengths,
        H, P, N, H // G,
        u.stride(0), u.stride(1), u.stride(2), v.stride(0), v.stride(1), v.stride(2),
        CHUNK=layout.chunk_size, BLOCK_P=block_p, BLOCK_N=block_n,
        FOR_BWD=for_bwd, DOT_PREC=dot_precision(u.dtype),
    )
    return out
