"""Host CPU per chunk of the ``serve --workers`` engine process, without the model: what one
Python process (one GIL) spends on every chunk between the worker links and the device.

    python benchmarks/bench_engine_process.py [--streams 256,512] [--samples 320] [--workers 4]
                                              [--rounds 30] [--device cpu|cuda] [--pace-ms 0] [--flush-us 500]
                                              [--batch-wait-ms 0] [--pipeline-fill 2] [--profile N]

The engine process runs as ``serve --workers`` runs it (MultiProcessServer: its worker links,
relays, Scheduler and Streamer), with the model call replaced by a zero-time stand-in (the
bench_engine_host.py one) and a 5-token DNA model. ``--device cuda`` (on a GPU host: what the
GPU server's engine process does) keeps the call's tensor work (scores, state bookkeeping) on the
device, as asynchronous launches; on ``cpu`` that work runs on this process's CPU and counts
(~10 us a chunk on the 2-core development machine). ``--workers`` fake worker processes each open their share of the streams over a real link
and, per round, send one packed chunk of ``--samples`` tokens for each of their streams (as a
worker forwards a client's frame) and wait for every result. Columns, over the rounds only (the
streams already open): engine-process CPU per chunk (all its threads, process_time), of which
its event loop's (link messages, submit, gather, deliver) and its engine thread's (launch,
collect; thread CPU clocks), the latter's CPU inside ``PendingBatch.result`` (waiting for the
device: on CUDA a spinning wait that holds no GIL), model calls per round; median wall ms per
round (slowest worker). A worker batches the chunks it forwards in one event-loop iteration
(or within its link's flush delay, ``--flush-us``) into one link message. A real worker's frames
arrive spread over time: ``--pace-ms 20`` spreads each fake worker's round over 20 ms, one chunk
per loop iteration (as clients at real-time pace with random phases); 0 sends a round at once, in
one message, which flatters the submit side. ``--batch-wait-ms``: the server's ``--batch-wait``;
``--pipeline-fill``: the server's ``--pipeline-fill`` (on CUDA, where calls stay in flight);
``--profile N``: the event loop's N costliest functions under cProfile over the rounds. On the
GPU server at 20 ms chunks, N clients need N x 50 chunks/s: the engine process stays real time
while CPU us/chunk x N x 50 stays well under 1 s/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import pstats
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table  # noqa: E402
from bench_engine_host import stand_in  # noqa: E402

from streamssm.checkpoint import export_safetensors, load_for_serving  # noqa: E402
from streamssm.inference import PendingBatch  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402
from streamssm.service.config import ServeConfig  # noqa: E402
from streamssm.service.link import Link  # noqa: E402
from streamssm.service.multiprocess import MultiProcessServer, _Worker  # noqa: E402
from streamssm.service.worker import CHUNK_FLUSH_DELAY  # noqa: E402

VOCAB = 5

FAKE_WORKER = r"""
import asyncio, json, socket, sys, time
import numpy as np
from streamssm.service.link import Link, queue_chunk

async def main(fd, first_key, streams, samples, rounds, pace_us, flush_us):
    link = await Link.over(socket.socket(fileno=fd), flush_delay=flush_us * 1e-6)
    state = {"results": 0, "target": 0}
    got = asyncio.Event()

    async def read():
        async for message in link.messages():
            if message[0] == "results":
                state["results"] += len(message[1])
                if state["results"] >= state["target"]:
                    got.set()

    reader = asyncio.get_running_loop().create_task(read())
    keys = range(first_key, first_key + streams)
    for key in keys:
        await link.call("open", key, None, False, None)
    x = np.random.default_rng(first_key).integers(0, 5, samples).astype(np.int64)
    print("ready", flush=True)  # streams open: the measured rounds start on the bench's "go"
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    times = []
    for r in range(rounds):
        state["target"] += streams
        got.clear()
        t0 = time.perf_counter()
        for i, key in enumerate(keys):  # as a worker forwards its clients' frames
            if pace_us:  # frame i of the round arrives at t0 + i / streams of the pace
                await asyncio.sleep(max(0.0, t0 + pace_us * 1e-6 * i / streams - time.perf_counter()))
            queue_chunk(link, key, r, r * samples, x, time.perf_counter())
        await got.wait()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)
    await link.close()
    reader.cancel()

