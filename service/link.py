"""The link between the engine process and one worker process of ``serve --workers N``.

Messages are tuples; every message queued (:meth:`Link.send`) during one event-loop iteration
goes out in one write: a batch, pickled and length-prefixed, over a socketpair the engine
process made for that worker (nothing else can connect to it; both ends are this package's
own processes). :meth:`Link.call` sends ``("call", id, op, args)`` and awaits the matching
``("reply", id, value, error)``; errors travel as :func:`error_tuple` and are raised again on
the caller's side with their type, message, close code and reason.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import numpy as np
import torch

from streamssm.errors import ProtocolError, StateError

_HEADER = struct.Struct("!Q")  # bytes of the pickled batch that follows


#: an array as it crosses a link: (its bytes, dtype character code (both ends run on one host), shape)
PackedArray = tuple[bytearray, str, tuple[int, ...]]


def pack_array(a: np.ndarray | None) -> PackedArray | None:
    """An array for a link message: packing, pickling and unpacking cost ~3 us an array against
    ~8 us for the array itself (numpy's reduce rebuilds it through a constructor call), once per
    chunk and per result in the engine process."""
    return None if a is None else (bytearray(np.ascontiguousarray(a).data), a.dtype.char, a.shape)


def unpack_array(packed: PackedArray | None) -> np.ndarray | None:
    """The (writable) array of :func:`pack_array`, without a copy."""
    return None if packed is None else np.frombuffer(packed[0], dtype=packed[1]).reshape(packed[2])


_TORCH_DTYPES: dict[str, torch.dtype] = {}  # numpy character code -> torch dtype


def unpack_tensor(packed: PackedArray) -> torch.Tensor:
    """The (writable) tensor of :func:`pack_array`'s array, sharing the message's buffer (one
    torch.frombuffer: ~1.4 us against ~2.5 us through numpy and torch.from_numpy)."""
    buffer, code, shape = packed
    dtype = _TORCH_DTYPES.get(code)
    if dtype is None:
        dtype = _TORCH_DTYPES.setdefault(code, torch.from_numpy(np.empty(0, dtype=code)).dtype)
    if not len(buffer):  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=dtype)
    return flat if len(shape) == 1 else flat.view(shape)


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

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._out: list[tuple] = []
        self._calls: dict[int, asyncio.Future] = {}
        self._next_call = 0
        self.closed = False

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        """A link over a connected stream socket (one end of a socketpair)."""
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    def send(self, *message: Any) -> None:
        """Queue one message; it leaves with the others queued in this loop iteration. Nothing
        is sent once the link is closed (the other end is gone: nobody would read it)."""
        if self.closed:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(message)

    def _flush(self) -> None:
        batch, self._out = self._out, []
        if batch and not self.closed:
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
        self.send("call", rid, op, args)
        try:
            return await future
        finally:
            self._calls.pop(rid, None)

    def reply(self, rid: int, value: Any = None, error: tuple | None = None) -> None:
        self.send("reply", rid, value, error)

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
