"""The streaming wire protocol, version 1 (documented with examples in service/PROTOCOL.md).

Client -> server:
    text   {"type": "start", "version": 1, "format": "f32le"|"s16le"|"mulaw8"|"text",
            "sample_rate": int, "channels": int, "resume": token?, "ack": int?,
            "results": "json"|"binary"?, "include": ["outputs", "scores"]?}
    binary samples, channels interleaved (f32le: 4 bytes, s16le: 2 bytes little-endian,
           mulaw8: 1 byte G.711 mu-law)
    text   bases "ACGTN..." (format "text" only; any frame starting with "{" is a control message)
    text   {"type": "ping", "id"?} | {"type": "reset"} | {"type": "ack", "seq"} | {"type": "end"}
Server -> client:
    {"type": "ready", ...}              once, after start (carries the resume token)
    {"type": "result", "seq", "start", "n", "outputs": [[o floats] x n], "scores": [n floats]}
        or a binary result frame (``results: "binary"``, layout in :data:`RESULT_HEADER`);
        a reset's answer carries "reset": true (binary: flag bit 2)
    {"type": "pong", "id"?}             answers a ping
    {"type": "summary", ...}            after end, then close 1000
    {"type": "error", "code", "reason", "message"}  then close with ``code``

Shape legend: l samples in a frame, c channels, o model output width.

Everything here is pure parsing/encoding: no I/O, no model. Errors are
:class:`~streamssm.errors.ProtocolError` carrying the websocket close code to answer with.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from streamssm.encoding import DNA_ALPHABET, IUPAC_AMBIGUOUS
from streamssm.errors import ProtocolError

PROTOCOL_VERSION = 1
FORMATS = ("f32le", "s16le", "mulaw8", "text")
SAMPLE_BYTES = {"f32le": 4, "s16le": 2, "mulaw8": 1}
#: input sample rates a resampled stream may declare (Hz)
RESAMPLE_RATES = (1000, 768000)
PING_ID_CHARS = 64  # longest string id a ping may carry (echoed in its pong)
#: longest JSON control message (start, end, ack, ping, reset): the largest real one, a start with a
#: resume token, is ~300 bytes; a megabyte of JSON parsed on the event loop stalled every stream
MAX_CONTROL_BYTES = 8192
RESULT_ENCODINGS = ("json", "binary")
INCLUDE_FIELDS = ("outputs", "scores")
#: every base letter a DNA model may read (ambiguity codes -> N); a model's own set is ServingSpec.accepted_bases
IUPAC_ALPHABET = DNA_ALPHABET + IUPAC_AMBIGUOUS
JSON_DECIMALS = 6  # JSON results are rounded to this many decimals; binary results are exact fp32
MAX_CHANNELS = 256  # interleaved channels a start may declare
#: bytes one result value counts for against the result limit (JSON: a rounded number and a comma,
#: a fixed upper estimate; binary: one float32)
RESULT_VALUE_BYTES = {"json": 16, "binary": 4}

# close codes (RFC 6455 / IANA), named as websockets.frames.CloseCode names them
NORMAL_CLOSURE = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
STREAM_LOST = 4410  # application code: the token was ours, its state is gone; start a new stream

#: binary result frame: magic b"SSR1", seq u32, start u64 (sample offset), n u32, o u32,
#: flags u32 (bit 0: outputs present, bit 1: scores present); then n*o f32le outputs
#: (row-major, sample by sample), then n f32le scores.
RESULT_HEADER = struct.Struct("<4sIQIII")
RESULT_MAGIC = b"SSR1"
_HAS_OUTPUTS, _HAS_SCORES, _RESET = 1, 2, 4

Format = Literal["f32le", "s16le", "mulaw8", "text"]
NanPolicy = Literal["reject", "zero"]


@dataclass(frozen=True)
class StreamSpec:
    """What the loaded model accepts: allowed formats, sample rate and channel count
    (None: any, mixed down to mono by the mean), the base alphabet for ``text`` streams;
    ``resample``: any input rate in :data:`RESAMPLE_RATES` is accepted (the server resamples
    to ``sample_rate``), else the rate must equal the model's."""

    formats: tuple[str, ...]
    sample_rate: int | None = None
    channels: int | None = None
    alphabet: str = IUPAC_ALPHABET
    resample: bool = False


