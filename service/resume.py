"""Parked streams: a disconnected stream's state snapshot, kept for ``ttl`` seconds so the client
can resume it with its token; optionally persisted to a directory so that a restarted server
(same checkpoint) resumes it too, and written ahead while the stream is live so a crash loses
at most one write-ahead interval.

Tokens are 16 random bytes plus a 16-byte HMAC-SHA256 tag over them and the owner (the SHA-256
of the bearer token that created the stream), keyed by a secret kept in the state dir (file
mode 0600) or in memory. The tag tells a token this server (or its predecessor with the same
state dir) issued, whose state is gone (``stream_lost``), from one it never issued
(``bad_resume``). A stream's file ``<sha256 of token>.safetensors`` is one state record
(``streamssm.state``): the Streamer snapshot's tensors and metadata, the replay buffer as
uint8 tensors and the other fields as JSON (metadata ``parked``); ``.json`` files of servers
before 2026-12-05 still load. Files are named by the SHA-256 of the token, so nothing a client
sends is used as a path; they are written atomically (temporary file + rename) with mode 0600, since
LM scores reveal the input. Parked streams are capped in count and bytes (oldest evicted).
Every method does file I/O: the server calls them through ``asyncio.to_thread``; a lock makes
them safe to call from several threads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamssm.errors import ConfigError, ProtocolError, StateError
from streamssm.state import read_state_record, state_to_bytes

from .protocol import POLICY_VIOLATION, STREAM_LOST

log = logging.getLogger(__name__)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
FILE_FORMAT = "streamssm-parked-stream-1"
_KEY_FILE = "resume.key"
_RANDOM_BYTES = _TAG_BYTES = 16
_REPLAY = "replay."  # extra tensors of a parked-stream file: the replayed messages, in order


def owner_of(bearer: str | None) -> str:
    """What a resume token is bound to: the SHA-256 of the bearer token ('' without auth)."""
    return "" if not bearer else hashlib.sha256(bearer.encode()).hexdigest()


@dataclass
class Parked:
    """A stream between connections (or a live stream's write-ahead copy)."""

    snapshot: bytes  # Streamer.snapshot bytes
    owner: str
    settings: dict[str, Any]  # format, sample_rate, channels, results, include of the original start
    next_seq: int  # seq of the first chunk not in the snapshot
    samples: int  # samples in the snapshot
    stats: dict[str, Any]  # summary accumulators
    replay: list[tuple[int, str | bytes]] = field(default_factory=list)  # last results (seq, message)
    expires: float = 0.0  # time.time() after which the token is void

    @property
    def nbytes(self) -> int:
        return len(self.snapshot) + sum(len(m) for _, m in self.replay)

    def to_bytes(self) -> bytes:
        """The file form: the snapshot's state record (``state_to_bytes``) with the replayed
        messages as extra uint8 tensors ``replay.<i>`` and the other fields as JSON in metadata
        ``parked``. Equal streams give equal bytes."""
        record = read_state_record(self.snapshot)
        tensors = dict(record.tensors)
        kinds = []
        for i, (seq, message) in enumerate(self.replay):
            tensors[f"{_REPLAY}{i}"] = _replay_tensor(message)
            kinds.append([seq, "bytes" if isinstance(message, bytes) else "text"])
        fields = {k: v for k, v in asdict(self).items() if k not in ("snapshot", "replay")}
        meta = dict(record.metadata, parked=json.dumps({"format": FILE_FORMAT, **fields, "replay": kinds}))
        return state_to_bytes(record.state, meta, tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> Parked:
        """Inverse of :meth:`to_bytes` (``snapshot`` comes back byte for byte)."""
        record = read_state_record(data)
        meta = dict(record.metadata)
        fields = json.loads(meta.pop("parked", "{}"))
        if fields.pop("format", None) != FILE_FORMAT:
            raise StateError(f"not a parked-stream file (metadata parked.format is not {FILE_FORMAT!r})")
        tensors = dict(record.tensors)
        replay = [(seq, _replay_message(tensors.pop(f"{_REPLAY}{i}"), kind))
                  for i, (seq, kind) in enumerate(fields.pop("replay"))]
        snapshot = state_to_bytes(record.state, meta, tensors)
        return cls(snapshot=snapshot, replay=replay, **fields)

    @classmethod
    def from_json(cls, text: str) -> Parked:
        """A parked-stream file of the JSON form written before 2026-12-05 (base64 snapshot), so
        streams parked by an older server still resume after an upgrade."""
        d = json.loads(text)
        if d.pop("format", None) != FILE_FORMAT:
            raise ValueError("not a parked-stream file")
        d["snapshot"] = base64.b64decode(d["snapshot"])
        d["replay"] = [(r["seq"], base64.b64decode(r["b64"]) if "b64" in r else r["text"]) for r in d["replay"]]
        return cls(**d)


def _replay_tensor(message: str | bytes) -> torch.Tensor:
    """A result message as a (bytes,) uint8 tensor (text as UTF-8)."""
    raw = message if isinstance(message, bytes) else message.encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def _replay_message(t: torch.Tensor, kind: str) -> str | bytes:
    raw = t.numpy().tobytes()
    return raw if kind == "bytes" else raw.decode()


class TokenMint:
    """Makes and checks resume tokens with one 32-byte key (a store's; a ``serve --workers``
    worker gets the engine process's, so its tokens resume anywhere)."""

    def __init__(self, key: bytes):
        self.key = key

    def _tag(self, random_part: bytes, owner: str) -> bytes:
        return hmac.new(self.key, random_part + owner.encode(), hashlib.sha256).digest()[:_TAG_BYTES]

    def new_token(self, owner: str) -> str:
        """A fresh resume token bound to ``owner`` (43 URL-safe characters)."""
        r = secrets.token_bytes(_RANDOM_BYTES)
        return base64.urlsafe_b64encode(r + self._tag(r, owner)).rstrip(b"=").decode()

    def issued(self, token: str, owner: str) -> bool:
        """Whether this key issued ``token`` for ``owner``."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return False
        if len(raw) != _RANDOM_BYTES + _TAG_BYTES:
            return False
        return hmac.compare_digest(raw[_RANDOM_BYTES:], self._tag(raw[:_RANDOM_BYTES], owner))


class ResumeStore:
    """Parked streams by token, in memory and (with ``state_dir``) on disk.

    At most ``max_parked`` streams and ``max_bytes`` bytes (snapshots + replay buffers) are
    kept in memory; parking beyond that evicts the oldest (memory and file).
    """

    def __init__(self, ttl: float, state_dir: str | Path | None = None, max_parked: int = 1024,
                 max_bytes: int = 1 << 30):
        if ttl < 0:
            raise ConfigError(f"resume_ttl must be >= 0 seconds, got {ttl}")
        if max_parked < 1 or max_bytes < 1:
            raise ConfigError(f"parked-stream caps must be >= 1, got {max_parked} streams, {max_bytes} bytes")
        self.ttl, self.max_parked, self.max_bytes = ttl, max_parked, max_bytes
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._lock = threading.RLock()
        self._parked: dict[str, Parked] = {}  # insertion order = parking order (oldest first)
        self._bytes = 0
        self.mint = TokenMint(self._load_key())

    def _load_key(self) -> bytes:
        if self.state_dir is None:
            return secrets.token_bytes(32)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / _KEY_FILE
        if not path.is_file():
            _write_private(path, secrets.token_bytes(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise ConfigError(f"{path} is not a 32-byte resume key; delete it to start afresh")
        return key

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._parked)

    @property
    def nbytes(self) -> int:
        """Bytes held by parked streams in memory."""
        return self._bytes

    def new_token(self, owner: str) -> str:
        return self.mint.new_token(owner)

    def issued(self, token: str, owner: str) -> bool:
        return self.mint.issued(token, owner)

    # -- parking ---------------------------------------------------------------------------

    def _path(self, token: str, suffix: str = ".safetensors") -> Path:
        """The token's file (``.json``: the form written before 2026-12-05)."""
        assert self.state_dir is not None
        return self.state_dir / (hashlib.sha256(token.encode()).hexdigest() + suffix)

    def park(self, token: str, parked: Parked, renew: bool = True) -> None:
        """Keep ``parked`` for ``ttl`` seconds (and write it to ``state_dir``); ``renew=False``
        puts back a stream that failed to resume, keeping its expiry time."""
        if not self.enabled:
            return
        with self._lock:
            if renew or not parked.expires:
                parked.expires = time.time() + self.ttl
            self._drop_memory(token)
            self._parked[token] = parked
            self._bytes += parked.nbytes
            self._write(token, parked)
            while len(self._parked) > self.max_parked or self._bytes > self.max_bytes:
                oldest = next(iter(self._parked))
                log.info("parked-stream cap reached (%d streams, %d bytes): evicting the oldest",
                         len(self._parked), self._bytes)
                self.forget(oldest)

    def write_ahead(self, token: str, parked: Parked) -> None:
        """Write a live stream's state to ``state_dir`` only (what a crash leaves to resume)."""
        if not self.enabled or self.state_dir is None:
            return
        parked.expires = time.time() + self.ttl
        with self._lock:
            self._write(token, parked)

    def _write(self, token: str, parked: Parked) -> None:
        if self.state_dir is None:
            return
        path = self._path(token)
        tmp = path.with_suffix(".tmp")
        _write_private(tmp, parked.to_bytes())
        os.utime(tmp, (parked.expires, parked.expires))  # mtime = expiry: sweep needs no parsing
        os.replace(tmp, path)  # atomic: a crash never leaves half a file under the real name
        self._path(token, ".json").unlink(missing_ok=True)  # an older server's file of this stream

    def take(self, token: str, owner: str) -> Parked:
        """Remove and return the parked stream. Its file stays until the stream is parked or
        written ahead again, or :meth:`forget` (so a crash right after a resume loses nothing).

        ProtocolError 1008 ``bad_resume`` when the token is malformed, was not issued here or
        belongs to another bearer token (the message does not say which); ``STREAM_LOST``
        (4410, ``stream_lost``) when it was issued here but its state is gone (expired,
        evicted, or the server died before writing it)."""
        # (an expired token of ours is stream_lost below: "expired" here misled a client into waiting)
        unknown = ProtocolError("resume token was not issued by this server (or belongs to another bearer "
                                "token); start a new stream without resume", POLICY_VIOLATION, "bad_resume")
        if not _TOKEN_RE.match(token) or not self.issued(token, owner):
            raise unknown
        with self._lock:
            parked = self._parked.get(token)
            if parked is None and self.state_dir is not None:
                parked = self._load(token)
            if parked is None or parked.expires < time.time():
                self.forget(token)
                raise ProtocolError("the stream of this resume token is lost (expired, evicted or not yet "
                                    "saved when the server stopped); start a new stream and send its data "
                                    "from the beginning", STREAM_LOST, "stream_lost")
            if not hmac.compare_digest(parked.owner, owner):
                raise unknown
            self._drop_memory(token)
            return parked

    def _load(self, token: str) -> Parked | None:
        for path, read in ((self._path(token), lambda p: Parked.from_bytes(p.read_bytes())),
                           (self._path(token, ".json"), lambda p: Parked.from_json(p.read_text()))):
            if path.is_file():
                try:
                    return read(path)
                except (StateError, ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring unreadable parked stream %s: %s", path.name, exc)
        return None

    def _drop_memory(self, token: str) -> None:
        gone = self._parked.pop(token, None)
        if gone is not None:
            self._bytes -= gone.nbytes

    def forget(self, token: str) -> None:
        """Drop the stream of ``token`` from memory and disk (it ended, failed or expired)."""
        with self._lock:
            self._drop_memory(token)
            if self.state_dir is not None:
                self._path(token).unlink(missing_ok=True)
                self._path(token, ".json").unlink(missing_ok=True)

    def sweep(self) -> int:
        """Drop expired streams (memory and disk); returns how many went."""
        now = time.time()
        with self._lock:
            gone = [t for t, p in self._parked.items() if p.expires < now]
            for t in gone:
                self.forget(t)
            count = len(gone)
            if self.state_dir is not None:  # (a *.tmp is a write cut short by a crash)
                for path in [*self.state_dir.glob("*.safetensors"), *self.state_dir.glob("*.json"),
                             *self.state_dir.glob("*.tmp")]:
                    try:
                        if path.stat().st_mtime < now:
                            path.unlink(missing_ok=True)
                            count += 1
                    except OSError:
                        continue
        return count


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by this user only (mode 0600)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
