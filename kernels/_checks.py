"""Argument checks shared by the public ops of ``kernels/__init__.py`` (scans and their steps).

Shape legend: b batch, l length, d channels (Mamba-1), h heads, p headdim, g groups, n dstate.
A scan and its one-step form run the same checks: the step's shapes are the scan's without l.
Every check builds its message only on failure (``check_tensor``): str() of a size traced by
torch.compile breaks the graph, and the steps run on the hot path.
"""

from __future__ import annotations

import torch

from streamssm.errors import ConfigError, ShapeError
from streamssm.kernels._common import check_divisible, check_tensor

FP32 = (torch.float32,)


def check_groups(op: str, name: str, M: torch.Tensor, channels: int, grouped_rank: int) -> None:
    """B/C of rank ``grouped_rank`` carry groups on dim 1; channels must split evenly over them."""
    if M.dim() == grouped_rank:
        check_divisible(op, name + " groups", channels, M.shape[1])


def check_D(op: str, D: torch.Tensor | None, h: int, p: int, device: torch.device,
            tokens: tuple[int, int] | None = None) -> None:
    """The skip weight of the head ops: (h,) or (h, p) fp32, optional; with ``tokens`` (b, l) (the
    SSD scan) also one per token, (b, l, h)."""
    if D is not None:
        shape = (h,) if D.dim() == 1 else (*tokens, h) if D.dim() == 3 and tokens is not None else (h, p)
        check_tensor(op, "D", D, shape, FP32, device=device)


def check_mamba1_options(op: str, D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                         u_shape: tuple, device: torch.device) -> None:
    """The optional inputs of ``selective_scan`` and its step: D, delta_bias (d,) fp32; z like u,
    (b, d, l) or (b, d)."""
    d = u_shape[1]
    check_tensor(op, "D", D, (d,), FP32, device=device, optional=True)
    check_tensor(op, "z", z, u_shape, device=device, optional=True)
    check_tensor(op, "delta_bias", delta_bias, (d,), FP32, device=device, optional=True)


def check_ssd_options(op: str, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                      x_shape: tuple, device: torch.device) -> None:
    """The optional inputs of ``ssd_scan`` and its step: D (h,) or (h, p) fp32, for the scan also
    (b, l, h); z like x, (b, l, h, p) or (b, h, p); dt_bias (h,) fp32."""
    h, p = x_shape[-2], x_shape[-1]
    check_D(op, D, h, p, device, tuple(x_shape[:2]) if len(x_shape) == 4 else None)
    check_tensor(op, "z", z, x_shape, device=device, optional=True)
    check_tensor(op, "dt_bias", dt_bias, (h,), FP32, device=device, optional=True)


def check_conv_options(op: str, width: int, activation: str | None) -> None:
    """The conv's kernel width (2..4, what the kernels unroll) and activation (None or 'silu')."""
    if not 2 <= width <= 4:
        raise ShapeError(f"{op}: weight width must be 2..4, got {width}")
    if activation not in (None, "silu"):
        raise ShapeError(f"{op}: activation must be None or 'silu', got {activation!r}")


def check_chunk_size(op: str, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ConfigError(f"{op}: chunk_size must be positive, got {chunk_size}")


def check_mamba3(op: str, x_shape: tuple, B: torch.Tensor, C: torch.Tensor, theta: torch.Tensor, A: torch.Tensor,
                 D: torch.Tensor | None, device: torch.device) -> tuple[int, int]:
    """Checks shared by mamba3's scan and step (B/C/theta carry the time dim or not); returns (g, n)."""
    h, p = x_shape[-2], x_shape[-1]
    lead = x_shape[:-2]
    check_tensor(op, "B", B, (*lead, None, None), device=device)
    g, n = B.shape[-2], B.shape[-1]
    check_divisible(op, "heads", h, g)
    if n % 2:
        raise ShapeError(f"{op}: d_state n={n} must be even (pairs form the complex state)")
    check_tensor(op, "C", C, (*lead, g, n), device=device)
    check_tensor(op, "theta", theta, (*lead, g, n // 2), device=device)
    check_tensor(op, "A", A, (h,), FP32, device=device)
    check_D(op, D, h, p, device)
    return g, n
