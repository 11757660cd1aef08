"""The Triton paths as registered ``torch.library`` ops (namespace ``streamssm``).

torch.compile sees each op as one node (no graph break around a Triton launch) and
torch.export carries it: every op has a fake (shape/dtype-only) implementation, the scans a
registered autograd formula whose backward is itself an op. The pure-PyTorch backends
("torch", "reference") are not ops: compile and export trace straight through them, but for
the C kernels of "torch", which are ops of their own for torch.compile (``kernels/cpu_ops.py``).

    streamssm::selective_scan_fwd / _bwd   Mamba-1 scan (mamba1/scan.py launchers)
    streamssm::ssd_scan_fwd / _bwd         Mamba-2 SSD (ssd/combined.py launch sequences)
    streamssm::ssd_scan_infer              Mamba-2 SSD forward in one pass, no gradients (ssd/fused_fwd.py)
    streamssm::ssd_scan_infer_pool         the same over pool rows of states, mutates state_pool
    streamssm::mamba3_rotary_fwd / _bwd    Mamba-3's B, C rotated into each head's frame (mamba3/rotary.py)
    streamssm::causal_conv1d_fwd / _bwd    causal depthwise conv (conv1d/conv.py launchers)
    streamssm::conv1d_step                 one conv step, mutates conv_state
    streamssm::selective_scan_step         one Mamba-1 step, mutates ssm_state
    streamssm::ssd_step                    one Mamba-2 step, mutates ssm_state
    streamssm::mamba3_step                 one Mamba-3 step, mutates ssm_state and carry

mamba3_scan has no op of its own: on the Triton backend it is the rotary op, one ssd_scan op
(with input weights) and elementwise PyTorch (mamba3/chunked.py). Op outputs cannot be None: an absent output is an empty (0,) tensor.
The Python wrappers (``*_op``) take and return what the modules' ``*_triton`` functions do.
The step ops take the arguments of their ``*_step_triton`` launchers; ``streamssm.kernels``
calls them only while torch.compile/export traces (eager calls the launcher: a custom op's
Python dispatch costs tens of µs, several times a step kernel).
"""

from __future__ import annotations

import math

import torch
from torch.library import custom_op, register_autograd, register_fake

from streamssm.kernels._common import needs_grad
from streamssm.kernels.conv1d.conv import _causal_conv1d_bwd, _causal_conv1d_fwd, _empty_in_layout_of
from streamssm.kernels.conv1d.step import conv1d_step_triton
from streamssm.kernels.mamba1.scan import _as_groups, _selective_scan_bwd, _selective_scan_fwd
from streamssm.kernels.mamba1.step import selective_scan_step_triton
from streamssm.kernels.mamba3.rotary import BLOCK_L as ROTARY_TILE
from streamssm.kernels.mamba3.rotary import mamba3_rotary_bwd_triton, mamba3_rotary_fwd_triton
from streamssm.kernels.mamba3.step import mamba3_step_triton
from streamssm.kernels.ssd.combined import _ssd_scan_bwd, _ssd_scan_fwd
from streamssm.kernels.ssd.fused_fwd import num_sequences, ssd_fused_fwd, use_fused_forward
from streamssm.kernels.ssd.step import ssd_step_triton

Tensor = torch.Tensor
F32 = torch.float32


def _absent(like: Tensor) -> Tensor:
    """The stand-in for an absent (None) output."""
    return like.new_empty(0)


def _present(t: Tensor | None) -> Tensor | None:
    """Back from :func:`_absent`: None for an empty stand-in."""
    return None if t is None or t.numel() == 0 else t


# ----------------------------------------------------------------------------- Mamba-1 scan


@custom_op("streamssm::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B4: Tensor, C4: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, softplus: bool, initial_state: Tensor | None,
                       store_ckpt: bool, segments: int | None, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """u, delta, z (b, d, l); B4, C4 (b, g, n, l). Returns y (b, d, l), final (b, d, n) fp32 and
    the chunk-start states (b, l/chunk, d, n) fp32 kept for the backward (empty unless store_ckpt)."""
    y, final, ckpt = _selective_scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, softplus, initial_state,
                                         store_ckpt, segments, chunk)
    return y, final, ckpt if ckpt is not None else _absent(final)


