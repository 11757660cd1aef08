"""SSD stage 3: carry the state across the chunks of each sequence, forward and backward.

Shape legend: H heads, P headdim, N dstate, T chunks, S sequences.

Forward, per sequence, from its initial state (zeros when absent), in place over ``states``::

    S_in[c]  = S                                  (state entering chunk c, overwrites states[c])
    S        = exp(Acs_last[c]) * S + states[c]
    final    = S after the sequence's last chunk

Backward, from the final state's gradient, in place over ``dstates`` (which holds the
per-chunk ``sum_t exp(Acs_t) dy_t C_t^T``)::

    dS_out[c]       = dS                          (gradient of the state leaving chunk c)
    dAcs_last[c]   += exp(Acs_last[c]) * <dS, S_in[c]>
    dS              = exp(Acs_last[c]) * dS + dstates[c]
    d initial_state = dS after the sequence's first chunk
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamssm.kernels.ssd.chunks import ChunkLayout


@triton.jit
def _chunk_decay_and_block(p_blocks, p_dA_cs, p_clen, c, valid, i_h, o, m, H, PN, CHUNK: tl.constexpr):
    """(exp(Acs_last) of chunk c, block ``o`` of p_blocks[c, i_h]); zeros where not ``valid``."""
    clen = tl.load(p_clen + c, mask=valid, other=1)
    a_last = tl.load(p_dA_cs + (c * H + i_h) * CHUNK + clen - 1, mask=valid, other=0.0)
    b_blk = tl.load(p_blocks + (c * H + i_h) * PN + o, mask=m & valid, other=0.0)
    return tl.exp(a_last), b_blk


@triton.jit
def _sequence_program(p_edge, p_seqoff, H, PN, BLOCK: tl.constexpr, HAS_EDGE: tl.constexpr):
    """Grid (blocks of P*N, heads, sequences). Returns the head, the block's offsets o (BLOCK,)
    and mask m, its offsets o_seq into (S, H, P*N) arrays, the sequence's edge state from
    p_edge (initial state forward, final-state gradient backward; zeros unless HAS_EDGE) and the
    sequence's chunks [c0, c1) (int64)."""
    i_h, i_s = tl.program_id(1), tl.program_id(2)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < PN
    o_seq = (i_s.to(tl.int64) * H + i_h) * PN + o
    if HAS_EDGE:
        b_edge = tl.load(p_edge + o_seq, mask=m, other=0.0)
    else:
        b_edge = tl.zeros((BLOCK,), dtype=tl.float32)
    c0 = tl.load(p_seqoff + i_s).to(tl.int64)
    c1 = tl.load(p_seqoff + i_s + 1).to(tl.int64)
    return i_h, o, m, o_seq, b_edge, c0, c1


@triton.jit
def _state_passing_fwd_kernel(
    # pointers
    p_states,  # (T, H, P*N) fp32 in: chunk states, out: states entering each chunk
    p_init,  # (S, H, P*N) fp32 or dummy
    p_final,  # (S, H, P*N) fp32 out
    p_dA_cs,  # (T, H, Q) fp32
    p_clen,  # (T,) int32
    p_seqoff,  # (S + 1,) int32
    # dimensions
    H, PN,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr,
):
    i_h, o, m, o_seq, b_s, c0, c1 = _sequence_program(p_init, p_seqoff, H, PN, BLOCK, HAS_INIT)
    # loads run one chunk ahead of the carried state (they do not depend on it)
    b_decay, b_cs = _chunk_decay_and_block(p_states, p_dA_cs, p_clen, c0, c0 < c1, i_h, o, m, H, PN, CHUNK)
    for c in range(c0, c1):
        b_decay_n, b_cs_n = _chunk_decay_and_block(p_states, p_dA_cs, p_clen, c + 1, c + 1 < c1, i_h, o, m, H, PN,
                                                   CHUNK)
        tl.store(p_states + (c * H + i_h) * PN + o, b_s, mask=m)
        b_s = b_decay * b_s + b_cs
        b_decay, b_cs = b_decay_n, b_cs_n
    tl.store(p_final + o_seq, b_s, mask=m)


