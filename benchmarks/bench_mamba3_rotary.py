"""Mamba-3's rotation kernels (kernels/mamba3/rotary.py) alone: forward and backward launchers at
the op's shapes, beside an earlier rotary.py (``--old``), with their byte floors.

    python benchmarks/bench_mamba3_rotary.py [--shapes S1,S2,S3] [--old path/to/earlier/rotary.py]
                                             [--sweep] [--profile S1] [--out table.md]

Shapes S1-S3 of shared/BENCHMARKS.md as bench_mamba3 maps them: one group of B and C (bf16),
rotated into every head's frame (B~, C~ (b, l, h, n) bf16); dt (b, l, h) fp32, theta (b, l, 1, n/2)
bf16. Rows per shape: forward (tile sums, their cumsum, the rotation) and backward (local
kernel, suffix sums, after kernel; an earlier version's: dangle and dstep kernels) of each
version, CUDA-graph medians (``_harness.time_graph``).
"x byte floor": the time over the least time to move the kernel's bytes once at the copy bandwidth
(forward: write B~ and C~, read B, C, dt, theta; backward: read dB~, dC~, B, C, dt, theta, write
dB, dC, ddt, dtheta). "ms ratio" (old / new) > 1: this tree is faster. Outputs of the old and new
kernels are compared (per output, the max abs difference over the old's max abs value; the worst
output's) so a faster kernel that is wrong shows. ``--sweep``: this tree's forward and backward at
every (angles per program, warps) of SWEEP (``rotary.FWD_CONFIG`` / ``BWD_CONFIG`` set in turn)
and the backward at every AFTER_SWEEP config of the after kernel, the launchers' choices marked.
``--profile``: at the listed shapes, each version's forward and backward kernel by kernel
(torch.profiler, after every timing).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (COPY_TBPS, SSD_SHAPES, Table, kernel_profile, max_rel_diff, report, run_tag,  # noqa: E402
                      time_graph)

from streamssm.kernels.mamba3 import rotary  # noqa: E402

SWEEP = [(block_k, warps) for block_k in (8, 16, 32) for warps in (2, 4, 8)]
# the after kernel: all 64 angles of S1 in one program need 8 warps (255 registers; at 4 they spill)
AFTER_SWEEP = [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]


def load_rotary(path: str):
    """An earlier rotary.py, loaded as its own module (its launchers called directly)."""
    spec = importlib.util.spec_from_file_location("rotary_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_inputs(b: int, l: int, h: int, n: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """B, C (b, l, 1, n) bf16; dt (b, l, h) fp32; theta (b, l, 1, n/2) bf16; the output gradients
    dBo, dCo (b, l, h, n) bf16 and of the final angle (b, h, n/2) fp32."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    return dict(B=randn(b, l, 1, n), C=randn(b, l, 1, n),
                dt=torch.rand(b, l, h, device=device, generator=gen) * 0.1 + 0.001, theta=randn(b, l, 1, n // 2),
                dBo=randn(b, l, h, n), dCo=randn(b, l, h, n), dangle_end=randn(b, h, n // 2, dtype=torch.float32))


def floor_ms(t: dict[str, torch.Tensor], backward: bool) -> float:
    """Least ms to move the kernel's bytes once at COPY_TBPS."""
    def nbytes(*names):
        return sum(t[k].numel() * t[k].element_size() for k in names)

    small = nbytes("B", "C", "dt", "theta")
    moved = 2 * small + nbytes("dBo", "dCo") if backward else small + nbytes("dBo", "dCo")  # B~, C~ as dBo, dCo
    return moved / (COPY_TBPS * 1e12) * 1e3


def kernel_calls(mod, t: dict[str, torch.Tensor]):
    """(forward, backward) closures of one module's launchers, and the forward's outputs."""
    args = (t["B"], t["C"], t["dt"], t["theta"])
    out = mod.mamba3_rotary_fwd_triton(*args, torch.bfloat16)

    def fwd():
        return mod.mamba3_rotary_fwd_triton(*args, torch.bfloat16)

    def bwd():
        return mod.mamba3_rotary_bwd_triton(t["dBo"], t["dCo"], t["dangle_end"], *args, out[3])

    return fwd, bwd, out


def shape_inputs(shapes: list[str]):
    """(shape, inputs) of each shape in turn, each freed before the next."""
    for shape in shapes:
        s = SSD_SHAPES[shape]
        yield shape, make_inputs(s["batch"], s["length"], s["heads"], s["dstate"])
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="S1,S2,S3")
    parser.add_argument("--old", default=None, help="an earlier rotary.py to time beside this tree's")
    parser.add_argument("--sweep", action="store_true", help="time every config of SWEEP")
    parser.add_argument("--profile", default="", help="shapes whose kernels to profile, one by one")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_mamba3_rotary times GPU kernels: no CUDA device here", file=sys.stderr)
        return 1
    versions = [("new", rotary)] + ([("old", load_rotary(args.old))] if args.old else [])
    # "shape" names a shape and a kernel, "kernel" the version: the ratio column is old / new
    table = Table(["shape", "kernel", "ms", "x byte floor", "max |old - new| / max |old|"], ratio_of=["ms"], ours="new")
    for shape, t in shape_inputs(args.shapes.split(",")):
        outputs = {}
        for version, mod in versions:
            fwd, bwd, out = kernel_calls(mod, t)
            outputs[version] = {"forward": out[:3], "backward": bwd()}
            for kernel, fn, backward in (("forward", fwd, False), ("backward", bwd, True)):
                ms = time_graph(fn)
                diff = max_rel_diff(outputs[version][kernel], outputs["new"][kernel]) if version == "old" else None
                table.add(shape=f"{shape} {kernel}", kernel=version, ms=ms,
                          **{"x byte floor": ms / floor_ms(t, backward), "max |old - new| / max |old|": diff})
        del t, outputs
    text = f"{run_tag()}\n\n{table.markdown()}"
    if args.sweep:
        text += "\n\n" + sweep(args.shapes.split(",")).markdown()
    for shape, t in shape_inputs([s for s in args.profile.split(",") if s]):
        for version, mod in versions:
            for kernel, fn in zip(("forward", "backward"), kernel_calls(mod, t)):
                text += f"\n\n{shape} {kernel}, {version}: GPU kernels of 3 calls\n" + kernel_profile(fn, top=8)
    report(text, args.out)
    return 0


def sweep(shapes: list[str]) -> Table:
    """Forward and backward ms of this tree at each (angles, warps) of SWEEP for the forward and
    local kernels, then backward ms at each of AFTER_SWEEP for the after kernel (the others at
    their chosen configs)."""
    table = Table(["shape", "kernels", "angles x warps", "forward ms", "backward ms"])
    chosen = rotary.FWD_CONFIG, rotary.BWD_CONFIG, rotary.AFTER_CONFIG
    for shape, t in shape_inputs(shapes):
        for config in SWEEP:
            rotary.FWD_CONFIG = rotary.BWD_CONFIG = config
            fwd, bwd, _ = kernel_calls(rotary, t)
            mark = "".join(f" ({kind})" for kind, c in zip(("forward", "backward"), chosen) if c == config)
            table.add(shape=shape, kernels="forward, local",
                      **{"angles x warps": f"{config[0]} x {config[1]}{mark}", "forward ms": time_graph(fwd),
                         "backward ms": time_graph(bwd)})
        rotary.FWD_CONFIG, rotary.BWD_CONFIG = chosen[:2]
        for config in AFTER_SWEEP:
            rotary.AFTER_CONFIG = config
            _, bwd, _ = kernel_calls(rotary, t)
            mark = " (chosen)" if config == chosen[2] else ""
            table.add(shape=shape, kernels="after", **{"angles x warps": f"{config[0]} x {config[1]}{mark}",
                                                       "backward ms": time_graph(bwd)})
        rotary.AFTER_CONFIG = chosen[2]
        del t
    return table


if __name__ == "__main__":
    raise SystemExit(main())
