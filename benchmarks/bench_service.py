"""Load test of ``streamssm serve`` over loopback: N concurrent clients streaming audio in real time.

    python benchmarks/bench_service.py [--model tiny|d512] [--device cpu|cuda] [--clients 1,4,16,64]
                                       [--seconds 3] [--chunk-ms 20] [--client-procs 1] [--max-wall 60]
                                       [--engine auto|eager|graphs|compiled] [--prepare] [--repeats 1]

A mu-law audio LM (16 kHz, 8-bit tokens) is exported to a temporary file and served by
``streamssm serve`` in a subprocess (its own Python, so clients and server don't share a
GIL). Each client sends s16le chunks of ``chunk-ms`` on a real-time schedule (start times
staggered over one chunk period) and asks for binary per-step scores. Chunk latency is
send -> result receipt; "slip" is how far the sends fell behind the real-time schedule
(backpressure from a server that cannot keep up). N is kept real time when p99 latency
<= 50 ms and slip <= 2 chunk periods. ``--repeats R`` measures each N R times on the same
server (near capacity p99 varies from run to run: 34-66 ms at one N in three runs on the H100);
an N counts as kept when every run kept it. The sweep stops at the first N that is not kept
or when the wall-clock budget runs out. Models: tiny (Mamba-2, 2 layers, d_model 32) for CPU,
d512 (Mamba-2, 4 layers, d_model 512) for the H100, demo (the demo's audio model: Mamba-2, 2
layers, d_model 48) for CPU. ``--engine compiled --prepare`` compiles before the server listens
(the start-up seconds are printed). "loop CPU" / "other threads CPU" are the busy shares
(CPU seconds, from /proc, over the seconds the clients streamed) of the server's event-loop
thread and of all its other threads (engine, torch pools): a loop near 100 % means the
websocket side, not the model, limits N. ``--workers N`` runs ``serve --workers N``: "loop CPU"
is then the busiest worker's loop (us/chunk: all workers' loops together) and "engine loop CPU"
the engine process's loop (the worker links' traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import child_processes, thread_cpu  # noqa: E402

MODELS = {
    # next to no compute: what the service itself costs per chunk (event loops, links, codecs)
    "nano": dict(block="mamba2", d_model=8, n_layers=1, d_state=8, headdim=4, chunk_size=64),
    "tiny": dict(block="mamba2", d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=64),
    # the 4 x d512 mu-law LM of bench_realtime.py (same shape: engine and service numbers compare)
    "d512": dict(block="mamba2", d_model=512, n_layers=4, d_state=128, headdim=64, expand=2, chunk_size=256),
}
P99_TARGET_MS = 50.0


def model_arch(name: str) -> dict:
    """The architecture of a MODELS entry, or of ``demo``: the demo's audio model (streamssm.demo)."""
    if name == "demo":
        from streamssm.demo import ARCH

        return ARCH
    return MODELS[name]


def export_model(name: str, sample_rate: int, path: Path) -> Path:
    import torch

    from streamssm.checkpoint import export_safetensors
    from streamssm.models import ModelConfig, SSMModel

    torch.manual_seed(0)
    cfg = ModelConfig(input_kind="tokens", vocab_size=256, head="lm", **model_arch(name))
    return export_safetensors(SSMModel(cfg), path, spec={"modality": "audio", "sample_rate": sample_rate,
                                                            "encoding": "mu_law"})


