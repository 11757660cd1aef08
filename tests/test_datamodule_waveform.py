"""WaveformDataModule on tiny generated WAV files: mu-law / float crops, resampling, splits, errors."""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from streamssm.datamodules import WaveformDataModule, synthetic
from streamssm.encoding import mu_law_encode
from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wav")
    synthetic.write_wav_folder(folder, n_files=4, seconds=0.25, sample_rate=8000, seed=0)
    return folder


def make(files, **kw):
    kw.setdefault("sample_rate", 8000)
    kw.setdefault("crop", 128)
    kw.setdefault("batch_size", 4)
    kw.setdefault("samples_per_epoch", 8)
    dm = WaveformDataModule(files, **kw)
    dm.setup("fit")
    return dm


def test_mu_law_crops_match_decoded_audio(clips):
    dm = make(str(clips), val_fraction=0.25)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 128) and batch["inputs"].dtype == torch.long
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert 0 <= int(batch["inputs"].min()) and int(batch["inputs"].max()) <= 255
    ds = dm._dataset("train")
    keys = list(dm.train_dataloader().sampler)[:4]
    for row, key in enumerate(keys):
        file, start = ds.locate(key)
        wave, rate = sf.read(dm.paths[file], dtype="float32")
        expected = mu_law_encode(torch.from_numpy(wave[start : start + 129]))
        assert torch.equal(batch["inputs"][row], expected[:-1])
        assert torch.equal(batch["targets"][row], expected[1:])
    assert dm.model_io() == {"input_kind": "tokens", "vocab_size": 256, "head": "lm", "output_dim": 256}
    spec = dm.serving_spec()
    assert (spec.encoding, spec.sample_rate, spec.quantization_channels) == ("mu_law", 8000, 256)
    # serving encodes raw samples exactly like training did
    file, start = ds.locate(keys[0])
    wave, _ = sf.read(dm.paths[file], dtype="float32")
    served = spec.encoder()(wave[start : start + 128])
    assert torch.equal(served, batch["inputs"][0])


def test_random_crops_seeded_and_fresh_each_epoch(clips):
    a, b = make(str(clips), seed=3), make(str(clips / "clip_*.wav"), seed=3)  # folder and glob agree
    assert a.paths == b.paths and len(a.paths) == 4
    la = a.train_dataloader()
    first = next(iter(la))["inputs"]
    assert torch.equal(first, next(iter(b.train_dataloader()))["inputs"])
    la.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(la))["inputs"])


def test_float_stereo_forecast_and_mono_mixdown(tmp_path):
    paths = synthetic.write_wav_folder(tmp_path, n_files=2, seconds=0.1, sample_rate=8000, seed=1, channels=2)
    dm = make([str(p) for p in paths], encoding="float", mono=False, crop=64, val_fraction=0.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 64, 2) and batch["inputs"].dtype == torch.float32
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert dm.model_io() == {"input_kind": "continuous", "input_dim": 2, "head": "regression", "output_dim": 2}
    ModelConfig(**dm.model_io())
    assert dm.serving_spec().encoding == "float"
    mono = make([str(p) for p in paths], encoding="float", mono=True, crop=64, val_fraction=0.0)
    stereo, _ = sf.read(paths[0], dtype="float32", always_2d=True)
    assert mono.audio[0].shape == (stereo.shape[0], 1)
    assert np.allclose(mono.audio[0][:, 0], stereo.mean(axis=1))
    assert mono.model_io()["input_dim"] == 1
    with pytest.raises(ConfigError, match="mono"):
        WaveformDataModule(str(tmp_path), encoding="mu_law", mono=False)


def test_rate_mismatch_resample_or_refuse(tmp_path):
    synthetic.write_wav_folder(tmp_path / "a", n_files=1, seconds=0.1, sample_rate=8000, seed=0)
    fast = synthetic.write_wav_folder(tmp_path / "b", n_files=1, seconds=0.1, sample_rate=16000, seed=1)[0]
    files = [str(tmp_path / "a" / "clip_000.wav"), str(fast)]
    dm = make(files, encoding="float", crop=32, val_fraction=0.0)
    assert dm.audio[1].shape == (800, 1)  # 1600 samples at 16 kHz -> 800 at 8 kHz
    raw, _ = sf.read(fast, dtype="float32")
    expected = AF.resample(torch.from_numpy(raw)[None], 16000, 8000)[0]
    assert torch.allclose(torch.from_numpy(dm.audio[1][:, 0]), expected, atol=1e-6)
    with pytest.raises(DataFormatError, match=r"16000 Hz, expected 8000 Hz"):
        make(files, on_rate_mismatch="error", crop=32, val_fraction=0.0)
    adopt = make(files[::-1], sample_rate=None, encoding="float", crop=32, val_fraction=0.0)
    assert adopt.serving_spec().sample_rate == 16000 and adopt.audio[1].shape == (1600, 1)


