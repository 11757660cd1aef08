"""``serve --workers N``: one engine process and N websocket worker processes on one port.

One Python event loop carries about 130 real-time 20 ms clients (bench_service: ~140 us of loop
CPU per chunk, mostly the websocket I/O), far fewer than one GPU computes. So this process
(the engine) keeps the model, the state pool, the parked streams, the token claims and the
metrics (:class:`~streamssm.service.backend.LocalBackend`), and N worker processes run the
websocket front end: protocol, codecs, sessions, replay buffers and result encoding. Workers
listen on the same port (SO_REUSEPORT: the kernel spreads connections over them) and reach the
engine over a private socketpair each (:class:`~streamssm.service.link.Link`). Because parked
streams and token claims live here, a stream resumes on any worker.

A worker that dies takes its connections with it (their streams are closed, not parked: the
replay buffers were in that worker; with a state dir their last write-ahead files stay, so their
tokens resume from there as after a crash) and is started again; the other workers' streams are
not touched. SIGTERM to this process: every worker closes its streams with 1012 and parks them
(through this process), then exits; then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ConfigError, StateError

from .backend import LocalBackend
from .codec import ModelCodec
from .config import ServeConfig
from .link import Link, LinkClosed, error_tuple, queue_result
from .scheduler import Chunk, Scheduler, Slice

log = logging.getLogger(__name__)
START_TIMEOUT = 120.0  # seconds a worker may take to import torch and listen
STOP_TIMEOUT = 30.0  # seconds a worker may take to park its streams and exit
WATCHDOG_INTERVAL = 5.0  # seconds between the engine's pings of each serving worker
#: seconds a worker may take to answer a ping; a worker that does not (stopped, stuck) is killed and
#: started again: it would hold its streams' pool rows and leave the connections the kernel hands it
#: (its share of every new one) hanging for good. Its loop answers within milliseconds even under load
WATCHDOG_TIMEOUT = 20.0
_COUNTS = ("connection", "resume", "reject")  # the metrics calls workers forward


class _Relay:
    """The engine side of one worker stream: its Scheduler encoder (the raw results, encoded in
    the worker) and the deliver/on_error calls that send them over the worker's link."""

    def __init__(self, link: Link, key: int, scheduler: Scheduler):
        self.link, self.key, self.scheduler = link, key, scheduler
        self.sid = -1

    def part(self, chunk: Chunk, result: Slice) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One model call's slice of the chunk: its raw (outputs (n, o), scores (n,)), views of the
        call's results (copied once per worker and call when the link's message is pickled),
        encoded in the worker."""
        return None if result.outputs is None else result.outputs.numpy(), result.scores

    def finish(self, chunk: Chunk, parts: list) -> list:
        return parts

    def deliver(self, chunk: Chunk, slices: list) -> None:
        queue_result(self.link, self.key, chunk.seq, slices)
        self.scheduler.done(self.sid)  # the worker holds the stream's real queue slot until it sends

    def on_error(self, exc: BaseException) -> None:
        self.link.send("error", self.key, type(exc).__name__, str(exc))


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    link: Link
    listening: asyncio.Future
    relays: dict[int, _Relay] = field(default_factory=dict)  # the worker's stream keys
    claims: set[str] = field(default_factory=set)  # tokens its connections hold
    calls: set[asyncio.Task] = field(default_factory=set)  # its calls (and discards) being answered
    task: asyncio.Task | None = None
    watchdog: asyncio.Task | None = None


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound to (host, port) with SO_REUSEPORT, not listening: it holds the port (a
    concrete one for port 0) for the workers, which listen on it with SO_REUSEPORT too."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


class MultiProcessServer:
    """The engine process of ``serve --workers N``. ``async with MultiProcessServer(b, cfg):``.

    ``event_loop``: the workers' loop (``serve --event-loop``)."""

    def __init__(self, bundle: ServingBundle, config: ServeConfig, event_loop: str = "auto"):
        if config.workers < 2:
            raise ConfigError(f"MultiProcessServer needs workers >= 2, got {config.workers} (1: StreamServer)")
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError("serve --workers needs SO_REUSEPORT (Linux, BSD, macOS); use --workers 1")
        self.config, self.bundle, self._event_loop = config, bundle, event_loop
        self.codec = ModelCodec.from_bundle(bundle)  # refuses a bundle without a serving spec, here
        self.backend = LocalBackend(bundle, config)
        self.scheduler, self.store, self.tokens = self.backend.scheduler, self.backend.store, self.backend.tokens
        self.workers: dict[int, _Worker] = {}
        self.port = -1
        self._placeholder: socket.socket | None = None
        self._stopping = False
        self._respawns: set[asyncio.Task] = set()
        self.watchdog_interval, self.watchdog_timeout = WATCHDOG_INTERVAL, WATCHDOG_TIMEOUT
        #: what a worker may call: op -> handler(worker, *args)
        self._ops = {"open": self._open, "reset": self._reset, "close": self._close, "checkpoint": self._checkpoint,
                     "claim": self._claim, "counts": lambda worker: self.backend.counts(),
                     "metrics": lambda worker: self.backend.metrics_text(),
                     **{op: self._store_call(op) for op in ("park", "take", "forget", "write_ahead", "sweep")}}

    @property
    def url(self) -> str:
        return f"{'wss' if self.config.certfile else 'ws'}://{self.config.host}:{self.port}/"

    async def __aenter__(self) -> MultiProcessServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the engine, then start the workers and wait until each listens."""
        await self.backend.start()
        try:
            self._placeholder, self.port = reserve_port(self.config.host, self.config.port)
            await asyncio.gather(*(self._spawn(i) for i in range(self.config.workers)))
        except BaseException:
            await self.stop()  # the workers that did start, and the engine thread
            raise
        log.info("%d workers listening on %s (engine in process %s)", self.config.workers, self.url,
                 os.getpid())

    async def stop(self) -> None:
        """Every worker parks its streams and exits (killed after STOP_TIMEOUT); then the engine stops."""
        self._stopping = True
        for task in self._respawns:
            task.cancel()
        for worker in self.workers.values():
            worker.link.send("stop")
        for worker in list(self.workers.values()):
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("worker %d did not stop in %g s: killed", worker.index, STOP_TIMEOUT)
                worker.process.kill()
                await worker.process.wait()
            if worker.task is not None:
                await worker.task
        self.workers.clear()
        await self.backend.stop()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    def _hello(self, index: int) -> tuple:
        cfg = dataclasses.replace(self.config, port=self.port)
        return ("hello", index, dataclasses.asdict(cfg), dataclasses.replace(self.bundle, model=None),
                self.store.mint.key, logging.getLogger().getEffectiveLevel())

    async def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamssm.service.worker", str(theirs.fileno()), self._event_loop,
                pass_fds=(theirs.fileno(),), start_new_session=True)  # no terminal signals: this process stops it
        finally:
            theirs.close()
        link = await Link.over(ours)
        worker = _Worker(index, process, link, asyncio.get_running_loop().create_future())
        self.workers[index] = worker
        link.send(*self._hello(index))
        worker.task = asyncio.get_running_loop().create_task(self._serve(worker), name=f"streamssm-worker-{index}")
        try:
            await asyncio.wait_for(asyncio.shield(worker.listening), START_TIMEOUT)
        except TimeoutError:
            process.kill()
            raise ConfigError(f"worker {index} did not start listening in {START_TIMEOUT:g} s") from None
        worker.watchdog = asyncio.get_running_loop().create_task(self._watch(worker))

    async def _watch(self, worker: _Worker) -> None:
        """Ping a serving worker every ``watchdog_interval`` s; kill it when it does not answer in
        ``watchdog_timeout`` s (its link's end then starts it again, as for a crash)."""
        while not worker.link.closed and not self._stopping:
            await asyncio.sleep(self.watchdog_interval)
            try:
                await asyncio.wait_for(worker.link.call("ping"), self.watchdog_timeout)
            except LinkClosed:
                return
            except TimeoutError:
                if worker.link.closed or self._stopping:
                    return
                log.error("worker %d did not answer for %g s (stopped or stuck): killed, to be started again",
                          worker.index, self.watchdog_timeout)
                worker.process.kill()
                return

    async def _respawn(self, index: int) -> None:
        delay = 1.0
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                await self._spawn(index)
                log.info("worker %d started again", index)
                return
            except (ConfigError, OSError) as exc:
                log.error("worker %d failed to start again: %s", index, exc)
                delay = min(30.0, 2 * delay)

    # -- one worker's link -----------------------------------------------------------------

    async def _serve(self, worker: _Worker) -> None:
        """Answer one worker until its link ends; then free everything it held."""
        loop = asyncio.get_running_loop()
        try:
            async for message in worker.link.messages():
                kind = message[0]
                if kind == "chunks":
                    _, keys, seqs, starts, received, lengths, xs = message
                    for key, seq, start, x, t, n in zip(keys, seqs, starts, xs, received, lengths):
                        if (waiting := self._submit(worker, key, seq, start, x, t, n)) is not None:
                            await waiting
                elif kind == "call":
                    self._track(worker, loop.create_task(self._answer(worker, *message[1:])))
                elif kind == "release":
                    self.tokens.release(message[1])
                    worker.claims.discard(message[1])
                elif kind == "fail":
                    self.tokens.fail(message[1], message[2])
                elif kind == "count" and message[1] in _COUNTS:
                    getattr(self.backend.metrics, message[1])(*message[2:])
                elif kind == "discard":
                    self._track(worker, loop.create_task(self._close(worker, message[1], False)))
                elif kind == "listening" and not worker.listening.done():
                    worker.listening.set_result(message[1])
                elif kind == "failed" and not worker.listening.done():
                    worker.listening.set_exception(ConfigError(f"worker {worker.index}: {message[1]}"))
        finally:
            await self._gone(worker)

    async def _gone(self, worker: _Worker) -> None:
        """A worker's link ended: close its streams, release its tokens, reap it; start it again
        if it had been serving (one that failed to start is the starter's to retry)."""
        was_serving = worker.listening.done() and worker.listening.exception() is None
        if worker.watchdog is not None:
            worker.watchdog.cancel()
        if not worker.listening.done():
            worker.listening.set_exception(ConfigError(f"worker {worker.index} exited before listening"))
        # its calls still running (an open waiting behind a model call, a claim) finish first: what
        # they open or claim is freed below, not leaked (a pool row, a token busy for good)
        await asyncio.gather(*worker.calls, return_exceptions=True)
        for key in list(worker.relays):
            with contextlib.suppress(StateError):
                await self._close(worker, key, False)
        for token in worker.claims:
            self.tokens.release(token)
        worker.claims.clear()
        code = await worker.process.wait()
        if self.workers.get(worker.index) is worker and was_serving and not self._stopping:
            log.error("worker %d exited (code %s): its connections are lost; starting it again", worker.index, code)
            self.workers.pop(worker.index)
            task = asyncio.get_running_loop().create_task(self._respawn(worker.index))
            self._respawns.add(task)
            task.add_done_callback(self._respawns.discard)

    @staticmethod
    def _track(worker: _Worker, task: asyncio.Task) -> None:
        worker.calls.add(task)
        task.add_done_callback(worker.calls.discard)

    async def _answer(self, worker: _Worker, rid: int, op: str, args: tuple) -> None:
        try:
            value = await self._ops[op](worker, *args)
        except Exception as exc:  # noqa: BLE001 - the worker raises it again
            worker.link.reply(rid, None, error_tuple(exc))
        else:
            worker.link.reply(rid, value)

    def _store_call(self, op: str):
        method = getattr(self.store, op)

        async def call(worker: _Worker, *args: Any) -> Any:
            return await asyncio.to_thread(method, *args)
        return call

    def _broadcast_live(self) -> None:
        for worker in self.workers.values():
            worker.link.send("live", self.scheduler.live)

    async def _open(self, worker: _Worker, key: int, snapshot: bytes | None, outputs: bool,
                    slice_samples: int | None) -> None:
        relay = _Relay(worker.link, key, self.scheduler)
        relay.sid = await self.scheduler.open(relay, relay.deliver, relay.on_error, snapshot, outputs, slice_samples)
        worker.relays[key] = relay
        self.backend.metrics.worker_streams.labels(worker=str(worker.index)).inc()
        self._broadcast_live()

    def _submit(self, worker: _Worker, key: int, seq: int, start: int, x: np.ndarray,
                received: float, n: int) -> Awaitable[None] | None:
        """Queue a worker's chunk (``n`` samples) now when its stream has a free slot (the usual
        case: no coroutine per chunk); otherwise the wait to await."""
        relay = worker.relays.get(key)
        if relay is None:
            return None
        chunk = Chunk(seq, start, x, received, n)
        try:
            return None if self.scheduler.submit_nowait(relay.sid, chunk) else self._submit_later(relay, chunk)
        except StateError:  # closing or failed: the worker knows (or will) and answers
            return None

    async def _submit_later(self, relay: _Relay, chunk: Chunk) -> None:
        with contextlib.suppress(StateError):
            await self.scheduler.submit(relay.sid, chunk)

    async def _reset(self, worker: _Worker, key: int, computed: int) -> None:
        relay = worker.relays[key]
        relay.sid = await self.scheduler.reset(relay.sid, computed)

    async def _close(self, worker: _Worker, key: int, snapshot: bool) -> bytes | None:
        relay = worker.relays.pop(key, None)
        if relay is None:
            return None
        try:
            return await self.scheduler.close(relay.sid, snapshot)
        finally:
            self._broadcast_live()

    async def _checkpoint(self, worker: _Worker, key: int) -> tuple[bytes, int, int] | None:
        relay = worker.relays.get(key)
        return None if relay is None else await self.scheduler.checkpoint(relay.sid)

    async def _claim(self, worker: _Worker, token: str) -> None:
        await self.tokens.claim(token)
        worker.claims.add(token)
