"""Which resume tokens are in use right now, and which streams failed (:class:`StreamTokens`).

A token is *claimed* from the moment a connection opens or resumes its stream until that
connection's handler ends; a second connection with the same token meanwhile gets
``stream_busy``, and the token of a stream whose model call failed gets ``stream_failed``
(with the reason) instead of a resume. One server process holds one of these; with
``serve --workers N`` the engine process holds the only one and the workers ask it
(:class:`~streamssm.service.remote.RemoteTokens`), so the answer is the same on every worker.
"""

from __future__ import annotations

from collections import OrderedDict

from streamssm.errors import ProtocolError

from .protocol import INTERNAL_ERROR, TRY_AGAIN_LATER

FAILED_KEPT = 1024  # failed streams remembered (their resume gets the failure, not "unknown")


class StreamTokens:
    """Claims on resume tokens and the reasons of failed streams (event loop only)."""

    def __init__(self, failed_kept: int = FAILED_KEPT):
        self._claimed: set[str] = set()
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._failed_kept = failed_kept

    async def claim(self, token: str) -> None:
        """Mark ``token`` in use; ProtocolError ``stream_failed`` / ``stream_busy`` when its
        stream failed / is live on another connection or being resumed."""
        if token in self._failed:  # first: its old connection may still be closing (still claimed)
            raise ProtocolError(f"this stream failed: {self._failed[token]}", INTERNAL_ERROR, "stream_failed")
        if token in self._claimed:
            raise ProtocolError("this stream is live on another connection (or being resumed); try again shortly",
                                TRY_AGAIN_LATER, "stream_busy")
        self._claimed.add(token)

    def release(self, token: str) -> None:
        """The connection that claimed ``token`` is over."""
        self._claimed.discard(token)

    def fail(self, token: str, why: str) -> None:
        """The stream of ``token`` failed: refuse its resume with ``why``."""
        self._failed[token] = why
        while len(self._failed) > self._failed_kept:
            self._failed.popitem(last=False)