def test_resampled_files_are_reported_in_one_line(tmp_path, caplog):
    """README walk: a folder of 8 kHz clips for a 16 kHz recipe logged one line per clip."""
    synthetic.write_wav_folder(tmp_path, n_files=4, seconds=0.1, sample_rate=8000, seed=0)
    with caplog.at_level(logging.INFO, logger="streamssm.datamodules.waveform"):
        make(str(tmp_path), sample_rate=16000, crop=32, val_fraction=0.0)
    lines = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("resampled 4 audio file(s) from 8000 Hz to 16000 Hz"), lines


def test_file_split_and_time_split_do_not_leak(clips):
    dm = make(str(clips), val_fraction=0.25, test_fraction=0.25)
    files = {s: {f for f, _, _ in dm.split_ranges[s]} for s in ("train", "val", "test")}
    assert len(files["train"]) == 2 and len(files["val"]) == 1 and len(files["test"]) == 1
    assert not (files["train"] & files["val"]) and not (files["train"] & files["test"])
    train = dm._dataset("train")
    assert all(train.locate(k)[0] in files["train"] for k in range(100))
    assert {f for f, _ in dm._dataset("val").spans} == files["val"]
    t = make(str(clips), split_by="time", val_fraction=0.2, test_fraction=0.2, eval_crops=None)
    # 2000 samples per file: train [0, 1200), val [1200, 1600), test [1600, 2000)
    tr = t._dataset("train")
    assert all(tr.locate(k)[1] + 129 <= 1200 for k in range(200))
    assert all(1200 <= s and s + 129 <= 1600 for _, s in t._dataset("val").spans)
    assert len(t._dataset("test").spans) == 4 * (400 // 129)
    with pytest.raises(ConfigError, match="split_by='time'"):
        make(str(clips), val_fraction=0.5, test_fraction=0.4)


def test_unreadable_and_missing_files(tmp_path, clips):
    bad = tmp_path / "broken.wav"
    bad.write_text("this is not audio")
    with pytest.raises(DataFormatError, match="broken.wav"):
        make([str(clips / "clip_000.wav"), str(bad)])
    with pytest.raises(DataFormatError, match="does not exist"):
        make(str(tmp_path / "nothing.wav"))
    with pytest.raises(DataFormatError, match=r"audio' does not exist \(no such file or folder\)"):
        make(str(tmp_path / "audio"))  # a folder that is not there is not called a file
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="holds no files"):
        make(str(tmp_path / "empty"))
    silent = tmp_path / "zero.wav"
    sf.write(silent, np.zeros((0, 1), dtype=np.float32), 8000)
    with pytest.raises(DataFormatError, match="no samples"):
        make(str(silent))
    with pytest.raises(ConfigError, match="crop"):
        make(str(clips / "clip_000.wav"), crop=5000, val_fraction=0.0)


def test_stereo_mixed_to_mono_is_said_or_refused(tmp_path, caplog):
    """Stereo files were mixed down to mono without a word."""
    paths = synthetic.write_wav_folder(tmp_path, n_files=2, seconds=0.1, sample_rate=8000, seed=1, channels=2)
    files = [str(p) for p in paths]
    with caplog.at_level("WARNING", logger="streamssm.datamodules.waveform"):
        make(files, crop=64, val_fraction=0.0)
    said = [r.getMessage() for r in caplog.records if "mono" in r.getMessage()]
    assert len(said) == 1 and f"mixed 2 multichannel audio file(s) down to mono (first: {paths[0]}, 2 channels)" in said[0]
    with pytest.raises(DataFormatError, match=r"has 2 channels and the model is mono.*on_multichannel='mix'"):
        make(files, crop=64, val_fraction=0.0, on_multichannel="error")


def test_validation_split_too_short_for_the_crop_names_the_cause(clips):
    dm = make(str(clips), crop=600, split_by="time", val_fraction=0.1)  # 2000 samples: val spans of 200
    with pytest.raises(ConfigError, match=r"validation span of 200 samples is shorter than the 601 samples one window "
                                          r"needs; lower crop or raise val_fraction"):
        dm.val_dataloader()