@triton.jit
def _state_passing_bwd_kernel(
    # pointers
    p_dstates,  # (T, H, P*N) fp32 in: per-chunk output gradients, out: gradient of each chunk's end state
    p_prev,  # (T, H, P*N) fp32 states entering each chunk
    p_dfinal,  # (S, H, P*N) fp32 or dummy
    p_dinit,  # (S, H, P*N) fp32 out or dummy
    p_ddA_part,  # (T, H, NB) fp32 out: per-block parts of the chunk-end decay gradient
    p_dA_cs, p_clen, p_seqoff,
    # dimensions
    H, PN,
    # meta-parameters
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr,
):
    i_h, o, m, o_seq, b_ds, c0, c1 = _sequence_program(p_dfinal, p_seqoff, H, PN, BLOCK, HAS_DFINAL)
    i_b, num_b = tl.program_id(0), tl.num_programs(0)
    c = c1 - 1
    b_decay, b_dcs = _chunk_decay_and_block(p_dstates, p_dA_cs, p_clen, c, c >= c0, i_h, o, m, H, PN, CHUNK)
    b_prev = tl.load(p_prev + (c * H + i_h) * PN + o, mask=m & (c >= c0), other=0.0)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        # loads run one chunk ahead (behind, in time) of the carried gradient
        b_decay_n, b_dcs_n = _chunk_decay_and_block(p_dstates, p_dA_cs, p_clen, c - 1, c - 1 >= c0, i_h, o, m,
                                                    H, PN, CHUNK)
        b_prev_n = tl.load(p_prev + ((c - 1) * H + i_h) * PN + o, mask=m & (c - 1 >= c0), other=0.0)
        tl.store(p_dstates + (c * H + i_h) * PN + o, b_ds, mask=m)
        tl.store(p_ddA_part + (c * H + i_h) * num_b + i_b, b_decay * tl.sum(b_ds * b_prev))
        b_ds = b_decay * b_ds + b_dcs
        b_decay, b_dcs, b_prev = b_decay_n, b_dcs_n, b_prev_n
    if HAS_DINIT:
        tl.store(p_dinit + o_seq, b_ds, mask=m)


def _grid(PN: int, H: int, S: int) -> tuple[int, tuple[int, int, int]]:
    block = min(1024, max(16, triton.next_power_of_2(PN)))
    return block, (triton.cdiv(PN, block), H, S)


def _state_passing_fwd(states: torch.Tensor, dA_cs: torch.Tensor, initial_state: torch.Tensor | None,
                       layout: ChunkLayout) -> torch.Tensor:
    """states (T, H, P, N) fp32, rewritten in place to the states entering each chunk.

    Returns the final state of each sequence (S, H, P, N) fp32.
    """
    T, H, P, N = states.shape
    final = torch.empty(layout.num_seqs, H, P, N, device=states.device, dtype=torch.float32)
    init = initial_state.contiguous() if initial_state is not None else None
    block, grid = _grid(P * N, H, layout.num_seqs)
    _state_passing_fwd_kernel[grid](
        states, init if init is not None else final, final, dA_cs, layout.lengths, layout.seq_offsets,
        H, P * N, CHUNK=layout.chunk_size, BLOCK=block, HAS_INIT=init is not None, num_warps=4,
    )
    return final


def _state_passing_bwd(dstates: torch.Tensor, prev_states: torch.Tensor, dA_cs: torch.Tensor,
                       dfinal: torch.Tensor | None, need_dinit: bool,
                       layout: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewrite ``dstates`` (T, H, P, N) in place to the gradients of each chunk's end state.

    Returns (gradient of each chunk's end decay cumsum (T, H) fp32, d initial_state or None).
    """
    T, H, P, N = dstates.shape
    dinit = torch.empty(layout.num_seqs, H, P, N, device=dstates.device, dtype=torch.float32) if need_dinit else None
    dfin = dfinal.contiguous() if dfinal is not None else None
    block, grid = _grid(P * N, H, layout.num_seqs)
    ddA_part = torch.zeros(T, H, grid[0], device=dstates.device, dtype=torch.float32)
    _state_passing_bwd_kernel[grid](
        dstates, prev_states, dfin if dfin is not None else dstates, dinit if dinit is not None else dstates,
        ddA_part, dA_cs, layout.lengths, layout.seq_offsets,
        H, P * N, CHUNK=layout.chunk_size, BLOCK=block,
        HAS_DFINAL=dfin is not None, HAS_DINIT=dinit is not None, num_warps=4,
    )
    return ddA_part.sum(-1), dinit
