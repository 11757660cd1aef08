"""Hybrid (sliding-window attention every k layers) vs pure Mamba-2 of the same width and depth.

    python benchmarks/bench_hybrid.py [--d-model 512] [--layers 8] [--every 8] [--window 1024]
        [--batch 8] [--length 4096] [--streams 1,64] [--device cuda]

Both models: token LM (vocab 256), Mamba-2 blocks (d_state 64, headdim 64, chunk 256); the
hybrid replaces layers every, 2*every, ... with rotary sliding-window attention (8 heads,
ring-buffer state of ``--window`` keys/values). Rows:
    train   forward + backward of a batch (bf16 autocast on CUDA), tokens/s
    fwd     forward only (no grad), tokens/s
    step    one ``step_pool`` call for S live streams over a state pool, µs per call and
            stream-steps/s
    state   bytes per stream of the whole model state (constant whatever the stream length)
Times are medians (CUDA events, eager; CPU: perf_counter) after warm-up. Ratio = pure / hybrid
time (> 1: the hybrid is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import run_tag  # noqa: E402

from streamssm.models import ModelConfig, SSMModel  # noqa: E402
from streamssm.state import state_nbytes  # noqa: E402

VOCAB = 256


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(args, every: int, device: torch.device) -> SSMModel:
    torch.manual_seed(0)
    cfg = ModelConfig(block="mamba2", d_model=args.d_model, n_layers=args.layers, d_state=64, headdim=64,
                      chunk_size=256, vocab_size=VOCAB, attention_every=every, attention_heads=8,
                      attention_window=args.window)
    return SSMModel(cfg).to(device)


def measure(model: SSMModel, args, device: torch.device) -> dict[str, float]:
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    x = torch.randint(0, VOCAB, (args.batch, args.length), device=device)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        with amp:
            logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()

    def fwd() -> None:
        with torch.no_grad(), amp:
            model(x)

    out = {"train ms": median_ms(train, device, args.reps), "fwd ms": median_ms(fwd, device, args.reps)}
    model.eval()
    for s in args.streams:
        pool = model.init_state(2 * s, device)
        rows = torch.arange(0, 2 * s, 2, device=device)
        tok = torch.randint(0, VOCAB, (s,), device=device)

        def step() -> None:
            with torch.no_grad():
                model.step_pool(tok, pool, rows)
        out[f"step{s} us"] = median_ms(step, device, max(10, args.reps * 5)) * 1e3
    out["state bytes"] = float(state_nbytes(model.init_state(1, device)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--every", type=int, default=8, help="attention on layers every, 2*every, ...")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--streams", default="1,64", help="comma-separated stream counts for the step rows")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",") if s]
    device = torch.device(args.device)
    results = {name: measure(build(args, every, device), args, device)
               for name, every in (("pure mamba2", 0), (f"hybrid (attn every {args.every})", args.every))}
    tokens = args.batch * args.length
    print(f"# hybrid vs pure Mamba-2 · d_model {args.d_model} · {args.layers} layers · window {args.window} · "
          f"batch {args.batch} x {args.length} · {run_tag()}")
    print("| model | train ms | train tokens/s | fwd ms | fwd tokens/s | "
          + " | ".join(f"step {s} streams µs | {s}-stream steps/s" for s in args.streams) + " | state bytes/stream |")
    print("|---" * (6 + 2 * len(args.streams)) + "|")
    for name, r in results.items():
        cells = [name, f"{r['train ms']:.2f}", f"{tokens / r['train ms'] * 1e3:.4g}", f"{r['fwd ms']:.2f}",
                 f"{tokens / r['fwd ms'] * 1e3:.4g}"]
        for s in args.streams:
            cells += [f"{r[f'step{s} us']:.1f}", f"{s / r[f'step{s} us'] * 1e6:.4g}"]
        cells.append(f"{int(r['state bytes']):,}")
        print("| " + " | ".join(cells) + " |")
    pure, hyb = results.values()
    ratios = [f"train {pure['train ms'] / hyb['train ms']:.2f}x", f"fwd {pure['fwd ms'] / hyb['fwd ms']:.2f}x"]
    ratios += [f"step{s} {pure[f'step{s} us'] / hyb[f'step{s} us']:.2f}x" for s in args.streams]
    print("ratio pure/hybrid time (>1: hybrid faster): " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