@dataclass(frozen=True)
class Start:
    """A validated ``start`` message."""

    format: Format
    sample_rate: int | None
    channels: int
    resume: str | None = None
    ack: int = -1  # last result seq the client holds (resume replays seq > ack)
    results: Literal["json", "binary"] = "json"
    include: tuple[str, ...] = INCLUDE_FIELDS
    version: int = PROTOCOL_VERSION


@dataclass
class Result:
    """One decoded result (client side): outputs (n, o) and scores (n,) as float32 arrays."""

    seq: int
    start: int
    outputs: np.ndarray | None
    scores: np.ndarray | None
    reset: bool = False  # the answer to a reset: the stream's state is zero after it
    n: int = -1  # samples (the server's count: a result with neither array has some too); -1: the arrays'

    def __post_init__(self) -> None:
        if self.n < 0:
            self.n = int((self.outputs if self.outputs is not None else
                          self.scores if self.scores is not None else np.empty(0)).shape[0])


# ---------------------------------------------------------------------------- client -> server


def parse_control(text: str) -> dict[str, Any]:
    """A JSON control message -> dict with a string ``type``; ProtocolError 1007/1008 otherwise,
    1009 ``control_too_big`` over MAX_CONTROL_BYTES characters (not parsed)."""
    if len(text) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(text)} characters exceeds the limit of {MAX_CONTROL_BYTES}",
                            MESSAGE_TOO_BIG, "control_too_big")
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers over int_max_str_digits
        raise ProtocolError(f"control message is not valid JSON: {exc}", INVALID_DATA, "bad_json") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(
            'control message must be a JSON object with a string "type", got ' + quoted(text),
            POLICY_VIOLATION, "bad_message",
        )
    return msg


def parse_start(msg: dict[str, Any], spec: StreamSpec) -> Start:
    """Validate a ``start`` message against the protocol and what the model accepts."""
    if msg.get("type") != "start":
        raise ProtocolError(f'the first message must be {{"type": "start", ...}}, got type {quoted(msg.get("type"))}',
                            POLICY_VIOLATION, "bad_start")
    known = {"type", "version", "format", "sample_rate", "channels", "resume", "ack", "results", "include"}
    unknown = sorted(set(msg) - known)
    if unknown:
        raise ProtocolError(f"start: unknown fields {quoted(unknown)}; expected some of {sorted(known)}",
                            POLICY_VIOLATION, "bad_start")
    version = msg.get("version", PROTOCOL_VERSION)
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and true are not 1
        raise ProtocolError(f"start: protocol version {quoted(version)} is not supported; this server speaks {PROTOCOL_VERSION}",
                            POLICY_VIOLATION, "bad_version")
    fmt = msg.get("format")
    if fmt not in FORMATS:
        raise ProtocolError(f"start: format must be one of {list(FORMATS)}, got {quoted(fmt)}", UNSUPPORTED_DATA, "bad_format")
    if fmt not in spec.formats:
        raise ProtocolError(f"start: this model accepts formats {list(spec.formats)}, got {quoted(fmt)}",
                            UNSUPPORTED_DATA, "bad_format")
    channels = _int_field(msg, "channels", 1, minimum=1, maximum=MAX_CHANNELS)
    sample_rate = msg.get("sample_rate")
    if sample_rate is not None or (fmt != "text" and spec.sample_rate is not None):
        sample_rate = _int_field(msg, "sample_rate", None, minimum=1)
    if fmt == "text":
        if channels != 1:
            raise ProtocolError(f"start: text streams have 1 channel, got channels={channels}", POLICY_VIOLATION, "bad_channels")
    else:
        if spec.sample_rate is not None and sample_rate != spec.sample_rate:
            low, high = RESAMPLE_RATES
            if not spec.resample:
                raise ProtocolError(f"start: this model runs at sample_rate {spec.sample_rate} Hz, got {sample_rate}",
                                    POLICY_VIOLATION, "bad_sample_rate")
            if not low <= sample_rate <= high:
                raise ProtocolError(f"start: sample_rate {sample_rate} Hz is outside {low}..{high} Hz, the rates "
                                    f"this server resamples to the model's {spec.sample_rate} Hz",
                                    POLICY_VIOLATION, "bad_sample_rate")
        if spec.channels is not None and channels != spec.channels:
            raise ProtocolError(f"start: this model takes {spec.channels} channel(s), got channels={channels}",
                                POLICY_VIOLATION, "bad_channels")
    resume = msg.get("resume")
    if resume is not None and (not isinstance(resume, str) or not 16 <= len(resume) <= 128):
        raise ProtocolError("start: resume must be the token string a ready message gave", POLICY_VIOLATION, "bad_resume")
    ack = _int_field(msg, "ack", -1, minimum=-1)
    results = msg.get("results", "json")
    if results not in RESULT_ENCODINGS:
        raise ProtocolError(f"start: results must be one of {list(RESULT_ENCODINGS)}, got {quoted(results)}",
                            POLICY_VIOLATION, "bad_start")
    include = msg.get("include", list(INCLUDE_FIELDS))
    if not isinstance(include, list) or not all(f in INCLUDE_FIELDS for f in include):
        raise ProtocolError(f"start: include must be a list drawn from {list(INCLUDE_FIELDS)}, got {quoted(include)}",
                            POLICY_VIOLATION, "bad_start")
    return Start(fmt, sample_rate, channels, resume, ack, results, tuple(f for f in INCLUDE_FIELDS if f in include), version)


