"""Streaming sample-rate conversion for one stream (``soxr.ResampleStream``, quality HQ).

The resampler carries its filter state across frames, so resampling a recording frame by frame
gives the samples of resampling it whole at once (``soxr.resample``), however it was cut
(tests/test_service_realclients.py checks this to 1e-6; soxr's block processing makes it
bit-exact in practice), provided the stream is flushed at its end (:meth:`flush`). soxr works
in blocks: a frame may give no output samples (they come with a later frame), and the first
output lags the input by up to about 100 ms at HQ (see benchmarks/bench_resample.py).

Shapes: c channels; frames (l, c) float32 in, (m, c) float32 out, m ~ l * out_rate / in_rate.
"""

from __future__ import annotations

import numpy as np
import soxr

from streamssm.errors import ConfigError, ShapeError

QUALITY = "HQ"  # soxr's default: 0.1 dB passband, -100 dB stopband


class StreamResampler:
    """One stream's resampler from ``in_rate`` to ``out_rate`` Hz over ``channels`` channels."""

    def __init__(self, in_rate: int, out_rate: int, channels: int = 1):
        if in_rate <= 0 or out_rate <= 0 or channels < 1:
            raise ConfigError(f"resampler: rates must be > 0 Hz and channels >= 1, got {in_rate} -> {out_rate} Hz, "
                              f"{channels} channel(s)")
        self.in_rate, self.out_rate, self.channels = int(in_rate), int(out_rate), int(channels)
        self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, self.channels, dtype="float32",
                                           quality=QUALITY)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Feed a frame (l, c) float32; returns the output samples ready so far (m, c), m >= 0."""
        return self._feed(x, last=False)

    def flush(self) -> np.ndarray:
        """The end of the input: the samples still held (m, c); the resampler starts afresh after."""
        y = self._feed(np.zeros((0, self.channels), dtype=np.float32), last=True)
        self._stream.clear()
        return y

    def _feed(self, x: np.ndarray, last: bool) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ShapeError(f"resampler: expected samples (l, {self.channels}), got shape {tuple(x.shape)}")
        frame = np.ascontiguousarray(x, dtype=np.float32)
        y = self._stream.resample_chunk(frame[:, 0] if self.channels == 1 else frame, last=last)
        return y.reshape(-1, self.channels)


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """A whole recording (l, c) float32 resampled at once (what a stream's frames add up to)."""
    y = soxr.resample(np.ascontiguousarray(x, dtype=np.float32), in_rate, out_rate, quality=QUALITY)
    return y.reshape(-1, x.shape[1])
