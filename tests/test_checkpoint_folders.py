"""Checkpoint folders through ``streamssm fit|validate`` (streamssm.commands.fit.check_checkpoint_folders).

README walk: a second fit of a full recipe (one checkpoint folder, ``runs/<recipe>/checkpoints``)
printed Lightning's "Checkpoint directory ... exists and is not empty" and then saved among the
first run's files (its last checkpoint as ``last-v1.ckpt``; ``last.ckpt`` stayed the first
run's); ``--ckpt_path last`` (the intended resume) printed the same warning; ``validate``/``test``
with the ``--ckpt_path`` of a tiny recipe's run printed "The dirpath has changed ..."; a fit resumed
from another run's folder named that run's checkpoint as its own.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest
import yaml

from streamssm.commands.fit import CHECKPOINT_FOLDER_WARNINGS, build_cli, main
from streamssm.commands.make_data import make_data
from streamssm.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2"]
#: recipes/sensor.yaml (checkpoints in runs/sensor/checkpoints), shrunk to seconds
SENSOR = ["--config", str(RECIPES / "sensor.yaml"), "--data.init_args.path", "runs/data/sensors.csv",
          "--data.init_args.window", "64", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
          "--trainer.precision", "32-true", "--model.init_args.arch.d_model", "16",
          "--model.init_args.arch.n_layers", "1", "--model.init_args.arch.d_state", "8",
          "--model.init_args.arch.headdim", "8", *QUIET]
#: recipes/dna_tiny.yaml (checkpoints in the logger's runs/dna_tiny/version_N/checkpoints)
DNA_TINY = ["--config", str(RECIPES / "dna_tiny.yaml"), "--data.init_args.window", "64", *QUIET]
#: the recipes whose ModelCheckpoint names its folder (the refusal then offers --trainer.callbacks.dirpath)
OWN_FOLDER = [p for p in sorted(RECIPES.glob("*.yaml")) if "dirpath:" in p.read_text()]


def _folder_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if any(re.search(m, str(w.message)) for m in CHECKPOINT_FOLDER_WARNINGS)]


def _run(subcommand: str, argv: list[str]) -> tuple[object, list[str]]:
    """Run the CLI; (the LightningCLI, Lightning's checkpoint-folder warnings it let through)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # over pytest's filters (pyproject.toml)
        cli = build_cli(subcommand, argv)
    return cli, _folder_warnings(record)


def test_a_second_run_in_a_recipes_checkpoint_folder_is_refused_and_resuming_it_is_quiet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data("sensor")
    first, said = _run("fit", [*SENSOR, "--trainer.max_steps", "2"])
    assert first.trainer.global_step == 2 and said == []
    folder = Path("runs/sensor/checkpoints")
    files = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in files

    with pytest.raises(ConfigError, match=r"runs/sensor/checkpoints already holds an earlier run's checkpoints .*"
                                          r"--ckpt_path runs/sensor/checkpoints/last\.ckpt"):
        build_cli("fit", [*SENSOR, "--trainer.max_steps", "2"])
    assert sorted(p.name for p in folder.iterdir()) == files  # refused before writing anything

    resumed, said = _run("fit", [*SENSOR, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4 and said == []
    assert "last-v1.ckpt" not in {p.name for p in folder.iterdir()}

    elsewhere, said = _run("fit", [*SENSOR, "--trainer.max_steps", "2", "--trainer.callbacks.dirpath", "other"])
    assert elsewhere.trainer.global_step == 2 and said == [] and (tmp_path / "other" / "last.ckpt").is_file()


def test_resuming_from_another_folder_and_evaluating_a_checkpoint_say_it_our_way(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    make_data("dna")
    first, said = _run("fit", [*DNA_TINY, "--trainer.max_steps", "2"])
    assert said == []
    ckpt = first.trainer.checkpoint_callback.last_model_path
    assert "version_0" in ckpt

    caplog.set_level(logging.INFO, logger="streamssm.commands.fit")
    resumed, said = _run("fit", [*DNA_TINY, "--trainer.max_steps", "4", "--ckpt_path", ckpt])
    assert resumed.trainer.global_step == 4 and said == []
    assert "this run saves its checkpoints in runs/dna_tiny/version_1/checkpoints" in caplog.text
    reported = re.findall(r"checkpoint: (\S+)", caplog.text)
    assert reported and "version_1" in reported[-1], caplog.text  # not the first run's best checkpoint
    # ... and the last.ckpt the README's next commands take (README walk: only the best was named)
    assert any("checkpoint: " in line and "version_1/checkpoints/last.ckpt" in line
               for line in caplog.text.splitlines()), caplog.text

    for subcommand in ("validate", "test"):
        _, said = _run(subcommand, [*DNA_TINY, "--ckpt_path", ckpt, "--data.init_args.test_chroms", "[chr3]"])
        assert said == [], subcommand


@pytest.mark.parametrize("recipe", OWN_FOLDER, ids=[p.stem for p in OWN_FOLDER])
def test_the_refusals_other_folder_option_moves_each_recipes_checkpoints(recipe, capsys):
    """The refusal's ``--trainer.callbacks.dirpath <folder>_2`` (and the README's) works on every
    recipe. LightningCLI gives a ``--trainer.callbacks.X`` option to the last callback of the list:
    recipes/dna.yaml listed a LearningRateMonitor after its ModelCheckpoint, and the suggested
    command failed with "Option 'dirpath' is not accepted"."""
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(recipe), "--trainer.callbacks.dirpath", "elsewhere", "--print_config"],
             prog="streamssm fit")
    assert exc.value.code == 0
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    folders = [c["init_args"]["dirpath"] for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")]
    assert folders == ["elsewhere"]
