"""Sequential Mamba-1 selective scan in C for the CPU: the "torch" backend's path for calls that need
no gradient (``infer``, ``generate``'s prompt, the serving engine's chunked calls, zarr inference) of
Mamba-1 models, imported ones included.

Shape legend: b batch, l length, d channels, n dstate, g groups of B/C.

Same recurrence as ``reference.py`` in fp32, 16 channels at a time, their (16, n) state walked
through time in an L1 buffer:

    delta_t = softplus(delta_t + bias);  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t
    y_t = h_t C_t + D u_t;  y_t *= silu(z_t)

The d n exponentials a step are the work (``cpu_math.py``'s exp, vectorized over the 16 channels);
the chunked PyTorch scan (``chunked_torch.py``) spends ~10 ns a state update on this machine
through its materialised (chunk, d, n) tensors. Gradients, grouped B/C whose groups split a block of
16 channels, float64: the chunked scan. The (sequence, block) pairs split over
``torch.get_num_threads()`` threads. Built and loaded by ``kernels/cpu_library.py``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from streamssm.kernels._common import FLOAT_DTYPES
from streamssm.kernels.cpu_library import build_library, int64_rows, pointer, runs_in_c, strided_rows
from streamssm.kernels.cpu_math import PARALLEL_FOR, ROWS16, VECTOR_MATH

_SOURCE = VECTOR_MATH + PARALLEL_FOR + ROWS16 + r"""

static inline float16v load16(const float* p, int64_t count) {  // count < 16: the rest zeros
    float16v v = {};
    std::memcpy(&v, p, count * sizeof(float));
    return v;
}

static inline void store16(float* p, float16v v, int64_t count) { std::memcpy(p, &v, count * sizeof(float)); }

// u, delta, z (b, l, d) at strides (su, sl) etc., channels contiguous; B, C (b, l, g, n) likewise;
// A (d, n); D, bias (d) or null; state (b, d, n) fp32 contiguous, the initial state, updated in
// place; y (b, l, d) contiguous; threads: at most this many. A block of 16 channels lies in one
// group of B/C (the caller's check).
extern "C" void streamssm_selective_scan_f32(
        int64_t b, int64_t l, int64_t d, int64_t n, int64_t g,
        const float* u, int64_t sub, int64_t sul, const float* delta, int64_t sdb, int64_t sdl,
        const float* z, int64_t szb, int64_t szl, const float* Bm, int64_t sbb, int64_t sbl,
        const float* Cm, int64_t scb, int64_t scl, const float* A, const float* D, const float* bias,
        int64_t softplus, float* state, float* y, int64_t threads) {
    const int64_t per_group = d / g, blocks = (d + 15) / 16;
    // the (sequence, block of 16 channels) pairs are independent: split over threads
    streamssm_parallel_for(b * blocks, threads, 40 * 16 * l * n, [=](int64_t begin, int64_t end) {
        float16v S[256], Acol[256];  // the block's state and A, a vector of 16 channels per state column
        for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t bi = pair / blocks, c0 = pair % blocks * 16;
            const int64_t cnt = d - c0 < 16 ? d - c0 : 16;
            float* St = state + (bi * d + c0) * n;
            for (int64_t ni = 0; ni < n; ++ni) {
                S[ni] = float16v{};
                Acol[ni] = float16v{};
                for (int64_t j = 0; j < cnt; ++j) {
                    S[ni][j] = St[j * n + ni];
                    Acol[ni][j] = A[(c0 + j) * n + ni];
                }
            }
            const float16v Dv = D ? load16(D + c0, cnt) : float16v{};
            const float16v bv = bias ? load16(bias + c0, cnt) : float16v{};
            const int64_t gi = c0 / per_group;
            for (int64_t t = 0; t < l; ++t) {
                const float16v uv = load16(u + bi * sub + t * sul + c0, cnt);
                float dl[16];
                const float16v raw = load16(delta + bi * sdb + t * sdl + c0, cnt) + bv;
                std::memcpy(dl, &raw, sizeof dl);
                if (softplus)
                    for (int j = 0; j < 16; ++j) dl[j] = streamssm_softplus(dl[j]);
                float16v dv;
                std::memcpy(&dv, dl, sizeof dv);
                const float16v du = dv * uv;
                const float* __restrict__ Bt = Bm + bi * sbb + t * sbl + gi * n;
                const float* __restrict__ Ct = Cm + bi * scb + t * scl + gi * n;
                float16v acc0 = {}, acc1 = {};
                for (int64_t ni = 0; ni < n; ++ni) {
                    const float16v arg = dv * Acol[ni];
                    float e[16];
                    std::memcpy(e, &arg, sizeof e);
                    for (int j = 0; j < 16; ++j) e[j] = streamssm_exp(e[j]);
                    float16v decay;
                    std::memcpy(&decay, e, sizeof decay);
                    S[ni] = decay * S[ni] + du * Bt[ni];
                    if (ni & 1) acc1 += S[ni] * Ct[ni]; else acc0 += S[ni] * Ct[ni];
                }
                float16v out = acc0 + acc1 + Dv * uv;
                if (z) {
                    float zs[16];
                    const float16v zv = load16(z + bi * szb + t * szl + c0, cnt);
                    std::memcpy(zs, &zv, sizeof zs);
                    for (int j = 0; j < 16; ++j) zs[j] = streamssm_silu(zs[j]);
                    float16v gate;
                    std::memcpy(&gate, zs, sizeof gate);
                    out *= gate;
                }
                store16(y + (bi * l + t) * d + c0, out, cnt);
            }
            for (int64_t ni = 0; ni < n; ++ni)
                for (int64_t j = 0; j < cnt; ++j) St[j * n + ni] = S[ni][j];
        }
    });
}

