"""Pieces shared by the datamodules: file resolution, split arithmetic, the epoch-keyed
samplers behind seeded random windows and shuffles, and the DataLoader boilerplate.

Random windows are reproducible and differ per epoch without any state in the workers: the
train sampler yields integer *keys* ``epoch * n + i`` (shuffled), and a dataset derives its
window from ``numpy.random.default_rng([seed, key])``. Lightning calls ``set_epoch`` on the
sampler (also through its ``DistributedSamplerWrapper``), so every rank and worker sees the
same key stream and each key maps to one window. The training loader is a
``ResumableDataLoader``: its place in the epoch goes into checkpoints, and a run resumed from
the middle of an epoch continues that epoch's order.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from streamssm.datamodules.resumable import ResumableDataLoader
from streamssm.errors import ConfigError, DataFormatError
from streamssm.serving import ServingSpec

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def resolve_files(spec: str | Sequence[str], what: str, suffixes: Sequence[str]) -> list[Path]:
    """Expand a folder, a glob pattern, one path or a list of them into a sorted file list.

    A folder contributes its files ending in one of ``suffixes`` (case-insensitive, not
    recursive). Raises ``DataFormatError`` naming the path when a path does not exist or a
    pattern/folder matches nothing.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ConfigError(f"{what}: expected at least one path, got an empty list")
    out: list[Path] = []
    lowered = tuple(s.lower() for s in suffixes)
    for item in items:
        item = str(item)
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(lowered))
            if not found:
                raise DataFormatError(f"{what}: folder {str(p)!r} holds no files ending in {list(suffixes)}")
            out.extend(found)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
            if not found:
                raise DataFormatError(f"{what}: pattern {item!r} matches no files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            if p.name.lower().endswith(lowered):  # named like one of its files
                raise DataFormatError(f"{what}: file {str(p)!r} does not exist")
            raise DataFormatError(f"{what}: {str(p)!r} does not exist (no such file or folder)")
    return out


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validate split fractions: each in [0, 1) and together leaving room for training."""
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{name}: expected a fraction in [0, 1), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction: expected < 1 so that a training split remains, "
            f"got {val_fraction} + {test_fraction}"
        )


def split_points(length: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Cut ``[0, length)`` into train ``[0, a)``, val ``[a, b)``, test ``[b, length)``."""
    b = length - int(round(length * test_fraction))
    a = b - int(round(length * val_fraction))
    return max(a, 0), max(b, 0)


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def tile_starts(lo: int, hi: int, need: int, step: int) -> list[int]:
    """Starts of non-overlapping (by ``step``) spans of ``need`` items inside ``[lo, hi)``."""
    if hi - lo < need:
        return []
    return list(range(lo, hi - need + 1, step))


def evenly_spaced(items: list, limit: int | None) -> list:
    """At most ``limit`` items spread evenly over ``items`` (all of them when ``limit`` is None)."""
    if limit is None or len(items) <= limit:
        return items
    idx = np.linspace(0, len(items) - 1, num=limit).round().astype(np.int64)
    return [items[i] for i in idx]


class SpanSampler:
    """Uniform random placement of a span of ``need`` items over several ranges.

    A range of length n offers ``n - need + 1`` start positions; ranges are picked with
    probability proportional to that count, so every valid start is equally likely. Ranges
    shorter than ``need`` are ignored; ``eligible`` lists the indices of the others.
    """

    def __init__(self, lengths: Sequence[int], need: int) -> None:
        self.need = int(need)
        self._lengths = [int(n) for n in lengths]
        self.eligible = [i for i, n in enumerate(lengths) if n >= need]
        if not self.eligible:
            raise ConfigError(
                f"span of {need} items: every range is shorter (longest {max(lengths, default=0)}); "
                f"use a shorter window/crop"
            )
        counts = np.array([lengths[i] - need + 1 for i in self.eligible], dtype=np.float64)
        self._cum = np.cumsum(counts / counts.sum())

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """``(range index, offset of the span start inside that range)``."""
        j = min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self.eligible) - 1)
        i = self.eligible[j]
        return i, int(rng.integers(0, self._n(i)))

    def _n(self, i: int) -> int:
        return self._lengths[i] - self.need + 1


class EpochShuffleSampler(Sampler[int]):
    """Yields a seeded permutation of ``0 .. num_samples-1``, a different one each epoch.

    The order depends only on ``(seed, epoch)`` (Lightning calls ``set_epoch``), so it is the
    same in every run, process and rank, and a resumed run can find its place in it.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def _permutation(self) -> torch.Tensor:
        """(num_samples,) int64: this epoch's order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self._permutation().tolist())


