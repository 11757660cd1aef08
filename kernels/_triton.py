"""Elementwise ``@triton.jit`` helpers shared by the kernels, one of each (fp32 in, fp32 out).

    softplus(x)       torch's softplus (beta 1, threshold 20): x above 20, log(1 + e^x) below
    softplus_grad(x)  its derivative: sigmoid(x) up to 20, 1 above
    silu(x)           x * sigmoid(x)
    silu_grad(x)      its derivative: sigmoid(x) (1 + x (1 - sigmoid(x)))
    LOG2E, LN2        for exponentials taken as exp2(x * LOG2E) and logs as LN2 * log2(x)
    prefetch_l1(p, n, LINES)  a hint that brings n fp32 elements from p into L1 (no-op when interpreting)

Logs go through log2, a hardware instruction on NVIDIA GPUs, where ``tl.log`` is libdevice's
long polynomial (see ``mamba1/scan.py``). ``tl.exp`` in fp32 already compiles to
``ex2.approx(x * log2(e))`` there, and stays exact in the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from streamssm.kernels._common import interpreting

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch.nn.functional.softplus's default
#: The interpreter cannot run inline PTX: there the prefetch hint is left out (it changes no value).
PREFETCH_L1 = tl.constexpr(not interpreting())


@triton.jit
def softplus(x):
    """x above 20, else log1p(e^x). log1p keeps its relative accuracy for tiny e^x by Goldberg's
    trick log(u) * e / (u - 1), u = 1 + e rounded (the plain log(1 + e) is 0 below x ~ -17)."""
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    u = 1.0 + e
    tiny = u == 1.0
    log1p_e = tl.where(tiny, e, LN2 * tl.log2(u) * (e / tl.where(tiny, 1.0, u - 1.0)))
    return tl.where(x <= SOFTPLUS_THRESHOLD, log1p_e, x)


@triton.jit
def softplus_grad(x):
    """d softplus / dx, matching the threshold of :func:`softplus`."""
    return tl.where(x <= SOFTPLUS_THRESHOLD, tl.sigmoid(x), 1.0)


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def silu_grad(x):
    """d silu / dx."""
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def prefetch_l1(p, n, LINES: tl.constexpr):
    """Hint the contiguous span of n fp32 elements from pointer p into L1, one
    ``prefetch.global.L1`` per 128-byte line (LINES >= n / 32 lines, a power of two; addresses
    past the span are clamped to its last element). Use it for data read a little later, so the
    later load hits L1 instead of waiting on L2. Changes no value; left out in the interpreter."""
    if PREFETCH_L1:
        o = tl.minimum(tl.arange(0, LINES) * 32, n - 1)
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p + o],
                                  dtype=tl.int32, is_pure=False, pack=1)
