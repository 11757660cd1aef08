"""RMSNorm and the gated RMSNorm of Mamba-2 (norm(y * silu(z)))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x (..., d) -> x / rms(x) * weight, computed in fp32, returned in x.dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """(y, z) (..., d) -> RMSNorm(y * silu(z)): Mamba-2's output norm (gate before norm)."""

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward((y.float() * F.silu(z.float())).to(y.dtype))
