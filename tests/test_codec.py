"""The service codec reads every head's outputs back in the units a client sees.

Regression (issue 18): a multi-horizon forecaster (o = h * k outputs per step) was
de-normalized with a k-value normalizer and failed its first chunk.
"""

import numpy as np
import pytest
import torch

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ConfigError, ProtocolError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec
from streamssm.service.codec import ModelCodec
from streamssm.service.protocol import decode_samples, parse_start

SMALL = dict(d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4)
SENSOR = {"modality": "sensor", "channels": ["a", "b", "c"], "mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 3.0]}


def _bundle(serving, **io) -> ServingBundle:
    cfg = ModelConfig(block="mamba2", **io, **SMALL)
    return ServingBundle(SSMModel(cfg), cfg, ServingSpec.from_dict(serving))


@pytest.mark.parametrize("targets", [None, ["c", "a"]])
def test_multi_horizon_forecast_is_denormalized_per_step_and_channel(targets):
    serving = {**SENSOR, "task": {"name": "Forecaster", "head": "regression", "horizon": 4}}
    idx = [0, 1, 2] if targets is None else [2, 0]
    if targets is not None:
        serving["targets"] = targets
    k = len(idx)
    codec = ModelCodec.from_bundle(_bundle(serving, input_kind="continuous", input_dim=3, head="regression",
                                           output_dim=4 * k))
    y = torch.randn(7, 4 * k)
    mean = torch.tensor([SENSOR["mean"][i] for i in idx])
    std = torch.tensor([SENSOR["std"][i] for i in idx])
    expected = (y.view(7, 4, k) * std + mean).view(7, 4 * k)
    torch.testing.assert_close(torch.from_numpy(codec.postprocess(y)), expected)


def test_outputs_that_do_not_split_into_horizon_by_channels_are_refused_at_load():
    serving = {**SENSOR, "task": {"name": "Forecaster", "head": "regression", "horizon": 4}}
    with pytest.raises(ConfigError, match="horizon 4 x 3 forecast channel"):
        ModelCodec.from_bundle(_bundle(serving, input_kind="continuous", input_dim=3, head="regression", output_dim=6))


def test_float_audio_forecasts_pass_unchanged():
    serving = {"modality": "audio", "sample_rate": 8000, "encoding": "float", "channels": 1,
               "task": {"name": "Forecaster", "head": "regression", "horizon": 2}}
    codec = ModelCodec.from_bundle(_bundle(serving, input_kind="continuous", input_dim=1, head="regression",
                                           output_dim=2))
    y = torch.randn(5, 2)
    torch.testing.assert_close(torch.from_numpy(codec.postprocess(y)), y)


@pytest.mark.parametrize("serving, io, problem", [
    ({"modality": "dna"}, dict(input_kind="tokens", vocab_size=4, head="lm"), "tokens 0..4"),
    ({"modality": "audio", "sample_rate": 8000, "encoding": "mu_law", "quantization_channels": 256},
     dict(input_kind="tokens", vocab_size=16, head="lm"), "tokens 0..255"),
    ({**SENSOR}, dict(input_kind="continuous", input_dim=2, head="regression", output_dim=3), "3 channel"),
    ({**SENSOR, "classes": ["idle", "walk"]}, dict(input_kind="continuous", input_dim=3, head="classifier",
                                                   output_dim=3), "2 class names but 3"),
])
def test_a_model_that_does_not_fit_its_metadata_is_refused_at_load(serving, io, problem):
    with pytest.raises(ConfigError, match=problem):
        ModelCodec.from_bundle(_bundle(serving, **io))


MU_LAW = {"modality": "audio", "sample_rate": 8000, "encoding": "mu_law", "quantization_channels": 256}
FLOAT_AUDIO = {"modality": "audio", "sample_rate": 8000, "encoding": "float", "channels": 1}
AUDIO_MODELS = {"mu_law": (MU_LAW, dict(input_kind="tokens", vocab_size=256, head="lm")),
                "float": (FLOAT_AUDIO, dict(input_kind="continuous", input_dim=1, head="regression", output_dim=1))}


def _audio_codec(model: str) -> ModelCodec:
    serving, io = AUDIO_MODELS[model]
    return ModelCodec.from_bundle(_bundle(serving, **io))


def _start(codec: ModelCodec, fmt: str, channels: int = 1):
    return parse_start({"type": "start", "format": fmt, "sample_rate": 8000, "channels": channels}, codec.spec)


@pytest.mark.parametrize("model", sorted(AUDIO_MODELS))
@pytest.mark.parametrize("fmt, dtype", [("s16le", "<i2"), ("mulaw8", np.uint8)])
def test_integer_frames_take_the_lookup_path_with_the_general_paths_values(model, fmt, dtype):
    """Mono s16le / mulaw8 frames are one table lookup per sample (76 -> 3 us per 320-sample frame
    on the event loop): every code must give exactly what decode_samples + encode give."""
    codec = _audio_codec(model)
    start = _start(codec, fmt)
    info = np.iinfo(dtype)
    codes = np.arange(info.min, info.max + 1).astype(dtype)
    frame = np.random.default_rng(0).permutation(codes).tobytes()  # every code, in no particular order
    got = codec.chunk_from_frame(frame, start, "reject")
    expected = codec.encode(decode_samples(frame, start))
    assert got.dtype == expected.dtype and got.shape == expected.shape == ((len(codes),) if model == "mu_law"
                                                                           else (len(codes), 1))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("frame, reason", [(b"", "empty_frame"), (b"\x01\x02\x03", "partial_sample")])
def test_the_lookup_path_refuses_bad_frames_as_the_general_path(frame, reason):
    codec = _audio_codec("mu_law")
    with pytest.raises(ProtocolError) as info:
        codec.chunk_from_frame(frame, _start(codec, "s16le"), "reject")
    assert info.value.reason == reason


def test_stereo_frames_are_mixed_down_before_encoding():
    codec = _audio_codec("mu_law")
    pcm = np.array([[1000, -3000], [32767, -32768], [5, 7]], dtype="<i2")
    got = codec.chunk_from_frame(pcm.tobytes(), _start(codec, "s16le", channels=2), "reject")
    assert torch.equal(got, codec.encode((pcm.astype(np.float32) / 32768.0).mean(axis=1, keepdims=True)))
