"""hf_export: streamssm models -> Hub folders that transformers (or streamssm import) loads with our logits."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from streamssm.checkpoint import CKPT_KEY, export_safetensors, training_record
from streamssm.errors import ConfigError
from streamssm.hf_export import export_hf
from streamssm.hf_import import import_pretrained
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec

transformers = pytest.importorskip("transformers")

VOCAB = 5  # DNA: the spec travels through config.json
CONFIGS = {"mamba": {"block": "mamba", "d_state": 8, "dt_rank": 3},
           "mamba2": {"block": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}}
DNA = ServingSpec(modality="dna", encoding="bases", head="lm", task="TokenLM", window=64)


def _model(block: str, head_bias: bool = False, **extra) -> SSMModel:
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(d_model=16, n_layers=2, vocab_size=VOCAB, **CONFIGS[block], **extra)).eval()
    with torch.no_grad():  # non-trivial norms, D and head so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
        model.head.bias.copy_(torch.randn(VOCAB) if head_bias else torch.zeros(VOCAB))
    return model


def _fake_ckpt(model: SSMModel, spec: ServingSpec, path) -> None:
    """A Lightning checkpoint dict as a streamssm task writes it (record, callbacks, datamodule args)."""
    torch.save({"epoch": 3, "global_step": 120, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                CKPT_KEY: training_record(model.cfg, spec),
                "datamodule_hyper_parameters": {"_class_path": "streamssm.datamodules.FastaDataModule",
                                                "fasta": "genome.fa", "window": 64},
                "callbacks": {"ModelCheckpoint{...}": {"monitor": "val/bpt", "best_model_score": torch.tensor(1.875),
                                                       "current_score": None}}}, path)


TOKENS = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("block, extra", [("mamba", {}), ("mamba2", {}), ("mamba2", {"ngroups": 2})])
@torch.no_grad()
def test_transformers_loads_the_folder_with_our_logits(block, extra, tmp_path):
    """Mamba-2 B/C groups too: transformers' Mamba2 normalizes the gate over all of d_inner, as
    ours does with norm_groups 1, and config.json carries n_groups."""
    model = _model(block, **extra)
    export_safetensors(model, tmp_path / "m.safetensors", spec=DNA)
    done = export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="apache-2.0")
    assert done.layout == "transformers" and done.reasons == ()
    assert sorted(p.name for p in done.folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cls = transformers.MambaForCausalLM if block == "mamba" else transformers.Mamba2ForCausalLM
    hf = cls.from_pretrained(done.folder).eval()
    assert getattr(hf.config, "n_groups", 1) == model.cfg.ngroups
    ours, _ = model(TOKENS)
    assert (hf(TOKENS).logits - ours).abs().max() <= 1e-4
    back = import_pretrained(done.folder)  # round trip: export -> import equal
    assert back.config == model.cfg and back.spec == DNA
    for name, t in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], t), name


@torch.no_grad()
def test_unrepresentable_models_get_the_streamssm_layout_and_round_trip(tmp_path):
    model = _model("mamba2", head_bias=True)
    export_safetensors(model, tmp_path / "m.safetensors", spec=DNA)
    done = export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="mit")
    assert done.layout == "streamssm" and any("bias" in r for r in done.reasons)
    config = json.loads((done.folder / "config.json").read_text())
    assert config["model_type"] == "streamssm" and config["transformers_incompatible"] == list(done.reasons)
    assert "transformers cannot load it because" in (done.folder / "README.md").read_text()
    back = import_pretrained(done.folder)
    assert back.layout == "streamssm" and back.spec == DNA
    assert torch.equal(back.model(TOKENS)[0], model(TOKENS)[0])


@torch.no_grad()
def test_a_norm_per_group_gets_the_streamssm_layout_and_round_trips(tmp_path):
    model = _model("mamba2", ngroups=2, norm_groups=2)
    export_safetensors(model, tmp_path / "m.safetensors", spec=DNA)
    done = export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="mit")
    assert done.layout == "streamssm" and done.reasons == (
        "Mamba-2 norm_groups=2 (transformers' Mamba2 normalizes the gate over all of d_inner, whatever n_groups)",)
    back = import_pretrained(done.folder)
    assert back.config == model.cfg and torch.equal(back.model(TOKENS)[0], model(TOKENS)[0])


def test_blockers_name_each_reason(tmp_path):
    sensor = SSMModel(ModelConfig(block="mamba3", d_model=16, n_layers=2, input_kind="continuous", input_dim=2,
                                  head="regression", output_dim=2, attention_every=2, attention_heads=2))
    export_safetensors(sensor, tmp_path / "s.safetensors")
    reasons = " | ".join(export_hf(tmp_path / "s.safetensors", tmp_path / "hub", license="mit").reasons)
    assert "block 'mamba3'" in reasons and "not a token language model" in reasons and "hybrid attention" in reasons


def test_model_card_states_recorded_facts_only(tmp_path):
    _fake_ckpt(_model("mamba"), DNA, tmp_path / "last.ckpt")
    card = (export_hf(tmp_path / "last.ckpt", tmp_path / "hub", license="cc-by-4.0").folder / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-4.0\nlibrary_name: transformers\n")
    for fact in ("task: TokenLM (lm head); modality: dna", "datamodule: streamssm.datamodules.FastaDataModule",
                 "fasta: genome.fa", "epoch: 3", "global step: 120", "val/bpt (best model score): 1.875",
                 "streamssm import . --output model.safetensors", "MambaForCausalLM.from_pretrained"):
        assert fact in card, fact
    export_safetensors(_model("mamba"), tmp_path / "bare.safetensors")
    bare = (export_hf(tmp_path / "bare.safetensors", tmp_path / "hub2", license="mit").folder / "README.md").read_text()
    assert "No metrics are recorded in the exported file." in bare and "Not recorded in the exported file." in bare


@pytest.mark.parametrize("head_bias, layout", [(False, "transformers"), (True, "streamssm")])
def test_exported_weights_get_the_mode_of_the_umask(tmp_path, head_bias, layout):
    """Regression (README walk): the folder's model.safetensors was written 0600 (safetensors' private
    temporary file renamed into place), its config.json and README.md 0644."""
    export_safetensors(_model("mamba2", head_bias=head_bias), tmp_path / "m.safetensors", spec=DNA)
    old = os.umask(0o022)
    try:
        done = export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="mit")
    finally:
        os.umask(old)
    assert done.layout == layout
    assert {stat.S_IMODE(f.stat().st_mode) for f in done.folder.iterdir()} == {0o644}


def test_license_and_existing_folder_refused(tmp_path):
    export_safetensors(_model("mamba"), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="--license"):
        export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license=" ")
    # CLI audit: --overwrite wrote into any folder (a data folder; `--output .` replaced a project's README.md)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "README.md").write_text("my notes")
    (tmp_path / "data" / "genome.fa").write_text(">c\nACGT\n")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds files an export does not write \(\['genome.fa'\]\)"):
            export_hf(tmp_path / "m.safetensors", tmp_path / "data", license="mit", overwrite=overwrite)
    assert (tmp_path / "data" / "README.md").read_text() == "my notes"
    assert export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="mit").layout == "transformers"
    with pytest.raises(ConfigError, match="holds an earlier export; pass --overwrite"):
        export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="mit")
    assert export_hf(tmp_path / "m.safetensors", tmp_path / "hub", license="mit", overwrite=True).layout == "transformers"
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        export_hf(tmp_path / "m.safetensors", tmp_path / "m.safetensors", license="mit", overwrite=True)


def test_cli_export_hf(tmp_path, capsys):
    from streamssm.cli import main

    export_safetensors(_model("mamba2"), tmp_path / "m.safetensors", spec=DNA)
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "hf",
                 "--output", str(tmp_path / "hub"), "--license", "apache-2.0"]) == 0
    assert "transformers layout" in capsys.readouterr().out
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["architectures"] == ["Mamba2ForCausalLM"]
