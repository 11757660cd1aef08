"""The engine: one loop that batches the pending work of all live streams into one model call
(``Streamer.launch``), run in a single worker thread (model compute never runs on the event
loop; the Streamer is touched by that one thread only, so it needs no lock). Calls are
pipelined: call k + 1 is gathered and launched before call k is collected, so on a GPU the
host's per-call work (validating, stacking, encoding) overlaps the device's.

Per stream::

    submit(sid, chunk) --(bounded: waits while queue_depth chunks are unanswered)--> pending
    engine: take at most ``slice_samples`` samples of every stream's pending chunks (a large
            chunk is cut into slices computed in successive calls, interleaved with the other
            streams) -> launch (thread) ... collect (thread, after the next launch)
            -> encoder.part(slice) (thread)
            -> when a chunk's last slice is done: encoder.finish(chunk, parts) (thread)
            -> deliver(chunk, message) (loop)
    the connection's sender sends the message, then calls done(sid) to free one queue slot

Each model call does bounded work per stream (``slice_samples``), encoding included, so one
stream's large frame never holds the others (or lifecycle calls such as opening a stream)
for longer than one bounded call. A chunk holds its queue slot from ``submit`` until its
result has been sent, so a client that sends faster than the model runs, or reads results
slower than they come, is slowed; the engine itself never waits on any client. Lifecycle calls
(open, restore, snapshot, close) go through the same single-thread executor, so they are
ordered after any compute already submitted; ``close`` first lets the engine finish a chunk
it has started and collect the calls that hold it, so a snapshot always lies on a chunk
boundary of the delivered results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from streamssm.errors import ConfigError, StateError
from streamssm.inference import PendingBatch, Streamer
from streamssm.service.config import ServeConfig

log = logging.getLogger(__name__)


class Chunk:
    """One received frame, already turned into model input ``x`` (tokens (l,) or values (l, c);
    a tensor, or in the ``serve --workers`` engine process a numpy view of its link message).
    ``received``: perf_counter seconds (default: now); ``n``: samples in x (default: read from x;
    the engine process has it from the worker's message). The engine process makes one per
    chunk: with slots and ``n`` given, ~0.5 us against ~1.1 us for the dataclass this was."""

    __slots__ = ("seq", "start", "x", "received", "taken", "parts", "n")

    def __init__(self, seq: int, start: int, x: torch.Tensor | np.ndarray, received: float | None = None,
                 n: int | None = None):
        self.seq = seq
        self.start = start  # sample offset of x[0] in the stream
        self.x = x
        self.received = time.perf_counter() if received is None else received
        self.n = int(x.shape[0]) if n is None else n
        self.taken = 0  # samples handed to the engine so far (event loop)
        self.parts: list[Any] = []  # encoded slices so far (worker thread)


def _piece(chunk: Chunk, a: int, b: int) -> torch.Tensor | np.ndarray:
    """Samples [a, b) of a chunk's input (the array itself when that is all of it)."""
    return chunk.x if a == 0 and b == chunk.n else chunk.x[a:b]


def _joined(pieces: Pieces) -> torch.Tensor | np.ndarray:
    """A stream's pieces of one call, concatenated in time: a tensor, or a numpy array where its
    chunks hold numpy views of their link message (the ``serve --workers`` engine process: no
    torch call on its event loop)."""
    parts = [_piece(*piece) for piece in pieces]
    if isinstance(parts[0], np.ndarray):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stacked(joined: list[torch.Tensor | np.ndarray]) -> torch.Tensor | None:
    """The streams' joined inputs as one (b, l[, c]) tensor when all are numpy arrays of one shape
    (the engine process under uniform batching: one np.stack instead of a tensor per stream and a
    torch.stack over them); else None."""
    first = joined[0]
    if not isinstance(first, np.ndarray) or any(not isinstance(x, np.ndarray) or x.shape != first.shape
                                                for x in joined):
        return None
    return torch.from_numpy(np.stack(joined))


class Slice(NamedTuple):
    """One model call's results for one slice of a chunk (n samples), on the CPU."""

    outputs: torch.Tensor | None  # (n, o) fp32 head outputs; None for a scores-only stream
    scores: np.ndarray | None  # (n,) float32 log-likelihoods (token lm only)


class Encoder(Protocol):
    """How one stream's results become wire messages (both methods run in the worker thread)."""

    def part(self, chunk: Chunk, result: Slice) -> Any:
        """One computed slice of ``chunk`` -> an encoded piece."""

    def finish(self, chunk: Chunk, parts: list[Any]) -> Any:
        """All pieces of ``chunk``, in order -> the chunk's message (handed to ``deliver``)."""


#: deliver(chunk, message) on the event loop; error(exc) when the stream's compute failed
Deliver = Callable[[Chunk, Any], None]
OnError = Callable[[BaseException], None]
#: one engine call's work for one stream: (chunk, first sample, end sample) slices, in order
Pieces = list[tuple[Chunk, int, int]]


class QueueSlots:
    """One stream's queue: at most ``depth`` chunks unanswered (submitted, result not yet sent
    or dropped). ``acquire`` waits for a free slot (first come, first served), ``try_acquire``
    takes one only if that needs no wait; ``answered`` frees slots. (A counter and a queue of
    futures rather than an asyncio.Semaphore: the engine process takes a slot per chunk without
    a coroutine.)"""

    def __init__(self, depth: int):
        self.depth = depth
        self.unanswered = 0
        self._waiters: deque[asyncio.Future] = deque()  # acquire() calls waiting for a slot, in order
        self._drains: list[asyncio.Future] = []

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one; False otherwise."""
        if self.unanswered >= self.depth or self._waiters:
            return False
        self.unanswered += 1
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # the slot came with the cancellation
                self.answered()
            elif granted in self._waiters:
                self._waiters.remove(granted)
            raise

    def answered(self, chunks: int = 1) -> None:
        """``chunks`` results were sent or dropped (or never queued): free their slots."""
        self.unanswered -= chunks
        while self._waiters and self.unanswered < self.depth:
            granted = self._waiters.popleft()
            if not granted.done():
                self.unanswered += 1  # the slot is the waiter's
                granted.set_result(None)
        if self.unanswered <= 0:
            for drained in self._drains:
                if not drained.done():
                    drained.set_result(None)
            self._drains.clear()

    async def drain(self) -> None:
        """Wait until no chunk is unanswered: chunks submitted meanwhile are waited for too, so
        callers stop the submits first (a closing stream takes no more)."""
        if self.unanswered <= 0:
            return
        drained = asyncio.get_running_loop().create_future()
        self._drains.append(drained)
        try:
            await drained
        finally:
            if drained in self._drains:
                self._drains.remove(drained)


@dataclass
class _Stream:
    sid: int
    encoder: Encoder
    deliver: Deliver
    on_error: OnError
    slots: QueueSlots
    outputs: bool  # False: the client wants scores only (Slice.outputs None)
    slice_samples: int  # this stream's samples per model call
    pending: deque[Chunk] = field(default_factory=deque)
    closing: bool = False
    failed: bool = False
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set after each delivery
    computed: tuple[int, int] = (0, 0)  # (chunks, samples) whose results exist (worker thread)
    partial: bool = False  # a chunk is computed only in part (worker thread)
    in_flight: int = 0  # launched model calls not yet collected that hold this stream's slices

    @property
    def backlog(self) -> int:
        """Samples pending and not yet handed to the engine."""
        pending = self.pending
        if len(pending) == 1:  # the usual case, without a generator (once per stream and call)
            return pending[0].n - pending[0].taken
        return sum(c.n for c in pending) - (pending[0].taken if pending else 0)


class StreamQueues:
    """Streams by id, each with its :class:`QueueSlots`: the queue calls the sessions make, the
    same on a :class:`Scheduler` and on a worker's
    :class:`~streamssm.service.remote.RemoteScheduler`."""

    _streams: dict[int, Any]  # id -> a stream with ``slots``

    def _get(self, sid: int) -> Any:
        try:
            return self._streams[sid]
        except KeyError:
            raise StateError(f"unknown stream id {sid}") from None

    async def _take_slot(self, sid: int) -> Any:
        """Wait for a free queue slot of ``sid`` and take it; StateError when the stream is
        closing or failed (also when that happened while it waited)."""
        stream = self._get(sid)
        await stream.slots.acquire()
        if stream.closing or stream.failed:
            stream.slots.answered()
            raise StateError(f"stream {sid} is closing")
        return stream

    def done(self, sid: int) -> None:
        """The result of one chunk of ``sid`` was sent (or dropped): free its queue slot."""
        stream = self._streams.get(sid)
        if stream is not None:
            stream.slots.answered()

    def unanswered(self, sid: int) -> int:
        """Chunks of ``sid`` submitted whose results are not sent yet (0 for unknown streams)."""
        stream = self._streams.get(sid)
        return 0 if stream is None else stream.slots.unanswered

    async def drain(self, sid: int) -> None:
        """Wait until every submitted chunk of ``sid`` has been answered and sent."""
        await self._get(sid).slots.drain()


@dataclass
class _Launched:
    """One model call between its launch and its collection."""

    batch: dict[int, Pieces]
    t0: float  # perf_counter at launch
    timing: list[float] = field(default_factory=lambda: [0.0, 0.0])  # engine-thread s: model, encoding
    pending: PendingBatch | None = None
    error: BaseException | None = None  # the launch failed (no state changed)


class Scheduler(StreamQueues):
    """Batches all live streams of one :class:`~streamssm.inference.Streamer`.

    ``slice_samples`` bounds the samples one stream contributes to one model call.
    ``batching`` picks how many pending samples per stream one call takes (:meth:`_gather`).
    ``batch_wait`` (seconds): how long the idle engine may wait for the streams that have
    nothing pending before it calls the model (:meth:`_wait_for_more`; 0: it never waits).
    ``pipeline_fill``: while a call is in flight, the next goes out before it is collected only
    when at least ``pipeline_fill`` streams per stream of the call in flight have samples pending,
    or every live stream has (:meth:`_run`; 1: as many). Larger: fewer, bigger calls while the
    device is busy (a bigger call costs the GPU less per stream, and each call costs the engine
    process a fixed share of host CPU); ``batch_wait`` never applies then.
    ``metrics`` (optional) receives ``observe_batch(streams, samples, seconds)`` and
    ``observe_chunks(latencies_s)`` calls on the event loop. Defaults: ``ServeConfig``'s.
    """

    def __init__(self, streamer: Streamer, queue_depth: int = ServeConfig.queue_depth, metrics: Any = None,
                 batching: str = ServeConfig.batching, slice_samples: int = ServeConfig.slice_samples,
                 batch_wait: float = ServeConfig.batch_wait, pipeline_fill: float = ServeConfig.pipeline_fill):
        if queue_depth < 1:
            raise ConfigError(f"queue_depth must be >= 1, got {queue_depth}")
        if not batch_wait >= 0:
            raise ConfigError(f"batch_wait must be >= 0 seconds, got {batch_wait}")
        self.batch_wait = batch_wait
        if not pipeline_fill >= 0:
            raise ConfigError(f"pipeline_fill must be >= 0, got {pipeline_fill}")
        self.pipeline_fill = pipeline_fill
        if batching not in ("uniform", "greedy"):
            raise ConfigError(f"batching must be 'uniform' or 'greedy', got {batching!r}")
        if slice_samples < 1:
            raise ConfigError(f"slice_samples must be >= 1, got {slice_samples}")
        self.batching = batching
        self.slice_samples = slice_samples
        self.streamer = streamer
        self.queue_depth = queue_depth
        self.metrics = metrics
        self._streams: dict[int, _Stream] = {}
        #: streams that may have pending samples (set by submit; _gather drops those without), so
        #: a call costs O(streams with work), not O(live streams): small calls over many streams
        #: made the engine process's loop scan every stream per call
        self._ready: dict[int, _Stream] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamssm-engine")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches = 0  # number of feed_batch calls so far

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

    async def open(self, encoder: Encoder, deliver: Deliver, on_error: OnError, snapshot: bytes | None = None,
                   outputs: bool = True, slice_samples: int | None = None) -> int:
        """Open a stream (from ``snapshot`` when given); StateError when the pool is full or the
        snapshot belongs to another model. ``outputs=False``: its results carry scores only
        (``Streamer.feed_batch(outputs=...)``: no (l, o) distribution leaves the device).
        ``slice_samples``: a smaller per-call bound for this stream (e.g. when each of its samples
        costs many result values to encode); at most the scheduler's.

        Cancellation-safe: if the caller is cancelled while the row is being opened, the row
        is closed again as soon as the worker has opened it (no leaked pool slot)."""
        fn, args = (self.streamer.open, ()) if snapshot is None else (self.streamer.restore, (snapshot,))
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            sid = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._close_orphan)
            raise
        limit = self.slice_samples if slice_samples is None else max(1, min(slice_samples, self.slice_samples))
        self._streams[sid] = _Stream(sid, encoder, deliver, on_error, QueueSlots(self.queue_depth), outputs,
                                     limit)
        return sid

    def _close_orphan(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._executor.submit(self.streamer.close, future.result())

    async def submit(self, sid: int, chunk: Chunk) -> None:
        """Queue one chunk; waits while the stream already has ``queue_depth`` unanswered chunks."""
        if not self.submit_nowait(sid, chunk):
            self._queue(await self._take_slot(sid), chunk)

    def submit_nowait(self, sid: int, chunk: Chunk) -> bool:
        """Queue one chunk if the stream has a free queue slot now (True); False when the caller
        must ``await submit`` instead (no coroutine on the engine process's per-chunk path).
        StateError for an unknown, closing or failed stream."""
        stream = self._get(sid)
        if stream.closing or stream.failed:
            raise StateError(f"stream {sid} is closing")
        if not stream.slots.try_acquire():
            return False
        self._queue(stream, chunk)
        return True

    def _queue(self, stream: _Stream, chunk: Chunk) -> None:
        stream.pending.append(chunk)
        self._ready[stream.sid] = stream
        self._wakeup.set()

    async def reset(self, sid: int, computed: int) -> int:
        """Zero the state of ``sid`` (its pool row closed and opened again, between two model
        calls), which must have no chunk pending; the stream then counts ``computed`` chunks.
        Returns the stream's new id."""
        stream = self._get(sid)
        if stream.pending or stream.failed:
            raise StateError(f"stream {sid} cannot be reset with chunks pending or after a failure")
        while stream.in_flight and not stream.failed:  # its last slices still to be collected
            stream.progress.clear()
            await stream.progress.wait()
        new = await self._call(self._reopen, sid)
        self._streams[new] = self._streams.pop(sid)
        stream.sid, stream.computed = new, (computed, stream.computed[1])
        return new

    def _reopen(self, sid: int) -> int:
        self.streamer.close(sid)
        return self.streamer.open()  # the row just freed, zeroed

    async def close(self, sid: int, snapshot: bool = False) -> bytes | None:
        """Drop the stream's not-yet-started chunks and free its pool row. With ``snapshot``,
        first let the engine finish a chunk it has started and return the snapshot bytes (state
        at the end of the last chunk delivered); without, drop that chunk too (a large frame of
        a client that is gone costs no more model calls)."""
        stream = self._streams.get(sid)
        if stream is None:
            return None
        stream.closing = True
        try:
            keep = 1 if snapshot and stream.pending and stream.pending[0].taken and not stream.failed else 0
            while len(stream.pending) > keep:
                stream.pending.pop()
                stream.slots.answered()
            # a snapshot waits for the started chunk and for any launched call that holds its
            # slices (the pool row advances in launch order, the delivered results at collection)
            while (stream.pending or (snapshot and stream.in_flight)) and not stream.failed:
                stream.progress.clear()
                self._wakeup.set()
                await stream.progress.wait()
            return await self._call(self._snapshot_and_close, sid, snapshot and not stream.failed)
        finally:
            self._streams.pop(sid, None)

    def _snapshot_and_close(self, sid: int, snapshot: bool) -> bytes | None:
        try:
            return self.streamer.snapshot(sid) if snapshot else None
        finally:
            self.streamer.close(sid)

    async def checkpoint(self, sid: int) -> tuple[bytes, int, int] | None:
        """A snapshot of a live stream with the (chunks, samples) it covers, taken between two
        model calls; None when the stream is gone, in the middle of a chunk or in a launched call
        not yet collected."""
        if sid not in self._streams:
            return None
        return await self._call(self._checkpoint, sid)

    def _checkpoint(self, sid: int) -> tuple[bytes, int, int] | None:
        stream = self._streams.get(sid)
        if stream is None or stream.partial or stream.failed or stream.in_flight:
            return None
        return (self.streamer.snapshot(sid), *stream.computed)

    # ------------------------------------------------------------------ the engine loop

    async def _run(self) -> None:
        """Gather, launch, and collect the previous call: call k + 1 is prepared and queued on the
        device while call k runs, so the host's per-call work hides behind the device's (CUDA;
        on the CPU a launch computes, and the pipeline only reorders the same work). Call k + 1
        goes out early only while streams are backlogged (at least ``pipeline_fill`` times as many
        have samples pending as call k holds, or all live streams: waiting gathers no more); otherwise
        the engine collects call k first and the streams' next chunks gather into one larger call, as
        a call's fixed cost wants."""
        in_flight: _Launched | None = None
        launched: _Launched | None = None
        try:
            while True:
                if in_flight is None:
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    if self.batch_wait > 0:
                        await self._wait_for_more()
                # len(_ready): an upper bound on the streams with samples pending (_gather drops those without)
                if in_flight is None or len(self._ready) >= min(self.pipeline_fill * len(in_flight.batch),
                                                                len(self._streams)):
                    batch = self._gather()
                else:
                    batch = {}
                    self._wakeup.set()  # what is pending goes out right after the collection
                launched = await self._launch_batch(batch) if batch else None
                if in_flight is not None:
                    await self._land(in_flight)
                if launched is not None and launched.error is not None:  # before any later call of its streams
                    await self._land(launched)
                    launched = None
                in_flight, launched = launched, None
        finally:  # stopped: calls never collected hold no stream (a close waiting on them goes on)
            for call in (in_flight, launched):
                for sid in call.batch if call is not None else ():
                    if (stream := self._streams.get(sid)) is not None:
                        stream.in_flight = 0
                        stream.progress.set()

    async def _launch_batch(self, batch: dict[int, Pieces]) -> _Launched:
        launched = _Launched(batch, time.perf_counter())
        for sid in batch:
            self._streams[sid].in_flight += 1
        try:
            launched.pending = await self._call(self._launch, batch, launched.timing)
        except Exception as exc:  # noqa: BLE001 - a chunk failed validation: nothing ran; retried per stream
            launched.error = exc
        return launched

    async def _land(self, launched: _Launched) -> None:
        """Collect a launched call (or, when its launch failed, run its streams one by one so the
        bad one fails alone), then deliver."""
        batch, timing = launched.batch, launched.timing
        if launched.error is None:
            try:
                outcome = await self._call(self._collect, batch, launched.pending, timing)
            except Exception as exc:  # noqa: BLE001 - the device call itself failed: all its streams
                log.exception("batched compute failed for %d streams", len(batch))
                outcome = dict.fromkeys(batch, exc)
        else:
            log.warning("batched compute failed for %d streams (%s); retrying them one by one", len(batch),
                        launched.error)
            outcome = {}
            for sid, pieces in batch.items():
                try:
                    outcome.update(await self._call(self._compute, {sid: pieces}, timing))
                except Exception as exc:  # noqa: BLE001
                    outcome[sid] = exc
        for sid in batch:
            if (stream := self._streams.get(sid)) is not None:
                stream.in_flight -= 1
        self.batches += 1
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch), sum(b - a for ps in batch.values() for _, a, b in ps),
                                       time.perf_counter() - launched.t0, *timing)
        self._deliver(batch, outcome)

    async def _wait_for_more(self) -> None:
        """Wait up to ``batch_wait`` seconds until every live stream has samples pending, so that
        streams whose chunks arrive staggered share one model call: where a call's fixed cost
        dominates (a small model on a CPU), one call of N streams costs far less than N calls."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait
        while any(not s.pending for s in self._streams.values() if not (s.closing or s.failed)):
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):
                    await self._wakeup.wait()
            except TimeoutError:
                return
            self._wakeup.clear()

    def _gather(self) -> dict[int, Pieces]:
        """Take at most ``slice_samples`` pending samples of every ready stream.

        ``greedy``: up to ``slice_samples`` of each stream's backlog (whole chunks, the last one
        possibly cut). ``uniform``: the same number of samples L from every stream (L = the
        smallest backlog, at most ``slice_samples``; the rest waits for the next call), so the
        Streamer runs all streams in one round instead of one round per distinct length.
        A closing stream only gets the rest of a chunk already started.
        """
        ready = []
        for sid, stream in list(self._ready.items()):
            if not stream.pending or stream.failed or self._streams.get(sid) is not stream:  # drained, closed, reset
                del self._ready[sid]
            elif not stream.closing or stream.pending[0].taken:
                ready.append(stream)
        if not ready:
            return {}
        budget = self.slice_samples
        if self.batching == "uniform":
            budget = min(budget, min(s.backlog for s in ready))
        batch: dict[int, Pieces] = {}
        for stream in ready:
            pieces, left = [], min(budget, stream.slice_samples)
            for chunk in stream.pending:
                if left <= 0 or (stream.closing and pieces):
                    break
                take = min(left, chunk.n - chunk.taken)
                pieces.append((chunk, chunk.taken, chunk.taken + take))
                chunk.taken += take
                left -= take
            while stream.pending and stream.pending[0].taken == stream.pending[0].n:
                stream.pending.popleft()
            batch[stream.sid] = pieces
            if not stream.pending:
                del self._ready[stream.sid]
            elif not stream.closing:
                self._wakeup.set()  # leftovers go in the next call
        return batch

    def _launch(self, batch: dict[int, Pieces], timing: list[float]) -> PendingBatch:
        """Worker thread: one Streamer.launch over all streams (a stream's slices concatenated in
        time). Adds its seconds to ``timing[0]``."""
        t0 = time.perf_counter()
        joined = [_joined(pieces) for pieces in batch.values()]
        want = {sid for sid in batch if (s := self._streams.get(sid)) is None or s.outputs}
        outputs = True if len(want) == len(batch) else want
        stacked = _stacked(joined)
        if stacked is not None:
            pending = self.streamer.launch_stacked(list(batch), stacked, outputs)
        else:  # tensors (the single-process server), or numpy chunks of unequal lengths
            pending = self.streamer.launch({sid: torch.as_tensor(x) for sid, x in zip(batch, joined)}, outputs)
        timing[0] += time.perf_counter() - t0
        return pending

    def _collect(self, batch: dict[int, Pieces], pending: PendingBatch,
                 timing: list[float]) -> dict[int, list[tuple[Chunk, Any]] | BaseException]:
        """Worker thread: wait for a launched call, then encode each slice and finish each chunk
        whose last slice this was (a stream whose encoder fails gets its exception, the others go
        on). Adds the seconds of the wait to ``timing[0]`` and of the encoding to ``timing[1]``."""
        t0 = time.perf_counter()
        res = pending.result()
        t1 = time.perf_counter()
        rows = [] if res.outputs is None else res.outputs.unbind(0)
        width = max(res.lens, default=0)  # samples in a result row
        out: dict[int, list[tuple[Chunk, Any]] | BaseException] = {}
        for (sid, pieces), k, score_row in zip(batch.items(), res.output_row,
                                                 res.scores if res.scores is not None else [None] * len(batch)):
            stream, finished, pos = self._streams.get(sid), [], 0
            out[sid] = finished
            if stream is None:
                continue
            outputs = None if k is None else rows[k]
            try:
                for chunk, a, b in pieces:
                    n = b - a
                    if pos == 0 and n == width:  # all of the row (uniform batching): no slicing
                        part = Slice(outputs, score_row)
                    else:  # views: ~0.2 us a numpy slice, ~1 us a tensor slice
                        part = Slice(None if outputs is None else outputs[pos:pos + n],
                                     None if score_row is None else score_row[pos:pos + n])
                    pos += n
                    chunk.parts.append(stream.encoder.part(chunk, part))
                    stream.partial = b < chunk.n
                    if not stream.partial:
                        finished.append((chunk, stream.encoder.finish(chunk, chunk.parts)))
                        chunk.parts = []
                        stream.computed = (chunk.seq + 1, chunk.start + chunk.n)
            except Exception as exc:  # noqa: BLE001 - this stream's results cannot be encoded
                log.exception("encoding the results of stream %d failed", sid)
                out[sid] = exc
        timing[0] += t1 - t0
        timing[1] += time.perf_counter() - t1
        return out

    def _compute(self, batch: dict[int, Pieces], timing: list[float]) -> dict[int, Any]:
        """Worker thread: launch and collect at once (a failed call's streams, one by one)."""
        return self._collect(batch, self._launch(batch, timing), timing)

    def _deliver(self, batch: dict[int, Pieces], outcome: dict[int, Any]) -> None:
        now, latencies = time.perf_counter(), []
        for sid, pieces in batch.items():
            stream = self._streams.get(sid)
            if stream is None:
                continue
            got = outcome.get(sid)
            if isinstance(got, BaseException) or got is None:
                stream.failed = True
                stream.slots.answered(sum(1 for c, _, b in pieces if b == c.n))  # the others are still pending
                stream.slots.answered(len(stream.pending))  # nothing more will be computed for this stream
                stream.pending.clear()
                stream.progress.set()
                stream.on_error(got if got is not None else RuntimeError("no result"))
                continue
            for chunk, message in got:
                latencies.append(now - chunk.received)
                stream.deliver(chunk, message)
            stream.progress.set()
        if self.metrics is not None:
            self.metrics.observe_chunks(latencies)
