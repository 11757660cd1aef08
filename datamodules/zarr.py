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

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Sampler

from streamssm.datamodules._common import LazyHandleMixin, check_positive
from streamssm.errors import ConfigError, DataFormatError, ShapeError

log = logging.getLogger(__name__)

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

    def read(self, array: zarr.Array, s0: int, s1: int, t0: int, t1: int) -> np.ndarray:
        """Series ``[s0, s1)``, steps ``[t0, t1)`` of ``array`` as (b, l, c) or (b, l)."""
        index: list[Any] = [slice(None)] * len(self.shape)
        index[self.layout.time_axis] = slice(t0, t1)
        if self.layout.series_axis is not None:
            index[self.layout.series_axis] = slice(s0, s1)
        raw = np.asarray(array[tuple(index)])
        src = [self.layout.series_axis, self.layout.time_axis, self.layout.channel_axis]
        src = [a for a in src if a is not None]
        out = np.moveaxis(raw, src, list(range(len(src))))
        if self.layout.series_axis is None:
            out = out[None]
        return np.ascontiguousarray(out)


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
        rate = dict(arr.attrs).get("sample_rate")
        inputs.append(InputArray(name, store, tuple(int(n) for n in arr.shape), str(dtype), layout, time_chunk,
                                 None if rate is None else float(rate)))
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


#: Turns raw samples (b, l, c) or (b, l) into the model input tensor of the same batch/time.
RawEncoder = Callable[[np.ndarray], torch.Tensor]


class ZarrChunkDataset(LazyHandleMixin, Dataset):
    """Map-style dataset over ``(array, group, chunk)`` keys -> one encoded time chunk.

    Item: ``{"x": model input (b, l[, c]), "array", "group", "chunk", "t0"}``. Arrays open
    lazily in each process (DataLoader workers reopen them).
    """

    def __init__(self, inputs: Sequence[InputArray], units: Sequence[Unit], chunk_steps: int,
                 encoder: RawEncoder) -> None:
        self.inputs = list(inputs)
        self.units = {u.key: u for u in units}
        self.chunk_steps = int(chunk_steps)
        self.encoder = encoder

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
        raw = inp.read(self.handle()[a], unit.s0, unit.s1, t0, t1)
        return {"x": self.encoder(raw), "array": a, "group": g, "chunk": k, "t0": t0}


class ZarrDataModule(pl.LightningDataModule):
    """Predict-side data of ``streamssm infer``: chunk items of the units this rank owns.

    Args:
        inputs: arrays from :func:`open_inputs`.
        encoder: raw samples -> model input (see ``streamssm.zarr_infer.make_raw_encoder``).
        chunk_steps: time steps per item, a multiple of every input's zarr time chunk.
        batch_series: series computed together (one unit).
        start_chunk: first unfinished chunk of a unit (resume); default 0.
        num_workers: DataLoader workers; >= 1 reads the next chunks while the model computes.
    """

    def __init__(self, inputs: Sequence[InputArray], encoder: RawEncoder, chunk_steps: int, batch_series: int,
                 start_chunk: Callable[[Unit], int] | None = None, num_workers: int = 1) -> None:
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
        self.num_workers = int(num_workers)
        self.units = make_units(self.inputs, self.chunk_steps, self.batch_series)
        self.planned_steps = 0  # series steps this rank will compute (set by predict_dataloader)

    def rank_units(self, rank: int, world_size: int) -> list[Unit]:
        return assign_units(self.units, self.inputs, world_size)[rank]

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer_attached() else (0, 1)
        units = self.rank_units(rank, world)
        sampler = UnitChunkSampler(units, self.start_chunk)
        self.planned_steps = sum(
            (u.s1 - u.s0) * max(0, self.inputs[u.array].n_steps - k * self.chunk_steps)
            for u, k in zip(sampler.units, sampler.starts)
        )
        dataset = ZarrChunkDataset(self.inputs, units, self.chunk_steps, self.encoder)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          prefetch_factor=2 if self.num_workers else None,
                          pin_memory=torch.cuda.is_available())

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None
