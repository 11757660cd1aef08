"""SSD forward in one pass: each program carries its sequence's state through the chunks in
registers, so no per-chunk state goes to memory for inference, and for training only the state
entering each of the backward's chunks (written once, where the split forward writes, rewrites
and reads it again).

Shape legend: L packed tokens, H heads, G groups, P headdim, N dstate, S sequences, Q the
kernel's chunk (``BLOCK_Q`` tokens, autotuned; results do not depend on it beyond rounding).

The split forward (``combined.py``) writes each chunk's state (T, H, P, N) fp32, rewrites it in
the state passing and reads it again in the chunk scan: with the models' 64-token chunks that
is ~4 GB per layer at 384 streams x 320 samples, more traffic than everything else the layer
moves. Here one program per (P block, head, sequence) walks the sequence's chunks in order;
per chunk, with S the state entering it and Acs the in-chunk decay cumsum::

    dt_t   = softplus(dt_t + dt_bias)                              (bias and softplus optional)
    y_t    = exp(Acs_t) * S C_t + sum_{s <= t} (C_t . B_s) exp(Acs_t - Acs_s) dt_s x_s + D * x_t
    out_t  = y_t * silu(z_t)                                       (when z is given)
    S      = exp(Acs_last) * S + sum_s exp(Acs_last - Acs_s) dt_s x_s B_s^T

Parallel over sequences x heads only, so it pays when there are many of them or the sequences
are short (serving: hundreds of streams x a few chunks); long training-shape sequences keep the
split forward (``use_fused_forward``). A training forward (``ssd_fused_fwd_saving``, SAVE) also
writes the chunk states and the ungated output the backward of ``combined.py`` reads. H100, bf16
(``benchmarks/bench_ssd_fused.py``): 384 streams x 320 tokens with carried states in 1.06 ms,
2.2x the split forward and 1.8-2.0x mamba-ssm's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from streamssm.kernels._common import autotune_configs
from streamssm.kernels._triton import silu, softplus
from streamssm.kernels.ssd.chunk_state import dot_precision
from streamssm.kernels.ssd.chunks import ChunkLayout, packed_rows
from streamssm.kernels.ssd.skip import fixed_skip_weight, packed_skip, skip_kind, skip_weight

#: sequences x heads from which the fused forward is used at any length; below it only short
#: sequences (at most ``FUSED_MAX_SHORT_LEN`` tokens). H100 (bench_ssd_fused.py, 2026-12-06): at
#: S1 (8 x 24 = 192 sequence-heads of 4,096 tokens) it took 0.50 ms vs the split forward's 0.65;
#: S2 (64) and S3 (8) were not measured and keep the split forward
FUSED_MIN_PROGRAMS = 128
FUSED_MAX_SHORT_LEN = 1024

#: (BLOCK_Q chunk tokens, BLOCK_P headdim slice, warps, stages): the (N, P) state, the (Q, N) C and
#: B tiles and the (Q, Q) products share the registers. Narrow P slices recompute C.B^T. Spills per
#: thread (benchmarks/ssd_registers.py, sm_90, N 128, training / serving variant): none at (32, 32, 8
#: warps) and (32, 16, 4); 0.9-1.1 KB at (32, 64, 4), the autotuner's pick at S1 and at 2^8-2^13
#: serving sequence-heads (H100, 2026-12-07), 0.16 KB at (32, 64, 8); 0.8-2.8 KB at 64 x 64.
_CONFIGS = [
    triton.Config({"BLOCK_Q": bq, "BLOCK_P": bp}, num_warps=w, num_stages=st)
    for bq, bp, w, st in [(64, 64, 8, 1), (64, 32, 8, 1), (32, 32, 8, 1), (32, 16, 4, 1), (32, 64, 4, 1),
                          (16, 32, 4, 1), (64, 64, 4, 1), (32, 32, 8, 2), (32, 64, 8, 1), (16, 64, 4, 1)]
]


# interpreter: 32-token chunks and 16-wide headdim slices, so short test sequences cross both.
# Autotuning reruns the kernel: a state pool updated in place (p_init is p_final) is restored.
@triton.autotune(configs=autotune_configs(_CONFIGS, triton.Config({"BLOCK_Q": 32, "BLOCK_P": 16})),
                 key=["P", "N", "HAS_Z", "HAS_INIT", "DOT_PREC", "SAVE", "work_log2"], restore_value=["p_init"])
@triton.jit
def _ssd_fused_fwd_kernel(
    # pointers
    p_x,  # (L, H, P)
    p_dt,  # (L, H) raw step sizes
    p_w,  # (L, H) input weights, or dummy (then the processed dt)
    p_A,  # (H,) fp32
    p_B, p_C,  # (L, G, N)
    p_D,  # (H,), (H, P) or (L, H) fp32 (skip.py), or dummy
    p_z,  # (L, H, P) or dummy
    p_dt_bias,  # (H,) fp32 or dummy
    p_init,  # (S, H, P, N) fp32, a state pool (R, H, P, N) fp32 with p_rows, or dummy
    p_out,  # (L, H, P) out
    p_final,  # (S, H, P, N) fp32 out, or the pool (p_init) with p_rows
    p_bounds,  # (S + 1,) int token bounds of packed sequences, or dummy
    p_rows,  # (S,) int64 pool rows of the sequences' states, or dummy
    p_states,  # SAVE: (T, H, P, N) fp32 out, the state entering each CHUNK-token chunk; else dummy
    p_seqoff,  # SAVE: (S + 1,) int32 first chunk of each sequence (chunks.py); else dummy
    p_y,  # SAVE with z: (L, H, P) out, the ungated output; else dummy
    # dimensions; work_log2 = round(log2(sequences x heads)) only keys the autotuning (a few
    # streams and a thousand want different tiles)
    seq_len, H, P, N, heads_per_group, work_log2,
    # strides
    s_x_l, s_x_h, s_x_p, s_dt_l, s_dt_h, s_w_l, s_w_h, s_b_l, s_b_g, s_b_n, s_c_l, s_c_g, s_c_n, s_z_l, s_z_h, s_z_p,
    # meta-parameters
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BOUNDS: tl.constexpr, HAS_INIT: tl.constexpr, D_KIND: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ROWS: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
):
    i_p, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_g = i_h // heads_per_group
    if HAS_BOUNDS:
        start = tl.load(p_bounds + i_s).to(tl.int64)
        end = tl.load(p_bounds + i_s + 1).to(tl.int64)
    else:
        start = i_s.to(tl.int64) * seq_len
        end = start + seq_len
    o_q = tl.arange(0, BLOCK_Q)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < P, o_n < N
    m_np = m_n[:, None] & m_p[None, :]
    if HAS_ROWS:  # the sequence's state lives in a pool row, read here and overwritten at the end
        i_row = tl.load(p_rows + i_s).to(tl.int64)
    else:
        i_row = i_s.to(tl.int64)
    # the state transposed, (BLOCK_N, BLOCK_P): both its products then need no transposition
    o_state = ((i_row * H + i_h) * P + o_p[None, :]) * N + o_n[:, None]
    if HAS_INIT:
        b_S = tl.load(p_init + o_state, mask=m_np, other=0.0)
    else:
        b_S = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    b_A = tl.load(p_A + i_h)
    if HAS_DT_BIAS:
        b_bias = tl.load(p_dt_bias + i_h)
    if D_KIND == 1 or D_KIND == 2:  # per head or channel: loaded once
        b_D = fixed_skip_weight(p_D, i_h, o_p, m_p, P, D_KIND)
    causal = o_q[:, None] >= o_q[None, :]
    # per-tile offsets stay int32 (64-bit pointer tiles cost two registers an element): the
    # chunk's first token moves scalar base pointers instead
    o_x = o_q[:, None] * s_x_l + o_p[None, :] * s_x_p  # (BLOCK_Q, BLOCK_P)
    o_z = o_q[:, None] * s_z_l + o_p[None, :] * s_z_p
    o_out = o_q[:, None] * (H * P) + o_p[None, :]
    o_C = o_q[:, None] * s_c_l + o_n[None, :] * s_c_n  # (BLOCK_Q, BLOCK_N)
    o_Bt = o_q[None, :] * s_b_l + o_n[:, None] * s_b_n  # (BLOCK_N, BLOCK_Q)
    if SAVE:
        first_chunk = tl.load(p_seqoff + i_s).to(tl.int64)
    for t0 in range(start, end, BLOCK_Q):
        if SAVE:  # for the backward (CHUNK is a multiple of BLOCK_Q): the state entering each of its chunks
            if (t0 - start) % CHUNK == 0:
                o_c = first_chunk + (t0 - start) // CHUNK
                tl.store(p_states + ((o_c * H + i_h) * P + o_p[None, :]) * N + o_n[:, None], b_S, mask=m_np)
        m_q = o_q < end - t0
        m_qp = m_q[:, None] & m_p[None, :]
        b_dt = tl.load(p_dt + t0 * s_dt_l + i_h * s_dt_h + o_q * s_dt_l, mask=m_q, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            b_dt += b_bias
        if DT_SOFTPLUS:
            b_dt = softplus(b_dt)
        b_dt = tl.where(m_q, b_dt, 0.0)
        b_dA = b_dt * b_A
        if HAS_W:
            b_in = tl.load(p_w + t0 * s_w_l + i_h * s_w_h + o_q * s_w_l, mask=m_q, other=0.0).to(tl.float32)
        else:
            b_in = b_dt
        b_acs = tl.cumsum(b_dA, axis=0)  # (BLOCK_Q,) flat past the sequence's end
        a_last = tl.sum(b_dA, axis=0)
        b_C = tl.load(p_C + t0 * s_c_l + i_g * s_c_g + o_C, mask=m_q[:, None] & m_n[None, :], other=0.0)
        b_Bt = tl.load(p_B + t0 * s_b_l + i_g * s_b_g + o_Bt, mask=m_n[:, None] & m_q[None, :], other=0.0)
        b_x = tl.load(p_x + t0 * s_x_l + i_h * s_x_h + o_x, mask=m_qp, other=0.0)
        # state in the inputs' dtype for the product (bf16 runs: like the split forward; fp32: exact)
        acc = tl.dot(b_C, b_S.to(b_C.dtype), input_precision=DOT_PREC) * tl.exp(b_acs)[:, None]
        b_cb = tl.dot(b_C, b_Bt, input_precision=DOT_PREC)  # (t, s) fp32
        b_cb *= tl.exp(tl.where(causal, b_acs[:, None] - b_acs[None, :], float("-inf"))) * b_in[None, :]
        acc += tl.dot(b_cb.to(b_x.dtype), b_x, input_precision=DOT_PREC)
        if D_KIND == 3:  # per token
            b_D = skip_weight(p_D, t0 + o_q, m_q, i_h, o_p, m_p, H, P, D_KIND)
        if D_KIND != 0:
            acc += b_x.to(tl.float32) * b_D
        if HAS_Z:
            if SAVE:
                tl.store(p_y + t0 * (H * P) + i_h * P + o_out, acc.to(p_y.dtype.element_ty), mask=m_qp)
            b_z = tl.load(p_z + t0 * s_z_l + i_h * s_z_h + o_z, mask=m_qp, other=0.0)
            acc *= silu(b_z.to(tl.float32))
        tl.store(p_out + t0 * (H * P) + i_h * P + o_out, acc.to(p_out.dtype.element_ty), mask=m_qp)
        b_w = tl.exp(a_last - b_acs) * b_in  # (BLOCK_Q,) 0 past the end (masked loads)
        b_Bw = (b_Bt.to(tl.float32) * b_w[None, :]).to(b_x.dtype)
        b_S = b_S * tl.exp(a_last) + tl.dot(b_Bw, b_x, input_precision=DOT_PREC)
    tl.store(p_final + o_state, b_S, mask=m_np)


#: the largest chunk tile any config takes: a training forward's chunk size must be a multiple of it
_LARGEST_TILE = max(config.kwargs["BLOCK_Q"] for config in _ssd_fused_fwd_kernel.configs)


def num_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """S: the batch rows of x (b, l, ...), or the packed sequences of ``cu_seqlens`` (S + 1,)."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def use_fused_forward(num_seqs: int, heads: int, longest: int) -> bool:
    """Whether an inference call of ``num_seqs`` sequences (the longest ``longest`` tokens) of
    ``heads`` heads takes the fused forward (see the thresholds above)."""
    return num_seqs * heads >= FUSED_MIN_PROGRAMS or longest <= FUSED_MAX_SHORT_LEN


