"""Triton rotation of Mamba-3's B and C into each head's rotating frame, forward and backward.

Shape legend: b batch, l length, g groups of B/C, h heads (h % g == 0, head i reads group
i // (h / g)), n dstate (even), k = n / 2 angles, T tiles of ``BLOCK_L`` steps.

    Theta_t[h, k] = sum_{s <= t} dt_s[h] theta_s[g, k]             (mod 2 pi)
    B~_t[h] = R(-Theta_t[h]) B_t[g],   C~_t[h] = R(-Theta_t[h]) C_t[g]   (pairs (2k, 2k+1) rotated)

what ``mamba3/chunked.py`` feeds its SSD scan (reference: ``reference.mamba3_rotary_ref``). The
PyTorch glue it replaces wrote the (b, l, h, k) angles in float64 and the rotated B/C in fp32
before casting them (~80 % of the Mamba-3 op's fwd+bwd at S1 on the H100). Here the angles
never reach memory:

    forward   1. each tile's angle sum per (b, h, k), in float64        (b, h, k, T)
              2. (torch) exclusive cumsum over tiles, mod 2 pi: the angle entering each tile
              3. per (tile, b, h): in-tile cumsum + the entering angle, cos/sin, rotate B and C
    backward  1. per (tile, b, g): dB, dC (the heads of a group summed in registers: no atomics);
                 dTheta per head, in registers only: its tile sums (b, h, k, T) and, from its
                 reverse in-tile cumsum, the in-tile parts of dtheta (b, l, g, k) and ddt (b, l, h)
              2. (torch) suffix sums over tiles (plus the final angle's gradient): ``after``
              3. per (tile, b, g): what the tiles after add, dtheta += dt after, ddt += theta . after

The step angle's gradient is linear in dTheta, d(step_t) = (sum over the tile's s >= t of
dTheta_s) + after[tile], so step 1 takes the first term and step 3 the second: the (b, l, h, k)
dTheta never reaches memory (it did until 2026-12-06: 0.2 GB written and read again at S1).

The rows of dtheta / dB / dC of a group are written by one program, so every gradient is
deterministic. Angles accumulate in float64 (the fp32 step angles dt * theta, as the reference);
cos and sin come from their float64 reduction to [-pi/4, pi/4] (``_cos_sin``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_L = 64  # steps per tile
# (angles per program, warps) of the rotation (forward) and of the local kernel (backward): a thread
# holds BLOCK_L x angles / (32 x warps) elements, and the registers that go with them (sm_90, 16
# angles at 8 warps, a program per group: forward 112, local 184). H100, 2026-12-06, S1
# (bench_mamba3_rotary.py --sweep), forward / backward ms: 16 x 8 0.485 / 0.718, 16 x 4 0.629 /
# 0.959, 16 x 2 0.598 / 1.018, 32 x 4 0.637 / 1.121, 8 x 4 0.740 / 0.727. At S3 (32 angles) the
# forward was faster at 32 x 4 with a program per head (2.90 vs 3.51 ms); a program per group
# takes 2.47 ms at 16 x 8 (not swept there yet): one config for every shape
FWD_CONFIG = (16, 8)
BWD_CONFIG = (16, 8)
# the after kernel's: all angles in one program (up to 64), so that one program sums a row's ddt.
# Angle blocks may split its grid (ddt then summed over them after). S1, H100: 66 us a call (its
# forerunner, the dstep kernel that read dTheta back, 184-207 us); the backward 0.717 ms at 64 x 8,
# 0.710 / 0.728 / 0.734 / 0.737 at 32 x 4 / 32 x 8 / 16 x 8 / 16 x 4 (within the noise)
AFTER_CONFIG = (64, 8)
HALF_PI = tl.constexpr(math.pi / 2)
INV_HALF_PI = tl.constexpr(2 / math.pi)
# Taylor coefficients of sin (r^3 .. r^9) and cos (r^2 .. r^10): on |r| <= pi/4 the first terms left
# out are below 2e-9, under fp32's resolution
SIN3, SIN5, SIN7, SIN9 = (tl.constexpr((-1) ** i / math.factorial(2 * i + 1)) for i in range(1, 5))
COS2, COS4, COS6, COS8, COS10 = (tl.constexpr((-1) ** i / math.factorial(2 * i)) for i in range(1, 6))


# Addresses: a tile's first row of the flattened (b * l) rows in int64 (a scalar per program), the
# offsets inside the tile in int32: int64 offsets per element cost ~3 IMADs a multiply and their
# registers (the backward's first kernel spilled at 4 warps)
@triton.jit
def _tile(i_b, i_t, L, BLOCK_L: tl.constexpr):
    """Tile i_t of batch row i_b (int64): its first row (int64 scalar), the rows in it (int32,
    (BLOCK_L,)) and their mask."""
    o_r = tl.arange(0, BLOCK_L)
    return i_b * L + i_t * BLOCK_L, o_r, i_t * BLOCK_L + o_r < L


@triton.jit
def _per_tile_at(i_b, i_t, i_h, o_k, H, K, T):
    """Offsets (BLOCK_K,) of tile i_t's per-tile angle values of head i_h, angles ``o_k``, in the
    (b, h, k, T) tables (tile sums, entering angles and their gradients: tiles last)."""
    return ((i_b * H + i_h) * K + o_k) * T + i_t


@triton.jit
def _group_angles_at(row0, o_r, m_l, i_g, i_k, G, K, BLOCK_K: tl.constexpr):
    """Offsets (BLOCK_L, BLOCK_K) of a tile's rows of group i_g, angle block i_k, in the (b, l, g, k)
    tensors (theta, dtheta), their mask and the angle index (BLOCK_K,)."""
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    return row0 * G * K + (o_r[:, None] * (G * K) + i_g * K + o_k[None, :]), m_l[:, None] & (o_k < K)[None, :], o_k


@triton.jit
def _head_dt(p_dt, row0, o_r, m_l, i_h, H):
    """dt (BLOCK_L,) fp32 of head i_h over a tile's rows (0 outside)."""
    return tl.load(p_dt + row0 * H + (o_r * H + i_h), mask=m_l, other=0.0).to(tl.float32)


