"""``streamssm serve``: serve a checkpoint over websockets to many concurrent streams.

    streamssm serve --checkpoint model.safetensors --port 8765
    streamssm serve --checkpoint model.safetensors --max-streams 256 --print_config > serve.yaml
    streamssm serve --config serve.yaml --port 9000     # later options override the file

The options are the fields of :class:`~streamssm.service.config.ServeConfig` (``--max-streams``
here, ``max_streams`` in a config file) plus ``--checkpoint`` and ``--threads``. Runs until
SIGTERM or SIGINT, then shuts down gracefully (streams parked for resume). Wire protocol:
service/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jsonargparse

from streamssm.checkpoint import ServingBundle, load_for_serving, resolve_device
from streamssm.commands.parsing import add_fields, build, config_parser, parse
from streamssm.errors import ConfigError
from streamssm.heap import keep_freed_memory
from streamssm.service.config import ServeConfig
from streamssm.service.multiprocess import MultiProcessServer
from streamssm.service.server import StreamServer

log = logging.getLogger(__name__)


def build_parser(prog: str) -> jsonargparse.ArgumentParser:
    parser = config_parser(prog, "Serve a streamssm checkpoint over websockets (protocol: service/PROTOCOL.md).")
    parser.add_argument("--checkpoint", type=str, required=True, help="model .safetensors export or Lightning .ckpt")
    parser.add_argument("--threads", type=int | None, default=None,
                        help="torch CPU threads of the model calls (null: torch's, one per core); on a host "
                             "shared with other work, the cores left to the model (oversubscribed OpenMP "
                             "threads stall each other)")
    parser.add_argument("--event-loop", type=Literal[EVENT_LOOPS], default="auto",
                        help="the server's event loop: uvloop (its C loop: ~15-20 % less CPU per frame in bench_service "
                             "on a 2-core CPU), asyncio, or auto (uvloop when installed)")
    add_fields(parser, ServeConfig, defaults={"device": "auto"})
    return parser


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``--event-loop`` -> the loop factory for ``asyncio.Runner``. ``uvloop`` when it
    is not installed is a ConfigError; ``auto`` falls back to asyncio's own loop."""
    if name not in EVENT_LOOPS:
        raise ConfigError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {name!r}")
    if name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise ConfigError("--event-loop uvloop: uvloop is not installed (pip install uvloop), "
                                  "or use --event-loop asyncio") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


async def serve_until_signal(bundle: ServingBundle, config: ServeConfig, event_loop: str = "auto") -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. A port in use is a ConfigError.
    ``config.workers`` > 1: this process runs the engine and starts that many websocket workers
    (their loop: ``event_loop``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = MultiProcessServer(bundle, config, event_loop) if config.workers > 1 else StreamServer(bundle, config)
    try:
        await server.start()
    except BaseException as exc:
        await server.stop()
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {config.port} is in use; pick another with --port") from exc
        raise
    try:
        log.info("listening on %s (model %s, %s %s, %s, %s event loop); GET /healthz and /metrics on the same port",
                 server.url, bundle.fingerprint, server.codec.modality, server.codec.head, config.device,
                 loop_name(loop))
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        await server.stop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio" (what the start-up log says)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def main(argv: list[str], prog: str = "streamssm serve") -> int:
    args = parse(build_parser(prog), argv)
    config = build(ServeConfig, args, device=str(resolve_device(args.device)),
                   token=args.token if args.token is not None else os.environ.get("STREAMSSM_TOKEN") or None)
    if not Path(args.checkpoint).is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint!r} is not a file")
    loop_factory = event_loop_factory(args.event_loop)
    if not keep_freed_memory():  # every model call's tensors from memory the process keeps (streamssm/heap.py)
        log.info("not glibc: the C heap keeps its own thresholds")
    if args.threads is not None and args.threads < 1:  # (-3: torch's RuntimeError; 0 was ignored)
        raise ConfigError(f"--threads must be >= 1 (or null: one per core), got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle = load_for_serving(args.checkpoint, config.device)
    log.info("loaded %s in %.2f s", args.checkpoint, time.perf_counter() - t0)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_until_signal(bundle, config, args.event_loop))
    return 0
