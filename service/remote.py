"""A ``serve --workers N`` worker's view of the engine process: the same calls a
:class:`~streamssm.service.server.StreamServer` makes on its
:class:`~streamssm.service.backend.LocalBackend`, sent over the worker's
:class:`~streamssm.service.link.Link` (engine side: :mod:`streamssm.service.multiprocess`).

- :class:`RemoteScheduler`: streams are opened, fed, reset, checkpointed and closed in the
  engine process's Scheduler; each stream's queue slots (backpressure) are kept here, and a
  finished chunk's raw results (outputs, scores) come back to be encoded in this process, so
  the engine thread only computes.
- :class:`RemoteStore`: parked streams live in the engine process (a stream parked by one
  worker resumes on any other); tokens are made here with the engine's key.
- :class:`RemoteTokens`: token claims and failures, kept once in the engine process.
- :class:`ForwardedMetrics`: this worker's counters, added to the engine's one registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssm.errors import ProtocolError, StateError

from .link import Link, LinkClosed, queue_chunk
from .metrics import ServiceMetrics
from .protocol import SERVICE_RESTART
from .resume import Parked, TokenMint
from .scheduler import Chunk, Deliver, Encoder, OnError, QueueSlots, Slice, StreamQueues

log = logging.getLogger(__name__)


@dataclass
class _RemoteStream:
    encoder: Encoder
    deliver: Deliver
    on_error: OnError
    slots: QueueSlots
    waiting: dict[int, Chunk] = field(default_factory=dict)  # seq -> chunk sent, result not back yet
    #: results back, being encoded slice by slice, oldest first: (chunk, raw slices left, encoded slices)
    encoding: deque[tuple[Chunk, list[Slice], list]] = field(default_factory=deque)
    encoded: asyncio.Event = field(default_factory=asyncio.Event)  # set while ``encoding`` is empty
    closing: bool = False
    failed: bool = False


def remote_exception(name: str, message: str) -> Exception:
    """The engine's exception as the worker raises it: same type name, same message."""
    return type(name, (RuntimeError,), {})(message)


class RemoteScheduler(StreamQueues):
    """The :class:`~streamssm.service.scheduler.Scheduler` interface over a link. Stream ids
    are this worker's keys (a reset keeps its key; the engine maps keys to pool rows)."""

    def __init__(self, link: Link, queue_depth: int):
        self.link, self.queue_depth = link, queue_depth
        self.live = 0  # live streams of the whole server, as of the engine's last message
        self._streams: dict[int, _RemoteStream] = {}
        self._next_key = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def open(self, encoder: Encoder, deliver: Deliver, on_error: OnError, snapshot: bytes | None = None,
                   outputs: bool = True, slice_samples: int | None = None) -> int:
        key, self._next_key = self._next_key, self._next_key + 1
        call = asyncio.ensure_future(self.link.call("open", key, snapshot, outputs, slice_samples))
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:  # the engine still opens it: close it once it has
            call.add_done_callback(lambda c: c.cancelled() or c.exception() or self.link.send("discard", key))
            raise
        self._streams[key] = _RemoteStream(encoder, deliver, on_error, QueueSlots(self.queue_depth))
        return key

    async def submit(self, key: int, chunk: Chunk) -> None:
        stream = await self._take_slot(key)
        stream.waiting[chunk.seq] = chunk
        queue_chunk(self.link, key, chunk.seq, chunk.start, chunk.x.numpy(), chunk.received)

    async def reset(self, key: int, computed: int) -> int:
        stream = self._get(key)
        if stream.waiting or stream.failed:
            raise StateError(f"stream {key} cannot be reset with chunks pending or after a failure")
        await self.link.call("reset", key, computed)
        return key

    async def close(self, key: int, snapshot: bool = False) -> bytes | None:
        stream = self._streams.get(key)
        if stream is None:
            return None
        stream.closing = True
        try:
            blob = await self.link.call("close", key, snapshot and not stream.failed)
            while snapshot and stream.encoding and not stream.failed:  # the snapshot covers them: deliver first
                await stream.encoded.wait()
            return blob
        except LinkClosed:
            return None
        finally:
            self._streams.pop(key, None)
            self._drop(stream)

    async def checkpoint(self, key: int) -> tuple[bytes, int, int] | None:
        if key not in self._streams:
            return None
        return await self.link.call("checkpoint", key)

    # -- messages from the engine ---------------------------------------------------------

    def results(self, keys: list[int], seqs: list[int], counts: list[int],
                outputs: tuple[torch.Tensor | None, ...], scores: tuple[np.ndarray | None, ...]) -> None:
        """Chunks' results as the engine computed them (a ``results`` message of
        :func:`~streamssm.service.link.queue_result`: chunk i of stream keys[i] took counts[i] model
        calls, its slices' outputs (n, o) and scores (n,) next in ``outputs`` and ``scores``)."""
        slices = map(Slice, outputs, scores)
        for key, seq, count in zip(keys, seqs, counts):
            self._result(key, seq, [next(slices) for _ in range(count)])

    def _result(self, key: int, seq: int, slices: list[Slice]) -> None:
        """One chunk's results, one Slice per model call: encoded here slice by slice, then
        delivered, in order."""
        stream = self._streams.get(key)
        chunk = None if stream is None else stream.waiting.pop(seq, None)
        if stream is None or chunk is None:
            return
        stream.encoding.append((chunk, slices, []))
        stream.encoded.clear()
        if len(stream.encoding) == 1:
            self._encode(stream)

    def _encode(self, stream: _RemoteStream) -> None:
        """Encode the next slice of the oldest result (delivered after its last one); one slice
        per event-loop turn, so a chunk of many slices (a large frame) holds this worker's loop
        no longer than the engine thread's encoding of one slice would (the other streams' I/O
        goes on in between)."""
        if not stream.encoding or stream.failed:
            return
        chunk, raw, done = stream.encoding[0]
        res = raw.pop(0)
        try:
            done.append(stream.encoder.part(chunk, res))
            message = None if raw else stream.encoder.finish(chunk, done)
        except Exception as exc:  # noqa: BLE001 - this stream fails, the others go on (as in the engine)
            self._failed(stream, exc)
            return
        if message is not None:
            stream.encoding.popleft()
            stream.deliver(chunk, message)
        if stream.encoding:
            asyncio.get_running_loop().call_soon(self._encode, stream)
        else:
            stream.encoded.set()

    def error(self, key: int, name: str, message: str) -> None:
        """The engine's model call failed for this stream."""
        stream = self._streams.get(key)
        if stream is not None:
            self._failed(stream, remote_exception(name, message))

    def _failed(self, stream: _RemoteStream, exc: BaseException) -> None:
        stream.failed = True
        self._drop(stream)  # nothing more will be computed or delivered for this stream
        stream.on_error(exc)

    def _drop(self, stream: _RemoteStream) -> None:
        """Free the queue slots of every chunk whose result will not be delivered (a submit
        waiting for a slot wakes up)."""
        stream.slots.answered(len(stream.waiting) + len(stream.encoding))
        stream.waiting.clear()
        stream.encoding.clear()
        stream.encoded.set()

    def engine_lost(self) -> None:
        """The link ended (the engine process died): every stream ends with 1012, as after a
        server crash: its client resumes from the last write-ahead on the next server."""
        gone = ProtocolError("the engine process is gone; resume with your token (from the last write-ahead, "
                             "with --state-dir)", SERVICE_RESTART, "service_restart")
        for stream in list(self._streams.values()):
            if not stream.failed:
                self._failed(stream, gone)


