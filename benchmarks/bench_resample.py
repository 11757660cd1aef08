"""What server-side resampling adds per chunk: ``StreamResampler`` on 20 ms frames, on the CPU.

    python benchmarks/bench_resample.py [--seconds 20] [--chunk-ms 20] [--out table.md]

Each row streams ``--seconds`` of test audio (tones + noise) at the input rate through one
stream's resampler (soxr HQ, what the service runs for a client whose rate differs from the
model's), one ``--chunk-ms`` frame at a time, after a 1 s warm-up, and reports the wall-clock
time of one call per frame: mean, median, p99 and max in ms (target: <= 1 ms per 20 ms frame;
the max is mostly the OS preempting the process on a loaded machine), plus
the output's lag: the frames that gave no samples (soxr works in blocks; their samples come
with a later frame) and the largest gap between outputs in ms of audio. The ``stereo`` row
includes the mean mix-down the server does first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, report, run_tag  # noqa: E402

from streamssm.service.resample import StreamResampler  # noqa: E402

#: (input rate, model rate, channels sent)
CASES = [(44100, 8000, 1), (48000, 16000, 1), (16000, 8000, 1), (8000, 16000, 1), (44100, 16000, 2),
         (22050, 16000, 1)]


def audio(seconds: float, rate: int, channels: int) -> np.ndarray:
    """(l, c) float32 tones + noise."""
    t = np.arange(int(seconds * rate))[:, None] / rate
    x = 0.4 * np.sin(2 * np.pi * 440 * t * (1 + np.arange(channels))) + 0.05 * np.random.default_rng(0).standard_normal(
        (len(t), channels))
    return x.astype(np.float32)


def run_case(in_rate: int, out_rate: int, channels: int, seconds: float, chunk_ms: float) -> dict:
    """Time one stream's resampler over 20 ms frames (after a 1 s warm-up)."""
    step = int(in_rate * chunk_ms / 1000)
    x = audio(seconds + 1.0, in_rate, channels)
    r = StreamResampler(in_rate, out_rate, 1)
    times, empty, gap, longest = [], 0, 0, 0
    for i, a in enumerate(range(0, len(x) - step + 1, step)):
        t0 = time.perf_counter()
        frame = x[a : a + step].mean(axis=1, keepdims=True) if channels > 1 else x[a : a + step]
        y = r(frame)
        dt = time.perf_counter() - t0
        if a < in_rate:  # warm-up second
            continue
        times.append(dt * 1e3)
        empty += not len(y)
        gap = 0 if len(y) else gap + 1
        longest = max(longest, gap)
    times.sort()
    return {"input": f"{in_rate} Hz x{channels}", "model": f"{out_rate} Hz", "frames": len(times),
            "mean ms": statistics.fmean(times), "median ms": statistics.median(times), "p99 ms": times[int(0.99 * (len(times) - 1))],
            "max ms": times[-1], "empty frames %": 100.0 * empty / len(times),
            "longest gap ms": float((longest + 1) * chunk_ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--chunk-ms", type=float, default=20.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    table = Table(["input", "model", "frames", "mean ms", "median ms", "p99 ms", "max ms", "empty frames %", "longest gap ms"])
    for case in CASES:
        table.add(**run_case(*case, args.seconds, args.chunk_ms))
    report(f"StreamResampler (soxr HQ), one {args.chunk_ms:g} ms frame per call · {run_tag()}\n\n"
           + table.markdown(), args.out)


if __name__ == "__main__":
    main()