@register_fake("streamssm::selective_scan_fwd")
def _(u, delta, A, B4, C4, D, z, delta_bias, softplus, initial_state, store_ckpt, segments, chunk):
    b, d, l = u.shape
    n = A.shape[1]
    ckpt = u.new_empty(b, -(-l // chunk), d, n, dtype=F32) if store_ckpt else u.new_empty(0, dtype=F32)
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(b, d, n, dtype=F32), ckpt


@custom_op("streamssm::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dy: Tensor, dfinal: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B4: Tensor, C4: Tensor,
                       D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, softplus: bool, ckpt: Tensor,
                       segments: int | None, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  Tensor, Tensor, Tensor]:
    """Gradients du, ddelta, dA, dB4, dC4 (fp32), dD, dz (empty without z), dbias, dh0; ``dfinal``
    None when the final state got no gradient."""
    du, ddelta, dA, dB4, dC4, dD, dz, dbias, dh0 = _selective_scan_bwd(
        dy, dfinal, u, delta, A, B4, C4, D, z, delta_bias, softplus, ckpt, segments, chunk)
    return du, ddelta, dA, dB4.contiguous(), dC4.contiguous(), dD, dz if dz is not None else _absent(du), dbias, dh0


@register_fake("streamssm::selective_scan_bwd")
def _(dy, dfinal, u, delta, A, B4, C4, D, z, delta_bias, softplus, ckpt, segments, chunk):
    b, d, l = u.shape
    f32 = dict(dtype=F32)
    return (u.new_empty(b, d, l), delta.new_empty(b, d, l), A.new_empty(A.shape, **f32),
            B4.new_empty(B4.shape, **f32), C4.new_empty(C4.shape, **f32), u.new_empty(d, **f32),
            z.new_empty(b, d, l) if z is not None else u.new_empty(0), u.new_empty(d, **f32),
            u.new_empty(b, d, A.shape[1], **f32))


def _selective_scan_setup(ctx, inputs, output):
    u, delta, A, B4, C4, D, z, delta_bias, softplus, initial_state, _, segments, chunk = inputs
    ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, output[2])
    ctx.softplus, ctx.segments, ctx.chunk = softplus, segments, chunk
    ctx.has_h0 = initial_state is not None
    ctx.set_materialize_grads(False)  # as _ssd_setup: no zeros of the kept checkpoints (b, l/chunk, d, n) fp32


def _selective_scan_backward(ctx, dy, dfinal, _dckpt):
    u, delta, A, B4, C4, D, z, delta_bias, ckpt = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(u, memory_format=torch.contiguous_format)
    du, ddelta, dA, dB4, dC4, dD, dz, dbias, dh0 = selective_scan_bwd(
        dy, dfinal, u, delta, A, B4, C4, D, z, delta_bias, ctx.softplus, ckpt, ctx.segments, ctx.chunk)
    return (du, ddelta, dA, dB4.to(B4.dtype), dC4.to(C4.dtype), dD if D is not None else None, _present(dz),
            dbias if delta_bias is not None else None, None, dh0 if ctx.has_h0 else None, None, None, None)


register_autograd("streamssm::selective_scan_fwd", _selective_scan_backward, setup_context=_selective_scan_setup)


def selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, segments, chunk):
    """The Mamba-1 scan op on B/C of (b, n, l) or (b, g, n, l): B and C are brought to one group
    count (the least common multiple; autograd sums the repeats back). Returns y, final."""
    B4, C4 = _as_groups(B), _as_groups(C)
    if B4.shape[1] != C4.shape[1]:
        g = math.lcm(B4.shape[1], C4.shape[1])  # divides d: one group count per program
        B4 = B4.repeat_interleave(g // B4.shape[1], dim=1)
        C4 = C4.repeat_interleave(g // C4.shape[1], dim=1)
    store = needs_grad(u, delta, A, B4, C4, D, z, delta_bias, initial_state)
    y, final, _ = selective_scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, bool(delta_softplus), initial_state,
                                     store, segments, chunk)
    return y, final


# ----------------------------------------------------------------------------- Mamba-2 SSD


@custom_op("streamssm::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 dt_bias: Tensor | None, initial_state: Tensor | None, chunk_size: int, dt_softplus: bool,
                 cu_seqlens: Tensor | None, input_weight: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns out (b, l, h, p), final (S, h, p, n) fp32 and the backward's dt_out, dA_cs
    (T, h, Q) fp32, chunk-entering states (T, h, p, n) fp32, ungated y (b*l, h, p) (empty without z)."""
    out, final, dt_out, dA_cs, states, y = _ssd_scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size,
                                                          dt_softplus, cu_seqlens, input_weight)
    return out, final, dt_out, dA_cs, states, y if y is not None else _absent(out)


@register_fake("streamssm::ssd_scan_fwd")
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus, cu_seqlens, input_weight):
    b, l, h, p = x.shape
    n = B.shape[3]
    if cu_seqlens is None:
        chunks, seqs = b * -(-l // chunk_size), b
    else:  # the chunk count depends on the sequence lengths (values, not shapes)
        chunks, seqs = torch.library.get_ctx().new_dynamic_size(), cu_seqlens.shape[0] - 1
    f32 = dict(dtype=F32)
    return (x.new_empty(b, l, h, p), x.new_empty(seqs, h, p, n, **f32), x.new_empty(chunks, h, chunk_size, **f32),
            x.new_empty(chunks, h, chunk_size, **f32), x.new_empty(chunks, h, p, n, **f32),
            x.new_empty(b * l, h, p) if z is not None else x.new_empty(0))


@custom_op("streamssm::ssd_scan_bwd", mutates_args=())
def ssd_scan_bwd(dout: Tensor, dfinal: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_out: Tensor, dA_cs: Tensor,
                 states: Tensor, y: Tensor, chunk_size: int, dt_softplus: bool, cu_seqlens: Tensor | None,
                 has_init: bool, input_weight: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit (fp32), dinput_weight in their
    inputs' dtypes (absent ones empty); ``dfinal`` None when the final state got no gradient."""
    grads = _ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_out, dA_cs, states, _present(y),
                          chunk_size, dt_softplus, cu_seqlens, has_init, input_weight)
    like = (x, dt, A, B, C, D, z, dt_bias, states, input_weight)
    return tuple(_absent(x) if g is None else g.to(ref.dtype).contiguous() for g, ref in zip(grads, like))


@register_fake("streamssm::ssd_scan_bwd")
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_out, dA_cs, states, y, chunk_size, dt_softplus, cu_seqlens,
      has_init, input_weight):
    dinit = states.new_empty(num_sequences(x, cu_seqlens), *states.shape[1:]) if has_init else None
    like = (x, dt, A, B, C, D, z, dt_bias, dinit, input_weight)
    return tuple(x.new_empty(0) if t is None else t.new_empty(t.shape) for t in like)


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus, cu_seqlens, input_weight = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, cu_seqlens, input_weight, *output[2:])
    ctx.chunk_size, ctx.dt_softplus, ctx.has_init = chunk_size, dt_softplus, initial_state is not None
    # gradients of unused outputs arrive as None, not zeros: the kept outputs (dt_out, dA_cs and
    # the (T, h, p, n) fp32 states, 96 MiB at S1) never get one, and zeros of them lived through
    # the whole backward (S1 fwd+bwd peak 0.446 -> 0.576 GiB with the fp32 C.B)
    ctx.set_materialize_grads(False)


