"""Files to stream: audio (soundfile), CSV (polars) or FASTA (pyfaidx) read as a :class:`Source`
(samples or bases plus the stream settings they need), and :func:`stream_source`, which sends a
whole source through a :class:`~streamssm.service.client.StreamClient`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamssm.audio_io import read_audio
from streamssm.errors import DataFormatError

from .client import StreamClient

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas")


@dataclass
class Source:
    """A file read for streaming: samples (l, c) float32 or a str of bases, and its stream settings."""

    data: np.ndarray | str
    format: str
    sample_rate: int | None
    channels: int

    def chunks(self, size: int) -> Iterator[np.ndarray | str]:
        for i in range(0, len(self.data), size):
            yield self.data[i : i + size]


def read_source(path: str | Path, *, record: str | None = None, columns: list[str] | None = None,
                sample_rate: int | None = None, fmt: str | None = None) -> Source:
    """WAV/FLAC (soundfile), CSV (polars; numeric columns or ``columns``) or FASTA (pyfaidx;
    the first record or ``record``) -> :class:`Source`."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        samples, rate = read_audio(path)  # (l, c)
        return Source(samples, fmt or "f32le", int(rate), int(samples.shape[1]))
    if suffix == ".csv":
        from streamssm.datamodules.sensor import read_numeric_columns  # the training tables' reader: bad files named

        values, names = read_numeric_columns(path, columns)  # (l, c)
        return Source(values.astype(np.float32), "f32le", sample_rate, len(names))
    if suffix in FASTA_SUFFIXES:
        import pyfaidx

        fasta = pyfaidx.Fasta(str(path), as_raw=True, read_ahead=1 << 16)
        name = record or next(iter(fasta.keys()), None)
        if name is None or name not in fasta:
            raise DataFormatError(f"{path}: record {name!r} not found; it holds {list(fasta.keys())[:10]}")
        return Source(str(fasta[name][:]), "text", sample_rate, 1)
    raise DataFormatError(f"{path}: unsupported file type {suffix!r}; expected audio {AUDIO_SUFFIXES}, .csv or FASTA {FASTA_SUFFIXES}")


async def stream_source(source: Source, url: str, *, chunk: int, token: str | None = None, realtime: bool = False,
                        results: str = "json", include: tuple[str, ...] = ("outputs", "scores"),
                        progress: Any = None, ssl: Any = None, wait: float = 0.0) -> tuple[StreamClient, dict[str, Any]]:
    """Stream a whole source in chunks of ``chunk`` samples; returns the client (results) and summary.

    ``realtime`` paces chunks at the source's sample rate; ``progress(samples_sent)`` is called
    after each chunk; ``ssl``: the client's ``ssl.SSLContext`` for wss://; ``wait``: seconds a
    refused connection is retried (a server still starting)."""
    client = StreamClient(url, format=source.format, sample_rate=source.sample_rate, channels=source.channels,
                          token=token, results=results, include=include, ssl=ssl, wait=wait)
    async with client:
        t0, sent = time.perf_counter(), 0
        for piece in source.chunks(chunk):
            await client.send(piece)
            sent += len(piece)
            if progress is not None:
                progress(sent)
            if realtime and source.sample_rate:
                delay = t0 + sent / source.sample_rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        summary = await client.end()
    return client, summary
