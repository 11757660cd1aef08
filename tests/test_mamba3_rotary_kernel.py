"""Triton rotation of Mamba-3's B and C (kernels/mamba3/rotary.py) vs its PyTorch reference
(``mamba3_rotary_ref``): rotated B/C, final angle and the gradients of B, C, dt and theta, on CPU
under TRITON_INTERPRET=1; on the GPU at a training size in fp32 and bf16."""

import math

import pytest
import torch

from streamssm.kernels.library import mamba3_rotary_op
from streamssm.kernels.mamba3.reference import mamba3_rotary_ref
from streamssm.kernels.mamba3.rotary import BLOCK_L, AFTER_CONFIG, BWD_CONFIG, FWD_CONFIG
from streamssm.testing import assert_close, assert_script_compiles_for_sm90


def make_inputs(b, l, g, h, n, seed=0, angle_scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return dict(B=torch.randn(b, l, g, n, generator=gen), C=torch.randn(b, l, g, n, generator=gen),
                dt=torch.rand(b, l, h, generator=gen) + 0.05,
                theta=angle_scale * torch.randn(b, l, g, n // 2, generator=gen))


def run(fn, inputs, out_dtype, device="cpu", seed=1):
    """Outputs (B~, C~, final angle) and the gradients of every input under random output grads."""
    leaves = {k: v.to(device).clone().requires_grad_(True) for k, v in inputs.items()}
    outs = fn(leaves["B"], leaves["C"], leaves["dt"], leaves["theta"], out_dtype)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(device)).sum() for o in outs)
    loss.backward()
    return dict(zip(("B_rot", "C_rot", "angle_end"), outs)) | {f"d{k}": v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("shape", [(2, 2 * BLOCK_L + 13, 2, 4, 6), (1, 5, 1, 3, 8), (1, BLOCK_L, 3, 3, 4),
                                   (1, BLOCK_L + 6, 1, 2, 2 * max(FWD_CONFIG[0], BWD_CONFIG[0], AFTER_CONFIG[0]) + 8)],
                         ids=["tiles3-G2-H4", "short-G1-H3", "one-tile-G3-H3", "angle-blocks2"])
def test_triton_matches_reference_with_gradients(shape):
    inputs = make_inputs(*shape)
    want = run(mamba3_rotary_ref, inputs, torch.float32)
    got = run(mamba3_rotary_op, inputs, torch.float32)
    for name in want:
        assert_close(name, want[name], got[name], torch.float32)


def test_bf16_outputs():
    """B~, C~ stored in bf16 (the SSD operands of a bf16 run; the interpreter's bf16 cast
    truncates, the GPU's rounds), the final angle in fp32."""
    inputs = make_inputs(1, 70, 1, 2, 4)
    want = mamba3_rotary_ref(**inputs, out_dtype=torch.float32)
    got = mamba3_rotary_op(**inputs, out_dtype=torch.bfloat16)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, b in zip(("B_rot", "C_rot"), want, got):
        assert_close(name, a, b.float(), torch.bfloat16)


def test_bf16_inputs_gradients():
    """B, C and theta in bf16 (dt fp32), as a bf16 run feeds them: the gradients come back in their
    inputs' dtypes, dtheta summed in fp32 before its one cast (the in-tile and the tiles-after parts
    of the step angles' gradient meet in an fp32 buffer of their own)."""
    inputs = make_inputs(2, 2 * BLOCK_L + 5, 1, 3, 8, seed=6)
    inputs = {k: v if k == "dt" else v.to(torch.bfloat16) for k, v in inputs.items()}
    want = run(mamba3_rotary_ref, {k: v.float() for k, v in inputs.items()}, torch.float32)
    got = run(mamba3_rotary_op, inputs, torch.float32)
    for name in ("dB", "dC", "dtheta"):
        assert got[name].dtype == torch.bfloat16, name
        assert_close(name, want[name], got[name].float(), torch.bfloat16)
    assert got["ddt"].dtype == torch.float32
    assert_close("ddt", want["ddt"], got["ddt"], torch.float32)


@pytest.mark.parametrize("used", ["B_rot", "C_rot", "angle_end"])
def test_gradients_through_one_output_only(used):
    """The other outputs unused: their gradients reach the backward as None (no zeros of them, nor
    of the float64 tile angles kept for it, are materialized) and count as zero."""
    inputs = make_inputs(1, BLOCK_L + 9, 1, 2, 6, seed=3)
    grads = {}
    for name, fn in (("reference", mamba3_rotary_ref), ("triton", mamba3_rotary_op)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = dict(zip(("B_rot", "C_rot", "angle_end"), fn(*leaves.values(), torch.float32)))[used]
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        grads[name] = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
    for k in inputs:
        assert_close(f"d{k}", grads["reference"][k], grads["triton"][k], torch.float32)


def test_large_angles_accumulate_exactly():
    """~300 rad per step over 3 tiles: 6e4 rad in all, where an fp32 sum is off by ~4e-3 rad;
    float64 accumulation mod 2 pi keeps the fp32 accuracy of the reference."""
    inputs = make_inputs(1, 3 * BLOCK_L, 1, 2, 4, seed=5)
    inputs.update(dt=torch.ones_like(inputs["dt"]), theta=300 + inputs["theta"])
    want = mamba3_rotary_ref(**inputs, out_dtype=torch.float32)
    got = mamba3_rotary_op(**inputs, out_dtype=torch.float32)
    for name, a, b in zip(("B_rot", "C_rot", "angle_end"), want, got):
        assert_close(name, a, b, torch.float32, rtol=1e-5, atol=1e-5)


def test_cos_and_sin_accurate_in_every_quadrant():
    """B = (1, 0) pairs rotate to (cos Theta, -sin Theta): against float64 cos/sin of the float64
    angle sums, for angles of both signs, every quadrant, exact multiples of pi/4 (the quadrant
    edges of the kernel's reduction) and |Theta| up to ~2.5e4 rad: within ~2 fp32 ulps of 1 (the angle
    reduced in float64 to [-pi/4, pi/4] before it is rounded to fp32)."""
    l = 3 * BLOCK_L
    gen = torch.Generator().manual_seed(11)
    steps = torch.cat([torch.full((BLOCK_L,), math.pi / 4), torch.full((BLOCK_L,), -math.pi / 4 - 1e-7),
                       400 + 50 * torch.randn(BLOCK_L, generator=gen)])
    theta = torch.stack([steps, -steps.flip(0)], -1)[None, :, None]  # (1, l, 1, 2)
    pair = torch.tensor([1.0, 0.0]).repeat(2)
    B = pair.expand(1, l, 1, 4).contiguous()
    dt = torch.ones(1, l, 1)
    B_rot, _, _ = mamba3_rotary_op(B, B, dt, theta, torch.float32)
    angle = torch.cumsum((dt[..., None] * theta).double(), dim=1)  # (1, l, 1, 2)
    assert angle.abs().max() > 2e4 and angle.min() < -2e4
    got = B_rot.double().unflatten(-1, (2, 2))
    err = torch.stack([got[..., 0] - angle.cos(), got[..., 1] + angle.sin()]).abs().max().item()
    assert err < 1.5e-7, f"max |error| {err:.2e} of cos/sin"  # fp32 cos/sin of the angle mod 2 pi: 2.2e-7


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_matches_reference(out_dtype):
    """S1-like rows (h 24, one group, n 128) over 2,048 steps: outputs and gradients by relative L2."""
    inputs = make_inputs(2, 2048, 1, 24, 128, seed=3)
    want = run(mamba3_rotary_ref, inputs, out_dtype, device="cuda")
    got = run(mamba3_rotary_op, inputs, out_dtype, device="cuda")
    errs = {k: ((got[k].float() - v.float()).norm() / v.float().norm()).item() for k, v in want.items()}
    bound = 1e-5 if out_dtype == torch.float32 else 5e-3
    assert all(e < bound for e in errs.values()), errs


SM90_COMPILE = """
import triton
import re, subprocess, tempfile
from pathlib import Path
from streamssm.kernels.mamba3 import rotary
from streamssm.testing import compile_for_sm90

F64 = {"p_sums", "p_enter"}  # the tile angles
F32 = {"p_dt", "p_dsums", "p_after", "p_ddt", "p_ddt_local", "p_dtheta_local"}  # dt, the angle gradients: fp32
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for kernel, (block_k, warps) in ((rotary._rotary_tile_sums_kernel, (rotary.FWD_CONFIG[0], 4)),
                                 (rotary._rotary_fwd_kernel, rotary.FWD_CONFIG),
                                 (rotary._rotary_bwd_local_kernel, rotary.BWD_CONFIG),
                                 (rotary._rotary_bwd_after_kernel, rotary.AFTER_CONFIG)):
    fn = kernel
    for half in ("*bf16", "*fp32"):
        compiled = compile_for_sm90(fn, {"BLOCK_L": rotary.BLOCK_L, "BLOCK_K": block_k},
                                    lambda a: "*fp64" if a in F64 else "*fp32" if a in F32 else half, warps)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        stack = int(re.search(r"STACK:([0-9]+)", usage).group(1))
        assert stack == 0, f"{fn.__name__} ({half}, {block_k} angles, {warps} warps) spills registers: {usage}"
"""


def test_kernels_compile_for_sm90():
    """Every rotation kernel compiles to an sm_90 binary, bf16 and fp32 B/C (float64 angle sums),
    at the block sizes and warps the launchers use, without spilling registers to local memory
    (the backward's first kernel did at 16 angles and 4 warps with int64 offsets per element)."""
    assert_script_compiles_for_sm90(SM90_COMPILE)
