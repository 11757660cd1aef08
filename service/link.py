"""The link between the engine process and one worker process of ``serve --workers N``.

Messages are tuples; every message queued (:meth:`Link.send`) during one event-loop iteration
goes out in one write: a batch, pickled and length-prefixed, over a socketpair the engine
process made for that worker (nothing else can connect to it; both ends are this package's
own processes). :meth:`Link.call` sends ``("call", id, op, args)`` and awaits the matching
``("reply", id, value, error)``; errors travel as :func:`error_tuple` and are raised again on
the caller's side with their type, message, close code and reason. A worker's chunks and the
engine's results travel batched (:func:`queue_chunk`, :func:`queue_result`: added to the message
queued last, so the order of messages stays): one message and one buffer (:class:`ArrayBatch`)
per loop iteration, not one per chunk, in the engine process's per-chunk path.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import numpy as np
import torch

from streamssm.errors import ProtocolError, StateError

_HEADER = struct.Struct("!Q")  # bytes of the pickled batch that follows
#: bytes a link's reader may hold before it stops reading until they are consumed: above the
#: batches of one loop iteration (~0.3 MB of chunks at 512 streams over 4 workers), whose reads
#: paused and resumed the socket (two epoll_ctl calls) several times per batch at asyncio's
#: default of 64 KiB
_READ_LIMIT = 1 << 24


class ArrayBatch:
    """Arrays that cross a link as one buffer: the chunks a worker submits in one event-loop
    iteration, or the rows of one worker's streams that the engine's model calls computed. Pickled
    as their concatenation (one bytearray) and their lengths, so the engine process pickles or
    unpickles one buffer per message instead of one per chunk or per result. Unpickled as a
    tuple of arrays (``tensors``: torch tensors) that are views of that buffer, writable, None
    where ``items`` holds None. The arrays share their dtype and trailing shape (both ends run on
    one host: raw bytes)."""

    def __init__(self, tensors: bool = False):
        self.tensors = tensors
        self.items: list[np.ndarray | None] = []  # (l, ...) arrays or None, in order

    def add(self, a: np.ndarray) -> bool:
        """Append ``a`` (l, ...) unless its dtype or trailing shape differ from the first array's
        (False: the caller starts another batch)."""
        first = next((b for b in self.items if b is not None), a)
        if a.dtype != first.dtype or a.shape[1:] != first.shape[1:]:
            return False
        self.items.append(a)
        return True

    def __reduce__(self) -> tuple:
        arrays = [a for a in self.items if a is not None]
        lengths = [-1 if a is None else len(a) for a in self.items]
        first = arrays[0] if arrays else np.empty(0, np.float32)
        data = bytearray(sum(a.nbytes for a in arrays))
        if arrays:
            np.concatenate(arrays, out=np.frombuffer(data, first.dtype).reshape(-1, *first.shape[1:]))
        return _unpack_batch, (data, first.dtype.char, first.shape[1:], lengths, self.tensors)


_TORCH_DTYPES: dict[str, torch.dtype] = {}  # numpy character code -> torch dtype


def _unpack_batch(data: bytearray, code: str, trailing: tuple[int, ...], lengths: list[int],
                  tensors: bool) -> tuple[np.ndarray | torch.Tensor | None, ...]:
    """An :class:`ArrayBatch` on the receiving end: views of ``data`` (length -1: None)."""
    rows = [n for n in lengths if n >= 0]
    if not rows:
        return (None,) * len(lengths)
    if tensors:
        dtype = _TORCH_DTYPES.get(code)
        if dtype is None:
            dtype = _TORCH_DTYPES.setdefault(code, torch.from_numpy(np.empty(0, dtype=code)).dtype)
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)  # frombuffer refuses b""
        if trailing:
            flat = flat.view(sum(rows), *trailing)
        # one call makes every view; the method itself (Tensor.split's Python wrapper: ~5 us a message)
        views = iter(flat.split_with_sizes(rows))
    else:
        flat = np.frombuffer(data, dtype=code).reshape(sum(rows), *trailing)
        # slices: np.split costs 6-19 us a message of 1-16 arrays, slicing 0.8-3.7
        views = iter([flat[end - n:end] for n, end in zip(rows, itertools.accumulate(rows))])
    return tuple(None if n < 0 else next(views) for n in lengths)


def queue_chunk(link: Link, key: int, seq: int, start: int, x: np.ndarray, received: float) -> None:
    """A worker's chunk ``x`` (l,) or (l, c) for stream ``key``, queued on ``link``: added to the
    ``("chunks", keys, seqs, starts, received, lengths, xs)`` message queued last in this loop
    iteration, or the first of a new one (``xs``: an :class:`ArrayBatch`, numpy views on the
    engine's side: its event loop makes no torch call per message, each of which hands the GIL to
    the engine thread and waits to get it back; the engine thread makes them tensors; ``lengths``:
    their l)."""
    message = link.last_queued("chunks")
    if message is None or not message[6].add(x):
        message = ("chunks", [], [], [], [], [], ArrayBatch())
        message[6].add(x)
        link.send(*message)
    _, keys, seqs, starts, times, lengths, _ = message
    keys.append(key)
    seqs.append(seq)
    starts.append(start)
    times.append(received)
    lengths.append(len(x))


def queue_result(link: Link, key: int, seq: int, slices: list[tuple[np.ndarray | None, np.ndarray | None]]) -> None:
    """One chunk's raw results for stream ``key``, one (outputs (n, o) | None, scores (n,) | None)
    pair per model call, queued on ``link``: added to the ``("results", keys, seqs, counts,
    outputs, scores)`` message queued last in this loop iteration, or the first of a new one
    (``counts``: slices per chunk; ``outputs``, ``scores``: :class:`ArrayBatch` es of all slices in
    order, outputs as tensors on the worker's side). Rows of one model's calls (float32, one
    output width) join the batches unchecked."""
    message = link.last_queued("results")
    if message is None:
        message = ("results", [], [], [], ArrayBatch(tensors=True), ArrayBatch())
        link.send(*message)
    _, keys, seqs, counts, outputs, scores = message
    keys.append(key)
    seqs.append(seq)
    counts.append(len(slices))
    for out, score in slices:
        outputs.items.append(out)
        scores.items.append(score)


class LinkClosed(ConnectionError):
    """The process at the other end of the link is gone."""


def error_tuple(exc: BaseException) -> tuple:
    """An exception as a picklable tuple (:func:`raise_error` raises it again)."""
    if isinstance(exc, ProtocolError):
        return ("protocol", str(exc), exc.code, exc.reason)
    if isinstance(exc, StateError):
        return ("state", str(exc))
    return ("other", f"{type(exc).__name__}: {exc}")


def raise_error(error: tuple) -> NoReturn:
    kind, message = error[0], error[1]
    if kind == "protocol":
        raise ProtocolError(message, error[2], error[3])
    if kind == "state":
        raise StateError(message)
    raise RuntimeError(message)


class Link:
    """One end of a worker link: batched sends, request/reply calls, a message iterator."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flush_delay: float = 0.0):
        self._reader, self._writer = reader, writer
        self.flush_delay = flush_delay  # seconds queued messages wait to leave together (0: end of the iteration)
        self._out: list[tuple] = []
        self._flush_handle: asyncio.Handle | None = None  # the flush scheduled for what _out holds
        self._calls: dict[int, asyncio.Future] = {}
        self._next_call = 0
        self.closed = False

    @classmethod
    async def over(cls, sock: socket.socket, flush_delay: float = 0.0) -> Link:
        """A link over a connected stream socket (one end of a socketpair)."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=_READ_LIMIT)
        return cls(reader, writer, flush_delay)

    def send(self, *message: Any) -> None:
        """Queue one message; it leaves with the others queued in this loop iteration, or with
        those queued within ``flush_delay`` seconds of the first (calls and replies: at the end of
        the iteration). Nothing is sent once the link is closed (the other end is gone: nobody
        would read it)."""
        if self.closed:
            return
        if not self._out:
            loop = asyncio.get_running_loop()
            self._flush_handle = (loop.call_later(self.flush_delay, self._flush) if self.flush_delay
                                  else loop.call_soon(self._flush))
        self._out.append(message)

    def _send_now(self, *message: Any) -> None:
        """Queue ``message`` and flush at the end of this loop iteration even when the link
        delays its flushes (calls and replies: a stream's open or close waits on them; only
        the chunks' messages gain from waiting for more)."""
        self.send(*message)
        if self.flush_delay and self._out:
            self._flush_handle.cancel()
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def last_queued(self, kind: str) -> tuple | None:
        """The message queued last (not sent yet) when it is a ``kind`` message, else None: one
        that may still grow (no message queued after it would be overtaken by what is added)."""
        out = self._out
        return out[-1] if out and out[-1][0] == kind else None

    def _flush(self) -> None:
        if self._flush_handle is not None:  # flushed early (a call, close): its delayed flush would
            self._flush_handle.cancel()  # cut short the delay of the next messages
            self._flush_handle = None
        batch, self._out = self._out, []
        # the other process gone, its EOF not read yet (the reader busy): uvloop raises on a write to the
        # closed transport (an error logged per flush), asyncio drops it; nobody would read it anyway
        if batch and not self.closed and not self._writer.transport.is_closing():
            data = pickle.dumps(batch, protocol=5)
            self._writer.write(_HEADER.pack(len(data)) + data)

    async def call(self, op: str, *args: Any) -> Any:
        """Ask the other end to run ``op(*args)``; its value, or its error raised here
        (LinkClosed when the link ends first)."""
        if self.closed:
            raise LinkClosed(f"link closed before {op}")
        rid, self._next_call = self._next_call, self._next_call + 1
        future = asyncio.get_running_loop().create_future()
        self._calls[rid] = future
        self._send_now("call", rid, op, args)
        try:
            return await future
        finally:
            self._calls.pop(rid, None)

    def reply(self, rid: int, value: Any = None, error: tuple | None = None) -> None:
        self._send_now("reply", rid, value, error)

    async def messages(self) -> AsyncIterator[tuple]:
        """Every message but replies (those resolve their calls), in order, until the other
        end closes; then pending calls raise LinkClosed."""
        try:
            while True:
                try:
                    (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                    batch = pickle.loads(await self._reader.readexactly(size))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                for message in batch:
                    if message[0] == "reply":
                        self._resolve(*message[1:])
                    else:
                        yield message
        finally:
            self.closed = True
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(LinkClosed("the other process closed the link"))

    def _resolve(self, rid: int, value: Any, error: tuple | None) -> None:
        future = self._calls.get(rid)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(value)
        else:
            try:
                raise_error(error)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    async def close(self) -> None:
        """Send what is queued, then close (the other end's messages() ends)."""
        self._flush()
        self.closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass
