"""Audio files in: one decoder for training data, ``generate`` prompts and ``stream`` sources.

Files are decoded with soundfile (WAV, FLAC, OGG, MP3, AIFF, ...; not ``torchaudio.load``, which
needs torchcodec and a system FFmpeg) to float32 (frames, channels). Integer PCM comes back
scaled into [-1, 1); float files come back as stored, so a float file written at integer scale
(samples of +-32768, as some tools write) would be clipped to +-1 by the mu-law encoding, that is
destroyed, without a word: such a file is refused, and a float file that only overshoots [-1, 1]
(mastering overs) is read with a warning that names how much will be clipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from streamssm.encoding import check_audio_scale
from streamssm.errors import DataFormatError

log = logging.getLogger(__name__)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio file: ``(samples (frames, channels) float32 in [-1, 1] but for overs
    below AUDIO_SCALE_LIMIT, sample_rate in Hz)``.

    Raises ``DataFormatError`` naming the file when it cannot be decoded, holds no samples or
    non-finite ones, or its samples reach past ``AUDIO_SCALE_LIMIT``; warns when some exceed 1.
    """
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise DataFormatError(f"audio file {str(path)!r} cannot be read: {exc}") from None
    if data.shape[0] == 0:
        raise DataFormatError(f"audio file {str(path)!r} holds no samples")
    if not np.isfinite(data).all():
        raise DataFormatError(f"audio file {str(path)!r} contains NaN or infinite samples")
    peak = float(np.abs(data).max())
    check_audio_scale(peak, f"audio file {str(path)!r}")
    if peak > 1.0:
        over = int((np.abs(data) > 1.0).sum())
        log.warning("audio file %r: %d of %d samples exceed [-1, 1] (peak %.4g); a mu-law model clips them",
                    str(path), over, data.size, peak)
    return data, int(rate)
