"""Mamba-3 vs Mamba-2: the layer (Mamba3Block vs Mamba2Block) and the op (mamba3_scan vs ssd_scan),
with mamba-ssm's Triton Mamba-3 (SISO) op beside ours.

Run on a GPU:

    python benchmarks/bench_mamba3.py [--shapes S1,S2,S3] [--levels layer,op] [--chunks 256] [--peer] [--graphs]
                                      [--out results.md]

Shapes S1-S3 of shared/BENCHMARKS.md mapped to blocks: d_inner = heads * headdim, expand 2
(d_model = d_inner / 2), d_state = dstate, one group, batch and length as listed; every row at each
of ``--chunks`` (256: the bench's long-standing comparison; 64: the models' default and
mamba-ssm's tuned Mamba-3 chunk).
Layer rows: forward and forward+backward (gradients of the input and every parameter) under
bf16 autocast, fp32 parameters. Op rows: bf16 x, B, C (and theta for Mamba-3); fp32 dt
(after softplus), A, D, lam; forward and forward+backward (gradients of every input). Times
are medians after warm-up (``triton.testing.do_bench``, eager launches: what a training loop
sees; ``--graphs`` adds the medians of one CUDA-graph replay: the GPU's own time, without Python's
launches); peak memory is that of forward+backward above the inputs and parameters. Ratio =
Mamba-3 time / Mamba-2 time at the same chunk (> 1: Mamba-3 is slower). ``--peer``: op rows of
mamba-ssm's ``mamba3_siso_combined`` (from ``.peers/``; its tuned chunk 64, zero Q/K biases, our
theta repeated per head as its angles) and of ours at chunk 64; "vs mamba-ssm" = its time / ours at
the same chunk (> 1: ours is faster). "fwd x byte floor" (op rows): forward time over the least
time to read Mamba-3's inputs once and write y once at the copy bandwidth (_harness.COPY_TBPS).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (COPY_TBPS, SSD_SHAPES, kernel_profile, peak_memory_gib, run_tag,  # noqa: E402
                      time_eager, time_graph)

from streamssm.kernels import mamba3_scan, ssd_scan  # noqa: E402
from streamssm.layers import Mamba2Block, Mamba3Block  # noqa: E402
from streamssm.models import ArchConfig  # noqa: E402

CHUNK = 256
EXPAND = 2


def build_layers(shape: dict[str, int], device: torch.device, chunk: int) -> dict[str, torch.nn.Module]:
    """Both blocks at the shape's width: d_inner = heads * headdim, d_model = d_inner / 2."""
    d_model = shape["heads"] * shape["headdim"] // EXPAND
    torch.manual_seed(0)
    kw = dict(d_model=d_model, d_state=shape["dstate"], expand=EXPAND, headdim=shape["headdim"], chunk_size=chunk)
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


def peer_mamba3(d: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """mamba-ssm's Mamba-3 (SISO) op on our inputs: Q = C, K = B, V = x; (b, h, l) decay, dt and
    trapezoid weights; zero Q/K biases; theta of the one group as every head's angle rate."""
    from _peers import mamba3_siso_combined

    b, l, h, _ = d["x"].shape
    n = d["B"].shape[-1]
    heads_first = [v.transpose(1, 2).contiguous() for v in (d["dt"] * d["A"], d["dt"], d["lam"])]
    bias = torch.zeros(h, n, device=d["x"].device)
    angles = d["theta"].expand(b, l, h, n // 2)
    return mamba3_siso_combined()(d["C"], d["B"], d["x"], *heads_first, bias, bias, angles, D=d["D"],
                                  chunk_size=chunk)


def op_fns(kind: str, t: dict[str, torch.Tensor],
           chunk: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward + backward with gradients of every floating input) of one op
    (``kind``: mamba2, mamba3 or mamba-ssm, the peer's Mamba-3)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}

    def call(d):
        if kind == "mamba3":
            return mamba3_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], d["lam"], d["theta"], D=d["D"],
                               chunk_size=chunk, backend="triton")
        if kind == "mamba-ssm":
            return peer_mamba3(d, chunk)
        return ssd_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=chunk, D=d["D"], backend="triton")

    def fwd():
        with torch.no_grad():
            return call(t)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        y = call(leaves)
        y.backward(torch.ones_like(y))

    return fwd, fwd_bwd


def op_floor_ms(t: dict[str, torch.Tensor]) -> float:
    """The op forward's least time at the copy bandwidth: its inputs read once, y written once."""
    nbytes = sum(v.numel() * v.element_size() for v in t.values()) + t["x"].numel() * t["x"].element_size()
    return nbytes / COPY_TBPS / 1e9


