"""References of the fused norm kernels (the specs of ``add_rms_norm.py`` and ``gated_rms_norm.py``).

    add:    h = x + y;  normed = h / sqrt(mean(h^2) + eps) * weight
    gated:  g = y * silu(z);  normed = g / sqrt(mean(g^2) + eps) * weight (the mean over all d
            channels, or over each of ``groups`` runs of d / groups channels)
Statistics in fp32, every intermediate rounded to the input's dtype as the PyTorch ops round it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_ref(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (b, d); weight (d,) -> (h = x + y, RMSNorm(h) * weight), both (b, d) in x.dtype."""
    h = x + y
    return h, F.rms_norm(h, weight.shape, weight.to(h.dtype), eps)


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       groups: int = 1) -> torch.Tensor:
    """y, z (..., d) (z None: y arrives gated); weight (d,) -> RMSNorm(y * silu(z)) (..., d) in y.dtype."""
    gated = y if z is None else y * F.silu(z.to(y.dtype))
    if groups == 1:
        return F.rms_norm(gated, weight.shape, weight.to(gated.dtype), eps)
    size = gated.shape[-1] // groups
    normed = F.rms_norm(gated.unflatten(-1, (groups, size)), (size,), None, eps)  # (..., groups, size)
    return normed.flatten(-2) * weight.to(gated.dtype)
