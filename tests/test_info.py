"""`streamssm info`: this machine without a file; a model card for a .safetensors export or a
Lightning .ckpt (text and --json)."""

import hashlib
import json

import pytest
import torch

from streamssm.checkpoint import export_safetensors, load_for_serving
from streamssm.cli import main
from streamssm.models import ModelConfig, SSMModel

SERVING = {"modality": "sensor", "channels": ["temp", "flow", "rpm"], "mean": [0.0, 1.0, 2.0], "std": [1.0, 2.0, 3.0],
           "targets": ["rpm"], "task": {"name": "Forecaster", "head": "regression", "horizon": 5}}
VERSIONS = {"streamssm": "0.0.9", "torch": "2.11.0", "lightning": "2.6.6"}


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(block="mamba2", input_kind="continuous", input_dim=3, head="regression", output_dim=5,
                      d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4)
    return SSMModel(cfg).eval()


@pytest.fixture(params=["safetensors", "ckpt"])
def model_file(request, model, tmp_path):
    if request.param == "safetensors":
        return export_safetensors(model, tmp_path / "m.safetensors", spec=SERVING, versions=VERSIONS)
    path = tmp_path / "last.ckpt"  # the layout streamssm tasks write
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "streamssm": {"config": model.cfg.to_dict(), "serving": SERVING, "versions": VERSIONS}}, path)
    return path


def test_info_without_a_file_shows_this_machine(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend[ssd_scan]" in out


def test_model_card_json(model_file, capsys):
    assert main(["info", str(model_file), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    bundle = load_for_serving(model_file)
    assert card["fingerprint"] == bundle.fingerprint
    assert card["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert card["parameters"] == sum(p.numel() for p in bundle.model.parameters())
    assert card["config"] == bundle.config.to_dict()
    assert card["written_by"] == VERSIONS
    s = card["serving"]
    assert (s["modality"], s["head"], s["horizon"], s["targets"]) == ("sensor", "regression", 5, ["rpm"])
    assert s["channel_names"] == ["temp", "flow", "rpm"]
    assert s["stream"] == {"format": "f32le", "sample_rate": None, "channels": 3}


def test_model_card_text(model_file, capsys):
    assert main(["info", str(model_file)]) == 0
    out = capsys.readouterr().out
    for text in ("fingerprint", "parameters", "temp, flow, rpm", "horizon", "Forecaster", "2.6.6"):
        assert text in out


def test_info_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err
