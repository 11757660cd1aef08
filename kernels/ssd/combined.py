"""Mamba-2 SSD chunked scan in Triton: forward/backward launch sequences (registered as the
``streamssm::ssd_scan_*`` ops in ``kernels/library.py``) and the entry point ``ssd_scan_triton``.

Shape legend: b batch, l length, h heads, p headdim, g groups, n dstate; L = b*l packed
tokens, T chunks, S sequences (b rows, or len(cu_seqlens) - 1 packed sequences).

Forward: chunk_cumsum (dt, in-chunk decay cumsum), then either the one-pass forward saving the
chunk states (ssd/fused_fwd.py; many sequences x heads) or: chunk_state (each chunk's own state)
-> state_passing (states entering each chunk, final states) -> bmm_chunk (C_t . B_s once per
chunk and group, (T, g, Q, Q)) -> chunk_scan (outputs, reading those products per head).
Backward keeps the per-chunk entering states (T, h, p, n) fp32 and the (T, h, Q) dt/decay
tables, so memory is O(L*h*p + T*h*p*n), never O(L*h*p*n); it recomputes the products
C_t . B_s (one small kernel) rather than keeping them between the passes, in fp32 (the forward
stores them in x's dtype).
"""

from __future__ import annotations

import torch

from streamssm.kernels.ssd.bmm_chunk import _chunk_cb_fwd
from streamssm.kernels.ssd.chunk_cumsum import _chunk_cumsum_bwd, _chunk_cumsum_fwd
from streamssm.kernels.ssd.chunk_scan import _chunk_scan_fwd
from streamssm.kernels.ssd.chunk_scan_bwd import _chunk_scan_bwd
from streamssm.kernels.ssd.chunk_state import _chunk_state_fwd
from streamssm.kernels.ssd.chunks import chunk_layout, packed_rows
from streamssm.kernels.ssd.fused_fwd import saves_for_backward, ssd_fused_fwd_saving
from streamssm.kernels.ssd.skip import packed_skip
from streamssm.kernels.ssd.state_passing import _state_passing_bwd, _state_passing_fwd


def _ssd_scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus, cu_seqlens, w=None):
    """Forward launches (w (b, l, h): input weights in place of dt, or None). Returns out
    (b, l, h, p) gated, final (S, h, p, n) fp32 and what the backward keeps: dt_out (the input
    weights), dA_cs (T, h, Q) fp32, the states entering each chunk (T, h, p, n) fp32, and the
    ungated y (L, h, p) when z is given (else None). Where the one-pass forward pays
    (``saves_for_backward``: many sequences x heads, or short ones) it computes out, final, the
    states and y in one kernel; otherwise the split launches below."""
    b, l, h, p = x.shape
    layout = chunk_layout(b, l, chunk_size, cu_seqlens, x.device)
    dt2, w2 = packed_rows(dt), packed_rows(w)  # (L, h)
    dt_out, dA_cs = _chunk_cumsum_fwd(dt2, A.contiguous(), dt_bias, dt_softplus, layout, w2)  # (T, h, Q)
    if saves_for_backward(layout.num_seqs, h, l, chunk_size):  # it packs its inputs itself
        out, final, states, y = ssd_fused_fwd_saving(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus,
                                                     cu_seqlens, w, layout)
        return out, final, dt_out, dA_cs, states, y
    x2, B2, C2, z2 = (packed_rows(t) for t in (x, B, C, z))  # (L, h, p), (L, g, n)
    D2 = packed_skip(D)  # per token: (1, L, h)
    init = initial_state.float().contiguous() if initial_state is not None else None
    states = _chunk_state_fwd(x2, B2, dt_out, dA_cs, layout)  # (T, h, p, n)
    final = _state_passing_fwd(states, dA_cs, init, layout)  # states: entering each chunk now
    cb = _chunk_cb_fwd(C2, B2, layout, x.dtype)  # (T, g, Q, Q)
    y, out = _chunk_scan_fwd(x2, C2, cb, z2, D2, dt_out, dA_cs, states, layout)  # (L, h, p)
    return out.view(b, l, h, p), final, dt_out, dA_cs, states, (y if z is not None else None)


def _ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_out, dA_cs, prev_states, y, chunk_size,
                  dt_softplus, cu_seqlens, has_init, w=None):
    """Backward launches from the forward's kept tensors. Returns dx, ddt, dA, dB, dC, dD, dz,
    ddt_bias, dinit, dw shaped like their inputs (dz, dinit, dw None without z, initial state, w);
    dB and dC may be fp32 (the caller casts them, after this function's temporaries are freed)."""
    b, l, h, p = x.shape
    layout = chunk_layout(b, l, chunk_size, cu_seqlens, x.device)
    x2, dt2, B2, C2, z2, w2 = (packed_rows(t) for t in (x, dt, B, C, z, w))
    D2 = packed_skip(D)  # per token: (1, L, h)
    L = x2.shape[0]
    dout = dout.reshape(L, h, p)
    dz = None
    if z2 is not None:
        zf, df = z2.float(), dout.float()
        sig = torch.sigmoid(zf)
        dz = (df * y.float() * sig * (1 + zf * (1 - sig))).to(z2.dtype).view(x.shape)
        dy = (df * zf * sig).to(dout.dtype)
    else:
        dy = dout if dout.stride(-1) == 1 else dout.contiguous()
    dstates = _chunk_state_fwd(dy, C2, dt_out, dA_cs, layout, for_bwd=True)  # (T, h, p, n)
    ddA_last, dinit = _state_passing_bwd(dstates, prev_states, dA_cs,
                                         dfinal.float() if dfinal is not None else None, has_init, layout)
    cb = _chunk_cb_fwd(C2, B2, layout, torch.float32)  # (T, g, Q, Q): fp32 keeps dA accurate in bf16 runs
    dx, dB, dC, ddA_cs, ddt_direct, dD = _chunk_scan_bwd(
        x2, B2, C2, cb, dy, D2, dt_out, dA_cs, prev_states, dstates, ddA_last, layout)
    ddt, dA, ddt_bias, dw = _chunk_cumsum_bwd(ddA_cs, ddA_last, ddt_direct, dt2, A, dt_bias, dt_softplus,
                                              dt_out, layout, w2)
    return (dx.view(x.shape), ddt.view(dt.shape), dA, dB.view(B.shape), dC.view(C.shape),
            None if dD is None else dD.view(D.shape), dz,
            ddt_bias, dinit, None if dw is None else dw.view(w.shape))


def ssd_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_final_state: bool = False,
    input_weight: torch.Tensor | None = None,
):
    """Mamba-2 SSD scan (semantics of ``ssd/reference.py``), differentiable in every tensor input.

    x, z: (b, l, h, p); dt, input_weight: (b, l, h); A: (h,) fp32; B, C: (b, l, g, n); D: (h,),
    (h, p) or per token (b, l, h) fp32; dt_bias: (h,) fp32; initial_state: (b, h, p, n) fp32, or (num_seqs, h, p, n)
    with ``cu_seqlens`` (num_seqs + 1,) int (batch 1). Inputs are validated by
    ``streamssm.kernels.ssd_scan``. Returns y (b, l, h, p) in x's dtype [, final_state fp32
    shaped like initial_state].
    """
    from streamssm.kernels.library import ssd_scan_op

    y, final = ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus, cu_seqlens,
                           input_weight)
    return (y, final) if return_final_state else y
