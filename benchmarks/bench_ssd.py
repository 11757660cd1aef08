"""Mamba-2 SSD scan: ours (Triton) vs mamba-ssm ``mamba_chunk_scan_combined`` vs fla ``chunk_simple_gla``.

Run on a GPU (peers unpacked under .peers/: the mamba-ssm sdist, the fla-core wheel, einops):

    python benchmarks/bench_ssd.py [--shapes S1,S2,S3] [--no-verify] [--out results.md]

Shapes S1-S3 of shared/BENCHMARKS.md: bf16 x, dt, B, C; fp32 A, D (per head), dt_bias;
dt_softplus, one group, chunk 256, no z. fla runs the same recurrence as simple GLA with
q = C, k = B, v = x * dt, g = dt * A (per-head copies of B/C; D * x added outside; the
preparation is not timed). Each provider is timed forward and forward+backward (gradients of
every input), eager and replayed from a CUDA graph; peak memory is that of forward+backward.
"fwd TFLOP/s" counts the forward's matmul FLOPs (``forward_cost``), "fwd x floor" divides its time
by the least bytes it must move at the copy bandwidth (_harness.COPY_TBPS); the fwd+bwd columns
likewise (``train_cost``: 3x the forward's FLOPs, as for any chain of matmuls; the inputs read
twice, dy read, the output and every gradient written once).
``--verify`` (default) checks our outputs and gradients against a float64 chunked reference
(S3: outputs plus directional derivatives of each input by central differences in float64)
and reports the peers' forward error for context.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (COPY_TBPS, SSD_SHAPES, Table, kernel_profile, peak_memory_gib, report, run_tag,  # noqa: E402
                      time_eager, time_graph)
from _peers import PEERS, import_mamba_ssm, stub_package  # noqa: E402

from streamssm.kernels import ssd_scan  # noqa: E402
from streamssm.kernels.ssd.chunked_torch import ssd_scan_chunked  # noqa: E402

CHUNK = 256
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


# ----------------------------------------------------------------------------- peers


def load_mamba():
    import_mamba_ssm()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def load_fla():
    sys.path.insert(0, str(PEERS / "fla"))
    version = next((PEERS / "fla").glob("fla_core-*.dist-info")).name.split("-")[1].removesuffix(".dist")
    stub_package("fla", PEERS / "fla" / "fla", __version__=version)
    stub_package("fla.ops", PEERS / "fla" / "fla" / "ops")
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.simple_gla.chunk import chunk_simple_gla

    # fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1 (fla #640); we switch the
    # guard off and check its forward here (BENCHMARKS.md: its gradients matched fp32 at 2e-3).
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return chunk_simple_gla


# ----------------------------------------------------------------------------- inputs


def make_inputs(shape: dict[str, int], seed: int = 0, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """x, dt, B, C in ``dtype``; A, D, dt_bias fp32 (one group)."""
    b, l, h, p, n = (shape[k] for k in ("batch", "length", "heads", "headdim", "dstate"))
    g = torch.Generator(device=device).manual_seed(seed)
    data = dict(device=device, dtype=dtype)
    dt_init = torch.exp(torch.rand(h, device=device, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "x": torch.randn(b, l, h, p, generator=g, **data),
        "dt": (torch.randn(b, l, h, generator=g, device=device) * 0.5).to(dtype),
        "A": -torch.exp(torch.rand(h, device=device, generator=g) * math.log(16)),
        "B": torch.randn(b, l, 1, n, generator=g, **data),
        "C": torch.randn(b, l, 1, n, generator=g, **data),
        "D": torch.randn(h, device=device, generator=g),
        "dt_bias": dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
    }


def ours(t):
    return ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=CHUNK, D=t["D"], dt_bias=t["dt_bias"],
                    dt_softplus=True, backend="triton")


def mamba(fn):
    def run(t):
        return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], CHUNK, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    return run


def fla_inputs(t):
    """(q, k, v, g) of the equivalent simple-GLA problem (per-head B/C, v = x dt, g = dt A)."""
    h = t["x"].shape[2]
    dtp = F.softplus(t["dt"].float() + t["dt_bias"])  # (b, l, h)
    q = t["C"].expand(-1, -1, h, -1).contiguous()
    k = t["B"].expand(-1, -1, h, -1).contiguous()
    v = (t["x"].float() * dtp[..., None]).bfloat16()
    return {"q": q, "k": k, "v": v, "g": (dtp * t["A"]).contiguous(), "x": t["x"], "D": t["D"]}


def fla(fn):
    def run(t):
        o, _ = fn(t["q"], t["k"], t["v"], g=t["g"], scale=1.0)
        return o

    return run


def with_grads(t: dict, names) -> tuple[dict, list[torch.Tensor]]:
    leaves = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in t.items()}
    return leaves, [leaves[k] for k in names]


# ----------------------------------------------------------------------------- verification


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300)) if ref.numel() else 0.0


def ref64(t, no_grad: bool = False, perturb: tuple[str, torch.Tensor] | None = None):
    """Our chunked path in float64 (its blocks bound the memory of the (t, t) decay matrices)."""
    tt = {k: v.double() for k, v in t.items()}
    if perturb is not None:
        tt[perturb[0]] = tt[perturb[0]] + perturb[1]
    with torch.no_grad() if no_grad else torch.enable_grad():
        return ssd_scan_chunked(tt["x"], tt["dt"], tt["A"], tt["B"], tt["C"], CHUNK, D=tt["D"], dt_bias=tt["dt_bias"],
                                dt_softplus=True)


def verify(name: str, t: dict, providers: dict) -> list[str]:
    """Errors vs float64: our y and gradients; the peers' y."""
    lines = []
    big = t["x"].numel() > 2**28
    leaves, grads_of = with_grads(t, NAMES)
    y = ours(leaves)
    dy = torch.randn_like(y)
    grads = dict(zip(NAMES, torch.autograd.grad(y, grads_of, dy)))
    y64 = ref64(t, no_grad=big).detach()
    lines.append(f"{name} ours y rel-L2 err vs float64: {_rel(y64, y):.2e}")
    for pname, (run, prep) in providers.items():
        if pname == "ours":
            continue
        try:
            with torch.no_grad():
                out = run(prep(t))
            if pname == "fla":
                out = out.float() + t["x"].float() * t["D"][:, None]
            lines.append(f"{name} {pname} y rel-L2 err vs float64: {_rel(y64, out):.2e}")
        except Exception as e:  # a peer failing must not stop our measurements
            lines.append(f"{name} {pname} forward failed: {type(e).__name__}: {e}")
    del y64
    if not big:
        leaves64 = {k: v.detach().double().requires_grad_() for k, v in t.items()}
        y64 = ssd_scan_chunked(leaves64["x"], leaves64["dt"], leaves64["A"], leaves64["B"], leaves64["C"], CHUNK,
                               D=leaves64["D"], dt_bias=leaves64["dt_bias"], dt_softplus=True)
        g64 = torch.autograd.grad(y64, [leaves64[k] for k in NAMES], dy.double())
        errs = ", ".join(f"d{k} {_rel(r, grads[k]):.2e}" for k, r in zip(NAMES, g64))
        lines.append(f"{name} ours grads rel-L2 err vs float64 autograd: {errs}")
        del y64, g64, leaves64
    else:  # directional derivatives by central differences of the float64 reference
        dyd = dy.double()
        errs = []
        for k in NAMES:
            v = torch.randn_like(t[k], dtype=torch.float64)
            eps = 1e-5 * float(t[k].double().norm() / v.norm())
            fp = float((ref64(t, True, (k, eps * v)) * dyd).sum())
            fm = float((ref64(t, True, (k, -eps * v)) * dyd).sum())
            fd = (fp - fm) / (2 * eps)
            an = float((grads[k].double() * v).sum())
            errs.append(f"d{k} {abs(an - fd) / max(abs(fd), 1e-300):.2e}")
        lines.append(f"{name} ours directional-derivative rel err vs float64 central differences: {', '.join(errs)}")
    torch.cuda.empty_cache()
    return lines


