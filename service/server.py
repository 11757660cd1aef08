"""``streamssm serve``: a websockets (17, asyncio) server running one checkpoint in recurrent
mode for many concurrent streams (DESIGN §5; wire protocol in service/PROTOCOL.md).

One connection = one stream. The handler only parses, validates, encodes and enqueues; the
:class:`~streamssm.service.scheduler.Scheduler` batches every stream's pending work into one
bounded model call in its worker thread (large frames in slices, results encoded there slice
by slice); a per-connection sender task writes the results back. The same port answers
``GET /healthz`` and ``GET /metrics`` (Prometheus text) through ``process_request``.

Nothing a client does holds resources after it goes: a stream's pool row is freed however the
connection ends (even before ``ready`` was sent). With ``--state-dir`` every live stream's state
is written ahead every ``write_ahead_interval`` seconds, so a crash loses at most that much;
SIGTERM/SIGINT shut down gracefully: open streams are closed with 1012 and parked, so clients
resume them with their token, on this server or on the next one started with the same
checkpoint and state dir. Parked streams are capped in count and bytes; their file I/O runs
off the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import logging
import signal
import ssl
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamssm.checkpoint import ServingBundle, load_for_serving
from streamssm.errors import ConfigError, ProtocolError, StateError
from streamssm.inference import ChunkResult, Streamer

from .codec import ModelCodec
from .metrics import ServiceMetrics
from .protocol import (
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    POLICY_VIOLATION,
    RESULT_VALUE_BYTES,
    SERVICE_RESTART,
    TRY_AGAIN_LATER,
    UNSUPPORTED_DATA,
    ResultPiece,
    Start,
    close_reason,
    dumps,
    error_message,
    join_result,
    parse_control,
    parse_start,
    ready_message,
    result_bytes,
    result_piece,
)
from .resume import Parked, ResumeStore, owner_of
from .scheduler import Chunk, Scheduler

log = logging.getLogger(__name__)
STREAM_PATHS = ("/", "/stream")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PARKED_REASONS = ("idle_timeout",)  # protocol errors after which a stream is still parked
_FAILED_KEPT = 1024  # failed streams remembered (their resume gets the failure, not "unknown")
_VALUES_PER_SLICE_SAMPLE = 16  # a stream's slice holds at most slice_samples x this many result values
_THREAD_DECODE_BYTES = 1 << 16  # frames at least this big are decoded off the event loop


@dataclass
class ServeConfig:
    """Server settings (the ``streamssm serve`` options)."""

    host: str = "127.0.0.1"
    port: int = 8765
    device: str = "cpu"
    dtype: str = "float32"
    token: str | None = None  # bearer token; None = no auth ("" is refused)
    max_streams: int = 64
    max_frame_bytes: int = 1 << 20
    max_result_bytes: int = 16 << 20  # one frame's result (protocol.result_bytes)
    replay_bytes: int = 16 << 20  # unacknowledged results kept per stream for resume
    slice_samples: int = 256  # samples of one stream per model call (bench_abuse: canary p99 vs slice)
    idle_timeout: float = 60.0
    queue_depth: int = 8
    resume_ttl: float = 300.0
    state_dir: str | None = None
    write_ahead_interval: float = 5.0  # seconds between write-aheads of live streams (state_dir)
    max_parked: int = 1024
    max_parked_bytes: int = 1 << 30
    nan_policy: str = "reject"
    certfile: str | None = None
    keyfile: str | None = None
    ping_interval: float | None = 20.0
    batching: str = "uniform"  # see Scheduler._gather

    def __post_init__(self) -> None:
        problems = []
        positive = {"max_streams": 1, "max_frame_bytes": 64, "max_result_bytes": 1024, "replay_bytes": 0,
                    "slice_samples": 1, "queue_depth": 1, "max_parked": 1, "max_parked_bytes": 1}
        for name, least in positive.items():
            if getattr(self, name) < least:
                problems.append(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.idle_timeout <= 0:
            problems.append(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if self.resume_ttl < 0:
            problems.append(f"resume_ttl must be >= 0, got {self.resume_ttl}")
        if self.write_ahead_interval <= 0:
            problems.append(f"write_ahead_interval must be > 0 seconds, got {self.write_ahead_interval}")
        if self.token is not None and not self.token.strip():
            problems.append("token is empty: give a real bearer token, or none to run without auth")
        if self.nan_policy not in ("reject", "zero"):
            problems.append(f"nan_policy must be 'reject' or 'zero', got {self.nan_policy!r}")
        if self.batching not in ("uniform", "greedy"):
            problems.append(f"batching must be 'uniform' or 'greedy', got {self.batching!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if (self.certfile is None) != (self.keyfile is None):
            problems.append("TLS needs both certfile and keyfile")
        if problems:
            raise ConfigError("invalid server settings: " + "; ".join(problems))


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Session:
    """One live stream on one connection: counters, the sender task, the replay buffer.

    Also the stream's :class:`~streamssm.service.scheduler.Encoder` (``part``/``finish`` run
    in the engine thread)."""

    def __init__(self, server: StreamServer, ws: ServerConnection, start: Start, token: str,
                 owner: str, parked: Parked | None):
        self.server, self.ws, self.start, self.token, self.owner = server, ws, start, token, owner
        self.sid = -1
        self.next_seq = parked.next_seq if parked else 0  # seq of the next frame received
        self.samples_in = parked.samples if parked else 0  # sample offset of the next frame
        self.done_seq = self.next_seq  # chunks whose results exist
        self.done_samples = self.samples_in
        self.stats: dict[str, Any] = dict(parked.stats) if parked else {"log_likelihood": 0.0, "last": None}
        self.replay: deque[tuple[int, str | bytes]] = deque(parked.replay if parked else ())
        self.replay_size = sum(len(m) for _, m in self.replay)
        self.outbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.connected = True
        self.ended = False
        self.failure: BaseException | None = None
        self.failed = asyncio.Event()
        self.sender: asyncio.Task | None = None
        self.last_activity = time.monotonic()  # last message received or result sent
        self.send_started: float | None = None  # monotonic time of the send in progress
        self.written_seq = -1  # done_seq of the last write-ahead

    # -- called by the scheduler (engine thread) ---------------------------------------------

    def part(self, chunk: Chunk, result: ChunkResult) -> tuple[ResultPiece, float, list | None]:
        """One slice's results -> (encoded piece, sum of its scores, its last output row)."""
        codec, n = self.server.codec, (chunk.n if result.scores is None else int(result.scores.shape[0]))
        if result.outputs is None:  # scores only: result_piece reads just the shape (n, o)
            outputs = np.broadcast_to(np.float32(0), (n, self.server.streamer.out_dim))
        else:
            outputs = codec.postprocess(result.outputs)
        scores = None if result.scores is None else result.scores.numpy()
        score_sum = 0.0 if scores is None else float(scores.astype(np.float64).sum())
        last = outputs[-1].tolist() if codec.head != "lm" and len(outputs) else None
        return result_piece(outputs, scores, self.start), score_sum, last

    def finish(self, chunk: Chunk, parts: list) -> tuple[str | bytes, float, list | None]:
        """All slices of a chunk -> (its wire message, sum of its scores, its last output row)."""
        message = join_result(chunk.seq, chunk.start, self.server.streamer.out_dim, [p for p, _, _ in parts], self.start)
        return message, sum(s for _, s, _ in parts), parts[-1][2] if parts else None

    # -- called by the scheduler (event loop) ------------------------------------------------

    def deliver(self, chunk: Chunk, done: tuple[str | bytes, float, list | None]) -> None:
        message, score_sum, last = done
        self.done_seq = chunk.seq + 1
        self.done_samples = chunk.start + chunk.n
        self.stats["log_likelihood"] += score_sum
        if last is not None:  # the summary's last forecast / probabilities
            self.stats["last"] = last
        self.replay.append((chunk.seq, message))
        self.replay_size += len(message)
        limit = self.server.config.replay_bytes
        while self.replay_size > limit and len(self.replay) > 1:
            self.replay_size -= len(self.replay.popleft()[1])
        if self.connected:
            self.outbox.put_nowait(message)
        else:
            self.server.scheduler.done(self.sid)

    def acknowledge(self, seq: int) -> None:
        """The client holds every result up to ``seq``: they need no replay."""
        while self.replay and self.replay[0][0] <= seq:
            self.replay_size -= len(self.replay.popleft()[1])

    def on_error(self, exc: BaseException) -> None:
        log.error("stream %s: model call failed: %s", self.sid, exc)
        self.failure = exc
        self.server.remember_failure(self.token, exc)
        self.failed.set()  # wakes the handler, which closes the connection with the real reason

    def failure_error(self) -> ProtocolError:
        exc = self.failure
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

    async def _send_loop(self) -> None:
        try:
            while True:
                message = await self.outbox.get()
                self.send_started = time.monotonic()
                try:
                    await self.ws.send(message)
                finally:
                    self.send_started = None
                    self.last_activity = time.monotonic()
                    self.server.scheduler.done(self.sid)
        except ConnectionClosed:  # free the queue so a handler blocked in submit() wakes up
            self._disconnect()

    def _disconnect(self) -> None:
        """No more sending: results from now on only go to the replay buffer."""
        self.connected = False
        while not self.outbox.empty():
            self.outbox.get_nowait()
            self.server.scheduler.done(self.sid)

    async def greet(self, ack: int, resumed: bool) -> None:
        """Send ``ready``, then replay the results after ``ack``; start the sender."""
        srv = self.server
        await self.ws.send(ready_message(token=self.token, model=srv.bundle.fingerprint, head=srv.codec.head,
                                         output_dim=srv.codec.output_dim, next_seq=self.next_seq,
                                         samples=self.samples_in, resumed=resumed, start=self.start,
                                         queue_depth=srv.config.queue_depth))
        for seq, message in list(self.replay):
            if seq > ack:
                await self.ws.send(message)
        self.last_activity = time.monotonic()
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())

    async def run(self) -> None:
        """Receive frames until ``end`` (then summary + close 1000) or an error/close."""
        cfg, codec, sched = self.server.config, self.server.codec, self.server.scheduler
        scored = self.server.streamer.cfg.head == "lm" and self.server.streamer.cfg.input_kind == "tokens"
        while True:
            message = await self.server._recv(self.ws, self)
            self.last_activity = time.monotonic()
            if self.failure is not None:
                raise self.failure_error()
            size = len(message)
            if size > cfg.max_frame_bytes:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit of {cfg.max_frame_bytes} bytes",
                                    MESSAGE_TOO_BIG, "frame_too_big")
            if isinstance(message, str) and message.startswith("{"):
                msg = parse_control(message)
                if msg["type"] == "end":
                    await self._end()
                    return
                if msg["type"] == "ack" and type(msg.get("seq")) is int:
                    self.acknowledge(msg["seq"])
                    continue
                raise ProtocolError(f'unexpected control message {_short(msg)} (expected "end", '
                                    '{"type": "ack", "seq": int} or data)', POLICY_VIOLATION, "bad_message")
            if isinstance(message, str) and self.start.format != "text":
                raise ProtocolError("text frame in a binary stream: text frames carry JSON control messages only",
                                    UNSUPPORTED_DATA, "text_in_binary")
            if size >= _THREAD_DECODE_BYTES:
                x = await asyncio.to_thread(codec.chunk_from_frame, message, self.start, cfg.nan_policy)
            else:
                x = codec.chunk_from_frame(message, self.start, cfg.nan_policy)  # type: ignore[arg-type]
            n = int(x.shape[0])
            out_bytes = result_bytes(n, codec.output_dim, scored, self.start)
            if out_bytes > cfg.max_result_bytes:
                raise ProtocolError(
                    f"a frame of {n} samples gives {out_bytes} bytes of {self.start.results} results "
                    f"(limit {cfg.max_result_bytes}); send smaller frames, or ask for include: [\"scores\"] "
                    f"or results: \"binary\"", MESSAGE_TOO_BIG, "result_too_big")
            chunk = Chunk(self.next_seq, self.samples_in, x)
            self.next_seq += 1
            self.samples_in += chunk.n
            try:
                await sched.submit(self.sid, chunk)
            except StateError:
                if self.failure is not None:
                    raise self.failure_error() from None
                raise

    async def _end(self) -> None:
        """Wait for every answer to be sent (however long the server's own backlog takes; only
        a client that stops reading its results is timed out), then summary and close 1000."""
        sched = self.server.scheduler
        drain = asyncio.ensure_future(sched.drain(self.sid))
        try:
            while not drain.done():
                await asyncio.wait({drain}, timeout=min(1.0, self.server.config.idle_timeout))
                if self.failure is not None:
                    raise self.failure_error()
                self.check_reading()
        finally:
            drain.cancel()
        self.ended = True
        await sched.close(self.sid)
        await self.ws.send(dumps(self.summary()))
        await self.ws.close(NORMAL_CLOSURE, "end")

    def summary(self) -> dict[str, Any]:
        head, codec = self.server.codec.head, self.server.codec
        out: dict[str, Any] = {"type": "summary", "chunks": self.done_seq, "samples": self.done_samples}
        last = self.stats.get("last")
        if head == "lm" and self.done_samples:
            ll = self.stats["log_likelihood"]
            out.update(log_likelihood=ll, bits_per_token=-ll / self.done_samples / 0.6931471805599453)
        elif head == "classifier" and last is not None:
            label = max(range(len(last)), key=last.__getitem__)
            out.update(probabilities=last, label=codec.classes[label] if label < len(codec.classes) else label)
        elif head == "regression" and last is not None:
            out.update(forecast=last)
        return out

    def parked(self, snapshot: bytes) -> Parked:
        s = self.start
        return Parked(snapshot, self.owner, _settings(s), self.done_seq, self.done_samples, dict(self.stats),
                      list(self.replay))

    async def close(self, park: bool = True) -> None:
        """Connection over: stop sending; free the stream's pool row; park the stream for
        resume unless it ended, failed, broke the protocol or never got a result."""
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await self.sender
        self._disconnect()  # unsent results stay in the replay buffer
        if self.sid < 0:
            return
        store = self.server.store
        keep = park and store.enabled and self.failure is None and not self.ended
        blob = await self.server.scheduler.close(self.sid, snapshot=keep)
        if keep and blob is not None and self.done_seq > 0:
            await asyncio.to_thread(store.park, self.token, self.parked(blob))
            log.info("stream %s parked at chunk %d (%d samples)", self.sid, self.done_seq, self.done_samples)
        elif store.enabled:
            await asyncio.to_thread(store.forget, self.token)

    async def write_ahead(self) -> None:
        """Write this live stream's state to the state dir (between two model calls)."""
        if self.ended or self.failure is not None or self.done_seq in (0, self.written_seq):
            return
        got = await self.server.scheduler.checkpoint(self.sid)
        if got is None or got[1] != self.done_seq or self.ended:
            return  # in the middle of a chunk or closing: the next round writes it
        await asyncio.to_thread(self.server.store.write_ahead, self.token, self.parked(got[0]))
        self.written_seq = got[1]


