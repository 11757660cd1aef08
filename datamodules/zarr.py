"""Zarr v3 arrays as model inputs: axis layout, chunk-aligned reads, and the predict data path
of ``streamssm infer`` (DESIGN §6).

Shape legend: s series, t time steps, c channels, b series in one batch (a *group*), l steps in
one time chunk.

An input is one zarr array (or every array of a group). Its axes are named by index: a time
axis, an optional channel axis (continuous values; token arrays have none) and an optional series
axis (many recordings of equal length). Reads return ``(b, l, c)`` or ``(b, l)`` numpy arrays
whatever the stored axis order.

Inference work is cut into *units*: one group of ``batch_series`` consecutive series of one
array, processed along time in chunks of ``chunk_steps`` (a multiple of the array's zarr time
chunk) while the model carries its state. A unit is the smallest piece a rank owns: the sampler
gives every unit to exactly one rank (balanced by work, the same on every rank) and yields that
rank's ``(array, group, chunk)`` items in order, starting where the unit's saved progress says.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Sampler
from zarr.core.sync import sync

from streamssm.datamodules._common import LazyHandleMixin, check_positive
from streamssm.errors import ConfigError, DataFormatError, ShapeError, StreamSSMError

log = logging.getLogger(__name__)

#: What to do with a storage chunk missing from an input store: "error" (default; a deleted or
#: never-written chunk is a damaged input) or "fill" (read the array's fill value, as zarr does:
#: right for arrays written with ``write_empty_chunks=False``, which skips all-fill chunks).
MissingChunks = Literal["error", "fill"]

_TIME_NAMES = ("time", "t", "step", "steps", "sample", "samples", "position")
_CHANNEL_NAMES = ("channel", "channels", "c", "feature", "features")
_SERIES_NAMES = ("series", "s", "recording", "recordings", "sequence", "sequences", "batch")


def _axis(value: int, ndim: int, what: str, path: str) -> int:
    if not -ndim <= value < ndim:
        raise ShapeError(f"{path}: {what} {value} is out of range for an array with {ndim} axes")
    return value % ndim


def _named_axis(names: Sequence[str | None] | None, candidates: Sequence[str]) -> int | None:
    if not names:
        return None
    for i, n in enumerate(names):
        if n is not None and n.lower() in candidates:
            return i
    return None


@dataclass(frozen=True)
class ArrayLayout:
    """Where time, channels and series lie in one input array (axes are non-negative)."""

    time_axis: int
    channel_axis: int | None
    series_axis: int | None

    def to_dict(self) -> dict[str, int | None]:
        return {"time_axis": self.time_axis, "channel_axis": self.channel_axis, "series_axis": self.series_axis}


def resolve_layout(
    shape: Sequence[int],
    path: str,
    has_channels: bool | None,
    time_axis: int | None = None,
    channel_axis: int | None = None,
    series_axis: int | None = None,
    dimension_names: Sequence[str | None] | None = None,
) -> ArrayLayout:
    """Pick the axes of an input array.

    Explicit axes win; then zarr ``dimension_names`` (``time``, ``channel``, ``series`` and
    synonyms); then the defaults: with channels ``(t, c)`` / ``(s, t, c)``, without
    ``(t,)`` / ``(s, t)``; ``has_channels=None`` (mono audio may lack the axis) reads a 1-D array
    as ``(t,)`` and otherwise like ``True``. Every axis must be accounted for; raises
    ``ShapeError`` naming the array otherwise.
    """
    ndim = len(shape)
    if ndim == 0:
        raise ShapeError(f"{path}: a 0-d array has no time axis")
    roles: dict[str, int | None] = {
        "t": _axis(time_axis, ndim, "time axis", path) if time_axis is not None else _named_axis(dimension_names, _TIME_NAMES),
        "c": _axis(channel_axis, ndim, "channel axis", path) if channel_axis is not None
        else (_named_axis(dimension_names, _CHANNEL_NAMES) if has_channels is not False else None),
        "s": _axis(series_axis, ndim, "series axis", path) if series_axis is not None else _named_axis(dimension_names, _SERIES_NAMES),
    }
    # default axis order by rank: (t, c) / (s, t, c) with channels, (t,) / (s, t) without
    templates = {True: {2: "tc", 3: "stc"}, False: {1: "t", 2: "st"}, None: {1: "t", 2: "tc", 3: "stc"}}
    template = templates[has_channels].get(ndim, "")
    for pos, role in enumerate(template):
        if roles[role] is None:
            free = [a for a in range(ndim) if a not in roles.values()]
            roles[role] = pos if pos in free else (free[0] if free else None)
    t, c, s = roles["t"], roles["c"], roles["s"]
    used = [a for a in (t, c, s) if a is not None]
    if len(set(used)) != len(used):
        raise ShapeError(f"{path}: time/channel/series axes must differ, got {t}/{c}/{s}")
    if t is None:
        raise ShapeError(f"{path}: cannot find a time axis in shape {tuple(shape)}; pass --time-axis")
    if has_channels and c is None:
        raise ShapeError(f"{path}: shape {tuple(shape)} has no channel axis, but the model reads channels")
    extra = sorted(set(range(ndim)) - set(used))
    if extra:
        raise ShapeError(
            f"{path}: shape {tuple(shape)} has axes {extra} that are neither time ({t}), channel ({c}) "
            f"nor series ({s}); expected {'(t, c) or (s, t, c)' if has_channels else '(t,) or (s, t)'}"
        )
    return ArrayLayout(t, c, s)


@dataclass(frozen=True)
class InputArray:
    """One input array: its location, layout and sizes (picklable: the array opens lazily)."""

    name: str  # output array name
    store: str  # filesystem path of the array (zarr.open(store) opens it)
    shape: tuple[int, ...]
    dtype: str
    layout: ArrayLayout
    time_chunk: int  # zarr chunk length along time
    sample_rate: float | None = None  # the array's ``sample_rate`` attribute, if any

    @property
    def n_series(self) -> int:
        return 1 if self.layout.series_axis is None else int(self.shape[self.layout.series_axis])

    @property
    def n_steps(self) -> int:
        return int(self.shape[self.layout.time_axis])

    @property
    def n_channels(self) -> int | None:
        return None if self.layout.channel_axis is None else int(self.shape[self.layout.channel_axis])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.store, "shape": list(self.shape), "dtype": self.dtype,
                "time_chunk": self.time_chunk, "sample_rate": self.sample_rate, **self.layout.to_dict()}

    def _region(self, s0: int, s1: int, t0: int, t1: int) -> list[slice]:
        index = [slice(0, n) for n in self.shape]
        index[self.layout.time_axis] = slice(t0, t1)
        if self.layout.series_axis is not None:
            index[self.layout.series_axis] = slice(s0, s1)
        return index

    def _storage_keys(self, array: zarr.Array, region: Sequence[slice]) -> list[tuple[str, list[slice]]]:
        """Store keys (chunks, or shards when sharded) covering ``region``, each with its region."""
        unit = array.shards or array.chunks
        grid = [range(r.start // u, -(-r.stop // u)) for r, u in zip(region, unit)]
        out = []
        for coords in itertools.product(*grid):
            key = array.metadata.encode_chunk_key(coords)
            out.append((key, [slice(c * u, min((c + 1) * u, n)) for c, u, n in zip(coords, unit, self.shape)]))
        return out

    def _where(self, region: Sequence[slice]) -> str:
        t = region[self.layout.time_axis]
        where = f"time steps {t.start}..{t.stop - 1}"
        if self.layout.series_axis is not None:
            s = region[self.layout.series_axis]
            where = f"series {s.start}..{s.stop - 1}, {where}"
        return where

    def check_chunks(self, array: zarr.Array, region: Sequence[slice]) -> None:
        """Raise ``DataFormatError`` naming the first storage chunk of ``region`` that is absent
        from the store (zarr would read it as the fill value)."""
        keys = self._storage_keys(array, region)

        async def present() -> list[bool]:
            return list(await asyncio.gather(*((array.store_path / key).exists() for key, _ in keys)))

        missing = [(k, r) for (k, r), ok in zip(keys, sync(present())) if not ok]
        if missing:
            key, r = missing[0]
            fill = getattr(array.fill_value, "item", lambda: array.fill_value)()
            raise DataFormatError(
                f"input array {self.store!r}: chunk {key!r} ({self._where(r)}) is missing from the store "
                f"({len(missing)} of {len(keys)} chunks of this read); zarr would read it as the fill value "
                f"{fill!r}. Restore the chunk, or, if the array was written with "
                f"write_empty_chunks=False (all-fill chunks are not stored), pass --missing-chunks fill"
            )

    def _decode(self, array: zarr.Array, region: Sequence[slice]) -> np.ndarray:
        try:
            return np.asarray(array[tuple(region)])
        except Exception as exc:  # codecs raise many types for damaged bytes; find the chunk
            for key, r in self._storage_keys(array, region):
                try:
                    array[tuple(r)]
                except Exception as inner:
                    raise DataFormatError(
                        f"input array {self.store!r}: chunk {key!r} ({self._where(r)}) cannot be decoded "
                        f"({type(inner).__name__}: {inner}); the store is damaged there"
                    ) from inner
            raise DataFormatError(f"input array {self.store!r}: cannot read {self._where(region)}: {exc}") from exc

    def read(self, array: zarr.Array, s0: int, s1: int, t0: int, t1: int,
             missing_chunks: MissingChunks = "error") -> np.ndarray:
        """Series ``[s0, s1)``, steps ``[t0, t1)`` of ``array`` as (b, l, c) or (b, l).

        Raises ``DataFormatError`` naming the chunk when a chunk is absent (``missing_chunks=
        "error"``) or cannot be decoded, and naming series, time index and channel of the first
        NaN/infinite value.
        """
        region = self._region(s0, s1, t0, t1)
        if missing_chunks == "error":
            self.check_chunks(array, region)
        raw = self._decode(array, region)
        src = [self.layout.series_axis, self.layout.time_axis, self.layout.channel_axis]
        src = [a for a in src if a is not None]
        out = np.moveaxis(raw, src, list(range(len(src))))
        if self.layout.series_axis is None:
            out = out[None]
        out = np.ascontiguousarray(out)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            self._raise_non_finite(out, s0, t0)
        return out

    def _raise_non_finite(self, out: np.ndarray, s0: int, t0: int) -> None:
        bad = ~np.isfinite(out)
        first = np.argwhere(bad)[0]  # (b, l[, c])
        where = f"time index {t0 + int(first[1])}"
        if self.layout.series_axis is not None:
            where = f"series {s0 + int(first[0])}, {where}"
        if self.layout.channel_axis is not None:
            where += f", channel {int(first[2])}"
        value = out[tuple(first)]
        raise DataFormatError(
            f"input array {self.store!r}: {value} at {where} ({int(bad.sum())} non-finite value(s) in series "
            f"{s0}..{s0 + out.shape[0] - 1}, steps {t0}..{t0 + out.shape[1] - 1}); fill or drop them before inference"
        )


def _sample_rate(value: Any, where: str) -> float | None:
    """An array's ``sample_rate`` attribute as Hz (None when absent); ``DataFormatError`` unless
    it is a positive finite number."""
    if value is None:
        return None
    try:
        rate = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else float("nan")
    except ValueError:  # text that is not a number
        rate = float("nan")
    if not (np.isfinite(rate) and rate > 0):
        raise DataFormatError(f"{where}: attribute sample_rate must be a positive number of Hz, got {value!r}")
    return rate


def open_inputs(
    spec: str | Path,
    has_channels: bool | None,
    time_axis: int | None = None,
    channel_axis: int | None = None,
    series_axis: int | None = None,
) -> list[InputArray]:
    """Open ``in.zarr`` (an array, or a group: all its arrays) or ``in.zarr/path/to/array``.

    Raises ``DataFormatError`` when nothing zarr lies at ``spec`` or a group holds no arrays,
    ``ShapeError`` when the axes do not fit.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataFormatError(f"input {str(spec)!r} does not exist")
    path = path.resolve()  # one identity for ./in.zarr, in.zarr and /abs/in.zarr (resume compares it)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a non-zarr folder
        raise DataFormatError(f"input {str(spec)!r} is not a zarr array or group: {exc}") from exc
    if isinstance(node, zarr.Group):
        members = sorted(node.arrays(), key=lambda kv: kv[0])
        if not members:
            raise DataFormatError(f"input group {str(spec)!r} holds no arrays")
        pairs = [(name, str(path / name), arr) for name, arr in members]
    else:
        name = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
        pairs = [(name or "output", str(path), node)]
    inputs = []
    for name, store, arr in pairs:
        where = f"input array {store!r}"
        dtype = np.dtype(arr.dtype)
        if has_channels is not False and dtype.kind not in "fiu":
            raise DataFormatError(f"{where}: dtype {dtype} is not numeric (expected float or int samples)")
        if has_channels is False and dtype.kind not in "iu":
            raise DataFormatError(f"{where}: dtype {dtype} cannot hold token ids (expected an integer dtype)")
        names = getattr(arr.metadata, "dimension_names", None)
        layout = resolve_layout(arr.shape, where, has_channels, time_axis, channel_axis, series_axis, names)
        time_chunk = int(arr.chunks[layout.time_axis])
        if int(arr.shape[layout.time_axis]) == 0:
            raise ShapeError(f"{where}: the time axis ({layout.time_axis}) is empty")
        if layout.series_axis is not None and int(arr.shape[layout.series_axis]) == 0:
            raise ShapeError(f"{where}: the series axis ({layout.series_axis}) is empty (shape {tuple(arr.shape)})")
        inputs.append(InputArray(name, store, tuple(int(n) for n in arr.shape), str(dtype), layout, time_chunk,
                                 _sample_rate(dict(arr.attrs).get("sample_rate"), where)))
    return inputs


