"""The engine: one loop that batches the pending chunks of all live streams into one
``Streamer.feed_many`` call, run in a single worker thread (model compute never runs on the
event loop; the Streamer is touched by that one thread only, so it needs no lock).

Per stream::

    submit(sid, chunk) --(bounded: waits while queue_depth chunks are unanswered)--> pending
    engine: take every stream's pending chunks -> concatenate per stream -> feed_many (thread)
            -> split per chunk -> encode (thread) -> deliver(chunk, result, message) (loop)
    the connection's sender sends the message, then calls done(sid) to free one queue slot

A chunk holds its queue slot from ``submit`` until its result has been sent, so a client that
sends faster than the model runs, or reads results slower than they come, is slowed (its
handler stops reading, TCP pushes back); the engine itself never waits on any client, so a
slow or dead client never delays the others. Lifecycle calls (open, restore, snapshot, close)
go through the same single-thread executor, so they are ordered after any compute already
submitted: a snapshot taken after a disconnect includes every chunk that was computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from streamssm.errors import ConfigError, StateError
from streamssm.inference import ChunkResult, Streamer

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """One received frame, already turned into model input ``x`` (tokens (l,) or values (l, c))."""

    seq: int
    start: int  # sample offset of x[0] in the stream
    x: torch.Tensor
    received: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


#: encode(chunk, result) -> wire message; runs in the worker thread
Encoder = Callable[[Chunk, ChunkResult], "str | bytes"]
#: deliver(chunk, result, message) on the event loop; error(exc) when the stream's compute failed
Deliver = Callable[[Chunk, ChunkResult, "str | bytes"], None]
OnError = Callable[[BaseException], None]


@dataclass
class _Stream:
    sid: int
    encode: Encoder
    deliver: Deliver
    on_error: OnError
    slots: asyncio.Semaphore
    outputs: bool = True  # False: the client wants scores only (ChunkResult.outputs None)
    pending: deque[Chunk] = field(default_factory=deque)
    closing: bool = False


class Scheduler:
    """Batches all live streams of one :class:`~streamssm.inference.Streamer`.

    ``batching`` picks how many pending chunks per stream one call takes (:meth:`_gather`).
    ``metrics`` (optional) receives ``observe_batch(streams, samples, seconds)`` and
    ``observe_chunk(latency_s)`` calls on the event loop.
    """

    def __init__(self, streamer: Streamer, queue_depth: int = 8, metrics: Any = None,
                 batching: str = "uniform"):
        if queue_depth < 1:
            raise ConfigError(f"queue_depth must be >= 1, got {queue_depth}")
        if batching not in ("uniform", "greedy"):
            raise ConfigError(f"batching must be 'uniform' or 'greedy', got {batching!r}")
        self.batching = batching
        self.streamer = streamer
        self.queue_depth = queue_depth
        self.metrics = metrics
        self._streams: dict[int, _Stream] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamssm-engine")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches = 0  # number of feed_many calls so far

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="streamssm-engine")

    async def stop(self) -> None:
        """Stop the engine loop (after its current batch) and the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _call(self, fn: Callable, *args):
        """Run ``fn(*args)`` in the worker thread (after any compute already submitted)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def live(self) -> int:
        return len(self._streams)

    async def open(self, encode: Encoder, deliver: Deliver, on_error: OnError, snapshot: bytes | None = None,
                   outputs: bool = True) -> int:
        """Open a stream (from ``snapshot`` when given); StateError when the pool is full or the
        snapshot belongs to another model. ``outputs=False``: its results carry scores only
        (``Streamer.feed_many(outputs=...)``: no (l, o) distribution leaves the device)."""
        fn, args = (self.streamer.open, ()) if snapshot is None else (self.streamer.restore, (snapshot,))
        sid = await self._call(fn, *args)
        self._streams[sid] = _Stream(sid, encode, deliver, on_error, asyncio.Semaphore(self.queue_depth), outputs)
        return sid

    async def submit(self, sid: int, chunk: Chunk) -> None:
        """Queue one chunk; waits while the stream already has ``queue_depth`` unanswered chunks."""
        stream = self._get(sid)
        await stream.slots.acquire()
        if stream.closing:  # closed while we waited
            stream.slots.release()
            raise StateError(f"stream {sid} is closing")
        stream.pending.append(chunk)
        self._wakeup.set()

    def done(self, sid: int) -> None:
        """The result of one chunk of ``sid`` was sent (or dropped): free its queue slot."""
        stream = self._streams.get(sid)
        if stream is not None:
            stream.slots.release()

    async def drain(self, sid: int) -> None:
        """Wait until every submitted chunk of ``sid`` has been answered and sent."""
        stream = self._get(sid)
        for _ in range(self.queue_depth):
            await stream.slots.acquire()
        for _ in range(self.queue_depth):
            stream.slots.release()

    async def close(self, sid: int, snapshot: bool = False) -> bytes | None:
        """Drop the stream's not-yet-computed chunks, wait for its in-flight compute, then
        (optionally) snapshot its state and free its pool row. Returns the snapshot bytes."""
        stream = self._streams.get(sid)
        if stream is None:
            return None
        stream.closing = True
        dropped = len(stream.pending)
        stream.pending.clear()
        for _ in range(dropped):
            stream.slots.release()
        blob = await self._call(self._snapshot_and_close, sid, snapshot)
        self._streams.pop(sid, None)
        return blob

    def _snapshot_and_close(self, sid: int, snapshot: bool) -> bytes | None:
        try:
            return self.streamer.snapshot(sid) if snapshot else None
        finally:
            self.streamer.close(sid)

    def _get(self, sid: int) -> _Stream:
        try:
            return self._streams[sid]
        except KeyError:
            raise StateError(f"unknown stream id {sid}") from None

    # ------------------------------------------------------------------ the engine loop

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = self._gather()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                outcome = await self._call(self._compute, batch)
            except Exception:  # noqa: BLE001 - never let the engine die; isolate per stream below
                log.exception("batched compute failed for %d streams; retrying them one by one", len(batch))
                outcome = {}
                for sid, item in batch.items():
                    try:
                        outcome.update(await self._call(self._compute, {sid: item}))
                    except Exception as exc:  # noqa: BLE001
                        outcome[sid] = exc
            self.batches += 1
            if self.metrics is not None:
                self.metrics.observe_batch(len(batch), sum(c.n for cs, _ in batch.values() for c in cs),
                                           time.perf_counter() - t0)
            self._deliver(batch, outcome)

    def _gather(self) -> dict[int, tuple[list[Chunk], Encoder]]:
        """Take the pending chunks of every ready stream.

        ``greedy``: all of each stream's pending chunks (concatenated in time). ``uniform``: the
        same number k of chunks from every stream (k = the smallest backlog; the rest waits for
        the next call), so that streams sending equal chunk sizes give equal lengths, which the
        Streamer runs in one round instead of one round per distinct length.
        """
        ready = [(sid, s) for sid, s in self._streams.items() if s.pending and not s.closing]
        if not ready:
            return {}
        k = min(len(s.pending) for _, s in ready) if self.batching == "uniform" else None
        batch: dict[int, tuple[list[Chunk], Encoder]] = {}
        for sid, stream in ready:
            take = len(stream.pending) if k is None else k
            batch[sid] = ([stream.pending.popleft() for _ in range(take)], stream.encode)
            if stream.pending:
                self._wakeup.set()  # leftovers go in the next call
        return batch

    def _compute(self, batch: dict[int, tuple[list[Chunk], Encoder]]) -> dict[int, list[tuple[ChunkResult, str | bytes]]]:
        """Worker thread: one feed_many over all streams (several chunks of one stream are
        concatenated in time), then split and encode each chunk's result."""
        joined = {sid: cs[0].x if len(cs) == 1 else torch.cat([c.x for c in cs]) for sid, (cs, _) in batch.items()}
        want = {sid for sid in batch if (s := self._streams.get(sid)) is None or s.outputs}
        if len(want) == len(batch):
            results = self.streamer.feed_many(joined)
        else:  # some clients want scores only: no (l, o) distributions for them
            results = self.streamer.feed_many(joined, outputs=want)
        out: dict[int, list[tuple[ChunkResult, str | bytes]]] = {}
        for sid, (chunks, encode) in batch.items():
            res, pos, items = results[sid], 0, []
            for c in chunks:
                part = ChunkResult(None if res.outputs is None else res.outputs[pos : pos + c.n],
                                   None if res.scores is None else res.scores[pos : pos + c.n])
                items.append((part, encode(c, part)))
                pos += c.n
            out[sid] = items
        return out

    def _deliver(self, batch: dict[int, tuple[list[Chunk], Encoder]], outcome: dict[int, Any]) -> None:
        now = time.perf_counter()
        for sid, (chunks, _) in batch.items():
            stream = self._streams.get(sid)
            if stream is None:
                continue
            got = outcome.get(sid)
            if isinstance(got, BaseException) or got is None:
                for _ in chunks:
                    stream.slots.release()
                stream.on_error(got if got is not None else RuntimeError("no result"))
                continue
            for chunk, (result, message) in zip(chunks, got):
                if self.metrics is not None:
                    self.metrics.observe_chunk(now - chunk.received)
                stream.deliver(chunk, result, message)