@triton.jit
def _cos_sin(angle):
    """cos and sin (fp32) of float64 angles of any size. The quadrant q and the remainder r in
    [-pi/4, pi/4] of angle = q pi/2 + r in float64 (no division, no mod 2 pi first), then Taylor
    polynomials of r in fp32, rotated to the quadrant: a few dozen instructions where libdevice's
    cosf and sinf with a float64 mod 2 pi took ~100 (the rotation kernels were instruction-bound)."""
    q = tl.floor(angle * INV_HALF_PI + 0.5)
    r = (angle - q * HALF_PI).to(tl.float32)
    quadrant = (q - 4.0 * tl.floor(q * 0.25)).to(tl.int32)
    r2 = r * r
    sin_r = r + r * r2 * (SIN3 + r2 * (SIN5 + r2 * (SIN7 + r2 * SIN9)))
    cos_r = 1.0 + r2 * (COS2 + r2 * (COS4 + r2 * (COS6 + r2 * (COS8 + r2 * COS10))))
    # cos(q pi/2 + r), sin(q pi/2 + r) for q = 0, 1, 2, 3: (c, s), (-s, c), (-c, -s), (s, -c)
    odd = (quadrant & 1) == 1
    cos = tl.where(odd, sin_r, cos_r)
    sin = tl.where(odd, cos_r, sin_r)
    return tl.where((quadrant == 1) | (quadrant == 2), -cos, cos), tl.where(quadrant >= 2, -sin, sin)


