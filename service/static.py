"""The browser client over plain HTTP on the service's port (hooked into the server's
``process_request``; the page and its JS modules live in ``service/ui/``, shipped as package data).

- ``GET /``, ``/ui``, ``/ui/`` (not a websocket upgrade) -> ``index.html``; ``GET /ui/<file>`` ->
  that file of ``service/ui/`` (a fixed list of names, nothing read from a client-given path).
  No token needed: the files hold no secret.
- ``GET /ui/model.json`` -> what the page needs to build its ``start`` (modality, formats, rate,
  channels, head, output names); behind the bearer token like ``/metrics``.
- Browsers cannot set an ``Authorization`` header on a websocket, so the page offers the
  subprotocols ``streamssm.v1`` and ``bearer.<base64url(token)>``; :func:`subprotocol_bearer`
  reads the token back and :func:`select_subprotocol` answers ``streamssm.v1`` (never the token).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from http import HTTPStatus
from importlib import resources
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from streamssm.checkpoint import ServingBundle

from .codec import ModelCodec

PAGE_PATHS = ("/", "/ui", "/ui/")
MODEL_PATH = "/ui/model.json"
SUBPROTOCOL = "streamssm.v1"
BEARER_PREFIX = "bearer."
#: the files of service/ui/ served, and their content types
UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "wire.js": "text/javascript; charset=utf-8",
    "stream.js": "text/javascript; charset=utf-8",
    "plot.js": "text/javascript; charset=utf-8",
    "worklet.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "frame-ancestors 'none'",  # no framing: the page asks for the microphone
}


@functools.cache
def _read(name: str) -> str:
    return (resources.files("streamssm.service") / "ui" / name).read_text(encoding="utf-8")


def _typed(conn: ServerConnection, text: str, content_type: str) -> Response:
    response = conn.respond(HTTPStatus.OK, text)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    for key, value in _SECURITY_HEADERS.items():
        response.headers[key] = value
    return response


def is_upgrade(request: Request) -> bool:
    """Whether the request asks for a websocket (``Upgrade: websocket``)."""
    return any("websocket" in v.lower() for v in request.headers.get_all("Upgrade"))


def page_response(conn: ServerConnection, request: Request) -> Response | None:
    """The page or one of its files for a plain GET of a UI path; None for websocket upgrades,
    other paths and ``model.json`` (the server answers those)."""
    if request.method != "GET" or is_upgrade(request):
        return None
    path = request.path.split("?", 1)[0]
    name = "index.html" if path in PAGE_PATHS else path.removeprefix("/ui/") if path.startswith("/ui/") else ""
    if name not in UI_FILES:
        return None
    return _typed(conn, _read(name), UI_FILES[name])


def model_info(bundle: ServingBundle, codec: ModelCodec, idle_timeout: float) -> dict[str, Any]:
    """The model facts the page builds its ``start`` from and labels its plot with, and the
    server's ``idle_timeout`` (s; the page pings more often than that while paused)."""
    assert bundle.spec is not None  # ModelCodec.from_bundle refused a bundle without one
    spec = bundle.spec.for_model(bundle.config)
    return {
        "modality": codec.modality, "head": codec.head, "output_dim": codec.output_dim,
        "formats": list(codec.spec.formats), "sample_rate": codec.spec.sample_rate,
        "channels": codec.spec.channels, "output_names": spec.output_names(),
        "classes": codec.classes, "horizon": spec.horizon,
        "channel_names": list(spec.channel_names), "idle_timeout": idle_timeout,
    }


def model_response(conn: ServerConnection, bundle: ServingBundle, codec: ModelCodec, idle_timeout: float) -> Response:
    """``GET /ui/model.json`` (:func:`model_info` as JSON)."""
    return _typed(conn, json.dumps(model_info(bundle, codec, idle_timeout)) + "\n", "application/json")


def subprotocol_bearer(request: Request) -> list[str]:
    """``Authorization`` values carried by ``bearer.<base64url>`` subprotocols (browser clients),
    e.g. ``["Bearer T"]``; undecodable ones count too (as a value that matches no token)."""
    found = []
    for header in request.headers.get_all("Sec-WebSocket-Protocol"):
        for offered in (p.strip() for p in header.split(",")):
            if offered.startswith(BEARER_PREFIX):
                encoded = offered.removeprefix(BEARER_PREFIX)
                try:
                    token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    token = "\0undecodable"
                found.append(f"Bearer {token}")
    return found


def select_subprotocol(conn: ServerConnection, offered: list[str]) -> str | None:
    """Answer ``streamssm.v1`` when the client offers it (a browser then accepts the
    connection); any other offer, and none, continue without a subprotocol."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None