// One step (the engine's step calls): u, delta, z (b, d) at batch strides, channels contiguous; B, C
// (b, g, n) at batch strides; A (d, n); D, bias (d) or null; state (R, d, n) contiguous, its rows
// rows[0..b) (null: 0..b-1) updated in place; y (b, d) contiguous. n and d multiples of 16, a block of
// 16 channels in one group. Each channel's state row is n/16 vectors walked in place (no transposition:
// the scan's (16, n) block costs more to transpose than one step), the 16 channels' outputs summed by
// one tree.
extern "C" void streamssm_selective_step_f32(
        int64_t b, int64_t d, int64_t n, int64_t g, const float* u, int64_t su, const float* delta, int64_t sd,
        const float* z, int64_t sz, const float* Bm, int64_t sb, const float* Cm, int64_t sc, const float* A,
        const float* D, const float* bias, int64_t softplus, float* state, const int64_t* rows, float* y,
        int64_t threads) {
    const int64_t per_group = d / g, blocks = d / 16;
    streamssm_parallel_for(b * blocks, threads, 40 * 16 * n, [=](int64_t begin, int64_t end) {
        for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t bi = pair / blocks, c0 = pair % blocks * 16;
            const float* __restrict__ Bt = Bm + bi * sb + c0 / per_group * n;
            const float* __restrict__ Ct = Cm + bi * sc + c0 / per_group * n;
            const float* __restrict__ ub = u + bi * su + c0;
            // a loop apiece: one with a condition inside does not vectorize (scalar softplus and SiLU of
            // every channel cost more than the state's update)
            float dl[16], du[16], gate[16];
            for (int j = 0; j < 16; ++j) dl[j] = delta[bi * sd + c0 + j];
            if (bias)
                for (int j = 0; j < 16; ++j) dl[j] += bias[c0 + j];
            if (softplus)
                for (int j = 0; j < 16; ++j) dl[j] = streamssm_softplus(dl[j]);
            for (int j = 0; j < 16; ++j) du[j] = dl[j] * ub[j];
            if (z)
                for (int j = 0; j < 16; ++j) gate[j] = streamssm_silu(z[bi * sz + c0 + j]);
            float16v prod[16];
            for (int r = 0; r < 16; ++r) {
                float* __restrict__ row = state + ((rows ? rows[bi] : bi) * d + c0 + r) * n;
                const float* __restrict__ Ar = A + (c0 + r) * n;
                float16v acc = {};
                for (int64_t v = 0; v < n; v += 16) {
                    const float16v decay = streamssm_exp16(load16(Ar + v) * dl[r]);
                    const float16v s = decay * load16(row + v) + du[r] * load16(Bt + v);
                    store16(row + v, s);
                    acc += s * load16(Ct + v);
                }
                prod[r] = acc;
            }
            float out[16];
            store16(out, streamssm_sum_rows16(prod));
            if (D)
                for (int j = 0; j < 16; ++j) out[j] += D[c0 + j] * ub[j];
            if (z)
                for (int j = 0; j < 16; ++j) out[j] *= gate[j];
            std::memcpy(y + bi * d + c0, out, sizeof out);
        }
    });
}
"""

MAX_DSTATE = 256  # the kernel's state buffer: 256 vectors of 16 channels


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled scan, or None where no C++ compiler builds it."""
    return build_library("selective_scan_cpu", _SOURCE,
                         {"streamssm_selective_scan_f32": "i" * 5 + "pii" * 5 + "pppippi",
                          "streamssm_selective_step_f32": "iiii" + "pi" * 5 + "pppipppi"})


