"""What Lightning shows while a streamssm task trains: an honest bar, a short summary, no stray tips.

- :class:`StepProgressBar`: Lightning's rich bar, except that when training is bounded by
  ``max_steps`` (``max_epochs == -1``) it counts optimizer steps of ``max_steps`` across epochs
  (Lightning's own shows ``Epoch 29/-2`` and restarts at every epoch); no ``v_num``.
- :class:`ParameterSummary`: the model summary as one log line; Lightning's table shows
  ``FLOPs 0`` for every model without ``example_input_array`` (FLOPs are only counted on one).
- :func:`use_streamssm_callbacks`: swaps Lightning's ``RichProgressBar`` (keeping its settings)
  and its depth-1 model summary for these; other bars, deeper summaries and subclasses stay.
  Called by ``SSMTask.configure_callbacks``.
- :func:`quiet_lightning`: targeted filters for third-party messages that every run printed and
  that say nothing about the run: Lightning's ``💡 Tip`` advertisements, its own use of torch's
  deprecated ``LeafSpec`` (FutureWarning), and the predict loop's note that it cannot infer batch
  indices (the zarr writer does not use them), and the zero-length note on the empty validation
  list a datamodule returns when there is no validation split. Installed when
  :mod:`streamssm.tasks` is imported.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)

#: (message regex, category, module regex) of third-party warnings that carry nothing for the user
LIGHTNING_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    (r"Couldn't infer the batch indices fetched from your dataloader", UserWarning,
     r"lightning\.pytorch\.loops\.prediction_loop"),
    # an empty list is how our datamodules say "no validation" (val_fraction 0, no val_path)
    (r"Total length of `list` across ranks is zero\.", UserWarning, r""),
)
#: the loggers Lightning's rank-zero messages (tips included) go through: the last of the two
#: modules imported points ``lightning_utilities``' rank-zero functions at its own
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drops Lightning's ``💡 Tip: ... try installing ...`` advertisements (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Install the filters of the module docstring (idempotent)."""
    for name in RANK_ZERO_LOGGERS:
        rank_zero = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
            rank_zero.addFilter(_DropTips())
    for message, category, module in LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _bounded_by_steps(trainer: pl.Trainer) -> bool:
    return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0


class StepProgressBar(RichProgressBar):
    """Rich progress bar that shows ``step k/max_steps`` when training is bounded by steps.

    The description then reads ``Epoch e · step`` and the bar runs once from 0 to ``max_steps``
    over all epochs; bounded by epochs it is Lightning's bar. ``v_num`` is never shown.
    """

    @property
    def total_train_batches(self) -> int | float:
        if _bounded_by_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not _bounded_by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch} · step"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # resets the bar to 0 of the epoch's total
        if _bounded_by_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if _bounded_by_steps(trainer):
            batch_idx = trainer.global_step - 1  # the parent draws `batch_idx + 1` as completed
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class ParameterSummary(ModelSummary):
    """Logs ``model: N parameters (T trainable, S MB)`` once at fit start (rank zero);
    FLOPs only when Lightning counted some (``example_input_array`` set)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        flops = f", {get_human_readable_count(total_flops)} FLOPs per example" if total_flops else ""
        log.info("model: %s parameters (%s trainable, %.3f MB)%s", get_human_readable_count(total_parameters),
                 get_human_readable_count(trainable_parameters), model_size, flops)


def _replacement(callback: Callback) -> Callback:
    """Ours for Lightning's default bar (same settings) or default-depth summary, else the callback."""
    if type(callback) is RichProgressBar:
        return StepProgressBar(refresh_rate=callback._refresh_rate, leave=callback._leave, theme=callback.theme,
                               console_kwargs=callback._console_kwargs)
    if type(callback) in (ModelSummary, RichModelSummary) and callback._max_depth == 1 \
            and not callback._summarize_kwargs:  # Lightning's default; a deeper table was asked for
        return ParameterSummary()
    return callback


def use_streamssm_callbacks(trainer: pl.Trainer) -> None:
    """Replace, in place, Lightning's default progress bar and model summary in ``trainer.callbacks``."""
    trainer.callbacks = [_replacement(cb) for cb in trainer.callbacks]
