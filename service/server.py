"""``streamssm serve``: a websockets (17, asyncio) server running one checkpoint in recurrent
mode for many concurrent streams (DESIGN §5; wire protocol in service/PROTOCOL.md).

One connection = one stream. The handler only parses, validates, encodes and enqueues; the
:class:`~streamssm.service.scheduler.Scheduler` batches every stream's pending chunks into one
model call in its worker thread; a per-connection sender task writes the results back. The
same port answers ``GET /healthz`` and ``GET /metrics`` (Prometheus text) through
``process_request``. SIGTERM/SIGINT shut down gracefully: open streams are closed with 1012,
snapshotted and parked (and persisted with ``--state-dir``), so clients resume them with their
token, on this server or on the next one started with the same checkpoint and state dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import signal
import ssl
import time
from collections import deque
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
    SERVICE_RESTART,
    TRY_AGAIN_LATER,
    UNSUPPORTED_DATA,
    Start,
    close_reason,
    dumps,
    encode_result,
    error_message,
    parse_control,
    parse_start,
    ready_message,
)
from .resume import Parked, ResumeStore, new_token, owner_of
from .scheduler import Chunk, Scheduler

log = logging.getLogger(__name__)
STREAM_PATHS = ("/", "/stream")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServeConfig:
    """Server settings (the ``streamssm serve`` options)."""

    host: str = "127.0.0.1"
    port: int = 8765
    device: str = "cpu"
    dtype: str = "float32"
    token: str | None = None  # bearer token; None = no auth
    max_streams: int = 64
    max_frame_bytes: int = 1 << 20
    idle_timeout: float = 60.0
    queue_depth: int = 8
    resume_ttl: float = 300.0
    state_dir: str | None = None
    nan_policy: str = "reject"
    certfile: str | None = None
    keyfile: str | None = None
    ping_interval: float | None = 20.0
    batching: str = "uniform"  # see Scheduler._gather

    def __post_init__(self) -> None:
        problems = []
        if self.max_streams < 1:
            problems.append(f"max_streams must be >= 1, got {self.max_streams}")
        if self.max_frame_bytes < 64:
            problems.append(f"max_frame_bytes must be >= 64, got {self.max_frame_bytes}")
        if self.idle_timeout <= 0:
            problems.append(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if self.queue_depth < 1:
            problems.append(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.resume_ttl < 0:
            problems.append(f"resume_ttl must be >= 0, got {self.resume_ttl}")
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


class _Session:
    """One live stream on one connection: counters, the sender task, the replay buffer."""

    def __init__(self, server: StreamServer, ws: ServerConnection, start: Start, token: str,
                 owner: str, parked: Parked | None):
        self.server, self.ws, self.start, self.token, self.owner = server, ws, start, token, owner
        self.sid = -1
        self.next_seq = parked.next_seq if parked else 0  # seq of the next frame received
        self.samples_in = parked.samples if parked else 0  # sample offset of the next frame
        self.done_seq = self.next_seq  # chunks whose results exist
        self.done_samples = self.samples_in
        self.stats: dict[str, Any] = dict(parked.stats) if parked else {"log_likelihood": 0.0, "last": None}
        self.replay: deque[tuple[int, str | bytes]] = deque(parked.replay if parked else (),
                                                           maxlen=server.config.queue_depth)
        self.outbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.connected = True
        self.ended = False
        self.failure: BaseException | None = None
        self.sender: asyncio.Task | None = None

    # -- called by the scheduler -------------------------------------------------------------

    def encode(self, chunk: Chunk, result: ChunkResult) -> str | bytes:
        """Worker thread: one chunk's result -> its wire message."""
        if result.outputs is None:  # scores only: encode_result reads just the shape (n, o)
            outputs = np.broadcast_to(np.float32(0), (chunk.n, self.server.streamer.out_dim))
        else:
            outputs = self.server.codec.postprocess(result.outputs)
        scores = None if result.scores is None else result.scores.numpy()
        return encode_result(chunk.seq, chunk.start, outputs, scores, self.start)

    def deliver(self, chunk: Chunk, result: ChunkResult, message: str | bytes) -> None:
        self.done_seq = chunk.seq + 1
        self.done_samples = chunk.start + chunk.n
        if result.scores is not None:
            self.stats["log_likelihood"] += float(result.scores.double().sum())
        if chunk.n and self.server.codec.head != "lm":  # the summary's last forecast / probabilities
            self.stats["last"] = self.server.codec.postprocess(result.outputs[-1:])[0].tolist()
        self.replay.append((chunk.seq, message))
        if self.connected:
            self.outbox.put_nowait(message)
        else:
            self.server.scheduler.done(self.sid)

    def on_error(self, exc: BaseException) -> None:
        log.error("stream %s: model call failed: %s", self.sid, exc)
        self.failure = exc
        if self.connected:
            asyncio.get_running_loop().create_task(self.server._fail(
                self.ws, ProtocolError("model call failed for this stream", INTERNAL_ERROR, "internal_error")))

    # -- the connection ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        try:
            while True:
                message = await self.outbox.get()
                try:
                    await self.ws.send(message)
                finally:
                    self.server.scheduler.done(self.sid)
        except ConnectionClosed:  # free the queue so a handler blocked in submit() wakes up
            self._disconnect()

    def _disconnect(self) -> None:
        """No more sending: results from now on only go to the replay buffer."""
        self.connected = False
        while not self.outbox.empty():
            self.outbox.get_nowait()
            self.server.scheduler.done(self.sid)

    async def run(self) -> None:
        """Receive frames until ``end`` (then summary + close 1000) or an error/close."""
        cfg, codec, sched = self.server.config, self.server.codec, self.server.scheduler
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())
        while True:
            message = await self.server._recv(self.ws)
            if self.failure is not None:
                return
            size = len(message)
            if size > cfg.max_frame_bytes:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit of {cfg.max_frame_bytes} bytes",
                                    MESSAGE_TOO_BIG, "frame_too_big")
            if isinstance(message, str) and message.startswith("{"):
                msg = parse_control(message)
                if msg["type"] == "end":
                    await self._end()
                    return
                raise ProtocolError(f'unexpected control message type {msg["type"]!r} (expected "end" or data)',
                                    POLICY_VIOLATION, "bad_message")
            if isinstance(message, str) and self.start.format != "text":
                raise ProtocolError("text frame in a binary stream: text frames carry JSON control messages only",
                                    UNSUPPORTED_DATA, "text_in_binary")
            x = codec.chunk_from_frame(message, self.start, cfg.nan_policy)  # type: ignore[arg-type]
            chunk = Chunk(self.next_seq, self.samples_in, x)
            self.next_seq += 1
            self.samples_in += chunk.n
            await sched.submit(self.sid, chunk)

    async def _end(self) -> None:
        sched = self.server.scheduler
        async with asyncio.timeout(self.server.config.idle_timeout):
            await sched.drain(self.sid)
        if self.failure is not None:
            return
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

    async def close(self) -> None:
        """Connection over: stop sending; park the stream for resume unless it ended."""
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await self.sender
        self._disconnect()  # unsent results stay in the replay buffer
        if self.sid < 0 or self.ended:
            return
        store = self.server.store
        keep = store.enabled and self.failure is None
        blob = await self.server.scheduler.close(self.sid, snapshot=keep)
        if keep and blob is not None:
            store.park(self.token, Parked(
                blob, self.owner,
                {"format": self.start.format, "sample_rate": self.start.sample_rate, "channels": self.start.channels},
                self.done_seq, self.done_samples, self.stats, list(self.replay),
            ))
            log.info("stream %s parked at chunk %d (%d samples)", self.sid, self.done_seq, self.done_samples)


