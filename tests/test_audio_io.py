"""The one audio decoder (streamssm/audio_io.py) behind training data, ``generate`` prompts and
``stream`` sources: float files at the wrong scale are refused by name (the mu-law encoding would
clip them to +-1 silently), overs are read with a warning, broken files are named."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf

from streamssm.audio_io import read_audio
from streamssm.datamodules.waveform import WaveformDataModule
from streamssm.errors import DataFormatError
from streamssm.service.sources import read_source

RATE = 8000


def _wav(path, samples, subtype):
    sf.write(str(path), samples, RATE, subtype=subtype)
    return path


def _tone(scale=0.5, n=4000):
    return (scale * np.sin(np.linspace(0, 200, n))).astype(np.float32)


def test_a_float_file_at_integer_scale_is_refused_by_every_reader(tmp_path):
    path = _wav(tmp_path / "loud.wav", _tone(16384.0), "FLOAT")
    for read in (read_audio, read_source):
        with pytest.raises(DataFormatError, match=r"loud\.wav.*reach 16384.*integer scale.*divide by 32768"):
            read(path)
    dm = WaveformDataModule(files=str(tmp_path), sample_rate=RATE, crop=64, samples_per_epoch=4, batch_size=2,
                            val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataFormatError, match="integer scale"):
        dm.setup("fit")


def test_overs_are_read_as_stored_with_a_warning_that_counts_them(tmp_path, caplog):
    samples = _tone(0.5)
    samples[[10, 20, 30]] = [1.25, -1.5, 1.01]
    path = _wav(tmp_path / "hot.wav", samples, "FLOAT")
    with caplog.at_level(logging.WARNING, logger="streamssm.audio_io"):
        data, rate = read_audio(path)
    assert rate == RATE and data.shape == (4000, 1)
    np.testing.assert_array_equal(data[:, 0], samples)  # not clipped here: the encoding decides
    assert "3 of 4000 samples exceed [-1, 1] (peak 1.5)" in caplog.text


def test_full_scale_integer_pcm_reads_quietly(tmp_path, caplog):
    pcm = np.full(100, 32767, dtype=np.int16)
    pcm[::2] = -32768
    path = _wav(tmp_path / "full.wav", pcm, "PCM_16")
    with caplog.at_level(logging.WARNING, logger="streamssm.audio_io"):
        data, _ = read_audio(path)
    assert float(np.abs(data).max()) == 1.0 and not caplog.text


def test_a_stream_source_that_is_not_audio_is_named(tmp_path):
    """read_source handed soundfile's raw error through before it shared the decoder."""
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples")
    with pytest.raises(DataFormatError, match=r"notes\.wav.*cannot be read"):
        read_source(path)
    empty = _wav(tmp_path / "empty.wav", np.zeros(0, np.float32), "FLOAT")
    with pytest.raises(DataFormatError, match="holds no samples"):
        read_source(empty)

