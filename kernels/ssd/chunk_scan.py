"""SSD stage 4: outputs of each chunk from the state entering it plus the in-chunk (causal) part.

Shape legend: L packed tokens, H heads, G groups, P headdim, N dstate, T chunks, Q chunk_size.

Per chunk and head, for steps t of the chunk, with S_in the state entering the chunk::

    y_t = exp(Acs_t) * S_in C_t + sum_{s <= t} (C_t . B_s) exp(Acs_t - Acs_s) dt_s x_s + D * x_t
    out_t = y_t * silu(z_t)                                        (when z is given)

The products C_t . B_s come precomputed per chunk and group (``bmm_chunk.py``, CB (T, G, Q, Q));
this kernel reads their causal part and applies the decay, dt and the mask. The ungated ``y``
is kept for the gate's backward when z is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs
from streamssm.kernels._triton import silu
from streamssm.kernels.ssd.chunk_state import dot_precision
from streamssm.kernels.ssd.chunks import ChunkLayout
from streamssm.kernels.ssd.skip import skip_kind, skip_weight

#: (BLOCK_T output rows, BLOCK_I source steps per inner-loop tile, warps, stages). Row tiles of 64+
#: feed Hopper's warpgroup MMA (m64); the S1 forward with 32 x 32 tiles ran at half mamba-ssm's speed.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_I": bs}, num_warps=w, num_stages=st)
    for bt, bs, w, st in [(64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3),
                          (32, 32, 4, 2)]
]


# interpreter: row and source tiles of different sizes, so the tests cover both orders of the two
@triton.autotune(configs=autotune_configs(_CONFIGS, triton.Config({"BLOCK_T": 16, "BLOCK_I": 32})),
                 key=["P", "N", "CHUNK", "HAS_Z", "DOT_PREC"])
@triton.jit
def _chunk_scan_fwd_kernel(
    # pointers
    p_x,  # (L, H, P)
    p_C,  # (L, G, N)
    p_cb,  # (T, G, Q, Q) C_t . B_s, causal part (bmm_chunk.py)
    p_z,  # (L, H, P) or dummy
    p_D,  # (H,), (H, P) or (L, H) fp32 (skip.py), or dummy
    p_dt_out, p_dA_cs,  # (T, H, Q) fp32
    p_states,  # (T, H, P, N) fp32 states entering each chunk
    p_y,  # (L, H, P) out: ungated output
    p_out,  # (L, H, P) out: gated output (when HAS_Z)
    p_cstart, p_clen,
    # dimensions
    H, G, P, N, heads_per_group,
    # strides
    s_x_l, s_x_h, s_x_p, s_c_l, s_c_g, s_c_n, s_z_l, s_z_h, s_z_p,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    D_KIND: tl.constexpr, HAS_Z: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # the chunks' last row blocks (the most work: rows t read columns s <= t) start first, not last
    i_c, i_h, i_tp = tl.program_id(0), tl.program_id(1), tl.num_programs(2) - 1 - tl.program_id(2)
    num_pb = tl.cdiv(P, BLOCK_P)
    i_t, i_p = i_tp // num_pb, i_tp % num_pb
    clen = tl.load(p_clen + i_c)
    t0 = i_t * BLOCK_T
    if t0 >= clen:
        return
    start = tl.load(p_cstart + i_c)
    i_g = i_h // heads_per_group
    base = (i_c.to(tl.int64) * H + i_h) * CHUNK
    o_t = t0 + tl.arange(0, BLOCK_T)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_t, m_p, m_n = o_t < clen, o_p < P, o_n < N
    tok_t = start + o_t
    b_acs_t = tl.load(p_dA_cs + base + o_t, mask=m_t, other=0.0)
    b_C = tl.load(p_C + tok_t[:, None] * s_c_l + i_g * s_c_g + o_n[None, :] * s_c_n,
                  mask=m_t[:, None] & m_n[None, :], other=0.0)  # (BLOCK_T, BLOCK_N)
    # state entering the chunk, transposed: (BLOCK_N, BLOCK_P)
    b_S = tl.load(p_states + ((i_c.to(tl.int64) * H + i_h) * P + o_p[None, :]) * N + o_n[:, None],
                  mask=m_n[:, None] & m_p[None, :], other=0.0)
    # state in the inputs' dtype for the product (bf16 runs: like the peers; fp32 runs: exact)
    acc = tl.dot(b_C, b_S.to(b_C.dtype), input_precision=DOT_PREC) * tl.exp(b_acs_t)[:, None]
    p_cb_c = p_cb + (i_c.to(tl.int64) * G + i_g) * CHUNK * CHUNK + o_t[:, None] * CHUNK  # rows t
    for s0 in range(0, tl.minimum(t0 + BLOCK_T, clen), BLOCK_I):
        o_s = s0 + tl.arange(0, BLOCK_I)
        m_s = o_s < clen
        tok_s = start + o_s
        causal = (o_t[:, None] >= o_s[None, :]) & m_s[None, :]
        b_cb = tl.load(p_cb_c + o_s[None, :], mask=causal & m_t[:, None], other=0.0).to(tl.float32)  # (t, s)
        b_acs_s = tl.load(p_dA_cs + base + o_s, mask=m_s, other=0.0)
        b_dt_s = tl.load(p_dt_out + base + o_s, mask=m_s, other=0.0)
        b_cb *= tl.exp(tl.where(causal, b_acs_t[:, None] - b_acs_s[None, :], float("-inf"))) * b_dt_s[None, :]
        b_x = tl.load(p_x + tok_s[:, None] * s_x_l + i_h * s_x_h + o_p[None, :] * s_x_p,
                      mask=m_s[:, None] & m_p[None, :], other=0.0)  # (BLOCK_I, BLOCK_P)
        acc += tl.dot(b_cb.to(b_x.dtype), b_x, input_precision=DOT_PREC)
    m_tp = m_t[:, None] & m_p[None, :]
    if D_KIND != 0:
        b_xt = tl.load(p_x + tok_t[:, None] * s_x_l + i_h * s_x_h + o_p[None, :] * s_x_p, mask=m_tp, other=0.0)
        acc += b_xt.to(tl.float32) * skip_weight(p_D, tok_t, m_t, i_h, o_p, m_p, H, P, D_KIND)
    o_y = tok_t[:, None] * (H * P) + i_h * P + o_p[None, :]
    tl.store(p_y + o_y, acc.to(p_y.dtype.element_ty), mask=m_tp)
    if HAS_Z:
        b_z = tl.load(p_z + tok_t[:, None] * s_z_l + i_h * s_z_h + o_p[None, :] * s_z_p, mask=m_tp, other=0.0)
        b_z = b_z.to(tl.float32)
        tl.store(p_out + o_y, (acc * silu(b_z)).to(p_out.dtype.element_ty), mask=m_tp)


def _chunk_scan_fwd(x: torch.Tensor, C: torch.Tensor, cb: torch.Tensor, z: torch.Tensor | None,
                    D: torch.Tensor | None, dt_out: torch.Tensor, dA_cs: torch.Tensor, states: torch.Tensor,
                    layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """x, z (L, H, P); C (L, G, N); cb (T, G, Q, Q) from ``_chunk_cb_fwd``. Returns (y ungated,
    out gated) (L, H, P) in x's dtype; ``out is y`` without z."""
    L, H, P = x.shape
    G, N = C.shape[1], C.shape[2]
    y = torch.empty(L, H, P, device=x.device, dtype=x.dtype)
    out = torch.empty_like(y) if z is not None else y
    block_p = max(16, min(64, triton.next_power_of_2(P)))
    block_n = max(16, triton.next_power_of_2(N))

    def grid(meta):
        return (layout.num_chunks, H, triton.cdiv(layout.chunk_size, meta["BLOCK_T"]) * triton.cdiv(P, block_p))

    zz = z if z is not None else x
    _chunk_scan_fwd_kernel[grid](
        x, C, cb, zz, D if D is not None else dt_out, dt_out, dA_cs, states, y, out,
        layout.starts, layout.lengths,
        H, G, P, N, H // G,
        x.stride(0), x.stride(1), x.stride(2),
        C.stride(0), C.stride(1), C.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        CHUNK=layout.chunk_size, BLOCK_P=block_p, BLOCK_N=block_n,
        D_KIND=skip_kind(D), HAS_Z=z is not None,
        DOT_PREC=dot_precision(x.dtype),
    )
    return y, out
