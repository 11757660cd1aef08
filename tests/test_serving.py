"""ServingSpec: the typed contract between training and serving (validation, the legacy dict
layout of older model files, encoders, the forecast decoder, model checks, round trips)."""

import json

import numpy as np
import pytest
import torch

from streamssm.checkpoint import export_safetensors, load_for_serving, read_model_file
from streamssm.encoding import mu_law_encode, pcm_to_float
from streamssm.errors import ConfigError, DataFormatError, ShapeError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import SPEC_VERSION, ServingSpec

SENSOR = ServingSpec(modality="sensor", encoding="float", channels=2, channel_names=("a", "b"),
                     mean=(1.0, -1.0), std=(2.0, 4.0))
#: the untyped serving dict model files held before ServingSpec (2026-11), as tasks wrote it
LEGACY_FORECASTER = {"modality": "sensor", "channels": ["a", "b", "c"], "mean": [1.0, -1.0, 0.0],
                     "std": [2.0, 4.0, 1.0], "window": 64, "time_column": "t", "targets": ["c", "a"],
                     "task": {"name": "Forecaster", "head": "regression", "horizon": 2}}


def test_dna_encoder_and_accepted_bases_follow_the_iupac_choice():
    spec = ServingSpec(modality="dna", encoding="bases")
    assert spec.encoder()("ACGTn").tolist() == [0, 1, 2, 3, 4]
    assert spec.encoder()("ACRT").tolist() == [0, 1, 4, 3]
    assert spec.stream_formats == ("text",) and "R" in spec.accepted_bases
    strict = ServingSpec(modality="dna", encoding="bases", ambiguous_as_n=False)
    assert strict.accepted_bases == "ACGTN"
    with pytest.raises(DataFormatError, match="ambiguity"):
        strict.encoder()("ACRT")


def test_audio_encoder_mu_law_float_stereo_and_resample():
    spec = ServingSpec(modality="audio", encoding="mu_law", sample_rate=8000)
    enc = spec.encoder()
    wave = torch.sin(torch.arange(800) * 0.05) * 0.5
    assert torch.equal(enc(wave), mu_law_encode(wave))
    pcm = (wave.numpy() * 32767).astype(np.int16)
    assert (enc(pcm) - mu_law_encode(wave)).abs().max() <= 1
    assert torch.equal(enc(torch.stack([wave, wave], dim=1)), mu_law_encode(wave))  # mixed down to mono
    assert enc(wave, sample_rate=4000).shape == (1600,)  # 4 kHz -> 8 kHz
    assert spec.stream_channels is None and spec.stream_start() == {"format": "f32le", "sample_rate": 8000, "channels": 1}
    out = ServingSpec(modality="audio", encoding="float", sample_rate=8000).encoder()(wave)
    assert out.shape == (800, 1) and out.dtype == torch.float32


