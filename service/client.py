"""Python client for the streaming service (files: ``service/sources.py``; the command:
``streamssm.commands.stream``).

Library use (``model_settings(path)`` reads the format, sample rate and channels a model file
takes; or pass them yourself: ``format="f32le", sample_rate=16000, channels=1``)::

    async with StreamClient(url, **model_settings("model.safetensors"), token=T) as s:
        for chunk in chunks:                  # (l, c) float arrays, or str of bases for "text"
            await s.send(chunk)               # waits while `window` chunks are unanswered
        summary = await s.end()               # every result has arrived by then
    s.results                                 # list of Result (seq order): outputs (n, o), scores (n,)

The client keeps every unanswered chunk, and, when the server writes streams ahead to disk
(``ready.saved_seq``), every answered chunk after the last one the server says is saved; if
the connection drops (or the server restarts with 1012, or crashes and comes back on its state
dir) it reconnects with its resume token, gets the missed results replayed and resends the
chunks the server had not computed (results it already holds are not added twice), so the
results equal those of an uninterrupted stream. A stream the server lost (4410 ``stream_lost``)
is started again from its first chunk when the client still holds them all.

``await s.reset()`` sets the stream's state back to zero (as for a new stream; it takes a seq,
and its result is marked ``Result.reset``). A model whose rate differs from the stream's
``sample_rate`` gets resampled input (results then count model-rate samples, ``ready``'s
``model_sample_rate``; a frame may get a result of n = 0 and the end one more result);
:func:`server_sample_rate` asks a server for its model's rate, to resample on the client
instead. ``ssl``: an ``ssl.SSLContext`` for wss:// (e.g. one trusting a self-signed certificate).

The server's messages are checked, not trusted: a malformed message, a result out of order, for a
chunk never sent, at the wrong stream offset or of the wrong shape is a ProtocolError naming it;
no result for ``timeout`` seconds is a :class:`ServerTimeout`; messages over ``max_size`` bytes
are refused unread; a close with a refusing code (not 1001/1006/1011..1014/4410) is raised, not
resumed; and ``reconnect`` bounds the reconnections in a row that bring no new result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl as ssl_lib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streamssm.checkpoint import read_model_file
from streamssm.errors import ConfigError, DataFormatError, ProtocolError, StreamSSMError

from .protocol import (
    INTERNAL_ERROR,
    INVALID_DATA,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    POLICY_VIOLATION,
    PROTOCOL_VERSION,
    SERVICE_RESTART,
    STREAM_LOST,
    TRY_AGAIN_LATER,
    Result,
    decode_result,
    json_int,
    quoted,
)

log = logging.getLogger(__name__)
#: error messages after which the client reconnects and resumes; any other error message (a bad
#: frame, a failed model call) is the server's answer and is raised with its text. Connections
#: that close without an error message (1001, 1006, 1011 crash, 1012 restart) are resumed too.
_RETRYABLE = {SERVICE_RESTART, TRY_AGAIN_LATER}
#: close codes (without an error message) after which the client resumes: going away, a cut
#: connection (1006: no close frame), a crash, a restart, try again later, a proxy's bad gateway, a
#: lost stream; any other code (1002, 1003, 1007..1010, unknown application codes) says the
#: connection itself was refused and is raised (resuming sent the same thing again, in a loop)
_RESUMABLE_CLOSE = {None, 1001, 1006, INTERNAL_ERROR, SERVICE_RESTART, TRY_AGAIN_LATER, 1014, STREAM_LOST}
#: the largest server message the client reads (bytes): a result is at most the server's
#: --max-result-bytes (default 16 MiB, counted at 16 bytes a JSON value); larger messages are
#: refused by the websocket layer instead of buffered whole (``StreamClient(max_size=...)``)
MAX_MESSAGE_BYTES = 64 << 20
_SHOWN_CHARS = 500  # longest server text (an error message) quoted in our errors


def model_settings(model: str | Path) -> dict[str, Any]:
    """``format``, ``sample_rate`` and ``channels`` a stream to a model file carries (its serving
    spec, read without loading the weights): ``StreamClient(url, **model_settings(path))``."""
    spec = read_model_file(model).spec
    if spec is None:
        raise ConfigError(f"model file {str(model)!r} has no serving spec: pass format, sample_rate and channels")
    return spec.stream_start()


class ServerError(ProtocolError):
    """The server answered with an error message (``code`` = its close code)."""


def check_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is a websocket URL (ws:// or wss://)."""
    if not url.startswith(("ws://", "wss://")):
        raise ConfigError(f"url {url!r} is not a websocket URL: use ws://HOST:PORT/ (wss:// with TLS), "
                          f"e.g. ws://127.0.0.1:8765/")


