"""Parked streams: a disconnected stream's state snapshot, kept for ``ttl`` seconds so the client
can resume it with its token; optionally persisted to a directory so that a restarted server
(same checkpoint) resumes it too.

Tokens are ``secrets.token_urlsafe(32)`` (256 random bits) and bound to the bearer token that
created the stream (only its SHA-256 is stored). Files are named by the SHA-256 of the resume
token, so nothing a client sends is used as a path. A token is consumed when its stream resumes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamssm.errors import ConfigError, ProtocolError

from .protocol import POLICY_VIOLATION

log = logging.getLogger(__name__)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
FILE_FORMAT = "streamssm-parked-stream-1"


def owner_of(bearer: str | None) -> str:
    """What a resume token is bound to: the SHA-256 of the bearer token ('' without auth)."""
    return "" if not bearer else hashlib.sha256(bearer.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class Parked:
    """A stream between connections."""

    snapshot: bytes  # Streamer.snapshot bytes
    owner: str
    settings: dict[str, Any]  # format, sample_rate, channels of the original start
    next_seq: int  # seq of the first chunk not in the snapshot
    samples: int  # samples in the snapshot
    stats: dict[str, Any]  # summary accumulators
    replay: list[tuple[int, str | bytes]] = field(default_factory=list)  # last results (seq, message)
    expires: float = 0.0  # time.time() after which the token is void

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FILE_FORMAT
        d["snapshot"] = base64.b64encode(self.snapshot).decode()
        d["replay"] = [
            {"seq": s, "b64": base64.b64encode(m).decode()} if isinstance(m, bytes) else {"seq": s, "text": m}
            for s, m in self.replay
        ]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Parked:
        d = json.loads(text)
        if d.pop("format", None) != FILE_FORMAT:
            raise ValueError("not a parked-stream file")
        d["snapshot"] = base64.b64decode(d["snapshot"])
        d["replay"] = [(r["seq"], base64.b64decode(r["b64"]) if "b64" in r else r["text"]) for r in d["replay"]]
        return cls(**d)


class ResumeStore:
    """Parked streams by token, in memory and (with ``state_dir``) on disk."""

    def __init__(self, ttl: float, state_dir: str | Path | None = None):
        if ttl < 0:
            raise ConfigError(f"resume_ttl must be >= 0 seconds, got {ttl}")
        self.ttl = ttl
        self.state_dir = None if state_dir is None else Path(state_dir)
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self._parked: dict[str, Parked] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._parked)

    def _path(self, token: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / (hashlib.sha256(token.encode()).hexdigest() + ".json")

    def park(self, token: str, parked: Parked, renew: bool = True) -> None:
        """Keep ``parked`` for ``ttl`` seconds (and write it to ``state_dir``); ``renew=False``
        puts back a stream that failed to resume, keeping its expiry time."""
        if not self.enabled:
            return
        if renew or not parked.expires:
            parked.expires = time.time() + self.ttl
        self._parked[token] = parked
        if self.state_dir is not None:
            path = self._path(token)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(parked.to_json())
            os.replace(tmp, path)  # atomic: a crash never leaves half a file under the real name

    def take(self, token: str, owner: str) -> Parked:
        """Remove and return the parked stream; ProtocolError 1008 when the token is unknown,
        expired or was created with another bearer token (the message does not say which)."""
        unknown = ProtocolError("resume token is unknown or expired", POLICY_VIOLATION, "bad_resume")
        if not _TOKEN_RE.match(token):
            raise unknown
        parked = self._parked.get(token)
        if parked is None and self.state_dir is not None:
            parked = self._load(token)
        if parked is None or parked.expires < time.time():
            self._forget(token)
            raise unknown
        if not hmac.compare_digest(parked.owner, owner):
            raise unknown
        self._forget(token)
        return parked

    def _load(self, token: str) -> Parked | None:
        path = self._path(token)
        if not path.is_file():
            return None
        try:
            return Parked.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable parked stream %s: %s", path.name, exc)
            return None

    def _forget(self, token: str) -> None:
        self._parked.pop(token, None)
        if self.state_dir is not None:
            self._path(token).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Drop expired streams (memory and disk); returns how many went."""
        now = time.time()
        gone = [t for t, p in self._parked.items() if p.expires < now]
        for t in gone:
            self._forget(t)
        if self.state_dir is not None:
            for path in self.state_dir.glob("*.json"):
                try:
                    if json.loads(path.read_text()).get("expires", 0) < now:
                        path.unlink(missing_ok=True)
                        gone.append(path.name)
                except (OSError, ValueError):
                    continue
        return len(gone)