def applies(u: torch.Tensor, B: torch.Tensor, *others: torch.Tensor | None, traced: bool = False) -> bool:
    """Whether a call on u (b, d, l), B and ``others`` (None: absent) runs here: CPU, fp32/fp16/bf16,
    no gradient wanted, a compiler, d_state <= 256, and B/C groups that do not split a block of 16
    channels (B (b, n, l) or (b, g, n, l) with d / g a multiple of 16); while traced, only for a
    caller that then calls the registered op (``traced``: ``cpu_ops.selective_scan_cpu``)."""
    d, n = u.shape[1], B.shape[-2]
    groups_fit = B.dim() == 3 or B.shape[1] == 1 or (d // B.shape[1]) % 16 == 0
    return groups_fit and n <= MAX_DSTATE and runs_in_c(library, (u, B, *others), FLOAT_DTYPES,
                                                        traced_as=__name__ if traced else None)


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       initial_state: torch.Tensor | None = None, return_final_state: bool = False):
    """``selective_scan``'s contract for :func:`applies` calls: u, delta, z (b, d, l); A (d, n);
    B, C (b, n, l) or (b, g, n, l); D, delta_bias (d,); initial_state (b, d, n). Returns y (b, d, l)
    in u.dtype (a view of a channel-last tensor) [, final_state (b, d, n) fp32]."""
    b, d, l = u.shape
    n = A.shape[1]
    g = 1 if B.dim() == 3 else B.shape[1]
    # (b, ..., l) -> (b, l, ...): the blocks' views of channel-last tensors are read in place
    inputs = [strided_rows(None if t is None else t.movedim(-1, 1)) for t in (u, delta, z, B, C)]
    A, D, bias = (None if t is None else t.float().contiguous() for t in (A, D, delta_bias))
    state = (torch.zeros(b, d, n) if initial_state is None
             else initial_state.to(torch.float32, copy=True).contiguous())
    y = torch.empty(b, l, d)
    library().streamssm_selective_scan_f32(b, l, d, n, g, *(v for t, sb, sl in inputs for v in (pointer(t), sb, sl)),
                                           A.data_ptr(), pointer(D), pointer(bias), int(delta_softplus), state.data_ptr(),
                                           y.data_ptr(), torch.get_num_threads())
    y = y.to(u.dtype).transpose(1, 2)
    return (y, state) if return_final_state else y


def step_applies(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, *others: torch.Tensor | None, traced: bool = False) -> bool:
    """Whether one step runs in C: fp32 CPU tensors, no gradient, a contiguous state, d and n multiples
    of 16 with a block of 16 channels in one group of B/C, channels and state columns contiguous (and
    B/C's groups one after another); while traced, only for a caller that then calls the registered
    op (``traced``: ``cpu_ops.selective_scan_step_cpu``)."""
    d, n = A.shape
    g = 1 if B.dim() == 2 else B.shape[1]
    rows_fit = all(t is None or t.stride(-1) == 1 for t in (u, delta, B, C, *others))
    rows_fit = rows_fit and (g == 1 or (B.stride(1) == n and C.stride(1) == n))
    return (d % 16 == 0 and n % 16 == 0 and (d // g) % 16 == 0 and state.is_contiguous() and A.is_contiguous()
            and rows_fit and runs_in_c(library, (state, u, delta, A, B, C, *others),
                                       traced_as=__name__ if traced else None))


def selective_scan_step_c(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                          B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                          delta_bias: torch.Tensor | None, delta_softplus: bool,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """One step for :func:`step_applies` calls; **updates ``state`` (R, d, n) in place** at rows
    ``rows`` (b,) (None: rows 0..b-1). u, delta, z (b, d); A (d, n); B, C (b, n) or
    (b, g, n); D, delta_bias (d,). Returns y (b, d) fp32."""
    b, d = u.shape
    n = A.shape[1]
    g = 1 if B.dim() == 2 else B.shape[1]
    D, bias = (None if t is None else t.contiguous() for t in (D, delta_bias))
    rows = int64_rows(rows)  # held for the call: a converted copy must outlive pointer()
    y = torch.empty(b, d)
    library().streamssm_selective_step_f32(
        b, d, n, g, u.data_ptr(), u.stride(0), delta.data_ptr(), delta.stride(0), pointer(z),
        0 if z is None else z.stride(0), B.data_ptr(), B.stride(0), C.data_ptr(), C.stride(0), A.data_ptr(),
        pointer(D), pointer(bias), int(delta_softplus), state.data_ptr(), pointer(rows), y.data_ptr(),
        torch.get_num_threads())
    return y
