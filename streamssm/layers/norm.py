"""RMSNorm and the gated RMSNorm of Mamba-2 (norm(y * silu(z))).

Both run through ``F.rms_norm`` (one fused kernel forward and one backward on CUDA, statistics
in fp32 whatever the input dtype), with the weight cast to the input's dtype: bf16 activations
stay bf16 and nothing of (..., d) size is stored in fp32 for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x (..., d) -> x / rms(x) * weight (rms over the last axis, accumulated in fp32), in x.dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class GatedRMSNorm(RMSNorm):
    """(y, z) (..., d) -> RMSNorm(y * silu(z)): Mamba-2's output norm (gate before norm), in y.dtype.

    ``z=None``: y arrives already gated (the step kernels apply silu(z) in their epilogue)."""

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(y if z is None else y * F.silu(z.to(y.dtype)))