def _ssd_backward(ctx, dout, dfinal, *_kept):
    x, dt, A, B, C, D, z, dt_bias, cu_seqlens, input_weight, dt_out, dA_cs, states, y = ctx.saved_tensors
    if dout is None:  # only the final state was used
        dout = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit, dw = ssd_scan_bwd(
        dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_out, dA_cs, states, y, ctx.chunk_size, ctx.dt_softplus,
        cu_seqlens, ctx.has_init, input_weight)
    return (dx, ddt, dA, dB, dC, _present(dD), _present(dz), _present(ddt_bias), _present(dinit), None, None, None,
            _present(dw))


register_autograd("streamssm::ssd_scan_fwd", _ssd_backward, setup_context=_ssd_setup)


@custom_op("streamssm::ssd_scan_infer", mutates_args=())
def ssd_scan_infer(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                   dt_bias: Tensor | None, initial_state: Tensor | None, dt_softplus: bool,
                   cu_seqlens: Tensor | None, input_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """The one-pass forward (ssd/fused_fwd.py): out (b, l, h, p), final (S, h, p, n) fp32; no gradients."""
    return ssd_fused_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, cu_seqlens, input_weight)


@register_fake("streamssm::ssd_scan_infer")
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, cu_seqlens, input_weight):
    return x.new_empty(x.shape), x.new_empty(num_sequences(x, cu_seqlens), x.shape[2], x.shape[3], B.shape[3],
                                             dtype=F32)


@custom_op("streamssm::ssd_scan_infer_pool", mutates_args=("state_pool",))
def ssd_scan_infer_pool(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                        dt_bias: Tensor | None, state_pool: Tensor, state_rows: Tensor, dt_softplus: bool) -> Tensor:
    """The one-pass forward of b sequences starting from ``state_pool`` (R, h, p, n) fp32 rows
    ``state_rows`` (b,) int64, their final states written over those rows; returns out (b, l, h, p)."""
    return ssd_fused_fwd(x, dt, A, B, C, D, z, dt_bias, state_pool, dt_softplus, None, state_rows=state_rows)[0]