def _settings(start: Start) -> dict[str, Any]:
    """What a resume must repeat: the stream's input settings and its results encoding."""
    return {"format": start.format, "sample_rate": start.sample_rate, "channels": start.channels,
            "results": start.results, "include": list(start.include)}


def _short(msg: dict[str, Any]) -> str:
    text = dumps(msg)
    return text if len(text) <= 80 else text[:77] + "..."


class StreamServer:
    """The service around one loaded model. ``async with StreamServer(bundle, cfg) as s:``."""

    def __init__(self, bundle: ServingBundle, config: ServeConfig | None = None):
        self.config = config or ServeConfig()
        cfg = self.config
        self.bundle = bundle
        self.codec = ModelCodec.from_bundle(bundle)
        self.metrics = ServiceMetrics()
        self.store = ResumeStore(cfg.resume_ttl, cfg.state_dir, cfg.max_parked, cfg.max_parked_bytes)
        self.streamer = Streamer(bundle.model, cfg.max_streams, cfg.device, DTYPES[cfg.dtype])
        self.scheduler = Scheduler(self.streamer, cfg.queue_depth, self.metrics, cfg.batching, cfg.slice_samples)
        self._server: Server | None = None
        self._live: dict[str, _Session] = {}  # resume token -> live session
        self._resuming: set[str] = set()  # tokens being resumed right now
        self._failed: OrderedDict[str, str] = OrderedDict()  # token -> why its stream failed
        self._tasks: list[asyncio.Task] = []
        self._owner = owner_of(cfg.token)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.token is None and not _loopback(cfg.host):
            log.warning("serving on %s without --token: anyone who reaches this port can stream "
                        "(and read the scores); set --token and TLS", cfg.host)
        await self.scheduler.start()
        ssl_ctx = None
        if cfg.certfile:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
        self._server = await serve(
            self._handler, cfg.host, cfg.port, process_request=self._process_request,
            max_size=2 * cfg.max_frame_bytes, compression=None, ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_interval, ssl=ssl_ctx,
        )
        loop = asyncio.get_running_loop()
        if self.store.enabled:
            self._tasks.append(loop.create_task(self._sweep_loop()))
            if self.store.state_dir is not None:
                self._tasks.append(loop.create_task(self._write_ahead_loop()))
        log.info("serving model %s (%s head) on %s", self.bundle.fingerprint, self.codec.head, self.url)

    async def stop(self) -> None:
        """Graceful: refuse new connections, close streams with 1012 (parked for resume), stop."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            self._server.close(code=SERVICE_RESTART, reason="server restart; resume with your token")
            await self._server.wait_closed()
            self._server = None
        await self.scheduler.stop()

    async def __aenter__(self) -> StreamServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.certfile else "ws"
        return f"{scheme}://{self.config.host}:{self.port}/"

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.store.ttl / 2)))
            await asyncio.to_thread(self.store.sweep)

    async def _write_ahead_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.write_ahead_interval)
            await self.write_ahead()

    async def write_ahead(self) -> None:
        """Write every live stream's state to the state dir (one failure is logged, not fatal)."""
        for session in list(self._live.values()):
            try:
                await session.write_ahead()
            except (OSError, StateError) as exc:
                log.error("write-ahead of stream %s failed: %s", session.sid, exc)

    def remember_failure(self, token: str, exc: BaseException) -> None:
        self._failed[token] = f"{type(exc).__name__}: {exc}"
        while len(self._failed) > _FAILED_KEPT:
            self._failed.popitem(last=False)

    # -- HTTP ------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.config.token is None:
            return True
        got = request.headers.get_all("Authorization")
        if len(got) != 1:
            return False
        return hmac.compare_digest(got[0].encode(), f"Bearer {self.config.token}".encode())

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.method != "GET":
            self.metrics.reject("http_method")
            return conn.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n")
        if path == "/healthz":
            body = dumps({"status": "ok", "model": self.bundle.fingerprint, "head": self.codec.head,
                          "live_streams": self.scheduler.live, "max_streams": self.config.max_streams,
                          "parked_streams": len(self.store)})
            return conn.respond(HTTPStatus.OK, body + "\n")
        if len(request.headers.get_all("Authorization")) > 1:
            self.metrics.reject("bad_request")
            return conn.respond(HTTPStatus.BAD_REQUEST, "more than one Authorization header\n")
        if not self._authorized(request):
            self.metrics.reject("unauthorized")
            response = conn.respond(HTTPStatus.UNAUTHORIZED, "missing or bad bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="streamssm"'
            return response
        if path == "/metrics":
            self.metrics.live_streams.set(self.scheduler.live)
            self.metrics.parked_streams.set(len(self.store))
            response = conn.respond(HTTPStatus.OK, self.metrics.render().decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = self.metrics.content_type
            return response
        if path not in STREAM_PATHS:
            self.metrics.reject("not_found")
            return conn.respond(HTTPStatus.NOT_FOUND, f"no such path; streams connect to {STREAM_PATHS[0]}\n")
        return None

    # -- websocket -------------------------------------------------------------------------------

    def _needs_outputs(self, start: Start) -> bool:
        """Whether the stream's results need ChunkResult.outputs: False only for a token lm whose
        client asked for scores alone (the Streamer then copies no (n, o) distribution)."""
        cfg = self.streamer.cfg
        return "outputs" in start.include or cfg.head != "lm" or cfg.input_kind != "tokens"

    def _slice_samples(self, start: Start) -> int:
        """Samples of this stream per model call: ``slice_samples``, fewer when each sample has
        more than 16 result values to compute and encode (a 256-way LM's JSON outputs)."""
        cfg = self.streamer.cfg
        scored = cfg.head == "lm" and cfg.input_kind == "tokens"
        values = result_bytes(1, self.codec.output_dim, scored, start) // RESULT_VALUE_BYTES[start.results]
        budget = self.config.slice_samples * _VALUES_PER_SLICE_SAMPLE
        return max(1, min(self.config.slice_samples, budget // max(1, values)))

    async def _recv(self, ws: ServerConnection, session: _Session | None = None) -> str | bytes:
        """The next message; ProtocolError 1008 ``idle_timeout`` after ``idle_timeout`` seconds
        without a message or a result sent, not counting time the server owes results."""
        idle = self.config.idle_timeout
        since = time.monotonic() if session is None else session.last_activity
        task = asyncio.ensure_future(ws.recv())  # cancelling recv() loses no message
        failed = asyncio.ensure_future(session.failed.wait()) if session is not None else None
        try:
            while True:
                left = idle - (time.monotonic() - since)
                if left > 0:
                    await asyncio.wait({task} if failed is None else {task, failed}, timeout=left,
                                       return_when=asyncio.FIRST_COMPLETED)
                    if session is not None and session.failure is not None:
                        raise session.failure_error()
                    if task.done():
                        return task.result()
                    continue
                if session is None:
                    break
                session.check_reading()
                if session.owed():  # waiting on the server's backlog: look again in a second
                    since = time.monotonic() - idle + min(1.0, idle)
                    continue
                since = session.last_activity
                if time.monotonic() - since >= idle:
                    break
        finally:
            task.cancel()
            if failed is not None:
                failed.cancel()
        raise ProtocolError(f"no message for {idle:g} s", POLICY_VIOLATION, "idle_timeout")

    async def _fail(self, ws: ServerConnection, exc: ProtocolError) -> None:
        """Send the JSON error, then close with its code."""
        self.metrics.reject(exc.reason)
        log.info("closing connection with %d (%s): %s", exc.code, exc.reason, exc)
        with contextlib.suppress(ConnectionClosed, TimeoutError):  # a client that does not read
            async with asyncio.timeout(self.config.idle_timeout):
                await ws.send(error_message(exc))
        with contextlib.suppress(ConnectionClosed):
            await ws.close(exc.code, close_reason(exc))

    async def _handler(self, ws: ServerConnection) -> None:
        self.metrics.connections.inc()
        session: _Session | None = None
        park = True
        try:
            first = await self._recv(ws)
            if not isinstance(first, str):
                raise ProtocolError('the first message must be a JSON text {"type": "start", ...}, got a binary frame',
                                    UNSUPPORTED_DATA, "bad_start")
            if len(first) > self.config.max_frame_bytes:
                raise ProtocolError("start message too big", MESSAGE_TOO_BIG, "frame_too_big")
            start = parse_start(parse_control(first), self.codec.spec)
            session, resumed = await self._open(ws, start)  # registered: freed in finally, whatever happens
            try:
                async with asyncio.timeout(self.config.idle_timeout):
                    await session.greet(start.ack, resumed)
            except TimeoutError:
                raise ProtocolError("the client did not read ready (or its replayed results)", POLICY_VIOLATION,
                                    "idle_timeout") from None
            await session.run()
        except ProtocolError as exc:
            park = exc.reason in _PARKED_REASONS
            await self._fail(ws, exc)
        except ConnectionClosed:
            pass
        except Exception:  # noqa: BLE001 - a bug must not kill the server, only this connection
            log.exception("stream handler failed")
            await self._fail(ws, ProtocolError("internal server error", INTERNAL_ERROR, "internal_error"))
        finally:
            if session is not None:
                try:
                    await session.close(park)
                finally:
                    self._live.pop(session.token, None)
                    self.metrics.live_streams.set(self.scheduler.live)

    async def _open(self, ws: ServerConnection, start: Start) -> tuple[_Session, bool]:
        """Open a new stream or resume a parked one; returns it registered (``greet`` sends
        ``ready``) and whether it was resumed."""
        if self.scheduler.live >= self.config.max_streams:
            raise ProtocolError(f"server is at its limit of {self.config.max_streams} streams; try again later",
                                TRY_AGAIN_LATER, "too_many_streams")
        token = start.resume
        if token is None:
            return await self._register(ws, start, self.store.new_token(self._owner), None), False
        if token in self._live or token in self._resuming:
            raise ProtocolError("this stream is live on another connection (or being resumed); try again shortly",
                                TRY_AGAIN_LATER, "stream_busy")
        if token in self._failed:
            raise ProtocolError(f"this stream failed: {self._failed[token]}", INTERNAL_ERROR, "stream_failed")
        self._resuming.add(token)
        try:
            parked = await asyncio.to_thread(self.store.take, token, self._owner)
            settings = _settings(start)
            differ = {k: (parked.settings[k], v) for k, v in settings.items() if parked.settings.get(k, v) != v}
            lowest = parked.replay[0][0] if parked.replay else parked.next_seq
            problem = None
            if differ:
                problem = ProtocolError(f"resume: the stream was started with other settings (was, now): {differ}",
                                        POLICY_VIOLATION, "resume_mismatch")
            elif start.ack + 1 < min(lowest, parked.next_seq):
                problem = ProtocolError(
                    f"resume: results {start.ack + 1}..{lowest - 1} are no longer held (over the replay limit, "
                    "or not acknowledged); they cannot be replayed", POLICY_VIOLATION, "results_lost")
            if problem is not None:
                await asyncio.to_thread(self.store.park, token, parked, False)
                raise problem
            session = await self._register(ws, start, token, parked)
        finally:
            self._resuming.discard(token)
        self.metrics.resumed.inc()
        return session, True

    async def _register(self, ws: ServerConnection, start: Start, token: str, parked: Parked | None) -> _Session:
        session = _Session(self, ws, start, token, self._owner, parked)
        try:
            session.sid = await self.scheduler.open(session, session.deliver, session.on_error,
                                                    None if parked is None else parked.snapshot,
                                                    outputs=self._needs_outputs(start),
                                                    slice_samples=self._slice_samples(start))
        except StateError as exc:
            if parked is not None:  # put it back: the right server (or a freer moment) may resume it
                await asyncio.to_thread(self.store.park, token, parked, False)
                if "pool full" not in str(exc):
                    raise ProtocolError(f"resume: {exc}", POLICY_VIOLATION, "bad_resume") from None
            raise ProtocolError(f"server is at its limit of {self.config.max_streams} streams; try again later",
                                TRY_AGAIN_LATER, "too_many_streams") from None
        self._live[token] = session
        self.metrics.live_streams.set(self.scheduler.live)
        return session


# ------------------------------------------------------------------------------------------- CLI


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a streamssm checkpoint over websockets "
                                "(protocol: service/PROTOCOL.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServeConfig()
    p.add_argument("--checkpoint", required=True, help="model .safetensors export or Lightning .ckpt")
    p.add_argument("--host", default=d.host, help="interface to bind (127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port (0: any free port)")
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="model compute dtype")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or set STREAMSSM_TOKEN)")
    p.add_argument("--max-streams", type=int, default=d.max_streams, help="concurrent streams (state pool size)")
    p.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes, help="largest data frame accepted")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout, help="seconds without a message")
    p.add_argument("--queue-depth", type=int, default=d.queue_depth, help="unanswered chunks per stream")
    p.add_argument("--resume-ttl", type=float, default=d.resume_ttl, help="seconds a disconnected stream is kept")
    p.add_argument("--state-dir", default=None, help="persist parked streams here (survive a restart)")
    p.add_argument("--write-ahead-interval", type=float, default=d.write_ahead_interval,
                   help="seconds between writes of live streams to --state-dir (a crash loses at most this)")
    p.add_argument("--max-parked", type=int, default=d.max_parked, help="parked streams kept (oldest evicted)")
    p.add_argument("--max-parked-bytes", type=int, default=d.max_parked_bytes, help="bytes of parked streams kept")
    p.add_argument("--max-result-bytes", type=int, default=d.max_result_bytes, help="largest result of one frame")
    p.add_argument("--replay-bytes", type=int, default=d.replay_bytes, help="unacknowledged results kept per stream")
    p.add_argument("--slice-samples", type=int, default=d.slice_samples, help="samples of one stream per model call")
    p.add_argument("--nan-policy", default=d.nan_policy, choices=("reject", "zero"), help="NaN/inf samples")
    p.add_argument("--batching", default=d.batching, choices=("uniform", "greedy"),
                   help="chunks per stream per model call: equal counts (uniform) or all pending (greedy)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the model (None: torch's)")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM)")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    return p


