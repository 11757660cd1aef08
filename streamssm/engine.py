"""The Streamer's model call over its state pool, and the eager way to run it.

One call takes validated inputs ``x`` of ``b`` streams over a common segment of ``l`` samples
(tokens (b, l) long, or values (b, l, c) in the model dtype) and the pool rows ``rows`` (b,)
int64 of those streams, returns the raw head outputs (b, l, o) in the model dtype, and leaves
each stream's new state in its pool row. ``l == 1`` goes through the in-place pool step
(``Backbone.step_pool``); a longer segment through the chunked forward from and back into the
pool (``Backbone.forward_pool``: Mamba-2's SSM states are read and written in the one-pass
kernel; other states are gathered and written back).

Engines (``Streamer(engine=...)``):
    eager     :class:`EagerCalls`, this module: every call launches its kernels from Python
    graphs    ``streamssm.cuda_graphs.GraphedCalls``: CUDA-graph replays of fixed-shape calls
              (``streamssm.bucketed``: streams padded to buckets, segments cut to set lengths)
    compiled  ``streamssm.compiled_cpu.CompiledCalls`` (CPU): the call compiled by inductor's C++
              backend for symbolic shapes; ``eager`` (with a warning) when no C++ compiler works
Every engine gives the same outputs and states as ``eager`` (tests/test_engines.py).
"""

from __future__ import annotations

import torch

from streamssm.errors import ConfigError
from streamssm.models import SSMModel
from streamssm.state import ModelState


class EagerCalls:
    """The model call run eagerly (module docstring); ``pool`` is the Streamer's state pool."""

    name = "eager"

    def __init__(self, model: SSMModel, pool: ModelState):
        self.model, self.pool = model, pool
        self._tokens = model.cfg.input_kind == "tokens"

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (b, l[, c]) validated inputs, rows (b,) pool rows -> raw outputs (b, l, o)."""
        return self.run(x, rows)

    def prepare(self) -> float:
        """Make the engine's programs now rather than at first use; returns seconds (none here)."""
        return 0.0

    def run(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The call itself, launched op by op (what a graph captures)."""
        m = self.model
        h = m.encoder(x) if self._tokens else m.encoder(x.to(m.encoder.weight.dtype))
        if x.shape[1] == 1:
            return m.head(m.backbone.step_pool(h[:, 0], self.pool, rows)).unsqueeze(1)
        return m.head(m.backbone.forward_pool(h, self.pool, rows))


ENGINES = ("auto", "eager", "graphs", "compiled")


def resolve_engine(engine: str, device: torch.device) -> str:
    """``auto`` -> ``graphs`` on CUDA, ``eager`` elsewhere; ``compiled`` (CPU only) -> ``eager``
    with a logged warning when no C++ compiler works; others are checked and kept."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "auto":
        return "graphs" if device.type == "cuda" else "eager"
    if engine == "compiled":
        if device.type != "cpu":
            raise ConfigError(f"engine 'compiled' runs on the CPU, the model is on {device} (use 'graphs')")
        from streamssm.compiled_cpu import compiled_available

        return "compiled" if compiled_available() else "eager"
    return engine


def make_calls(engine: str, model: SSMModel, pool: ModelState, capacity: int) -> EagerCalls:
    """The model call of a resolved ``engine`` over ``pool`` (``capacity`` stream rows; engines
    of fixed-shape calls need one more, the scratch row)."""
    if engine == "graphs":
        from streamssm.cuda_graphs import GraphedCalls

        return GraphedCalls(model, pool, capacity)
    if engine == "compiled":
        from streamssm.compiled_cpu import CompiledCalls

        return CompiledCalls(model, pool, capacity)
    return EagerCalls(model, pool)
