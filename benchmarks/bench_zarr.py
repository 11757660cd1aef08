"""zarr batch inference throughput and memory: ``streamssm.zarr_infer`` vs the offline full forward.

    python benchmarks/bench_zarr.py [--series 16] [--steps 1048576] [--chunks 65536,262144]
                                    [--batches 4,16] [--block mamba2] [--workdir /tmp/bench_zarr]

Writes a synthetic store of ``series x steps x 4`` float32 (sines + noise, zarr chunks
``(1, min(chunks), 4)``, zstd), exports a random 4-layer d_model 512 regression model, then:

- offline: the model's full forward over one whole series at a time (input already on the GPU,
  no I/O), the baseline the issue names; steps/s over ``--offline-series`` series.
- zarr: ``run_inference`` end to end (read + decode + compute + write + resume records), one
  row per (chunk_steps, batch_series); steps/s, input MB/s, peak GPU memory
  (``max_memory_allocated``), peak host RSS (this process + DataLoader workers, sampled every
  20 ms) and the ratio to offline.
- flat memory: the same run over series 10x shorter; peak memory must not grow with length.
- ``--verify`` (default on): the zarr output of series 0 against the offline output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table, run_tag  # noqa: E402

from streamssm.checkpoint import export_safetensors  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402
from streamssm.zarr_infer import run_inference  # noqa: E402

warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


class PeakRSS:
    """Samples the RSS of this process tree in a thread; ``peak`` in bytes."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = _rss(os.getpid()), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss(os.getpid()))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_store(path: Path, series: int, steps: int, channels: int, chunk: int, seed: int = 0) -> float:
    """Synthetic multichannel signals; returns MB of raw float32 written."""
    if path.exists():
        shutil.rmtree(path)
    arr = zarr.create_array(str(path), shape=(series, steps, channels), chunks=(1, chunk, channels),
                            dtype="float32", compressors=ZstdCodec(level=3),
                            dimension_names=("series", "time", "channel"))
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float32)
    for s in range(series):
        freq = rng.uniform(1e-4, 2e-2, size=channels).astype(np.float32)
        x = np.sin(t[:, None] * freq[None]) + 0.1 * rng.standard_normal((steps, channels), dtype=np.float32)
        arr[s] = x.astype(np.float32)
    return series * steps * channels * 4 / 1e6


def _cuda() -> bool:
    return torch.cuda.is_available()


def _peak_reset() -> int:
    if not _cuda():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_gib(base: int) -> float | None:
    return (torch.cuda.max_memory_allocated() - base) / 2**30 if _cuda() else None


def offline(model: SSMModel, store: Path, n: int) -> tuple[float, float | None, list[torch.Tensor]]:
    """Steps/s and peak GiB of the full forward over ``n`` whole series, one at a time."""
    arr = zarr.open_array(str(store), mode="r")
    dev = "cuda" if _cuda() else "cpu"
    xs = [torch.from_numpy(arr[s]).to(dev)[None] for s in range(n)]
    outs = []
    with torch.inference_mode():
        model(xs[0][:, :4096])  # compile/autotune outside the timing
        base = _peak_reset()
        start = time.perf_counter()
        for x in xs:
            y, _ = model(x)
            outs.append(y[0].float())
        if _cuda():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return n * xs[0].shape[1] / seconds, _peak_gib(base), outs