def saves_for_backward(num_seqs: int, heads: int, longest: int, chunk_size: int) -> bool:
    """Whether a training forward takes the fused forward (saving the chunk states the backward
    reads): where an inference call would, and every kernel tile divides ``chunk_size``."""
    return chunk_size % _LARGEST_TILE == 0 and use_fused_forward(num_seqs, heads, longest)


def ssd_fused_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                  initial_state: torch.Tensor | None, dt_softplus: bool,
                  cu_seqlens: torch.Tensor | None,
                  input_weight: torch.Tensor | None = None,
                  state_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, z (b, l, h, p); dt, input_weight (b, l, h); B, C (b, l, g, n); initial_state
    (S, h, p, n) fp32 or None; cu_seqlens (S + 1,) with b == 1, or None (S = b). Returns out (b, l, h, p) in x's dtype
    (gated by silu(z) when given) and the final states (S, h, p, n) fp32. No host synchronisation
    (CUDA-graph safe, packed sequences included).

    With ``state_rows`` (S,) int64, ``initial_state`` is a contiguous fp32 state pool (R, h, p, n):
    sequence s starts from row ``state_rows[s]`` and its final state overwrites that row in place
    (no gather or scatter of the pool; the returned final states are the pool). The rows must be
    distinct, except rows whose contents nobody reads (a scratch row for padding)."""
    out, final, _, _ = _launch(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, cu_seqlens, input_weight,
                               state_rows, None)
    return out, final


def ssd_fused_fwd_saving(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                         initial_state: torch.Tensor | None, dt_softplus: bool, cu_seqlens: torch.Tensor | None,
                         input_weight: torch.Tensor | None, layout: ChunkLayout
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`ssd_fused_fwd` for a training forward (see :func:`saves_for_backward`): also returns
    what the split forward keeps for the backward, the states entering each of ``layout``'s chunks
    (T, h, p, n) fp32 and, with z, the ungated output (b*l, h, p) (else None)."""
    return _launch(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, cu_seqlens, input_weight, None, layout)


