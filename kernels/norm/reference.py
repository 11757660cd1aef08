"""Reference of the fused residual add + RMSNorm (the spec of ``add_rms_norm.py``).

    h      = x + y                               (in x.dtype, as ``x + y`` rounds it)
    normed = h / sqrt(mean(h^2) + eps) * weight  (statistics in fp32, result in x.dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_ref(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (b, d); weight (d,) -> (h = x + y, RMSNorm(h) * weight), both (b, d) in x.dtype."""
    h = x + y
    return h, F.rms_norm(h, weight.shape, weight.to(h.dtype), eps)
