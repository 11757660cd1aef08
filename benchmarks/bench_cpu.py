"""CPU benchmark of the chunked PyTorch Mamba-1 path against mamba.py and the sequential reference.

    python benchmarks/bench_cpu.py [--shapes C1,C2,C3] [--model] [--threads 2] [--repeats 3] [--no-verify]
    python benchmarks/bench_cpu.py --suite targets [--configs T1,T2,T3] [--threads 2] [--repeats 3] [--fixed-shape]

Providers (same process, same fp32 tensors; ``torch.set_num_threads(--threads)``):
    ours     ``selective_scan(..., backend="torch")``: forward (no gradient) the C scan
             (kernels/mamba1/scan_cpu.py), forward + backward the chunked scan
    chunked  the chunked scan's forward (kernels/mamba1/chunked_torch.py), the C scan's fallback
    mambapy  mamba.py 1.2 ``MambaBlock.selective_scan``: softplus(delta + bias), Blelloch ``pscan``
             over (b, l, d, n) (its training path on CPU), inputs pre-transposed to its layout
    ref      ``selective_scan(..., backend="reference")``: the sequential loop (forward only, and
             only on shapes marked small: it is slow)
Op: delta_softplus with delta_bias, D, no z, no initial state (mamba.py's scan has none); A is the
S4D-real init -(1..n). ``--model`` adds a training step (forward + backward) of a 2-layer
d_model-64 Mamba-1 backbone, ours vs mamba.py's ``Mamba`` with the same sizes.

``--suite targets``: issue 3's CPU targets (shared/BENCHMARKS.md, "CPU"), one table. Per config
(TARGET_CONFIGS) and block type (mamba, mamba2) one training step = forward + backward + AdamW of
ours (``SSMModel`` with continuous inputs of d_model channels and a regression head of d_model
outputs: one d×d linear more at each end than the peer) vs mamba.py's ``Mamba`` (residual blocks
only, (b, l, d) in and out, no final norm), loss = mean square of the output, same d_model,
layers, d_state 16, expand 2, d_conv 4. mamba.py's ``Mamba2`` imports mamba_ssm's Triton kernels
at module load and cannot run on a CPU, so the Mamba-2 rows' peer is mamba.py's (Mamba-1) model of
the same sizes, as in BENCHMARKS.md (headdim 32 for ours). Streaming: d128 x 4 layers, 64 streams,
no grad: ours ``SSMModel.step_pool`` over a 64-row state pool, and the Streamer's engines'
one-step call (``EagerCalls``; ``CompiledCalls``: torch.compile, inductor C++, symbolic shapes;
``--fixed-shape``: also compiled for this one shape), which add the encoder and head linears;
mamba.py ``Mamba.step`` with its per-layer (h, conv inputs) caches; stream-steps/s = 64 / time
of one step; "compile s" is the compiled rows' first call. ``--configs ''`` times streaming only.

Times are the median of ``--repeats`` runs after one warm-up, providers interleaved per repeat
(this machine's load drifts); tokens/s = batch * length / time; ratio = peer ms / our ms
(> 1: ours is faster). Peak memory is not reported (no CPU allocator statistics).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, run_tag  # noqa: E402

from streamssm.compiled_cpu import CompiledCalls, program_options  # noqa: E402
from streamssm.engine import EagerCalls  # noqa: E402
from streamssm.kernels import selective_scan  # noqa: E402
from streamssm.kernels.mamba1.chunked_torch import selective_scan_chunked  # noqa: E402
from streamssm.testing import assert_close  # noqa: E402

# name -> sizes; "ref": also time the sequential reference (forward)
CPU_SHAPES: dict[str, dict[str, int]] = {
    "C1": dict(batch=1, dim=128, length=1024, dstate=16, ref=1),
    "C2": dict(batch=4, dim=256, length=512, dstate=16, ref=0),
    "C3": dict(batch=1, dim=512, length=2048, dstate=16, ref=0),
}


def _inputs(batch: int, dim: int, length: int, dstate: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, dstate, length, generator=g),
        C=torch.randn(batch, dstate, length, generator=g),
        D=torch.ones(dim),
        delta_bias=torch.log(torch.expm1(torch.full((dim,), 0.01))),  # softplus(bias) = 0.01
    )


def _ours(t: dict, backend: str = "torch") -> torch.Tensor:
    return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"],
                          delta_softplus=True, backend=backend)


def _chunked(t: dict) -> torch.Tensor:
    return selective_scan_chunked(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["delta_bias"],
                                  delta_softplus=True)


def _mambapy_layout(t: dict) -> dict:
    """mamba.py wants x, delta (b, l, d) and B, C (b, l, n)."""
    out = {k: v.transpose(1, 2).contiguous() for k, v in t.items() if k in ("u", "delta", "B", "C")}
    out.update(A=t["A"], D=t["D"], delta_bias=t["delta_bias"])
    return out


def _mambapy(m: dict) -> torch.Tensor:
    from mambapy.mamba import MambaBlock

    delta = F.softplus(m["delta"] + m["delta_bias"])  # as MambaBlock.ssm does before its scan
    return MambaBlock.selective_scan(None, m["u"], delta, m["A"], m["B"], m["C"], m["D"])  # (b, l, d)


def _fwd_bwd(fn: Callable[[dict], torch.Tensor], t: dict) -> Callable[[], None]:
    leaves = {k: (v.clone().requires_grad_(True) if k in ("u", "delta", "B", "C") else v) for k, v in t.items()}

    def run() -> None:
        for v in leaves.values():
            v.grad = None
        fn(leaves).square().mean().backward()
    return run


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_op(shapes: list[str], repeats: int, verify: bool) -> Table:
    table = Table(["shape", "kernel", "fwd ms", "fwd+bwd ms", "fwd tokens/s", "fwd+bwd tokens/s"],
                  ratio_of=["fwd ms", "fwd+bwd ms"])
    for name in shapes:
        s = CPU_SHAPES[name]
        t = _inputs(s["batch"], s["dim"], s["length"], s["dstate"])
        m = _mambapy_layout(t)
        label = f"{name} b{s['batch']} d{s['dim']} l{s['length']} n{s['dstate']}"
        with torch.no_grad():
            if verify:
                ours = _ours(t)
                assert_close(f"{name} ours vs mambapy", _mambapy(m).transpose(1, 2), ours)
                if s["ref"]:
                    assert_close(f"{name} ours vs reference", _ours(t, "reference"), ours)
            fwd = {"ours": lambda: _ours(t), "chunked": lambda: _chunked(t), "mambapy": lambda: _mambapy(m)}
            if s["ref"]:
                fwd["ref"] = lambda: _ours(t, "reference")
            fwd_ms = _median_ms(fwd, repeats)
        both_ms = _median_ms({"ours": _fwd_bwd(_ours, t), "mambapy": _fwd_bwd(_mambapy, m)}, repeats)
        tokens = s["batch"] * s["length"]
        for kernel in fwd:
            table.add(shape=label, kernel=kernel, **{
                "fwd ms": fwd_ms[kernel], "fwd+bwd ms": both_ms.get(kernel),
                "fwd tokens/s": tokens / fwd_ms[kernel] * 1e3,
                "fwd+bwd tokens/s": tokens / both_ms[kernel] * 1e3 if kernel in both_ms else None,
            })
    return table


def bench_model(repeats: int, batch: int = 8, length: int = 1024) -> Table:
    """Forward + backward of a 2-layer d_model-64 d_state-16 Mamba-1 backbone (the first CPU row
    of shared/BENCHMARKS.md, without the optimizer step)."""
    from mambapy.mamba import Mamba, MambaConfig

    from streamssm.models import Backbone, ModelConfig

    ours = Backbone(ModelConfig(block="mamba", d_model=64, n_layers=2, d_state=16, input_kind="continuous",
                                input_dim=1, head="regression", output_dim=1))
    peer = Mamba(MambaConfig(d_model=64, n_layers=2, d_state=16))
    x = torch.randn(batch, length, 64)

    def train_step(model: torch.nn.Module, unpack: bool) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            y = model(x)
            (y[0] if unpack else y).square().mean().backward()
        return run

    ms = _median_ms({"ours": train_step(ours, True), "mambapy": train_step(peer, False)}, repeats)
    table = Table(["shape", "kernel", "fwd+bwd ms", "tokens/s"], ratio_of=["fwd+bwd ms"])
    for kernel, v in ms.items():
        table.add(shape=f"backbone d64 x2 layers, {batch}x{length}", kernel=kernel,
                  **{"fwd+bwd ms": v, "tokens/s": batch * length / v * 1e3})
    return table


# name -> (d_model, n_layers, batch, length) of the training rows of shared/BENCHMARKS.md "CPU"
TARGET_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "T1": (64, 2, 8, 1024),
    "T2": (128, 4, 4, 2048),
    "T3": (256, 4, 1, 8192),
}
#: tokens/s (or stream-steps/s) ratio over mamba.py that issue 3 asks for
TARGET_RATIO = {"mamba": 3.0, "mamba2": 5.0, "stream": 10.0}


def _our_model(block: str, d_model: int, n_layers: int) -> torch.nn.Module:
    from streamssm.models import ModelConfig, SSMModel

    return SSMModel(ModelConfig(block=block, d_model=d_model, n_layers=n_layers, d_state=16, expand=2, d_conv=4,
                                input_kind="continuous", input_dim=d_model, head="regression",
                                output_dim=d_model))


def _peer_model(d_model: int, n_layers: int) -> torch.nn.Module:
    from mambapy.mamba import Mamba, MambaConfig

    return Mamba(MambaConfig(d_model=d_model, n_layers=n_layers, d_state=16, expand_factor=2, d_conv=4))


def _train_step(model: torch.nn.Module, x: torch.Tensor, unpack: bool) -> Callable[[], None]:
    """One forward + backward + AdamW step of ``model`` on ``x`` (b, l, d), loss = mean(y^2)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        y = model(x)
        (y[0] if unpack else y).square().mean().backward()
        opt.step()
    return run


