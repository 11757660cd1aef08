"""Mamba-1 selective scan: ours (Triton) vs mamba-ssm CUDA ``selective_scan_fn`` vs mamba.py pscan.

Run on a GPU (mamba-ssm's sdist unpacked under .peers/, its extension built on first use for
sm_90 only; mambapy and einops importable):

    python benchmarks/bench_selective_scan.py [--shapes M1,M2,M3] [--peers mamba,mambapy,reference]
                                              [--no-verify] [--chunks 32,128] [--segments 2,4,8]
                                              [--old path/to/earlier/scan.py]
                                              [--out results.md]

Shapes M1-M3 of shared/BENCHMARKS.md: bf16 u, delta, B, C (b, n, l); fp32 A = -(1..n) per
channel, D, delta_bias (inverse softplus of dt in [1e-3, 0.1]); delta_softplus; no z, no
initial state (the peer has none). Each provider is timed forward and forward+backward
(gradients of u, delta, A, B, C, D, delta_bias), ours and mamba-ssm eager and replayed from a
CUDA graph; mamba.py (fp32 pscan over a (b, l, d, n) expansion, M1/M2 only) and our sequential
reference (forward, M1 only) eager. Peak memory is that of forward+backward. ``--verify``
checks our output and final state against a float64 chunked scan (M3: with an initial state,
plus the backward against a run split into other time segments and directional derivatives of
A, delta_bias and the initial state by float64 central differences), and our gradients against
mamba-ssm's where it is built. ``--old`` also times the ``selective_scan_triton`` of an earlier
scan.py (e.g. written out by ``git show REV:kernels/mamba1/scan.py``) on the same tensors;
``--segments`` times ours with time split into each given number of segments run in parallel;
``--chunks`` times ours at each given chunk length T (the checkpoint interval: the backward's
checkpoints and tile-state scratch, hence its peak memory, scale with l / T and S x T).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import COPY_TBPS, MAMBA1_SHAPES, Table, peak_memory_gib, report, run_tag, time_eager, time_graph  # noqa: E402

from streamssm.kernels import selective_scan  # noqa: E402
from streamssm.kernels.mamba1.reference import selective_scan_ref  # noqa: E402
from streamssm.kernels.mamba1.scan import selective_scan_triton  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
PEERS = Path(__file__).resolve().parent.parent / ".peers"


# ----------------------------------------------------------------------------- peers


def load_mamba_cuda():
    """mamba-ssm ``selective_scan_fn`` with its CUDA extension built for sm_90, bf16 inputs only.

    Only the bf16 forward and bf16/real-weight backward sources are compiled; the other dtype
    instantiations stay unresolved, which a lazily bound import tolerates (they are never called).
    A library built earlier and carried as ``.peers/ssbuild/selective_scan_cuda.so`` is imported
    as it is (the build takes ~4 min on the device's 16 cores).
    """
    from torch.utils.cpp_extension import load

    src = next(PEERS.glob("mamba_ssm-*"))
    cs = src / "csrc" / "selective_scan"
    build = PEERS / "ssbuild"
    build.mkdir(exist_ok=True)
    prebuilt = build / "selective_scan_cuda.so"
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
    try:
        if prebuilt.exists():
            spec = importlib.util.spec_from_file_location("selective_scan_cuda", prebuilt)
            ext = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ext)
        else:
            ext = load(
                name="selective_scan_cuda",
                sources=[str(cs / f) for f in ("selective_scan.cpp", "selective_scan_fwd_bf16.cu",
                                               "selective_scan_bwd_bf16_real.cu")],
                extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                   "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                                   "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
                                   "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
                                   "-gencode", "arch=compute_90,code=sm_90", "--threads", "4"],
                extra_include_paths=[str(cs)],
                build_directory=str(build),
            )
    finally:
        sys.setdlopenflags(flags)
    sys.modules["selective_scan_cuda"] = ext
    sys.path.insert(0, str(src))
    for name, path in (("mamba_ssm", src / "mamba_ssm"), ("mamba_ssm.ops", src / "mamba_ssm" / "ops")):
        mod = types.ModuleType(name)  # bare packages: their __init__ imports every extension
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def mamba_run(fn):
    def run(t):
        return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], None, t["delta_bias"], True)
    return run


def mambapy_run(t):
    """mamba.py's parallel scan (fp32, (b, l, d, n) expansion), same problem in its layout."""
    from mambapy.pscan import pscan

    u, dt = t["u"].float().transpose(1, 2), t["delta"].float().transpose(1, 2)  # (b, l, d)
    dt = F.softplus(dt + t["delta_bias"])
    Bt, Ct = t["B"].float().transpose(1, 2), t["C"].float().transpose(1, 2)  # (b, l, n)
    dA = torch.exp(dt.unsqueeze(-1) * t["A"])  # (b, l, d, n)
    bx = (dt * u).unsqueeze(-1) * Bt.unsqueeze(2)  # (b, l, d, n)
    hs = pscan(dA, bx)
    y = (hs @ Ct.unsqueeze(-1)).squeeze(3) + t["D"] * u  # (b, l, d)
    return y.transpose(1, 2).to(t["u"].dtype)


def ours(t):
    return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], delta_bias=t["delta_bias"],
                          delta_softplus=True, backend="triton")


