"""One live stream on one connection (:class:`Session`): its counters, sender task and replay
buffer; it is also the stream's scheduler ``Encoder``. It reaches the server only through
:class:`SessionHost`, the small interface :class:`~streamssm.service.server.StreamServer`
offers its sessions.

Every data frame and every ``reset`` takes the next seq and gets exactly one result, in
order. Most go through the scheduler; a frame whose samples the stream's resampler holds back
(n = 0) and a reset with nothing to compute are answered here, once every earlier seq is
(:meth:`Session._answer_here`). A reset zeroes the stream's pool row between two model calls
(after the samples the resampler still held are computed in the reset's own result). Streams
the server resamples are neither parked nor written ahead (the resampler's filter state is
not serializable): their resume token gives 4410 ``stream_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State
from websockets.exceptions import ConnectionClosed

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ProtocolError, StateError

from .codec import ModelCodec
from .config import ServeConfig
from .protocol import (
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    POLICY_VIOLATION,
    UNSUPPORTED_DATA,
    ResultPiece,
    Start,
    dumps,
    join_result,
    parse_control,
    parse_ping,
    quoted,
    ready_message,
    result_piece,
)
from .resume import Parked, ResumeStore
from .scheduler import Chunk, Scheduler, Slice

log = logging.getLogger(__name__)
T = TypeVar("T")
_THREAD_DECODE_BYTES = 1 << 16  # frames at least this big are decoded off the event loop
#: control messages a second (and at once) a stream may send before the server stops reading its
#: socket for a while: no queue slot bounds them, and each is parsed on the event loop (StreamClient
#: sends one ack per 8 results and no pings of its own)
CONTROL_RATE = 1000


class SessionHost(Protocol):
    """What a session uses of its server: the loaded model and its settings, the shared
    scheduler and resume store, and two calls."""

    config: ServeConfig
    bundle: ServingBundle
    codec: ModelCodec
    scheduler: Scheduler
    store: ResumeStore

    def sample_result_bytes(self, start: Start) -> int:
        """Wire bytes of one sample's result for a stream started with ``start``."""
        ...

    def remember_failure(self, token: str, exc: BaseException) -> None:
        """Record why the stream of ``token`` failed (its resume is refused with that reason)."""
        ...


