"""SSD inference forward: our one-pass kernel (``ssd/fused_fwd.py``) vs our split forward vs
mamba-ssm's ``mamba_chunk_scan_combined``, with initial and final states, on a GPU.

    python benchmarks/bench_ssd_fused.py [--shapes R1,R64,R256,R384,R1024,S1,S2] [--chunks 64,256] [--out t.md]

R<N>: N live streams x 320 tokens (20 ms at 16 kHz), 16 heads x 64, d_state 128, one group, each
with a carried state: the forward the service runs per layer and call. S1/S2: the training
shapes of shared/BENCHMARKS.md, forward only. bf16 x, dt, B, C; fp32 A, D, dt_bias, states;
dt_softplus, no z. The split forward and mamba-ssm run at each ``--chunks`` length (the fused
kernel has its own 64-token chunk). Times: median ms of one CUDA-graph replay. "max rel err":
the fused output's largest difference from the split forward's at the first chunk length, over
the output's largest magnitude.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SSD_SHAPES, Table, report, run_tag, time_graph  # noqa: E402
from _peers import import_mamba_ssm  # noqa: E402

import streamssm.kernels.library as lib  # noqa: E402

SERVING = dict(length=320, heads=16, headdim=64, dstate=128)


def shape_of(name: str) -> dict[str, int]:
    if name.startswith("R"):
        return dict(batch=int(name[1:]), **SERVING)
    return SSD_SHAPES[name]


def make_inputs(shape: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    b, l, h, p, n = (shape[k] for k in ("batch", "length", "heads", "headdim", "dstate"))
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return {
        "x": torch.randn(b, l, h, p, generator=g, **bf),
        "dt": (torch.randn(b, l, h, generator=g, device="cuda") * 0.5 - 2).bfloat16(),
        "A": -torch.rand(h, device="cuda", generator=g) * 8 - 0.5,
        "B": torch.randn(b, l, 1, n, generator=g, **bf),
        "C": torch.randn(b, l, 1, n, generator=g, **bf),
        "D": torch.randn(h, device="cuda", generator=g),
        "dt_bias": torch.randn(h, device="cuda", generator=g) * 0.5,
        "init": torch.randn(b, h, p, n, generator=g, device="cuda") * 0.1,
    }


def fused(t):
    return lib.ssd_scan_infer(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], None, t["dt_bias"], t["init"], True,
                              None, None)


def split(chunk: int):
    def run(t):
        out, final, *_ = lib.ssd_scan_fwd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], None, t["dt_bias"],
                                          t["init"], chunk, True, None, None)
        return out, final
    return run


def mamba(chunk: int):
    import_mamba_ssm()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    def run(t):
        return mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"],
                                         dt_softplus=True, initial_states=t["init"], return_final_states=True)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="R1,R64,R256,R384,R1024,S1,S2")
    ap.add_argument("--chunks", default="64,256")
    ap.add_argument("--no-peer", action="store_true", help="skip mamba-ssm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ssd_fused needs a CUDA GPU", file=sys.stderr)
        return 2
    chunks = [int(c) for c in args.chunks.split(",")]
    table = Table(["shape", "provider", "chunk", "fwd ms graph", "fused speed-up", "Mtok/s", "max rel err"])
    for name in args.shapes.split(","):
        shape = shape_of(name)
        tokens = shape["batch"] * shape["length"]
        t = make_inputs(shape)
        with torch.no_grad():
            ref = split(chunks[0])(t)[0].float()
            got = fused(t)[0].float()
            err = float((got - ref).abs().max() / ref.abs().max())
            t_fused = time_graph(lambda t=t: fused(t))
            table.add(shape=name, provider="ours fused", chunk=64, **{"fwd ms graph": t_fused, "fused speed-up": "1.00x",
                                                                        "Mtok/s": tokens / t_fused / 1e3,
                                                                        "max rel err": f"{err:.1e}"})
            providers = [("ours split", split)] + ([] if args.no_peer else [("mamba-ssm", mamba)])
            for pname, make in providers:
                for chunk in chunks:
                    try:
                        run = make(chunk)
                        ms = time_graph(lambda run=run, t=t: run(t))
                        row = {"fwd ms graph": ms, "fused speed-up": f"{ms / t_fused:.2f}x", "Mtok/s": tokens / ms / 1e3}
                    except Exception as e:  # a peer failing must not stop the table
                        row = {"fwd ms graph": f"failed: {type(e).__name__}: {str(e)[:60]}"}
                    table.add(shape=name, provider=pname, chunk=chunk, **row)
        print(f"{name}: fused {t_fused:.3f} ms", flush=True)
        del t
        torch.cuda.empty_cache()
    from streamssm.kernels.ssd import fused_fwd

    tuned = getattr(fused_fwd._ssd_fused_fwd_kernel, "best_config", None)
    report(f"{run_tag()}\nSSD inference forward with carried states (bf16); fused kernel config: {tuned}\n\n"
           + table.markdown(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