@register_fake("streamssm::ssd_scan_infer_pool")
def _(x, dt, A, B, C, D, z, dt_bias, state_pool, state_rows, dt_softplus):
    return x.new_empty(x.shape)


def pool_forward_in_kernel(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                           z: Tensor | None, dt_bias: Tensor | None, state_pool: Tensor) -> bool:
    """Whether an SSD call over pool rows takes :func:`ssd_scan_infer_pool`: no gradient wanted,
    the one-pass forward pays (``use_fused_forward``) and the pool is contiguous."""
    return (not needs_grad(x, dt, A, B, C, D, z, dt_bias, state_pool) and state_pool.is_contiguous()
            and use_fused_forward(x.shape[0], x.shape[2], x.shape[1]))


def ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, dt_softplus, cu_seqlens,
                input_weight=None):
    """The SSD scan op; returns out (b, l, h, p), final (S, h, p, n) fp32. Calls that need no
    gradient take the one-pass forward when ``use_fused_forward`` says it pays (packed rows count
    their whole length as the longest sequence: no host read of cu_seqlens)."""
    if not needs_grad(x, dt, A, B, C, D, z, dt_bias, initial_state, input_weight) and use_fused_forward(
            num_sequences(x, cu_seqlens), x.shape[2], x.shape[1]):
        return ssd_scan_infer(x, dt, A, B, C, D, z, dt_bias, initial_state, bool(dt_softplus), cu_seqlens,
                              input_weight)
    out, final, *_ = ssd_scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size, bool(dt_softplus),
                                  cu_seqlens, input_weight)
    return out, final


# ----------------------------------------------------------------------------- Mamba-3 rotation


