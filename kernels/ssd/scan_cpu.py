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
demo's audio model) and 3.1-3.7x for p = 64, n = 128 (the d512 LM) at 1 thread; the (sequence,
head) pairs split over ``torch.get_num_threads()`` threads where each gets ~1M flops or more.
Gradients: the chunked scan.

The C source is compiled on first use and cached (``kernels/cpu_library.py``) and called through
ctypes, which releases the GIL during the call. Without a working C++ compiler :func:`library`
is None (logged once) and the chunked path runs instead.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from streamssm.kernels._common import FLOAT_DTYPES
from streamssm.kernels.cpu_library import build_library, int64_rows, pointer, runs_in_c, strided_rows
from streamssm.kernels.cpu_math import PARALLEL_FOR, ROWS16, VECTOR_MATH

_SOURCE = VECTOR_MATH + PARALLEL_FOR + ROWS16 + r"""

// One call: b sequences of l steps, h heads of p channels, B/C in g groups of n. Every input has its
// two last dims contiguous and is read through its (batch, step) strides: x, z (b, l, h, p); dt, w
// (b, l, h); B, C (b, l, g, n). dt is raw: dt_bias added and softplus applied here; w (the input's
// weight) null: the processed dt. D (h) (d_per_channel 0) or (h, p) (1) or null; z null: no gate.
// state (R, h, p, n) fp32 contiguous, updated in place at row rows[i] (rows null: row i) for
// sequence i; y (b, l, h, p) contiguous, written. threads: at most this many (torch's setting).
//
// A head's steps go in blocks of STEP_BLOCK: their step sizes and decays first (vectorized), then
// one of three walks of the state through the block, then the D and z terms. The walks (chosen by
// measurement on a 2-core EPYC, 2026-12-07):
//   registers   n = 16, p a multiple of 16, >= 8 steps: a block of 16 channels x 16 state columns
//               held in vector registers through the steps (the demo's p = n = 16);
//   transposed  n < 64, >= 8 steps: the state transposed to (n, p) in a scratch buffer, 16 channels
//               a vector, no horizontal sum per channel;
//   rows of 16  n = 16, p a multiple of 16, < 8 steps (the engine's one-step calls): each state row one
//               vector, the sums of 16 rows by one transposing tree (the in-place walk's per-row sums took
//               5x the time of a pass over the state: 64 streams x 4 heads x 64 x 16, 1 thread, 102 -> 74 us
//               a call, ~25 us of it Python's);
//   in place    otherwise (long state rows): rows of n, one sum per channel.
constexpr int64_t STEP_BLOCK = 64;
constexpr int64_t TRANSPOSE_MIN_STEPS = 8, TRANSPOSE_MAX_DSTATE = 63;

struct Steps {  // one head's inputs over a block of m steps, each at its step stride
    int64_t m;
    const float* x; int64_t sx;           // (m, p) from the head's first channel
    const float* B; int64_t sb;           // (m, n) of the head's group
    const float* C; int64_t sc;
    const float* weight;                  // (m,): dt after bias and softplus, or w
    const float* decay;                   // (m,): exp(dt A)
    float* y; int64_t sy;                 // (m, p), written without D and z
};

// 16 channels (rows of S at stride 16) x 16 state columns in 16 vector registers through the block
static inline void walk_registers(float* __restrict__ S, const Steps& st, int64_t c0) {
    float16v T[16];
    for (int ni = 0; ni < 16; ++ni)
        for (int j = 0; j < 16; ++j) T[ni][j] = S[j * 16 + ni];
    for (int64_t k = 0; k < st.m; ++k) {
        const float* __restrict__ Bt = st.B + k * st.sb;
        const float* __restrict__ Ct = st.C + k * st.sc;
        const float16v xv = load16(st.x + k * st.sx + c0) * st.weight[k];
        const float decay = st.decay[k];
        float16v acc0 = {}, acc1 = {};
        for (int ni = 0; ni < 16; ni += 2) {
            T[ni] = decay * T[ni] + xv * Bt[ni];
            T[ni + 1] = decay * T[ni + 1] + xv * Bt[ni + 1];
            acc0 += T[ni] * Ct[ni];
            acc1 += T[ni + 1] * Ct[ni + 1];
        }
        store16(st.y + k * st.sy + c0, acc0 + acc1);
    }
    for (int ni = 0; ni < 16; ++ni)
        for (int j = 0; j < 16; ++j) S[j * 16 + ni] = T[ni][j];
}

// one step of 16 channels on the transposed state T (n rows at stride p), xw the weighted input
static inline void step_16_channels(int64_t n, int64_t p, float* __restrict__ T, const float* __restrict__ xw,
                                    const float* __restrict__ Bt, const float* __restrict__ Ct, float decay,
                                    float* __restrict__ y) {
    const float16v xv = load16(xw);
    float16v acc0 = {}, acc1 = {};  // two accumulators: half the chain of dependent adds
    int64_t ni = 0;
    for (; ni + 2 <= n; ni += 2) {
        const float16v s = decay * load16(T + ni * p) + xv * Bt[ni];
        const float16v u = decay * load16(T + (ni + 1) * p) + xv * Bt[ni + 1];
        store16(T + ni * p, s);
        store16(T + (ni + 1) * p, u);
        acc0 += s * Ct[ni];
        acc1 += u * Ct[ni + 1];
    }
    if (ni < n) {
        const float16v s = decay * load16(T + ni * p) + xv * Bt[ni];
        store16(T + ni * p, s);
        acc0 += s * Ct[ni];
    }
    store16(y, acc0 + acc1);
}

// one step of one channel (the p % 16 rest) on the transposed state
static inline float step_1_channel(int64_t n, int64_t p, float* __restrict__ T, float xw, const float* __restrict__ Bt,
                                   const float* __restrict__ Ct, float decay) {
    float acc = 0.0f;
    for (int64_t ni = 0; ni < n; ++ni) {
        const float s = decay * T[ni * p] + xw * Bt[ni];
        T[ni * p] = s;
        acc += s * Ct[ni];
    }
    return acc;
}

static inline void walk_transposed(int64_t n, int64_t p, float* __restrict__ T, float* __restrict__ xw,
                                   const Steps& st) {
    for (int64_t k = 0; k < st.m; ++k) {
        const float* __restrict__ xt = st.x + k * st.sx;
        const float* __restrict__ Bt = st.B + k * st.sb;
        const float* __restrict__ Ct = st.C + k * st.sc;
        float* __restrict__ yt = st.y + k * st.sy;
        for (int64_t pi = 0; pi < p; ++pi) xw[pi] = st.weight[k] * xt[pi];
        int64_t pi = 0;
        for (; pi + 16 <= p; pi += 16) step_16_channels(n, p, T + pi, xw + pi, Bt, Ct, st.decay[k], yt + pi);
        for (; pi < p; ++pi) yt[pi] = step_1_channel(n, p, T + pi, xw[pi], Bt, Ct, st.decay[k]);
    }
}

// n = 16: each state row (a channel's 16 columns) one vector, updated in place; y of 16 channels at once
static inline void walk_rows16(int64_t p, float* __restrict__ S, const Steps& st) {
    for (int64_t k = 0; k < st.m; ++k) {
        const float16v Bv = load16(st.B + k * st.sb), Cv = load16(st.C + k * st.sc);
        const float* __restrict__ xt = st.x + k * st.sx;
        const float decay = st.decay[k], wk = st.weight[k];
        for (int64_t c0 = 0; c0 < p; c0 += 16) {
            float16v prod[16];
            for (int r = 0; r < 16; ++r) {
                float* __restrict__ row = S + (c0 + r) * 16;
                const float16v s = decay * load16(row) + (wk * xt[c0 + r]) * Bv;
                store16(row, s);
                prod[r] = s * Cv;
            }
            store16(st.y + k * st.sy + c0, streamssm_sum_rows16(prod));
        }
    }
}

static inline void walk_in_place(int64_t n, int64_t p, float* __restrict__ S, const Steps& st) {
    for (int64_t k = 0; k < st.m; ++k) {
        const float* __restrict__ xt = st.x + k * st.sx;
        const float* __restrict__ Bt = st.B + k * st.sb;
        const float* __restrict__ Ct = st.C + k * st.sc;
        for (int64_t pi = 0; pi < p; ++pi) {
            float* __restrict__ row = S + pi * n;
            const float xv = st.weight[k] * xt[pi], decay = st.decay[k];
            float acc = 0.0f;
            for (int64_t ni = 0; ni < n; ++ni) {
                const float s = decay * row[ni] + xv * Bt[ni];
                row[ni] = s;
                acc += s * Ct[ni];
            }
            st.y[k * st.sy + pi] = acc;
        }
    }
}

extern "C" void streamssm_ssd_scan_f32(
        int64_t b, int64_t l, int64_t h, int64_t p, int64_t n, int64_t g,
        const float* x, int64_t sxb, int64_t sxl, const float* dt, int64_t sdb, int64_t sdl,
        const float* w, int64_t swb, int64_t swl, const float* Bm, int64_t sbb, int64_t sbl,
        const float* Cm, int64_t scb, int64_t scl, const float* A, const float* dt_bias, int64_t softplus,
        const float* D, int64_t d_per_channel, const float* z, int64_t szb, int64_t szl,
        float* state, const int64_t* rows, float* y, int64_t threads) {
    const int64_t r = h / g;
    const bool many = l >= TRANSPOSE_MIN_STEPS;
    const bool in_registers = many && n == 16 && p % 16 == 0;
    const bool transposed = many && !in_registers && n <= TRANSPOSE_MAX_DSTATE;
    const bool rows16 = !many && n == 16 && p % 16 == 0;
    // the (sequence, head) pairs are independent: split over threads
    streamssm_parallel_for(b * h, threads, 4 * l * p * n, [=](int64_t begin, int64_t end) {
        std::vector<float> scratch((transposed ? n * p + p : 0) + 2 * STEP_BLOCK);
        float* __restrict__ weights = scratch.data();
        float* __restrict__ decays = weights + STEP_BLOCK;
        float* __restrict__ T = decays + STEP_BLOCK;  // transposed: (n, p), then p for the weighted input
        for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t bi = pair / h, hi = pair % h;
            float* S = state + ((rows ? rows[bi] : bi) * h + hi) * p * n;
            if (transposed)
                for (int64_t pi = 0; pi < p; ++pi)
                    for (int64_t ni = 0; ni < n; ++ni) T[ni * p + pi] = S[pi * n + ni];
            const int64_t gi = hi / r;
            const float a = A[hi], bias = dt_bias ? dt_bias[hi] : 0.0f;
            const float* Dh = D ? D + hi * (d_per_channel ? p : 1) : nullptr;
            for (int64_t t0 = 0; t0 < l; t0 += STEP_BLOCK) {
                const int64_t m = l - t0 < STEP_BLOCK ? l - t0 : STEP_BLOCK;
                const float* dtb = dt + bi * sdb + t0 * sdl + hi;
                if (softplus)  // a loop apiece: one with the condition inside does not vectorize
                    for (int64_t k = 0; k < m; ++k) weights[k] = streamssm_softplus(dtb[k * sdl] + bias);
                else
                    for (int64_t k = 0; k < m; ++k) weights[k] = dtb[k * sdl] + bias;
                for (int64_t k = 0; k < m; ++k) decays[k] = streamssm_exp(weights[k] * a);
                if (w)
                    for (int64_t k = 0; k < m; ++k) weights[k] = w[bi * swb + (t0 + k) * swl + hi];
                const Steps st{m, x + bi * sxb + t0 * sxl + hi * p, sxl, Bm + bi * sbb + t0 * sbl + gi * n, sbl,
                               Cm + bi * scb + t0 * scl + gi * n, scl, weights, decays,
                               y + ((bi * l + t0) * h + hi) * p, h * p};
                if (in_registers)
                    for (int64_t c0 = 0; c0 < p; c0 += 16) walk_registers(S + c0 * 16, st, c0);
                else if (transposed)
                    walk_transposed(n, p, T, T + n * p, st);
                else if (rows16)
                    walk_rows16(p, S, st);
                else
                    walk_in_place(n, p, S, st);
                for (int64_t k = 0; k < m; ++k) {  // y += D x, y *= silu(z)
                    float* __restrict__ yt = st.y + k * st.sy;
                    const float* __restrict__ xt = st.x + k * st.sx;
                    if (Dh)
                        for (int64_t pi = 0; pi < p; ++pi) yt[pi] += Dh[d_per_channel ? pi : 0] * xt[pi];
                    if (z) {
                        const float* __restrict__ zt = z + bi * szb + (t0 + k) * szl + hi * p;
                        for (int64_t pi = 0; pi < p; ++pi) yt[pi] *= streamssm_silu(zt[pi]);
                    }
                }
            }
            if (transposed)
                for (int64_t pi = 0; pi < p; ++pi)
                    for (int64_t ni = 0; ni < n; ++ni) S[pi * n + ni] = T[ni * p + pi];
        }
    });
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled scan (:func:`~streamssm.kernels.cpu_library.build_library`), or None where no
    C++ compiler builds it."""
    return build_library("ssd_scan_cpu", _SOURCE, {"streamssm_ssd_scan_f32": "i" * 6 + "pii" * 5 + "ppipipiipppi"})


