"""The skip term ``D * x`` of the SSD kernels: which kind of D a call has, and its load.

D is per head (h,), per head and channel (h, p), or per token (b, l, h) — Mamba-3's skip,
``D_h - c_t C_t.B_t``, changes with every token; the kernels read it packed as (L, h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_D, PER_HEAD, PER_CHANNEL, PER_TOKEN = 0, 1, 2, 3


def skip_kind(D: torch.Tensor | None) -> int:
    """The kernels' ``D_KIND`` of ``D``: none, (h,), (h, p) or (b, l, h)."""
    return NO_D if D is None else (PER_HEAD, PER_CHANNEL, PER_TOKEN)[D.dim() - 1]


def packed_skip(D: torch.Tensor | None) -> torch.Tensor | None:
    """D as the kernels read it, contiguous: per token (b, l, h) -> (1, L, h), still of its kind."""
    if D is None:
        return None
    return D.reshape(1, -1, D.shape[-1]).contiguous() if D.dim() == 3 else D.contiguous()


@triton.jit
def fixed_skip_weight(p_D, i_h, o_p, m_p, P, D_KIND: tl.constexpr):
    """D of head ``i_h`` when it does not change with the token (D_KIND 1 or 2): a (1, channels)
    row of channels ``o_p`` or a scalar; what a kernel may load once, before its token loop."""
    if D_KIND == 2:
        w = tl.load(p_D + i_h * P + o_p, mask=m_p, other=0.0)[None, :]
    else:
        w = tl.load(p_D + i_h)
    return w


@triton.jit
def skip_weight(p_D, tok, m_tok, i_h, o_p, m_p, H, P, D_KIND: tl.constexpr):
    """D of head ``i_h`` for tokens ``tok`` (packed) and channels ``o_p``, broadcastable to
    (tokens, channels): a (tokens, 1) column, a (1, channels) row or a scalar."""
    if D_KIND == 3:
        w = tl.load(p_D + tok * H + i_h, mask=m_tok, other=0.0)[:, None]
    else:
        w = fixed_skip_weight(p_D, i_h, o_p, m_p, P, D_KIND)
    return w
