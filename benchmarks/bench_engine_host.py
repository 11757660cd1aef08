"""Host cost of the serving engine per model call, without the model: the Scheduler and the
Streamer as the server runs them, with the model call replaced by a zero-time stand-in, so what
is left is the bookkeeping that runs serially with the device (gathering slices, validating and
stacking chunks, token range check, head scores, unbinding and slicing results, handing them
over, delivery, queue slots).

    python benchmarks/bench_engine_host.py [--streams 64,256,1024] [--samples 320] [--rounds 20]
                                           [--vocab 256] [--device cpu|cuda]

Each round submits one chunk of ``samples`` tokens for every stream and waits until all are
delivered (one model call per round, as the uniform batching of a steady real-time load).
Streams are ``serve --workers`` streams (their results go to a link, encoded in the worker);
the single-process server also encodes in the engine thread (bench_service's encode ms).
Columns: ms per round, of which the engine thread's (launch + collect + hand-over) and the rest (the
event loop: submit, gather, deliver), and both per stream. The stand-in returns a preallocated
(b, l, vocab) zero tensor; the mu-law LM's scores (logsumexp over the vocab) still run, on the
device. Best of 5 repeats. Absolute times are this host CPU's (the GPU server's host counts).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Table  # noqa: E402

from streamssm.inference import Streamer  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402
from streamssm.service.multiprocess import _Relay  # noqa: E402
from streamssm.service.scheduler import Chunk, Scheduler  # noqa: E402


class _NullLink:
    """Where a relay's results would go (to a worker): queued as a Link queues them (the messages
    of one event-loop iteration together), then dropped instead of sent."""

    def __init__(self):
        self._out: list[tuple] = []

    def send(self, *message) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._out.clear)
        self._out.append(message)

    def last_queued(self, kind: str) -> tuple | None:
        return self._out[-1] if self._out and self._out[-1][0] == kind else None


def stand_in(vocab: int, streams: int, samples: int, device: str):
    """The model call of the Streamer replaced by a view of one zero tensor (b, l, vocab)."""
    zeros = torch.zeros(streams, samples, vocab, device=device)
    return lambda x, rows: zeros[: x.shape[0], : x.shape[1]]


async def measure(streams: int, samples: int, rounds: int, vocab: int, device: str) -> dict:
    cfg = ModelConfig(block="mamba2", input_kind="tokens", vocab_size=vocab, head="lm", d_model=8, n_layers=1,
                      d_state=8, headdim=4)
    streamer = Streamer(SSMModel(cfg).eval(), streams, device, torch.float32, "eager")
    streamer._calls = stand_in(vocab, streams, samples, device)
    sched = Scheduler(streamer, queue_depth=4)
    await sched.start()
    relays = []
    for _ in range(streams):
        relay = _Relay(_NullLink(), len(relays), sched)
        relay.sid = await sched.open(relay, relay.deliver, relay.on_error, None, outputs=False)
        relays.append(relay)
    x = torch.randint(0, vocab, (samples,)).numpy()  # the engine process's chunks: numpy views of link messages
    engine = [0.0]

    def timed(step):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return step(*args)
            finally:
                engine[0] += time.perf_counter() - t0
        return run

    sched._launch, sched._collect = timed(sched._launch), timed(sched._collect)

    async def one_round(seq: int) -> None:
        for r in relays:
            await sched.submit(r.sid, Chunk(seq, seq * samples, x))
        while any(sched.unanswered(r.sid) for r in relays):
            await asyncio.sleep(0)

    seq = 0
    for _ in range(3):  # warm-up
        await one_round(seq)
        seq += 1
    best = None
    for _ in range(5):
        engine[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(rounds):
            await one_round(seq)
            seq += 1
        total = (time.perf_counter() - t0) / rounds
        row = (total, engine[0] / rounds)
        best = row if best is None or row < best else best
    await sched.stop()
    total, eng = best
    return {"streams": streams, "samples": samples, "ms / round": 1e3 * total, "engine thread ms": 1e3 * eng,
            "event loop ms": 1e3 * (total - eng), "us / stream": 1e6 * total / streams,
            "engine thread us / stream": 1e6 * eng / streams}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="64,256,1024")
    p.add_argument("--samples", type=int, default=320)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--vocab", type=int, default=256, help="output width (the mu-law LM: 256)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    tag = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    table = Table(["streams", "samples", "ms / round", "engine thread ms", "event loop ms", "us / stream",
                   "engine thread us / stream"])
    for n in args.streams.split(","):
        table.add(**asyncio.run(measure(int(n), args.samples, args.rounds, args.vocab, args.device)))
    print(f"\nengine host cost per call (model call replaced by a zero-time stand-in), {tag}, "
          f"{torch.get_num_threads()} torch threads, vocab {args.vocab}, best of 5 x {args.rounds} rounds")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
