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

    async def start(self) -> None:
        if self.config.prepare:  # before the engine thread starts: nothing else calls the Streamer yet
            log.info("engine %s prepared in %.1f s", self.streamer.engine, self.streamer.capture())
        # what exists now (modules, model, pool) lives as long as the process: out of the cyclic
        # collector's reach, the full collections that per-chunk objects trigger do not traverse
        # it (~170k objects, ~0.1 s each; 4-9 us a chunk of the engine process at 512 streams).
        # Young collections every 10,000 allocations instead of 700: most per-chunk objects are
        # freed by then and never traversed (GC ~1.2 -> ~0.5 us a chunk at 512 streams)
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000)
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    async def counts(self) -> tuple[int, int]:
        """(live streams, parked streams)."""
        return self.scheduler.live, len(self.store)

    async def metrics_text(self) -> bytes:
        """``GET /metrics``: the Prometheus text, gauges as of now."""
        self.metrics.live_streams.set(self.scheduler.live)
        self.metrics.parked_streams.set(len(self.store))
        return self.metrics.render()
