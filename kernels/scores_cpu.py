"""Log-probabilities of given tokens in C for the CPU: the language-model scores of the Streamer's
calls that want no full log-softmax (the service's ``include: ["scores"]``), in place of a gather
and ``torch.logsumexp`` (a max pass, an exp pass into a new tensor, a sum and a log).

Shape legend: b batch, t steps, o classes.

    score[b, t] = logits[b, t, token[b, t]] - log(sum_k exp(logits[b, t, k]))

in fp32, one pass for the max and one for the sum of exponentials (``cpu_math.py``'s exp) per row,
nothing written but the scores. Built and loaded by ``kernels/cpu_library.py``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from streamssm.kernels.cpu_library import build_library, runs_in_c
from streamssm.kernels.cpu_math import VECTOR_MATH

_SOURCE = VECTOR_MATH + r"""
#include <cmath>

// logits (b, t, o) at strides (sb, st, 1); tokens (b, t) int64 at strides (kb, kt), each in [0, o);
// scores (b, t) contiguous
extern "C" void streamssm_token_log_probs_f32(int64_t b, int64_t t, int64_t o, const float* logits, int64_t sb,
                                              int64_t st, const int64_t* tokens, int64_t kb, int64_t kt,
                                              float* scores) {
    constexpr int64_t LANES = 16;  // independent maxima: the max reduction vectorizes without -ffast-math
    for (int64_t bi = 0; bi < b; ++bi) {
        for (int64_t ti = 0; ti < t; ++ti) {
            const float* __restrict__ row = logits + bi * sb + ti * st;
            float lanes[LANES];
            for (int64_t j = 0; j < LANES; ++j) lanes[j] = -INFINITY;
            int64_t i = 0;
            for (; i + LANES <= o; i += LANES)
                for (int64_t j = 0; j < LANES; ++j) lanes[j] = row[i + j] > lanes[j] ? row[i + j] : lanes[j];
            float top = -INFINITY;
            for (; i < o; ++i) top = row[i] > top ? row[i] : top;
            for (int64_t j = 0; j < LANES; ++j) top = lanes[j] > top ? lanes[j] : top;
            float sum = 0.0f;
            for (int64_t k = 0; k < o; ++k) sum += streamssm_exp(row[k] - top);
            scores[bi * t + ti] = row[tokens[bi * kb + ti * kt]] - top - std::log(sum);
        }
    }
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled scores, or None where no C++ compiler builds them."""
    return build_library("scores_cpu", _SOURCE, {"streamssm_token_log_probs_f32": "iiipiipiip"})


def applies(logits: torch.Tensor) -> bool:
    """Whether a call runs here: fp32 CPU logits, no gradient wanted, not traced, a compiler."""
    return runs_in_c(library, (logits,))


def token_log_probs_cpu(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits (b, t, o) fp32 (any strides), tokens (b, t) int64 in [0, o) -> log_softmax(logits)
    at each token, (b, t) fp32. For :func:`applies` calls."""
    b, t, o = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = tokens.to(torch.int64)
    scores = torch.empty(b, t)
    library().streamssm_token_log_probs_f32(b, t, o, logits.data_ptr(), logits.stride(0), logits.stride(1),
                                            tokens.data_ptr(), tokens.stride(0), tokens.stride(1), scores.data_ptr())
    return scores
