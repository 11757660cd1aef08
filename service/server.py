"""The websockets (17, asyncio) server behind ``streamssm serve``, running one checkpoint in recurrent
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

Settings: :class:`~streamssm.service.config.ServeConfig`; one stream:
:class:`~streamssm.service.session.Session`; the command: ``streamssm.commands.serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import ssl
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ConfigError, ProtocolError, StateError
from streamssm.state import read_state_metadata

from . import static
from .admission import PendingConnections, raise_open_file_limit
from .backend import LocalBackend
from .codec import ModelCodec
from .config import ServeConfig
from .protocol import (
    INTERNAL_ERROR,
    INVALID_DATA,
    MESSAGE_TOO_BIG,
    POLICY_VIOLATION,
    PROTOCOL_ERROR,
    RESULT_VALUE_BYTES,
    SERVICE_RESTART,
    TRY_AGAIN_LATER,
    UNSUPPORTED_DATA,
    Start,
    close_reason,
    dumps,
    error_message,
    parse_control,
    parse_start,
    result_bytes,
)
from .remote import WorkerBackend
from .resume import Parked, owner_of
from .session import Session, resume_settings

log = logging.getLogger(__name__)
STREAM_PATHS = ("/", "/stream")
_PARKED_REASONS = ("idle_timeout",)  # protocol errors after which a stream is still parked
_VALUES_PER_SLICE_SAMPLE = 16  # a stream's slice holds at most slice_samples x this many result values


def _tls_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The server's TLS context for ``--certfile``/``--keyfile`` (None without them)."""
    if not cfg.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load certfile {cfg.certfile!r} with keyfile {cfg.keyfile!r}: {exc}") from exc
    return ctx


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StreamServer:
    """The service around one loaded model. ``async with StreamServer(bundle, cfg) as s:``.

    ``backend``: what runs the streams (default: a :class:`~streamssm.service.backend.LocalBackend`
    with the model in this process; a ``serve --workers`` worker passes its link to the engine
    process, and ``reuse_port`` so that all workers listen on one port).
    Its sessions see it as a :class:`~streamssm.service.session.SessionHost`: ``config``,
    ``bundle``, ``codec``, ``scheduler``, ``store``, :meth:`sample_result_bytes` and
    :meth:`remember_failure`."""

    def __init__(self, bundle: ServingBundle, config: ServeConfig | None = None,
                 backend: LocalBackend | WorkerBackend | None = None, reuse_port: bool = False):
        self.config = config or ServeConfig()
        cfg = self.config
        self.bundle = bundle
        self.codec = ModelCodec.from_bundle(bundle)
        self.backend = LocalBackend(bundle, cfg) if backend is None else backend
        self.metrics, self.store, self.scheduler = self.backend.metrics, self.backend.store, self.backend.scheduler
        self.streamer = self.backend.streamer  # None in a worker process
        self.tokens = self.backend.tokens
        self._reuse_port = reuse_port
        self._server: Server | None = None
        self._live: dict[str, Session] = {}  # resume token -> live session (of this process)
        self._tasks: list[asyncio.Task] = []
        self._owner = owner_of(cfg.token)
        self.pending = PendingConnections(cfg.max_pending, on_drop=lambda: self.metrics.reject("pending_limit"))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.token is None and not _loopback(cfg.host):
            log.warning("serving on %s without --token: anyone who reaches this port can stream "
                        "(and read the scores); set --token and TLS", cfg.host)
        await self.backend.start()
        try:  # a failed start stops what it started (`async with` never reaches stop)
            raise_open_file_limit(cfg.max_pending + cfg.max_streams)
            self._server = await serve(
                self._handler, cfg.host, cfg.port, process_request=self._process_request,
                max_size=2 * cfg.max_frame_bytes, compression=None, ping_interval=cfg.ping_interval,
                ping_timeout=cfg.ping_interval, ssl=_tls_context(cfg), select_subprotocol=static.select_subprotocol,
                reuse_port=self._reuse_port, create_connection=self.pending.connection_class(),
            )
            loop = asyncio.get_running_loop()
            if self.store.enabled:
                self._tasks.append(loop.create_task(self._sweep_loop()))
                if self.store.state_dir is not None:
                    self._tasks.append(loop.create_task(self._write_ahead_loop()))
        except BaseException:
            await self.stop()
            raise
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
        await self.backend.stop()

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
        self.tokens.fail(token, f"{type(exc).__name__}: {exc}")

    # -- HTTP ------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.config.token is None:
            return True
        got = request.headers.get_all("Authorization") or static.subprotocol_bearer(request)  # browsers: subprotocol
        if len(got) != 1:
            return False
        return hmac.compare_digest(got[0].encode(), f"Bearer {self.config.token}".encode())

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.method != "GET":
            self.metrics.reject("http_method")
            return conn.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n")
        if (page := static.page_response(conn, request)) is not None:  # the browser client (no token)
            return page
        if path == "/healthz":
            live, parked = await self.backend.counts()
            body = dumps({"status": "ok", "model": self.bundle.fingerprint, "head": self.codec.head,
                          "live_streams": live, "max_streams": self.config.max_streams,
                          "parked_streams": parked})
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
            response = conn.respond(HTTPStatus.OK, (await self.backend.metrics_text()).decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = self.metrics.content_type
            return response
        if path == static.MODEL_PATH:
            return static.model_response(conn, self.bundle, self.codec, self.config.idle_timeout)
        if path not in STREAM_PATHS:
            self.metrics.reject("not_found")
            return conn.respond(HTTPStatus.NOT_FOUND, f"no such path; streams connect to {STREAM_PATHS[0]}\n")
        return None

    # -- websocket -------------------------------------------------------------------------------

    @property
    def _scored(self) -> bool:
        """Whether results carry LM scores (a token language model)."""
        cfg = self.bundle.config
        return cfg.head == "lm" and cfg.input_kind == "tokens"

    def sample_result_bytes(self, start: Start) -> int:
        """Wire bytes of one sample's result for this stream's settings (results grow linearly)."""
        return result_bytes(1, self.codec.output_dim, self._scored, start)

    def _needs_outputs(self, start: Start) -> bool:
        """Whether the stream's results need ChunkResult.outputs: False only for a token lm whose
        client asked for scores alone (the Streamer then copies no (n, o) distribution)."""
        return "outputs" in start.include or not self._scored

    def _slice_samples(self, start: Start) -> int:
        """Samples of this stream per model call: ``slice_samples``, fewer when each sample has
        more than 16 result values to compute and encode (a 256-way LM's JSON outputs)."""
        values = self.sample_result_bytes(start) // RESULT_VALUE_BYTES[start.results]
        budget = self.config.slice_samples * _VALUES_PER_SLICE_SAMPLE
        return max(1, min(self.config.slice_samples, budget // max(1, values)))

    async def receive(self, ws: ServerConnection) -> str | bytes:
        """A new connection's first message; ProtocolError 1008 ``idle_timeout`` after
        ``idle_timeout`` seconds without one (a stream's later messages:
        :meth:`~streamssm.service.session.Session.receive`)."""
        idle = self.config.idle_timeout
        try:
            async with asyncio.timeout(idle):
                return await ws.recv()
        except TimeoutError:
            raise ProtocolError(f"no message for {idle:g} s", POLICY_VIOLATION, "idle_timeout") from None

    async def _fail(self, ws: ServerConnection, exc: ProtocolError) -> None:
        """Send the JSON error, then close with its code; a client that reads neither within
        ``idle_timeout`` is cut off (the close handshake waits for the socket to drain)."""
        self.metrics.reject(exc.reason)
        log.info("closing connection with %d (%s): %s", exc.code, exc.reason, exc)
        try:
            async with asyncio.timeout(self.config.idle_timeout):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(error_message(exc))
                    await ws.close(exc.code, close_reason(exc))
        except TimeoutError:
            ws.transport.abort()

    async def _handler(self, ws: ServerConnection) -> None:
        self.metrics.connection()
        session: Session | None = None
        park = True
        try:
            first = await self.receive(ws)
            if not isinstance(first, str):
                raise ProtocolError('the first message must be a JSON text {"type": "start", ...}, got a binary frame',
                                    UNSUPPORTED_DATA, "bad_start")
            if len(first) > self.config.max_frame_bytes:
                raise ProtocolError("start message too big", MESSAGE_TOO_BIG, "frame_too_big")
            start = parse_start(parse_control(first), self.codec.spec)
            session, resumed = await self._open(ws, start)  # registered: freed in finally, whatever happens
            self.pending.discard(ws)
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
        except ConnectionClosed as exc:
            # the websocket layer's own protocol errors (a frame over twice --max-frame-bytes, invalid
            # UTF-8, a bad opcode) close the stream as the server's checks do: not kept for resume
            park = not _closed_for_protocol_error(exc)
        except Exception:  # noqa: BLE001 - a bug must not kill the server, only this connection
            log.exception("stream handler failed")
            await self._fail(ws, ProtocolError("internal server error", INTERNAL_ERROR, "internal_error"))
        finally:
            if session is not None:
                try:
                    await session.close(park)
                finally:
                    self._live.pop(session.token, None)
                    self.tokens.release(session.token)

    async def _open(self, ws: ServerConnection, start: Start) -> tuple[Session, bool]:
        """Open a new stream or resume a parked one; returns it registered (``greet`` sends
        ``ready``) and whether it was resumed."""
        if self.scheduler.live >= self.config.max_streams:
            raise ProtocolError(f"server is at its limit of {self.config.max_streams} streams; try again later",
                                TRY_AGAIN_LATER, "too_many_streams")
        token = start.resume or self.store.new_token(self._owner)
        await self.tokens.claim(token)  # released when the handler ends (or below, if this fails)
        try:
            if start.resume is None:
                return await self._register(ws, start, token, None), False
            parked = await asyncio.to_thread(self.store.take, token, self._owner)
            settings = resume_settings(start)
            differ = {k: (parked.settings[k], v) for k, v in settings.items() if parked.settings.get(k, v) != v}
            lowest = parked.replay[0][0] if parked.replay else parked.next_seq
            problem = None
            model = read_state_metadata(parked.snapshot).get("fingerprint")
            if model != self.bundle.fingerprint:  # before results_lost: the replay is another model's
                problem = ProtocolError(f"resume: the stream belongs to model {model!r}, this server runs model "
                                        f"{self.bundle.fingerprint!r}", POLICY_VIOLATION, "bad_resume")
            elif differ:
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
        except BaseException:
            self.tokens.release(token)
            raise
        self.metrics.resume()
        return session, True

    async def _register(self, ws: ServerConnection, start: Start, token: str, parked: Parked | None) -> Session:
        session = Session(self, ws, start, token, self._owner, parked)
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
        return session


def _closed_for_protocol_error(exc: ConnectionClosed) -> bool:
    """Whether the websocket layer closed the connection itself for a protocol error of the client:
    it sent a close (1002 protocol error, 1007 invalid data, 1009 message too big) before any came in."""
    sent = exc.sent
    return (sent is not None and sent.code in (PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG)
            and not exc.rcvd_then_sent)
