"""Causal depthwise conv1d in C for the CPU: the "torch" backend's path for fp32 calls that need no
gradient (the CPU engine's chunked calls), in place of ``reference.py``'s concatenation, F.conv1d
(oneDNN's depthwise kernel ran at ~2 GFLOP/s at the engine's shapes) and SiLU (``cpu_math.py``'s,
in the same loop); and its one-step form (the engine's step calls, ``step_cpu.py``), which updates
the (b, d, w-1) state in place: PyTorch's per-tap ops read that state at stride w-1 and did not
vectorize (64 streams x 288 channels, width 4, 1 thread: 101 -> 17 us, 2026-12-07).

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

from streamssm.kernels.cpu_library import build_library, int64_rows, pointer, runs_in_c
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

// One step: x (b, d) at batch stride sxb (channels contiguous); weight_t (w, d); bias (d) or null; state
// (R, d, w-1) contiguous, its rows rows[0..b) (null: 0..b-1) shifted left by one column in place with x
// as their last; y (b, d) contiguous.
// S = w - 1 is a template argument, so that the state's interleaved columns vectorize.
template <int S>
static void conv1d_step(int64_t b, int64_t d, const float* __restrict__ x, int64_t sxb, const float* __restrict__ weight_t,
                        const float* __restrict__ bias, float* __restrict__ state, const int64_t* rows, int64_t silu,
                        float* __restrict__ y) {
    for (int64_t bi = 0; bi < b; ++bi) {
        float* __restrict__ st = state + (rows ? rows[bi] : bi) * d * S;
        const float* __restrict__ xb = x + bi * sxb;
        float* __restrict__ yb = y + bi * d;
        for (int64_t di = 0; di < d; ++di) {
            float past[S];
            for (int k = 0; k < S; ++k) past[k] = st[di * S + k];
            float acc = bias ? bias[di] : 0.f;
            for (int k = 0; k < S; ++k) acc += weight_t[k * d + di] * past[k];
            acc += weight_t[S * d + di] * xb[di];
            for (int k = 0; k + 1 < S; ++k) st[di * S + k] = past[k + 1];
            st[di * S + S - 1] = xb[di];
            yb[di] = acc;
        }
        if (silu)
            for (int64_t di = 0; di < d; ++di) yb[di] = streamssm_silu(yb[di]);
    }
}

extern "C" void streamssm_conv1d_step_f32(int64_t b, int64_t d, int64_t w, const float* x, int64_t sxb,
                                          const float* weight_t, const float* bias, float* state,
                                          const int64_t* rows, int64_t silu, float* y) {
    switch (w) {
        case 2: conv1d_step<1>(b, d, x, sxb, weight_t, bias, state, rows, silu, y); break;
        case 3: conv1d_step<2>(b, d, x, sxb, weight_t, bias, state, rows, silu, y); break;
        default: conv1d_step<3>(b, d, x, sxb, weight_t, bias, state, rows, silu, y); break;  // w = 4 (2..4 checked)
    }
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled conv and conv step, or None where no C++ compiler builds them."""
    return build_library("causal_conv1d_cpu", _SOURCE, {"streamssm_causal_conv1d_f32": "iiiipiiipppipp",
                                                        "streamssm_conv1d_step_f32": "iiipippppip"})


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            initial_state: torch.Tensor | None, traced: bool = False) -> bool:
    """Whether a call runs here: fp32 CPU tensors, no gradient wanted, a compiler; while traced,
    only for a caller that then calls the registered op (``traced``, ``cpu_ops.causal_conv1d_cpu``)."""
    return runs_in_c(library, (x, weight, bias, initial_state), traced_as=__name__ if traced else None)


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


def step_applies(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 traced: bool = False) -> bool:
    """Whether a step runs here: as :func:`applies` (``traced``: ``cpu_ops.conv1d_step_cpu``), with a
    contiguous state and channels contiguous in x."""
    return (conv_state.is_contiguous() and x.stride(1) == 1
            and runs_in_c(library, (x, weight, bias, conv_state), traced_as=__name__ if traced else None))


def conv1d_step_c(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """One step for :func:`step_applies` calls; **updates ``conv_state`` (R, d, w-1) in place** at
    rows ``rows`` (b,) (None: rows 0..b-1). x (b, d); weight (d, w); bias (d,).
    Returns y (b, d)."""
    b, d = x.shape
    w = weight.shape[1]
    weight_t = weight.t().contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = int64_rows(rows)  # held for the call: a converted copy must outlive pointer()
    y = torch.empty(b, d)
    library().streamssm_conv1d_step_f32(b, d, w, x.data_ptr(), x.stride(0), weight_t.data_ptr(), pointer(bias),
                                        conv_state.data_ptr(), pointer(rows), int(activation == "silu"), y.data_ptr())
    return y
