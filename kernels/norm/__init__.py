"""Fused norm kernels: the residual add with the next RMSNorm (the recurrent step's per-layer
epilogue) and Mamba-2's gated RMSNorm (the chunked forward's output norm), and the latter's
dispatch (Triton imported only when its kernel runs)."""

from __future__ import annotations

import torch

from streamssm.errors import ShapeError
from streamssm.kernels._common import Backend, choose_backend, needs_grad
from streamssm.kernels.norm import norm_cpu
from streamssm.kernels.norm.reference import gated_rms_norm_ref


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, groups: int = 1,
                   backend: Backend = "auto") -> torch.Tensor:
    """RMSNorm(y * silu(z)) * weight over all d channels or per group: y, z (..., d); weight (d,);
    d divisible by ``groups``. Returns (..., d) in y.dtype. Without gradients the kernel runs for a
    gate z on the "triton" backend ("auto": CUDA), and the C one (``norm_cpu.py``) for fp32 on the
    "torch" backend ("auto": CPU); otherwise the reference."""
    op = "gated_rms_norm"
    d = y.shape[-1]
    if z is not None and z.shape != y.shape:
        raise ShapeError(f"{op}: z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    if weight.shape != (d,) or groups <= 0 or d % groups:
        raise ShapeError(f"{op}: weight must have shape ({d},) and {d} channels split into {groups} groups, "
                         f"got weight {tuple(weight.shape)}")
    choice = choose_backend(op, backend, y.device)
    if choice == "torch" and norm_cpu.applies(y, z, weight):  # fp32 CPU without gradients: C
        return norm_cpu.gated_rms_norm_cpu(y, z, weight, eps, groups)
    if z is None or needs_grad(y, z, weight) or torch.compiler.is_compiling() or choice != "triton":
        return gated_rms_norm_ref(y, z, weight, eps, groups)
    from streamssm.kernels.norm.gated_rms_norm import gated_rms_norm_triton  # imports Triton

    return gated_rms_norm_triton(y, z, weight, eps, groups)