def ours_with(**options):
    """Ours with ``selective_scan_triton``'s options forced, e.g. ``chunk=32`` or ``segments=4`` (time split
    into that many segments run in parallel; default: chosen from the GPU size)."""
    def run(t):
        return selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"],
                                     delta_bias=t["delta_bias"], delta_softplus=True, **options)
    return run


def load_old(path: str):
    """A runner for the kernels of an earlier scan.py, called like ``ours``.

    A scan.py whose ``selective_scan_triton`` goes through the registered op (which would run the
    installed module's kernels) is run through its own launchers, in an autograd function here."""
    spec = importlib.util.spec_from_file_location("scan_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "_selective_scan_bwd"):  # older files: an autograd function of their own
        return lambda t: mod.selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"],
                                                   delta_bias=t["delta_bias"], delta_softplus=True)
    # its default chunk length (since 2026-12-07 a function of the sequence length)
    takes_length = len(inspect.signature(mod._chunk_len).parameters) > 1

    class OldScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, delta_bias):
            ctx.chunk = chunk = mod._chunk_len(None, u.shape[-1]) if takes_length else mod._chunk_len(None)
            B4, C4 = mod._as_groups(B), mod._as_groups(C)
            y, _, ckpt = mod._selective_scan_fwd(u, delta, A, B4, C4, D, None, delta_bias, True, None,
                                                 any(ctx.needs_input_grad), None, chunk)
            ctx.save_for_backward(u, delta, A, B4, C4, D, delta_bias, ckpt)
            return y

        @staticmethod
        def backward(ctx, dy):
            u, delta, A, B4, C4, D, delta_bias, ckpt = ctx.saved_tensors
            du, ddelta, dA, dB4, dC4, dD, _, dbias, _ = mod._selective_scan_bwd(
                dy, None, u, delta, A, B4, C4, D, None, delta_bias, True, ckpt, None, ctx.chunk)
            shape = (B4.shape[0], -1, B4.shape[-1])  # (b, n, l) as the bench's B and C
            return du, ddelta, dA, dB4.reshape(shape).to(B4.dtype), dC4.reshape(shape).to(C4.dtype), dD, dbias

    return lambda t: OldScan.apply(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"])


def reference(t):
    return selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], delta_bias=t["delta_bias"],
                              delta_softplus=True)


# ----------------------------------------------------------------------------- inputs