class StreamServer:
    """The service around one loaded model. ``async with StreamServer(bundle, cfg) as s:``."""

    def __init__(self, bundle: ServingBundle, config: ServeConfig | None = None):
        self.config = config or ServeConfig()
        self.bundle = bundle
        self.codec = ModelCodec.from_bundle(bundle)
        self.metrics = ServiceMetrics()
        self.store = ResumeStore(self.config.resume_ttl, self.config.state_dir)
        self.streamer = Streamer(bundle.model, self.config.max_streams, self.config.device, DTYPES[self.config.dtype])
        self.scheduler = Scheduler(self.streamer, self.config.queue_depth, self.metrics, self.config.batching)
        self._server: Server | None = None
        self._live: dict[str, _Session] = {}  # resume token -> live session
        self._sweeper: asyncio.Task | None = None
        self._owner = owner_of(self.config.token)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
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
        if self.store.enabled:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        log.info("serving model %s (%s head) on %s", self.bundle.fingerprint, self.codec.head, self.url)

    async def stop(self) -> None:
        """Graceful: refuse new connections, close streams with 1012 (parked for resume), stop."""
        if self._server is not None:
            self._server.close(code=SERVICE_RESTART, reason="server restart; resume with your token")
            await self._server.wait_closed()
            self._server = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
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
            self.store.sweep()

    # -- HTTP ------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.config.token is None:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.config.token}".encode())

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.method != "GET":
            self.metrics.reject("http_method")
            return conn.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n")
        if path == "/healthz":
            body = dumps({"status": "ok", "model": self.bundle.fingerprint, "head": self.codec.head,
                          "live_streams": self.scheduler.live, "max_streams": self.config.max_streams})
            return conn.respond(HTTPStatus.OK, body + "\n")
        if not self._authorized(request):
            self.metrics.reject("unauthorized")
            response = conn.respond(HTTPStatus.UNAUTHORIZED, "missing or bad bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="streamssm"'
            return response
        if path == "/metrics":
            self.metrics.live_streams.set(self.scheduler.live)
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

    async def _recv(self, ws: ServerConnection) -> str | bytes:
        try:
            async with asyncio.timeout(self.config.idle_timeout):
                return await ws.recv()
        except TimeoutError:
            raise ProtocolError(f"no message for {self.config.idle_timeout:g} s", POLICY_VIOLATION, "idle_timeout") from None

    async def _fail(self, ws: ServerConnection, exc: ProtocolError) -> None:
        """Send the JSON error, then close with its code."""
        self.metrics.reject(exc.reason)
        log.info("closing connection with %d (%s): %s", exc.code, exc.reason, exc)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(error_message(exc))
        with contextlib.suppress(ConnectionClosed):
            await ws.close(exc.code, close_reason(exc))

    async def _handler(self, ws: ServerConnection) -> None:
        self.metrics.connections.inc()
        session: _Session | None = None
        try:
            first = await self._recv(ws)
            if not isinstance(first, str):
                raise ProtocolError('the first message must be a JSON text {"type": "start", ...}, got a binary frame',
                                    UNSUPPORTED_DATA, "bad_start")
            if len(first) > self.config.max_frame_bytes:
                raise ProtocolError("start message too big", MESSAGE_TOO_BIG, "frame_too_big")
            start = parse_start(parse_control(first), self.codec.spec)
            session = await self._open(ws, start)
            await session.run()
        except ProtocolError as exc:
            await self._fail(ws, exc)
        except ConnectionClosed:
            pass
        except Exception:  # noqa: BLE001 - a bug must not kill the server, only this connection
            log.exception("stream handler failed")
            await self._fail(ws, ProtocolError("internal server error", INTERNAL_ERROR, "internal_error"))
        finally:
            if session is not None:
                try:
                    await session.close()
                finally:
                    self._live.pop(session.token, None)
                    self.metrics.live_streams.set(self.scheduler.live)

    async def _open(self, ws: ServerConnection, start: Start) -> _Session:
        """Open a new stream or resume a parked one; sends ``ready`` (and replays results)."""
        if self.scheduler.live >= self.config.max_streams:
            raise ProtocolError(f"server is at its limit of {self.config.max_streams} streams; try again later",
                                TRY_AGAIN_LATER, "too_many_streams")
        parked = None
        if start.resume is not None:
            if start.resume in self._live:
                raise ProtocolError("this stream is still live on another connection; try again shortly",
                                    TRY_AGAIN_LATER, "stream_busy")
            parked = self.store.take(start.resume, self._owner)
            settings = {"format": start.format, "sample_rate": start.sample_rate, "channels": start.channels}
            if settings != parked.settings:
                self.store.park(start.resume, parked, renew=False)
                raise ProtocolError(f"resume: the stream was started with {parked.settings}, got {settings}",
                                    POLICY_VIOLATION, "resume_mismatch")
        token = start.resume or new_token()
        session = _Session(self, ws, start, token, self._owner, parked)
        try:
            session.sid = await self.scheduler.open(session.encode, session.deliver, session.on_error,
                                                    None if parked is None else parked.snapshot,
                                                    outputs=self._needs_outputs(start))
        except StateError as exc:
            if parked is not None:  # put it back: the right server (or a freer moment) may resume it
                self.store.park(token, parked, renew=False)
                if "pool full" not in str(exc):
                    raise ProtocolError(f"resume: {exc}", POLICY_VIOLATION, "bad_resume") from None
            raise ProtocolError(f"server is at its limit of {self.config.max_streams} streams; try again later",
                                TRY_AGAIN_LATER, "too_many_streams") from None
        self._live[token] = session
        self.metrics.live_streams.set(self.scheduler.live)
        if parked is not None:
            self.metrics.resumed.inc()
        await ws.send(ready_message(token=token, model=self.bundle.fingerprint, head=self.codec.head,
                                    output_dim=self.codec.output_dim, next_seq=session.next_seq,
                                    samples=session.samples_in, resumed=parked is not None, start=start,
                                    queue_depth=self.config.queue_depth))
        for seq, message in list(session.replay):
            if seq > start.ack:
                await ws.send(message)
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
        token=args.token or os.environ.get("STREAMSSM_TOKEN") or None, max_streams=args.max_streams,
        max_frame_bytes=args.max_frame_bytes, idle_timeout=args.idle_timeout, queue_depth=args.queue_depth,
        resume_ttl=args.resume_ttl, state_dir=args.state_dir, nan_policy=args.nan_policy,
        certfile=args.certfile, keyfile=args.keyfile, batching=args.batching,
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