# ----------------------------------------------------------------------------- timing


def forward_cost(shape: dict[str, int], groups: int = 1) -> tuple[float, float]:
    """(FLOPs, least bytes) of one SSD forward at chunk CHUNK: per token and head the chunk's state
    (B x^T: 2PN), its read (C S: 2PN) and the causal in-chunk product (about PQ), per token and
    group C.B^T (about NQ); bytes: x, dt, B, C read and y written once, in bf16."""
    tokens, h, p, n = shape["batch"] * shape["length"], shape["heads"], shape["headdim"], shape["dstate"]
    flops = tokens * (h * (4 * p * n + p * CHUNK) + groups * n * CHUNK)
    return flops, tokens * 2 * (2 * h * p + h + 2 * groups * n)


def train_cost(shape: dict[str, int], groups: int = 1) -> tuple[float, float]:
    """(FLOPs, least bytes) of one SSD forward + backward at chunk CHUNK: 3x the forward's FLOPs
    (each product's two gradient products); bytes in bf16: x, dt, B, C read by both passes, y
    written, dy read, dx, ddt, dB, dC written."""
    tokens, h, p, n = shape["batch"] * shape["length"], shape["heads"], shape["headdim"], shape["dstate"]
    flops, _ = forward_cost(shape, groups)
    return 3 * flops, tokens * 2 * (5 * h * p + 3 * h + 6 * groups * n)


