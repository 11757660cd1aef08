"""The service under attack (issue 17): a well-behaved canary stream beside hostile clients.

    python benchmarks/bench_abuse.py [--model tiny|d512] [--device cpu|cuda] [--canary-chunks 100]
                                     [--slice-samples 256] [--attack-seconds 5] [--cycles 2000]
                                     [--kills 3] [--crash-chunks 400] [--write-ahead 1] [--out FILE]

``streamssm serve`` runs a mu-law audio LM (8 kHz) in a subprocess (its own GIL; its RSS read
from /proc). Measured, each against its target in the issue:

* canary p50/p99 chunk latency (20 ms s16le chunks, binary scores, one in flight) unloaded and
  while one attacker sends legal maximum-size frames (``--max-frame-bytes`` of s16le, scores
  only) back to back (target: loaded p99 <= 2x unloaded);
* ``ready`` latency of new connections, unloaded and under that attack (target: <= 100 ms);
* server RSS before/after an amplification attack: frames at the largest size the result limit
  lets through with JSON outputs (257 values per sample), plus one over it (refused);
* connect/abort cycles (abort before ``ready``, after ``ready``, with a frame in flight): live
  streams afterwards (target: 0) and state-dir files/bytes (target: bounded);
* SIGKILL of the server at a random point while a stream runs, restart, resume: chunks
  recomputed (at most one write-ahead interval) and results missing (target: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from _harness import Table, report, run_tag  # noqa: E402
from _procs import rss_mb  # noqa: E402
from bench_service import export_model, scrape  # noqa: E402

RATE, CHUNK = 8000, 160  # 20 ms chunks


def start_server(ckpt: Path, args, state: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "streamssm.cli", "serve", "--checkpoint", str(ckpt), "--port", "0",
           "--device", args.device, "--max-streams", "8", "--queue-depth", "4", "--state-dir", str(state),
           "--write-ahead-interval", str(args.write_ahead), "--max-parked", "64", "--idle-timeout", "30"]
    cmd += ["--slice-samples", str(args.slice_samples), "--workers", str(args.workers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline, lines = time.time() + 120, []
    for line in proc.stderr:
        lines.append(line)
        if "worker " not in line and (m := re.search(r"listening on ws://[\d.]+:(\d+)/", line)):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1))
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(lines))


def pcm(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return (np.sin(np.arange(n) / 7.0) * 12000 + rng.normal(size=n) * 800).astype("<i2").tobytes()


def start_msg(**kw) -> str:
    return json.dumps({"type": "start", "format": "s16le", "sample_rate": RATE, **kw})


async def timed_ready(url: str) -> float:
    from websockets.asyncio.client import connect

    t0 = time.perf_counter()
    async with connect(url) as ws:
        await ws.send(start_msg(include=["scores"]))
        assert json.loads(await ws.recv())["type"] == "ready"
        return (time.perf_counter() - t0) * 1e3


async def recv_result(ws) -> str | bytes:
    """The next message that is not a ``saved`` notice (sent after each write-ahead, --state-dir)."""
    while True:
        msg = await ws.recv()
        if not (isinstance(msg, str) and json.loads(msg).get("type") == "saved"):
            return msg


async def canary(url: str, chunks: int) -> list[float]:
    """Send ``chunks`` 20 ms chunks one at a time; per-chunk latency in ms."""
    from websockets.asyncio.client import connect

    data, out = pcm(CHUNK * chunks, 1), []
    async with connect(url) as ws:
        await ws.send(start_msg(include=["scores"], results="binary"))
        await ws.recv()
        for i in range(chunks):
            t0 = time.perf_counter()
            await ws.send(data[2 * CHUNK * i : 2 * CHUNK * (i + 1)])
            await recv_result(ws)
            out.append((time.perf_counter() - t0) * 1e3)
        await ws.send(json.dumps({"type": "end"}))
        async for _ in ws:
            pass
    return out


async def attacker(url: str, frame: bytes, stop: asyncio.Event, **start) -> int:
    """Send ``frame`` back to back (two in flight) until ``stop``; returns results received."""
    from websockets.asyncio.client import connect

    got = 0
    async with connect(url, max_size=None) as ws:
        await ws.send(start_msg(**start))
        await ws.recv()
        inflight = 0
        while not stop.is_set():
            while inflight < 2:
                await ws.send(frame)
                inflight += 1
            try:
                reply = await asyncio.wait_for(recv_result(ws), 1.0)
            except TimeoutError:
                continue
            if isinstance(reply, str) and json.loads(reply).get("type") == "error":
                raise RuntimeError(reply)
            got, inflight = got + 1, inflight - 1
        ws.transport.abort()
    return got


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def fairness(url: str, args, table: Table) -> None:
    unloaded = await canary(url, args.canary_chunks)
    ready0 = [await timed_ready(url) for _ in range(5)]
    stop = asyncio.Event()
    frame = pcm(args.max_frame_bytes // 2, 2)
    attack = asyncio.create_task(attacker(url, frame, stop, include=["scores"]))
    await asyncio.sleep(1.0)
    loaded = await canary(url, args.canary_chunks)
    ready1 = [await timed_ready(url) for _ in range(5)]
    stop.set()
    frames = await attack
    table.add(measure="canary chunk latency p50 / p99 (ms), unloaded", value=f"{pct(unloaded, 50):.1f} / {pct(unloaded, 99):.1f}")
    table.add(measure="canary chunk latency p50 / p99 (ms), 1 MiB-frame attacker",
              value=f"{pct(loaded, 50):.1f} / {pct(loaded, 99):.1f}", target=f"p99 <= {2 * pct(unloaded, 99):.1f}")
    table.add(measure="ready latency max (ms), unloaded / attacked", value=f"{max(ready0):.1f} / {max(ready1):.1f}",
              target="<= 100")
    table.add(measure="attacker frames answered meanwhile", value=str(frames))


async def amplification(url: str, pid: int, args, table: Table) -> None:
    from websockets.asyncio.client import connect

    before = rss_mb(pid)[0]
    per_sample = 257 * 16  # JSON outputs + scores of a 256-way LM
    n = args.max_result_bytes // per_sample
    stop = asyncio.Event()
    attacks = [asyncio.create_task(attacker(url, pcm(n, 3 + i), stop)) for i in range(3)]
    await asyncio.sleep(args.attack_seconds)
    stop.set()
    frames = sum(await asyncio.gather(*attacks))
    async with connect(url) as ws:  # one frame over the result limit: refused before compute
        await ws.send(start_msg())
        await ws.recv()
        await ws.send(pcm(n + 1, 9))
        refused = json.loads(await ws.recv()).get("reason")
    after, peak = rss_mb(pid)
    table.add(measure=f"RSS MB before / after / peak, 3 clients x {n}-sample JSON frames ({frames} answered)",
              value=f"{before:.0f} / {after:.0f} / {peak:.0f}",
              target="peak <= base + streams x (queue_depth + replay) x result limit")
    table.add(measure=f"one frame of {n + 1} samples", value=str(refused), target="result_too_big")


async def abort_cycles(url: str, port: int, state: Path, args, table: Table) -> None:
    from websockets.asyncio.client import connect

    t0 = time.perf_counter()
    for i in range(args.cycles):
        try:
            ws = await connect(url)
            await ws.send(start_msg(include=["scores"]))
            if i % 3:
                await ws.recv()
            if i % 3 == 2:
                await ws.send(pcm(CHUNK, i))
            ws.transport.abort()
        except Exception:  # noqa: BLE001 - 1013 while aborted streams are still closing
            await asyncio.sleep(0.01)
    rate = args.cycles / (time.perf_counter() - t0)
    deadline = time.time() + 30
    while time.time() < deadline and scrape(port).get("streamssm_live_streams", 1) > 0:
        await asyncio.sleep(0.1)
    live = scrape(port).get("streamssm_live_streams")
    files = list(state.glob("*.safetensors"))
    table.add(measure=f"{args.cycles} connect/abort cycles ({rate:.0f}/s): live streams after",
              value=f"{live:.0f}", target="0")
    table.add(measure="  state-dir files / MB after", value=f"{len(files)} / {sum(f.stat().st_size for f in files) / 1e6:.2f}",
              target="<= max-parked (64)")


async def crash_resume(ckpt: Path, args, state: Path, table: Table) -> None:
    """Stream chunks; SIGKILL the server at random points; restart and resume with raw messages."""
    from websockets.asyncio.client import connect

    total = args.crash_chunks
    data = [pcm(CHUNK * total, 7)[2 * CHUNK * i : 2 * CHUNK * (i + 1)] for i in range(total)]
    rng, results, token, seq = random.Random(0), {}, None, 0
    kills, recomputed, lost, proc = 0, 0, 0, None
    for _ in range(4 * args.kills + 4):  # bounded: one server start per kill, plus lost-stream restarts
        if seq >= total:
            break
        proc, port = start_server(ckpt, args, state)
        try:
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                ack = max(results) if results else -1
                await ws.send(start_msg(include=["scores"], results="binary",
                                        **({"resume": token, "ack": ack} if token else {})))
                ready = json.loads(await ws.recv())
                if ready.get("reason") == "stream_lost":  # killed before its first write-ahead: start over
                    token, results, seq, lost = None, {}, 0, lost + 1
                    continue
                token, seq = ready["resume"], ready["next_seq"]
                recomputed += max(0, ack + 1 - seq)
                if kills < args.kills:  # SIGKILL at a random moment while chunks flow
                    asyncio.get_running_loop().call_later(rng.uniform(0.3, 2.0), proc.kill)
                    kills += 1
                while seq < total:
                    await ws.send(data[seq])
                    while True:  # replays first, then this chunk's result
                        msg = await recv_result(ws)
                        r = int.from_bytes(msg[4:8], "little")
                        results[r] = np.frombuffer(msg[28:], "<f4").copy()
                        if r == seq:
                            break
                    seq += 1
                    await asyncio.sleep(0.01)  # ~real time: 20 ms chunks
                await ws.send(json.dumps({"type": "end"}))
                async for _ in ws:
                    pass
        except Exception:  # noqa: BLE001 - the connection dies with the server
            pass
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    ref_proc, ref_port = start_server(ckpt, args, Path(tempfile.mkdtemp()))
    try:  # the same stream uninterrupted
        async with connect(f"ws://127.0.0.1:{ref_port}/") as ws:
            await ws.send(start_msg(include=["scores"], results="binary"))
            await ws.recv()
            ref = []
            for i in range(total):
                await ws.send(data[i])
                ref.append(np.frombuffer((await recv_result(ws))[28:], "<f4"))
    finally:
        ref_proc.terminate()
        ref_proc.wait(timeout=60)
    missing = sum(1 for i in range(total) if i not in results)
    wrong = sum(1 for i in range(total) if i in results and not np.allclose(results[i], ref[i], atol=1e-4))
    table.add(measure=f"SIGKILL x{kills} at random points, restart + resume: chunks recomputed "
                      f"(streams lost before their first write-ahead, restarted: {lost})",
              value=str(recomputed), target=f"<= one {args.write_ahead:g} s interval per kill")
    table.add(measure="  results missing / differing from an uninterrupted run", value=f"{missing} / {wrong}",
              target="0 / 0")


async def main_async(args) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench_abuse_"))
    ckpt = export_model(args.model, RATE, tmp / "model.safetensors")
    table = Table(["measure", "value", "target"])
    state = tmp / "state"
    proc, port = start_server(ckpt, args, state)
    url = f"ws://127.0.0.1:{port}/"
    try:
        await fairness(url, args, table)
        await amplification(url, proc.pid, args, table)
        await abort_cycles(url, port, state, args, table)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    await crash_resume(ckpt, args, tmp / "crash_state", table)
    return (f"bench_abuse · model {args.model} on {args.device} · max frame {args.max_frame_bytes} B, "
            f"result limit {args.max_result_bytes} B, slice {args.slice_samples} · {run_tag()}\n\n" + table.markdown())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", "d512"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--slice-samples", type=int, default=256, help="server --slice-samples")
    p.add_argument("--workers", type=int, default=1, help="server --workers (RSS: all its processes)")
    p.add_argument("--canary-chunks", type=int, default=100)
    p.add_argument("--attack-seconds", type=float, default=5.0)
    p.add_argument("--crash-chunks", type=int, default=400, help="20 ms chunks of the SIGKILL stream")
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--write-ahead", type=float, default=1.0, help="server --write-ahead-interval")
    p.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="the server default")
    p.add_argument("--max-result-bytes", type=int, default=16 << 20, help="the server default")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report(asyncio.run(main_async(args)), args.out)


if __name__ == "__main__":
    main()
