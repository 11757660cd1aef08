"""Mamba-3 vs Mamba-2: the layer (Mamba3Block vs Mamba2Block) and the op (mamba3_scan vs ssd_scan).

Run on a GPU:

    python benchmarks/bench_mamba3.py [--shapes S1,S2,S3] [--levels layer,op] [--out results.md]

Shapes S1-S3 of shared/BENCHMARKS.md mapped to blocks: d_inner = heads * headdim, expand 2
(d_model = d_inner / 2), d_state = dstate, one group, chunk 256, batch and length as listed.
Layer rows: forward and forward+backward (gradients of the input and every parameter) under
bf16 autocast, fp32 parameters. Op rows: bf16 x, B, C (and theta for Mamba-3); fp32 dt
(after softplus), A, D, lam; forward and forward+backward (gradients of every input). Times
are medians after warm-up (``triton.testing.do_bench``, eager launches: what a training loop
sees); peak memory is that of forward+backward above the inputs and parameters. Ratio =
Mamba-3 time / Mamba-2 time (> 1: Mamba-3 is slower).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SSD_SHAPES, peak_memory_gib, run_tag, time_eager  # noqa: E402

from streamssm.kernels import mamba3_scan, ssd_scan  # noqa: E402
from streamssm.layers import Mamba2Block, Mamba3Block  # noqa: E402
from streamssm.models import ArchConfig  # noqa: E402

CHUNK = 256
EXPAND = 2


def build_layers(shape: dict[str, int], device: torch.device) -> dict[str, torch.nn.Module]:
    """Both blocks at the shape's width: d_inner = heads * headdim, d_model = d_inner / 2."""
    d_model = shape["heads"] * shape["headdim"] // EXPAND
    torch.manual_seed(0)
    kw = dict(d_model=d_model, d_state=shape["dstate"], expand=EXPAND, headdim=shape["headdim"], chunk_size=CHUNK)
    return {"mamba2": Mamba2Block(ArchConfig(block="mamba2", **kw)).to(device),
            "mamba3": Mamba3Block(ArchConfig(block="mamba3", **kw)).to(device)}


def layer_fns(block: torch.nn.Module, u: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward without grad, forward + backward) of ``block`` on ``u`` (b, l, d) under bf16 autocast."""

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return block(u)[0]

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        u.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(u)[0]
        y.backward(torch.ones_like(y))

    return fwd, fwd_bwd


def op_inputs(shape: dict[str, int], device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of both ops at a shape (one group); Mamba-3 adds lam and theta."""
    b, l, h, p, n = (shape[k] for k in ("batch", "length", "heads", "headdim", "dstate"))
    g = torch.Generator(device=device).manual_seed(seed)
    bf = dict(device=device, dtype=torch.bfloat16)
    f32 = dict(device=device, dtype=torch.float32)
    dt_init = torch.exp(torch.rand(b, l, h, generator=g, **f32) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "x": torch.randn(b, l, h, p, generator=g, **bf),
        "dt": dt_init,
        "A": -torch.exp(torch.rand(h, generator=g, **f32) * math.log(16)),
        "B": torch.randn(b, l, 1, n, generator=g, **bf),
        "C": torch.randn(b, l, 1, n, generator=g, **bf),
        "D": torch.randn(h, generator=g, **f32),
        "lam": torch.rand(b, l, h, generator=g, **f32),
        "theta": torch.randn(b, l, 1, n // 2, generator=g, **bf),
    }


def op_fns(kind: str, t: dict[str, torch.Tensor]) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward + backward with gradients of every floating input) of one op."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}

    def call(d):
        if kind == "mamba3":
            return mamba3_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], d["lam"], d["theta"], D=d["D"],
                               chunk_size=CHUNK, backend="triton")
        return ssd_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=CHUNK, D=d["D"], backend="triton")

    def fwd():
        with torch.no_grad():
            return call(t)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        y = call(leaves)
        y.backward(torch.ones_like(y))

    return fwd, fwd_bwd


def measure(fwd: Callable[[], object], fwd_bwd: Callable[[], object], warmup: int, rep: int) -> dict[str, float]:
    fwd_bwd()  # compile / autotune before timing
    fwd()
    return dict(fwd_ms=time_eager(fwd, warmup=warmup, rep=rep), fwd_bwd_ms=time_eager(fwd_bwd, warmup=warmup, rep=rep),
                peak_gib=peak_memory_gib(fwd_bwd))


def markdown(rows: list[dict]) -> str:
    head = ("| level | shape | kernel | fwd ms | fwd+bwd ms | peak GiB fwd+bwd | tokens/s fwd+bwd | "
            "fwd ratio m3/m2 | fwd+bwd ratio m3/m2 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = next(b for b in rows if b["level"] == r["level"] and b["shape"] == r["shape"] and b["kernel"] == "mamba2")
        ratios = [f"{r[c] / base[c]:.2f}x" for c in ("fwd_ms", "fwd_bwd_ms")]
        lines.append(f"| {r['level']} | {r['shape']} | {r['kernel']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['peak_gib']:.2f} | {r['tokens'] / r['fwd_bwd_ms'] * 1e3:.3e} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S1,S2,S3", help="comma-separated names of shared/BENCHMARKS.md")
    parser.add_argument("--levels", default="layer,op", help="layer, op or both")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up time (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the Triton kernels)")
    device = torch.device("cuda")
    rows = []
    for name in args.shapes.split(","):
        shape = SSD_SHAPES[name]
        tokens = shape["batch"] * shape["length"]
        if "layer" in args.levels:
            layers = build_layers(shape, device)
            d_model = shape["heads"] * shape["headdim"] // EXPAND
            u = torch.randn(shape["batch"], shape["length"], d_model, device=device, requires_grad=True)
            for kind, block in layers.items():
                rows.append(dict(level="layer", shape=name, kernel=kind, tokens=tokens,
                                 **measure(*layer_fns(block, u), args.warmup, args.rep)))
                print(rows[-1], flush=True)
            del layers, u
        if "op" in args.levels:
            t = op_inputs(shape, device)
            for kind in ("mamba2", "mamba3"):
                rows.append(dict(level="op", shape=name, kernel=kind, tokens=tokens,
                                 **measure(*op_fns(kind, t), args.warmup, args.rep)))
                print(rows[-1], flush=True)
            del t
        torch.cuda.empty_cache()
    table = f"{run_tag()}\n\n{markdown(rows)}\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
