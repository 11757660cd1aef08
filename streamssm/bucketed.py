"""Fixed-shape model calls: the Streamer's call (``streamssm.engine``) over static buffers,
padded to stream buckets and cut into segment lengths of a fixed set, so that every call runs
one of a few fixed-shape programs (a captured CUDA graph: ``streamssm.cuda_graphs``).

A call of ``b`` streams over ``l`` samples is served by programs for (bucket ``B``, length ``L``):

* ``B``: the smallest bucket >= b: powers of two up to 16, then two per octave (16, 24, 32, 48,
  64, 96, ...), capped at the pool capacity, so padding wastes at most a third of a call's rows
  past 16 streams (powers of two wasted up to half: 40 streams ran as 64). The b real streams fill
  the first b rows of the static inputs; the B - b padding rows read token 0 / zeros and point
  at the pool's scratch row (index ``capacity``, never handed to a stream), so padding never
  touches a stream's state.
* ``L``: ``l`` is cut greedily into the lengths, powers of two up to ``max_length`` plus the
  ``extra_lengths`` a deployment sends most (e.g. 160 / 320 / 640 samples = 10 / 20 / 40 ms at
  16 kHz): l = 320 -> one program run; l = 300 -> 256 + 32 + 8 + 4. The pieces are exact: each
  carries the state through the pool to the next, as the chunked forward does.
* A call too big for the programs runs eagerly, as one call: a segment longer than the longest
  length, or more than ``max_tokens`` tokens per program (B x L). The token bound caps the
  memory the programs' shared pool holds (about the largest program's activations) and the time
  :meth:`prepare` takes. The default covers 384 streams x 640 samples: the server never hands
  a stream more than its slice (640 samples by default) per call, so its calls all replay
  programs (an eager call dispatches hundreds of launches from Python, competing with the event
  loop for the GIL).

Static buffers are shared by every program: x (B_max, L_max[, c]), rows (B_max,), y (B_max,
L_max, o). Programs are made at their first call, or all up front with :meth:`prepare`. This
base class runs each program eagerly on the static buffers (the same arithmetic a graph
captures: how the padding and splitting are tested on the CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from streamssm.engine import EagerCalls
from streamssm.errors import ConfigError
from streamssm.models import SSMModel
from streamssm.state import ModelState


def power_buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit`` itself."""
    out = [1]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return out if out[-1] == limit else [*out, limit]


def stream_buckets(limit: int) -> list[int]:
    """1, 2, 4, 8, 16, then 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k) below ``limit``, then ``limit``."""
    out = [n for n in power_buckets(limit) if n <= 16]
    while out[-1] < limit:
        top = out[-1]  # 2^k -> 1.5 * 2^k -> 2^(k+1)
        out.append(min(top * 3 // 2 if top & (top - 1) == 0 else top * 4 // 3, limit))
    return out


def split_length(length: int, lengths: list[int]) -> list[int]:
    """Cut ``length`` into pieces from ``lengths`` (sorted, containing 1), largest first."""
    pieces, left = [], length
    for size in reversed(lengths):
        while left >= size:
            pieces.append(size)
            left -= size
    return pieces


class BucketedCalls(EagerCalls):
    """The model call as fixed-shape programs over static buffers (module docstring).

    ``pool`` must hold ``capacity + 1`` rows: the last one is the scratch row of padding.
    """

    name = "bucketed"

    def __init__(self, model: SSMModel, pool: ModelState, capacity: int, max_length: int = 512,
                 extra_lengths: tuple[int, ...] = (160, 320, 640), max_tokens: int = 384 * 640):
        super().__init__(model, pool)
        if max_length < 1 or any(n < 1 for n in extra_lengths):
            raise ConfigError(f"segment lengths must be positive, got max_length={max_length}, extra={extra_lengths}")
        if max_tokens < capacity:
            raise ConfigError(f"max_tokens ({max_tokens}) must cover one step of every stream (capacity {capacity})")
        self.max_tokens = max_tokens
        device = next(model.parameters()).device
        self.scratch = capacity
        self.buckets = stream_buckets(capacity)
        self.lengths = sorted(set(power_buckets(max_length)) | set(extra_lengths))
        b_max, l_max = self.buckets[-1], self.lengths[-1]
        cfg = model.cfg
        if self._tokens:
            self.x = torch.zeros(b_max, l_max, device=device, dtype=torch.long)
        else:
            self.x = torch.zeros(b_max, l_max, cfg.input_dim, device=device, dtype=model.encoder.weight.dtype)
        self.rows = torch.full((b_max,), capacity, device=device, dtype=torch.long)
        self.y = torch.zeros(b_max, l_max, cfg.resolved_output_dim, device=device, dtype=model.head.weight.dtype)
        self.programs: dict[tuple[int, int], Callable[[], None]] = {}
        self.prepare_seconds = 0.0

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x (b, l[, c]), rows (b,) -> raw outputs (b, l, o) (a new tensor, never the buffer)."""
        b, length = x.shape[:2]
        bucket = next(n for n in self.buckets if n >= b)
        lengths = self.lengths_for(bucket)
        if length > lengths[-1]:  # big calls: launch cost is small against the compute
            return self.run(x, rows)
        pieces = split_length(length, lengths)
        self.rows[:b].copy_(rows)
        self.rows[b:bucket].fill_(self.scratch)
        if len(pieces) == 1:
            self._run_piece(x, b, bucket, length)
            return self.y[:b, :length].clone()
        out = torch.empty(b, length, self.y.shape[-1], device=x.device, dtype=self.y.dtype)
        start = 0
        for size in pieces:
            self._run_piece(x[:, start:start + size], b, bucket, size)
            out[:, start:start + size] = self.y[:b, :size]
            start += size
        return out

    def _run_piece(self, x: torch.Tensor, b: int, bucket: int, length: int) -> None:
        self.x[:b, :length].copy_(x)
        if bucket > b:
            self.x[b:bucket, :length].zero_()
        program = self.programs.get((bucket, length)) or self._prepare(bucket, length)
        program()

    def lengths_for(self, bucket: int) -> list[int]:
        """The segment lengths with a program for ``bucket`` streams (within ``max_tokens``)."""
        return [n for n in self.lengths if bucket * n <= self.max_tokens]

    def _views(self, bucket: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[:bucket, :length], self.rows[:bucket], self.y[:bucket, :length]

    def _prepare(self, bucket: int, length: int) -> Callable[[], None]:
        t0 = time.perf_counter()
        program = self.make_program(bucket, length)
        self.programs[(bucket, length)] = program
        self.prepare_seconds += time.perf_counter() - t0
        return program

    def make_program(self, bucket: int, length: int) -> Callable[[], None]:
        """The program of (bucket, length): reads the static x / rows views, writes the y view."""
        x, rows, y = self._views(bucket, length)
        return lambda: y.copy_(self.run(x, rows))

    @torch.no_grad()  # as the Streamer calls: under grad mode the pool's writes kept every activation
    def prepare(self) -> float:
        """Make every (bucket, length) program now rather than at first use; returns seconds."""
        t0 = time.perf_counter()
        for bucket in self.buckets:
            for length in self.lengths_for(bucket):
                if (bucket, length) not in self.programs:
                    self._prepare(bucket, length)
        return time.perf_counter() - t0
