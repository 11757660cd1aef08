"""The CPU engine's kernels: a Streamer call (eager engine, the "torch" backends) with the SSD scan
and the conv as they were (chunked at the model's configured chunk_size; F.conv1d), the scan
chunked at ``inference_chunk_size`` (kernels/ssd/chunked_torch.py: the fallback without a C++
compiler or under torch.compile), the scan sequential in C (kernels/ssd/scan_cpu.py), and that
with the conv in C (kernels/conv1d/conv_cpu.py): what a call without gradients runs now.

    python benchmarks/bench_cpu_kernels.py [--shapes demo:16x160,demo:8x320,tiny:16x160,d512:16x320]
                                           [--threads 1] [--repeats 12] [--out table.md]

A shape is model:streams x samples; models: ``demo`` (the demo's audio model, Mamba-2 d48 x 2) and
the bench_service.py ones (``tiny``, ``d512``), each a 256-token mu-law LM. One call =
``Streamer.launch_stacked(...).result()`` over that many open streams; the four variants alternate
call by call on the same Streamer (this machine's load drifts), medians after 2 warm-up rounds.
Speed-ups are against the first column. A shape of one sample (``demo:64x1``) times the pool
step, where the chunk length plays no part and "sequential" is the SSD step through the C scan
(kernels/ssd/step_cpu.py).
"max abs diff": the largest difference of a call's log-probabilities from the configured chunk's
on the same input and state (rounding only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table  # noqa: E402
from bench_service import model_arch  # noqa: E402

import streamssm.kernels.conv1d.conv_cpu as conv_cpu  # noqa: E402
import streamssm.kernels.ssd.chunked_torch as chunked_torch  # noqa: E402
import streamssm.kernels.ssd.scan_cpu as scan_cpu  # noqa: E402
from streamssm.inference import Streamer  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402


def bench_shape(model: str, streams: int, samples: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(input_kind="tokens", vocab_size=256, head="lm", **model_arch(model))
    streamer = Streamer(SSMModel(cfg), capacity=streams, engine="eager")
    ids = [streamer.open() for _ in range(streams)]
    x = torch.randint(0, 256, (streams, samples))
    picked, scan, conv = chunked_torch.inference_chunk_size, scan_cpu.library, conv_cpu.library
    if scan() is None or conv() is None:
        raise SystemExit("no C++ compiler: the C kernels cannot run here")
    off = (lambda: None)
    choices = {"configured": (lambda p, n, q: cfg.chunk_size, off, off), "picked": (picked, off, off),
               "sequential": (picked, scan, off), "sequential + C conv": (picked, scan, conv)}
    times: dict[str, list[float]] = {k: [] for k in choices}
    outputs = {}
    try:
        for i in range(repeats + 2):
            for name, (chunk, scan_lib, conv_lib) in choices.items():
                chunked_torch.inference_chunk_size, scan_cpu.library, conv_cpu.library = chunk, scan_lib, conv_lib
                snapshot = streamer.snapshot(ids[0])
                t0 = time.perf_counter()
                result = streamer.launch_stacked(ids, x).result()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
                outputs[name] = result.outputs[0]
                streamer.close(ids[0])  # stream 0 back to the same state for the other choice
                ids[0] = streamer.restore(snapshot)
    finally:
        chunked_torch.inference_chunk_size, scan_cpu.library, conv_cpu.library = picked, scan, conv
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ref, rest = outputs["configured"], list(choices)[1:]
    return {"shape": f"{model}: {streams} x {samples}", "chunk configured": cfg.chunk_size,
            "chunk picked": picked(cfg.headdim, cfg.d_state, cfg.nheads // cfg.ngroups),
            **{f"ms {k}": v for k, v in ms.items()},
            "speed-ups": " / ".join(f"{ms['configured'] / ms[k]:.2f}x" for k in rest),
            "max abs diff": ", ".join(f"{(outputs[k] - ref).abs().max().item():.1e}" for k in rest)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="demo:16x160,demo:8x320,tiny:16x160,d512:16x320")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = Table(columns=["shape", "chunk configured", "chunk picked", "ms configured", "ms picked", "ms sequential",
                           "ms sequential + C conv", "speed-ups", "max abs diff"])
    for spec in args.shapes.split(","):
        model, size = spec.split(":")
        streams, samples = (int(v) for v in size.split("x"))
        table.add(**bench_shape(model, streams, samples, args.repeats))
        print(table.rows[-1], flush=True)
    text = (f"Streamer call on the CPU, eager engine, {args.threads} thread(s), median of {args.repeats}\n\n"
            + table.markdown())
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
