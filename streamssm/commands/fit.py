"""``streamssm fit|validate|test|predict``: LightningCLI over the streamssm tasks and datamodules.

    streamssm fit --config recipes/dna_tiny.yaml
    streamssm fit --config recipes/dna.yaml --model.init_args.arch.d_model 512 --trainer.max_steps 1000
    streamssm fit --config recipes/dna.yaml --print_config      # the fully resolved YAML
    streamssm validate --config recipes/dna.yaml --ckpt_path runs/dna/checkpoints/last.ckpt

``model`` is any :class:`streamssm.tasks.SSMTask` (``TokenLM``, ``Forecaster``,
``SequenceClassifier``) and ``data`` any LightningDataModule, both chosen by ``class_path``
in the recipe. The architecture is nested (``model.init_args.arch``, a
:class:`streamssm.models.ArchConfig`); the model's input/output sizes come from the datamodule
(``model_io()``). Architecture keys given the old, flat way (``model.init_args.d_model``) are
refused with one error saying where they moved (:func:`reject_moved_keys`).

Defaults added here: a CSVLogger under ``runs/`` (``metrics.csv``), the resolved config saved
as ``config.yaml`` in the log directory and beside the checkpoints of every ModelCheckpoint
with an explicit ``dirpath``, and, after ``fit``, ``training_curve.png`` in the log directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from streamssm.datamodules import BaseDataModule
from streamssm.errors import ConfigError
from streamssm.models import ARCH_FIELDS
from streamssm.tasks import SSMTask

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: the task arguments that moved into ``model.init_args.arch`` (issue 20)
_MODEL_OPTION = re.compile(r"--model\.((?:init_args\.)?)(\w+)")


def _moved_in_model_section(section: Any, prefix: str) -> list[str]:
    """'<prefix>init_args.d_model moved to <prefix>init_args.arch.d_model' for every flat
    architecture key of a ``model`` config section (``prefix`` 'model.', or '' for a --model file)."""
    if not isinstance(section, dict):
        return []
    init_args = section.get("init_args")
    places = [(f"{prefix}init_args.", init_args if isinstance(init_args, dict) else {}), (prefix, section)]
    return [f"{where}{key} moved to {where}arch.{key}" for where, keys in places for key in keys if key in ARCH_FIELDS]


def _moved_in_file(path: str, section: str | None) -> list[str]:
    """The moved keys of a config file (its ``model`` section, or the whole file for ``--model``);
    nothing for a file that does not exist or is not YAML (LightningCLI reports those)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if section is not None:
        data = data.get(section) if isinstance(data, dict) else None
    moved = _moved_in_model_section(data, "model." if section else "")
    return [f"{m} (in {path})" for m in moved]


def reject_moved_keys(argv: Sequence[str]) -> None:
    """Raise one ConfigError naming every architecture key given the old, flat way: in the
    files of ``--config`` / ``--model`` and as ``--model.init_args.<field>`` options. Since
    issue 20 they live under ``model.init_args.arch`` (:class:`streamssm.models.ArchConfig`)."""
    moved: list[str] = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        option = _MODEL_OPTION.fullmatch(name)
        if name in ("--config", "-c"):
            moved += _moved_in_file(value, "model")
        elif name == "--model" and value.endswith((".yaml", ".yml", ".json")):
            moved += _moved_in_file(value, None)
        elif option and option.group(2) in ARCH_FIELDS:
            moved.append(f"{name} moved to --model.{option.group(1)}arch.{option.group(2)}")
    if moved:
        raise ConfigError("the architecture arguments are nested under arch now: " + "; ".join(moved))


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
    """LightningCLI with the streamssm defaults (see the module docstring).

    A bad config fails before any Lightning output: the model and data are instantiated (their
    arguments checked, the architecture included) and the data's input files checked before
    the seed is set and the Trainer built. LightningCLI seeds right after parsing; nothing
    before the Trainer draws random numbers (the task builds its weights in
    ``configure_model``, inside ``fit``), so seeding just before the Trainer seeds the same run.
    """

    def _set_seed(self) -> None:
        """Deferred to :meth:`instantiate_trainer` (lightning 2.6 calls this hook after parsing,
        and its "Seed set" line came before a model or data error)."""

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Check the data's input files, then seed and build the Trainer (which logs its devices)."""
        if isinstance(self.datamodule, BaseDataModule):
            self.datamodule.check_inputs()
        super()._set_seed()
        return super().instantiate_trainer(**kwargs)

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
    reject_moved_keys(argv)
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
            # a bad option or config raises (one line from streamssm.cli) instead of printing usage
            parser_kwargs={"prog": "streamssm", "exit_on_error": False, subcommand: {"exit_on_error": False}},
        )
    except argparse.ArgumentError as exc:
        raise ConfigError(f"{exc}; see streamssm {subcommand} --help") from exc
    finally:
        sys.argv = saved


def main(argv: list[str], prog: str = "streamssm fit") -> int:
    """Entry point of ``streamssm fit|validate|test|predict``; the subcommand is the last word of ``prog``."""
    subcommand = prog.split()[-1]
    if subcommand not in SUBCOMMANDS:
        raise ConfigError(f"{prog}: not a training subcommand; expected one of {SUBCOMMANDS}")
    build_cli(subcommand, list(argv))
    return 0