def test_sensor_encoder_normalizes_and_refuses_integers_unless_told():
    enc = SENSOR.encoder()
    out = enc(np.array([[1.0, -1.0], [3.0, 7.0]], dtype=np.float32))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    with pytest.raises(ShapeError, match="2 channel"):
        enc(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(DataFormatError, match="NaN"):
        enc(np.array([[np.nan, 0.0]]))
    counts = np.array([[3, 1], [1, -5]], dtype=np.int16)
    with pytest.raises(DataFormatError, match=r"integer samples \(torch.int16\) are ambiguous"):
        enc(counts)
    assert SENSOR.encoder(sensor_integers="values")(counts).tolist() == [[1.0, 0.5], [0.0, -1.0]]
    pcm = SENSOR.encoder(sensor_integers="pcm")(counts)
    assert torch.allclose(pcm, (pcm_to_float(counts) - torch.tensor([1.0, -1.0])) / torch.tensor([2.0, 4.0]))
    assert SENSOR.stream_formats == ("f32le",) and SENSOR.stream_channels == 2


def test_forecast_decoder_denormalizes_each_horizon_step_per_target_channel():
    spec = ServingSpec.from_dict(LEGACY_FORECASTER)
    assert (spec.task, spec.head, spec.horizon, spec.forecast_channels) == ("Forecaster", "regression", 2, ("c", "a"))
    normalized = torch.tensor([[1.0, 1.0, -1.0, 0.0]])  # (l=1, h=2 x k=2): c@t+1, a@t+1, c@t+2, a@t+2
    raw = spec.output_decoder()(normalized)
    assert torch.allclose(raw, torch.tensor([[1.0, 3.0, -1.0, 1.0]]))
    assert spec.output_names() == ["c@t+1", "a@t+1", "c@t+2", "a@t+2"]
    lm = ServingSpec(modality="dna", encoding="bases", head="lm")
    assert torch.equal(lm.output_decoder()(normalized), normalized)  # log-probabilities pass unchanged


def test_legacy_dicts_of_every_modality_read_and_round_trip():
    legacy = [
        LEGACY_FORECASTER,
        {"modality": "dna", "alphabet": "ACGTN", "window": 256, "mask_n": True, "task": {"name": "TokenLM", "head": "lm"}},
        {"modality": "audio", "sample_rate": 16000, "encoding": "mu_law", "channels": 1, "mono": True, "crop": 512,
         "quantization_channels": 256, "task": {"name": "TokenLM", "head": "lm"}},
        {"modality": "sensor", "channels": ["x"], "mean": [0.0], "std": [1.0], "classes": ["idle", "walk"],
         "task": {"name": "SequenceClassifier", "head": "classifier", "pool": "last"}},
    ]
    for meta in legacy:
        spec = ServingSpec.from_dict(meta)
        d = json.loads(spec.to_json())
        assert d["spec_version"] == SPEC_VERSION
        assert ServingSpec.from_dict(d) == spec
    assert ServingSpec.from_dict(legacy[1]).option("mask_n") is True
    assert ServingSpec.from_dict(legacy[3]).classes == ("idle", "walk")


def test_invalid_specs_name_every_problem():
    with pytest.raises(ConfigError, match="modality"):
        ServingSpec.from_dict({"modality": "video"})
    with pytest.raises(ConfigError, match="no serving spec"):
        ServingSpec.from_dict({})
    with pytest.raises(ConfigError, match="audio needs a sample_rate"):
        ServingSpec(modality="audio", encoding="mu_law")
    with pytest.raises(ConfigError, match=r"2 channels but 1 channel names.*targets \['z'\]"):
        ServingSpec(modality="sensor", encoding="float", channels=2, channel_names=("a",), mean=(0.0, 0.0),
                    std=(1.0, 1.0), targets=("z",))
    with pytest.raises(ConfigError, match="takes encoding bases"):
        ServingSpec(modality="dna", encoding="float")
    with pytest.raises(ConfigError, match="unknown fields"):
        ServingSpec.from_dict({**SENSOR.to_dict(), "colour": "red"})


def _model(**io) -> SSMModel:
    return SSMModel(ModelConfig(block="mamba2", d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4, **io)).eval()


def test_check_model_refuses_a_model_that_does_not_fit_its_spec(tmp_path):
    forecaster = ServingSpec.from_dict(LEGACY_FORECASTER)  # 3 channels in, 2 x 2 outputs
    good = _model(input_kind="continuous", input_dim=3, head="regression", output_dim=4)
    forecaster.check_model(good.cfg)
    bad = _model(input_kind="continuous", input_dim=3, head="regression", output_dim=3)
    with pytest.raises(ConfigError, match=r"3 outputs per step, but horizon 2 x 2"):
        forecaster.check_model(bad.cfg)
    with pytest.raises(ConfigError, match="tokens 0..4"):
        ServingSpec(modality="dna", encoding="bases").check_model(bad.cfg)
    with pytest.raises(ConfigError, match="does not fit"):  # never written
        export_safetensors(bad, tmp_path / "bad.safetensors", spec=forecaster)
    assert not (tmp_path / "bad.safetensors").exists()


def test_model_files_store_the_spec_once_and_read_it_back(tmp_path):
    model = _model(input_kind="continuous", input_dim=3, head="regression", output_dim=4)
    spec = ServingSpec.from_dict(LEGACY_FORECASTER)
    path = export_safetensors(model, tmp_path / "m.safetensors", spec=spec)
    assert read_model_file(path).spec == spec == load_for_serving(path).spec
    legacy = export_safetensors(model, tmp_path / "legacy.safetensors", spec=LEGACY_FORECASTER)  # a dict is read too
    assert load_for_serving(legacy).spec == spec
    bare = export_safetensors(model, tmp_path / "bare.safetensors")
    assert load_for_serving(bare).spec is None
