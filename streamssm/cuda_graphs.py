"""CUDA-graph replays of the Streamer's model call (``Streamer(engine="graphs")``).

The fixed-shape programs of ``streamssm.bucketed`` (stream buckets, segment lengths, static
buffers, padding on the pool's scratch row) captured as CUDA graphs: a steady-state call is,
per segment piece, two device copies in and one replay; the outputs stay on the device. The
graphs share one memory pool (one thread replays them, one at a time), and the warm-up runs one
side stream (a new stream per program strands its cached blocks). A (bucket, length) pair
is captured at its first call, after one eager run that writes only the scratch row (so that
Triton autotunes and allocates outside the capture), or all up front (``Streamer.capture``,
what ``streamssm serve`` does at start-up). Outputs and states equal the eager engine's
(tests/test_engines.py, GPU tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamssm.bucketed import BucketedCalls
from streamssm.errors import ConfigError
from streamssm.models import SSMModel
from streamssm.state import ModelState


class GraphedCalls(BucketedCalls):
    """Each (bucket, length) program is a captured CUDA graph (module docstring)."""

    name = "graphs"

    def __init__(self, model: SSMModel, pool: ModelState, capacity: int, **lengths):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ConfigError(f"engine 'graphs' needs a CUDA device, the model is on {device}")
        super().__init__(model, pool, capacity, **lengths)
        self.mempool = torch.cuda.graph_pool_handle()
        self.warmup_stream = torch.cuda.Stream(device)  # one for all: the allocator caches per stream
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def make_program(self, bucket: int, length: int) -> Callable[[], None]:
        x, rows, y = self._views(bucket, length)
        saved = rows.clone()
        rows.fill_(self.scratch)  # the warm-up run writes only the scratch row
        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y.copy_(self.run(x, rows))  # autotune / compile / allocate outside the capture
        torch.cuda.current_stream().wait_stream(side)
        rows.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            y.copy_(self.run(x, rows))
        self.graphs.append(graph)
        return graph.replay