def _verdict(ratio: float, target: float) -> tuple[str, str, str]:
    return f"{ratio:.2f}x", f"{target:g}x", "yes" if ratio >= target else "no"


def bench_targets(configs: list[str], repeats: int, fixed_shape: bool, streams: int = 64) -> Table:
    table = Table(["config", "block", "provider", "ms/step", "tokens/s", "ratio", "target", "met", "compile s"])
    for name in configs:
        d_model, n_layers, batch, length = TARGET_CONFIGS[name]
        x = torch.randn(batch, length, d_model, generator=torch.Generator().manual_seed(0))
        fns = {"mambapy": _train_step(_peer_model(d_model, n_layers), x, False)}
        for block in ("mamba", "mamba2"):
            fns[block] = _train_step(_our_model(block, d_model, n_layers), x, True)
        ms = _median_ms(fns, repeats)
        label = f"{name} d{d_model} x{n_layers} n16, {batch}x{length}"
        tokens = batch * length
        table.add(config=label, block="mamba (peer)", provider="mamba.py Mamba",
                  **{"ms/step": ms["mambapy"], "tokens/s": tokens / ms["mambapy"] * 1e3})
        for block in ("mamba", "mamba2"):
            ratio, target, met = _verdict(ms["mambapy"] / ms[block], TARGET_RATIO[block])
            table.add(config=label, block=block, provider="ours (torch)", ratio=ratio, target=target, met=met,
                      **{"ms/step": ms[block], "tokens/s": tokens / ms[block] * 1e3})
    d_model, n_layers = 128, 4
    fns, compile_s = _stream_fns(d_model, n_layers, streams, fixed_shape)
    ms = _median_ms(fns, max(repeats, 20))
    label = f"stream d{d_model} x{n_layers}, {streams} streams (stream-steps/s)"
    table.add(config=label, block="mamba (peer)", provider="mamba.py Mamba.step",
              **{"ms/step": ms["mambapy"], "tokens/s": streams / ms["mambapy"] * 1e3})
    for name in fns:
        if name == "mambapy":
            continue
        block, _, provider = name.partition(" ")
        ratio, target, met = _verdict(ms["mambapy"] / ms[name], TARGET_RATIO["stream"])
        table.add(config=label, block=block, provider=provider, ratio=ratio, target=target, met=met,
                  **{"ms/step": ms[name], "tokens/s": streams / ms[name] * 1e3, "compile s": compile_s.get(name)})
    return table


