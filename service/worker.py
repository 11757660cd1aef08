"""``python -m streamssm.service.worker FD LOOP``: one websocket front-end process of
``serve --workers N``, started by the engine process (:mod:`streamssm.service.multiprocess`)
with its end of a socketpair as file descriptor FD and the event loop LOOP to run.

It runs a :class:`~streamssm.service.server.StreamServer` on a
:class:`~streamssm.service.remote.WorkerBackend` (no model here: the hello message brings the
settings, the model's description, the resume key and the log level), listening with
SO_REUSEPORT on the engine's port. It stops when the engine says ``stop`` (its streams are
parked through the engine first) or when the link ends (the engine is gone: its streams fail).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import torch

from streamssm.commands.serve import event_loop_factory
from streamssm.errors import ConfigError

from .config import ServeConfig
from .link import Link
from .remote import RemoteStore, WorkerBackend
from .server import StreamServer

log = logging.getLogger(__name__)
#: seconds a worker's link holds queued messages so that chunks of frames arriving close together
#: reach the engine process as one message: its CPU per chunk, clients paced over 20 ms
#: (bench_engine_process --pace-ms 20, 512 streams, 2-core CPU), 92-104 us at 0, 65-73 at 0.5 ms,
#: 68-71 at 1 ms; a chunk waits at most this long more
CHUNK_FLUSH_DELAY = 0.0005


async def run_worker(sock: socket.socket) -> bool:
    """Serve until stopped; False when the server could not start (the engine was told why)."""
    link = await Link.over(sock, flush_delay=CHUNK_FLUSH_DELAY)
    messages = link.messages()
    _, index, settings, bundle, key, level = await anext(messages)  # the hello
    logging.basicConfig(level=level, format=f"%(asctime)s worker {index} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # codecs only: the model runs in the engine process
    cfg = ServeConfig(**settings)
    store = RemoteStore(link, asyncio.get_running_loop(), key, cfg.resume_ttl, cfg.state_dir)
    backend = WorkerBackend(link, store, cfg.queue_depth)
    server = StreamServer(bundle, cfg, backend, reuse_port=True)
    stop = asyncio.Event()

    async def pump() -> None:
        """The engine's messages, for as long as the link lives (replies resolve calls inside)."""
        scheduler = backend.scheduler
        async for message in messages:
            kind = message[0]
            if kind == "results":
                scheduler.results(*message[1:])
            elif kind == "error":
                scheduler.error(*message[1:])
            elif kind == "live":
                scheduler.live = message[1]
            elif kind == "stop":
                stop.set()
            elif kind == "call" and message[2] == "ping":  # the engine's watchdog: this loop still turns
                link.reply(message[1])
        scheduler.engine_lost()
        stop.set()

    reader = asyncio.get_running_loop().create_task(pump())
    try:
        await server.start()
    except (OSError, ConfigError) as exc:  # the engine says why (and exits or retries)
        link.send("failed", f"could not start serving on {cfg.host}:{cfg.port}: {exc}")
        await server.stop()
        await link.close()
        return False
    link.send("listening", server.port)
    log.debug("listening on %s", server.url)
    try:
        await stop.wait()
    finally:
        await server.stop()  # closes its streams with 1012: parked through the engine (link still up)
        await link.close()
        reader.cancel()
    return True


def main(argv: list[str]) -> int:
    fd, loop_name = int(argv[0]), argv[1]
    sock = socket.socket(fileno=fd)
    with asyncio.Runner(loop_factory=event_loop_factory(loop_name)) as runner:
        return 0 if runner.run(run_worker(sock)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
