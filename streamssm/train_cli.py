"""``streamssm fit|validate|test|predict``: LightningCLI over the streamssm tasks and datamodules.

    streamssm fit --config recipes/dna_tiny.yaml
    streamssm fit --config recipes/dna.yaml --model.init_args.d_model 512 --trainer.max_steps 1000
    streamssm fit --config recipes/dna.yaml --print_config      # the fully resolved YAML
    streamssm validate --config recipes/dna.yaml --ckpt_path runs/dna/checkpoints/last.ckpt

``model`` is any :class:`streamssm.tasks.SSMTask` (``TokenLM``, ``Forecaster``,
``SequenceClassifier``) and ``data`` any LightningDataModule, both chosen by ``class_path``
in the recipe. The model's input/output sizes come from the datamodule (``model_io()``).

Defaults added here: a CSVLogger under ``runs/`` (``metrics.csv``), the resolved config saved
as ``config.yaml`` in the log directory and beside the checkpoints of every ModelCheckpoint
with an explicit ``dirpath``, and, after ``fit``, ``training_curve.png`` in the log directory.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from streamssm.tasks import SSMTask

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class SaveConfigBesideCheckpoints(SaveConfigCallback):
    """Save ``config.yaml`` to the log directory and into each ModelCheckpoint ``dirpath``."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        log_dir = Path(trainer.log_dir).resolve() if trainer.log_dir else None
        for cb in trainer.checkpoint_callbacks:
            dirpath = getattr(cb, "dirpath", None)
            if not dirpath or (log_dir is not None and Path(dirpath).resolve() == log_dir):
                continue
            os.makedirs(dirpath, exist_ok=True)
            self.parser.save(self.config, os.path.join(dirpath, self.config_filename), skip_none=False, overwrite=True)


class StreamSSMCLI(LightningCLI):
    """LightningCLI with the streamssm defaults (see the module docstring)."""

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                metrics = Path(logger.log_dir) / "metrics.csv"
                if metrics.is_file():
                    from streamssm.plots import plot_training_curve

                    try:
                        png = plot_training_curve(metrics, Path(logger.log_dir) / "training_curve.png")
                    except ValueError as exc:  # nothing logged yet (e.g. fast_dev_run)
                        log.warning("no training curve: %s", exc)
                    else:
                        log.info("training curve: %s", png)
                break
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
            trainer.checkpoint_callback, "last_model_path", ""
        )
        if best:
            log.info("checkpoint: %s", best)


def build_cli(subcommand: str, argv: list[str]) -> StreamSSMCLI:
    """Parse ``[subcommand, *argv]``, instantiate the trainer, model and data, and run."""
    trainer_defaults: dict[str, Any] = {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    }
    args = [subcommand, *argv]
    saved = sys.argv
    # LightningCLI warns when both `args` and sys.argv carry arguments; and sub-process launchers
    # (DDP) re-run sys.argv, so it must read like the real command line.
    sys.argv = [saved[0] if saved else "streamssm", *args]
    try:
        return StreamSSMCLI(
            model_class=SSMTask,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigBesideCheckpoints,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None, prog: str = "streamssm fit") -> int:
    """Entry point of ``streamssm fit|validate|test|predict``; the subcommand is the last word of ``prog``."""
    subcommand = prog.split()[-1]
    if subcommand not in SUBCOMMANDS:
        print(f"{prog}: not a training subcommand; expected one of {SUBCOMMANDS}", file=sys.stderr)
        return 2
    build_cli(subcommand, list(sys.argv[1:] if argv is None else argv))
    return 0