def applies(*tensors: torch.Tensor | None, traced: bool = False) -> bool:
    """Whether a call on these tensors (None: absent) runs here: CPU, fp32/fp16/bf16, no gradient
    wanted, a compiler; while traced, only for a caller that then calls the registered op
    (``traced``: ``cpu_ops.ssd_scan_pool_cpu``)."""
    return runs_in_c(library, tensors, FLOAT_DTYPES, traced_as=__name__ if traced else None)


def scan_into(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
              dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
              input_weight: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The C scan, **updating ``state`` (R, h, p, n) fp32 contiguous in place** at rows ``rows``
    (b,) int64 (None: rows 0..b-1): x, z (b, l, h, p); dt raw (b, l, h) (``dt_bias`` added and
    softplus applied here, as ``ssd_scan`` does), input_weight (b, l, h) or None (dt after them);
    A, dt_bias (h,); B, C (b, l, g, n); D (h,) or (h, p). Inputs of any float dtype and strides
    (the blocks' slices of one projection are read in place). Returns y (b, l, h, p) fp32 with
    the D and z terms. Needs :func:`library`."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    strided = [strided_rows(t) for t in (x, dt, input_weight, B, C)]
    A, dt_bias, D = (None if t is None else t.float().contiguous() for t in (A, dt_bias, D))
    z, szb, szl = strided_rows(z)
    rows = int64_rows(rows)
    y = torch.empty(b, l, h, p)
    library().streamssm_ssd_scan_f32(
        b, l, h, p, n, g, *(v for t, sb, sl in strided for v in (pointer(t), sb, sl)), A.data_ptr(), pointer(dt_bias),
        int(dt_softplus), pointer(D), int(D is not None and D.dim() == 2), pointer(z), szb, szl, state.data_ptr(),
        pointer(rows), y.data_ptr(), torch.get_num_threads())
    return y


def ssd_rows_sequential(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        state: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_torch._ssd_rows``'s contract without chunks: x (b, l, h, p); dt (b, l, h) after
    bias/softplus, w (b, l, h) and state (b, h, p, n); A (h,); B, C (b, l, g, n). Returns y
    (b, l, h, p) fp32 (no D/z) and the final state (a new tensor: ``state`` is not changed)."""
    final = state.to(torch.float32, copy=True).contiguous()
    return scan_into(final, x, dt, A, B, C, input_weight=w), final