@triton.jit
def _tile_cos_sin(b_dt, b_th, p_enter, i_b, i_t, i_h, o_k, H, K, T):
    """cos and sin (BLOCK_L, BLOCK_K) fp32 of Theta over one tile of head i_h from its dt (BLOCK_L,)
    and the group's theta (BLOCK_L, BLOCK_K): the entering angle plus the in-tile cumsum, in float64."""
    enter = tl.load(p_enter + _per_tile_at(i_b, i_t, i_h, o_k, H, K, T), mask=o_k < K, other=0.0)
    return _cos_sin(enter[None, :] + tl.cumsum((b_dt[:, None] * b_th).to(tl.float64), axis=0))


# Every kernel runs one (tile, b, group, angle block) and the group's heads in a loop: theta, B and C
# are read once for all the heads that share them (one program per head read them H / G times)
@triton.jit
def _group_program(p_theta, L, G, K, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile i_t, batch row i_b (int64) and group i_g; the tile's first row, rows and
    mask (``_tile``); its offsets, mask and angles in the (b, l, g, k) tensors (``_group_angles_at``);
    the group's theta there (BLOCK_L, BLOCK_K) fp32, 0 outside: once for all its heads."""
    i_t = tl.program_id(0)
    i_bg = tl.program_id(1)
    i_b, i_g = (i_bg // G).to(tl.int64), i_bg % G
    row0, o_r, m_l = _tile(i_b, i_t, L, BLOCK_L)
    o_theta, m, o_k = _group_angles_at(row0, o_r, m_l, i_g, tl.program_id(2), G, K, BLOCK_K)
    b_th = tl.load(p_theta + o_theta, mask=m, other=0.0).to(tl.float32)
    return i_t, i_b, i_g, row0, o_r, m_l, o_theta, m, o_k, b_th


@triton.jit
def _rotary_tile_sums_kernel(p_dt, p_theta, p_sums, L, H, G, K, T,
                             BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (T, b * g, angle blocks): sums (b, h, k, T) float64 of each tile's step angles."""
    i_t, i_b, i_g, row0, o_r, m_l, o_theta, m, o_k, b_th = _group_program(p_theta, L, G, K, BLOCK_L, BLOCK_K)
    rep = H // G
    for j in range(rep):
        i_h = i_g * rep + j
        b_step = _head_dt(p_dt, row0, o_r, m_l, i_h, H)[:, None] * b_th
        tl.store(p_sums + _per_tile_at(i_b, i_t, i_h, o_k, H, K, T), tl.sum(b_step.to(tl.float64), axis=0),
                 mask=o_k < K)


# Pairs move as whole rows of 2 * BLOCK_K elements, split into (re, im) in registers: loads and
# stores of every other element left half-written sectors (S1 forward 3.5 ms for a 0.14 ms floor)
@triton.jit
def _pairs_at(o_r, m_l, width, col0, i_k, K, BLOCK_K: tl.constexpr):
    """In-tile offsets (BLOCK_L, 2 BLOCK_K) int32 of angle block i_k's pairs in rows of ``width``
    elements starting at column ``col0`` (a head's or a group's n), and their mask."""
    o_c = 2 * i_k * BLOCK_K + tl.arange(0, 2 * BLOCK_K)
    return o_r[:, None] * width + col0 + o_c[None, :], m_l[:, None] & (o_c < 2 * K)[None, :]


@triton.jit
def _load_pairs(p, offs, m, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (re, im) halves (BLOCK_L, BLOCK_K) fp32 of the pairs at ``p + offs`` (``p``: the tile's
    first row; ``offs``: ``_pairs_at``)."""
    x = tl.load(p + offs, mask=m, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (BLOCK_L, BLOCK_K, 2)))


@triton.jit
def _store_pairs(p, offs, re, im, m, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.store(p + offs, tl.reshape(tl.join(re, im), (BLOCK_L, 2 * BLOCK_K)).to(p.dtype.element_ty), mask=m)


@triton.jit
def _store_rotated_back(p, offs, re, im, cos, sin, m, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """The pairs (re, im) rotated by -Theta, stored at ``p + offs`` (``_store_pairs``)."""
    _store_pairs(p, offs, re * cos + im * sin, im * cos - re * sin, m, BLOCK_L, BLOCK_K)


@triton.jit
def _rotary_fwd_kernel(p_B, p_C, p_dt, p_theta, p_enter, p_Bo, p_Co, L, H, G, K, T,
                       BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (T, b * g, angle blocks): B~, C~ (b, l, h, n) of one tile, block of angles and every
    head of a group: R(-Theta) of B, C (b, l, g, n)."""
    i_t, i_b, i_g, row0, o_r, m_l, o_theta, m, o_k, b_th = _group_program(p_theta, L, G, K, BLOCK_L, BLOCK_K)
    i_k = tl.program_id(2)
    o_in, m2 = _pairs_at(o_r, m_l, G * 2 * K, i_g * 2 * K, i_k, K, BLOCK_K)
    in0, out0 = row0 * G * 2 * K, row0 * H * 2 * K
    B_re, B_im = _load_pairs(p_B + in0, o_in, m2, BLOCK_L, BLOCK_K)
    C_re, C_im = _load_pairs(p_C + in0, o_in, m2, BLOCK_L, BLOCK_K)
    rep = H // G
    for j in range(rep):
        i_h = i_g * rep + j
        cos, sin = _tile_cos_sin(_head_dt(p_dt, row0, o_r, m_l, i_h, H), b_th, p_enter, i_b, i_t, i_h, o_k, H, K, T)
        o_out, _ = _pairs_at(o_r, m_l, H * 2 * K, i_h * 2 * K, i_k, K, BLOCK_K)
        _store_rotated_back(p_Bo + out0, o_out, B_re, B_im, cos, sin, m2, BLOCK_L, BLOCK_K)
        _store_rotated_back(p_Co + out0, o_out, C_re, C_im, cos, sin, m2, BLOCK_L, BLOCK_K)


@triton.jit
def _rotary_bwd_local_kernel(p_B, p_C, p_dt, p_theta, p_enter, p_dBo, p_dCo, p_dB, p_dC, p_dtheta, p_ddt, p_dsums,
                             L, H, G, K, T, ROWS, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (T, b * g, angle blocks): dB, dC (b, l, g, n) of one tile, group (its heads summed
    here) and block of angles. Of each head's dTheta (in registers): its tile sums (b, h, k, T)
    fp32 and, from its reverse in-tile cumsum D, the in-tile parts dtheta (b, l, g, k) fp32 =
    sum over the heads of dt D and each angle block's ddt (angle blocks, b * l = ROWS, h) fp32 =
    sum over its angles of D theta."""
    i_t, i_b, i_g, row0, o_r, m_l, o_theta, m, o_k, b_th = _group_program(p_theta, L, G, K, BLOCK_L, BLOCK_K)
    i_k = tl.program_id(2)
    rep = H // G
    o_in, m2 = _pairs_at(o_r, m_l, G * 2 * K, i_g * 2 * K, i_k, K, BLOCK_K)
    in0, out0 = row0 * G * 2 * K, row0 * H * 2 * K
    B_re, B_im = _load_pairs(p_B + in0, o_in, m2, BLOCK_L, BLOCK_K)
    C_re, C_im = _load_pairs(p_C + in0, o_in, m2, BLOCK_L, BLOCK_K)
    dB_re = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
    dB_im = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
    dC_re = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
    dC_im = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
    dtheta = tl.zeros([BLOCK_L, BLOCK_K], dtype=tl.float32)
    p_ddt += (i_k.to(tl.int64) * ROWS + row0) * H
    for j in range(rep):
        i_h = i_g * rep + j
        b_dt = _head_dt(p_dt, row0, o_r, m_l, i_h, H)
        cos, sin = _tile_cos_sin(b_dt, b_th, p_enter, i_b, i_t, i_h, o_k, H, K, T)
        o_out, _ = _pairs_at(o_r, m_l, H * 2 * K, i_h * 2 * K, i_k, K, BLOCK_K)
        gB_re, gB_im = _load_pairs(p_dBo + out0, o_out, m2, BLOCK_L, BLOCK_K)
        gC_re, gC_im = _load_pairs(p_dCo + out0, o_out, m2, BLOCK_L, BLOCK_K)
        # out = (re c + im s, im c - re s): d out / d Theta = (out_im, -out_re); dv = R(+Theta) g
        dangle = (gB_re * (B_im * cos - B_re * sin) - gB_im * (B_re * cos + B_im * sin)
                  + gC_re * (C_im * cos - C_re * sin) - gC_im * (C_re * cos + C_im * sin))
        dB_re += gB_re * cos - gB_im * sin
        dB_im += gB_re * sin + gB_im * cos
        dC_re += gC_re * cos - gC_im * sin
        dC_im += gC_re * sin + gC_im * cos
        tl.store(p_dsums + _per_tile_at(i_b, i_t, i_h, o_k, H, K, T), tl.sum(dangle, axis=0), mask=o_k < K)
        d_step = tl.cumsum(dangle, axis=0, reverse=True)  # 0 outside the tile's rows and angles, as dangle
        tl.store(p_ddt + o_r * H + i_h, tl.sum(d_step * b_th, axis=1), mask=m_l)
        dtheta += b_dt[:, None] * d_step
    _store_pairs(p_dB + in0, o_in, dB_re, dB_im, m2, BLOCK_L, BLOCK_K)
    _store_pairs(p_dC + in0, o_in, dC_re, dC_im, m2, BLOCK_L, BLOCK_K)
    tl.store(p_dtheta + o_theta, dtheta, mask=m)


@triton.jit
def _rotary_bwd_after_kernel(p_dt, p_theta, p_after, p_dtheta_local, p_ddt_local, LOCAL_PARTS, p_ddt, p_dtheta,
                             L, H, G, K, T, ROWS, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (T, b * g, angle blocks): the tiles after each one, ``p_after`` (b, h, k, T) fp32,
    added to the local kernel's in-tile parts: dtheta (b, l, g, k) = ``p_dtheta_local`` (fp32; may be
    ``p_dtheta`` itself) + sum over the heads of dt after; ddt (angle blocks, ROWS, h) fp32 = this
    block's theta . after, plus (angle block 0) the ``LOCAL_PARTS`` blocks of ``p_ddt_local``."""
    i_t, i_b, i_g, row0, o_r, m_l, o_theta, m, o_k, b_th = _group_program(p_theta, L, G, K, BLOCK_L, BLOCK_K)
    i_k = tl.program_id(2)
    rep = H // G
    dtheta = tl.load(p_dtheta_local + o_theta, mask=m, other=0.0)
    p_ddt += (i_k.to(tl.int64) * ROWS + row0) * H
    p_ddt_local += row0 * H
    for j in range(rep):
        i_h = i_g * rep + j
        b_dt = _head_dt(p_dt, row0, o_r, m_l, i_h, H)
        after = tl.load(p_after + _per_tile_at(i_b, i_t, i_h, o_k, H, K, T), mask=o_k < K, other=0.0)
        ddt = tl.sum(b_th * after[None, :], axis=1)
        if i_k == 0:
            for i in range(LOCAL_PARTS):
                ddt += tl.load(p_ddt_local + i * ROWS * H + o_r * H + i_h, mask=m_l, other=0.0)
        tl.store(p_ddt + o_r * H + i_h, ddt, mask=m_l)
        dtheta += b_dt[:, None] * after[None, :]
    tl.store(p_dtheta + o_theta, dtheta.to(p_dtheta.dtype.element_ty), mask=m)


def _launch(config: tuple[int, int], L: int, rows: int, K: int) -> tuple[tuple[int, int, int], int, int]:
    """A kernel's grid (tiles, ``rows``, angle blocks), angles per program and warps from its
    (angles, warps) config: at most all K angles in one block (a power of two)."""
    block_k = min(config[0], max(2, triton.next_power_of_2(K)))
    return (triton.cdiv(L, BLOCK_L), rows, triton.cdiv(K, block_k)), block_k, config[1]


def mamba3_rotary_fwd_triton(B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, theta: torch.Tensor,
                             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """B, C (b, l, g, n); dt (b, l, h) fp32; theta (b, l, g, n/2). Returns B~, C~ (b, l, h, n) in
    ``out_dtype``, the final angle (b, h, n/2) fp32 (mod 2 pi) and what the backward keeps: the
    angle entering each tile (b, h, n/2, T) float64."""
    B, C, dt, theta = (t.contiguous() for t in (B, C, dt, theta))
    b, L, G, N = B.shape
    H, K = dt.shape[2], N // 2
    grid, block_k, warps = _launch(FWD_CONFIG, L, b * G, K)
    T = grid[0]
    # tiles last: torch scans an innermost dim in parallel, an outer one with a thread per column (S3, 16,384
    # tiles: 6.4 ms of the forward's 9.8 on the H100 with tiles second)
    sums = torch.empty(b, H, K, T, device=B.device, dtype=torch.float64)
    _rotary_tile_sums_kernel[grid](dt, theta, sums, L, H, G, K, T, BLOCK_L=BLOCK_L, BLOCK_K=block_k)
    through = sums.cumsum(-1)
    enter = (through - sums).remainder_(2 * math.pi)
    Bo = torch.empty(b, L, H, N, device=B.device, dtype=out_dtype)
    Co = torch.empty_like(Bo)
    _rotary_fwd_kernel[grid](B, C, dt, theta, enter, Bo, Co, L, H, G, K, T, BLOCK_L=BLOCK_L, BLOCK_K=block_k,
                             num_warps=warps)
    return Bo, Co, through[..., -1].remainder(2 * math.pi).float(), enter


def mamba3_rotary_bwd_triton(dBo: torch.Tensor, dCo: torch.Tensor, dangle_end: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, dt: torch.Tensor, theta: torch.Tensor, enter: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dB, dC, ddt, dtheta) in their inputs' dtypes from those of B~, C~ (b, l, h, n)
    and of the final angle (b, h, n/2)."""
    B, C, dt, theta, dBo, dCo = (t.contiguous() for t in (B, C, dt, theta, dBo, dCo))
    b, L, G, N = B.shape
    H, K = dt.shape[2], N // 2
    T = triton.cdiv(L, BLOCK_L)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dsums = torch.empty(b, H, K, T, device=B.device, dtype=torch.float32)  # tiles last, as the forward's sums
    f32 = dict(device=B.device, dtype=torch.float32)
    grid, block_k, warps = _launch(BWD_CONFIG, L, b * G, K)
    dtheta_local = torch.empty(theta.shape, **f32)  # the in-tile parts
    ddt_local = torch.empty(grid[2], b * L, H, **f32)  # per angle block
    _rotary_bwd_local_kernel[grid](B, C, dt, theta, enter, dBo, dCo, dB, dC, dtheta_local, ddt_local, dsums,
                                   L, H, G, K, T, b * L, BLOCK_L=BLOCK_L, BLOCK_K=block_k, num_warps=warps)
    # the tiles after each one, and the final angle (the sum of every step's)
    after = dsums.flip(-1).cumsum(-1).flip(-1) - dsums + dangle_end.float()[..., None]
    local_parts = grid[2]
    grid, block_k, warps = _launch(AFTER_CONFIG, L, b * G, K)
    ddt_parts = torch.empty(grid[2], b * L, H, **f32)  # per angle block
    dtheta = dtheta_local if theta.dtype == torch.float32 else torch.empty_like(theta)
    _rotary_bwd_after_kernel[grid](dt, theta, after, dtheta_local, ddt_local, local_parts, ddt_parts, dtheta,
                                   L, H, G, K, T, b * L, BLOCK_L=BLOCK_L, BLOCK_K=block_k, num_warps=warps)
    ddt = ddt_parts[0] if grid[2] == 1 else ddt_parts.sum(0)
    return dB, dC, ddt.view_as(dt).to(dt.dtype), dtheta
