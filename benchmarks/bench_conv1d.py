"""Causal depthwise conv1d + SiLU: ours (Triton) vs PyTorch ``F.conv1d`` (cuDNN) (GPU).

    python benchmarks/bench_conv1d.py [--shapes M1,M2,M3,S1,R1,R2,L1] [--width 4] [--layouts time,channel-last]
                                      [--state] [--old path/to/earlier/conv.py] [--no-cudnn] [--out table.md]
                                      [--programs-per-sm N]

The conv of a Mamba block: x (b, d, l) bf16, weight (d, w) and bias (d,) fp32, SiLU. Shapes:
the (batch, channels, length) of M1-M3 of shared/BENCHMARKS.md (channels = d_inner) and S1
(channels = the Mamba-2 conv's d_inner + 2 d_state = 1536 + 256); R1 and R2, the serving calls of
the 4 x d512 Mamba-2 LM (256 or 384 streams x 320 tokens, 1024 + 256 channels; run them with
``--layouts channel-last --state``, the block's layout and its carried conv state); L1, one long
pair of sequences (2 x 1536 x 65,536). The PyTorch baseline is what a Mamba block without a conv
kernel runs: ``silu(F.conv1d(x, weight[:, None], bias, padding=w-1, groups=d)[..., :l])`` (cuDNN,
bf16). mamba-ssm's CUDA ``causal_conv1d`` is a separate package and is not built here. Each is
timed forward and forward+backward (gradients of x, weight, bias), eager and replayed from a CUDA
graph; peak memory is that of forward+backward. "bwd graph ms" times our backward launcher alone
(dy given; the old kernel's too), for cuDNN it is fwd+bwd - fwd; "bwd / fwd" divides it by the
forward. "fwd x floor" and "bwd x floor" are multiples of the copy-bandwidth floor of their bytes
(forward: read x, write y; backward: read x and dy, write dx; bf16). Outputs and gradients of
each are checked against the float64 reference (up to 16,384 steps). Layouts (default time):
``time`` is a contiguous (b, d, l) x, ``channel-last`` a transposed (b, l, d) tensor, as the
Mamba blocks pass their in_proj slices (dy in the same layout). ``--old`` times the launchers of
an earlier conv.py beside ours (e.g. written out by ``git show REV:kernels/conv1d/conv.py``;
called directly, as its op registration would run today's launchers): forward, and backward where
its ``_causal_conv1d_bwd`` takes today's arguments.
``--state``: every call takes an initial conv state (b, d, w-1) and returns the final one (the
backward launchers then get a d final state too). ``--programs-per-sm``: the backward's segment
length aims for this many 64-channel programs per SM instead of ``conv.PROGRAMS_PER_SM`` (more:
shorter segments, a shorter last wave, more partial sums).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import COPY_TBPS, MAMBA1_SHAPES, Table, peak_memory_gib, report, run_tag, time_eager, time_graph  # noqa: E402

from streamssm.kernels import causal_conv1d  # noqa: E402
from streamssm.kernels.conv1d import conv  # noqa: E402
from streamssm.kernels.conv1d.conv import _causal_conv1d_bwd  # noqa: E402
from streamssm.kernels.conv1d.reference import causal_conv1d_ref  # noqa: E402
from streamssm.testing import assert_close  # noqa: E402

SHAPES = {name: (s["batch"], s["dim"], s["length"]) for name, s in MAMBA1_SHAPES.items()}
SHAPES["S1"] = (8, 1536 + 256, 4096)
SHAPES["R1"] = (256, 1024 + 256, 320)
SHAPES["R2"] = (384, 1024 + 256, 320)
SHAPES["L1"] = (2, 1536, 65536)


def ours(x, weight, bias, init=None):
    """y, or (y, final state) given an initial state ``init``."""
    return causal_conv1d(x, weight, bias, initial_state=init, activation="silu", return_final_state=init is not None,
                         backend="triton")


def cudnn(x, weight, bias, init=None):
    w = weight.shape[1]
    if init is None:
        return F.silu(F.conv1d(x, weight.to(x.dtype)[:, None], bias.to(x.dtype), padding=w - 1,
                               groups=x.shape[1])[..., : x.shape[-1]])
    xpad = torch.cat([init, x], dim=-1)
    y = F.silu(F.conv1d(xpad, weight.to(x.dtype)[:, None], bias.to(x.dtype), groups=x.shape[1]))
    return y, xpad[..., -(w - 1):]


def load_old(path: str):
    """The launchers of an earlier conv.py, called directly (its ``causal_conv1d_triton`` goes
    through the registered op, which runs today's launcher): (forward with silu, backward
    launcher or None where its signature differs from today's)."""
    spec = importlib.util.spec_from_file_location("conv1d_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def fwd(x, weight, bias, init=None):
        out = mod._causal_conv1d_fwd(x, weight, bias, init, True)  # y, or (y, final) since 2026-12-05
        y = out[0] if isinstance(out, tuple) else out
        if init is None:
            return y
        return y, out[1] if isinstance(out, tuple) else mod._final_state(x, init, weight.shape[1])

    bwd = getattr(mod, "_causal_conv1d_bwd", None)
    params = list(inspect.signature(bwd).parameters) if bwd is not None else []
    same = params == list(inspect.signature(_causal_conv1d_bwd).parameters)
    return fwd, bwd if same else None


def first(out):
    """y of a conv's output (y, or (y, final state))."""
    return out[0] if isinstance(out, tuple) else out


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


def check(name: str, fn, x, weight, bias, init=None, grads: bool = True) -> float:
    """Output and (``grads``) gradients vs the float64 reference; returns the output's max abs error."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]  # clone keeps the layout
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = first(fn(*leaves, init))
    y_ref = causal_conv1d_ref(*ref_leaves, initial_state=None if init is None else init.double(), activation="silu")
    assert_close(f"{name} y", y_ref, y, torch.bfloat16)
    if not grads:
        return float((y.double() - y_ref).abs().max().detach())
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    for label, got, want in zip(("dx", "dweight", "dbias"), leaves, ref_leaves):
        assert_close(f"{name} {label}", want.grad, got.grad, torch.bfloat16)
    return float((y.double() - y_ref).abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="M1,M2,M3,S1")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--layouts", default="time", help="comma list of time, channel-last")
    parser.add_argument("--state", action="store_true", help="calls carry a conv state in and out")
    parser.add_argument("--old", default=None, help="an earlier conv.py to time beside ours")
    parser.add_argument("--no-cudnn", action="store_true", help="leave out the cuDNN baseline")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--programs-per-sm", type=int, default=None,
                        help="segment length target of the backward (programs of 64 channels per SM)")
    args = parser.parse_args()
    if args.programs_per_sm:
        conv.PROGRAMS_PER_SM = args.programs_per_sm
    if not torch.cuda.is_available():
        print("bench_conv1d needs a CUDA GPU", file=sys.stderr)
        return 2
    table = Table(["shape", "kernel", "fwd eager ms", "fwd graph ms", "fwd+bwd eager ms", "fwd+bwd graph ms",
                   "bwd graph ms", "bwd / fwd", "fwd x floor", "bwd x floor", "peak GiB", "max abs err"],
                  ratio_of=["fwd graph ms", "fwd+bwd graph ms", "bwd graph ms"])
    # (name, forward, backward through autograd, backward launcher or None)
    kernels = [("ours", ours, True, _causal_conv1d_bwd)]
    if args.old:
        old_fwd, old_bwd = load_old(args.old)
        kernels.append(("old Triton" if old_bwd else "old Triton (fwd only)", old_fwd, False, old_bwd))
    kernels += [] if args.no_cudnn else [("cudnn F.conv1d", cudnn, True, None)]
    for shape, layout in ((s, lay) for lay in args.layouts.split(",") for s in args.shapes.split(",")):
        b, d, l = SHAPES[shape]
        x, weight, bias = make_inputs(b, d, l, args.width, layout)
        init = torch.randn(b, d, args.width - 1, device="cuda", dtype=x.dtype) if args.state else None
        dfinal = torch.randn(b, d, args.width - 1, device="cuda", dtype=x.dtype) if args.state else None
        floor_ms = 2 * 2 * b * d * l / COPY_TBPS / 1e9  # bf16 x read, y written
        for kernel, fn, autograd, bwd in kernels:
            has_bwd = autograd or bwd is not None
            try:
                err = check(f"{shape} {kernel}", fn, x, weight, bias, init, autograd) if l <= 16384 else None
            except AssertionError as exc:  # reported, and the timings still run
                print(f"CHECK FAILED {shape} {kernel}: {exc}", flush=True)
                err = None
            leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
            dy = empty_in(layout, b, d, l, device="cuda", dtype=torch.bfloat16).normal_()

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(x, weight, bias, init)

            def bwd_alone(bwd=bwd, dy=dy):
                return bwd(dy, dfinal, x, weight, bias, init, True)

            def fwd_bwd(fn=fn, leaves=leaves, dy=dy, autograd=autograd, bwd=bwd):
                if autograd:
                    torch.autograd.grad(first(fn(*leaves, init)), leaves, dy)
                else:
                    fwd(fn)
                    bwd_alone(bwd, dy)

            fg = time_graph(fwd)
            fbg = time_graph(fwd_bwd) if has_bwd else None
            bg = time_graph(bwd_alone) if bwd is not None else (fbg - fg if has_bwd else None)
            table.add(shape=f"{shape} {b}x{d}x{l} {layout}{' state' if args.state else ''}", kernel=kernel, **{
                "fwd eager ms": time_eager(fwd), "fwd graph ms": fg,
                "fwd+bwd eager ms": time_eager(fwd_bwd) if has_bwd else None, "fwd+bwd graph ms": fbg,
                "bwd graph ms": bg, "bwd / fwd": bg / fg if has_bwd else None,
                "fwd x floor": fg / floor_ms, "bwd x floor": bg / (1.5 * floor_ms) if has_bwd else None,
                "peak GiB": peak_memory_gib(fwd_bwd) if has_bwd else None, "max abs err": err})
            print(table.rows[-1], flush=True)
    text = (f"{run_tag()}\ncausal depthwise conv1d width {args.width} + SiLU, bf16 x, fp32 weight/bias; "
            f"backward segments for {conv.PROGRAMS_PER_SM} programs of 64 channels per SM; "
            f"ratio = other time / ours (> 1: ours faster)\n\n" + table.markdown())
    report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
