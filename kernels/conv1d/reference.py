"""Reference causal depthwise conv1d with a carried conv state.

Shape legend: b batch, d channels, l length, w kernel width (2..4).

    xpad = concat(conv_state, x)   along time; conv_state (b, d, w-1) = the previous w-1 inputs
    y_t  = bias + sum_k weight[:, k] * xpad[:, t + k]      k = 0..w-1
    y    = silu(y)                                          when activation == "silu"
    final conv_state = the last w-1 columns of xpad
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
):
    """x (b, d, l); weight (d, w); bias (d,); initial_state (b, d, w-1).

    Returns y (b, d, l) in x.dtype [, final_state (b, d, w-1) in x.dtype]; fp32 math.
    """
    b, d, l = x.shape
    w = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(b, d, w - 1)
    xpad = torch.cat([initial_state.to(x.dtype), x], dim=-1).float()  # (b, d, w-1+l)
    y = F.conv1d(xpad, weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=d)
    y = _activate(y, activation).to(x.dtype)
    if not return_final_state:
        return y
    final = xpad[..., xpad.shape[-1] - (w - 1):].to(x.dtype)  # (b, d, w-1)
    return y, final


def conv1d_step_ref(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step. conv_state (b, d, w-1); x (b, d). Returns (y (b, d), new conv_state)."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1).float()  # (b, d, w)
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return _activate(y, activation).to(x.dtype), window[..., 1:].to(conv_state.dtype)