class Session:
    """One live stream on one connection: counters, the sender task, the replay buffer.

    Also the stream's :class:`~streamssm.service.scheduler.Encoder` (``part``/``finish`` run
    in the engine thread)."""

    def __init__(self, server: SessionHost, ws: ServerConnection, start: Start, token: str,
                 owner: str, parked: Parked | None):
        self.server, self.ws, self.start, self.token, self.owner = server, ws, start, token, owner
        self.sid = -1
        self.next_seq = parked.next_seq if parked else 0  # seq of the next frame received
        self.samples_in = parked.samples if parked else 0  # sample offset of the next frame
        self.done_seq = self.next_seq  # chunks whose results exist
        self.done_samples = self.samples_in
        self.stats: dict[str, Any] = dict(parked.stats) if parked else {"log_likelihood": 0.0, "scored": 0, "last": None}
        self.stats.setdefault("scored", self.done_samples)  # parked by a server that counted every sample
        self.replay: deque[tuple[int, str | bytes]] = deque(parked.replay if parked else ())
        self.replay_size = sum(len(m) for _, m in self.replay)
        self.resampler = server.codec.resampler(start)
        self._sample_result_bytes = server.sample_result_bytes(start)
        self.resets: set[int] = set()  # seqs of resets in progress (their results are marked)
        self.resetting = False  # no write-ahead while a reset is between its result and the zeroing
        self.progress = asyncio.Event()  # set whenever done_seq grows
        #: (message, whether sending it answers a chunk of the scheduler and frees a queue slot)
        self.outbox: asyncio.Queue[tuple[str | bytes, bool]] = asyncio.Queue()
        self.connected = True
        self.ended = False
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()
        self.sender: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None  # the handler's task while it waits in _watched()
        self._interrupt: ProtocolError | ConnectionClosed | None = None  # why that wait was cancelled
        self._close_watch: asyncio.Task | None = None
        self._watchdog: asyncio.TimerHandle | None = None  # the idle timer (armed by _watched())
        self.last_activity = time.monotonic()  # last message received or result sent
        self.send_started: float | None = None  # monotonic time of the send in progress
        self.written_seq = -1  # done_seq of the last write-ahead
        self._control_tokens, self._control_at = float(CONTROL_RATE), time.monotonic()  # CONTROL_RATE's bucket

    # -- called by the scheduler (engine thread) ---------------------------------------------

    def part(self, chunk: Chunk, result: Slice) -> tuple[ResultPiece, np.ndarray | None, list | None]:
        """One slice's results -> (encoded piece, its scores, its last output row)."""
        codec, n = self.server.codec, (chunk.n if result.scores is None else int(result.scores.shape[0]))
        if result.outputs is None:  # scores only: result_piece reads just the shape (n, o)
            outputs = np.broadcast_to(np.float32(0), (n, self.server.codec.output_dim))
        else:
            outputs = codec.postprocess(result.outputs)
        last = outputs[-1].tolist() if codec.head != "lm" and len(outputs) else None
        return result_piece(outputs, result.scores, self.start), result.scores, last

    def finish(self, chunk: Chunk, parts: list) -> tuple[str | bytes, float, int, list | None]:
        """All slices of a chunk -> (its wire message, the sum of its scores and how many it sums,
        its last output row). The sum leaves out the samples training left out of its loss
        (``codec.unscored_token``: N bases of a DNA model trained with mask_n), so the summary's
        bits per token are the test metric's."""
        codec = self.server.codec
        message = join_result(chunk.seq, chunk.start, codec.output_dim, [p for p, _, _ in parts], self.start,
                              reset=chunk.seq in self.resets)
        scores = [s for _, s, _ in parts if s is not None]
        scored, score_sum = 0, 0.0
        if scores:
            scores = np.concatenate(scores).astype(np.float64)
            if codec.unscored_token is not None:
                scores = scores[np.asarray(chunk.x)[: len(scores)] != codec.unscored_token]
            scored, score_sum = len(scores), float(scores.sum())
        return message, score_sum, scored, parts[-1][2] if parts else None

    # -- called by the scheduler (event loop) ------------------------------------------------

    def deliver(self, chunk: Chunk, done: tuple[str | bytes, float, int, list | None]) -> None:
        message, score_sum, scored, last = done
        self.done_samples = chunk.start + chunk.n
        self.stats["log_likelihood"] += score_sum
        self.stats["scored"] += scored
        if last is not None:  # the summary's last forecast / probabilities
            self.stats["last"] = last
        self._answered(chunk.seq, message, slot=True)

    def _answered(self, seq: int, message: str | bytes, slot: bool) -> None:
        """The result of ``seq`` exists: keep it for replay and send it. ``slot``: it answers a
        scheduler chunk, whose queue slot its sending (or dropping) frees."""
        self.done_seq = seq + 1
        self.progress.set()
        self.replay.append((seq, message))
        self.replay_size += len(message)
        limit = self.server.config.replay_bytes
        while self.replay_size > limit and len(self.replay) > 1:
            self.replay_size -= len(self.replay.popleft()[1])
        if self.connected:
            self.outbox.put_nowait((message, slot))
        elif slot:
            self.server.scheduler.done(self.sid)

    def acknowledge(self, seq: int) -> None:
        """The client holds every result up to ``seq``: they need no replay."""
        while self.replay and self.replay[0][0] <= seq:
            self.replay_size -= len(self.replay.popleft()[1])

    def on_error(self, exc: BaseException) -> None:
        log.error("stream %s: model call failed: %s", self.sid, exc)
        self.failure = exc
        self.server.remember_failure(self.token, exc)
        self.failed.set()  # wakes _caught_up
        self._interrupt_reader(self.failure_error())  # the handler closes the connection with the real reason

    def failure_error(self) -> ProtocolError:
        """Why the stream failed, as the handler closes with it: a model call's exception as
        1011, a ProtocolError (e.g. a worker's engine gone: 1012) as it is."""
        exc = self.failure
        if isinstance(exc, ProtocolError):
            return exc
        return ProtocolError(f"the model call failed for this stream: {type(exc).__name__}: {exc}",
                             INTERNAL_ERROR, "internal_error")

    # -- the connection ----------------------------------------------------------------------

    def owed(self) -> bool:
        """Whether the server still owes this client results (its silence is then not idleness)."""
        return self.sid >= 0 and self.server.scheduler.unanswered(self.sid) > 0

    def check_reading(self) -> None:
        """ProtocolError 1008 when one result has waited more than idle_timeout to be sent."""
        idle = self.server.config.idle_timeout
        if self.send_started is not None and time.monotonic() - self.send_started > idle:
            raise ProtocolError(f"the client has not read its results for {idle:g} s", POLICY_VIOLATION,
                                "idle_timeout")

    async def receive(self) -> str | bytes:
        """The client's next message, awaited in the handler's own task (no task or timer per
        frame). ProtocolError 1008 ``idle_timeout`` after ``idle_timeout`` seconds without a
        message or a result sent, not counting time the server owes results (the watchdog,
        :meth:`_check_idle`); the stream's failure as soon as its model call fails, even while
        the client sends nothing (:meth:`on_error` interrupts the wait)."""
        return await self._watched(self.ws.recv)  # cancelling recv() loses no message

    async def _watched(self, wait: Callable[[], Awaitable[T]]) -> T:
        """``await wait()`` in the handler's task under the idle watchdog, interrupted by the
        stream's failure (:meth:`receive`; also a submit waiting for a queue slot, which a client
        that reads no results would otherwise hold forever)."""
        if self.failure is not None:
            raise self.failure_error()
        if self.ws.state is State.CLOSED:  # a wait begun after the close (_notice_close missed it)
            raise self.ws.protocol.close_exc
        if self._watchdog is None:
            self._watch(self.last_activity + self.server.config.idle_timeout)
        task = self._reader = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        try:
            return await wait()
        except asyncio.CancelledError:
            why, self._interrupt = self._interrupt, None
            if why is None or task.uncancel() > cancelling:  # (also) cancelled by someone else
                raise
            if self.failure is not None:
                raise self.failure_error() from None
            raise why from None
        finally:
            self._reader = None

    def _interrupt_reader(self, why: ProtocolError | ConnectionClosed) -> None:
        """End the handler's wait in :meth:`_watched` with ``why`` (nothing when it is not waiting)."""
        if self._reader is not None and self._interrupt is None:
            self._interrupt = why
            self._reader.cancel()

    def _watch(self, at: float) -> None:
        """Arm the idle timer for monotonic time ``at`` (seconds)."""
        self._watchdog = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._check_idle)

    def _check_idle(self) -> None:
        """The idle timer: while the handler waits for the client, time it out once it has been
        ``idle_timeout`` seconds since the last message or result sent (looking again every
        second while the server owes it results), or once a result has waited that long to be
        sent; re-armed for the next possible expiry. Not waiting: disarmed (_watched() arms it)."""
        self._watchdog = None
        if self._reader is None:
            return
        idle, now = self.server.config.idle_timeout, time.monotonic()
        try:
            self.check_reading()
        except ProtocolError as exc:
            self._interrupt_reader(exc)
            return
        if self.owed():  # waiting on the server's backlog: look again in a second
            self._watch(now + min(1.0, idle))
        elif now - self.last_activity < idle:
            self._watch(self.last_activity + idle)
        else:
            self._interrupt_reader(ProtocolError(f"no message for {idle:g} s", POLICY_VIOLATION, "idle_timeout"))

    async def _send_loop(self) -> None:
        get, send, done, task_done = self.outbox.get, self.ws.send, self.server.scheduler.done, self.outbox.task_done
        try:
            while True:
                message, slot = await get()
                self.send_started = time.monotonic()
                try:
                    await send(message)
                finally:
                    self.send_started = None
                    self.last_activity = time.monotonic()
                    if slot:
                        done(self.sid)
                    task_done()
        except ConnectionClosed:  # free the queue so a handler blocked in submit() wakes up
            self._disconnect()

    def _disconnect(self) -> None:
        """No more sending: results from now on only go to the replay buffer."""
        self.connected = False
        while not self.outbox.empty():
            if self.outbox.get_nowait()[1]:
                self.server.scheduler.done(self.sid)
            self.outbox.task_done()

    async def greet(self, ack: int, resumed: bool) -> None:
        """Send ``ready``, then replay the results after ``ack``; start the sender."""
        srv = self.server
        durable = self.resumable and srv.store.state_dir is not None  # parked and written-ahead files
        await self.ws.send(ready_message(token=self.token, model=srv.bundle.fingerprint, head=srv.codec.head,
                                         output_dim=srv.codec.output_dim, next_seq=self.next_seq,
                                         samples=self.samples_in, resumed=resumed, start=self.start,
                                         queue_depth=srv.config.queue_depth,
                                         saved_seq=self.next_seq - 1 if durable else None,
                                         model_sample_rate=srv.codec.spec.sample_rate,
                                         downmix=srv.codec.downmix(self.start)))
        for seq, message in list(self.replay):
            if seq > ack:
                await self.ws.send(message)
        self.last_activity = time.monotonic()
        loop = asyncio.get_running_loop()
        self.sender = loop.create_task(self._send_loop())
        self._close_watch = loop.create_task(self._notice_close())

    async def _notice_close(self) -> None:
        """When the connection closes, end a wait of the handler's that is not on the socket (a
        queue slot for its next chunk): a client that filled its queue and left kept its pool row and
        the engine busy until every queued chunk was computed, when they are to be dropped."""
        await self.ws.wait_closed()
        self._interrupt_reader(self.ws.protocol.close_exc)

    @property
    def resumable(self) -> bool:
        """Whether the stream is parked on disconnect and written ahead (not when resampled)."""
        return self.server.store.enabled and self.resampler is None

    async def run(self) -> None:
        """Receive frames until ``end`` (then summary + close 1000) or an error/close."""
        cfg, codec = self.server.config, self.server.codec
        while True:
            message = await self.receive()
            self.last_activity = time.monotonic()
            size = len(message)
            if size > cfg.max_frame_bytes:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit of {cfg.max_frame_bytes} bytes",
                                    MESSAGE_TOO_BIG, "frame_too_big")
            if isinstance(message, str) and message.startswith("{"):
                if await self._control(parse_control(message)):
                    return
                await self._pace_control()
                continue
            if isinstance(message, str) and self.start.format != "text":
                raise ProtocolError("text frame in a binary stream: text frames carry JSON control messages only",
                                    UNSUPPORTED_DATA, "text_in_binary")
            args = (message, self.start, cfg.nan_policy, self.resampler)
            if size >= _THREAD_DECODE_BYTES:
                x = await asyncio.to_thread(codec.chunk_from_frame, *args)
            else:
                x = codec.chunk_from_frame(*args)  # type: ignore[arg-type]
            if x is None:  # the resampler holds all of its samples: a result of n = 0
                await self._answer_here(self._take_seq())
            else:
                await self._submit(x)

    async def _control(self, msg: dict[str, Any]) -> bool:
        """Act on a control message; True after ``end`` (the stream is over)."""
        kind = msg["type"]
        if kind == "end" and set(msg) == {"type"}:
            await self._end()
            return True
        if kind == "ack" and set(msg) == {"type", "seq"} and type(msg["seq"]) is int:
            if msg["seq"] < -1:  # -1: none; beyond the last result is allowed (a resume from an older write-ahead)
                raise ProtocolError(f"ack: seq must be -1 or a result's seq, got {quoted(msg['seq'])}",
                                    POLICY_VIOLATION, "bad_message")
            self.acknowledge(msg["seq"])
        elif kind == "ping":
            pong = parse_ping(msg)
            await self._outbox_room()
            if self.connected:
                self.outbox.put_nowait((pong, False))
        elif kind == "reset" and set(msg) == {"type"}:
            await self._reset()
        else:
            raise ProtocolError(f'unexpected control message {quoted(msg)} (expected {{"type": "end"}}, '
                                '{"type": "ack", "seq": int}, {"type": "ping", "id"?}, {"type": "reset"}, each with no '
                                'other fields, or data)',
                                POLICY_VIOLATION, "bad_message")
        return False

    async def _pace_control(self) -> None:
        """After a control message: a turn for the other streams (a control message awaits nothing
        else and recv() returns buffered messages at once, so a client flooding acks or pings held the
        event loop), and past CONTROL_RATE a second a pause in reading this socket (TCP then slows
        the sender)."""
        now = time.monotonic()
        self._control_tokens = min(CONTROL_RATE, self._control_tokens + (now - self._control_at) * CONTROL_RATE) - 1
        self._control_at = now
        await asyncio.sleep(0 if self._control_tokens >= 0 else -self._control_tokens / CONTROL_RATE)

    def _take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    async def _submit(self, x: torch.Tensor) -> None:
        """Queue model input x (the stream's next ``seq``) for the engine."""
        n, limit = int(x.shape[0]), self.server.config.max_result_bytes
        out_bytes = n * self._sample_result_bytes
        if out_bytes > limit:
            raise ProtocolError(
                f"a frame of {n} samples gives {out_bytes} bytes of {self.start.results} results "
                f"(limit {limit}); send smaller frames, or ask for include: [\"scores\"] "
                f"or results: \"binary\"", MESSAGE_TOO_BIG, "result_too_big")
        chunk = Chunk(self._take_seq(), self.samples_in, x)
        self.samples_in += chunk.n
        try:
            await self._watched(lambda: self.server.scheduler.submit(self.sid, chunk))
        except StateError:
            if self.failure is not None:
                raise self.failure_error() from None
            raise
        except (ProtocolError, ConnectionClosed, asyncio.CancelledError):  # interrupted before it was queued: not taken
            self.next_seq, self.samples_in = chunk.seq, chunk.start
            raise

    async def _caught_up(self, seq: int) -> None:
        """Wait until every seq before ``seq`` has its result (ProtocolError if the stream fails)."""
        while self.done_seq < seq:
            self.progress.clear()
            waits = {asyncio.ensure_future(self.progress.wait()), asyncio.ensure_future(self.failed.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self.failure is not None:
                raise self.failure_error()

    async def _answer_here(self, seq: int, reset: bool = False) -> None:
        """Answer ``seq`` with a result of no samples, after every earlier result."""
        await self._caught_up(seq)
        await self._outbox_room()
        self._answered(seq, join_result(seq, self.samples_in, self.server.codec.output_dim, [], self.start, reset),
                       slot=False)

    async def _outbox_room(self) -> None:
        """Before queueing a message no queue slot bounds (a pong, an empty result): while the
        client has queue_depth messages unsent, wait for them (the socket is not read meanwhile;
        a client that reads nothing times out as any other)."""
        if self.connected and self.outbox.qsize() >= self.server.config.queue_depth:
            await self._watched(self.outbox.join)

    async def _reset(self) -> None:
        """The state back to zero, as for a new stream; the reset takes the next seq. A resampled
        stream's held samples are flushed and computed first, in the reset's result."""
        seq = self.next_seq
        self.resets.add(seq)
        self.resetting = True
        try:
            tail = None if self.resampler is None else self.resampler.flush()
            if tail is not None and len(tail):
                await self._submit(self.server.codec.encode(tail))  # takes seq: computed before the zeroing
                await self._caught_up(seq + 1)
            else:
                self._take_seq()
                await self._caught_up(seq)
            self.sid = await self.server.scheduler.reset(self.sid, seq + 1)
            if self.done_seq == seq:
                await self._answer_here(seq, reset=True)
        finally:
            self.resets.discard(seq)
            self.resetting = False

    async def _end(self) -> None:
        """Wait for every answer to be sent (however long the server's own backlog takes; only
        a client that stops reading its results is timed out), then summary and close 1000. A
        resampled stream's last samples (those its resampler held) get one more result first."""
        sched = self.server.scheduler
        if self.resampler is not None:
            tail = self.resampler.flush()
            if len(tail):
                await self._submit(self.server.codec.encode(tail))
        for waiting in (sched.drain(self.sid), self.outbox.join()):  # every result computed, then sent
            task = asyncio.ensure_future(waiting)
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=min(1.0, self.server.config.idle_timeout))
                    if self.failure is not None:
                        raise self.failure_error()
                    self.check_reading()
            finally:
                task.cancel()
        self.ended = True
        await sched.close(self.sid)
        await self.ws.send(dumps(self.summary()))
        await self.ws.close(NORMAL_CLOSURE, "end")

    def summary(self) -> dict[str, Any]:
        head, codec = self.server.codec.head, self.server.codec
        out: dict[str, Any] = {"type": "summary", "chunks": self.done_seq, "samples": self.done_samples}
        last = self.stats.get("last")
        if head == "lm":
            ll, scored = self.stats["log_likelihood"], self.stats["scored"]
            out["scored"] = scored  # the tokens in the average (a mask_n DNA model leaves N out, as its test/bpt)
            if scored:
                out.update(log_likelihood=ll, bits_per_token=-ll / scored / 0.6931471805599453)
        elif head == "classifier" and last is not None:
            label = max(range(len(last)), key=last.__getitem__)
            out.update(probabilities=last, label=codec.classes[label] if label < len(codec.classes) else label)
        elif head == "regression" and last is not None:
            out.update(forecast=last)
        return out

    def parked(self, snapshot: bytes) -> Parked:
        s = self.start
        return Parked(snapshot, self.owner, resume_settings(s), self.done_seq, self.done_samples, dict(self.stats),
                      list(self.replay))

    async def close(self, park: bool = True) -> None:
        """Connection over: stop sending; free the stream's pool row; park the stream for
        resume unless it ended, failed, broke the protocol or never got a result."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for task in (self.sender, self._close_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task
        self._disconnect()  # unsent results stay in the replay buffer
        if self.sid < 0:
            return
        store = self.server.store
        keep = park and self.resumable and self.failure is None and not self.ended
        blob = await self.server.scheduler.close(self.sid, snapshot=keep)
        if keep and blob is not None and self.done_seq > 0:
            await asyncio.to_thread(store.park, self.token, self.parked(blob))
            log.info("stream %s parked at chunk %d (%d samples)", self.sid, self.done_seq, self.done_samples)
        elif store.enabled:
            await asyncio.to_thread(store.forget, self.token)

    async def write_ahead(self) -> None:
        """Write this live stream's state to the state dir (between two model calls)."""
        if (self.ended or self.failure is not None or self.done_seq in (0, self.written_seq) or self.resetting
                or not self.resumable):
            return
        got = await self.server.scheduler.checkpoint(self.sid)
        if got is None or got[1] != self.done_seq or self.ended or self.resetting:
            return  # in the middle of a chunk, a reset or closing: the next round writes it
        await asyncio.to_thread(self.server.store.write_ahead, self.token, self.parked(got[0]))
        self.written_seq = got[1]
        if self.connected:  # after the results it covers: the client may drop those chunks
            self.outbox.put_nowait((dumps({"type": "saved", "seq": got[1] - 1}), False))


def resume_settings(start: Start) -> dict[str, Any]:
    """What a resume must repeat: the stream's input settings and its results encoding."""
    return {"format": start.format, "sample_rate": start.sample_rate, "channels": start.channels,
            "results": start.results, "include": list(start.include)}