def zarr_run(ckpt: Path, store: Path, out: Path, chunk: int, batch: int, workers: int) -> dict:
    base = _peak_reset()
    with PeakRSS() as rss:
        res = run_inference(ckpt, store, out, chunk_steps=chunk, batch_series=batch, num_workers=workers,
                            overwrite=True, accelerator="gpu" if _cuda() else "cpu", devices=1)
    arr = zarr.open_array(str(store), mode="r")
    mb = arr.size * arr.dtype.itemsize / 1e6
    return {"steps_s": res.steps / res.seconds, "mb_s": mb / res.seconds, "seconds": res.seconds,
            "gpu_gib": _peak_gib(base), "rss_gib": rss.peak / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=16)
    p.add_argument("--steps", type=int, default=1_048_576)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--chunks", default="65536,262144")
    p.add_argument("--batches", default="4,16")
    p.add_argument("--block", default="mamba2", choices=["mamba", "mamba2"])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-call-steps", type=int, default=1 << 20,
                   help="skip (chunk, batch) pairs with chunk*batch above this (d_model 512 fp32: ~36 KB of GPU memory per step per call)")
    p.add_argument("--offline-series", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench_zarr")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args()
    dev = "cuda" if _cuda() else "cpu"  # CPU: a smoke run with small sizes only
    chunks = [int(c) for c in args.chunks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    pairs = [(c, b) for c in chunks for b in batches if c * b <= args.max_call_steps]
    if not pairs:
        raise SystemExit("no (chunk, batch) pair fits --max-call-steps")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    cfg = ModelConfig(block=args.block, d_model=args.d_model, n_layers=args.layers, input_kind="continuous",
                      input_dim=args.channels, head="regression", output_dim=args.channels)
    model = SSMModel(cfg).eval()
    ckpt = export_safetensors(model, work / "model.safetensors")
    model = model.to(dev)

    t0 = time.perf_counter()
    mb = write_store(work / "in.zarr", args.series, args.steps, args.channels, min(chunks))
    short_steps = args.steps // 10
    write_store(work / "short.zarr", args.series, short_steps, args.channels, min(chunks), seed=1)
    print(f"stores written: {mb:.0f} MB raw + short, {time.perf_counter() - t0:.1f} s", flush=True)

    with torch.inference_mode():  # compile/autotune every (batch, chunk) shape outside the timing
        for c, b in pairs:
            model(torch.randn(b, c, args.channels, device=dev))
    off_rate, off_gib, off_out = offline(model, work / "in.zarr", args.offline_series)
    print(f"offline: {off_rate:.4g} steps/s, peak GPU GiB {off_gib}", flush=True)

    table = Table(["run", "series x steps", "chunk_steps", "batch_series", "seconds", "steps/s", "MB/s in",
                   "peak GPU GiB", "peak RSS GiB", "vs offline"])
    table.add(**{"run": "offline full forward", "series x steps": f"{args.offline_series} x {args.steps}",
                 "steps/s": off_rate, "peak GPU GiB": off_gib, "vs offline": "1.00x"})
    rows = [(work / "in.zarr", args.steps, c, b) for c, b in pairs]
    flat = max((p for p in pairs if p[0] == min(chunks)), key=lambda p: p[1])  # same pair, 10x shorter series
    rows.append((work / "short.zarr", short_steps, *flat))
    for store, steps, c, b in rows:
        r = zarr_run(ckpt, store, work / "out.zarr", c, b, args.workers)
        table.add(**{"run": "zarr infer", "series x steps": f"{args.series} x {steps}", "chunk_steps": c,
                     "batch_series": b, "seconds": r["seconds"], "steps/s": r["steps_s"], "MB/s in": r["mb_s"],
                     "peak GPU GiB": r["gpu_gib"], "peak RSS GiB": r["rss_gib"],
                     "vs offline": f"{r['steps_s'] / off_rate:.2f}x"})
        print(f"  {store.name} chunk {c} batch {b}: {r['steps_s']:.4g} steps/s", flush=True)
        if not args.no_verify and store.name == "in.zarr":
            got = torch.from_numpy(zarr.open_group(str(work / "out.zarr"), mode="r")["in"][0]).to(dev)
            ref = off_out[0]
            rel = float((got - ref).norm() / ref.norm())
            print(f"    verify series 0 vs offline: rel err {rel:.2e}", flush=True)
            if not rel < 5e-3:
                raise SystemExit(f"zarr output differs from the offline forward: rel err {rel:.2e}")
    print()
    print(f"{args.block} d_model {args.d_model} x {args.layers} layers, fp32 · {run_tag()}")
    print(table.markdown())


if __name__ == "__main__":
    main()