def parse_ping(msg: dict[str, Any]) -> str:
    """A ``ping`` control message -> its ``pong`` answer (echoing ``id``: an int or a string of
    at most PING_ID_CHARS characters); ProtocolError 1008 ``bad_message`` otherwise."""
    extra = sorted(set(msg) - {"type", "id"})
    ping_id = msg.get("id")
    if extra or not (ping_id is None or type(ping_id) is int
                     or (isinstance(ping_id, str) and len(ping_id) <= PING_ID_CHARS)):
        raise ProtocolError(f'ping: expected {{"type": "ping"}} with an optional "id" (an integer or a string of '
                            f'at most {PING_ID_CHARS} characters), got {quoted(msg)}',
                            POLICY_VIOLATION, "bad_message")
    return dumps({"type": "pong"} if ping_id is None else {"type": "pong", "id": ping_id})


def _g711_mulaw_table() -> np.ndarray:
    """The ITU-T G.711 mu-law expansion of every code byte 0..255 -> linear PCM (256,) int16
    in -32124..32124 (the code is stored inverted: 0xFF and 0x7F are 0, 0x00 is -32124)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


#: G.711 mu-law code byte -> float32 sample (linear PCM / 32768, like s16le)
MULAW8_TO_FLOAT = _g711_mulaw_table().astype(np.float32) / np.float32(32768.0)


def check_frame(data: bytes, start: Start) -> None:
    """ProtocolError unless ``data`` is a non-empty binary frame of whole samples of ``start``'s
    format and channel count."""
    if start.format == "text":
        raise ProtocolError("binary frame in a text stream: send bases as text frames", UNSUPPORTED_DATA, "binary_in_text")
    width = SAMPLE_BYTES[start.format] * start.channels
    if not data:
        raise ProtocolError("empty binary frame", INVALID_DATA, "empty_frame")
    if len(data) % width:
        raise ProtocolError(
            f"binary frame of {len(data)} bytes is not a whole number of {start.format} samples "
            f"x {start.channels} channel(s) ({width} bytes each)", INVALID_DATA, "partial_sample",
        )


#: formats whose every sample is one of a few codes (read as unsigned little-endian integers)
CODE_DTYPES = {"s16le": np.dtype("<u2"), "mulaw8": np.dtype(np.uint8)}


def decode_samples(data: bytes, start: Start, nan_policy: NanPolicy = "reject") -> np.ndarray:
    """A binary frame -> float32 samples (l, c). s16le is scaled to [-1, 1) by 1/32768; mulaw8
    bytes are G.711 mu-law codes, expanded to linear PCM and scaled the same way.

    Non-finite f32 samples raise ProtocolError 1007 (``nan_policy="reject"``) or become 0.
    """
    check_frame(data, start)
    if start.format == "s16le":
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif start.format == "mulaw8":
        x = MULAW8_TO_FLOAT[np.frombuffer(data, dtype=np.uint8)]
    else:
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            if nan_policy == "reject":
                bad = int((~finite).sum())
                raise ProtocolError(f"frame holds {bad} NaN/inf sample value(s); this server rejects them",
                                    INVALID_DATA, "non_finite")
            x = np.where(finite, x, np.float32(0.0))
    return x.reshape(-1, start.channels)  # (l, c)


def decode_bases(text: str, alphabet: str = IUPAC_ALPHABET) -> str:
    """A text frame of bases -> the same bases upper-cased; ProtocolError 1007 on other characters.

    Characters are checked before any case mapping, against the ASCII letters of ``alphabet``
    in either case: Unicode case mapping can change lengths (``ß`` -> ``SS``, ``ﬆ`` -> ``ST``) or
    map other letters onto bases (``ſ`` -> ``S``), so only one character = one base holds."""
    if not text:
        raise ProtocolError("empty text frame", INVALID_DATA, "empty_frame")
    bad = set(text) - _case_alphabet(alphabet)
    if bad:
        shown = "".join(sorted(bad))[:20]
        raise ProtocolError(f"text frame holds characters outside {alphabet}: {shown!r}", INVALID_DATA, "bad_bases")
    return text.upper()


def _case_alphabet(alphabet: str) -> frozenset[str]:
    """The ASCII letters of ``alphabet`` in upper and lower case."""
    letters = [ch for ch in alphabet if ch.isascii()]
    return frozenset(letters + [ch.lower() for ch in letters])


# ---------------------------------------------------------------------------- server -> client


def dumps(msg: dict[str, Any]) -> str:
    """Compact JSON for a server message."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False)


