"""Fast in-place conv step for the CPU ("torch" backend of ``conv1d_step``).

Shape legend: b batch, d channels, w kernel width (2..4).

Same math as ``reference.py``'s :func:`conv1d_step_ref` (the oracle) without its (b, d, w)
window: y is the state's w-1 taps plus the new input's, and the state is shifted left by one
column in place (w-1 column copies; columns never overlap, so no temporary). fp32 calls with a
contiguous state take the C step of ``conv_cpu.py`` where a C++ compiler builds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamssm.kernels.conv1d import conv_cpu


def conv1d_step_cpu(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One time step; **updates ``conv_state`` (b, d, w-1) in place** (a slice of the pool or
    a gathered copy). x (b, d); weight (d, w); bias (d,). Returns y (b, d) in x.dtype."""
    if conv_cpu.step_applies(conv_state, x, weight, bias):
        return conv_cpu.conv1d_step_c(conv_state, x, weight, bias, activation)
    w = weight.shape[1]
    wf = weight.float()
    past = conv_state.to(x.dtype).float()  # (b, d, w-1), rounded to x.dtype as the reference's window
    y = x.float() * wf[:, -1]  # (b, d)
    for k in range(w - 1):  # per tap: a sum over the short last dim is ~3x slower
        y.addcmul_(past[..., k], wf[:, k])
    if bias is not None:
        y.add_(bias.float())
    for k in range(w - 2):
        conv_state[..., k].copy_(conv_state[..., k + 1])
    conv_state[..., w - 2].copy_(x)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype)