@custom_op("streamssm::mamba3_rotary_fwd", mutates_args=())
def mamba3_rotary_fwd(B: Tensor, C: Tensor, dt: Tensor, theta: Tensor,
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """B~, C~ (b, l, h, n) in out_dtype, final angle (b, h, n/2) fp32, tile angles (b, h, n/2, T) float64."""
    return mamba3_rotary_fwd_triton(B, C, dt, theta, out_dtype)


@register_fake("streamssm::mamba3_rotary_fwd")
def _(B, C, dt, theta, out_dtype):
    b, l, _, n = B.shape
    h = dt.shape[2]
    return (B.new_empty(b, l, h, n, dtype=out_dtype), B.new_empty(b, l, h, n, dtype=out_dtype),
            B.new_empty(b, h, n // 2, dtype=F32), B.new_empty(b, h, n // 2, -(-l // ROTARY_TILE), dtype=torch.float64))


@custom_op("streamssm::mamba3_rotary_bwd", mutates_args=())
def mamba3_rotary_bwd(dBo: Tensor, dCo: Tensor, dangle_end: Tensor, B: Tensor, C: Tensor, dt: Tensor,
                      theta: Tensor, enter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients dB, dC, ddt, dtheta in their inputs' dtypes."""
    return mamba3_rotary_bwd_triton(dBo, dCo, dangle_end, B, C, dt, theta, enter)


@register_fake("streamssm::mamba3_rotary_bwd")
def _(dBo, dCo, dangle_end, B, C, dt, theta, enter):
    return B.new_empty(B.shape), C.new_empty(C.shape), dt.new_empty(dt.shape), theta.new_empty(theta.shape)


def _rotary_setup(ctx, inputs, output):
    B, C, dt, theta, out_dtype = inputs
    ctx.save_for_backward(B, C, dt, theta, output[3])
    ctx.out_dtype = out_dtype
    ctx.set_materialize_grads(False)  # no float64 zeros of the tile angles (b, h, n/2, T) kept for the backward


def _rotary_backward(ctx, dBo, dCo, dangle_end, _denter):
    B, C, dt, theta, enter = ctx.saved_tensors
    rotated = (*B.shape[:2], dt.shape[2], B.shape[3])  # (b, l, h, n)
    # an unused output's gradient arrives as None: zeros for the kernel (the final angle's: (b, h, n/2))
    dBo = B.new_zeros(rotated, dtype=ctx.out_dtype) if dBo is None else dBo
    dCo = B.new_zeros(rotated, dtype=ctx.out_dtype) if dCo is None else dCo
    dangle_end = dt.new_zeros(rotated[0], rotated[2], rotated[3] // 2, dtype=F32) if dangle_end is None else dangle_end
    return (*mamba3_rotary_bwd(dBo, dCo, dangle_end, B, C, dt, theta, enter), None)


register_autograd("streamssm::mamba3_rotary_fwd", _rotary_backward, setup_context=_rotary_setup)


def mamba3_rotary_op(B: Tensor, C: Tensor, dt: Tensor, theta: Tensor,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The rotation op, as ``mamba3/reference.mamba3_rotary_ref``: B~, C~, final angle."""
    B_rot, C_rot, angle_end, _ = mamba3_rotary_fwd(B, C, dt, theta, out_dtype)
    return B_rot, C_rot, angle_end


# ----------------------------------------------------------------------------- causal conv1d


@custom_op("streamssm::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
                      silu: bool) -> tuple[Tensor, Tensor]:
    """x (b, d, l) -> y (b, d, l) in x's memory order, final state (b, d, w-1) in x.dtype."""
    return _causal_conv1d_fwd(x, weight, bias, initial_state, silu)


@register_fake("streamssm::causal_conv1d_fwd")
def _(x, weight, bias, initial_state, silu):
    b, d, _ = x.shape
    return _empty_in_layout_of(x), x.new_empty(b, d, weight.shape[1] - 1)


@custom_op("streamssm::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(dy: Tensor, dfinal: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                      initial_state: Tensor | None, silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients dx (x's memory order), dweight, dbias, dinit in their inputs' dtypes (absent: empty)."""
    dx, dw, dbias, dinit = _causal_conv1d_bwd(dy, dfinal.contiguous(), x, weight, bias, initial_state, silu)
    # dweight and dbias are views of one (5, d) sum: copied apart (op outputs may not alias)
    dw = dw.to(weight.dtype, memory_format=torch.contiguous_format, copy=True)
    dbias = dbias.to(bias.dtype, copy=True) if bias is not None else _absent(dx)
    return dx, dw, dbias, dinit if initial_state is not None else _absent(dx)


@register_fake("streamssm::causal_conv1d_bwd")
def _(dy, dfinal, x, weight, bias, initial_state, silu):
    none = x.new_empty(0)
    return (_empty_in_layout_of(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape) if bias is not None
            else none, initial_state.new_empty(initial_state.shape) if initial_state is not None else none)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, initial_state, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.silu = silu


def _conv_backward(ctx, dy, dfinal):
    x, weight, bias, initial_state = ctx.saved_tensors
    dx, dw, dbias, dinit = causal_conv1d_bwd(dy, dfinal, x, weight, bias, initial_state, ctx.silu)
    return dx, dw, _present(dbias), _present(dinit), None


register_autograd("streamssm::causal_conv1d_fwd", _conv_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------- single steps


@custom_op("streamssm::conv1d_step", mutates_args=("conv_state",))
def conv1d_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                rows: Tensor) -> Tensor:
    """x (b, d) -> y (b, d); conv_state (P, d, w-1) updated in place at rows (b,) int64."""
    return conv1d_step_triton(x, conv_state, weight, bias, activation, rows)


@custom_op("streamssm::selective_scan_step", mutates_args=("ssm_state",))
def selective_scan_step(ssm_state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                        rows: Tensor) -> Tensor:
    """u (b, d) -> y (b, d); ssm_state (P, d, n) fp32 updated in place at rows."""
    return selective_scan_step_triton(ssm_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, rows)


@custom_op("streamssm::ssd_step", mutates_args=("ssm_state",))
def ssd_step(ssm_state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, rows: Tensor) -> Tensor:
    """x (b, h, p) -> y (b, h, p); ssm_state (P, h, p, n) fp32 updated in place at rows."""
    return ssd_step_triton(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, rows)


@custom_op("streamssm::mamba3_step", mutates_args=("ssm_state", "carry"))
def mamba3_step(ssm_state: Tensor, carry: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                lam: Tensor, theta: Tensor, D: Tensor | None, z: Tensor | None, rows: Tensor) -> Tensor:
    """x (b, h, p) -> y (b, h, p); ssm_state (P, h, p, n) and carry (P, h*p + g*n) updated at rows."""
    return mamba3_step_triton(ssm_state, carry, x, dt, A, B, C, lam, theta, D, z, rows)


def _step_output(x: Tensor, *_args) -> Tensor:
    """Every step op returns a fresh contiguous tensor shaped and typed like its input x."""
    return x.new_empty(x.shape)


register_fake("streamssm::conv1d_step", lambda x, *rest: _step_output(x))
register_fake("streamssm::selective_scan_step", lambda ssm_state, u, *rest: _step_output(u))
register_fake("streamssm::ssd_step", lambda ssm_state, x, *rest: _step_output(x))
register_fake("streamssm::mamba3_step", lambda ssm_state, carry, x, *rest: _step_output(x))
