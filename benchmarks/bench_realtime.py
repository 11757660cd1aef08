"""How many live 16 kHz streams one GPU keeps up with: ``Streamer.feed_batch`` (as the server calls it) of N x 20 ms chunks.

    python benchmarks/bench_realtime.py [--streams 64,128,256,512,1024,2048] [--chunk-ms 20]
                                        [--sample-rate 16000] [--dtype bfloat16] [--out table.md]

The model is the 4-layer d_model 512 Mamba-2 of the whole-model step benchmark (heads 16 x 64,
d_state 128, SSD chunk 256) as a mu-law audio LM (256 tokens), in ``--dtype``. Each call feeds every one of N
open streams one chunk of ``sample_rate * chunk_ms / 1000`` tokens through the chunked path
(state gathered from the pool, model forward, state written back) and returns per-token
scores only (``outputs=False``: what the service computes for clients that do not ask for
distributions). ``engine call ms``: one call, waited for; ``pipelined ms``: per call of calls
launched back to back, each one's results read after the next is launched (the service's engine
loop); N streams are real time when a pipelined call takes at most ``chunk_ms``. Also timed:
the bare model forward over the same (N, chunk) tokens from a zero state (the compute the
engine cannot avoid), as ms, tokens/s and TFLOP/s of the matmuls (2 x matmul weights per token).
Times are medians of ``--calls`` calls after 2 warm-up calls, synchronized wall clock.
``--profile``: also the GPU kernels of the forward at the largest N (torch.profiler, 3 calls),
by total GPU time: what bounds the stream count. ``--ssd-chunks 256,128,64``: also the forward at
the largest N with each SSD chunk length (the result is the same for any chunk length; a 320-token
call pads its last chunk of 256 to full size). ``--ssd-forwards auto,split``: each engine also with
the SSD's split forward forced (``auto`` takes the one-pass inference forward where it pays).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, kernel_profile, report, run_tag  # noqa: E402

import streamssm.kernels.library as lib  # noqa: E402
from streamssm.inference import Streamer  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402

CONFIG = dict(block="mamba2", d_model=512, n_layers=4, d_state=128, headdim=64, expand=2, chunk_size=256,
              input_kind="tokens", vocab_size=256, head="lm")


def timed_ms(fn, calls: int) -> float:
    """Median synchronized wall-clock ms of ``fn()`` after two warm-up calls."""
    times = []
    for i in range(calls + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def pipelined_ms(streamer: Streamer, chunks: dict, calls: int) -> float:
    """ms per call of back-to-back calls, each one's results read after the next is launched (the
    service engine's pipeline: the host work of one call overlaps the device work of the other)."""
    streamer.launch(chunks, outputs=False).result()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    previous = None
    for _ in range(calls):
        pending = streamer.launch(chunks, outputs=False)
        if previous is not None:
            previous.result()
        previous = pending
    previous.result()
    return 1e3 * (time.perf_counter() - t0) / calls