async def serve_until_signal(bundle: ServingBundle, config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. A port in use is a ConfigError."""
    import errno

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = StreamServer(bundle, config)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {config.port} is in use; pick another with --port") from exc
        raise
    try:
        log.info("listening on %s (model %s, %s %s, %s); GET /healthz and /metrics on the same port",
                 server.url, bundle.fingerprint, server.codec.modality, server.codec.head, config.device)
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        await server.stop()


def main(argv: list[str] | None = None, prog: str = "streamssm serve") -> int:
    import os

    from streamssm.checkpoint import resolve_device

    args = _parser(prog).parse_args(argv)
    device = str(resolve_device(args.device))
    config = ServeConfig(
        host=args.host, port=args.port, device=device, dtype=args.dtype,
        token=args.token if args.token is not None else os.environ.get("STREAMSSM_TOKEN") or None, max_streams=args.max_streams,
        max_frame_bytes=args.max_frame_bytes, idle_timeout=args.idle_timeout, queue_depth=args.queue_depth,
        resume_ttl=args.resume_ttl, state_dir=args.state_dir, nan_policy=args.nan_policy,
        certfile=args.certfile, keyfile=args.keyfile, batching=args.batching,
        write_ahead_interval=args.write_ahead_interval, max_parked=args.max_parked,
        max_parked_bytes=args.max_parked_bytes, max_result_bytes=args.max_result_bytes,
        replay_bytes=args.replay_bytes, slice_samples=args.slice_samples,
    )
    if not Path(args.checkpoint).is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint!r} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle = load_for_serving(args.checkpoint, device)
    log.info("loaded %s in %.2f s", args.checkpoint, time.perf_counter() - t0)
    asyncio.run(serve_until_signal(bundle, config))
    return 0