def ready_message(*, token: str, model: str, head: str, output_dim: int, next_seq: int, samples: int,
                  resumed: bool, start: Start, queue_depth: int, saved_seq: int | None = None,
                  model_sample_rate: int | None = None, downmix: str | None = None) -> str:
    """``saved_seq``: the last chunk whose state is on disk (-1: none yet), None without write-ahead.
    ``model_sample_rate``: the rate results are counted in (the server resamples when it differs
    from ``start.sample_rate``); ``downmix``: how channels become the model's one (``"mean"``)."""
    return dumps({
        "type": "ready", "version": PROTOCOL_VERSION, "resume": token, "model": model, "head": head,
        "output_dim": output_dim, "next_seq": next_seq, "samples": samples, "resumed": resumed,
        "queue_depth": queue_depth, "saved_seq": saved_seq,
        "format": start.format, "sample_rate": start.sample_rate, "channels": start.channels,
        "results": start.results, "include": list(start.include),
        "model_sample_rate": model_sample_rate,
        "resample": model_sample_rate is not None and start.sample_rate not in (None, model_sample_rate),
        "downmix": downmix,
    })


def error_message(exc: ProtocolError) -> str:
    return dumps({"type": "error", "code": exc.code, "reason": exc.reason, "message": str(exc)})


def close_reason(exc: ProtocolError) -> str:
    """The close frame's reason: at most 123 bytes of UTF-8."""
    return exc.reason.encode()[:123].decode(errors="ignore")