class EpochKeySampler(EpochShuffleSampler):
    """Yields ``num_samples`` keys per epoch: a seeded permutation of ``epoch*n .. epoch*n+n-1``.

    Datasets map a key to a window with ``default_rng([seed, key])``, so windows are fresh
    every epoch yet identical across runs, workers and ranks.
    """

    def __iter__(self) -> Iterator[int]:
        return iter((self.epoch * self.num_samples + self._permutation()).tolist())


class LazyHandleMixin:
    """Opens a file handle on first use in each process and never pickles it.

    A handle opened before a DataLoader forks would share one file offset between workers;
    the pid check reopens it in every worker (fork or spawn alike).
    """

    _handle_obj: Any = None
    _handle_pid: int | None = None

    def _open_handle(self) -> Any:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def handle(self) -> Any:
        pid = os.getpid()
        if self._handle_obj is None or self._handle_pid != pid:
            self._handle_obj = self._open_handle()
            self._handle_pid = pid
        return self._handle_obj

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle_obj"] = None
        state["_handle_pid"] = None
        return state


class BaseDataModule(pl.LightningDataModule):
    """DataLoader plumbing shared by the streamssm datamodules."""

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool, seed: int) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("num_workers", num_workers, minimum=0)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self._datasets: dict[str, Dataset] = {}
        self._unusable: dict[str, str] = {}  # split -> why it has no sample although configured

    #: the ``__init__`` arguments that name input files (a path, folder, pattern or list of
    #: them) -> the suffixes a folder's files must end in; :meth:`check_inputs` resolves them
    input_files: ClassVar[dict[str, tuple[str, ...]]] = {}

    def check_inputs(self) -> None:
        """Raise the ``DataFormatError`` that ``setup`` would for an input path that does not
        exist (or a folder or pattern matching no file), reading no data: ``streamssm fit``
        calls this before the Trainer starts."""
        for name, suffixes in self.input_files.items():
            spec = self.hparams.get(name)
            if spec is not None:
                resolve_files(spec, name, suffixes)

    def _split_unusable(self, split: str, why: str) -> None:
        """Record (and log) why a configured split yields no sample; asking for it raises that."""
        self._unusable[split] = why
        log.warning("%s", why)

    def _dataset(self, split: str) -> Dataset:
        if not self._datasets:
            self.setup("fit")
        ds = self._datasets.get(split)
        if ds is None and split in self._unusable:
            raise ConfigError(f"{type(self).__name__}: {self._unusable[split]}")
        if ds is None:
            raise ConfigError(
                f"{type(self).__name__}: no {split!r} split is configured "
                f"(set its fraction, chromosomes or files); available: {sorted(self._datasets)}"
            )
        return ds

    #: how samples become a batch (None: torch's default stacking)
    collate_fn: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None

    def _loader(
        self, split: str, sampler: EpochShuffleSampler | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """``split``'s samples in order, or in ``sampler``'s order (training): then a loader whose
        place in the epoch is saved in checkpoints, so that a resumed run continues the epoch."""
        loader_cls = DataLoader if sampler is None else ResumableDataLoader
        return loader_cls(
            self._dataset(split),
            batch_size=self.batch_size if batch_size is None else batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # no GPU: nothing to pin for (torch warns)
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            collate_fn=self.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def serving_spec(self) -> ServingSpec:  # pragma: no cover - implemented by subclasses
        """The serving contract of this data (the task completes it and saves it once)."""
        raise NotImplementedError


def pad_batch(samples: list[dict[str, torch.Tensor]], pad_value: int = 0) -> dict[str, torch.Tensor]:
    """Samples of unequal length -> one batch padded at the end to the longest.

    Each sample holds ``inputs`` (n, ...), ``mask`` (n,) bool and ``targets`` () (one label);
    inputs are padded with ``pad_value``, the mask with False (the causal model's valid steps
    never see the padding; ``SequenceClassifier`` reads its decision at the last valid step).
    Returns ``inputs`` (b, l, ...), ``mask`` (b, l), ``targets`` (b,).
    """
    longest = max(int(s["inputs"].shape[0]) for s in samples)
    first = samples[0]["inputs"]
    inputs = first.new_full((len(samples), longest, *first.shape[1:]), pad_value)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = int(s["inputs"].shape[0])
        inputs[i, :n] = s["inputs"]
        mask[i, :n] = s["mask"]
    return {"inputs": inputs, "mask": mask, "targets": torch.stack([s["targets"] for s in samples])}


def span_too_short(split: str, longest: int, need: int, unit: str, knob: str, fraction: float) -> str:
    """The message for a split whose longest span cannot hold one window."""
    return (
        f"the {SPLIT_NAMES[split]} span of {longest} {unit} is shorter than the {need} {unit} one window needs; "
        f"lower {knob} or raise {split}_fraction (now {fraction})"
    )