def measure(table: Table, shape_name: str, kernel: str, run, t: dict, names, tokens: int, eager: bool) -> None:
    row = {"shape": shape_name, "kernel": kernel}
    flops, nbytes = forward_cost(SSD_SHAPES[shape_name])
    train_flops, train_bytes = train_cost(SSD_SHAPES[shape_name])
    try:
        with torch.no_grad():
            row["fwd ms graph"] = time_graph(lambda: run(t))
            row["fwd TFLOP/s"] = flops / row["fwd ms graph"] / 1e9
            row["fwd x floor"] = row["fwd ms graph"] / (nbytes / COPY_TBPS / 1e9)
            if eager:
                row["fwd ms eager"] = time_eager(lambda: run(t))
        leaves, params = with_grads(t, names)
        dy = torch.randn_like(run(t))

        def step():
            return torch.autograd.grad(run(leaves), params, dy)

        row["fwd+bwd ms graph"] = time_graph(step)
        row["fwd+bwd TFLOP/s"] = train_flops / row["fwd+bwd ms graph"] / 1e9
        row["fwd+bwd x floor"] = row["fwd+bwd ms graph"] / (train_bytes / COPY_TBPS / 1e9)
        if eager:
            row["fwd+bwd ms eager"] = time_eager(step)
        row["peak GiB fwd+bwd"] = peak_memory_gib(step)
        row["Mtok/s fwd+bwd"] = tokens / row["fwd+bwd ms graph"] / 1e3
    except Exception as e:  # keep measuring the others
        row["kernel"] = f"{kernel} (failed: {type(e).__name__}: {str(e)[:80]})"
    table.add(**row)
    torch.cuda.empty_cache()


def profile(shape_name: str, t: dict, providers: dict) -> str:
    """Per-kernel GPU times: the forward of every provider (kernel by kernel against the peers),
    then our forward+backward; and the configs our autotuned kernels chose."""
    parts = []
    for pname, (run, prep) in providers.items():
        pt = prep(t)
        with torch.no_grad():
            parts.append(f"{shape_name} profile of {pname} forward (3 calls):\n{kernel_profile(functools.partial(run, pt), top=10)}")
    leaves, params = with_grads(t, NAMES)
    dy = torch.randn_like(ours(leaves))
    parts.append(f"{shape_name} profile of ours fwd+bwd (3 steps):\n"
                 f"{kernel_profile(lambda: torch.autograd.grad(ours(leaves), params, dy), top=14)}")
    from streamssm.kernels.ssd import bmm_chunk, chunk_scan, chunk_scan_bwd, chunk_state

    tuned = [bmm_chunk._chunk_cb_fwd_kernel, chunk_state._chunk_state_fwd_kernel, chunk_scan._chunk_scan_fwd_kernel,
             chunk_scan_bwd._chunk_scan_bwd_dc_kernel, chunk_scan_bwd._chunk_scan_bwd_dx_kernel]
    chosen = "; ".join(f"{k.base_fn.__name__}: {getattr(k, 'best_config', None)}" for k in tuned)
    return "\n".join([*parts, f"autotuned: {chosen}"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="S1,S2,S3")
    ap.add_argument("--peers", default="mamba,fla")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--verify-shapes", default=None, help="verify only these shapes (default: all timed)")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--profile", default="", help="shapes whose per-kernel GPU times to print (every provider's forward, our fwd+bwd)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    providers = {"ours": (ours, lambda t: t)}
    if "mamba" in args.peers:
        providers["mamba-ssm"] = (mamba(load_mamba()), lambda t: t)
    if "fla" in args.peers:
        providers["fla"] = (fla(load_fla()), fla_inputs)
    table = Table(
        columns=["shape", "kernel", "fwd ms graph", "fwd TFLOP/s", "fwd x floor", "fwd ms eager", "fwd+bwd ms graph",
                 "fwd+bwd TFLOP/s", "fwd+bwd x floor", "fwd+bwd ms eager", "Mtok/s fwd+bwd", "peak GiB fwd+bwd"],
        ratio_of=["fwd ms graph", "fwd ms eager", "fwd+bwd ms graph", "fwd+bwd ms eager", "peak GiB fwd+bwd"],
    )
    notes = [run_tag()]
    for s in args.shapes.split(","):
        shape = SSD_SHAPES[s]
        t = make_inputs(shape)
        tokens = shape["batch"] * shape["length"]
        if not args.no_verify and (args.verify_shapes is None or s in args.verify_shapes.split(",")):
            for line in verify(s, t, providers):
                print(line, flush=True)
                notes.append(line)
        if s in args.profile.split(","):
            print(profile(s, t, providers), flush=True)
        for pname, (run, prep) in providers.items():
            pt = prep(t)
            names = ("q", "k", "v", "g") if pname == "fla" else NAMES
            measure(table, s, pname, run, pt, names, tokens, eager=not args.no_eager)
            print(table.rows[-1], flush=True)
            del pt
        del t
        torch.cuda.empty_cache()
    text = "\n".join([table.markdown(), "", *(f"- {n}" for n in notes)])
    report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
