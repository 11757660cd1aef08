"""Recipes through the CLI: every YAML parses; tiny recipes learn on generated data; checkpoints
reload (CLI validate, load_for_serving, export) to the same model; bad configs name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from streamssm.checkpoint import load_for_serving
from streamssm.commands.export import main as export_main
from streamssm.commands.fit import build_cli, main
from streamssm.commands.make_data import make_data
from streamssm.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))
#: tiny recipe -> (make-data kind, test overrides that keep it short)
TINY = {
    "dna_tiny": ("dna", ["--data.init_args.window", "128"]),
    "dna_hybrid_tiny": ("dna", ["--data.init_args.window", "128"]),
    "dna_mamba3_tiny": ("dna", ["--data.init_args.window", "128"]),
    "waveform_tiny": ("waveform", ["--data.init_args.crop", "128"]),
    "sensor_tiny": ("sensor", []),
    "sensor_forecast_tiny": ("sensor", []),
}
STEPS = 12


def test_recipes_exist():
    names = {p.stem for p in ALL}
    assert {"dna", "waveform", "sensor", "dna_long", *TINY} <= names


@pytest.mark.parametrize("recipe", ALL, ids=[p.stem for p in ALL])
def test_recipe_parses_and_names_its_command(recipe, capsys):
    first = recipe.read_text().splitlines()[0]
    assert re.match(rf"# .*streamssm fit --config recipes/{recipe.name}\b", first), first
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(recipe), "--print_config"], prog="streamssm fit")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: streamssm.tasks." in out and "class_path: streamssm.datamodules." in out


def test_bad_config_names_the_field():
    """A bad option is a ConfigError naming it (streamssm.cli prints it as one line)."""
    recipe = str(RECIPES / "dna_tiny.yaml")
    with pytest.raises(ConfigError, match="d_modle"):
        main(["--config", recipe, "--model.init_args.d_modle", "8", "--print_config"], prog="streamssm fit")
    with pytest.raises(ConfigError, match="lr"):
        main(["--config", recipe, "--model.init_args.lr", "fast", "--print_config"], prog="streamssm fit")
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):  # jsonargparse wraps the ConfigError
        main(["--config", recipe, "--model.init_args.warmup_steps", "-3"], prog="streamssm fit")
    with pytest.raises(ConfigError, match="not a training subcommand"):
        main(["--config", recipe], prog="streamssm train")


OLD_FLAT_RECIPE = """\
model:
  class_path: streamssm.tasks.TokenLM
  init_args:
    block: mamba2
    d_model: 32
    lr: 0.005
data:
  class_path: streamssm.datamodules.FastaDataModule
  init_args: {fasta: runs/data/genome.fa}
"""


@pytest.mark.parametrize("where", ["file", "option", "option="])
def test_old_flat_architecture_keys_say_where_they_moved(where, tmp_path, capsys):
    """Recipes written before the architecture was nested (issue 20): one error line naming
    each moved key and its new place, from a config file and from the command line."""
    from streamssm.cli import main as cli_main

    if where == "file":
        (tmp_path / "old.yaml").write_text(OLD_FLAT_RECIPE)
        argv = ["--config", str(tmp_path / "old.yaml")]
        moved = ["model.init_args.block moved to model.init_args.arch.block",
                 "model.init_args.d_model moved to model.init_args.arch.d_model"]
    else:
        option = ["--model.init_args.d_model=64"] if where == "option=" else ["--model.init_args.d_model", "64"]
        argv = ["--config", str(RECIPES / "dna_tiny.yaml"), *option, "--print_config"]
        moved = ["--model.init_args.d_model moved to --model.init_args.arch.d_model"]
    assert cli_main(["fit", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamssm fit: error:"), captured.err
    assert all(m in lines[0] for m in moved) and "lr" not in lines[0].split("error:")[1], lines[0]
    assert captured.out == ""


def _run(sub: str, recipe: str, extra: list[str]):
    return build_cli(sub, ["--config", recipe, *extra])


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_recipe_learns_and_its_checkpoint_serves(name, tmp_path, monkeypatch):
    kind, overrides = TINY[name]
    monkeypatch.chdir(tmp_path)  # recipes use relative paths: runs/data/..., runs/<name>/...
    make_data(kind)
    recipe = str(RECIPES / f"{name}.yaml")
    short = [*overrides, "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false"]

    before = _run("validate", recipe, short).trainer.callback_metrics["val/loss"].item()
    extra_ckpt = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", "ckpts",
                  "--trainer.callbacks.every_n_train_steps", str(STEPS)]
    fit = _run("fit", recipe, [*short, "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
                               *extra_ckpt])
    after = fit.trainer.callback_metrics["val/loss"].item()
    assert after < 0.95 * before, f"{name}: validation loss {before:.4f} -> {after:.4f} did not go down"

    log_dir = Path(fit.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file() and (log_dir / "training_curve.png").is_file()
    assert "dirpath: ckpts" in (tmp_path / "ckpts" / "config.yaml").read_text()  # beside explicit checkpoints
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).is_file()

    # the CLI reloads the checkpoint into a fresh model: same validation loss
    again = _run("validate", recipe, [*short, "--ckpt_path", ckpt]).trainer.callback_metrics["val/loss"].item()
    assert again == pytest.approx(after, rel=1e-5, abs=1e-6)

    # serving sees the trained model and the datamodule's metadata
    batch = next(iter(fit.datamodule.val_dataloader()))
    bundle = load_for_serving(ckpt)
    model = fit.model.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(batch["inputs"])[0], model(batch["inputs"])[0], rtol=0, atol=0)
    assert bundle.spec == fit.model.complete_spec(fit.datamodule.serving_spec())
    assert type(fit.model).load_from_checkpoint(ckpt).arch == fit.model.arch  # through the CLI's hparams
    assert export_main(["--checkpoint", ckpt, "--output", str(tmp_path / "m.safetensors")]) == 0
    assert load_for_serving(tmp_path / "m.safetensors").fingerprint == bundle.fingerprint


def _readme_cpu_commands() -> list[list[str]]:
    readme = (RECIPES.parent / "README.md").read_text()
    block = re.search(r"on a CPU \(here on the generated data\)[^\n]*\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "README lost its commands for the full recipes on a CPU"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def test_every_recipe_uses_a_gpu_only_when_there_is_one():
    for recipe in ALL:
        assert re.search(r"^  accelerator: auto$", recipe.read_text(), re.M), recipe.name


@pytest.mark.parametrize("command", _readme_cpu_commands(), ids=lambda c: Path(c[3]).stem)
def test_full_recipe_runs_on_cpu_with_the_readme_overrides(command, tmp_path, monkeypatch):
    """The README's CPU command of each full recipe, on generated data, with the model shrunk and
    2 steps (one validation) so that it takes seconds: everything else as the README says."""
    assert command[:3] == ["streamssm", "fit", "--config"]
    monkeypatch.chdir(tmp_path)
    make_data(Path(command[3]).stem)  # dna | waveform | sensor: the recipe's name is its data kind
    small = ["--model.init_args.arch.d_model", "32", "--model.init_args.arch.n_layers", "1",
             "--model.init_args.arch.d_state", "16", "--model.init_args.arch.headdim", "16",
             "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
             "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = build_cli("fit", ["--config", str(RECIPES.parent / command[3]), *command[4:], *small])
    assert cli.trainer.global_step == 2 and "val/loss" in cli.trainer.callback_metrics
    if not torch.cuda.is_available():
        assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
