"""The CPU's C kernels as registered ``torch.library`` ops (namespace ``streamssm``), for calls
traced by torch.compile (the ``compiled`` engine, ``streamssm/compiled_cpu.py``).

A ctypes call cannot be traced: without these ops a traced call ran the PyTorch references
instead, which inductor fused but which cost more than the C kernels (issue 19). Each op is one
graph node with a fake (shape/dtype-only) implementation; the steps and the pool scan declare the
state pool they update in place (``Tensor(a!)`` in the schema: custom_op's ``mutates_args``), so
inductor keeps their order and hands them the pool itself (no copy). Forward only, CPU only: a
call that records gradients never takes them. They are defined through ``torch.library.define``
and ``impl`` rather than ``custom_op`` (``kernels/library.py``), whose Python wrapper of a
mutating op cost ~17 us a call against ~6 here (a conv step over 64 streams x 256 channels,
1 thread: 22 us direct, 41 as a custom_op, 28 here; 2026-12-07), eight calls a 4-layer step.

    streamssm::conv1d_step_cpu           one conv step over pool rows, mutates conv_state (conv1d/conv_cpu.py)
    streamssm::selective_scan_step_cpu   one Mamba-1 step over pool rows, mutates ssm_state (mamba1/scan_cpu.py)
    streamssm::ssd_scan_pool_cpu         the Mamba-2 sequential scan from and back into pool rows, mutates
                                         ssm_state (ssd/scan_cpu.py: the step is its one-step case)
    streamssm::causal_conv1d_cpu         causal conv over a chunk (conv1d/conv_cpu.py)
    streamssm::selective_scan_cpu        Mamba-1 scan over a chunk (mamba1/scan_cpu.py)

``streamssm.kernels`` calls them only while torch.compile traces, for the calls whose eager form
takes the same C kernel (the kernel modules' ``applies`` with ``traced=True``; never under
torch.export's default non-strict trace, whose graphs stay pure PyTorch for ONNX); an eager call
calls the kernel directly (no dispatch: ~6 us a call). The ops take the pool and its rows, where
the eager steps take the pool's slice (``kernels/__init__.py: _step_in_place``): a traced call
cannot read the rows' values on the host. Outputs are fresh contiguous tensors: the chunked ops
return y channel-last (b, l, d), the layout their kernels write, and their callers transpose it.
"""

from __future__ import annotations

import torch
from torch.library import define, impl, register_fake

from streamssm.kernels.conv1d import conv_cpu
from streamssm.kernels.mamba1 import scan_cpu as selective_cpu
from streamssm.kernels.ssd import scan_cpu as ssd_cpu

Tensor = torch.Tensor
F32 = torch.float32


def _last_contiguous(t: Tensor | None) -> Tensor | None:
    """t with its last dim contiguous (the step kernels read channels at stride 1, rows at a stride)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- steps over pool rows


define("streamssm::conv1d_step_cpu",
       "(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, str? activation, Tensor rows) -> Tensor")


@impl("streamssm::conv1d_step_cpu", "cpu")
def _conv1d_step_cpu(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                     rows: Tensor) -> Tensor:
    """x (b, d) fp32 -> y (b, d) fp32; conv_state (P, d, w-1) fp32 contiguous updated in place at rows (b,)."""
    return conv_cpu.conv1d_step_c(conv_state, _last_contiguous(x), weight, bias, activation, rows=rows)


@register_fake("streamssm::conv1d_step_cpu")
def _(x, conv_state, weight, bias, activation, rows):
    return x.new_empty(x.shape, dtype=F32)


define("streamssm::selective_scan_step_cpu",
       "(Tensor(a!) ssm_state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
       "Tensor? delta_bias, bool delta_softplus, Tensor rows) -> Tensor")


@impl("streamssm::selective_scan_step_cpu", "cpu")
def _selective_scan_step_cpu(ssm_state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                             rows: Tensor) -> Tensor:
    """u (b, d) fp32 -> y (b, d) fp32; ssm_state (P, d, n) fp32 contiguous updated in place at rows (b,).
    B, C (b, n) or (b, g, n) (``selective_scan_step``'s layouts; their groups are made adjacent here)."""
    if B.dim() == 3 and B.shape[1] > 1:  # the kernel steps n floats from one group to the next
        B, C = (t if t.stride(1) == t.shape[2] and t.stride(2) == 1 else t.contiguous() for t in (B, C))
    u, delta, B, C, z = (_last_contiguous(t) for t in (u, delta, B, C, z))
    return selective_cpu.selective_scan_step_c(ssm_state, u, delta, A.contiguous(), B, C, D, z, delta_bias,
                                               delta_softplus, rows=rows)


@register_fake("streamssm::selective_scan_step_cpu")
def _(ssm_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, rows):
    return u.new_empty(u.shape, dtype=F32)


define("streamssm::ssd_scan_pool_cpu",
       "(Tensor(a!) ssm_state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
       "Tensor? dt_bias, bool dt_softplus, Tensor rows) -> Tensor")


@impl("streamssm::ssd_scan_pool_cpu", "cpu")
def _ssd_scan_pool_cpu(ssm_state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, rows: Tensor) -> Tensor:
    """x, z (b, l, h, p) -> y (b, l, h, p) fp32 (D and the gate applied); ssm_state (P, h, p, n) fp32
    contiguous: row rows[i] is sequence i's initial state and receives its final one."""
    return ssd_cpu.scan_into(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, rows=rows)


@register_fake("streamssm::ssd_scan_pool_cpu")
def _(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, rows):
    return x.new_empty(x.shape, dtype=F32)


# ----------------------------------------------------------------------------- chunks


define("streamssm::causal_conv1d_cpu",
       "(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, str? activation) -> (Tensor, Tensor)")


@impl("streamssm::causal_conv1d_cpu", "cpu")
def _causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
                       activation: str | None) -> tuple[Tensor, Tensor]:
    """x (b, d, l) fp32 (any strides) -> y (b, l, d) fp32 channel-last, final state (b, d, w-1) fp32."""
    y, final = conv_cpu.causal_conv1d_cpu(x, weight, bias, initial_state, activation, return_final_state=True)
    return y.transpose(1, 2), final  # (b, l, d): the kernel's own buffer


