"""The CPU engine's kernels: a Streamer call (eager engine, the "torch" backends) with every C kernel
off and the SSD chunked at the model's configured chunk_size (as it was before them), off with the
chunk at ``inference_chunk_size`` (kernels/ssd/chunked_torch.py: the fallback without a C++ compiler
or under torch.compile), the SSD scan in C (kernels/ssd/scan_cpu.py), that and the conv in C
(kernels/conv1d/conv_cpu.py), and all of them with the norms and the lm scores in C
(kernels/norm/norm_cpu.py, kernels/scores_cpu.py): what a call without gradients runs now.

    python benchmarks/bench_cpu_kernels.py [--shapes demo:16x160,demo:8x320,tiny:16x160,d512:16x320]
                                           [--threads 1] [--repeats 12] [--out table.md]

A shape is model:streams x samples; models: ``demo`` (the demo's audio model, Mamba-2 d48 x 2) and
the bench_service.py ones (``tiny``, ``d512``), each a 256-token mu-law LM. One call =
``Streamer.launch_stacked(..., outputs=False).result()`` (the service's scores-only call) over that
many open streams; the variants alternate call by call on the same Streamer (this machine's load
drifts), medians after 2 warm-up rounds. Speed-ups are against the first column. A shape of one
sample (``demo:64x1``) times the pool step, where the chunk length plays no part and the scan is
the SSD step (kernels/ssd/step_cpu.py). "max abs diff": the largest difference of a call's scores
from the first variant's on the same input and state (rounding only).
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
import streamssm.kernels.norm.norm_cpu as norm_cpu  # noqa: E402
import streamssm.kernels.scores_cpu as scores_cpu  # noqa: E402
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
    modules = (scan_cpu, conv_cpu, norm_cpu, scores_cpu)
    libraries = [m.library for m in modules]
    if any(lib() is None for lib in libraries):
        raise SystemExit("no C++ compiler: the C kernels cannot run here")
    picked = chunked_torch.inference_chunk_size
    configured = (lambda p, n, q: cfg.chunk_size)
    choices = {"configured": (configured, 0), "picked": (picked, 0), "C scan": (picked, 1),
               "C scan + conv": (picked, 2), "all C": (picked, 4)}  # (chunk size, C libraries on)
    times: dict[str, list[float]] = {k: [] for k in choices}
    scores = {}
    try:
        for i in range(repeats + 2):
            for name, (chunk, on) in choices.items():
                chunked_torch.inference_chunk_size = chunk
                for k, (module, library) in enumerate(zip(modules, libraries)):
                    module.library = library if k < on else (lambda: None)
                snapshot = streamer.snapshot(ids[0])
                t0 = time.perf_counter()
                result = streamer.launch_stacked(ids, x, outputs=False).result()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
                scores[name] = torch.as_tensor(result.scores)[0]  # stream 0: the one restored
                streamer.close(ids[0])  # stream 0 back to the same state for the other choice
                ids[0] = streamer.restore(snapshot)
    finally:
        chunked_torch.inference_chunk_size = picked
        for module, library in zip(modules, libraries):
            module.library = library
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ref, rest = scores["configured"], list(choices)[1:]
    return {"shape": f"{model}: {streams} x {samples}", "chunk configured": cfg.chunk_size,
            "chunk picked": picked(cfg.headdim, cfg.d_state, cfg.nheads // cfg.ngroups),
            **{f"ms {k}": v for k, v in ms.items()},
            "speed-ups": " / ".join(f"{ms['configured'] / ms[k]:.2f}x" for k in rest),
            "max abs diff": ", ".join(f"{(scores[k] - ref).abs().max().item():.1e}" for k in rest)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="demo:16x160,demo:8x320,tiny:16x160,d512:16x320")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = Table(columns=["shape", "chunk configured", "chunk picked", "ms configured", "ms picked", "ms C scan",
                           "ms C scan + conv", "ms all C", "speed-ups", "max abs diff"])
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
