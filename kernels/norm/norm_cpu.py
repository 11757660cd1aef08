"""The fused norms in C for the CPU: the "torch" backend's path for fp32 calls that need no gradient
(the CPU engine), in place of ``reference.py``'s chains of PyTorch ops.

Shape legend: r rows (the leading dims flattened), d channels.

    gated:  g = y * silu(z) (no z: g = y);  out = g / sqrt(mean(g^2) + eps) * weight, the mean
            over all d channels or over each of ``groups`` runs of d / groups
    add:    h = x + y;  out = h / sqrt(mean(h^2) + eps) * weight

One pass over a row each (the gate's SiLU from ``cpu_math.py``), the inputs read through their row
strides: the gate z is a slice of the block's input projection, read in place. Same math as
:func:`~streamssm.kernels.norm.reference.gated_rms_norm_ref` / ``add_rms_norm_ref`` in fp32 (sums
in another order: rounding). Built and loaded by ``kernels/cpu_library.py``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from streamssm.kernels.cpu_library import build_library, pointer, runs_in_c
from streamssm.kernels.cpu_math import VECTOR_MATH

_SOURCE = VECTOR_MATH + r"""
#include <cmath>

// normalise the rows of out (r, d) in place, per group of d / groups channels, and scale by weight
static inline void rms_scale(float* __restrict__ o, int64_t d, int64_t groups, float eps,
                             const float* __restrict__ weight) {
    const int64_t size = d / groups;
    for (int64_t gi = 0; gi < groups; ++gi) {
        float* __restrict__ og = o + gi * size;
        const float* __restrict__ wg = weight + gi * size;
        float squares = 0.0f;
        for (int64_t i = 0; i < size; ++i) squares += og[i] * og[i];
        const float inv = 1.0f / std::sqrt(squares / (float)size + eps);
        for (int64_t i = 0; i < size; ++i) og[i] = og[i] * inv * wg[i];
    }
}

// y (r, d) at row stride sy, z likewise or null; weight (d); out (r, d) contiguous
extern "C" void streamssm_gated_rms_norm_f32(int64_t r, int64_t d, int64_t groups, float eps,
                                             const float* y, int64_t sy, const float* z, int64_t sz,
                                             const float* weight, float* out) {
    for (int64_t ri = 0; ri < r; ++ri) {
        const float* __restrict__ yr = y + ri * sy;
        float* __restrict__ o = out + ri * d;
        if (z) {
            const float* __restrict__ zr = z + ri * sz;
            for (int64_t i = 0; i < d; ++i) o[i] = yr[i] * streamssm_silu(zr[i]);
        } else {
            for (int64_t i = 0; i < d; ++i) o[i] = yr[i];
        }
        rms_scale(o, d, groups, eps, weight);
    }
}

// x, y (r, d) at row strides sx, sy; weight (d); h and out (r, d) contiguous
extern "C" void streamssm_add_rms_norm_f32(int64_t r, int64_t d, float eps, const float* x, int64_t sx,
                                           const float* y, int64_t sy, const float* weight, float* h, float* out) {
    for (int64_t ri = 0; ri < r; ++ri) {
        const float* __restrict__ xr = x + ri * sx;
        const float* __restrict__ yr = y + ri * sy;
        float* __restrict__ hr = h + ri * d;
        float* __restrict__ o = out + ri * d;
        for (int64_t i = 0; i < d; ++i) {
            hr[i] = xr[i] + yr[i];
            o[i] = hr[i];
        }
        rms_scale(o, d, 1, eps, weight);
    }
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled norms, or None where no C++ compiler builds them."""
    return build_library("norm_cpu", _SOURCE, {"streamssm_gated_rms_norm_f32": "iiifpipipp",
                                               "streamssm_add_rms_norm_f32": "iifpipippp"})


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors (None: absent) runs here: fp32 CPU, no gradient wanted, not
    traced, a compiler."""
    return runs_in_c(library, tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., d) as (r, d) with unit channel stride (a view where the leading dims merge)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def gated_rms_norm_cpu(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       groups: int = 1) -> torch.Tensor:
    """``gated_rms_norm_ref``'s contract for :func:`applies` calls: y, z (..., d); weight (d,).
    Returns (..., d) fp32."""
    yr = _rows(y)
    zr = None if z is None else _rows(z)
    out = torch.empty(yr.shape)
    weight = weight.contiguous()
    library().streamssm_gated_rms_norm_f32(yr.shape[0], yr.shape[1], groups, eps, yr.data_ptr(), yr.stride(0),
                                           pointer(zr), 0 if zr is None else zr.stride(0),
                                           weight.data_ptr(), out.data_ptr())
    return out.view(y.shape)


def add_rms_norm_cpu(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_ref``'s contract for :func:`applies` calls: x, y (r, d); weight (d,). Returns
    (h = x + y, RMSNorm(h) * weight), both (r, d) fp32."""
    xr, yr = _rows(x), _rows(y)
    h, out = torch.empty(xr.shape), torch.empty(xr.shape)
    weight = weight.contiguous()
    library().streamssm_add_rms_norm_f32(xr.shape[0], xr.shape[1], eps, xr.data_ptr(), xr.stride(0), yr.data_ptr(),
                                         yr.stride(0), weight.data_ptr(), h.data_ptr(), out.data_ptr())
    return h, out
