"""Sequential Mamba-2 (SSD) scan in C for the CPU: the "torch" backend's path for calls that need
no gradient (serving, ``infer``, ``generate``, zarr inference).

Shape legend: b batch, l length, h heads = g * r, p headdim, n dstate, g groups of B/C.

Same recurrence as ``reference.py`` in fp32, one (p, n) state per (sequence, head) walked
through time while it stays in L1:

    S_t = exp(dt_t A) S_{t-1} + w_t x_t B_t^T,    y_t = S_t C_t        (D and z: by the caller)

That is ~4 p n flops per token and head, where the chunked algorithm (``chunked_torch.py``)
spends ~t (p + n / r) more on its (t, t) intra-chunk matrices and materialises every chunk's
state through many small PyTorch ops. Measured on the 2-core development machine (2026-12-07,
fp32, against the chunked scan at its best chunk length): 3.6-4.4x faster for p = n = 16 (the
demo's audio model) and 3.1-3.7x for p = 64, n = 128 (the d512 LM) at 1 thread, 1.7-7.5x
against the chunked scan on 2 threads (this one uses one). Gradients: the chunked scan.

The C source is compiled on first use and cached (``kernels/cpu_library.py``) and called through
ctypes, which releases the GIL during the call. Without a working C++ compiler :func:`library`
is None (logged once) and the chunked path runs instead.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from streamssm.kernels.cpu_library import build_library

_SOURCE = r"""
#include <cmath>
#include <cstdint>

// x (b, l, h, p); dt, w (b, l, h); A (h); B, C (b, l, g, n); state (b, h, p, n), updated in place;
// y (b, l, h, p) written. All fp32, contiguous.
extern "C" void streamssm_ssd_scan_f32(int64_t b, int64_t l, int64_t h, int64_t p, int64_t n, int64_t g,
                                       const float* x, const float* dt, const float* w, const float* A,
                                       const float* B, const float* C, float* state, float* y) {
    const int64_t r = h / g;
    for (int64_t bi = 0; bi < b; ++bi) {
        for (int64_t hi = 0; hi < h; ++hi) {
            float* S = state + (bi * h + hi) * p * n;
            const int64_t gi = hi / r;
            const float a = A[hi];
            for (int64_t t = 0; t < l; ++t) {
                const int64_t tok = bi * l + t;
                const float decay = std::exp(dt[tok * h + hi] * a);
                const float wt = w[tok * h + hi];
                const float* Bt = B + (tok * g + gi) * n;
                const float* Ct = C + (tok * g + gi) * n;
                const float* xt = x + (tok * h + hi) * p;
                float* yt = y + (tok * h + hi) * p;
                for (int64_t pi = 0; pi < p; ++pi) {
                    float* row = S + pi * n;
                    const float xv = wt * xt[pi];
                    float acc = 0.f;
                    for (int64_t ni = 0; ni < n; ++ni) {
                        const float s = decay * row[ni] + xv * Bt[ni];
                        row[ni] = s;
                        acc += s * Ct[ni];
                    }
                    yt[pi] = acc;
                }
            }
        }
    }
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled scan (:func:`~streamssm.kernels.cpu_library.build_library`), or None where no
    C++ compiler builds it."""
    lib = build_library("ssd_scan_cpu", _SOURCE)
    if lib is not None:
        fn = lib.streamssm_ssd_scan_f32
        fn.restype = None
        fn.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 8
    return lib


def scan_into(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, w: torch.Tensor, A: torch.Tensor,
              B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The C scan over ``state`` (b, h, p, n) fp32 contiguous, **updated in place**: x (b, l, h, p);
    dt (b, l, h) after bias/softplus, w (b, l, h); A (h,); B, C (b, l, g, n), any float dtype and
    layout. Returns y (b, l, h, p) fp32 (no D/z). Needs :func:`library`."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, w, A, B, C = (t.float().contiguous() for t in (x, dt, w, A, B, C))
    y = torch.empty(b, l, h, p)
    library().streamssm_ssd_scan_f32(b, l, h, p, n, g, *(t.data_ptr() for t in (x, dt, w, A, B, C, state, y)))
    return y


def ssd_rows_sequential(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        state: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_torch._ssd_rows``'s contract without chunks: x (b, l, h, p); dt (b, l, h) after
    bias/softplus, w (b, l, h) and state (b, h, p, n); A (h,); B, C (b, l, g, n). Returns y
    (b, l, h, p) fp32 (no D/z) and the final state (a new tensor: ``state`` is not changed)."""
    final = state.to(torch.float32, copy=True).contiguous()
    return scan_into(final, x, dt, w, A, B, C), final
