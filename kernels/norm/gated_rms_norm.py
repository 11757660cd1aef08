"""Mamba-2's gated RMSNorm in Triton: RMSNorm(y * silu(z)) in one read of y and z, one write.

Shape legend: r rows (tokens, all leading axes flattened), d features, G groups of S = d / G
features (one program per row and group; S padded to BLOCK_S).

    s      = silu(z)                 rounded to y's dtype, as ``F.silu(z.to(y.dtype))`` is
    g      = y * s                   rounded to y's dtype
    normed = g * rsqrt(mean_S(g^2) + eps) * weight
             G = 1: one rounding at the end, as ``F.rms_norm`` with a weight rounds;
             G > 1: rounded before and after the weight, as ``rms_norm(...) * weight`` rounds
The PyTorch path is three launches (a strided silu of the in_proj slice z, the product, the
norm) writing and re-reading two (r, d) tensors. Forward only: calls that record gradients run
the reference (``kernels.norm.gated_rms_norm`` dispatches), as do traced calls (torch.compile
fuses the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _gated_rms_norm_kernel(p_y, p_z, p_w, p_out, size, eps, s_y, s_z, s_o,
                           TWO_ROUNDINGS: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * size + tl.arange(0, BLOCK_S)
    m = tl.arange(0, BLOCK_S) < size
    y = tl.load(p_y + row * s_y + o, mask=m, other=0.0)
    dtype = y.dtype
    zf = tl.load(p_z + row * s_z + o, mask=m, other=0.0).to(dtype).to(tl.float32)
    s = (zf / (1.0 + tl.exp(-zf))).to(dtype).to(tl.float32)
    g = (y.to(tl.float32) * s).to(dtype).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / size + eps)
    w = tl.load(p_w + o, mask=m, other=0.0).to(dtype).to(tl.float32)
    if TWO_ROUNDINGS:
        out = (g * inv).to(dtype).to(tl.float32) * w
    else:
        out = g * inv * w
    tl.store(p_out + row * s_o + o, out.to(dtype), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (r, d) with unit feature stride (a view when the leading axes flatten)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def gated_rms_norm_triton(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                          groups: int = 1) -> torch.Tensor:
    """y, z (..., d) (z's rows may be strided, e.g. an in_proj slice); weight (d,) -> (..., d) in y.dtype."""
    d = y.shape[-1]
    y2, z2 = _rows(y), _rows(z)
    out = torch.empty(y2.shape, device=y.device, dtype=y.dtype)
    if y2.shape[0]:
        size = d // groups
        block = triton.next_power_of_2(size)
        _gated_rms_norm_kernel[(y2.shape[0], groups)](
            y2, z2, weight.contiguous(), out, size, eps, y2.stride(0), z2.stride(0), out.stride(0),
            TWO_ROUNDINGS=groups > 1, BLOCK_S=block, num_warps=min(8, max(1, block // 256)))
    return out.view(y.shape)
