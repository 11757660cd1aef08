"""CPU benchmark of ``Streamer.feed_many`` per call: this tree against a base commit, same run.

    python benchmarks/bench_streamer.py [--base 6762ade~1] [--streams 1,16,64] [--chunks 1,320]
                                        [--threads 2] [--repeats 3] [--host-only]

Model: a small mu-law LM (Mamba-2, d_model 64, 2 layers, d_state 32, headdim 32, vocab 256;
fp32, CPU, ``torch.set_num_threads(--threads)``). Each call feeds every one of S open streams a
chunk of L random tokens (equal lengths: the service's uniform batching). Columns:
    before   the base commit's Streamer (``git archive`` of its streamssm/ and kernels/ into a
             temporary folder, imported from there in a child process)
    after    this tree, full outputs (``feed_many(chunks)``)
    scores   this tree, scores only (``feed_many(chunks, outputs=False)``: what the service runs
             for a client whose ``include`` is ``["scores"]``)
ms per call: the median over ``--repeats`` child runs (before / after children interleaved) of
each child's fastest timed call (after 2 warm-up calls; at least 5 calls or 0.3 s). The fastest
call, not the median: on a shared 2-core machine most calls are preempted, the minimum is what
the code costs. Speedup = before / after (> 1: faster now). ``aten ops``: the ATen operators one
call dispatches (S=16; counted with a TorchDispatchMode), a load-independent measure of the
per-call host work. ``--host-only``: the model call replaced by a zero-time stand-in (a view of one
zero (S, L, 256) tensor, as bench_engine_host.py's), so what is timed is the Streamer's own work
per call (checks, stacking, indices, scores, results per stream): the host overhead that runs
serially with a GPU's graph replay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(block="mamba2", d_model=64, n_layers=2, d_state=32, headdim=32, chunk_size=64, vocab_size=256)


def worker(streams: list[int], chunks: list[int], threads: int, variants: list[str], host_only: bool) -> dict[str, float]:
    """In a child process: ms per feed_many call for each (variant, streams, chunk)."""
    import torch

    from streamssm.inference import Streamer
    from streamssm.models import ModelConfig, SSMModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(**MODEL))
    gen = torch.Generator().manual_seed(0)
    res = {}
    for s in streams:
        for length in chunks:
            for variant in variants:
                streamer = Streamer(model, s)
                if host_only:
                    zeros = torch.zeros(s, length, MODEL["vocab_size"])
                    streamer._calls = lambda x, rows, zeros=zeros: zeros[: x.shape[0], : x.shape[1]]
                ids = [streamer.open() for _ in range(s)]
                kwargs = {"outputs": False} if variant == "scores" else {}
                data = [{i: torch.randint(0, 256, (length,), generator=gen) for i in ids} for _ in range(4)]
                times = []
                k = 0
                while k < 2 + 3 or (sum(times) < 0.3 and k < 200):
                    t0 = time.perf_counter()
                    streamer.feed_many(data[k % 4], **kwargs)
                    if k >= 2:
                        times.append(time.perf_counter() - t0)
                    k += 1
                res[f"{variant}/{s}/{length}"] = min(times) * 1e3
                if s == 16:
                    res[f"ops/{variant}/{s}/{length}"] = count_ops(lambda: streamer.feed_many(data[0], **kwargs))
    return res


def count_ops(fn) -> int:
    """Number of ATen operators ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def base_tree(rev: str, dest: Path) -> Path:
    """streamssm/ and kernels/ of ``rev`` under ``dest``, importable as ``streamssm``."""
    archive = subprocess.run(["git", "archive", rev, "streamssm", "kernels"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    (dest / "streamssm" / "kernels").symlink_to(dest / "kernels", target_is_directory=True)
    return dest


def child(path: Path | None, args, variants: list[str]) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    cmd = [sys.executable, __file__, "--worker", ",".join(variants), "--streams", args.streams,
           "--chunks", args.chunks, "--threads", str(args.threads)] + ["--host-only"] * args.host_only
    if path is not None:
        cmd += ["--expect-root", str(path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="6762ade~1", help="git revision measured as 'before'")
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--chunks", default="1,320")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host-only", action="store_true", help="the model call replaced by a zero-time stand-in")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--expect-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    streams, chunks = [int(v) for v in args.streams.split(",")], [int(v) for v in args.chunks.split(",")]
    if args.worker is not None:
        import streamssm

        if args.expect_root and not streamssm.__file__.startswith(args.expect_root):
            raise SystemExit(f"base tree not imported: streamssm from {streamssm.__file__}")
        print(json.dumps(worker(streams, chunks, args.threads, args.worker.split(","), args.host_only)))
        return
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = base_tree(args.base, Path(tmp))
        for _ in range(args.repeats):
            for path, variants in ((base, ["before"]), (None, ["after", "scores"])):
                for key, ms in child(path, args, variants).items():
                    runs.setdefault(key, []).append(ms)
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True).stdout
    what = "host work only (model call: a zero-time stand-in)" if args.host_only else f"model {MODEL}"
    print(f"feed_many ms/call, CPU {args.threads} threads, {what}, base {args.base} ({rev.strip()}), "
          f"median of {args.repeats} interleaved runs")
    print("| streams | chunk | before ms | after ms | scores-only ms | speedup after | speedup scores-only "
          "| aten ops before / after / scores-only |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in streams:
        for length in chunks:
            b, a, sc = (statistics.median(runs[f"{v}/{s}/{length}"]) for v in ("before", "after", "scores"))
            ops = " / ".join(str(int(runs[f"ops/{v}/{s}/{length}"][0])) if f"ops/{v}/{s}/{length}" in runs else "-"
                             for v in ("before", "after", "scores"))
            print(f"| {s} | {length} | {b:.2f} | {a:.2f} | {sc:.2f} | {b / a:.2f}x | {b / sc:.2f}x | {ops} |")


if __name__ == "__main__":
    main()