def measure(fwd: Callable[[], object], fwd_bwd: Callable[[], object], warmup: int, rep: int,
            graphs: bool) -> dict[str, float]:
    """Eager medians (ms) of the forward and forward+backward, peak memory (GiB), and with ``graphs``
    the medians of one CUDA-graph replay of each (the GPU's time without Python's launches)."""
    fwd_bwd()  # compile / autotune before timing
    fwd()
    times = dict(fwd_ms=time_eager(fwd, warmup=warmup, rep=rep), fwd_bwd_ms=time_eager(fwd_bwd, warmup=warmup, rep=rep),
                 peak_gib=peak_memory_gib(fwd_bwd))
    if graphs:
        times.update(fwd_graph_ms=time_graph(fwd, rep=rep), fwd_bwd_graph_ms=time_graph(fwd_bwd, rep=rep))
    return times


def markdown(rows: list[dict]) -> str:
    cols = ("fwd_ms", "fwd_bwd_ms") + ("fwd_graph_ms", "fwd_bwd_graph_ms") * ("fwd_graph_ms" in rows[0])
    names = [c[:-3].replace("_bwd", "+bwd").replace("_graph", " graph") for c in cols]
    head = ("| level | shape | kernel | chunk | " + " | ".join(f"{n} ms" for n in names)
            + " | peak GiB fwd+bwd | tokens/s fwd+bwd | fwd x byte floor | "
            + " | ".join(f"{n} ratio m3/m2" for n in names) + " | "
            + " | ".join(f"vs mamba-ssm {n}" for n in names) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        same = [b for b in rows if b["level"] == r["level"] and b["shape"] == r["shape"]]
        base = next((b for b in same if b["kernel"] == "mamba2" and b["chunk"] == r["chunk"]), None)
        peer = next((b for b in same if b["kernel"] == "mamba-ssm" and b["chunk"] == r["chunk"]), None)
        ratios = [f"{r[c] / base[c]:.2f}x" if base is not None else "" for c in cols]
        vs_peer = [f"{peer[c] / r[c]:.2f}x" if peer is not None and r["kernel"] == "mamba3" else "" for c in cols]
        floor = f"{r['fwd_ms'] / r['floor_ms']:.1f}x" if "floor_ms" in r else ""
        lines.append(f"| {r['level']} | {r['shape']} | {r['kernel']} | {r['chunk']} | "
                     + " | ".join(f"{r[c]:.3f}" for c in cols)
                     + f" | {r['peak_gib']:.2f} | {r['tokens'] / r['fwd_bwd_ms'] * 1e3:.3e} | "
                     f"{floor} | {' | '.join(ratios)} | {' | '.join(vs_peer)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S1,S2,S3", help="comma-separated names of shared/BENCHMARKS.md")
    parser.add_argument("--levels", default="layer,op", help="layer, op or both")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up time (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    parser.add_argument("--chunks", default=str(CHUNK), help="comma-separated chunk lengths of every row")
    parser.add_argument("--peer", action="store_true", help="op rows of mamba-ssm's Mamba-3 and ours at chunk 64")
    parser.add_argument("--profile", default="",
                        help="shapes whose layer forwards (both blocks) and Mamba-3 op fwd+bwd to profile, "
                             "kernel by kernel")
    parser.add_argument("--graphs", action="store_true",
                        help="also time one CUDA-graph replay of each forward and forward+backward")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the Triton kernels)")
    device = torch.device("cuda")
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    for name in args.shapes.split(","):
        shape = SSD_SHAPES[name]
        tokens = shape["batch"] * shape["length"]
        for chunk in chunks if "layer" in args.levels else ():
            layers = build_layers(shape, device, chunk)
            d_model = shape["heads"] * shape["headdim"] // EXPAND
            u = torch.randn(shape["batch"], shape["length"], d_model, device=device, requires_grad=True)
            for kind, block in layers.items():
                rows.append(dict(level="layer", shape=name, kernel=kind, chunk=chunk, tokens=tokens,
                                 **measure(*layer_fns(block, u), args.warmup, args.rep, args.graphs)))
                print(rows[-1], flush=True)
                if chunk == chunks[0] and name in args.profile.split(","):
                    print(f"{name}: GPU kernels of 3 forwards of the {kind} layer at chunk {chunk}:\n"
                          + kernel_profile(layer_fns(block, u)[0], top=16), flush=True)
            del layers, u
        if "op" in args.levels:
            t = op_inputs(shape, device)
            floor = op_floor_ms(t)
            runs = [(kind, chunk) for chunk in chunks for kind in ("mamba2", "mamba3")]
            runs += [("mamba3", 64)] * (args.peer and 64 not in chunks) + [("mamba-ssm", 64)] * args.peer
            for kind, chunk in runs:
                rows.append(dict(level="op", shape=name, kernel=kind, chunk=chunk, tokens=tokens, floor_ms=floor,
                                 **measure(*op_fns(kind, t, chunk), args.warmup, args.rep, args.graphs)))
                print(rows[-1], flush=True)
                if (kind, chunk) in (("mamba3", chunks[0]), ("mamba-ssm", 64)) and name in args.profile.split(","):
                    print(f"{name}: GPU kernels of 3 fwd+bwd of the {kind} op at chunk {chunk}:\n"
                          + kernel_profile(op_fns(kind, t, chunk)[1], top=14), flush=True)
            del t
        torch.cuda.empty_cache()
    table = f"{run_tag()}\n\n{markdown(rows)}\n"
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
