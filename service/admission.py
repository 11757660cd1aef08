"""Admission of connections: a flood of connections that never start a stream must not lock
out the clients that do.

A connection is *pending* from the moment TCP accepts it until its stream is open (TLS and HTTP
handshakes, the wait for a valid ``start``, a refusal being sent). Pending connections are capped
per process (``max_pending``); past the cap the oldest pending one is dropped, so a well-behaved
client, whose handshake and ``start`` take milliseconds, gets in however many idle sockets an
attacker holds (it would have to open ``max_pending`` connections within one client's handshake
to push it out). Streams are capped by ``max_streams``, so the sockets a server holds are bounded
by ``max_pending + max_streams`` per process; :func:`raise_open_file_limit` makes room for them.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection

log = logging.getLogger(__name__)

FILES_BESIDE_SOCKETS = 256  # the process's other descriptors: libraries, state files, links, pipes


class PendingConnections:
    """The connections of one server that are not (yet) a stream, oldest first; past ``limit``
    the oldest is aborted and ``on_drop`` is called (metrics)."""

    def __init__(self, limit: int, on_drop: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self._on_drop = on_drop
        self._pending: dict[ServerConnection, None] = {}  # insertion order = age

    def __len__(self) -> int:
        return len(self._pending)

    def arrived(self, conn: ServerConnection) -> None:
        self._pending[conn] = None
        while len(self._pending) > self.limit:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self._on_drop()
            log.debug("dropping the oldest of %d pending connections", self.limit + 1)
            if oldest.transport is not None:
                oldest.transport.abort()

    def discard(self, conn: ServerConnection) -> None:
        """``conn`` carries an open stream now (``max_streams`` bounds those) or is closed."""
        self._pending.pop(conn, None)

    def connection_class(self) -> type[ServerConnection]:
        """The ``create_connection`` class for ``websockets.serve`` that reports to this set."""
        pending = self

        class AdmittedConnection(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                pending.arrived(self)

            def connection_lost(self, exc: Exception | None) -> None:
                pending.discard(self)
                super().connection_lost(exc)

        return AdmittedConnection


def raise_open_file_limit(needed: int) -> int:
    """Raise this process's soft limit of open files towards ``needed`` + room for its other
    files (never above the hard limit, never lowered); returns the soft limit in force. A hard
    limit too low for ``needed`` is logged: the server then refuses connections under load."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + FILES_BESIDE_SOCKETS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("open-file limit %d is below the %d this server may need (max_pending + max_streams "
                    "sockets + %d); raise it (ulimit -n, LimitNOFILE=) or lower --max-pending / --max-streams",
                    soft, want, FILES_BESIDE_SOCKETS)
    return soft