def _launch(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, cu_seqlens, input_weight, state_rows,
            layout: ChunkLayout | None):
    """One launch of the kernel: out, final, and with ``layout`` the chunk states and ungated y."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x2, dt2, B2, C2, z2, w2 = (packed_rows(t) for t in (x, dt, B, C, z, input_weight))  # (L, h, p), (L, h), (L, g, n)
    seqs = num_sequences(x, cu_seqlens)
    out = torch.empty(b * l, h, p, device=x.device, dtype=x.dtype)
    if state_rows is not None:
        init = final = initial_state
    else:
        final = torch.empty(seqs, h, p, n, device=x.device, dtype=torch.float32)
        init = initial_state.float().contiguous() if initial_state is not None else None
    states = y = None
    if layout is not None:
        states = torch.empty(layout.num_chunks, h, p, n, device=x.device, dtype=torch.float32)
        y = torch.empty_like(out) if z is not None else None
    zz = z2 if z2 is not None else x2
    ww = w2 if w2 is not None else dt2

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), h, seqs)

    _ssd_fused_fwd_kernel[grid](
        x2, dt2, ww, A.contiguous(), B2, C2, packed_skip(D) if D is not None else A, zz,
        dt_bias if dt_bias is not None else A, init if init is not None else final, out, final,
        cu_seqlens if cu_seqlens is not None else final, state_rows if state_rows is not None else final,
        states if states is not None else final, layout.seq_offsets if layout is not None else final,
        y if y is not None else out,
        l, h, p, n, h // g, round(math.log2(seqs * h)) if seqs else 0,
        x2.stride(0), x2.stride(1), x2.stride(2), dt2.stride(0), dt2.stride(1), ww.stride(0), ww.stride(1),
        B2.stride(0), B2.stride(1), B2.stride(2), C2.stride(0), C2.stride(1), C2.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2),
        BLOCK_N=max(16, triton.next_power_of_2(n)),
        HAS_BOUNDS=cu_seqlens is not None, HAS_INIT=init is not None, D_KIND=skip_kind(D),
        HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=dt_softplus, DOT_PREC=dot_precision(x.dtype), HAS_W=input_weight is not None,
        HAS_ROWS=state_rows is not None, SAVE=layout is not None, CHUNK=layout.chunk_size if layout is not None else 1,
    )
    return out.view(b, l, h, p), final, states, y
