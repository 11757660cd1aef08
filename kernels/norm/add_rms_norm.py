"""Residual add fused with RMSNorm in Triton: one read of x and y, one write of h and normed.

Shape legend: b rows (streams), d features (padded to BLOCK_D, one program per row).

    h      = x + y                              rounded to x.dtype, as ``x + y`` is
    normed = h * rsqrt(mean(h^2) + eps) * w     sum of squares in fp32, result in x.dtype

In the recurrent step every layer ends with ``h = h + mixer(norm(h))`` and the next layer (or
the final norm) begins with ``norm(h)``: two launches (add, rms_norm) become one. Forward only
(the step runs without gradients); ``kernels.add_rms_norm`` sends calls that record gradients
to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(p_x, p_y, p_w, p_h, p_out, dim, eps, s_x, s_y, s_h, s_o, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_D)
    m = o < dim
    x = tl.load(p_x + row * s_x + o, mask=m, other=0.0)
    y = tl.load(p_y + row * s_y + o, mask=m, other=0.0)
    h = (x + y.to(x.dtype)).to(x.dtype)
    tl.store(p_h + row * s_h + o, h, mask=m)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / dim + eps)
    w = tl.load(p_w + o, mask=m, other=0.0).to(x.dtype).to(tl.float32)
    tl.store(p_out + row * s_o + o, (hf * inv * w).to(x.dtype), mask=m)


def add_rms_norm_triton(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (b, d) with unit feature stride; weight (d,) -> (h, normed) (b, d) in x.dtype."""
    b, d = x.shape
    x, y = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, y))
    h, out = torch.empty_like(x), torch.empty_like(x)
    if b:
        block = triton.next_power_of_2(d)
        _add_rms_norm_kernel[(b,)](x, y, weight.contiguous(), h, out, d, eps, x.stride(0), y.stride(0),
                                   h.stride(0), out.stride(0), BLOCK_D=block, num_warps=min(8, max(1, block // 256)))
    return h, out
