"""Prometheus metrics of one server (its own registry, so several servers in one process
- as in tests - do not collide). Served as text on ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class BatchedHistogram:
    """A Prometheus histogram fed a batch of observations at a time (numpy bucket counts: the
    client library's ``Histogram.observe`` costs ~2 us an observation, per chunk on the event loop
    of a server answering 20,000 chunks/s). Exposed exactly as ``Histogram`` would expose it."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry):
        self.name, self.documentation, self.bounds = name, documentation, np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bound (+Inf only)
        self.total = 0.0
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        if len(values):
            v = np.asarray(values, dtype=np.float64)
            self.counts += np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.counts))
            self.total = sum(values, self.total)  # in order, as the client library adds

    def collect(self):
        cumulative = np.cumsum(self.counts)
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative)]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=[*buckets, ("+Inf", int(cumulative[-1]))],
                                    sum_value=self.total)


class ServiceMetrics:
    """Counters and histograms updated by the server and the scheduler (event loop only)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.live_streams = Gauge("streamssm_live_streams", "Streams open right now", registry=r)
        self.connections = Counter("streamssm_connections", "Websocket connections accepted", registry=r)
        self.chunks = Counter("streamssm_chunks", "Chunks answered (rate() gives chunks/s)", registry=r)
        self.samples = Counter("streamssm_samples", "Samples answered", registry=r)
        self.batches = Counter("streamssm_batches", "Batched model calls", registry=r)
        self.batch_streams = Histogram("streamssm_batch_streams", "Streams per batched model call",
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("streamssm_batch_seconds", "Wall time of one batched model call",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.model_seconds = Counter("streamssm_model_seconds", "Engine-thread seconds in model calls "
                                     "(Streamer.feed_batch, device sync included)", registry=r)
        self.encode_seconds = Counter("streamssm_encode_seconds", "Engine-thread seconds turning results into "
                                      "wire messages", registry=r)
        self.chunk_latency = BatchedHistogram("streamssm_chunk_latency_seconds",
                                              "From receiving a chunk to its result being ready",
                                              buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("streamssm_rejected", "Rejected connections, frames and streams by reason",
                                ["reason"], registry=r)
        self.parked_streams = Gauge("streamssm_parked_streams", "Disconnected streams kept for resume", registry=r)
        self.worker_streams = Counter("streamssm_worker_streams", "Streams opened (or resumed) through each "
                                      "worker process of serve --workers", ["worker"], registry=r)
        self.resumed = Counter("streamssm_resumed_streams", "Streams resumed from a token", registry=r)

    def observe_batch(self, streams: int, samples: int, seconds: float, model_seconds: float = 0.0,
                      encode_seconds: float = 0.0) -> None:
        """One batched call: its wall time ``seconds`` (event loop to event loop) and, within it,
        the engine thread's ``model_seconds`` and ``encode_seconds`` (the rest: hand-offs)."""
        self.batches.inc()
        self.batch_streams.observe(streams)
        self.batch_seconds.observe(seconds)
        self.samples.inc(samples)
        self.model_seconds.inc(model_seconds)
        self.encode_seconds.inc(encode_seconds)

    def connection(self) -> None:
        self.connections.inc()

    def resume(self) -> None:
        self.resumed.inc()

    def observe_chunks(self, latencies_s: Sequence[float]) -> None:
        """Chunks answered (one model call's), each ``latency_s`` after it was received."""
        self.chunks.inc(len(latencies_s))
        self.chunk_latency.observe_many(latencies_s)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
