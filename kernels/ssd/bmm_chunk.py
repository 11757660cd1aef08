"""SSD stage 3b: the in-chunk products C_t . B_s, once per chunk and group (not per head).

Shape legend: L packed tokens, G groups, N dstate, T chunks, Q chunk_size.

Per chunk c and group g, for steps t, s of the chunk (s <= t)::

    CB[c, g, t, s] = C_{start_c + t, g} . B_{start_c + s, g}

The heads of a group share B and C, so the chunk scan (forward) and its backward read tiles of
this (T, G, Q, Q) tensor instead of recomputing the product for every head and headdim block.
Only the causal part inside the chunk is defined: tiles wholly above the diagonal are never
written, and in the written tiles entries with s > t, or with t or s at or past the chunk's
length, are unspecified. Readers load with a causal and length mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs
from streamssm.kernels.ssd.chunk_state import dot_precision
from streamssm.kernels.ssd.chunks import ChunkLayout

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3), (32, 64, 4, 3)]
]


@triton.autotune(configs=autotune_configs(_CONFIGS, triton.Config({"BLOCK_M": 16, "BLOCK_K": 16})),
                 key=["N", "CHUNK", "DOT_PREC"])
@triton.jit
def _chunk_cb_fwd_kernel(
    # pointers
    p_C, p_B,  # (L, G, N)
    p_cb,  # (T, G, Q, Q) out
    p_cstart, p_clen,  # (T,) first token and length of each chunk
    # dimensions
    G, N,
    # strides
    s_c_l, s_c_g, s_c_n, s_b_l, s_b_g, s_b_n,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (chunks, groups, square BLOCK_M tiles of the chunk): one (t, s) tile per program."""
    i_c, i_g, i_ts = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_b = tl.cdiv(CHUNK, BLOCK_M)
    i_t, i_s = i_ts // num_b, i_ts % num_b
    if i_s > i_t:  # above the diagonal: never read
        return
    clen = tl.load(p_clen + i_c)
    t0 = i_t * BLOCK_M
    if t0 >= clen:
        return
    start = tl.load(p_cstart + i_c)
    o_t = t0 + tl.arange(0, BLOCK_M)
    o_s = i_s * BLOCK_M + tl.arange(0, BLOCK_M)
    m_t, m_s = o_t < clen, o_s < clen
    tok_t, tok_s = start + o_t, start + o_s
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < N
        b_C = tl.load(p_C + tok_t[:, None] * s_c_l + i_g * s_c_g + o_k[None, :] * s_c_n,
                      mask=m_t[:, None] & m_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b_Bt = tl.load(p_B + tok_s[None, :] * s_b_l + i_g * s_b_g + o_k[:, None] * s_b_n,
                       mask=m_k[:, None] & m_s[None, :], other=0.0)  # (BLOCK_K, BLOCK_M)
        acc += tl.dot(b_C, b_Bt.to(b_C.dtype), input_precision=DOT_PREC)
    o_cb = ((i_c.to(tl.int64) * G + i_g) * CHUNK + o_t[:, None]) * CHUNK + o_s[None, :]
    tl.store(p_cb + o_cb, acc.to(p_cb.dtype.element_ty), mask=m_t[:, None] & m_s[None, :])


def _chunk_cb_fwd(C: torch.Tensor, B: torch.Tensor, layout: ChunkLayout, dtype: torch.dtype) -> torch.Tensor:
    """C, B (L, G, N) -> CB (T, G, Q, Q) in ``dtype`` (fp32 accumulation, exact products of fp32
    inputs; causal part only, see the module docstring). The forward stores x's dtype (half-width
    products in bf16/fp16 runs); the backward recomputes them in fp32."""
    G, N = C.shape[1], C.shape[2]
    T, Q = layout.num_chunks, layout.chunk_size
    cb = torch.empty(T, G, Q, Q, device=C.device, dtype=dtype)

    def grid(meta):
        return (T, G, triton.cdiv(Q, meta["BLOCK_M"]) ** 2)

    _chunk_cb_fwd_kernel[grid](
        C, B, cb, layout.starts, layout.lengths,
        G, N,
        C.stride(0), C.stride(1), C.stride(2), B.stride(0), B.stride(1), B.stride(2),
        CHUNK=Q, DOT_PREC=dot_precision(C.dtype),
    )
    return cb


def chunk_cb_ref(C: torch.Tensor, B: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Reference of :func:`_chunk_cb_fwd`: CB (T, G, Q, Q) in C's dtype promoted to at least fp32,
    zero wherever the kernel leaves it unspecified (s > t, or past the chunk's length)."""
    cd = torch.promote_types(C.dtype, torch.float32)
    T, Q = layout.num_chunks, layout.chunk_size
    G = C.shape[1]
    cb = torch.zeros(T, G, Q, Q, device=C.device, dtype=cd)
    for c, (start, length) in enumerate(zip(layout.starts.tolist(), layout.lengths.tolist())):
        Cc = C[start:start + length].to(cd).transpose(0, 1)  # (G, len, N)
        Bc = B[start:start + length].to(cd).transpose(0, 1)  # (G, len, N)
        cb[c, :, :length, :length] = torch.tril(Cc @ Bc.transpose(1, 2))  # (G, len, len)
    return cb
