"""What a :class:`~streamssm.service.server.StreamServer` runs its streams on: the model engine
(Streamer + Scheduler), the parked streams (ResumeStore), the token claims (StreamTokens) and
the metrics. :class:`LocalBackend` holds them all in this process (``serve``, and the engine
process of ``serve --workers N``); a worker process's
:class:`~streamssm.service.remote.WorkerBackend` reaches the engine process's over a link.
"""

from __future__ import annotations

import gc
import logging

from streamssm.checkpoint import ServingBundle
from streamssm.inference import Streamer

from .config import DTYPES, ServeConfig
from .metrics import ServiceMetrics
from .resume import ResumeStore
from .scheduler import Scheduler
from .tokens import StreamTokens

log = logging.getLogger(__name__)


class ServingCollector:
    """The cyclic garbage collector tuned for serving while a backend runs, and put back after.

    What exists when serving starts (modules, model, pool) lives as long as the backend: frozen
    out of the collector's reach, the full collections that per-chunk objects trigger do not
    traverse it (~170k objects, ~0.1 s each; 4-9 us a chunk of the engine process at 512
    streams). Young collections every 10,000 allocations instead of 700: most per-chunk objects
    are freed by then and never traversed (GC ~1.2 -> ~0.5 us a chunk at 512 streams). The last
    backend to stop restores the thresholds and unfreezes (unless the process had frozen objects
    of its own before: those stay frozen, with ours), so an application that embeds the server,
    or runs it twice, gets its collector back as it was.
    """

    def __init__(self) -> None:
        self._users = 0
        self._threshold: tuple[int, ...] = ()
        self._froze = False

    def enter(self) -> None:
        self._users += 1
        if self._users > 1:
            return
        self._threshold = gc.get_threshold()
        gc.collect()
        self._froze = gc.get_freeze_count() == 0
        gc.freeze()
        gc.set_threshold(10_000, *self._threshold[1:])

    def leave(self) -> None:
        self._users -= 1
        if self._users:
            return
        gc.set_threshold(*self._threshold)
        if self._froze:
            gc.unfreeze()


_SERVING_GC = ServingCollector()


class LocalBackend:
    """The model, its state pool and the service's shared records, in this process."""

    def __init__(self, bundle: ServingBundle, cfg: ServeConfig):
        self.config = cfg
        self.metrics = ServiceMetrics()
        self.store = ResumeStore(cfg.resume_ttl, cfg.state_dir, cfg.max_parked, cfg.max_parked_bytes)
        self.streamer = Streamer(bundle.model, cfg.max_streams, cfg.device, DTYPES[cfg.dtype], cfg.engine)
        self.scheduler = Scheduler(self.streamer, cfg.queue_depth, self.metrics, cfg.batching, cfg.slice_samples,
                                   cfg.batch_wait, cfg.pipeline_fill)
        self.tokens = StreamTokens()
        self._collector_tuned = False

    async def start(self) -> None:
        if self.config.prepare:  # before the engine thread starts: nothing else calls the Streamer yet
            log.info("engine %s prepared in %.1f s", self.streamer.engine, self.streamer.capture())
        if not self._collector_tuned:
            _SERVING_GC.enter()
            self._collector_tuned = True
        await self.scheduler.start()

    async def stop(self) -> None:
        try:
            await self.scheduler.stop()
        finally:
            if self._collector_tuned:
                _SERVING_GC.leave()
                self._collector_tuned = False

    async def counts(self) -> tuple[int, int]:
        """(live streams, parked streams)."""
        return self.scheduler.live, len(self.store)

    async def metrics_text(self) -> bytes:
        """``GET /metrics``: the Prometheus text, gauges as of now."""
        self.metrics.live_streams.set(self.scheduler.live)
        self.metrics.parked_streams.set(len(self.store))
        return self.metrics.render()