def matmul_flops_per_token(model: SSMModel) -> float:
    """2 x the weights of every Linear (encoder lookup and conv excluded)."""
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def ssd_chunk_table(model: SSMModel, x: torch.Tensor, args) -> Table:
    """Forward ms over ``x`` (N, chunk) with every SSD layer set to each of ``--ssd-chunks``."""
    table = Table(["SSD chunk", "forward ms", "max abs diff vs model's chunk"])
    layers = [m for m in model.modules() if hasattr(m, "chunk_size")]
    own = layers[0].chunk_size
    with torch.no_grad():
        ref = model(x)[0].float()
        for size in (int(s) for s in args.ssd_chunks.split(",")):
            for layer in layers:
                layer.chunk_size = size
            ms = timed_ms(lambda: model(x), args.calls)
            diff = (model(x)[0].float() - ref).abs().max().item()
            table.add(**{"SSD chunk": size, "forward ms": ms, "max abs diff vs model's chunk": f"{diff:.2e}"})
            print(f"SSD chunk {size}: forward {ms:.2f} ms", flush=True)
    for layer in layers:
        layer.chunk_size = own
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="64,128,256,512,1024,2048")
    parser.add_argument("--chunk-ms", type=float, default=20.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--engines", default="eager,graphs", help="Streamer engines to time, in one run")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--ssd-forwards", default="auto", help="SSD inference forwards to time: auto (fused where it "
                        "pays), split (the training forward's kernels)")
    parser.add_argument("--profile", action="store_true", help="also profile the forward's kernels at the largest N")
    parser.add_argument("--ssd-chunks", default="", help="also time the forward at the largest N per SSD chunk length")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_realtime needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    chunk = int(args.sample_rate * args.chunk_ms / 1000)
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(**CONFIG))
    flops = matmul_flops_per_token(model)
    table = Table(["streams", "engine", "SSD forward", "engine call ms", "pipelined ms", "real time", "stream capacity",
                   "forward ms", "engine / forward", "capture s", "forward Mtok/s", "forward TFLOP/s"])
    modes = args.ssd_forwards.split(",")
    kept = {(e, m): 0 for e in args.engines.split(",") for m in modes}
    auto_choice = lib.use_fused_forward
    for n in (int(s) for s in args.streams.split(",")):
        for engine, mode in kept:
            lib.use_fused_forward = auto_choice if mode == "auto" else (lambda seqs, heads, longest: False)
            streamer = Streamer(model, capacity=n, device="cuda", dtype=dtype, engine=engine)
            chunks = {streamer.open(): torch.randint(0, 256, (chunk,)) for _ in range(n)}
            feed = timed_ms(lambda s=streamer: s.feed_batch(chunks, outputs=False), args.calls)
            piped = pipelined_ms(streamer, chunks, 3 * args.calls)
            x = torch.stack(list(chunks.values())).cuda()
            with torch.no_grad():
                fwd = timed_ms(lambda s=streamer: s.model(x), args.calls)
            capture_s = getattr(streamer._calls, "prepare_seconds", 0.0)  # graphs captured at first use
            kept[engine, mode] = n if piped <= args.chunk_ms else kept[engine, mode]
            table.add(**{"streams": n, "engine": engine, "SSD forward": mode, "engine call ms": feed,
                         "pipelined ms": piped, "real time": "yes" if piped <= args.chunk_ms else "no",
                         "stream capacity": round(n * args.chunk_ms / piped), "forward ms": fwd,
                         "engine / forward": f"{piped / fwd:.2f}x", "capture s": capture_s,
                         "forward Mtok/s": n * chunk / fwd / 1e3, "forward TFLOP/s": n * chunk * flops / fwd / 1e9})
            print(f"N={n} {engine} {mode}: engine call {feed:.2f} ms, pipelined {piped:.2f} ms, forward {fwd:.2f} ms, capture {capture_s:.1f} s", flush=True)
            del streamer
            torch.cuda.empty_cache()
    lib.use_fused_forward = auto_choice
    profiled = ""
    if args.profile:
        with torch.no_grad():
            profiled = (f"\n\nGPU kernels of 3 forwards of {n} x {chunk} tokens (torch.profiler):\n\n"
                        + kernel_profile(lambda: model.to("cuda", dtype)(x)))
    if args.ssd_chunks:
        profiled += "\n\n" + ssd_chunk_table(model.to("cuda", dtype), x, args).markdown()
    text = (f"{run_tag()}\n4-layer d_model 512 Mamba-2 mu-law LM ({args.dtype}), {args.sample_rate} Hz streams fed "
            f"{args.chunk_ms:g} ms chunks ({chunk} tokens), scores only; stream capacity = N x chunk / pipelined call time. "
            f"Largest N kept real time: {kept}.\n\n" + table.markdown() + profiled)
    report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
