"""Vectorizable exp, log, SiLU and softplus for the C kernels of the CPU (a C++ snippet their sources
begin with), a parallel for over std::threads for the scans, and the 16-lane vector type with a
sum of 16 vectors' lanes (the one-step kernels' outputs).

The C library's ``expf`` is a call per element, which the loops around it cannot vectorize
without -ffast-math (glibc's vector variants), and -ffast-math would link GCC's crtfastmath into the
process, flushing denormals for all of PyTorch. These are plain arithmetic the compiler vectorizes:
Cody-Waite range reduction to r in [-ln 2 / 2, ln 2 / 2], a degree-6 polynomial for exp(r) (the
Cephes coefficients) and 2^k put into the exponent bits; the input clamped to [-87, 88] (no
infinities or denormals come out); log likewise (Cephes' mantissa polynomial; positive normal
inputs). Errors against float64: ``tests/test_cpu_math.py``.
"""

VECTOR_MATH = r"""
#include <cstdint>
#include <cstring>

static inline float streamssm_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = x * 1.44269504088896341f;                       // x / ln 2
    const int32_t e = (int32_t)(k + (k >= 0.0f ? 0.5f : -0.5f));     // round to nearest
    const float ef = (float)e;
    // x - e ln 2 with ln 2 in two parts, as fused multiply-adds: -fassociative-math (the libraries'
    // flags) may not merge the parts back into one rounded product (1.6e-6 relative error at 88)
    float r = __builtin_fmaf(ef, -0.693359375f, x);
    r = __builtin_fmaf(ef, 2.12194440e-4f, r);
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;
    const int32_t bits = (e + 127) << 23;                            // 2^e
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return q * scale;
}

static inline float streamssm_silu(float v) { return v / (1.0f + streamssm_exp(-v)); }

// x > 0 and normal: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by the Cephes polynomial
static inline float streamssm_log(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    int32_t e = ((bits >> 23) & 0xff) - 126;
    bits = (bits & 0x007fffff) | 0x3f000000;                         // m in [0.5, 1)
    float m;
    std::memcpy(&m, &bits, sizeof m);
    const bool low = m < 0.707106781186547524f;
    e = low ? e - 1 : e;
    m = low ? m + m - 1.0f : m - 1.0f;
    const float m2 = m * m;
    float q = 7.0376836292e-2f;
    q = q * m - 1.1514610310e-1f;
    q = q * m + 1.1676998740e-1f;
    q = q * m - 1.2420140846e-1f;
    q = q * m + 1.4249322787e-1f;
    q = q * m - 1.6668057665e-1f;
    q = q * m + 2.0000714765e-1f;
    q = q * m - 2.4999993993e-1f;
    q = q * m + 3.3333331174e-1f;
    const float ef = (float)e;
    float r = q * m * m2 - 2.12194440e-4f * ef - 0.5f * m2;
    return m + r + 0.693359375f * ef;
}

// PyTorch's softplus (threshold 20): log(1 + u), u = exp(v). For v <= 0 (u <= 1) as 2 atanh(s) with
// s = u / (2 + u) <= 1/3 by its series (terms to s^17): 1 + u rounds away most of a small u, s does not
static inline float streamssm_softplus(float v) {
    const float u = streamssm_exp(v);
    const float s = u / (2.0f + u), w = s * s;
    float q = 1.0f / 17.0f;
    q = q * w + 1.0f / 15.0f;
    q = q * w + 1.0f / 13.0f;
    q = q * w + 1.0f / 11.0f;
    q = q * w + 1.0f / 9.0f;
    q = q * w + 1.0f / 7.0f;
    q = q * w + 1.0f / 5.0f;
    q = q * w + 1.0f / 3.0f;
    q = q * w + 1.0f;
    // both branches computed, then selected: a loop over it vectorizes (a conditional call of the log did not)
    const float large = streamssm_log(1.0f + u), small = 2.0f * s * q;
    const float r = v > 0.0f ? large : small;
    return v > 20.0f ? v : r;
}
"""


PARALLEL_FOR = r"""
#include <thread>
#include <vector>

// body(begin, end) over [0, count) split into contiguous ranges over up to `threads` threads (this
// one included), each range at least ~1M flops (`flops_per_item` each) to pay for a thread's start
// (~30 us); a thread that cannot start leaves its range to this one.
template <class Body>
static void streamssm_parallel_for(int64_t count, int64_t threads, int64_t flops_per_item, Body body) {
    const int64_t min_items = (int64_t(1) << 20) / (flops_per_item > 0 ? flops_per_item : 1) + 1;
    int64_t use = count / min_items < threads ? count / min_items : threads;
    if (use <= 1) {
        body(int64_t(0), count);
        return;
    }
    std::vector<std::thread> pool;
    for (int64_t k = 1; k < use; ++k) {
        const int64_t lo = count * k / use, hi = count * (k + 1) / use;
        try {
            pool.emplace_back(body, lo, hi);
        } catch (...) {
            body(lo, hi);
        }
    }
    body(int64_t(0), count / use);
    for (auto& thread : pool) thread.join();
}
"""

ROWS16 = r"""
typedef float float16v __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2
typedef int32_t int16v __attribute__((vector_size(64)));

static inline float16v load16(const float* p) { float16v v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store16(float* p, float16v v) { std::memcpy(p, &v, sizeof v); }

// streamssm_exp of 16 lanes in vector arithmetic (the same steps; where the scalar form sits in a loop
// nest the compiler does not vectorize, this one is 1.4x faster than its loop over 16 floats)
static inline float16v streamssm_exp16(float16v x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float16v k = x * 1.44269504088896341f;
    const int16v e = __builtin_convertvector(k + (k >= 0.0f ? 0.5f : -0.5f), int16v);
    const float16v ef = __builtin_convertvector(e, float16v);
    float16v r = ef * -0.693359375f + x;
    r = ef * 2.12194440e-4f + r;
    float16v q = r * 1.9875691500e-4f + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;
    const int16v bits = (e + 127) << 23;
    float16v scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return q * scale;
}

// lane r of the result: the sum of the 16 lanes of v[r]. One transposing tree of 15 vector adds and 30
// shuffles where the compiler has __builtin_shufflevector (GCC >= 12, clang), else a sum per vector.
static inline float16v streamssm_sum_rows16(const float16v* v) {
#if defined(__clang__) || __GNUC__ >= 12
    float16v a[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)  // lanes 0-7: 8 partial sums of row 2i, 8-15: of row 2i+1
        a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)  // 4 lanes a row: rows 4i .. 4i+3
        c[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)  // 2 lanes a row: rows 8i .. 8i+7
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
    float16v out = {};
    for (int r = 0; r < 16; ++r)
        for (int j = 0; j < 16; ++j) out[r] += v[r][j];
    return out;
#endif
}
"""
