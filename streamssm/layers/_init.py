"""Standard Mamba initializations shared by both blocks."""

from __future__ import annotations

import math

import torch


def dt_bias_init(size: int, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> torch.Tensor:
    """Bias b with softplus(b) log-uniform in [dt_min, dt_max] (inverse softplus of the sample)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))
