"""generate: seeded reproducibility, top-k/top-p filtering, greedy == argmax rollout; Streamer-level
generation == model level; sensor rollout == feeding the model its own outputs by hand; audio."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamssm.encoding import mu_law_encode
from streamssm.errors import ConfigError, ShapeError, StateError
from streamssm.generate import (
    SamplingConfig,
    continue_audio,
    filter_logits,
    forecast,
    generate,
    generate_streams,
    rollout,
    sample_next,
)
from streamssm.inference import Streamer
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec


@pytest.fixture(scope="module")
def model() -> SSMModel:
    torch.manual_seed(0)
    return SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=2, vocab_size=11)).eval()


PROMPT = torch.tensor([1, 4, 2, 7, 3])


def test_seeded_generation_is_reproducible(model):
    cfg = SamplingConfig(temperature=1.0, top_k=5)
    a = generate(model, PROMPT, 12, samples=4, sampling=cfg, seed=3)
    b = generate(model, PROMPT, 12, samples=4, sampling=cfg, seed=3)
    c = generate(model, PROMPT, 12, samples=4, sampling=cfg, seed=4)
    assert a.shape == (4, 12) and torch.equal(a, b) and not torch.equal(a, c)


@torch.no_grad()
def test_greedy_equals_argmax_rollout_through_full_forward(model):
    out = generate(model, PROMPT, 10, samples=2, sampling=SamplingConfig(temperature=0))
    seq = PROMPT.clone()
    for _ in range(10):
        seq = torch.cat([seq, model(seq[None])[0][0, -1].argmax()[None]])
    assert torch.equal(out[0], seq[len(PROMPT):]) and torch.equal(out[1], out[0])


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, SamplingConfig(top_k=2))).tolist() == [[True, True, False, False, False]]
    # 0.4 + 0.3 = 0.7 < 0.8: the nucleus needs the third token too
    assert torch.isfinite(filter_logits(logits, SamplingConfig(top_p=0.8))).tolist() == [[True, True, True, False, False]]
    draws = sample_next(logits.expand(20000, -1), SamplingConfig(top_k=2), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[2:].sum() == 0 and abs(freq[0] - 4 / 7) < 0.02  # renormalized over the top 2


def test_bad_arguments_refused(model):
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ShapeError, match="1-D"):
        generate(model, PROMPT[None], 3)
    regression = SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=1, input_kind="continuous", input_dim=2,
                                      head="regression", output_dim=2))
    with pytest.raises(ConfigError, match="token LM"):
        generate(regression, PROMPT, 3)


def test_top_k_and_top_p_together_draw_from_the_trimmed_set():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    # top-3 renormalized: 0.47, 0.35, 0.18; top_p 0.8 keeps the first two (0.47 < 0.8 <= 0.82)
    draws = sample_next(logits.expand(20000, -1), SamplingConfig(top_k=3, top_p=0.8), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[2:].sum() == 0 and abs(freq[0] - 4 / 7) < 0.02


def test_prompt_outside_the_vocabulary_refused(model):
    with pytest.raises(ShapeError, match=r"\[0, 11\), got \[1, 11\]"):
        generate(model, torch.tensor([1, 11]), 3)


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_streamer_generation_equals_model_generation(block):
    torch.manual_seed(0)
    lm = SSMModel(ModelConfig(block=block, d_model=16, n_layers=2, vocab_size=11, headdim=8, chunk_size=4)).eval()
    greedy = SamplingConfig(temperature=0)
    streamer = Streamer(lm, capacity=5)
    other = streamer.open()  # a live stream the generation must not disturb
    streamer.feed(other, torch.tensor([3, 3, 3]))
    before = streamer.snapshot(other)
    prompts = [PROMPT, PROMPT[:1], PROMPT[2:]]
    out = generate_streams(streamer, prompts, 9, greedy)
    for p, row in zip(prompts, out):
        assert torch.equal(row, generate(lm, p, 9, sampling=greedy)[0])
    assert streamer.live == 1 and streamer.snapshot(other) == before
    sampled = generate_streams(streamer, [PROMPT] * 3, 9, SamplingConfig(top_k=4), seed=5)
    assert torch.equal(sampled, generate(lm, PROMPT, 9, 3, SamplingConfig(top_k=4), seed=5))
    with pytest.raises(StateError, match="pool full"):
        generate_streams(streamer, [PROMPT] * 5, 2)
    assert streamer.live == 1  # the streams opened before the refusal are closed again


SENSOR = ServingSpec(modality="sensor", encoding="float", head="regression", channels=2,
                     channel_names=("temp", "load"), mean=(20.0, -3.0), std=(4.0, 0.5), horizon=2)


@pytest.fixture(scope="module")
def forecaster() -> SSMModel:
    torch.manual_seed(0)
    return SSMModel(ModelConfig(block="mamba2", d_model=16, n_layers=2, headdim=8, chunk_size=4,
                                input_kind="continuous", input_dim=2, head="regression", output_dim=4)).eval()


@torch.no_grad()
def test_rollout_equals_feeding_the_model_its_own_outputs_by_hand(forecaster):
    history = torch.randn(2, 7, 2)
    out = rollout(forecaster, history, 6)
    state = forecaster.init_state(2)
    for t in range(7):
        y, state = forecaster.step(history[:, t], state)
    expected = []
    for _ in range(6):
        expected.append(y)
        y, state = forecaster.step(y[:, :2], state)
    assert out.shape == (2, 6, 4) and (out - torch.stack(expected, 1)).abs().max() <= 1e-5


def test_forecast_is_the_rollout_de_normalized(forecaster):
    raw = torch.tensor([[21.0, -3.5], [19.0, -2.0], [24.0, -3.0]], dtype=torch.float64)
    got = forecast(forecaster, SENSOR, raw, 4)
    normalized = ((raw - torch.tensor([20.0, -3.0])) / torch.tensor([4.0, 0.5])).float()
    model_units = rollout(forecaster, normalized, 4)[0, :, :2]
    assert got.shape == (4, 2)
    assert torch.allclose(got.double(), model_units.double() * torch.tensor([4.0, 0.5]) + torch.tensor([20.0, -3.0]), atol=1e-5)
    subset = dataclasses.replace(SENSOR, targets=("temp",), horizon=4)
    with pytest.raises(ConfigError, match=r"forecasts \['temp'\] of \['temp', 'load'\]"):
        forecast(forecaster, subset, raw, 2)


def test_rollout_refuses_token_models(model):
    with pytest.raises(ConfigError, match="continuous regression"):
        rollout(model, torch.zeros(3, 1), 2)


AUDIO = ServingSpec(modality="audio", encoding="mu_law", head="lm", sample_rate=8000, quantization_channels=16)


def test_audio_continuation_resamples_encodes_and_is_seeded():
    torch.manual_seed(0)
    lm = SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=1, vocab_size=16)).eval()
    wave = torch.sin(torch.linspace(0, 60, 1600))[:, None].repeat(1, 2) * 0.5  # 0.1 s stereo at 16 kHz
    prompt, new = continue_audio(lm, AUDIO, wave, 16000, 40, samples=3, sampling=SamplingConfig(top_k=5), seed=2)
    assert prompt.shape == (800,) and new.shape == (3, 40) and new.abs().max() <= 1
    assert torch.equal(mu_law_encode(prompt, 16), AUDIO.encoder()(wave, sample_rate=16000))
    again = continue_audio(lm, AUDIO, wave, 16000, 40, samples=3, sampling=SamplingConfig(top_k=5), seed=2)[1]
    assert torch.equal(new, again)
    with pytest.raises(ConfigError, match="mu-law audio LM"):
        continue_audio(lm, ServingSpec(modality="dna", encoding="bases"), wave, 16000, 4)


def test_cli_audio_writes_wavs_at_the_model_rate_and_a_plot(tmp_path, capsys):
    import soundfile as sf

    from streamssm.checkpoint import export_safetensors
    from streamssm.cli import main

    torch.manual_seed(0)
    export_safetensors(SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=1, vocab_size=16)),
                       tmp_path / "a.safetensors", spec=AUDIO)
    sf.write(tmp_path / "p.wav", (0.5 * torch.randn(1600, 2).clamp(-1, 1)).numpy(), 16000)
    args = ["generate", "--checkpoint", str(tmp_path / "a.safetensors"), "--prompt", str(tmp_path / "p.wav"),
            "--length", "40", "--samples", "2", "--seed", "3", "--output", str(tmp_path / "c.wav")]
    assert main(args) == 0
    for i in range(2):
        info = sf.info(tmp_path / f"c_{i}.wav")
        assert (info.samplerate, info.channels, info.frames) == (8000, 1, 800 + 40)
    assert (tmp_path / "c.png").stat().st_size > 0 and "2 WAV file(s)" in capsys.readouterr().out
    first = sf.read(tmp_path / "c_0.wav")[0]
    # CLI audit: an existing output (a training clip, the prompt itself) was replaced silently
    assert main(args) == 2 and "c_0.wav exists; pass --overwrite" in capsys.readouterr().err
    assert (sf.read(tmp_path / "c_0.wav")[0] == first).all()
    assert main([*args, "--overwrite"]) == 0 and (sf.read(tmp_path / "c_0.wav")[0] == first).all()  # seeded
    prompt = sf.read(tmp_path / "p.wav")[0]
    mine = [*args[:-4], "--samples", "1", "--output", str(tmp_path / "p.wav"), "--overwrite"]
    assert main(mine) == 2 and "p.wav is the prompt" in capsys.readouterr().err
    assert (sf.read(tmp_path / "p.wav")[0] == prompt).all()


def test_cli_sensor_rollout_table_equals_forecast(forecaster, tmp_path, capsys):
    import polars as pl

    from streamssm.checkpoint import export_safetensors
    from streamssm.cli import main

    export_safetensors(forecaster, tmp_path / "s.safetensors", spec=SENSOR)
    history = pl.DataFrame({"time": range(6), "load": [-3.0, -2.5, -3.2, -2.9, -3.1, -3.0],
                            "temp": [20.0, 21.0, 19.5, 22.0, 20.5, 21.5]})
    history.write_csv(tmp_path / "h.csv")
    assert main(["generate", "--checkpoint", str(tmp_path / "s.safetensors"), "--prompt", str(tmp_path / "h.csv"),
                 "--length", "5", "--output", str(tmp_path / "f.parquet")]) == 0
    table = pl.read_parquet(tmp_path / "f.parquet")
    raw = torch.tensor(history.select("temp", "load").to_numpy())
    assert table.columns == ["step", "temp", "load"] and table["step"].to_list() == [1, 2, 3, 4, 5]
    assert torch.allclose(torch.tensor(table.select("temp", "load").to_numpy()), forecast(forecaster, SENSOR, raw, 5).double())
    assert (tmp_path / "f.png").stat().st_size > 0
    assert main(["generate", "--checkpoint", str(tmp_path / "s.safetensors"), "--prompt", str(tmp_path / "h.csv"),
                 "--length", "5", "--samples", "2", "--output", str(tmp_path / "f.csv")]) != 0
    assert "deterministic" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_streamer_generation_on_cuda_equals_model_generation(block):
    torch.manual_seed(0)
    lm = SSMModel(ModelConfig(block=block, d_model=64, n_layers=2, vocab_size=11, headdim=16)).eval().cuda()
    greedy = SamplingConfig(temperature=0)
    expected = generate(lm, PROMPT, 32, 4, greedy)
    out = generate_streams(Streamer(lm, capacity=8, device="cuda"), [PROMPT] * 4, 32, greedy)
    assert torch.equal(out, expected.cpu())