asyncio.run(main(*map(int, sys.argv[1:])))
"""


class WaitClock:
    """CPU seconds the engine thread spends inside ``PendingBatch.result`` (waiting for the device:
    CUDA's default event synchronization spins, and the thread clock counts the spin although the
    GIL is released meanwhile)."""

    def __init__(self):
        self.seconds = 0.0
        self._result = PendingBatch.result

    def __enter__(self) -> WaitClock:
        result = self._result

        def timed(pending: PendingBatch):
            t0 = time.thread_time()
            try:
                return result(pending)
            finally:
                self.seconds += time.thread_time() - t0

        PendingBatch.result = timed
        return self

    def __exit__(self, *exc) -> None:
        PendingBatch.result = self._result


async def measure(ckpt: Path, streams: int, samples: int, workers: int, rounds: int, device: str,
                  pace_us: int, flush_us: int, engine: dict, profile: cProfile.Profile | None = None) -> dict:
    """One run; ``engine``: the ServeConfig settings of the engine under test (batch_wait, pipeline_fill)."""
    cfg = ServeConfig(workers=workers, max_streams=streams, queue_depth=4, prepare=False, device=device,
                      engine="eager", **engine)
    server = MultiProcessServer(load_for_serving(ckpt), cfg)
    await server.backend.start()
    server.backend.streamer._calls = stand_in(VOCAB, streams, samples, device)
    loop = asyncio.get_running_loop()
    share = [streams // workers + (i < streams % workers) for i in range(workers)]
    for i in range(workers):
        ours, theirs = socket.socketpair()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FAKE_WORKER, str(theirs.fileno()), str(sum(share[:i])), str(share[i]),
            str(samples), str(rounds), str(pace_us), str(flush_us), pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        theirs.close()
        worker = _Worker(i, process, await Link.over(ours), loop.create_future())
        worker.listening.set_result(None)
        server.workers[i] = worker
        worker.task = loop.create_task(server._serve(worker))
    server._stopping = True  # a fake worker that ends is not started again
    for w in server.workers.values():
        assert await w.process.stdout.readline() == b"ready\n"
    engine_thread = time.pthread_getcpuclockid(next(iter(server.scheduler._executor._threads)).ident)
    cpu0, loop0, thread0 = time.process_time(), time.thread_time(), time.clock_gettime(engine_thread)
    calls0 = server.scheduler.batches
    with WaitClock() as waits, (profile or contextlib.nullcontext()):  # cProfile: the event loop's thread only
        for w in server.workers.values():
            w.process.stdin.write(b"go\n")
        outs = [json.loads(await w.process.stdout.read()) for w in list(server.workers.values())]
    cpu, on_loop = time.process_time() - cpu0, time.thread_time() - loop0
    on_thread = time.clock_gettime(engine_thread) - thread0
    calls = server.scheduler.batches - calls0
    for w in list(server.workers.values()):
        await w.process.wait()
        await w.task
    await server.backend.stop()
    rounds_ms = [1e3 * max(ts) for ts in zip(*outs)]
    chunks = streams * rounds
    return {"streams": streams, "engine process CPU us / chunk": 1e6 * cpu / chunks,
            "event loop us / chunk": 1e6 * on_loop / chunks, "engine thread us / chunk": 1e6 * on_thread / chunks,
            "of which waiting on the device": 1e6 * waits.seconds / chunks,
            "model calls / round": calls / rounds, "ms / round (median)": statistics.median(rounds_ms[2:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="256,512")
    p.add_argument("--samples", type=int, default=320)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cpu", help="where the call's tensor work runs (cuda: as on the GPU server)")
    p.add_argument("--pace-ms", type=float, default=0.0,
                   help="spread each fake worker's round over this many ms (0: all at once)")
    p.add_argument("--flush-us", type=int, default=round(CHUNK_FLUSH_DELAY * 1e6),
                   help="the fake workers' link flush delay (us; default: the real workers')")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the event loop's N costliest functions (cProfile, own time) over the rounds")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="serve --batch-wait: how long the idle engine waits for more streams' chunks (ms)")
    p.add_argument("--pipeline-fill", type=float, default=ServeConfig.pipeline_fill,
                   help="serve --pipeline-fill: streams pending per stream in flight before the next call goes out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = ModelConfig(block="mamba2", input_kind="tokens", vocab_size=VOCAB, head="lm", d_model=8, n_layers=1,
                          d_state=8, headdim=4)
        ckpt = export_safetensors(SSMModel(cfg), Path(tmp) / "dna.safetensors", spec={"modality": "dna"})
        table = Table(["streams", "engine process CPU us / chunk", "event loop us / chunk", "engine thread us / chunk",
                       "of which waiting on the device", "model calls / round", "ms / round (median)"])
        for n in args.streams.split(","):
            profile = cProfile.Profile() if args.profile else None
            table.add(**asyncio.run(measure(ckpt, int(n), args.samples, args.workers, args.rounds, args.device,
                                            round(args.pace_ms * 1e3), args.flush_us,
                                            dict(batch_wait=args.batch_wait_ms * 1e-3,
                                                 pipeline_fill=args.pipeline_fill), profile)))
            if profile is not None:
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.profile)
                print(f"event loop of the engine process, {n} streams, {args.rounds} rounds "
                      f"({int(n) * args.rounds} chunks):{text.getvalue()}")
    pace = f"rounds paced over {args.pace_ms:g} ms" if args.pace_ms else "rounds sent at once"
    print(f"\nengine process of serve --workers {args.workers} on {args.device}, model replaced by a zero-time stand-in, "
          f"{args.samples}-token chunks, {args.rounds} rounds ({pace}, workers' flush delay {args.flush_us} us, "
          f"batch wait {args.batch_wait_ms:g} ms, pipeline fill {args.pipeline_fill:g})")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
