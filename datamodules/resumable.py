"""The training DataLoader that resumes mid-epoch where it stopped.

Lightning (2.6) saves ``state_dict()`` of every training loader that offers
``state_dict``/``load_state_dict`` in the checkpoint (the fit loop's ``combined_loader``) and
hands it to ``load_state_dict`` of the new run's loader before the first batch; only for such a
loader does it stay quiet about resuming "from a checkpoint that ended before the epoch ended".

The state is the loader's place in the epoch: ``(epoch, batches handed out)``. The sampler must
be epoch-keyed: its ``epoch`` attribute (set by Lightning's ``set_epoch``) alone fixes the order
(``EpochKeySampler``, ``EpochShuffleSampler``, and Lightning's ``DistributedSamplerWrapper``
around them under DDP, where every rank's loader is at the same place and loads rank 0's state).
A resumed epoch skips the batches already trained on at the index level: the sampler's indices
for them are drawn and dropped, no sample is read.

An iteration fixes its epoch and its start at its first ``next``, not at ``iter()``: Lightning
creates the iterator before it calls ``set_epoch``, and a multi-worker iterator draws indices as
soon as it exists (without this, a resumed run with workers replayed epoch 0's order).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def reopen_stopped_epoch(checkpoint: dict[str, Any]) -> None:
    """Let a run resumed from ``checkpoint`` finish the epoch that ``max_steps`` stopped.

    A fit stopped by ``max_steps`` in the middle of an epoch runs the epoch-end hooks, and the
    checkpoints they save count that epoch as processed (``last.ckpt`` as completed too): the
    resumed run started the next epoch and the stopped one's remaining batches were never
    trained on. When the checkpoint's training loader (a :class:`ResumableDataLoader`) says it
    stopped inside epoch ``e``, the fit loop's epoch progress is set back to "epoch ``e``
    started", so the resumed run goes on at that loader's next batch. Called from the
    LightningModule's ``on_load_checkpoint`` (before Lightning restores its loops from this dict).
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    loaders = fit.get("state_dict", {}).get("combined_loader")
    progress = fit.get("epoch_progress")
    if not loaders or len(loaders) != 1 or progress is None:
        return
    state = loaders[0]
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        return
    epoch, batches, num_batches = state["epoch"], state.get("batches", 0), state.get("num_batches", 0)
    current = progress["current"]
    if not 0 < batches < num_batches or current["processed"] <= epoch:
        return  # a checkpoint from inside a running epoch, or from one that ended
    started = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch}
    for key, value in started.items():
        progress["total"][key] -= current[key] - value
        current[key] = value
    checkpoint["epoch"] = epoch
    log.info("resuming epoch %d at batch %d of %d (the checkpointed run stopped inside it)", epoch, batches,
             num_batches)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` (same arguments) with Lightning's ``state_dict``/``load_state_dict``.

    ``state_dict()``: ``{"epoch", "batches", "batch_size", "num_batches"}``, the batches handed
    out so far in ``epoch``. After ``load_state_dict``, the next iteration starts at batch
    ``batches`` when its sampler is at the saved epoch (a checkpoint from the middle of that
    epoch) and at the first batch otherwise (one saved at an epoch's end: the run goes on with
    the next epoch). A sampler without an ``epoch`` (Lightning's ``SequentialSampler`` for
    ``overfit_batches``) starts every epoch at its first batch.
    """

    # class-level defaults: no __init__ of our own, so Lightning re-creates this loader with a
    # distributed sampler (DDP) from the DataLoader arguments alone
    _resume_at: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict, until used
    _epoch: int | None = None  # the sampler's epoch in the current (or last) iteration
    _batches: int = 0  # batches of that epoch handed out, the skipped ones included
    _skip: int = 0  # batches the index stream drops while an iteration starts

    def __iter__(self) -> Iterator[Any]:
        return _LazyEpoch(self)

    @property
    def _index_sampler(self) -> Iterable[Any]:
        # torch's iterators draw indices from this (batches of indices when batching)
        return _SkippingIndices(self, super()._index_sampler)

    def _sampler_epoch(self) -> int | None:
        epoch = getattr(self.sampler, "epoch", None)
        return epoch if isinstance(epoch, int) else None

    def state_dict(self) -> dict[str, int | None]:
        epoch, batches = self._resume_at if self._resume_at is not None else (self._epoch, self._batches)
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size or 1, "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self._resume_at = None
        saved = (state["num_batches"], state["batch_size"])
        now = (len(self), self.batch_size or 1)
        if saved != now:
            why = (f"the checkpoint's training loader had {saved[0]} batches of {saved[1]} per epoch "
                   f"(this run: {now[0]} of {now[1]})")
        elif state["epoch"] is None or self._sampler_epoch() is None:
            why = f"the training sampler ({type(self.sampler).__name__}) has no epoch to find the place in"
        else:
            self._resume_at = (int(state["epoch"]), int(state["batches"]))
            return
        log.warning("%s; the resumed epoch starts again from its first batch", why)

    def _start_epoch(self) -> Iterator[Any]:
        """Begin an iteration at the sampler's current epoch, skipping what a resumed run trained on."""
        epoch = self._sampler_epoch()
        resume_at, self._resume_at = self._resume_at, None
        skip = resume_at[1] if resume_at is not None and resume_at[0] == epoch else 0
        self._epoch, self._batches, self._skip = epoch, skip, skip
        try:
            return super().__iter__()  # torch calls iter(self._index_sampler) in here (twice with workers)
        finally:
            self._skip = 0


class _LazyEpoch(Iterator[Any]):
    """One iteration of a ``ResumableDataLoader``: starts at the first ``next``, counts batches."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._batches: Iterator[Any] | None = None

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._loader._start_epoch()
        batch = next(self._batches)
        self._loader._batches += 1
        return batch


class _SkippingIndices:
    """The loader's index stream, less its first ``loader._skip`` items.

    torch keeps this object for the loader's life when workers persist and calls ``iter`` on it
    again each epoch, so the skip is read at each ``iter``.
    """

    def __init__(self, loader: ResumableDataLoader, indices: Iterable[Any]) -> None:
        self._loader = loader
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self._indices), self._loader._skip, None)