class RemoteStore:
    """The ResumeStore calls a server makes (from threads, via ``asyncio.to_thread``), run by
    the engine process's store; ``new_token`` runs here, with the engine's key."""

    def __init__(self, link: Link, loop: asyncio.AbstractEventLoop, key: bytes, ttl: float,
                 state_dir: str | None):
        self.link, self._loop = link, loop
        self.mint = TokenMint(key)
        self.ttl = ttl
        self.state_dir = None if state_dir is None else Path(state_dir)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def new_token(self, owner: str) -> str:
        return self.mint.new_token(owner)

    def _call(self, op: str, *args: Any) -> Any:
        """Run on a worker thread: the engine's answer (its error raised here)."""
        return asyncio.run_coroutine_threadsafe(self.link.call(op, *args), self._loop).result()

    def _call_unless_gone(self, op: str, *args: Any) -> None:
        """A call that is moot once the engine is gone (nothing is left to park or forget)."""
        try:
            self._call(op, *args)
        except LinkClosed:
            log.warning("%s: the engine process is gone", op)

    def park(self, token: str, parked: Parked, renew: bool = True) -> None:
        self._call_unless_gone("park", token, parked, renew)

    def take(self, token: str, owner: str) -> Parked:
        return self._call("take", token, owner)

    def forget(self, token: str) -> None:
        self._call_unless_gone("forget", token)

    def write_ahead(self, token: str, parked: Parked) -> None:
        self._call_unless_gone("write_ahead", token, parked)

    def sweep(self) -> int:
        return self._call("sweep")


class RemoteTokens:
    """:class:`~streamssm.service.tokens.StreamTokens` of the engine process."""

    def __init__(self, link: Link):
        self.link = link

    async def claim(self, token: str) -> None:
        await self.link.call("claim", token)

    def release(self, token: str) -> None:
        self.link.send("release", token)

    def fail(self, token: str, why: str) -> None:
        self.link.send("fail", token, why)


class ForwardedMetrics:
    """The server's counter calls, counted in the engine process's registry."""

    content_type = ServiceMetrics.content_type

    def __init__(self, link: Link):
        self.link = link

    def connection(self) -> None:
        self.link.send("count", "connection")

    def resume(self) -> None:
        self.link.send("count", "resume")

    def reject(self, reason: str) -> None:
        self.link.send("count", "reject", reason)


class WorkerBackend:
    """A worker's :class:`~streamssm.service.backend.LocalBackend` stand-in (no model here)."""

    streamer = None

    def __init__(self, link: Link, store: RemoteStore, queue_depth: int):
        self.link = link
        self.scheduler = RemoteScheduler(link, queue_depth)
        self.store = store
        self.tokens = RemoteTokens(link)
        self.metrics = ForwardedMetrics(link)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def counts(self) -> tuple[int, int]:
        return tuple(await self.link.call("counts"))

    async def metrics_text(self) -> bytes:
        return await self.link.call("metrics")