def _rounded(a: np.ndarray) -> list:
    """fp32 array -> nested lists of short floats (JSON_DECIMALS); non-finite values become null."""
    r = np.round(a.astype(np.float64), JSON_DECIMALS)
    if np.isfinite(r).all():
        return r.tolist()
    return _nan_to_none(r.tolist())


def _nan_to_none(v):
    if isinstance(v, list):
        return [_nan_to_none(u) for u in v]
    return v if math.isfinite(v) else None


def result_bytes(n: int, o: int, has_scores: bool, start: Start) -> int:
    """What a result of n samples counts against the result limit: n x (o outputs if included,
    + 1 score if included and the head has scores) x RESULT_VALUE_BYTES[start.results]."""
    values = (o if "outputs" in start.include else 0) + (1 if has_scores and "scores" in start.include else 0)
    return n * values * RESULT_VALUE_BYTES[start.results]


@dataclass
class ResultPiece:
    """The encoded outputs/scores of consecutive samples of one chunk (see :func:`join_result`)."""

    n: int
    outputs: str | bytes | None  # JSON: rows without the enclosing brackets; binary: f32le bytes
    scores: str | bytes | None


def result_piece(outputs: np.ndarray, scores: np.ndarray | None, start: Start) -> ResultPiece:
    """Encode the results of some consecutive samples: outputs (k, o) float32, scores (k,) or None."""
    def enc(a: np.ndarray) -> str | bytes:
        if start.results == "binary":
            return np.ascontiguousarray(a, dtype="<f4").tobytes()
        return dumps(_rounded(a))[1:-1]

    want_scores = "scores" in start.include and scores is not None
    return ResultPiece(int(outputs.shape[0]), enc(outputs) if "outputs" in start.include else None,
                       enc(scores) if want_scores else None)


def join_result(seq: int, start_sample: int, o: int, pieces: list[ResultPiece], start: Start,
                reset: bool = False) -> str | bytes:
    """The pieces of one chunk, in order -> its JSON text message or binary frame (no pieces:
    a result of n = 0 samples, without outputs or scores). ``reset``: it answers a reset."""
    n = sum(p.n for p in pieces)
    outs = [p.outputs for p in pieces if p.outputs is not None]
    scores = [p.scores for p in pieces if p.scores is not None]
    has_out, has_scores = bool(pieces) and len(outs) == len(pieces), bool(pieces) and len(scores) == len(pieces)
    if start.results == "binary":
        flags = (_HAS_OUTPUTS if has_out else 0) | (_HAS_SCORES if has_scores else 0) | (_RESET if reset else 0)
        head = RESULT_HEADER.pack(RESULT_MAGIC, seq, start_sample, n, o, flags)
        return b"".join([head, *(outs if has_out else []), *(scores if has_scores else [])])  # type: ignore[list-item]
    text = dumps({"type": "result", "seq": seq, "start": start_sample, "n": n, **({"reset": True} if reset else {})})[:-1]
    if has_out:
        text += ',"outputs":[' + ",".join(s for s in outs if s) + "]"  # type: ignore[misc]
    if has_scores:
        text += ',"scores":[' + ",".join(s for s in scores if s) + "]"  # type: ignore[misc]
    return text + "}"


def encode_result(seq: int, start_sample: int, outputs: np.ndarray, scores: np.ndarray | None,
                  start: Start) -> str | bytes:
    """One chunk's result as a JSON text message or a binary frame (``start.results``).

    outputs (n, o) float32; scores (n,) float32 or None (heads without scores).
    """
    return join_result(seq, start_sample, int(outputs.shape[1]), [result_piece(outputs, scores, start)], start)


