"""Mamba-3 over a whole chunk of a stream, in parallel, through one SSD scan.

The rotation folds into B and C. Measure angles from the start of the call,
Theta_t = sum_{s<=t} dt_s theta_s, and write the state in the rotated frame
S~_t = R_{Theta_t}^{-1} S_t. The recurrence of ``reference.py`` becomes a real one:

    S~_t = alpha_t S~_{t-1} + dt_t (1 - lam_t) alpha_t u_{t-1} + dt_t lam_t u_t,   u_t = x_t B~_t^T
    y_t  = S~_t C~_t + D x_t,          B~_t = R_{Theta_t}^{-1} B_t,  C~_t = R_{Theta_t}^{-1} C_t

Its two input terms are one: with c_t = dt_{t+1} (1 - lam_{t+1}) (the next step's weight of
u_t, divided by its decay) the shifted state T_t = S~_t + c_t u_t follows an SSD recurrence,

    T_t = alpha_t T_{t-1} + w_t u_t,    w_t = dt_t lam_t + c_t,
    y_t = T_t C~_t + (D - c_t C_t . B_t) x_t          (rotations keep C . B)

so one ``ssd_scan`` with dt for the decay, w as its input weights and the skip
D - c_t C_t . B_t as its per-token D (added inside the scan kernel) computes it. The call's
last step has no next step here: c_end = 0 makes T_end = S~_end, the state carried on. The start
is T_{-1} = S_0 + dt_0 (1 - lam_0) x_{-1} B_{-1}^T with x_{-1}, B_{-1} from the carry (Theta is 0
before the first step, so the carried B is already in the call's frame). The final state is
rotated back, S_end = R_{Theta_end} T_end. B and C become per head (the angle depends on each
head's dt): groups = heads in the scan. On the Triton backend the rotation is one op
(``rotary.py``: angles never reach memory) and ``ssd_scan`` runs Triton forward + backward, so
gradients reach every input, carried state included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamssm.kernels import ssd_scan
from streamssm.kernels._common import Backend
from streamssm.kernels.mamba3.reference import mamba3_rotary_ref, rotate_pairs, split_carry


def mamba3_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    initial_carry: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    backend: Backend = "auto",
):
    """Same contract as :func:`~streamssm.kernels.mamba3.reference.mamba3_scan_ref`."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    dtf, lamf = dt.float(), lam.float()
    if initial_carry is None:
        initial_carry = x.new_zeros(b, h * p + g * n, dtype=torch.float32)
    x_prev, B_prev = split_carry(initial_carry.float(), h, p, g, n)
    # scan operands in the input dtype (bf16 in training, as for SSD); angles, dt, w and states stay fp32
    cdt = x.dtype
    if backend == "triton":
        from streamssm.kernels.library import mamba3_rotary_op as rotate
    else:
        rotate = mamba3_rotary_ref
    B_rot, C_rot, angle_end = rotate(B, C, dtf, theta, cdt)  # (b, l, h, n), (b, h, n/2)
    shifted = dtf * (1 - lamf)  # dt_t (1 - lam_t): c_{t-1}
    c = F.pad(shifted[:, 1:], (0, 0, 0, 1))  # (b, l, h), c_end = 0
    start = shifted[:, 0, :, None, None] * x_prev[..., None] * B_prev.repeat_interleave(rep, 1)[:, :, None, :]
    state0 = start if initial_state is None else initial_state.float() + start  # T_{-1} (b, h, p, n)
    CB = (C.float() * B.float()).sum(-1).repeat_interleave(rep, 2)  # (b, l, h): C_t . B_t
    skip = -c * CB  # (b, l, h): the shift's diagonal term, a per-token D of the scan, plus D
    per_channel = D is not None and D.dim() == 2  # D (h, p): added after the scan, then the gate
    if D is not None and not per_channel:
        skip = skip + D.float()
    y, final = ssd_scan(x, dtf, A.float(), B_rot, C_rot, chunk_size=chunk_size, D=skip,
                        z=None if per_channel else z, initial_state=state0, return_final_state=True,
                        backend=backend, input_weight=dtf * lamf + c)
    if per_channel:
        y = torch.addcmul(y, D.to(y.dtype), x)
        if z is not None:
            y = (y.float() * F.silu(z.float())).to(x.dtype)
    if not return_final_state:
        return y
    final_state = rotate_pairs(final, angle_end[:, :, None, :])
    final_carry = torch.cat([x[:, -1].float().flatten(1), B[:, -1].float().flatten(1)], dim=-1)
    return y, final_state, final_carry