class ServerUnreachable(StreamSSMError, ConnectionError):
    """No server answers at the URL (connection refused, unknown host, timeout)."""


class ServerTimeout(ProtocolError, TimeoutError):
    """The server stopped answering: no ``ready``, result or summary within the client's timeout
    (the connection stays open, so only a timeout tells a stuck server from a slow one)."""


@dataclass
class _Pending:
    seq: int
    frame: str | bytes
    sent_at: float = field(default_factory=time.perf_counter)

    @property
    def reset(self) -> bool:
        """A reset (a control message: data frames, bases included, never start with "{")."""
        return isinstance(self.frame, str) and self.frame.startswith("{")


class StreamClient:
    """One stream to a ``streamssm serve`` server (see the module docstring).

    ``timeout``: seconds to wait for a result while chunks are unanswered before
    :class:`ServerTimeout` (None: forever; a stuck server keeps answering websocket pings);
    ``max_size``: the largest server message read, in bytes (None: any)."""

    def __init__(self, url: str, *, format: str, sample_rate: int | None = None, channels: int = 1,
                 token: str | None = None, results: str = "json", include: tuple[str, ...] = ("outputs", "scores"),
                 window: int = 8, reconnect: int = 5, resume: str | None = None, open_timeout: float = 10.0,
                 ssl: ssl_lib.SSLContext | None = None, wait: float = 0.0, timeout: float | None = 60.0,
                 max_size: int | None = MAX_MESSAGE_BYTES):
        check_url(url)
        if not wait >= 0:  # (NaN retried forever)
            raise ConfigError(f"wait must be >= 0 seconds, got {wait}")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds (None: wait forever), got {timeout}")
        if window < 1:
            raise ConfigError(f"window must be >= 1 unanswered chunks, got {window}")
        self.url, self.token, self.window, self.reconnect, self.ssl = url, token, window, reconnect, ssl
        self.start_msg: dict[str, Any] = {"type": "start", "version": PROTOCOL_VERSION, "format": format,
                                          "channels": channels, "results": results, "include": list(include)}
        if sample_rate is not None:
            self.start_msg["sample_rate"] = sample_rate
        self.format = format
        self.resume_token = resume
        self.open_timeout = open_timeout
        self.timeout, self.max_size = timeout, max_size
        self.wait = wait  # seconds a refused first connection is retried: a server still starting
        self.ready: dict[str, Any] = {}
        self.results: list[Result] = []
        self.latencies: list[float] = []  # seconds from sending a chunk to receiving its result
        self._ws: ClientConnection | None = None
        self._pending: dict[int, _Pending] = {}  # unanswered chunks by seq
        self._answered: dict[int, _Pending] = {}  # answered, not yet saved by the server (its write-ahead)
        self._keep_answered = False  # the server announced write-ahead (ready.saved_seq)
        self._saved_seq = -1  # last chunk the server says is on disk
        self._acked = -1  # last result seq acknowledged to the server
        self._from_start = resume is None  # this object sent the stream from its first chunk
        self._next_seq = 0
        self._last_seq = -1
        self._next_start: int | None = 0 if resume is None else None  # sample the next new result starts at
        self._result_at = 0.0  # time.monotonic() of the last new result
        self._tries = 0  # reconnections in a row without a new result: a server closing every one ends it
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Event()  # set whenever a result arrives or the reader stops
        self._summary: asyncio.Future | None = None  # set when end is sent
        self._flushed = False  # the one result a resampled stream's end adds came
        self._error: BaseException | None = None
        self.reconnects = 0

    # -- connection ------------------------------------------------------------------------------

    async def __aenter__(self) -> StreamClient:
        try:
            await self._connect_waiting()
        except StreamSSMError:
            raise  # ours already (a bad ready, the server's error, no ready in time): not "no server"
        except ssl_lib.SSLCertVerificationError as exc:
            raise ConfigError(f"the TLS certificate of {self.url} is not trusted ({exc.verify_message}): trust its "
                              f"CA or self-signed certificate (ssl=ssl.create_default_context(cafile=...), "
                              f"streamssm stream --cafile)") from exc
        except OSError as exc:  # refused, unknown host, TimeoutError
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
            if isinstance(exc, ConnectionRefusedError) and self.wait:
                why += f" for {self.wait:g} s"
            raise ServerUnreachable(f"no server at {self.url} ({why}); start one with "
                                    f"`streamssm serve --checkpoint MODEL`") from exc
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise ConfigError(f"the server at {self.url} wants a bearer token (HTTP 401): pass its token "
                                  f"(--token or STREAMSSM_TOKEN)") from exc
            raise ServerUnreachable(f"{self.url} refused the websocket connection (HTTP {status}): "
                                    f"{exc.response.body.decode(errors='replace').strip()}") from exc
        except InvalidHandshake as exc:
            raise ServerUnreachable(f"{self.url} is not a streamssm server: {exc}") from exc
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            raise ProtocolError(f"{self.url} closed the connection before its ready message ({exc})", code,
                                "closed") from exc
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _connect_waiting(self) -> None:
        """The first connection, retried every 0.1 s while it is refused, for up to ``wait`` seconds
        (``streamssm serve &`` then ``streamssm stream`` at once: the server takes ~1.5 s to listen)."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return await self._connect()
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = ws = await connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                      compression=None, max_size=self.max_size, ssl=self.ssl)
        try:
            await self._open(ws)
        except Exception:
            await ws.close()  # a refused or malformed start leaves no socket open
            raise

    async def _open(self, ws: ClientConnection) -> None:
        """Send ``start``, check the ``ready`` answer, start the reader and resend what the server lacks."""
        start = dict(self.start_msg)
        if self.resume_token:
            start.update(resume=self.resume_token, ack=self._last_seq)
        await ws.send(json.dumps(start))
        try:
            message = await asyncio.wait_for(ws.recv(), self.open_timeout)
        except TimeoutError:
            raise ServerTimeout(f"{self.url} accepted the connection but sent no ready message within "
                                f"{self.open_timeout:g} s (open_timeout)", INTERNAL_ERROR, "no_ready") from None
        except ConnectionClosed as exc:
            raise self._too_big(exc) or exc
        reply = self._decode(message) if isinstance(message, str) else message
        if isinstance(reply, dict) and reply["type"] == "error":
            raise self._server_error(reply, POLICY_VIOLATION)
        if not isinstance(reply, dict) or reply["type"] != "ready":
            raise ProtocolError(f"expected a ready message, got {quoted(reply)}", POLICY_VIOLATION, "bad_ready")
        self._check_ready(reply)
        server_next = reply["next_seq"]
        if self.resume_token is None:
            if server_next or reply.get("resumed"):
                raise ProtocolError(f"the server answered a new stream with a resumed one's ready (next_seq "
                                    f"{server_next}, resumed {quoted(reply.get('resumed'))})", POLICY_VIOLATION, "bad_ready")
        elif not self.ready and not self._from_start:  # a new client object resuming a stream by token
            self._next_seq, self._last_seq = server_next, server_next - 1
        elif server_next > self._next_seq:
            raise ProtocolError(f"the server resumed the stream at chunk {server_next}, but this client sent only "
                                f"chunks 0..{self._next_seq - 1}", POLICY_VIOLATION, "bad_ready")
        held = {**self._answered, **self._pending}
        missing = [seq for seq in range(server_next, self._next_seq) if seq not in held]
        if missing:
            raise ProtocolError(f"the server resumed the stream at chunk {server_next}, but this client no longer "
                                f"holds chunks {missing[0]}..{missing[-1]} (dropped as saved or answered); "
                                f"send the stream again from the start", 1011, "chunks_missing")
        self.ready = reply
        self.resume_token = reply["resume"]
        self.window = min(self.window, reply.get("queue_depth", self.window))
        self._keep_answered = reply.get("saved_seq") is not None
        self._acked = self._last_seq if reply.get("resumed") else -1
        self._saved(reply["saved_seq"] if self._keep_answered else self._last_seq)
        self._reader = asyncio.get_running_loop().create_task(self._read(ws))
        for seq in range(server_next, self._next_seq):  # resend what the server has not computed
            await ws.send(held[seq].frame)

    def _check_ready(self, reply: dict[str, Any]) -> None:
        """ProtocolError naming each field of ``ready`` the client relies on that is missing or wrong
        (a KeyError or a window of 0, which waited forever, otherwise)."""
        token, saved, rate = reply.get("resume"), reply.get("saved_seq"), reply.get("model_sample_rate")
        bad = [name for name, ok in (
            ("resume", isinstance(token, str) and 16 <= len(token) <= 128),
            ("next_seq", json_int(reply.get("next_seq"), 0)),
            ("queue_depth", "queue_depth" not in reply or json_int(reply["queue_depth"], 1)),
            ("saved_seq", saved is None or (json_int(saved, -1) and json_int(reply.get("next_seq"), saved + 1))),
            ("output_dim", "output_dim" not in reply or json_int(reply["output_dim"], 1)),
            ("model_sample_rate", rate is None or json_int(rate, 1)),
            ("resumed", isinstance(reply.get("resumed", False), bool)),
        ) if not ok]
        if bad:
            shown = ", ".join(f"{name}={quoted(reply.get(name, '(missing)'))}" for name in bad)
            raise ProtocolError(f"the server's ready message has bad or missing fields: {shown}", POLICY_VIOLATION,
                                "bad_ready")

    def _server_error(self, msg: dict[str, Any], default_code: int) -> ServerError:
        """The server's ``error`` message as a ServerError, whatever fields it lacks."""
        code, reason, text = msg.get("code"), msg.get("reason"), msg.get("message")
        code = code if json_int(code, 1000) and code <= 4999 else default_code
        reason = reason[:123] if isinstance(reason, str) and reason else "error"
        if not isinstance(text, str) or not text:
            text = f"the server sent an error without a message (code {code}, reason {reason!r})"
        return ServerError(text[:_SHOWN_CHARS], code, reason)

    def _too_big(self, exc: ConnectionClosed) -> ProtocolError | None:
        """The error for a connection this client closed itself on a message over ``max_size``."""
        if exc.sent is None or exc.sent.code != MESSAGE_TOO_BIG or (exc.rcvd is not None and exc.rcvd_then_sent):
            return None
        return ProtocolError(f"the server sent a message over max_size ({self.max_size} bytes): {exc.sent.reason}; "
                             f"a server with a larger --max-result-bytes needs StreamClient(max_size=...)",
                             MESSAGE_TOO_BIG, "message_too_big")

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                item = self._decode(message)
                if isinstance(item, Result):
                    self._on_result(item)
                elif item["type"] == "saved":
                    self._on_saved(item.get("seq"))
                elif item["type"] == "summary":
                    if self._summary is not None and not self._summary.done():
                        self._check_summary(item)
                        self._summary.set_result(item)
                elif item["type"] == "error":
                    self._error = self._server_error(item, INTERNAL_ERROR)
                    if self._error.code not in _RETRYABLE:
                        break  # its final word, whether or not it closes
        except ProtocolError as exc:  # the server broke the protocol: stop reading, raise it
            self._error = exc
            await ws.close(POLICY_VIOLATION if exc.code in (1005, 1006, 1015) else exc.code, exc.reason[:123])
        except ConnectionClosed as exc:
            self._error = self._too_big(exc) or self._error
        finally:
            self._changed.set()

    def _check_summary(self, summary: dict[str, Any]) -> None:
        """The summary counts what this client received: every chunk's result (``chunks``) and the
        samples up to the end of the last one (``samples``; unknown when resumed by token with no
        new result yet)."""
        chunks, samples = summary.get("chunks"), summary.get("samples")
        want_samples = self._next_start if self._next_start is not None else samples
        if not (json_int(chunks, 0) and json_int(samples, 0)) or (chunks, samples) != (self._last_seq + 1, want_samples):
            raise ProtocolError(f"the summary counts {quoted(chunks)} chunks and {quoted(samples)} samples, but this "
                                f"client received results for {self._last_seq + 1} chunks ending at sample "
                                f"{self._next_start}", INVALID_DATA, "bad_summary")

    def _decode(self, message: str | bytes) -> Result | dict[str, Any]:
        """A server message -> a checked result or a control message dict; ProtocolError naming
        what is wrong (a raw numpy/json/KeyError traceback killed the reader otherwise, and the
        client waited forever)."""
        try:
            item = decode_result(message)
        except ProtocolError as exc:
            kind = "binary result frame" if isinstance(message, bytes) else "message"
            raise ProtocolError(f"the server sent a bad {kind}: {exc}", INVALID_DATA, exc.reason) from None
        if not isinstance(item, Result):
            return item
        o = self.ready.get("output_dim")
        if item.n and item.outputs is not None and o is not None and item.outputs.shape[1] != o:
            raise ProtocolError(f"result {item.seq}: {item.outputs.shape[1]} outputs per sample, but ready said "
                                f"output_dim {o}", INVALID_DATA, "bad_result")
        include = self.start_msg["include"]
        if item.n and (("outputs" in include and item.outputs is None)
                       or ("scores" in include and self.ready.get("head") == "lm" and item.scores is None)):
            raise ProtocolError(f"result {item.seq} of {item.n} samples lacks the outputs or scores the stream asked "
                                f"for ({include})", INVALID_DATA, "bad_result")
        return item

    def _on_result(self, r: Result) -> None:
        if r.seq <= self._last_seq:
            return  # a replay of something we hold
        flush = (r.seq == self._next_seq and self._summary is not None and self.ready.get("resample") is True
                 and not self._flushed)
        if r.seq >= self._next_seq and not flush:  # after end a resampled stream's flush takes the next seq
            raise ProtocolError(f"result {r.seq} answers a chunk this client never sent (it sent chunks "
                                f"0..{self._next_seq - 1})", POLICY_VIOLATION, "bad_result")
        if r.seq != self._last_seq + 1:
            raise ProtocolError(f"result {r.seq} arrived after {self._last_seq}: results were lost",
                                1011, "lost_results")
        if self._next_start is not None and r.start != self._next_start:
            raise ProtocolError(f"result {r.seq} starts at sample {r.start}, but the results before it end at sample "
                                f"{self._next_start}: samples were lost or repeated", INVALID_DATA, "bad_result")
        if flush:
            self._next_seq, self._flushed = self._next_seq + 1, True
        p = None if flush else self._pending.pop(r.seq)
        if p is not None and p.reset != r.reset:
            raise ProtocolError(f"result {r.seq} is {'' if r.reset else 'not '}marked as a reset's answer, but "
                                f"chunk {r.seq} was {'a reset' if p.reset else 'data'}", INVALID_DATA, "bad_result")
        self._last_seq, self._next_start = r.seq, r.start + r.n
        self._result_at, self._tries = time.monotonic(), 0
        if p is not None:
            self.latencies.append(time.perf_counter() - p.sent_at)
            if self._keep_answered and r.seq > self._saved_seq:
                self._answered[r.seq] = p
        self.results.append(r)
        self._changed.set()

    def _on_saved(self, seq: Any) -> None:
        """A ``saved`` message: it follows the results it covers, so its seq is one this client holds."""
        if not json_int(seq, -1) or seq > self._last_seq:
            raise ProtocolError(f"saved message for chunk {quoted(seq)}, but this client holds results only up to "
                                f"{self._last_seq} (saved comes after the results it covers)", POLICY_VIOLATION,
                                "bad_saved")
        self._saved(seq)
        self._changed.set()

    def _saved(self, seq: int) -> None:
        """The server holds the stream's state after chunk ``seq`` on disk: drop the chunks up to it."""
        self._saved_seq = max(self._saved_seq, seq)
        for s in [s for s in self._answered if s <= self._saved_seq]:
            del self._answered[s]

    def _restart(self) -> None:
        """After 4410 ``stream_lost``: the next connection starts the stream again from chunk 0,
        if this client still holds every chunk (results it holds are not added twice)."""
        held = {**self._answered, **self._pending}
        if not self._from_start or any(seq not in held for seq in range(self._next_seq)):
            raise ServerError("the server lost this stream (4410 stream_lost: expired, evicted, or the server "
                              "stopped before saving it) and this client no longer holds its first chunks "
                              "(the server had saved them); send the stream again from the start",
                              STREAM_LOST, "stream_lost")
        log.info("stream lost by the server: starting it again from chunk 0 (%d chunks)", self._next_seq)
        self.resume_token = None

    async def _wait_until(self, condition, timeout: float | None = None) -> None:
        """Wait until ``condition()`` holds; ServerTimeout when no new result came for ``timeout``
        seconds of it (the server answers pings, so only this tells a stuck server)."""
        began = time.monotonic()
        while not condition():
            self._changed.clear()
            left = None if timeout is None else max(began, self._result_at) + timeout - time.monotonic()
            if left is not None and left <= 0:
                first = min(self._pending, default=None)
                raise ServerTimeout(f"the server sent no result for {timeout:g} s while {len(self._pending)} chunk(s) "
                                    f"wait for theirs (from seq {first}): it is stuck or overloaded "
                                    f"(StreamClient(timeout=...) sets how long to wait)", INTERNAL_ERROR,
                                    "result_timeout")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    async def _recover(self) -> None:
        """The connection is gone without a normal close: reconnect and resume, or raise."""
        ws = self._ws
        code = None if ws is None or ws.close_code is None else ws.close_code
        if self._error is not None and not (isinstance(self._error, ServerError) and self._error.code in _RETRYABLE):
            raise self._error
        if code == NORMAL_CLOSURE or self.resume_token is None:
            raise ProtocolError(f"connection closed (code {code})", code or 1006, "closed")
        if self._error is None and code not in _RESUMABLE_CLOSE:
            reason = ws.close_reason if ws is not None else ""
            raise ServerError(f"the server closed the connection with code {code} ({quoted(reason)}) and no error "
                              f"message: a refusal, not resumed", code, "closed")
        while self._tries < self.reconnect:
            await asyncio.sleep(min(2.0, 0.05 * 2**self._tries))
            self._tries += 1  # back to 0 at the next new result
            try:
                self._error = None
                await self._connect()
                self.reconnects += 1
                log.info("resumed stream at chunk %s after close code %s", self.ready.get("next_seq"), code)
                return
            except ServerError as exc:
                if exc.code == STREAM_LOST:
                    self._restart()
                elif exc.code not in _RETRYABLE:
                    raise
            except (OSError, ConnectionClosed, InvalidStatus, asyncio.TimeoutError):
                continue
        raise ProtocolError(f"could not resume the stream: {self.reconnect} reconnection attempts in a row brought "
                            f"no new result (last close code {code})", 1006, "resume_failed")

    # -- streaming -------------------------------------------------------------------------------

    def _frame(self, chunk: np.ndarray | str | bytes) -> str | bytes:
        if self.format == "text":
            if not isinstance(chunk, str):
                raise DataFormatError(f"text streams send str chunks of bases, got {type(chunk).__name__}")
            return chunk
        if isinstance(chunk, bytes):
            return chunk
        a = np.asarray(chunk)
        if self.format == "mulaw8":
            if a.dtype != np.uint8:
                raise DataFormatError(f"mulaw8 streams send G.711 mu-law code bytes (bytes or uint8 arrays), got {a.dtype}")
            return a.tobytes()
        if self.format == "s16le":
            if a.dtype != np.int16:
                a = np.clip(np.round(a.astype(np.float64) * 32768.0), -32768, 32767)
            return a.astype("<i2").tobytes()
        return a.astype("<f4").tobytes()

    async def send(self, chunk: np.ndarray | str | bytes) -> int:
        """Send one chunk ((l, c) or (l,) samples, or a str of bases); returns its seq."""
        return await self._send(self._frame(chunk))

    async def reset(self) -> int:
        """Set the stream's state back to zero (the samples sent from now on are read as a new
        stream's); returns the reset's seq (its result has ``reset`` set)."""
        return await self._send(json.dumps({"type": "reset"}))

    async def _send(self, frame: str | bytes) -> int:
        """Send a frame that takes a seq (data or a reset), kept until answered (and saved)."""
        while True:
            if self._error is not None and not (isinstance(self._error, ServerError) and self._error.code in _RETRYABLE):
                raise self._error
            await self._wait_until(lambda: len(self._pending) < self.window or self._reader.done(), self.timeout)
            if self._reader.done():
                await self._recover()
                continue
            break
        seq = self._next_seq
        self._next_seq += 1
        self._pending[seq] = _Pending(seq, frame)
        try:
            if self._last_seq - self._acked >= self.window:  # lets the server trim its replay buffer
                await self._ws.send(json.dumps({"type": "ack", "seq": self._last_seq}))
                self._acked = self._last_seq
            await self._ws.send(frame)
        except ConnectionClosed:
            pass  # the reader notices; the frame is resent after resume
        return seq

    async def end(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for every result, send ``end`` and return the server's summary (ServerTimeout
        after ``timeout`` seconds)."""
        try:
            async with asyncio.timeout(timeout):
                return await self._end()
        except TimeoutError as exc:
            if isinstance(exc, ServerTimeout):
                raise
            why = (f"{len(self._pending)} chunk(s) still wait for their results" if self._pending
                   else "the server sent no summary after end")
            raise ServerTimeout(f"the stream did not end within {timeout:g} s: {why}", INTERNAL_ERROR,
                                "end_timeout") from None

    async def _end(self) -> dict[str, Any]:
        while True:
            await self._wait_until(lambda: not self._pending or self._reader.done(), self.timeout)
            if self._reader.done():
                await self._recover()
                continue
            self._summary = asyncio.get_running_loop().create_future()
            try:
                await self._ws.send(json.dumps({"type": "end"}))
            except ConnectionClosed:
                await self._recover()
                continue
            await asyncio.wait([self._summary, self._reader], return_when=asyncio.FIRST_COMPLETED)
            if self._summary.done():
                return self._summary.result()
            await self._recover()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # -- results ---------------------------------------------------------------------------------

    def outputs(self) -> np.ndarray | None:
        """All outputs so far, concatenated in time: (samples, o)."""
        parts = [r.outputs for r in self.results if r.outputs is not None]
        return np.concatenate(parts) if parts else None

    def scores(self) -> np.ndarray | None:
        parts = [r.scores for r in self.results if r.scores is not None]
        return np.concatenate(parts) if parts else None


async def server_sample_rate(url: str, *, format: str, sample_rate: int, channels: int = 1, token: str | None = None,
                             ssl: ssl_lib.SSLContext | None = None, wait: float = 0.0) -> int | None:
    """The sample rate of the server's model (None: it has none), read from the ``ready`` of a
    stream opened and closed at once (it sends no data, so the server keeps nothing); ``wait`` as
    for :class:`StreamClient`."""
    async with StreamClient(url, format=format, sample_rate=sample_rate, channels=channels, token=token,
                            reconnect=0, ssl=ssl, wait=wait) as probe:
        return probe.ready.get("model_sample_rate")
