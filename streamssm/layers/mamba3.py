"""Mamba-3 block: exponential-trapezoidal discretization and a rotating (complex) state.

Shape legend: b batch, l length, d d_model, e d_inner = expand * d_model, h heads = e / p,
p headdim, g ngroups, n d_state (even), k = n / 2 rotation angles per group.

    [z, x, B, C, dt, lam, theta] = in_proj(u)   (b, l, 2e + 2gn + 2h + gk)
    B, C  = RMSNorm_n(B) + B_bias, RMSNorm_n(C) + C_bias       (per-group norm, learned bias)
    dt    = softplus(dt + dt_bias); lam = sigmoid(lam)
    y     = mamba3_scan(x, dt, A, B, C, lam, theta, D)          ssm state (b, h, p, n) fp32
    out   = out_proj(RMSNorm(y * silu(z)))

Differences from the Mamba-2 block (layers/mamba2.py), after the Mamba-3 paper (Lahoti et al.,
"Mamba-3: Improved Sequence Modeling using State Space Principles", 2025; §3.1 trapezoidal
discretization, §3.2 complex-valued state as data-dependent rotations of B and C):
- the state update mixes the current and the previous input (lam picks the weights);
  the short causal conv of Mamba-1/2 is dropped, the trapezoid acts as a width-2 conv;
- the state rotates by a data-dependent angle dt * theta per step (RoPE-like), so the
  state transition has complex eigenvalues exp(dt A) e^{i dt theta}; a real, positive
  decay (Mamba-2) cannot flip a state, which is why Mamba-2 cannot track parity;
- B and C are RMS-normalized with learned biases.
Not implemented: the multi-input multi-output (MIMO) variant (§3.3).

State: ``LayerState(conv=carry (b, h*p + g*n, 1) fp32, ssm (b, h, p, n) fp32)``, where the
carry holds the previous step's x and B (what the trapezoid needs; the analogue of a conv state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from streamssm.kernels import mamba3_scan, mamba3_step
from streamssm.layers._derived import Fp32Params
from streamssm.layers._init import dt_bias_init
from streamssm.layers.norm import GatedRMSNorm, RMSNorm
from streamssm.state import LayerState

if TYPE_CHECKING:
    from streamssm.models import ArchConfig


class Mamba3Block(Fp32Params, nn.Module):
    """Mamba-3 mixer of ``cfg.d_model`` channels (``cfg``: d_state (even), expand, headdim,
    ngroups, chunk_size, norm_eps; their divisibility is checked by the config)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        d_model, d_state, headdim, ngroups = cfg.d_model, cfg.resolved_d_state, cfg.headdim, cfg.ngroups
        norm_eps = cfg.norm_eps
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = cfg.d_inner
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, cfg.nheads, ngroups, cfg.chunk_size
        e, h, g, n = self.d_inner, self.nheads, ngroups, d_state
        self.sizes = [e, e, g * n, g * n, h, h, g * n // 2]  # z, x, B, C, dt, lam, theta
        self.in_proj = nn.Linear(d_model, sum(self.sizes), bias=False)
        self.B_norm, self.C_norm = RMSNorm(n, eps=norm_eps), RMSNorm(n, eps=norm_eps)
        self.B_bias, self.C_bias = nn.Parameter(torch.ones(g, n)), nn.Parameter(torch.ones(g, n))
        self.dt_bias = nn.Parameter(dt_bias_init(h))
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(e, eps=norm_eps)
        self.out_proj = nn.Linear(e, d_model, bias=False)
        self.carry_dim = h * headdim + g * n

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> LayerState:
        """Zeros; both tensors fp32 whatever ``dtype`` (the carry feeds fp32 state math)."""
        return LayerState(
            conv=torch.zeros(batch, self.carry_dim, 1, device=device, dtype=torch.float32),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )

    def _project(self, u: torch.Tensor):
        """u (..., d) -> z, x (..., h, p); B, C (..., g, n); dt, lam (..., h); theta (..., g, n/2)."""
        z, x, B, C, dt, lam, theta = self.in_proj(u).split(self.sizes, dim=-1)
        lead = u.shape[:-1]
        g, n, h, p = self.ngroups, self.d_state, self.nheads, self.headdim
        B = self.B_norm(B.reshape(*lead, g, n)) + self.B_bias
        C = self.C_norm(C.reshape(*lead, g, n)) + self.C_bias
        dt = F.softplus(dt.float() + self._fp32("dt_bias", self.dt_bias))
        return (z.reshape(*lead, h, p), x.reshape(*lead, h, p), B, C, dt, torch.sigmoid(lam.float()),
                theta.reshape(*lead, g, n // 2))

    def _finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.norm(y.flatten(-2), z.flatten(-2))
        return self.out_proj(y)

    def forward(self, u: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        """u (b, l, d) -> (y (b, l, d), new state)."""
        if state is None:
            state = self.init_state(u.shape[0], u.device)
        z, x, B, C, dt, lam, theta = self._project(u)
        y, ssm, carry = mamba3_scan(
            x, dt, self._A(), B, C, lam, theta, D=self._fp32("D", self.D),
            initial_state=state.ssm, initial_carry=state.conv[..., 0], return_final_state=True,
            chunk_size=self.chunk_size,
        )  # (b, l, h, p)
        return self._finish(y, z), LayerState(carry[..., None], ssm)

    def step(self, u_t: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """u_t (b, d) -> (y_t (b, d), new state); ``state`` is not modified."""
        new_state = LayerState(state.conv.clone(), state.ssm.clone())
        return self.step_pool(u_t, new_state), new_state

    def step_pool(self, u_t: torch.Tensor, pool: LayerState, state_indices: torch.Tensor | None = None) -> torch.Tensor:
        """u_t (b, d) -> y_t (b, d); **updates ``pool`` in place** at rows ``state_indices``."""
        z, x, B, C, dt, lam, theta = self._project(u_t)
        y = mamba3_step(pool.ssm, pool.conv[..., 0], x, dt, self._A(), B, C, lam, theta,
                        D=self._fp32("D", self.D), state_indices=state_indices)
        return self._finish(y, z)