def _stream_fns(d_model: int, n_layers: int, streams: int,
                fixed_shape: bool) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """One recurrent step of ``streams`` streams, no grad: mamba.py and ours (both blocks: the
    bare ``SSMModel.step_pool``, and the Streamer's engines, which add the encoder and head
    linears), {name: fn} and the compile seconds of the compiled ones (their first call)."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(streams, d_model, generator=g)
    peer = _peer_model(d_model, n_layers).eval()
    cfg = peer.config
    caches = [(torch.zeros(streams, cfg.d_inner, cfg.d_state), torch.zeros(streams, cfg.d_inner, cfg.d_conv - 1))
              for _ in range(n_layers)]

    @torch.no_grad()
    def peer_step() -> None:
        nonlocal caches
        _, caches = peer.step(x_t, caches)

    fns: dict[str, Callable[[], object]] = {"mambapy": peer_step}
    compile_s: dict[str, float] = {}
    rows, x = torch.arange(streams), x_t[:, None]  # x (b, 1, d): the engines' one-step segment
    for block in ("mamba", "mamba2"):
        model = _our_model(block, d_model, n_layers).eval()
        pool = model.init_state(streams + 1)  # + the engines' scratch row
        fns[f"{block} ours SSMModel.step_pool"] = torch.no_grad()(
            lambda model=model, pool=pool: model.step_pool(x_t, pool, rows))
        engines = {"eager": EagerCalls(model, pool), "compiled": CompiledCalls(model, pool, streams)}
        if fixed_shape:  # one program for exactly this shape (what a per-(bucket, length) engine compiles)
            engines["compiled fixed-shape"] = torch.compile(engines["eager"].run, dynamic=False, options=program_options())
        for kind, call in engines.items():
            name = f"{block} engine {kind}"
            fns[name] = torch.no_grad()(lambda call=call: call(x, rows))
            if kind.startswith("compiled"):
                t0 = time.perf_counter()
                fns[name]()
                compile_s[name] = time.perf_counter() - t0
    return fns, compile_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(CPU_SHAPES), help="comma-separated names of CPU_SHAPES")
    parser.add_argument("--suite", choices=["op", "targets"], default="op",
                        help="op: the scan op (and --model); targets: issue 3's model-level CPU targets")
    parser.add_argument("--configs", default=",".join(TARGET_CONFIGS), help="comma-separated TARGET_CONFIGS (targets)")
    parser.add_argument("--model", action="store_true", help="also time a backbone training step")
    parser.add_argument("--fixed-shape", action="store_true",
                        help="targets: also time the step compiled for its one shape (dynamic=False)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.suite == "targets":
        configs = [c for c in args.configs.split(",") if c]
        unknown = [c for c in configs if c not in TARGET_CONFIGS]
        if unknown:
            parser.error(f"unknown configs {unknown}; known: {sorted(TARGET_CONFIGS)}")
        print(f"# CPU targets (issue 3): training fwd+bwd+AdamW and streaming, fp32 · {run_tag()} · "
              f"{args.threads} threads · {os.cpu_count()} cores · median of {args.repeats}")
        print(bench_targets(configs, args.repeats, args.fixed_shape).markdown())
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in CPU_SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(CPU_SHAPES)}")
    print(f"# CPU selective scan (Mamba-1), fp32 · {run_tag()} · {args.threads} threads · "
          f"{os.cpu_count()} cores · median of {args.repeats}")
    print(bench_op(shapes, args.repeats, args.verify).markdown())
    if args.model:
        print()
        print(bench_model(args.repeats).markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
