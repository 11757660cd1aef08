"""Causal depthwise conv1d + SiLU: ours (Triton) vs PyTorch ``F.conv1d`` (cuDNN) (GPU).

    python benchmarks/bench_conv1d.py [--shapes M1,M2,M3,S1] [--width 4] [--layouts time,channel-last]
                                      [--old path/to/earlier/conv.py] [--no-cudnn] [--out table.md]

The conv of a Mamba block: x (b, d, l) bf16, weight (d, w) and bias (d,) fp32, SiLU. Shapes:
the (batch, channels, length) of M1-M3 of shared/BENCHMARKS.md (channels = d_inner) and S1
(channels = the Mamba-2 conv's d_inner + 2 d_state = 1536 + 256). The PyTorch baseline is what
a Mamba block without a conv kernel runs: ``silu(F.conv1d(x, weight[:, None], bias,
padding=w-1, groups=d)[..., :l])`` (cuDNN, bf16). mamba-ssm's CUDA ``causal_conv1d`` is a
separate package and is not built here. Each is timed forward and forward+backward (gradients
of x, weight, bias), eager and replayed from a CUDA graph; peak memory is that of
forward+backward; "% of floor" compares our forward with the copy-bandwidth floor of reading
x and writing y; "bwd / fwd" is (fwd+bwd - fwd) / fwd from the graph times. Outputs and
gradients of each are checked against the float64 reference. Layouts: ``time`` is a contiguous
(b, d, l) x, ``channel-last`` a transposed (b, l, d) tensor, as the Mamba blocks pass their
in_proj slices (dy in the same layout). ``--old`` times the ``causal_conv1d_triton`` of an
earlier conv.py beside ours (e.g. written out by ``git show REV:kernels/conv1d/conv.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import MAMBA1_SHAPES, Table, peak_memory_gib, report, run_tag, time_eager, time_graph  # noqa: E402

from streamssm.kernels import causal_conv1d  # noqa: E402
from streamssm.kernels.conv1d.reference import causal_conv1d_ref  # noqa: E402
from streamssm.testing import assert_close  # noqa: E402

SHAPES = {name: (s["batch"], s["dim"], s["length"]) for name, s in MAMBA1_SHAPES.items()}
SHAPES["S1"] = (8, 1536 + 256, 4096)
COPY_TBPS = 3.0  # H100 device-to-device copy, read + write (BENCHMARKS.md)


def ours(x, weight, bias):
    return causal_conv1d(x, weight, bias, activation="silu", backend="triton")


def cudnn(x, weight, bias):
    w = weight.shape[1]
    return F.silu(F.conv1d(x, weight.to(x.dtype)[:, None], bias.to(x.dtype), padding=w - 1,
                           groups=x.shape[1])[..., : x.shape[-1]])


def load_old(path: str):
    """``causal_conv1d_triton`` of an earlier conv.py (run with silu, like ``ours``)."""
    spec = importlib.util.spec_from_file_location("conv1d_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lambda x, weight, bias: mod.causal_conv1d_triton(x, weight, bias, activation="silu")


def empty_in(layout: str, b: int, d: int, l: int, **kw) -> torch.Tensor:
    """An uninitialized (b, d, l) tensor, time-contiguous or a transposed (b, l, d) one."""
    return torch.empty(b, l, d, **kw).transpose(1, 2) if layout == "channel-last" else torch.empty(b, d, l, **kw)


def make_inputs(b: int, d: int, l: int, w: int, layout: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = empty_in(layout, b, d, l, device="cuda", dtype=torch.bfloat16)
    x.copy_(torch.randn(b, d, l, device="cuda", generator=g))
    weight = torch.randn(d, w, device="cuda", generator=g) / w
    bias = torch.randn(d, device="cuda", generator=g) * 0.1
    return x, weight, bias


def check(name: str, fn, x, weight, bias) -> float:
    """Output and gradients vs the float64 reference; returns the output's max abs error."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]  # clone keeps the layout
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    y_ref = causal_conv1d_ref(*ref_leaves, activation="silu")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close(f"{name} y", y_ref, y, torch.bfloat16)
    for label, got, want in zip(("dx", "dweight", "dbias"), leaves, ref_leaves):
        assert_close(f"{name} {label}", want.grad, got.grad, torch.bfloat16)
    return float((y.double() - y_ref).abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="M1,M2,M3,S1")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--layouts", default="time", help="comma list of time, channel-last")
    parser.add_argument("--old", default=None, help="an earlier conv.py to time beside ours")
    parser.add_argument("--no-cudnn", action="store_true", help="leave out the cuDNN baseline")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_conv1d needs a CUDA GPU", file=sys.stderr)
        return 2
    table = Table(["shape", "kernel", "fwd eager ms", "fwd graph ms", "fwd+bwd eager ms", "fwd+bwd graph ms",
                   "bwd / fwd", "peak GiB", "fwd % of floor", "max abs err"],
                  ratio_of=["fwd graph ms", "fwd+bwd graph ms"])
    kernels = [("ours", ours)] + ([("old Triton", load_old(args.old))] if args.old else [])
    kernels += [] if args.no_cudnn else [("cudnn F.conv1d", cudnn)]
    for shape, layout in ((s, lay) for lay in args.layouts.split(",") for s in args.shapes.split(",")):
        b, d, l = SHAPES[shape]
        x, weight, bias = make_inputs(b, d, l, args.width, layout)
        floor_ms = 2 * 2 * b * d * l / COPY_TBPS / 1e9
        for kernel, fn in kernels:
            try:
                err = check(f"{shape} {kernel}", fn, x, weight, bias) if l <= 16384 else None
            except AssertionError as exc:  # reported, and the timings still run
                print(f"CHECK FAILED {shape} {kernel}: {exc}", flush=True)
                err = None
            leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
            dy = empty_in(layout, b, d, l, device="cuda", dtype=torch.bfloat16).normal_()

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(x, weight, bias)

            def fwd_bwd(fn=fn, leaves=leaves, dy=dy):
                torch.autograd.grad(fn(*leaves), leaves, dy)

            fg, fbg = time_graph(fwd), time_graph(fwd_bwd)
            table.add(shape=f"{shape} {b}x{d}x{l} {layout}", kernel=kernel, **{
                "fwd eager ms": time_eager(fwd), "fwd graph ms": fg, "fwd+bwd eager ms": time_eager(fwd_bwd),
                "fwd+bwd graph ms": fbg, "bwd / fwd": (fbg - fg) / fg, "peak GiB": peak_memory_gib(fwd_bwd),
                "fwd % of floor": f"{100 * floor_ms / fg:.0f} %", "max abs err": err})
            print(table.rows[-1], flush=True)
    text = (f"{run_tag()}\ncausal depthwise conv1d width {args.width} + SiLU, bf16 x, fp32 weight/bias; "
            f"ratio = PyTorch time / ours (> 1: ours faster)\n\n" + table.markdown())
    report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