def start_server(ckpt: Path, args) -> tuple[subprocess.Popen, int, list[str]]:
    """``streamssm serve`` on a free port; returns the process, its port and its (live) log lines."""
    cmd = [sys.executable, "-m", "streamssm.cli", "serve", "--checkpoint", str(ckpt), "--port", "0",
           "--device", args.device, "--dtype", args.dtype, "--max-streams", str(max(args.clients)),
           "--queue-depth", "4", "--idle-timeout", "60", "--resume-ttl", "0"]
    cmd += ["--batching", args.batching, "--engine", args.engine, "--prepare", str(args.prepare).lower(),
            "--event-loop", args.event_loop, "--slice-samples", str(args.slice_samples),
            "--batch-wait", str(args.batch_wait), "--pipeline-fill", str(args.pipeline_fill),
            "--workers", str(args.workers)]
    if args.server_threads:
        cmd += ["--threads", str(args.server_threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: list[str] = []
    port = None
    deadline = time.time() + (3600 if args.prepare else 120)  # compiling at start-up: minutes, loaded: more
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"listening on ws://[\d.]+:(\d+)/", line) if "worker " not in line else None
        if m:
            port = int(m.group(1))
            break
        if time.time() > deadline:
            break
    if port is None:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
    return proc, port, lines


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics as {sample name: value} (unlabelled samples only)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far: ``loop`` / ``workers`` of the server process (:func:`thread_cpu`) and,
    per worker process of ``--workers``, its event loop as ``front<pid>``."""
    out = thread_cpu(pid)
    for child in child_processes(pid):
        out[f"front{child}"] = thread_cpu(child).get("loop", 0.0)
    return out


def engine_only(ckpt: Path, args) -> list[dict]:
    """The Streamer alone (no websockets), as the server calls it (scores only): one feed_batch of N
    streams x one chunk and of N streams x two chunks (a server behind by one chunk), median of 5."""
    import torch

    from streamssm.checkpoint import load_for_serving
    from streamssm.inference import Streamer

    if args.server_threads:
        torch.set_num_threads(args.server_threads)
    chunk = int(args.sample_rate * args.chunk_ms / 1000)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    streamer = Streamer(load_for_serving(ckpt, args.device).model, max(args.clients), args.device, dtype, args.engine)
    if args.prepare:
        streamer.capture()
    ids = [streamer.open() for _ in range(max(args.clients))]
    rows = []
    for n in args.clients:
        for chunks in (1, 2):
            batch = {i: torch.randint(0, 256, (chunks * chunk,)) for i in ids[:n]}
            times = []
            for _ in range(7):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                streamer.feed_batch(batch, outputs=False)  # returns CPU arrays: synchronizes
                times.append(time.perf_counter() - t0)
            t = float(np.median(times[2:]))
            rows.append({"clients": n, "samples": chunks * chunk, "ms": t * 1000,
                         "rt_streams": n * chunks * chunk / args.sample_rate / t})
    return rows


async def one_client(url: str, seconds: float, chunk: int, rate: int, offset: float, rng: random.Random) -> dict:
    from streamssm.service.client import StreamClient

    period = chunk / rate
    n_chunks = max(1, int(seconds / period))
    t = np.arange(n_chunks * chunk) / rate
    pcm = (np.sin(2 * np.pi * rng.uniform(100, 1000) * t) * 12000).astype(np.int16)
    slip, first = 0.0, time.time()
    async with StreamClient(url, format="s16le", sample_rate=rate, results="binary", include=("scores",),
                            window=4) as c:
        await asyncio.sleep(offset)
        t0, first = time.perf_counter(), time.time()
        for k in range(n_chunks):
            due = t0 + k * period
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                slip = max(slip, now - due)
            await c.send(pcm[k * chunk : (k + 1) * chunk])
        await c.end(timeout=120)
    return {"latencies": c.latencies[3:], "chunks": len(c.results), "slip": slip, "first": first, "last": time.time()}


def client_proc(url: str, n: int, seconds: float, chunk: int, rate: int, seed: int, out: mp.Queue) -> None:
    async def run():
        rng = random.Random(seed)
        period = chunk / rate
        return await asyncio.gather(*(one_client(url, seconds, chunk, rate, rng.uniform(0, period), rng)
                                      for _ in range(n)), return_exceptions=True)

    # the clients' process holds what the bench imported (torch: ~160k objects, ~260k when torch._dynamo
    # came along): a full collection in the send loop stalled every client for 0.1-0.15 s (send slip,
    # 2026-12-07); frozen, the collector leaves them alone, as a real client's process would
    gc.collect()
    gc.freeze()
    results = asyncio.run(run())
    out.put([r if isinstance(r, dict) else {"error": repr(r)} for r in results])


def measure(url: str, n: int, args) -> dict:
    chunk = int(args.sample_rate * args.chunk_ms / 1000)
    procs = min(args.client_procs, n)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    workers = [ctx.Process(target=client_proc, args=(url, n // procs + (i < n % procs), args.seconds, chunk,
                                                     args.sample_rate, 1000 * n + i, q)) for i in range(procs)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    results = [r for _ in workers for r in q.get(timeout=args.seconds * 4 + 180)]
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    lat = np.concatenate([np.asarray(r["latencies"]) for r in ok]) * 1000 if ok else np.array([np.nan])
    chunks = sum(r["chunks"] for r in ok)
    slip = max((r["slip"] for r in ok), default=float("nan")) * 1000
    p99 = float(np.percentile(lat, 99))
    # each client's own rate (its samples over its own first send .. last result): the client
    # processes start seconds apart, so one span over all clients understated the rate
    rates = [r["chunks"] * chunk / (r["last"] - r["first"]) for r in ok]
    span = (max(r["last"] for r in ok) - min(r["first"] for r in ok)) if ok else float("nan")
    kept = not errors and p99 <= P99_TARGET_MS and slip <= 2 * args.chunk_ms
    return {"clients": n, "chunks": chunks, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": p99,
            "max_ms": float(lat.max()), "slip_ms": slip, "samples_per_s": sum(rates) if rates else float("nan"),
            "wall_s": wall, "span_s": span, "kept": kept, "errors": len(errors), "first_error": errors[0] if errors else ""}


def kept_summary(rows: list[dict]) -> str:
    """Per N: runs kept and the p99 range; then the largest N kept in every one of its runs."""
    lines, kept = [], []
    for n in dict.fromkeys(r["clients"] for r in rows):
        runs = [r for r in rows if r["clients"] == n]
        p99 = sorted(r["p99_ms"] for r in runs)
        ok = sum(r["kept"] for r in runs)
        if ok == len(runs):
            kept.append(n)
        lines.append(f"N={n}: kept in {ok} of {len(runs)} run(s), p99 {p99[0]:.1f}-{p99[-1]:.1f} ms "
                     f"(median {float(np.median(p99)):.1f})")
    lines.append(f"largest N kept real time in every run (p99 <= {P99_TARGET_MS:g} ms): {max(kept) if kept else 'none'}")
    return "\n" + "\n".join(lines)


def limit(row: dict) -> str:
    """What held an N that was not kept: the thread busy >= 80 % of the streaming time (the event
    loop's CPU, or the engine's batches), else neither (GIL hand-offs, the clients)."""
    if row["kept"]:
        return "–"
    if max(row["loop_busy"], row["engine_loop_busy"] or 0.0) >= max(0.8, row["engine_busy"]):
        return "event loop"
    return "engine" if row["engine_busy"] >= 0.8 else "neither >= 80 %"


def engine_loop_cell(row: dict) -> str:
    """``--workers``: the engine process's loop, busy share (CPU us per chunk); else "–"."""
    if row["engine_loop_busy"] is None:
        return "–"
    return f"{row['engine_loop_busy']:.0%} ({row['engine_loop_us_per_chunk']:.0f})"


def sweep(ckpt: Path, args) -> list[dict]:
    """Start the server, measure every N (until not kept or out of wall time), stop the server."""
    proc, port, lines = start_server(ckpt, args)
    t_start = time.perf_counter()  # the budget is the sweep's: a long --prepare is not counted
    prepared = [line.strip() for line in lines if "prepared in" in line]
    if prepared:
        print(f"server start-up: {prepared[0]}", flush=True)
    url = f"ws://127.0.0.1:{port}/"
    rows = []
    try:
        measure(url, 1, argparse.Namespace(**{**vars(args), "seconds": 1.0, "client_procs": 1}))  # warm-up
        for n, run in ((n, run) for n in args.clients for run in range(1, args.repeats + 1)):
            if run == 1 and rows and not all(r["kept"] for r in rows if r["clients"] == rows[-1]["clients"]) \
                    and not args.all:
                break
            if time.perf_counter() - t_start + args.seconds + 10 > args.max_wall:
                print(f"(wall budget of {args.max_wall:g} s reached before N={n}, run {run})", flush=True)
                break
            before, cpu_before = scrape(port), server_cpu(proc.pid)
            row = measure(url, n, args)
            after, cpu_after = scrape(port), server_cpu(proc.pid)
            cpu = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
            fronts = [v for k, v in cpu.items() if k.startswith("front")] or [cpu.get("loop", float("nan"))]
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            batches = max(d.get("streamssm_batches_total", 0.0), 1.0)
            row.update(batch_ms=1000 * d.get("streamssm_batch_seconds_sum", 0.0) / batches,
                       streams_per_batch=d.get("streamssm_batch_streams_sum", 0.0) / batches,
                       samples_per_batch=d.get("streamssm_samples_total", 0.0) / batches,
                       engine_busy=d.get("streamssm_batch_seconds_sum", 0.0) / row["span_s"],
                       model_ms=1000 * d.get("streamssm_model_seconds_total", 0.0) / batches,
                       encode_ms=1000 * d.get("streamssm_encode_seconds_total", 0.0) / batches,
                       loop_busy=max(fronts) / row["span_s"],
                       engine_loop_busy=cpu.get("loop", float("nan")) / row["span_s"] if args.workers > 1 else None,
                       engine_loop_us_per_chunk=1e6 * cpu.get("loop", float("nan")) / max(row["chunks"], 1),
                       workers_busy=cpu.get("workers", float("nan")) / row["span_s"],
                       loop_us_per_chunk=1e6 * sum(fronts) / max(row["chunks"], 1))
            row["run"] = run
            rows.append(row)
            print(f"N={n} run {run}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, slip {row['slip_ms']:.1f} ms, "
                  f"kept={row['kept']} {row['first_error']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def main(argv=None) -> int:
    from streamssm.service.config import ServeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*sorted(MODELS), "demo"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--clients", default="1,4,16,64", help="comma-separated N values (ascending)")
    p.add_argument("--seconds", type=float, default=3.0, help="stream length per client")
    p.add_argument("--chunk-ms", type=float, default=20.0)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--client-procs", type=int, default=1, help="client processes (spread the client load)")
    p.add_argument("--batching", default="uniform", choices=("uniform", "greedy"), help="server batching policy")
    p.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="serve --event-loop")
    p.add_argument("--slice-samples", type=int, default=640, help="serve --slice-samples")
    p.add_argument("--batch-wait", type=float, default=0.0, help="serve --batch-wait (seconds)")
    p.add_argument("--pipeline-fill", type=float, default=ServeConfig.pipeline_fill, help="serve --pipeline-fill")
    p.add_argument("--server-threads", type=int, default=None, help="torch threads of the server process")
    p.add_argument("--engine", default="auto", choices=("auto", "eager", "graphs", "compiled"),
                   help="the server's engine (serve --engine)")
    p.add_argument("--prepare", action="store_true",
                   help="serve --prepare: graphs captured / programs compiled before listening")
    p.add_argument("--max-wall", type=float, default=60.0, help="stop the sweep after this many seconds (server start-up not counted)")
    p.add_argument("--engine-only", action="store_true", help="also time Streamer.feed_batch alone, in-process")
    p.add_argument("--workers", type=int, default=1, help="serve --workers (websocket front-end processes)")
    p.add_argument("--all", action="store_true", help="keep sweeping after the first N that is not real time")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per N on the same server (p99 at the edge of capacity varies run to run)")
    args = p.parse_args(argv)
    args.clients = sorted(int(c) for c in args.clients.split(","))

    import torch

    from streamssm.service.client import StreamClient  # noqa: F401 (fail early if the service is missing)

    tag = (torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = export_model(args.model, args.sample_rate, Path(tmp) / "model.safetensors")
        rows = sweep(ckpt, args)
        engine = engine_only(ckpt, args) if args.engine_only else []
    print(f"\nservice load: model {args.model} ({args.dtype}, {args.batching} batching, engine {args.engine}"
          f"{' prepared' if args.prepare else ''}, {args.event_loop} event loop, {args.server_threads or 'default'} threads, {args.workers} worker(s)) on {tag}; "
          f"{args.chunk_ms:g} ms chunks at {args.sample_rate} Hz, {args.seconds:g} s per client, {args.client_procs} client process(es)")
    print("| clients | run | chunks | p50 ms | p99 ms | max ms | send slip ms | samples/s | x real time | kept "
          "| server batch ms | model ms | encode ms | streams/batch | samples/batch | loop CPU | other threads CPU "
          "| loop CPU us/chunk | engine loop CPU (us/chunk) | engine busy | limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        xrt = r["samples_per_s"] / (r["clients"] * args.sample_rate)
        print(f"| {r['clients']} | {r['run']} | {r['chunks']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['slip_ms']:.1f} | {r['samples_per_s']:.0f} | {xrt:.2f} | {'yes' if r['kept'] else 'no'} | "
              f"{r['batch_ms']:.1f} | {r['model_ms']:.1f} | {r['encode_ms']:.1f} | {r['streams_per_batch']:.1f} | {r['samples_per_batch']:.0f} | "
              f"{r['loop_busy']:.0%} | {r['workers_busy']:.0%} | {r['loop_us_per_chunk']:.0f} | "
              f"{engine_loop_cell(r)} | "
              f"{r['engine_busy']:.0%} | {limit(r)} |")
    if args.engine_only:
        print("\nengine alone (Streamer.feed_batch as the server calls it, scores only, no websockets):")
        print("| streams | samples per stream | ms per call | real-time streams this rate sustains |")
        print("|---|---|---|---|")
        for r in engine:
            print(f"| {r['clients']} | {r['samples']} | {r['ms']:.2f} | {r['rt_streams']:.0f} |")
    print(kept_summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
