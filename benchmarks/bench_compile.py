"""Training throughput with and without torch.compile (eager vs inductor), CPU or GPU.

    python benchmarks/bench_compile.py [--configs mamba:256:4,mamba2:256:4,mamba3:256:4,hybrid:256:4]
                                       [--d-model 64] [--layers 2] [--steps 10] [--warmup 3]
                                       [--modes eager,inductor] [--device cpu|cuda] [--threads N] [--out FILE]

Each config ``arch:length:batch`` builds a fresh ``SSMModel`` (vocab 5; ``hybrid`` = mamba2
with sliding-window attention on every second layer) and times whole training steps (forward,
cross-entropy, backward, AdamW step) on random tokens, after ``--warmup`` steps; the first
warm-up step of a compiled mode includes the compilation, reported as ``first step s``.
On CPU the blocks run the chunked PyTorch paths (compile traces through them, Mamba-1 on its
fixed-piece scan); on CUDA the registered Triton ops (single graph nodes). ``speedup`` is
eager ms / mode ms for the same config.

On a CPU the header gives the load average before and after the run. When other processes
keep the cores busy, torch's OpenMP threads wait at the end of each parallel region for a
thread the kernel has descheduled (a scheduler tick, milliseconds), and an inductor step runs
one parallel region per fused kernel: issue 19 measured 1,304 ms/step (mamba2:64:1) against
~7 ms on the quiet machine. The run then prints a warning; ``--threads`` (fewer threads than
the cores left free) or ``OMP_WAIT_POLICY=PASSIVE`` avoid it. Inductor compiles for
``--threads`` (its ``cpp.threads`` option: its on-disk cache does not key on torch's thread
count, so a program cached by a 2-thread run would otherwise run 2 OpenMP threads at 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, report, run_tag  # noqa: E402

from streamssm.compiled_cpu import program_options  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402

VOCAB = 5
ARCHS = {
    "mamba": dict(block="mamba"),
    "mamba2": dict(block="mamba2"),
    "mamba3": dict(block="mamba3"),
    "hybrid": dict(block="mamba2", attention_every=2, attention_window=128),
}


def build(arch: str, d_model: int, layers: int, device: str) -> SSMModel:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, n_layers=layers, headdim=min(32, 2 * d_model), vocab_size=VOCAB,
                      attention_heads=max(1, d_model // 32), **ARCHS[arch])
    return SSMModel(cfg).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_training(arch: str, length: int, batch: int, mode: str, args) -> tuple[float, float]:
    """(first step seconds, median ms per later step) of training in ``mode``."""
    model = build(arch, args.d_model, args.layers, args.device)
    # on a CPU, inductor's C++ for this process's thread count (the engine's program options)
    options = program_options() if mode == "inductor" and args.device == "cpu" else None
    run = model if mode == "eager" else torch.compile(model, fullgraph=True, backend=mode, options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch, length + 1), generator=g).to(args.device)

    def step() -> None:
        logits, _ = run(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    later = sorted(times[args.warmup:])
    return times[0], 1e3 * later[len(later) // 2]


def contention(threads: int) -> str | None:
    """A warning when the 1-minute load average before the run leaves a whole core fewer free
    than ``threads`` (the OpenMP barrier stalls of the module docstring), else None."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads < cores + 1:
        return None
    return (f"load average {load:.2f} on {cores} cores with {threads} torch threads: other processes compete "
            "for the cores and parallel kernels stall at their barriers (compiled steps the most: one parallel "
            "region per fused kernel); the times mean little. Rerun with --threads "
            f"{max(1, cores - round(load))} or OMP_WAIT_POLICY=PASSIVE, or on a quiet machine.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="mamba:256:4,mamba2:256:4,mamba3:256:4,hybrid:256:4",
                   help="comma-separated arch:length:batch (arch: mamba, mamba2, mamba3, hybrid)")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="blocks")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (a compiled mode compiles in the first)")
    p.add_argument("--modes", default="eager,inductor", help="eager and torch.compile backends")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's: one per core); fewer on a shared machine")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    warning = contention(torch.get_num_threads()) if args.device == "cpu" else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    table = Table(["config", "mode", "first step s", "ms/step", "tokens/s", "speedup"])
    for spec in args.configs.split(","):
        arch, length, batch = spec.split(":")
        length, batch = int(length), int(batch)
        eager_ms = None
        for mode in args.modes.split(","):
            torch._dynamo.reset()
            first, ms = time_training(arch, length, batch, mode, args)
            eager_ms = ms if mode == "eager" else eager_ms
            table.add(config=spec, mode=mode, **{"first step s": first, "ms/step": ms,
                                                 "tokens/s": batch * length / ms * 1e3,
                                                 "speedup": f"{eager_ms / ms:.2f}x" if eager_ms else None})
            print(f"{spec} {mode}: {ms:.1f} ms/step (first {first:.1f} s)", file=sys.stderr, flush=True)
    cpu = (f" · {torch.get_num_threads()} CPU threads · load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
           if args.device == "cpu" else "")
    note = f"\n\nwarning: {warning}" if warning else ""
    report(f"training step, d_model {args.d_model}, {args.layers} layers · {run_tag()}{cpu}\n\n"
           f"{table.markdown()}{note}", args.out)


if __name__ == "__main__":
    main()