def make_inputs(shape: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    b, d, l, n = (shape[k] for k in ("batch", "dim", "length", "dstate"))
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    dt_init = torch.exp(torch.rand(d, device="cuda", generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(b, d, l, generator=g, **bf),
        "delta": (torch.randn(b, d, l, generator=g, device="cuda") * 0.5).bfloat16(),
        "A": -torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(b, n, l, generator=g, **bf),
        "C": torch.randn(b, n, l, generator=g, **bf),
        "D": torch.randn(d, device="cuda", generator=g),
        "delta_bias": dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
    }


def with_grads(t: dict, names) -> tuple[dict, list[torch.Tensor]]:
    leaves = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in t.items()}
    return leaves, [leaves[k] for k in names]


def byte_floor_ms(shape: dict[str, int]) -> tuple[float, float]:
    """Fewest bytes / copy bandwidth: fwd reads u, delta, B, C, writes y; bwd also reads dy,
    u, delta, B, C again and writes du, ddelta, dB, dC (bf16)."""
    b, d, l, n = (shape[k] for k in ("batch", "dim", "length", "dstate"))
    fwd = 2 * (3 * b * d * l + 2 * b * n * l)
    bwd = 2 * (5 * b * d * l + 4 * b * n * l)
    return fwd / COPY_TBPS / 1e9, (fwd + bwd) / COPY_TBPS / 1e9


# ----------------------------------------------------------------------------- float64 reference


@torch.no_grad()
def scan_f64(t: dict, h0: torch.Tensor | None = None, K: int = 32, max_elems: int = 2**27):
    """Forward in float64 by chunks of K steps (closed form inside a chunk), blocks of time
    at a time so memory stays bounded. Returns y (b, d, l) float64 and final state (b, d, n)."""
    u, delta = t["u"], t["delta"]
    b, d, l = u.shape
    A = t["A"].double()
    n = A.shape[1]
    h = torch.zeros(b, d, n, device=u.device, dtype=torch.float64) if h0 is None else h0.double().clone()
    y = torch.empty(b, d, l, device=u.device, dtype=torch.float64)
    block = max(K, max_elems // (b * d * n) // K * K)  # steps per block: ~1 GiB per float64 temporary
    for s in range(0, l, block):
        e = min(l, s + block)
        pad = (-(e - s)) % K
        dt = F.softplus(delta[..., s:e].double() + t["delta_bias"].double()[:, None])
        dt, uu = F.pad(dt, (0, pad)), F.pad(u[..., s:e].double(), (0, pad))
        Bm, Cm = F.pad(t["B"][..., s:e].double(), (0, pad)), F.pad(t["C"][..., s:e].double(), (0, pad))
        nc = dt.shape[-1] // K
        dt4 = dt.view(b, d, nc, K)
        P = torch.exp(dt4.cumsum(-1)[..., None] * A[:, None, None, :])  # (b, d, nc, K, n)
        bb = (dt4 * uu.view(b, d, nc, K))[..., None] * Bm.view(b, 1, n, nc, K).permute(0, 1, 3, 4, 2)
        hloc = P * torch.cumsum(bb / P, dim=3)  # chunk-local states from zero
        starts = torch.empty(b, d, nc, n, device=u.device, dtype=torch.float64)
        for c in range(nc):
            starts[:, :, c] = h
            h = P[:, :, c, -1] * h + hloc[:, :, c, -1]
        hs = hloc + P * starts[:, :, :, None, :]
        yy = (hs * Cm.view(b, 1, n, nc, K).permute(0, 1, 3, 4, 2)).sum(-1).view(b, d, -1)[..., : e - s]
        y[..., s:e] = yy + t["D"].double()[:, None] * u[..., s:e].double()
        del P, bb, hloc, hs
    return y, h


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def verify(name: str, t: dict, mamba_fn, fd_inputs: list[str]) -> list[str]:
    lines = []
    big = t["u"].shape[-1] > 100_000
    b, d, _ = t["u"].shape
    h0 = torch.randn(b, d, t["A"].shape[1], device="cuda") if big else None
    names = (*NAMES, "h0") if big else NAMES
    leaves, params = with_grads({**t, "h0": h0} if big else t, names)
    y, hT = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                           delta_bias=leaves["delta_bias"], delta_softplus=True,
                           initial_state=leaves.get("h0"), return_final_state=True, backend="triton")
    y64, h64 = scan_f64(t, h0)
    lines.append(f"{name} ours vs float64 chunked scan: y rel-L2 {_rel(y64, y):.2e}, final state rel-L2 "
                 f"{_rel(h64, hT):.2e}")
    # dy exactly representable in bf16: autograd hands our kernel dy cast to y's dtype (bf16)
    dy, dh = torch.randn_like(y, dtype=torch.float32).bfloat16().float(), torch.randn_like(hT)
    del y64
    if big:
        grads = dict(zip(names, torch.autograd.grad((y.float() * dy).sum() + (hT * dh).sum(), params)))
        y1, h1 = selective_scan_triton(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                       leaves["D"], delta_bias=leaves["delta_bias"], delta_softplus=True,
                                       initial_state=leaves["h0"], return_final_state=True, segments=1)
        g1 = torch.autograd.grad((y1.float() * dy).sum() + (h1 * dh).sum(), params)
        errs = ", ".join(f"d{k} {_rel(g1[i], grads[k]):.1e}" for i, k in enumerate(names))
        lines.append(f"{name} backward, default time segments vs one segment: {errs}")
        del y1, h1, g1
        errs = []
        for k in fd_inputs:
            v = torch.randn_like(t[k] if k != "h0" else h0, dtype=torch.float64)
            base = (t[k] if k != "h0" else h0).double()
            eps = 1e-4 * float(base.norm() / v.norm())

            def loss(sign):
                tt = dict(t)
                if k == "h0":
                    yy, hh = scan_f64(tt, base + sign * eps * v)
                else:
                    tt[k] = base + sign * eps * v
                    yy, hh = scan_f64(tt, h0)
                return float((yy * dy.double()).sum() + (hh * dh.double()).sum())

            fd = (loss(1) - loss(-1)) / (2 * eps)
            an = float((grads[k].double() * v).sum())
            errs.append(f"d{k} {abs(an - fd) / max(abs(fd), 1e-300):.2e}")
        if errs:
            lines.append(f"{name} directional derivatives vs float64 central differences: {', '.join(errs)}")
    elif mamba_fn is not None:  # like for like: loss (y * dy).sum(), no final-state term
        ml, mp = with_grads(t, NAMES)
        ym = mamba_run(mamba_fn)(ml)
        gm = torch.autograd.grad((ym.float() * dy).sum(), mp)
        ol, op = with_grads(t, NAMES)
        go = torch.autograd.grad((ours(ol).float() * dy).sum(), op)
        errs = ", ".join(f"d{k} {_rel(gm[i], go[i]):.1e}" for i, k in enumerate(NAMES))
        lines.append(f"{name} mamba-ssm y rel-L2 vs float64 {_rel(scan_f64(t)[0], ym):.2e}; "
                     f"our grads vs mamba-ssm's, rel-L2: {errs}")
    torch.cuda.empty_cache()
    return lines


def compare_old(name: str, t: dict, old) -> str:
    """Ours vs the earlier kernel on the same inputs: output and gradients, relative L2."""
    dy = torch.randn_like(t["u"])
    res = []
    for run in (ours, old):
        leaves, params = with_grads(t, NAMES)
        y = run(leaves)
        res.append((y.detach(), *torch.autograd.grad(y, params, dy)))
    errs = ", ".join(f"{k} {_rel(a, b):.1e}" for k, a, b in zip(("y", *(f"d{n}" for n in NAMES)), *res))
    return f"{name} ours vs the old kernel, rel-L2: {errs}"


# ----------------------------------------------------------------------------- timing


def measure(table: Table, shape_name: str, kernel: str, run, t: dict, tokens: int, floor: tuple[float, float],
            graph: bool = True, backward: bool = True) -> None:
    row = {"shape": shape_name, "kernel": kernel}
    try:
        with torch.no_grad():
            if graph:
                row["fwd ms graph"] = time_graph(lambda: run(t))
            row["fwd ms eager"] = time_eager(lambda: run(t), warmup=5, rep=50)
        if backward:
            leaves, params = with_grads(t, NAMES)
            dy = torch.randn_like(run(t))

            def step():
                return torch.autograd.grad(run(leaves), params, dy)

            if graph:
                row["fwd+bwd ms graph"] = time_graph(step)
            row["fwd+bwd ms eager"] = time_eager(step, warmup=5, rep=50)
            row["peak GiB fwd+bwd"] = peak_memory_gib(step)
            best = row.get("fwd+bwd ms graph", row["fwd+bwd ms eager"])
            row["Mtok/s fwd+bwd"] = tokens / best / 1e3
            row["fwd+bwd x floor"] = best / floor[1]
        row["fwd x floor"] = row.get("fwd ms graph", row["fwd ms eager"]) / floor[0]
    except Exception as e:  # keep measuring the others
        row["kernel"] = f"{kernel} (failed: {type(e).__name__}: {str(e)[:80]})"
    table.add(**row)
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="M1,M2,M3")
    ap.add_argument("--peers", default="mamba,mambapy,reference")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--fd-inputs", default="A,delta_bias,h0", help="M3 directional-derivative checks")
    ap.add_argument("--chunks", default="", help="also time ours at these chunk lengths T, e.g. 32,128,256")
    ap.add_argument("--segments", default="", help="also time ours at these forced time-segment counts, e.g. 2,4,8")
    ap.add_argument("--old", default=None, help="an earlier scan.py to time beside ours")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    notes = [run_tag()]
    mamba_fn = None
    if "mamba" in args.peers.split(","):
        try:
            mamba_fn = load_mamba_cuda()
        except Exception as e:  # report, keep measuring the others
            notes.append(f"mamba-ssm CUDA extension unavailable: {type(e).__name__}: {str(e)[:200]}")
    old = load_old(args.old) if args.old else None
    table = Table(
        columns=["shape", "kernel", "fwd ms graph", "fwd ms eager", "fwd+bwd ms graph", "fwd+bwd ms eager",
                 "Mtok/s fwd+bwd", "peak GiB fwd+bwd", "fwd x floor", "fwd+bwd x floor"],
        ratio_of=["fwd ms graph", "fwd ms eager", "fwd+bwd ms graph", "fwd+bwd ms eager", "peak GiB fwd+bwd"],
    )
    for s in args.shapes.split(","):
        shape = MAMBA1_SHAPES[s]
        t = make_inputs(shape)
        tokens = shape["batch"] * shape["length"]
        floor = byte_floor_ms(shape)
        notes.append(f"{s} byte floor at {COPY_TBPS} TB/s: fwd {floor[0]:.3f} ms, fwd+bwd {floor[1]:.3f} ms")
        if not args.no_verify:
            fd = [k for k in args.fd_inputs.split(",") if k]
            for line in verify(s, t, mamba_fn, fd):
                print(line, flush=True)
                notes.append(line)
        measure(table, s, "ours", ours, t, tokens, floor)
        print(table.rows[-1], flush=True)
        for k in filter(None, args.chunks.split(",")):
            measure(table, s, f"ours T={k}", ours_with(chunk=int(k)), t, tokens, floor)
            print(table.rows[-1], flush=True)
        for k in filter(None, args.segments.split(",")):
            measure(table, s, f"ours S={k}", ours_with(segments=int(k)), t, tokens, floor)
            print(table.rows[-1], flush=True)
        if old is not None:
            notes.append(compare_old(s, t, old))
            print(notes[-1], flush=True)
            measure(table, s, "old Triton", old, t, tokens, floor)
            print(table.rows[-1], flush=True)
        if mamba_fn is not None:
            measure(table, s, "mamba-ssm CUDA", mamba_run(mamba_fn), t, tokens, floor)
            print(table.rows[-1], flush=True)
        if "mambapy" in args.peers and s != "M3":  # (b, l, d, n) fp32 expansions: 34 GB each at M3
            measure(table, s, "mamba.py pscan", mambapy_run, t, tokens, floor, graph=False)
            print(table.rows[-1], flush=True)
        if "reference" in args.peers and s == "M1":  # a Python loop over time: forward only
            measure(table, s, "sequential reference", reference, t, tokens, floor, graph=False, backward=False)
            print(table.rows[-1], flush=True)
        del t
        torch.cuda.empty_cache()
    text = "\n".join([table.markdown(), "", *(f"- {n}" for n in notes)])
    report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