# ---------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class Unit:
    """Series ``[s0, s1)`` of input ``array`` processed along time in ``n_chunks`` chunks."""

    array: int
    group: int
    s0: int
    s1: int
    n_chunks: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.array, self.group)


def make_units(inputs: Sequence[InputArray], chunk_steps: int, batch_series: int) -> list[Unit]:
    """All units of ``inputs`` in (array, group) order."""
    units = []
    for a, inp in enumerate(inputs):
        n_chunks = -(-inp.n_steps // chunk_steps)
        for g, s0 in enumerate(range(0, inp.n_series, batch_series)):
            units.append(Unit(a, g, s0, min(s0 + batch_series, inp.n_series), n_chunks))
    return units


def assign_units(units: Sequence[Unit], inputs: Sequence[InputArray], world_size: int) -> list[list[Unit]]:
    """Give every unit to one of ``world_size`` ranks, balancing steps (deterministic).

    Largest units first to the least loaded rank (ties: lowest rank); each rank's list is
    returned in (array, group) order. The split depends only on the shapes, never on progress,
    so ranks agree without communicating and a resumed run gives each rank the same units.
    """
    check_positive("world_size", world_size)
    loads = [0] * world_size
    owned: list[list[Unit]] = [[] for _ in range(world_size)]
    work = sorted(units, key=lambda u: (-(u.s1 - u.s0) * inputs[u.array].n_steps, u.array, u.group))
    for u in work:
        r = min(range(world_size), key=lambda i: (loads[i], i))
        loads[r] += (u.s1 - u.s0) * inputs[u.array].n_steps
        owned[r].append(u)
    return [sorted(o, key=lambda u: u.key) for o in owned]


class UnitChunkSampler(Sampler[tuple[int, int, int]]):
    """Yields this rank's ``(array, group, chunk)`` items: its units in order, each from its
    first unfinished chunk (``start_chunk(unit)``) to its last."""

    def __init__(self, units: Sequence[Unit], start_chunk: Callable[[Unit], int]) -> None:
        self.units = list(units)
        self.starts = [int(start_chunk(u)) for u in self.units]
        for u, k in zip(self.units, self.starts):
            if not 0 <= k <= u.n_chunks:
                raise DataFormatError(f"unit {u.key}: saved progress {k} is outside 0..{u.n_chunks} chunks")

    def __len__(self) -> int:
        return sum(u.n_chunks - k for u, k in zip(self.units, self.starts))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for u, k0 in zip(self.units, self.starts):
            for k in range(k0, u.n_chunks):
                yield (u.array, u.group, k)


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the main process (which finishes its chunk and stops
    them); a worker killed by a group-wide SIGTERM would fail the run instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: Turns raw samples (b, l, c) or (b, l) into the model input tensor of the same batch/time.
RawEncoder = Callable[[np.ndarray], torch.Tensor]


class ZarrChunkDataset(LazyHandleMixin, Dataset):
    """Map-style dataset over ``(array, group, chunk)`` keys -> one encoded time chunk.

    Item: ``{"x": model input (b, l[, c]), "array", "group", "chunk", "t0"}``, or ``"error"``
    (a ``StreamSSMError`` that the consumer raises) in place of ``"x"`` when the chunk cannot be
    read. Arrays open lazily in each process (DataLoader workers reopen them).
    """

    def __init__(self, inputs: Sequence[InputArray], units: Sequence[Unit], chunk_steps: int,
                 encoder: RawEncoder, missing_chunks: MissingChunks = "error") -> None:
        self.inputs = list(inputs)
        self.units = {u.key: u for u in units}
        self.chunk_steps = int(chunk_steps)
        self.encoder = encoder
        self.missing_chunks = missing_chunks

    def _open_handle(self) -> list[zarr.Array]:
        return [zarr.open_array(inp.store, mode="r") for inp in self.inputs]

    def __len__(self) -> int:
        return sum(u.n_chunks for u in self.units.values())

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        a, g, k = key
        unit = self.units[(a, g)]
        inp = self.inputs[a]
        t0 = k * self.chunk_steps
        t1 = min(t0 + self.chunk_steps, inp.n_steps)
        item: dict[str, Any] = {"array": a, "group": g, "chunk": k, "t0": t0}
        try:
            raw = inp.read(self.handle()[a], unit.s0, unit.s1, t0, t1, self.missing_chunks)
            item["x"] = self.encoder(raw)
        except StreamSSMError as exc:  # carried to the main process as it is (a DataLoader worker
            item["error"] = exc        # would re-raise it wrapped in its traceback text)
        return item


class ZarrDataModule(pl.LightningDataModule):
    """Predict-side data of ``streamssm infer``: chunk items of the units this rank owns.

    Args:
        inputs: arrays from :func:`open_inputs`.
        encoder: raw samples -> model input (see ``streamssm.zarr_infer.make_raw_encoder``).
        chunk_steps: time steps per item, a multiple of every input's zarr time chunk.
        batch_series: series computed together (one unit).
        start_chunk: first unfinished chunk of a unit (resume); default 0.
        num_workers: DataLoader workers; >= 1 reads the next chunks while the model computes.
            Workers ignore SIGTERM: the main process decides when to stop (and stops them).
        missing_chunks: a chunk absent from an input store is an error, or reads as fill.
    """

    def __init__(self, inputs: Sequence[InputArray], encoder: RawEncoder, chunk_steps: int, batch_series: int,
                 start_chunk: Callable[[Unit], int] | None = None, num_workers: int = 1,
                 missing_chunks: MissingChunks = "error") -> None:
        super().__init__()
        check_positive("chunk_steps", chunk_steps)
        check_positive("batch_series", batch_series)
        check_positive("num_workers", num_workers, minimum=0)
        for inp in inputs:
            if chunk_steps % inp.time_chunk:
                raise ConfigError(
                    f"chunk_steps: expected a multiple of the time chunk {inp.time_chunk} of {inp.store!r} "
                    f"(reads stay chunk-aligned), got {chunk_steps}"
                )
        self.inputs = list(inputs)
        self.encoder = encoder
        self.chunk_steps = int(chunk_steps)
        self.batch_series = int(batch_series)
        self.start_chunk = start_chunk or (lambda unit: 0)
        if missing_chunks not in ("error", "fill"):
            raise ConfigError(f"missing_chunks: expected 'error' or 'fill', got {missing_chunks!r}")
        self.num_workers = int(num_workers)
        self.missing_chunks = missing_chunks
        self.units = make_units(self.inputs, self.chunk_steps, self.batch_series)
        self.planned_steps = 0  # series steps this rank will compute (set by predict_dataloader)

    def remaining_steps(self, units: Sequence[Unit], from_start: bool = False) -> int:
        """Series steps of ``units`` not finished yet (``start_chunk`` says where each resumes;
        ``from_start``: all of them)."""
        return sum(
            (u.s1 - u.s0) * max(0, self.inputs[u.array].n_steps - (0 if from_start else int(self.start_chunk(u)))
                                * self.chunk_steps)
            for u in units
        )

    def rank_units(self, rank: int, world_size: int) -> list[Unit]:
        return assign_units(self.units, self.inputs, world_size)[rank]

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer_attached() else (0, 1)
        units = self.rank_units(rank, world)
        sampler = UnitChunkSampler(units, self.start_chunk)
        self.planned_steps = self.remaining_steps(units)
        dataset = ZarrChunkDataset(self.inputs, units, self.chunk_steps, self.encoder, self.missing_chunks)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          prefetch_factor=2 if self.num_workers else None, worker_init_fn=_ignore_sigterm,
                          pin_memory=torch.cuda.is_available())

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None
