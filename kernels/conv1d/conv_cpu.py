"""Causal depthwise conv1d in C for the CPU: the "torch" backend's path for fp32 calls that need no
gradient (the CPU engine's chunked calls), in place of ``reference.py``'s concatenation, F.conv1d
(oneDNN's depthwise kernel ran at ~2 GFLOP/s at the engine's shapes) and SiLU (``cpu_math.py``'s,
in the same loop).

Shape legend: b batch, d channels, l length, w kernel width (2..4).

Same math as :func:`~streamssm.kernels.conv1d.reference.causal_conv1d_ref` in fp32: the window of
step t reads the carried state for t + k < w - 1, the input after that; SiLU after.
The input is read through its strides (the blocks pass a (b, d, l) view of a channel-last (b, l, d)
tensor), the output is written channel-last (b, l, d) and returned as its (b, d, l) view, which
is the layout the blocks transpose back to. Built and loaded by ``kernels/cpu_library.py``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from streamssm.kernels.cpu_library import build_library, pointer, runs_in_c
from streamssm.kernels.cpu_math import VECTOR_MATH

_SOURCE = VECTOR_MATH + r"""

// x (b, d, l) at strides (sb, sd, sl) elements; weight_t (w, d) (the weight transposed); bias (d) or
// null; state (b, d, w-1) contiguous or null (zeros); y (b, l, d) contiguous; final (b, d, w-1)
// contiguous or null; silu nonzero: SiLU on the output. fp32. The loop over d is innermost: with the
// blocks' channel-last input (sd = 1) every load is contiguous and the multiply-adds vectorize.
extern "C" void streamssm_causal_conv1d_f32(int64_t b, int64_t d, int64_t l, int64_t w,
                                            const float* x, int64_t sb, int64_t sd, int64_t sl,
                                            const float* weight_t, const float* bias, const float* state,
                                            int64_t silu, float* y, float* final) {
    const int64_t s = w - 1;
    for (int64_t bi = 0; bi < b; ++bi) {
        const float* xb = x + bi * sb;
        const float* stb = state ? state + bi * d * s : nullptr;
        for (int64_t t = 0; t < l; ++t) {
            float* yt = y + (bi * l + t) * d;
            for (int64_t di = 0; di < d; ++di) yt[di] = bias ? bias[di] : 0.f;
            for (int64_t k = 0; k < w; ++k) {
                const int64_t src = t + k - s;
                const float* wk = weight_t + k * d;
                if (src >= 0) {
                    const float* xs = xb + src * sl;
                    if (sd == 1) {
                        for (int64_t di = 0; di < d; ++di) yt[di] += wk[di] * xs[di];
                    } else {
                        for (int64_t di = 0; di < d; ++di) yt[di] += wk[di] * xs[di * sd];
                    }
                } else if (stb) {
                    for (int64_t di = 0; di < d; ++di) yt[di] += wk[di] * stb[di * s + s + src];
                }
            }
            if (silu)
                for (int64_t di = 0; di < d; ++di) yt[di] = streamssm_silu(yt[di]);
        }
        if (final) {
            for (int64_t di = 0; di < d; ++di) {
                for (int64_t j = 0; j < s; ++j) {
                    const int64_t src = l - s + j;
                    final[(bi * d + di) * s + j] =
                        src >= 0 ? xb[di * sd + src * sl] : (stb ? stb[di * s + s + src] : 0.f);
                }
            }
        }
    }
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled conv, or None where no C++ compiler builds it."""
    return build_library("causal_conv1d_cpu", _SOURCE, {"streamssm_causal_conv1d_f32": "iiiipiiipppipp"})


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            initial_state: torch.Tensor | None) -> bool:
    """Whether a call runs here: fp32 CPU tensors, no gradient wanted, not traced, a compiler."""
    return runs_in_c(library, (x, weight, bias, initial_state))


def causal_conv1d_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      initial_state: torch.Tensor | None = None, activation: str | None = "silu",
                      return_final_state: bool = False):
    """``causal_conv1d_ref``'s contract for :func:`applies` calls: x (b, d, l); weight (d, w); bias
    (d,); initial_state (b, d, w-1). Returns y (b, d, l) (a view of a channel-last tensor)
    [, final_state (b, d, w-1)]."""
    b, d, l = x.shape
    w = weight.shape[1]
    weight_t = weight.t().contiguous()
    bias = None if bias is None else bias.contiguous()
    state = None if initial_state is None else initial_state.contiguous()
    y = torch.empty(b, l, d)
    final = torch.empty(b, d, w - 1) if return_final_state else None
    library().streamssm_causal_conv1d_f32(b, d, l, w, x.data_ptr(), *x.stride(), weight_t.data_ptr(), pointer(bias),
                                          pointer(state), int(activation == "silu"), y.data_ptr(), pointer(final))
    y = y.transpose(1, 2)
    return (y, final) if return_final_state else y
