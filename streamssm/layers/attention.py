"""Causal multi-head attention with rotary positions and a sliding window: the hybrid layer.

Shape legend: b batch, l length, d d_model, h heads, k head_dim = d / h, w window.

    q, k, v = qkv(u)                          (b, h, l, k); q, k rotated (RoPE) at absolute positions
    query at position P attends keys at positions P - w + 1 .. P (w keys, itself included)
    out = out_proj(attention)                 (b, l, d)

Streaming state, bounded whatever the stream length (a ``LayerState`` like every block, so
pools, snapshots and serialization treat all layers alike):
    conv: (b, 1) int64                        steps seen so far (the next position)
    ssm:  (b, 2, h, w, k) fp32                ring buffer of the last w rotated keys [0] and
                                              values [1]; position P sits in slot P % w
Unfilled slots (the first w - 1 steps) are zeros and masked out. ``forward`` over a chunk
reads the ring in time order, attends over [ring, chunk] with a banded mask (query blocks keep
memory at O(b·h·block·(w + block))), and writes the last w keys/values back; ``step`` writes
one slot and attends over the ring. Rows of a batch may sit at different positions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from streamssm.state import LayerState

if TYPE_CHECKING:
    from streamssm.models import ArchConfig


def rotary(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate halves of x (b, h, l, k) by angles pos (b, l) * base^(-2i/k); fp32 math.

    Angles are formed in fp64 (reduced mod 2π) so positions in the millions stay exact.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)  # (k/2,)
    # 2π as an fp64 tensor constant: the ONNX exporter turns a Python float operand (also a fill
    # value) into an fp32 constant, which shifted exported angles by ~pos * 3e-8 rad (1e-2 at
    # position 1e6). On CUDA it is filled on the device instead: a copy from host memory cannot
    # be captured in a CUDA graph (and exports run on the CPU)
    if x.is_cuda:
        two_pi = torch.full((), 2 * math.pi, dtype=torch.float64, device=x.device)
    else:
        two_pi = torch.tensor(2 * math.pi, dtype=torch.float64)
    ang = torch.remainder(pos.double()[..., None] * inv_freq, two_pi)  # (b, l, k/2)
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # (b, 1, l, k/2)
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class SlidingWindowAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, rope_base: float = 10000.0, block_size: int = 256):
        """``cfg``: d_model, attention_heads, attention_window (checked by the config);
        ``block_size``: queries per block of the chunked forward (memory bound)."""
        super().__init__()
        d_model, heads = cfg.d_model, cfg.attention_heads
        self.d_model, self.heads, self.head_dim, self.window = d_model, heads, d_model // heads, cfg.attention_window
        self.rope_base, self.block_size = rope_base, max(1, block_size)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> LayerState:
        return LayerState(
            conv=torch.zeros(batch, 1, device=device, dtype=torch.int64),
            ssm=torch.zeros(batch, 2, self.heads, self.window, self.head_dim, device=device, dtype=torch.float32),
        )

    def _qkv(self, u: torch.Tensor, pos: torch.Tensor):
        """u (b, l, d), pos (b, l) -> rotated q, k and v, each (b, h, l, k)."""
        b, l, _ = u.shape
        q, k, v = self.qkv(u).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base), v

    def forward(self, u: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        """u (b, l, d) -> (y (b, l, d), new state)."""
        b, l, _ = u.shape
        w = self.window
        if state is None:
            state = self.init_state(b, u.device, u.dtype)
        pos0 = state.conv[:, 0]  # (b,)
        steps = torch.arange(l, device=u.device)
        qpos = pos0[:, None] + steps  # (b, l)
        q, k, v = self._qkv(u, qpos)
        # ring in time order: entry j holds position pos0 - w + j, kept in slot (pos0 + j) % w
        order = (pos0[:, None] + torch.arange(w, device=u.device)) % w  # (b, w)
        ring = state.ssm.gather(3, order[:, None, None, :, None].expand_as(state.ssm))  # (b, 2, h, w, k)
        keys = torch.cat([ring[:, 0].to(k.dtype), k], dim=2)  # (b, h, w + l, k)
        values = torch.cat([ring[:, 1].to(v.dtype), v], dim=2)
        kpos = pos0[:, None] - w + torch.arange(w + l, device=u.device)  # (b, w + l)
        outs = []
        for i0 in range(0, l, self.block_size):
            i1 = min(i0 + self.block_size, l)
            qp, kp = qpos[:, i0:i1, None], kpos[:, None, i0 : w + i1]  # (b, q, 1), (b, 1, w + q)
            mask = (kp <= qp) & (kp > qp - w) & (kp >= 0)  # (b, q, w + q)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, i0:i1], keys[:, :, i0 : w + i1], values[:, :, i0 : w + i1], attn_mask=mask[:, None]
            ))
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, l, self.d_model)  # (b, l, d)
        # the last w keys/values (positions pos0 + l - w ..) back into their slots
        last = torch.stack([keys[:, :, -w:], values[:, :, -w:]], dim=1).float()  # (b, 2, h, w, k)
        slots = (pos0[:, None] + l + torch.arange(w, device=u.device)) % w  # (b, w)
        new_ring = torch.empty_like(state.ssm).scatter(3, slots[:, None, None, :, None].expand_as(last), last)
        return self.out_proj(y), LayerState(state.conv + l, new_ring)

    def step(self, u_t: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """u_t (b, d) -> (y_t (b, d), new state); ``state`` is not modified."""
        b = u_t.shape[0]
        w = self.window
        pos0 = state.conv[:, 0]  # (b,)
        q, k, v = self._qkv(u_t[:, None], pos0[:, None])  # (b, h, 1, k)
        ring = state.ssm.clone()
        rows = torch.arange(b, device=u_t.device)
        ring[rows, :, :, pos0 % w] = torch.stack([k[:, :, 0], v[:, :, 0]], dim=1).float()  # (b, 2, h, k)
        # slot j now holds position pos0 - ((pos0 - j) mod w); negative = never written
        slot_pos = pos0[:, None] - (pos0[:, None] - torch.arange(w, device=u_t.device)) % w  # (b, w)
        mask = (slot_pos >= 0)[:, None, None, :]  # (b, 1, 1, w)
        y = F.scaled_dot_product_attention(q, ring[:, 0].to(q.dtype), ring[:, 1].to(v.dtype), attn_mask=mask)
        return self.out_proj(y.reshape(b, self.d_model)), LayerState(state.conv + 1, ring)

    def step_pool(self, u_t: torch.Tensor, pool: LayerState, state_indices: torch.Tensor | None = None) -> torch.Tensor:
        """u_t (b, d) -> y_t (b, d); **updates ``pool`` in place** at rows ``state_indices`` (b,)
        (default 0..b-1), like the SSM blocks' pool step."""
        rows = torch.arange(u_t.shape[0], device=u_t.device) if state_indices is None else state_indices.long()
        y, new = self.step(u_t, LayerState(pool.conv.index_select(0, rows), pool.ssm.index_select(0, rows)))
        pool.conv.index_copy_(0, rows, new.conv)
        pool.ssm.index_copy_(0, rows, new.ssm)
        return y