def decode_result(message: str | bytes) -> Result | dict[str, Any]:
    """Client side: a server message -> :class:`Result` (result messages) or the parsed dict (a
    JSON object with a string ``type``); ProtocolError 1007 naming what is malformed."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
        if len(data) < RESULT_HEADER.size or data[:4] != RESULT_MAGIC:
            raise ProtocolError("binary message is not a result frame (bad magic)", INVALID_DATA, "bad_result")
        _, seq, start_sample, n, o, flags = RESULT_HEADER.unpack_from(data)
        off = RESULT_HEADER.size
        outputs = scores = None
        expected = off + (n * o * 4 if flags & _HAS_OUTPUTS else 0) + (n * 4 if flags & _HAS_SCORES else 0)
        if len(data) != expected:
            raise ProtocolError(f"result frame has {len(data)} bytes, its header says {expected}", INVALID_DATA, "bad_result")
        if flags & _HAS_OUTPUTS:
            outputs = np.frombuffer(data, dtype="<f4", count=n * o, offset=off).reshape(n, o)
            off += n * o * 4
        if flags & _HAS_SCORES:
            scores = np.frombuffer(data, dtype="<f4", count=n, offset=off)
        return Result(seq, start_sample, outputs, scores, bool(flags & _RESET), n)
    try:
        msg = json.loads(message)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the server sent a message that is not valid JSON ({exc}): {quoted(message)}",
                            INVALID_DATA, "bad_json") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f'the server sent a message that is not a JSON object with a string "type": '
                            f"{quoted(message)}", INVALID_DATA, "bad_message")
    if msg["type"] != "result":
        return msg
    seq, start, n = msg.get("seq"), msg.get("start"), msg.get("n")
    bad = [f"{k}={quoted(v)}" for k, v in (("seq", seq), ("start", start), ("n", n)) if not json_int(v, 0)]
    if bad:
        raise ProtocolError(f"result with bad or missing {', '.join(bad)} (integers >= 0)", INVALID_DATA, "bad_result")
    try:
        outputs = None if msg.get("outputs") is None else np.asarray(msg["outputs"], dtype=np.float32)
        scores = None if msg.get("scores") is None else np.asarray(msg["scores"], dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"result {seq}: outputs or scores are not arrays of numbers ({exc})",
                            INVALID_DATA, "bad_result") from None
    if outputs is not None and n == 0 and outputs.size == 0:
        outputs = outputs.reshape(0, 0)
    if outputs is not None and (outputs.ndim != 2 or outputs.shape[0] != n):
        raise ProtocolError(f"result {seq}: outputs of shape {outputs.shape} for n={n} samples", INVALID_DATA, "bad_result")
    if scores is not None and scores.shape != (n,):
        raise ProtocolError(f"result {seq}: scores of shape {scores.shape} for n={n} samples", INVALID_DATA, "bad_result")
    return Result(seq, start, outputs, scores, msg.get("reset") is True, n)


# ---------------------------------------------------------------------------- helpers


def _int_field(msg: dict[str, Any], name: str, default: int | None, minimum: int,
               maximum: int = 2**31 - 1) -> int:
    value = msg.get(name, default)
    if value is None:
        raise ProtocolError(f"start: {name} is required", POLICY_VIOLATION, f"bad_{name}")
    if not json_int(value, minimum) or value > maximum:
        raise ProtocolError(f"start: {name} must be an integer from {minimum} to {maximum}, got {quoted(value)}",
                            POLICY_VIOLATION, f"bad_{name}")
    return value


#: the repr of client values quoted in errors: bounded in length, depth and items (a megabyte-long
#: start field was echoed whole into the error message and the server's log)
_CLIENT_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_CLIENT_REPR.maxlevel, _CLIENT_REPR.maxdict, _CLIENT_REPR.maxlist = 2, 4, 6
_CLIENT_REPR.maxstring, _CLIENT_REPR.maxlong, _CLIENT_REPR.maxother = 60, 40, 60


def json_int(value: Any, minimum: int) -> bool:
    """``value`` is a JSON integer (not a bool, not a float) >= ``minimum``."""
    return type(value) is int and value >= minimum


def quoted(value: Any, limit: int = 80) -> str:
    """A client's value as an error message quotes it: a repr of at most ``limit`` characters."""
    text = _CLIENT_REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
