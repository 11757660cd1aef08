"""Streamer: run one model over many live streams chunk by chunk, carrying each stream's state.

All streams' recurrent states live in one preallocated pool (a ``ModelState`` of ``capacity``
rows on the device); a stream owns one row from :meth:`Streamer.open` to :meth:`Streamer.close`.

API (the service codes against it)::

    s = Streamer(model, capacity, device="cpu", dtype=torch.float32, engine="auto")
    sid = s.open()                          # StateError("pool full ...") at capacity
    r = s.feed(sid, chunk)                  # ChunkResult for exactly the new samples
    rs = s.feed_many({sid: chunk, ...})     # one batched computation for all streams
    b = s.feed_batch({sid: chunk, ...})     # the same, results left batched (BatchResult)
    p = s.launch({sid: chunk, ...})         # the same, not waiting for the device; p.result()
    blob = s.snapshot(sid)                  # safetensors bytes: state + last outputs + fingerprint
    sid2 = s.restore(blob)                  # StateError for a snapshot of another model
    s.close(sid); s.live                    # frees the row; number of open streams

Chunks: tokens ``(l,)`` integer for token models; values ``(l, c)`` float for continuous
models (``(l,)`` float is accepted when c == 1). ``l`` may be 0.

``ChunkResult.outputs`` ``(l, o)`` fp32 on CPU, per head:
    lm          log-probabilities of the NEXT token after each new token
    regression  next-value forecast after each new sample (model units)
    classifier  running class probabilities after each new sample
``ChunkResult.scores`` ``(l,)`` (lm only): log p(x_t | x_<t) of each new token under the
previous step's prediction (the stream's first token under a uniform prior).
``feed_many(chunks, outputs=False)`` (or a set of stream ids) skips ``outputs`` (None) for the
other streams: their scores are gathered on the device (logit of x_t minus the logsumexp of the
previous step's logits) and only (l,) floats per stream reach the CPU, never (l, o).

Batching without a per-stream Python loop: the chunks of one call are padded into a
(streams, max length) tensor and cut at the distinct chunk lengths; every round runs the
streams still active over one common segment [a, b). A length-1 segment goes through the
model's pool step (``step_pool``: the step kernels update pool rows in place at
``state_indices``); a longer one through ``model.forward`` with the initial state gathered
from the pool (``select_streams``) and the final state written back (``write_streams``). Each
round is one call of the engine (``streamssm.engine``): ``eager`` launches the kernels from
Python, ``graphs`` (``engine="auto"`` on CUDA) replays CUDA graphs captured per (stream bucket,
segment length) (``streamssm.cuda_graphs``); the outputs are the same. The model is driven
through its encoder / backbone / head directly: the Streamer has validated the chunks (token
range on the CPU), so ``SSMModel._encode``'s device-syncing checks are skipped. When every stream of a round is active the round writes no index-scattered copy. The
outputs equal the offline full forward over each stream's concatenated chunks (to fp32
tolerance; tests/test_streamer.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamssm.checkpoint import model_fingerprint
from streamssm.engine import make_calls, resolve_engine
from streamssm.errors import ConfigError, ShapeError, StateError
from streamssm.kernels import load_cpu_kernels, scores_cpu
from streamssm.models import SSMModel
from streamssm.state import (
    LayerState,
    ModelState,
    read_state_metadata,
    read_state_record,
    select_streams,
    state_to_bytes,
)

SNAPSHOT_FORMAT = "streamssm-stream-snapshot-1"
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(slots=True)
class ChunkResult:
    """Outputs for exactly the samples of one fed chunk (see the module docstring)."""

    outputs: torch.Tensor | None  # (l, o) fp32 CPU; None when not asked for (feed_many(outputs=...))
    scores: torch.Tensor | None  # (l,) fp32 CPU, token lm only


@dataclass
class BatchResult:
    """One batched call's results on the CPU, streams in call order: ``scores`` (b, L) float32
    (token lm only; row i is valid up to ``lens[i]``), ``outputs`` (b', L, o) fp32 of the streams
    that asked for them, ``output_row[i]`` stream i's row there (None: not asked)."""

    ids: list[int]
    lens: list[int]
    scores: np.ndarray | None
    outputs: torch.Tensor | None
    output_row: list[int | None]

    def chunk_results(self) -> dict[int, ChunkResult]:
        """``{stream_id: ChunkResult}``, each cut to its stream's length (views, no copies)."""
        outs = () if self.outputs is None else self.outputs.unbind(0)
        outs = outs if len(outs) == len(self.ids) else [None if k is None else outs[k] for k in self.output_row]
        scores = (None,) * len(self.ids) if self.scores is None else torch.from_numpy(self.scores).unbind(0)
        if len(set(self.lens)) > 1:  # padded rows: each cut to its stream's length
            outs = [None if t is None else t[:n] for t, n in zip(outs, self.lens)]
            scores = [None if t is None else t[:n] for t, n in zip(scores, self.lens)]
        return {sid: ChunkResult(o, s) for sid, o, s in zip(self.ids, outs, scores)}


@dataclass
class PendingBatch:
    """A launched :meth:`Streamer.launch`: its BatchResult once ``result()`` has waited for the
    device (``done``; None on the CPU) to fill the scores (b, L) copy."""

    batch: BatchResult
    scores: torch.Tensor | None
    done: torch.cuda.Event | None

    def result(self) -> BatchResult:
        if self.done is not None:
            self.done.synchronize()
        if self.scores is not None:
            self.batch.scores = self.scores.numpy()
        return self.batch


def _nothing_launched() -> PendingBatch:
    """The launch of no streams."""
    return PendingBatch(BatchResult([], [], None, None, []), None, None)


class Streamer:
    """Many streams through one model over a preallocated state pool (module docstring).

    The model is moved to ``device``/``dtype`` (in place, as ``nn.Module.to`` does) and put in
    eval mode. ``fingerprint`` identifies the weights as given (``checkpoint.model_fingerprint``),
    so snapshots move between streamers of the same model. Not thread-safe: one engine thread
    calls it.
    """

    def __init__(self, model: SSMModel, capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, engine: str = "auto"):
        if not isinstance(model, SSMModel):
            raise ConfigError(f"Streamer needs an SSMModel, got {type(model).__name__}")
        if capacity <= 0:
            raise ConfigError(f"Streamer capacity must be positive, got {capacity}")
        if not dtype.is_floating_point:
            raise ConfigError(f"Streamer dtype must be a float dtype, got {dtype}")
        self.device, self.dtype, self.capacity = torch.device(device), dtype, capacity
        # the fingerprint of the weights as given (== ServingBundle.fingerprint), before any cast
        self.fingerprint = model_fingerprint(model)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.cfg = model.cfg
        self.out_dim = self.cfg.resolved_output_dim
        self.engine = resolve_engine(engine, self.device)
        # one more row than streams: the scratch row that the padding of fixed-shape calls writes
        self.pool: ModelState = self.model.init_state(capacity + 1, self.device, dtype)
        if self.device.type == "cpu":  # the model's C kernels built now (server start-up), not in the first call
            load_cpu_kernels(self.cfg.block)
        self._calls = make_calls(self.engine, self.model, self.pool, capacity)
        # per row: the last outputs (lm: log-probs of the next token; scores the next chunk's first token)
        self.last_output = torch.empty(capacity, self.out_dim, device=self.device, dtype=torch.float32)
        self._slot: dict[int, int] = {}  # stream id -> pool row
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out low rows first
        self._next_id = 0

    def capture(self) -> float:
        """Prepare the engine's programs now rather than at first use (the server's start-up):
        ``graphs`` captures every CUDA graph, ``compiled`` compiles its usual shapes; returns
        the seconds spent (0 for ``eager``)."""
        return self._calls.prepare()

    # ------------------------------------------------------------------ stream lifecycle

    @property
    def live(self) -> int:
        """Number of open streams."""
        return len(self._slot)

    def open(self) -> int:
        """Start a stream from the zero state; returns its id."""
        if not self._free:
            raise StateError(f"pool full: all {self.capacity} stream slots are in use; close a stream first")
        row = self._free.pop()
        self._reset_row(row)
        sid = self._next_id
        self._next_id += 1
        self._slot[sid] = row
        return sid

    def close(self, stream_id: int) -> None:
        """Free the stream's pool row for reuse."""
        self._free.append(self._row(stream_id))
        del self._slot[stream_id]

    def _row(self, stream_id: int) -> int:
        try:
            return self._slot[stream_id]
        except (KeyError, TypeError):
            raise StateError(f"unknown stream id {stream_id!r} (never opened, or closed); {self.live} streams live") from None

    def _reset_row(self, row: int) -> None:
        for layer in self.pool:
            for t in layer:
                t[row].zero_()
        # lm: uniform prior for the first token; other heads: nothing seen yet
        fill = -math.log(self.out_dim) if self.cfg.head == "lm" else 0.0
        self.last_output[row].fill_(fill)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, stream_id: int) -> bytes:
        """``state_to_bytes`` of the stream's state (no batch axis), its ``last_output`` and
        metadata ``format`` / ``fingerprint``."""
        row = torch.tensor([self._row(stream_id)], device=self.device)
        state = tuple(LayerState(*(t[0] for t in layer)) for layer in select_streams(self.pool, row))
        return state_to_bytes(state, {"format": SNAPSHOT_FORMAT, "fingerprint": self.fingerprint},
                              {"last_output": self.last_output.index_select(0, row)[0]})

    def restore(self, data: bytes) -> int:
        """Open a stream that continues exactly where the snapshot ``data`` left off."""
        meta = read_state_metadata(data)
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise StateError(f"not a stream snapshot (format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r})")
        if meta.get("fingerprint") != self.fingerprint:
            raise StateError(
                f"snapshot belongs to model {meta.get('fingerprint')!r}, this streamer runs model {self.fingerprint!r}"
            )
        record = read_state_record(data, self.device)
        tensors = dict(record.tensors)
        for i, layer in enumerate(record.state):
            tensors.update({f"layer{i}.{field}": t for field, t in zip(LayerState._fields, layer)})
        expected = {"last_output": self.last_output[0]}
        for i, layer in enumerate(self.pool):
            for field, t in zip(LayerState._fields, layer):
                expected[f"layer{i}.{field}"] = t[0]
        if set(tensors) != set(expected):
            raise StateError(f"snapshot holds tensors {sorted(tensors)}, expected {sorted(expected)}")
        for name, ref in expected.items():
            if tensors[name].shape != ref.shape:
                raise StateError(f"snapshot {name} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}")
        sid = self.open()
        row = self._slot[sid]
        self.last_output[row] = tensors["last_output"].to(torch.float32)
        for i, layer in enumerate(self.pool):
            for field, t in zip(LayerState._fields, layer):
                t[row] = tensors[f"layer{i}.{field}"].to(t.dtype)
        return sid

    # ------------------------------------------------------------------ feeding

    def feed(self, stream_id: int, chunk: torch.Tensor) -> ChunkResult:
        """Run one stream's chunk; see :meth:`feed_many`."""
        return self.feed_many({stream_id: chunk})[stream_id]

    def feed_many(self, chunks: dict[int, torch.Tensor],
                  outputs: bool | Collection[int] = True) -> dict[int, ChunkResult]:
        """Run the chunks of several streams as one batched computation.

        All chunks are validated before any state changes, so one bad chunk leaves every
        stream untouched. ``outputs``: the streams whose ``ChunkResult.outputs`` are built
        (True: all; False: none; or a collection of stream ids); the others get ``outputs=None``
        and cost no (l, o) distribution on the CPU (their scores and state are the same).
        Returns ``{stream_id: ChunkResult}``.
        """
        return self.feed_batch(chunks, outputs).chunk_results()

    def feed_batch(self, chunks: dict[int, torch.Tensor],
                   outputs: bool | Collection[int] = True) -> BatchResult:
        """:meth:`feed_many`'s computation, its results left batched (no per-stream tensors:
        what a server that encodes each stream's rows itself wants)."""
        return self.launch(chunks, outputs).result()

    @torch.no_grad()
    def launch(self, chunks: dict[int, torch.Tensor],
               outputs: bool | Collection[int] = True) -> PendingBatch:
        """Queue :meth:`feed_batch`'s work and return without waiting for the device (CUDA: the
        inputs and indices go up and the results come back by pinned, non-blocking copies, so the
        host may prepare the next call while this one runs; the pool carries each stream's state
        from call to call in launch order). ``PendingBatch.result()`` waits and returns the
        BatchResult. Validation errors are raised here, before any state changes."""
        if not chunks:
            return _nothing_launched()
        ids = list(chunks)
        x = self._stack_uniform(list(chunks.values()))
        if x is not None:  # one validation for the lot, as launch_stacked's
            return self._launch(ids, x, [x.shape[1]] * len(ids), x, outputs)
        xs = [self._check_chunk(sid, chunks[sid]) for sid in ids]
        lens = [x.shape[0] for x in xs]
        if len(set(lens)) == 1:  # equal lengths (uniform batching): no padding
            x = torch.stack(xs)
        else:
            x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # (b, L) tokens | (b, L, c) values
        return self._launch(ids, x, lens, xs, outputs)

    @torch.no_grad()
    def launch_stacked(self, ids: list[int], x: torch.Tensor,
                       outputs: bool | Collection[int] = True) -> PendingBatch:
        """:meth:`launch` of chunks of one length that the caller stacked: x (b, l) tokens or (b, l, c)
        values (c = 1: also (b, l)), row i stream ``ids[i]``. One validation and no tensor per
        stream: the serving engine's call where its chunks arrive as one array each."""
        if not ids:
            return _nothing_launched()
        x = self._check_stacked(ids, x)
        return self._launch(ids, x, [x.shape[1]] * len(ids), x, outputs)

    def _launch(self, ids: list[int], x: torch.Tensor, lens: list[int], xs, outputs: bool | Collection[int]
                ) -> PendingBatch:
        """launch's work from the padded input x (b, L) | (b, L, c) and each row's length (``xs``:
        the rows, named in a token range error)."""
        rows = [self._row(sid) for sid in ids]
        if self.cfg.input_kind == "tokens" and x.numel():
            self._check_token_range(ids, xs, x)
        x = self._upload(x)
        slots = self._index(rows)
        want = [outputs is True or (outputs is not False and sid in outputs) for sid in ids]
        y = self._run_segments(x, lens, slots)  # (b, L, o) raw fp32
        out, scores = self._finish(x, lens, slots, y, any(want))
        output_row: list[int | None] = [None] * len(ids)
        if out is not None:
            keep = [i for i, w in enumerate(want) if w]
            out = self._download(out if len(keep) == len(ids) else out[self._index(keep)])
            for k, i in enumerate(keep):
                output_row[i] = k
        scores = None if scores is None else self._download(scores)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return PendingBatch(BatchResult(ids, lens, None, out, output_row), scores, done)

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device without waiting for queued device work (a plain ``.to``
        synchronizes the stream: the next call could not be prepared while one runs)."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _index(self, values: list[int]) -> torch.Tensor:
        return self._upload(torch.tensor(values, dtype=torch.long))

    def _download(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's copy on the CPU, filled asynchronously on CUDA (pinned)."""
        if self.device.type != "cuda":
            return t.cpu()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def _run_segments(self, x: torch.Tensor, lens: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Raw fp32 model outputs y (b, L, o), by rounds over the distinct chunk lengths (rows
        past a stream's length are zero)."""
        b, L = len(lens), x.shape[1]
        y = None
        start = 0
        for end in sorted(set(lens) - {0}):
            live = [i for i, n in enumerate(lens) if n >= end]  # streams with samples in [start, end)
            every = len(live) == b
            active = None if every else self._index(live)
            rows = slots if every else slots.index_select(0, active)
            xa = x[:, start:end] if every else x[active, start:end]
            out = self._calls(xa, rows).float()
            if every and start == 0 and end == L:  # one round over everything: no copy
                return out
            if y is None:
                y = torch.zeros(b, L, self.out_dim, device=self.device, dtype=torch.float32)
            if every:
                y[:, start:end] = out
            else:
                y[active, start:end] = out
            start = end
        if y is None:
            y = torch.zeros(b, L, self.out_dim, device=self.device, dtype=torch.float32)
        return y

    def _finish(self, x: torch.Tensor, lens: list[int], slots: torch.Tensor, y: torch.Tensor, want: bool):
        """Head outputs (b, L, o) (None unless ``want``) and lm scores (b, L) or None; updates
        ``last_output`` with each fed stream's last outputs."""
        head = self.cfg.head
        fed = [i for i, n in enumerate(lens) if n]
        last = None
        if fed:  # raw y at each fed stream's last sample, (b', o)
            every = len(fed) == len(lens) and len(set(lens)) == 1
            last = y[:, -1] if every else y[self._index(fed), self._index([lens[i] - 1 for i in fed])]
        out = head_output(head, y) if want else None
        scores = None
        if head == "lm" and self.cfg.input_kind == "tokens" and not y.shape[1]:
            scores = y.new_zeros(y.shape[0], 0)
        elif head == "lm" and self.cfg.input_kind == "tokens":
            # the first token under the stored log-probs; the others: log p(x_t | x_<t), read from the
            # log-probs when they are built anyway, else the logit of x_t at step t-1 minus that
            # step's logsumexp (no (b, L, o) log-softmax built for a scores-only call)
            scores = self.last_output.index_select(0, slots).gather(-1, x[:, :1])  # (b, 1)
            if y.shape[1] > 1:
                nxt = x[:, 1:].unsqueeze(-1)
                if out is not None:
                    rest = out[:, :-1].gather(-1, nxt).squeeze(-1)
                elif scores_cpu.applies(y):  # the same in C, one pass a row: the CPU engine
                    rest = scores_cpu.token_log_probs_cpu(y[:, :-1], x[:, 1:])
                else:
                    prev = y[:, :-1]
                    rest = prev.gather(-1, nxt).squeeze(-1) - torch.logsumexp(prev, dim=-1)
                scores = torch.cat([scores, rest], dim=1)  # (b, L)
        if last is not None:
            self.last_output.index_copy_(0, slots if len(fed) == len(lens) else
                                         slots.index_select(0, self._index(fed)),
                                         head_output(head, last))
        return out, scores

    # ------------------------------------------------------------------ validation

    def _check_chunk(self, sid: int, chunk) -> torch.Tensor:
        """One chunk -> (l,) long tokens or (l, c) values in the model dtype (on its own device)."""
        cfg = self.cfg
        if not isinstance(chunk, torch.Tensor):
            raise ShapeError(f"stream {sid}: chunk must be a torch.Tensor, got {type(chunk).__name__}")
        if cfg.input_kind == "tokens":
            if chunk.dtype not in TOKEN_DTYPES or chunk.dim() != 1:
                raise ShapeError(
                    f"stream {sid}: token chunk must be an integer tensor (length,), got {chunk.dtype} {tuple(chunk.shape)}"
                )
            return chunk if chunk.dtype == torch.long else chunk.long()
        c = cfg.input_dim
        if not chunk.is_floating_point():
            raise ShapeError(f"stream {sid}: value chunk must be a float tensor (length, {c}), got {chunk.dtype}")
        if chunk.dim() == 1 and c == 1:
            chunk = chunk.unsqueeze(-1)
        if chunk.dim() != 2 or chunk.shape[1] != c:
            raise ShapeError(
                f"stream {sid}: value chunk must have shape (length, {c}) ({c} channels), got {tuple(chunk.shape)}"
            )
        return chunk.to(self.dtype)

    def _stack_uniform(self, chunks: list) -> torch.Tensor | None:
        """The chunks stacked and checked as one (b, l) | (b, l, c) tensor in the model dtype when
        they are tensors of one dtype and shape that pass the stacked checks (a server's steady
        state: a few µs a call instead of one check per chunk); None otherwise, for the per-chunk
        checks to pad them or name the stream at fault."""
        try:
            if len({c.dtype for c in chunks}) != 1:  # stack would promote: an int chunk among floats passes
                return None
            return self._check_stacked(range(len(chunks)), torch.stack(chunks))
        except (AttributeError, TypeError, RuntimeError, ShapeError):  # not tensors, shapes differ, bad shape
            return None

    def _check_stacked(self, ids: list[int], x) -> torch.Tensor:
        """Stacked chunks of ``ids`` -> (b, l) long tokens or (b, l, c) values in the model dtype."""
        cfg, b = self.cfg, len(ids)
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"stacked chunks must be a torch.Tensor, got {type(x).__name__}")
        if cfg.input_kind == "tokens":
            if x.dtype not in TOKEN_DTYPES or x.dim() != 2 or x.shape[0] != b:
                raise ShapeError(f"stacked token chunks of {b} streams must be an integer tensor ({b}, length), "
                                 f"got {x.dtype} {tuple(x.shape)}")
            return x if x.dtype == torch.long else x.long()
        c = cfg.input_dim
        if x.dim() == 2 and c == 1:
            x = x.unsqueeze(-1)
        if not x.is_floating_point() or x.dim() != 3 or x.shape[0] != b or x.shape[2] != c:
            raise ShapeError(f"stacked value chunks of {b} streams must be a float tensor ({b}, length, {c}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        return x.to(self.dtype)

    def _check_token_range(self, ids: list[int], xs: list[torch.Tensor], x: torch.Tensor) -> None:
        vocab = self.cfg.vocab_size
        lo, hi = torch.aminmax(x)  # x is still on the CPU: no device sync
        if int(lo) >= 0 and int(hi) < vocab:
            return
        for sid, chunk in zip(ids, xs):
            if chunk.numel() and (int(chunk.min()) < 0 or int(chunk.max()) >= vocab):
                raise ShapeError(
                    f"stream {sid}: token ids must lie in [0, {vocab}), got [{int(chunk.min())}, {int(chunk.max())}]"
                )


def head_output(head: str, y: torch.Tensor) -> torch.Tensor:
    """Raw fp32 model outputs (..., o) -> what ChunkResult.outputs holds for ``head``."""
    if head == "lm":
        return F.log_softmax(y, dim=-1)
    if head == "classifier":
        return F.softmax(y, dim=-1)
    return y

