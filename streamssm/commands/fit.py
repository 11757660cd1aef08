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

Checkpoint folders (:func:`check_checkpoint_folders`): a new run does not start in a folder that
holds an earlier run's checkpoints (the full recipes keep theirs in one folder,
``runs/<recipe>/checkpoints``, so that ``--ckpt_path last`` continues a run); a resumed run says
where its checkpoints go when that is another folder. Lightning's own warnings about those
folders are replaced by these checks (``CHECKPOINT_FOLDER_WARNINGS``), and validate/test/predict,
which write no checkpoints, do not show them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from streamssm.datamodules import BaseDataModule
from streamssm.errors import ConfigError
from streamssm.models import ARCH_FIELDS
from streamssm.tasks import SSMTask

log = logging.getLogger(__name__)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: the task arguments that moved into ``model.init_args.arch`` (issue 20)
_MODEL_OPTION = re.compile(r"--model\.((?:init_args\.)?)(\w+)")
#: Lightning's ModelCheckpoint warnings (message regex) that :func:`check_checkpoint_folders`
#: replaces: a fit that resumes from another folder (and validate/test/predict, which save
#: nothing) "won't reload" the earlier top-k record; a folder "exists and is not empty"
CHECKPOINT_FOLDER_WARNINGS = (r"The dirpath has changed from", r"Checkpoint directory .* exists and is not empty")


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
        log_dir_name = trainer.log_dir  # a broadcast from rank 0 under DDP/FSDP: every rank takes part
        if not trainer.is_global_zero:
            return
        log_dir = Path(log_dir_name).resolve() if log_dir_name else None
        for cb in trainer.checkpoint_callbacks:
            dirpath = getattr(cb, "dirpath", None)
            if not dirpath or (log_dir is not None and Path(dirpath).resolve() == log_dir):
                continue
            os.makedirs(dirpath, exist_ok=True)
            self.parser.save(self.config, os.path.join(dirpath, self.config_filename), skip_none=False, overwrite=True)


def checkpoint_folder(callback: ModelCheckpoint, trainer: pl.Trainer) -> Path:
    """Where ``callback`` will save, before ``fit`` resolves it, by Lightning's documented rule:
    its ``dirpath``; else ``<save_dir>/<name>/<version>/checkpoints`` of the first logger (a new
    ``version_N`` unless the logger's version is fixed); else ``<default_root_dir>/checkpoints``."""
    if callback.dirpath is not None:
        return Path(callback.dirpath)
    if not trainer.loggers:
        return Path(trainer.default_root_dir) / "checkpoints"
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version / "checkpoints"


@rank_zero_only
def check_checkpoint_folders(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """Before ``fit``: raise a ConfigError when a checkpoint folder holds ``.ckpt`` files and this
    run does not continue from one of them (a new run would save among an earlier run's files:
    Lightning then writes its last checkpoint as ``last-v1.ckpt``, leaves ``last.ckpt`` the earlier
    run's, and keeps its top-k record over this run's files only); log where a resumed run's
    checkpoints go when that is not the folder it resumes from. A ``ckpt_path`` that is no file
    (``last`` resumes in each callback's own folder; ``hpc``, ``registry``, a wrong path) is left
    to Lightning."""
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        return
    resumed = Path(ckpt_path).resolve().parent if ckpt_path is not None else None
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or (callback.save_top_k == 0 and not callback.save_last):
            continue
        folder = checkpoint_folder(callback, trainer)
        if resumed is not None and folder.resolve() == resumed:
            continue
        if resumed is not None:
            log.info("resuming from %s: this run saves its checkpoints in %s (the earlier run's top-k record stays "
                     "with it)", ckpt_path, _shown(folder))
            continue
        earlier = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if earlier:
            names = sorted(p.name for p in earlier)
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            latest = folder / "last.ckpt" if (folder / "last.ckpt").is_file() else earlier[-1]
            elsewhere = (f"--trainer.callbacks.dirpath {_shown(folder)}_2" if callback.dirpath is not None
                         else "another logger version")
            raise ConfigError(
                f"checkpoint folder {_shown(folder)} already holds an earlier run's checkpoints ({shown}); a new run "
                f"would save among them. Continue that run with --ckpt_path {_shown(latest)}, move the folder away, "
                f"or give this run its own: {elsewhere}")


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (how the recipes name it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def this_runs_checkpoint(callback: Any) -> str:
    """The best checkpoint this run saved, else its last one, else ''. A run resumed from another
    folder inherits the earlier run's ``best_model_path`` (Lightning reloads it): that one is not
    this run's."""
    best, last = getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")
    folder = getattr(callback, "dirpath", None)
    if best and (folder is None or Path(best).resolve().parent == Path(folder).resolve()):
        return best
    return last or ""


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

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it with Lightning's checkpoint-folder warnings replaced (``CHECKPOINT_FOLDER_WARNINGS``:
        :meth:`before_fit` checks the folders; the other subcommands save no checkpoints)."""
        with warnings.catch_warnings():
            for message in CHECKPOINT_FOLDER_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=UserWarning,
                                        module=r"lightning\.pytorch\.callbacks\.model_checkpoint")
            super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        check_checkpoint_folders(self.trainer, self.config_init["fit"].get("ckpt_path"))

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
        callback = trainer.checkpoint_callback
        saved, last = this_runs_checkpoint(callback), getattr(callback, "last_model_path", "")
        if saved and last and Path(last) != Path(saved):  # the README's commands take last.ckpt
            monitor = getattr(callback, "monitor", None)
            log.info("checkpoint: %s%s; last: %s", saved, f" (best by {monitor})" if monitor else "", last)
        elif saved:
            log.info("checkpoint: %s", saved)


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
