"""Mamba-1 block (selective SSM) with a carried conv + SSM state.

Shape legend: b batch, l length, d d_model, e d_inner = expand * d_model, n d_state,
r dt_rank, w d_conv.

    [x, z] = in_proj(u)                    (b, l, 2e)
    x      = silu(causal_conv1d(x))        conv state (b, e, w-1) carried
    [dt, B, C] = x_proj(x)                 (b, l, r + 2n)
    dt     = dt_proj.weight @ dt           bias + softplus inside the scan
    y      = selective_scan(x, dt, A, B, C, D, z)   ssm state (b, e, n) fp32 carried
    out    = out_proj(y)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from streamssm.kernels import causal_conv1d, conv1d_step, selective_scan, selective_scan_step
from streamssm.layers._derived import Fp32Params
from streamssm.layers._init import dt_bias_init
from streamssm.state import LayerState

if TYPE_CHECKING:
    from streamssm.models import ArchConfig


class MambaBlock(Fp32Params, nn.Module):
    """Mamba-1 mixer of ``cfg.d_model`` channels (``cfg``: d_state, d_conv, expand, dt_rank)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        d_model, d_state, d_conv = cfg.d_model, cfg.resolved_d_state, cfg.d_conv
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = cfg.d_inner
        self.dt_rank = cfg.resolved_dt_rank
        e, n = self.d_inner, d_state
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(e, d_conv).uniform_(-1 / math.sqrt(d_conv), 1 / math.sqrt(d_conv)))
        self.conv_bias = nn.Parameter(torch.zeros(e))
        self.x_proj = nn.Linear(e, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, e, bias=True)
        dt_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias_init(e))
        # S4D-real init: A[:, j] = -(j + 1)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> LayerState:
        return LayerState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def _scan_inputs(self, x: torch.Tensor):
        """x (..., e) -> dt (..., e) (pre-bias), B (..., n), C (..., n)."""
        dt_in, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt_in @ self.dt_proj.weight.t().to(dt_in.dtype), B, C

    def forward(self, u: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        """u (b, l, d) -> (y (b, l, d), new state)."""
        b = u.shape[0]
        if state is None:
            state = self.init_state(b, u.device, u.dtype)
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, e) each
        x, conv_state = causal_conv1d(
            x.transpose(1, 2), self.conv_weight, self.conv_bias, initial_state=state.conv.to(x.dtype),
            activation="silu", return_final_state=True,
        )  # (b, e, l)
        dt, B, C = self._scan_inputs(x.transpose(1, 2))  # (b, l, e), (b, l, n), (b, l, n)
        y, ssm_state = selective_scan(
            x, dt.transpose(1, 2), self._A(), B.transpose(1, 2), C.transpose(1, 2),
            D=self._fp32("D", self.D), z=z.transpose(1, 2), delta_bias=self._fp32("dt_bias", self.dt_proj.bias),
            delta_softplus=True,
            initial_state=state.ssm, return_final_state=True,
        )  # (b, e, l)
        return self.out_proj(y.transpose(1, 2)), LayerState(conv_state, ssm_state)

    def step(self, u_t: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """u_t (b, d) -> (y_t (b, d), new state); ``state`` is not modified."""
        new_state = LayerState(state.conv.clone(), state.ssm.clone())
        return self.step_pool(u_t, new_state), new_state

    def step_pool(self, u_t: torch.Tensor, pool: LayerState, state_indices: torch.Tensor | None = None) -> torch.Tensor:
        """u_t (b, d) -> y_t (b, d); **updates ``pool`` in place** at rows ``state_indices`` (b,)
        (default 0..b-1): the state-pool step of the service, no state copy."""
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (b, e)
        x = conv1d_step(x, pool.conv, self.conv_weight, self.conv_bias, activation="silu", state_indices=state_indices)
        dt, B, C = self._scan_inputs(x)
        y = selective_scan_step(
            pool.ssm, x, dt, self._A(), B, C, D=self._fp32("D", self.D), z=z,
            delta_bias=self._fp32("dt_bias", self.dt_proj.bias), delta_softplus=True, state_indices=state_indices,
        )
        return self.out_proj(y)
