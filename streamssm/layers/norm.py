"""RMSNorm and the gated RMSNorm of Mamba-2 (norm(y * silu(z)), over all channels or per group).

Both run through ``F.rms_norm`` (one fused kernel forward and one backward on CUDA, statistics
in fp32 whatever the input dtype), with the weight cast to the input's dtype: bf16 activations
stay bf16 and nothing of (..., d) size is stored in fp32 for the backward. Without gradients on
CUDA the gated norm is one Triton kernel (``kernels/norm/gated_rms_norm.py``: gate, product and
norm in one pass instead of three launches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamssm.errors import ConfigError
from streamssm.kernels.norm import gated_rms_norm


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

    ``groups`` > 1: each of the ``groups`` runs of d / groups channels is divided by its own
    rms (mamba-ssm's ``group_size = d / ngroups``), then all d are scaled by ``weight``.
    ``z=None``: y arrives already gated (the step kernels apply silu(z) in their epilogue)."""

    def __init__(self, d: int, eps: float = 1e-5, groups: int = 1):
        super().__init__(d, eps)
        if groups <= 0 or d % groups:
            raise ConfigError(f"GatedRMSNorm: {d} channels do not split into {groups} groups")
        self.groups = groups

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return gated_rms_norm(y, z, self.weight, self.eps, self.groups)
