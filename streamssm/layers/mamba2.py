"""Mamba-2 block (SSD) with a carried conv + SSM state.

Shape legend: b batch, l length, d d_model, e d_inner = expand * d_model, h heads = e / p,
p headdim, g ngroups, n d_state, w d_conv, cd conv channels = e + 2 g n.

    [z, xBC, dt] = in_proj(u)               (b, l, e + cd + h)
    xBC   = silu(causal_conv1d(xBC))        conv state (b, cd, w-1) carried
    [x, B, C] = xBC                         x (b, l, h, p); B, C (b, l, g, n)
    y     = ssd_scan(x, dt, A, B, C, D)     ssm state (b, h, p, n) fp32 carried
    out   = out_proj(RMSNorm(y * silu(z)))    RMS over all e channels, or over each of
                                            cfg.norm_groups runs of e / norm_groups
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from streamssm.kernels import causal_conv1d, conv1d_step, ssd_scan, ssd_scan_pool, ssd_step
from streamssm.layers._derived import Fp32Params
from streamssm.layers._init import dt_bias_init
from streamssm.layers.norm import GatedRMSNorm
from streamssm.state import LayerState

if TYPE_CHECKING:
    from streamssm.models import ArchConfig


class Mamba2Block(Fp32Params, nn.Module):
    """Mamba-2 mixer of ``cfg.d_model`` channels (``cfg``: d_state, d_conv, expand, headdim,
    ngroups, norm_groups, chunk_size, norm_eps; their divisibility is checked by the config)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        d_model, d_state, d_conv, ngroups = cfg.d_model, cfg.resolved_d_state, cfg.d_conv, cfg.ngroups
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = cfg.d_inner
        self.headdim, self.nheads, self.ngroups, self.chunk_size = cfg.headdim, cfg.nheads, ngroups, cfg.chunk_size
        e, h, g, n = self.d_inner, self.nheads, ngroups, d_state
        self.conv_dim = e + 2 * g * n
        self.in_proj = nn.Linear(d_model, e + self.conv_dim + h, bias=False)
        bound = d_conv**-0.5
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        self.dt_bias = nn.Parameter(dt_bias_init(h))
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(e, eps=cfg.norm_eps, groups=cfg.norm_groups)
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> LayerState:
        return LayerState(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )

    def _split(self, zxbcdt: torch.Tensor):
        e, cd = self.d_inner, self.conv_dim
        return zxbcdt.split([e, cd, self.nheads], dim=-1)  # z, xBC, dt

    def _split_xbc(self, xbc: torch.Tensor):
        """xBC (..., cd) -> x (..., h, p), B (..., g, n), C (..., g, n)."""
        e, gn = self.d_inner, self.ngroups * self.d_state
        x, B, C = xbc.split([e, gn, gn], dim=-1)
        lead = xbc.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            B.reshape(*lead, self.ngroups, self.d_state),
            C.reshape(*lead, self.ngroups, self.d_state),
        )

    def _conv_in(self, u: torch.Tensor, conv_state: torch.Tensor | None):
        """u (b, l, d), entering conv state (b, cd, w-1) or None (zeros) -> z (b, l, e), x, B, C,
        dt (b, l, h) and the conv state after the segment."""
        z, xbc, dt = self._split(self.in_proj(u))
        xbc, conv_state = causal_conv1d(
            xbc.transpose(1, 2), self.conv_weight, self.conv_bias,
            initial_state=None if conv_state is None else conv_state.to(xbc.dtype), activation="silu",
            return_final_state=True,
        )  # (b, cd, l)
        return (z, *self._split_xbc(xbc.transpose(1, 2)), dt, conv_state)

    def _ssd_options(self) -> dict:
        return dict(chunk_size=self.chunk_size, D=self._fp32("D", self.D), dt_bias=self._fp32("dt_bias", self.dt_bias),
                    dt_softplus=True)

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y (b, l, h, p), z (b, l, e) -> (b, l, d)."""
        b, l = z.shape[:2]
        return self.out_proj(self.norm(y.reshape(b, l, self.d_inner), z))

    def forward(self, u: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        """u (b, l, d) -> (y (b, l, d), new state); ``state`` None: zero states (the kernels'
        default: no zero tensors written and read)."""
        z, x, B, C, dt, conv_state = self._conv_in(u, None if state is None else state.conv)
        y, ssm_state = ssd_scan(x, dt, self._A(), B, C, initial_state=None if state is None else state.ssm,
                                return_final_state=True, **self._ssd_options())  # (b, l, h, p)
        return self._out(y, z), LayerState(conv_state, ssm_state)

    def forward_pool(self, u: torch.Tensor, pool: LayerState, state_indices: torch.Tensor) -> torch.Tensor:
        """u (b, l, d) -> y (b, l, d); **updates ``pool`` in place** at rows ``state_indices`` (b,)
        int64: the Streamer's chunked calls. The SSM states are read and written by the one-pass
        kernel where it applies (``ssd_scan_pool``), never gathered into a (b, h, p, n) copy."""
        z, x, B, C, dt, conv_state = self._conv_in(u, pool.conv.index_select(0, state_indices))
        pool.conv.index_copy_(0, state_indices, conv_state.to(pool.conv.dtype))
        y = ssd_scan_pool(pool.ssm, x, dt, self._A(), B, C, state_indices=state_indices, **self._ssd_options())
        return self._out(y, z)

    def step(self, u_t: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """u_t (b, d) -> (y_t (b, d), new state); ``state`` is not modified."""
        new_state = LayerState(state.conv.clone(), state.ssm.clone())
        return self.step_pool(u_t, new_state), new_state

    def step_pool(self, u_t: torch.Tensor, pool: LayerState, state_indices: torch.Tensor | None = None) -> torch.Tensor:
        """u_t (b, d) -> y_t (b, d); **updates ``pool`` in place** at rows ``state_indices`` (b,)
        (default 0..b-1): the state-pool step of the service, no state copy."""
        z, xbc, dt = self._split(self.in_proj(u_t))
        xbc = conv1d_step(xbc, pool.conv, self.conv_weight, self.conv_bias, activation="silu",
                          state_indices=state_indices)
        x, B, C = self._split_xbc(xbc)
        y = ssd_step(
            pool.ssm, x, dt, self._A(), B, C, D=self._fp32("D", self.D), z=z.reshape(x.shape),
            dt_bias=self._fp32("dt_bias", self.dt_bias), dt_softplus=True, state_indices=state_indices,
        )  # (b, h, p), gated by silu(z) in the kernel: two elementwise launches fewer per layer
        y = self.norm(y.reshape(u_t.shape[0], self.d_inner))
        return self.out_proj(y)
