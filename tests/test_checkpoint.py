"""Serving bundles: safetensors export and Lightning-style .ckpt load to the same model."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from streamssm.checkpoint import export_safetensors, load_for_serving, model_fingerprint
from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec

CFG = ModelConfig(block="mamba", d_model=16, n_layers=2, d_state=4, input_kind="continuous", input_dim=2,
                  head="regression", output_dim=2)
SERVING = {"modality": "sensor", "channels": ["a", "b"], "mean": [0.0, 1.0], "std": [1.0, 2.0]}


def outputs(model: SSMModel) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * 9).reshape(1, 9, 2))[0]


def test_safetensors_export_round_trip(tmp_path):
    model = SSMModel(CFG).eval()
    bundle = load_for_serving(export_safetensors(model, tmp_path / "m.safetensors", SERVING))
    assert bundle.config == CFG and bundle.spec == ServingSpec.from_dict(SERVING).for_model(CFG)
    assert bundle.spec.head == "regression"  # a spec without a task gets the model's head
    assert bundle.fingerprint == model_fingerprint(model)
    assert torch.equal(outputs(bundle.model), outputs(model))


def test_lightning_checkpoint_loads_model_prefix(tmp_path):
    model = SSMModel(CFG).eval()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()} | {"other.weight": torch.ones(1)},
        "streamssm": {"config": CFG.to_dict(), "serving": SERVING},
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    bundle = load_for_serving(tmp_path / "m.ckpt")  # the untyped serving dict of files written before 2026-12-04
    assert torch.equal(outputs(bundle.model), outputs(model))
    assert bundle.spec == ServingSpec.from_dict(SERVING).for_model(CFG) and bundle.spec.channel_names == ("a", "b")


def test_fingerprint_changes_with_weights():
    a, b = SSMModel(CFG), SSMModel(CFG)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFormatError, match="nope.ckpt"):
        load_for_serving(tmp_path / "nope.ckpt")


def test_foreign_safetensors_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(DataFormatError, match="not a streamssm export"):
        load_for_serving(tmp_path / "x.safetensors")


@pytest.mark.parametrize("content", [b"garbage\n", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a"])
def test_damaged_safetensors_is_a_data_format_error(tmp_path, content):
    """Garbage, or a file cut inside its header, is named (safetensors raised its own error type)."""
    (tmp_path / "m.safetensors").write_bytes(content)
    with pytest.raises(DataFormatError, match="m.safetensors as safetensors"):
        load_for_serving(tmp_path / "m.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("proc", [True, False])  # the umask read from /proc, or (elsewhere) set and restored
def test_an_export_gets_the_mode_of_the_umask(tmp_path, monkeypatch, umask, proc):
    """Regression (README walk): safetensors wrote exports 0600 (its private temporary file renamed
    into place), so a model exported for a server run by another user could not be read."""
    if not proc:
        monkeypatch.setattr("streamssm.checkpoint._PROC_STATUS", str(tmp_path / "no-proc"))
    old = os.umask(umask)
    try:
        path = export_safetensors(SSMModel(CFG), tmp_path / "m.safetensors", SERVING)
        assert os.umask(umask) == umask  # left as it was (the fallback sets and restores it)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_checkpoint_without_streamssm_entry_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="not written by a streamssm task"):
        load_for_serving(tmp_path / "plain.ckpt")


def test_files_that_are_not_model_files_are_named(tmp_path):
    """CLI audit: a CSV or FASTA went to torch.load (its advice: weights_only=False), an empty
    .ckpt gave an empty reason, and a safetensors file with streamssm metadata but no config a
    KeyError traceback."""
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataFormatError, match=r"table.csv is not a model file: expected a .safetensors export"):
        load_for_serving(tmp_path / "table.csv")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"empty.ckpt safely.*: \w+.*Lightning checkpoint"):
        load_for_serving(tmp_path / "empty.ckpt")
    tensors = {"w": torch.zeros(2)}
    save_file(tensors, tmp_path / "noconfig.safetensors", metadata={"format": "streamssm"})
    with pytest.raises(DataFormatError, match="has no model config"):
        load_for_serving(tmp_path / "noconfig.safetensors")
    save_file(tensors, tmp_path / "garbled.safetensors", metadata={"format": "streamssm", "config": "{nope"})
    with pytest.raises(DataFormatError, match="metadata is not valid JSON"):
        load_for_serving(tmp_path / "garbled.safetensors")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = export_safetensors(SSMModel(CFG), tmp_path / "m.safetensors")
    other = json.dumps(ModelConfig(**(CFG.to_dict() | {"d_model": 8})).to_dict())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"format": "streamssm", "config": other})
    with pytest.raises(DataFormatError, match="do not fit the config"):
        load_for_serving(tmp_path / "bad.safetensors")


#: ``ModelConfig(...).to_dict()`` as written into checkpoints and exports before the architecture
#: became ArchConfig (issue 20): the same flat keys, in the order of the former single dataclass.
FLAT_CONFIG_BEFORE_ISSUE_20 = {
    "block": "mamba2", "d_model": 16, "n_layers": 2, "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8,
    "ngroups": 1, "chunk_size": 8, "dt_rank": None, "input_kind": "continuous", "vocab_size": 0, "input_dim": 2,
    "head": "regression", "output_dim": 2, "norm_eps": 1e-05, "checkpoint_layers": False, "attention_every": 2,
    "layer_pattern": "", "attention_heads": 2, "attention_window": 4,
}


def test_checkpoint_with_the_flat_config_of_before_issue_20_loads(tmp_path):
    """A LightningCLI checkpoint written before the architecture was nested: flat hparams, flat
    config. It serves the same model, with the same fingerprint (same config keys and values)."""
    cfg = ModelConfig.from_dict(FLAT_CONFIG_BEFORE_ISSUE_20)
    assert cfg.to_dict() == FLAT_CONFIG_BEFORE_ISSUE_20 and cfg.layer_kinds == ("ssm", "attention")
    model = SSMModel(cfg).eval()
    hparams = {"_class_path": "streamssm.tasks.Forecaster", "horizon": 1, "block": "mamba2", "d_model": 16,
               "n_layers": 2, "d_state": 8, "headdim": 8, "chunk_size": 8, "lr": 0.005,
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": hparams,
        "streamssm": {"config": FLAT_CONFIG_BEFORE_ISSUE_20, "serving": SERVING, "versions": {"streamssm": "0.1.0"}},
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    bundle = load_for_serving(tmp_path / "old.ckpt")
    assert bundle.config == cfg and bundle.fingerprint == model_fingerprint(model)
    assert torch.equal(outputs(bundle.model), outputs(model))


def test_task_checkpoint_with_flat_hparams_of_before_issue_20_reloads_as_a_task(tmp_path):
    """``Forecaster.load_from_checkpoint`` of a checkpoint whose hparams hold the architecture
    flat (``d_model=...``) raised TypeError after the nesting; the loader moves them under arch."""
    from streamssm.tasks import Forecaster

    cfg = ModelConfig.from_dict(FLAT_CONFIG_BEFORE_ISSUE_20)
    task = Forecaster(arch=cfg.arch, input_kind="continuous", input_dim=2, output_dim=2)
    task.build_model()
    hparams = {"horizon": 1, "block": "mamba2", "d_model": 16, "n_layers": 2, "d_state": 8, "headdim": 8,
               "chunk_size": 8, "attention_every": 2, "attention_heads": 2, "attention_window": 4, "lr": 0.005,
               "input_kind": "continuous", "input_dim": 2, "output_dim": 2}
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0",
            "streamssm": {"config": FLAT_CONFIG_BEFORE_ISSUE_20, "serving": SERVING}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    reloaded = Forecaster.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True).eval()
    assert reloaded.arch == cfg.arch and reloaded.hparams.lr == 0.005
    assert torch.equal(outputs(reloaded.model), outputs(task.model.eval()))