@register_fake("streamssm::causal_conv1d_cpu")
def _(x, weight, bias, initial_state, activation):
    b, d, l = x.shape
    return x.new_empty(b, l, d, dtype=F32), x.new_empty(b, d, weight.shape[1] - 1, dtype=F32)


define("streamssm::selective_scan_cpu",
       "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
       "bool delta_softplus, Tensor? initial_state) -> (Tensor, Tensor)")


@impl("streamssm::selective_scan_cpu", "cpu")
def _selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                        z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                        initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """u, delta, z (b, d, l); B, C (b, n, l) or (b, g, n, l) -> y (b, l, d) channel-last in u.dtype,
    final state (b, d, n) fp32."""
    y, final = selective_cpu.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                                return_final_state=True)
    return y.transpose(1, 2), final  # (b, l, d): the kernel's own buffer


@register_fake("streamssm::selective_scan_cpu")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    b, d, l = u.shape
    return u.new_empty(b, l, d), u.new_empty(b, d, A.shape[1], dtype=F32)


# ----------------------------------------------------------------------------- the callers' contracts

conv1d_step_cpu = torch.ops.streamssm.conv1d_step_cpu
selective_scan_step_cpu = torch.ops.streamssm.selective_scan_step_cpu
ssd_scan_pool_cpu = torch.ops.streamssm.ssd_scan_pool_cpu
causal_conv1d_cpu = torch.ops.streamssm.causal_conv1d_cpu
selective_scan_cpu = torch.ops.streamssm.selective_scan_cpu


def ssd_step_op(ssm_state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, rows: Tensor) -> Tensor:
    """``ssd_step``'s contract (x, z (b, h, p); dt (b, h); B, C (b, g, n)) as the pool scan one step
    long, as ``ssd/step_cpu.py`` runs it eagerly. Returns y (b, h, p) in x.dtype."""
    def one(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.unsqueeze(1)  # (b, 1, ...): one time step

    y = ssd_scan_pool_cpu(ssm_state, one(x), one(dt), A, one(B), one(C), D, one(z), dt_bias, bool(dt_softplus), rows)
    return y.view(x.shape).to(x.dtype)


def causal_conv1d_op(x: Tensor, weight: Tensor, bias: Tensor | None = None, initial_state: Tensor | None = None,
                     activation: str | None = "silu", return_final_state: bool = False):
    """``conv_cpu.causal_conv1d_cpu``'s contract: y (b, d, l) (a view of the channel-last op
    output) [, final_state (b, d, w-1)]."""
    y, final = causal_conv1d_cpu(x, weight, bias, initial_state, activation)
    y = y.transpose(1, 2)  # (b, d, l)
    return (y, final) if return_final_state else y


def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                      z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                      initial_state: Tensor | None = None, return_final_state: bool = False):
    """``selective_cpu.selective_scan_cpu``'s contract: y (b, d, l) in u.dtype (a view of the
    channel-last op output) [, final_state (b, d, n) fp32]."""
    y, final = selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state)
    y = y.transpose(1, 2)  # (b, d, l)
    return (y, final) if return_final_state else y
