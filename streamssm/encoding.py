"""Raw data <-> model input encodings, shared by training, serving and zarr inference.

No Lightning import: the websocket service and ``streamssm infer`` use this module to turn raw
samples or bases into model inputs exactly the way the datamodules did during training.

Shape legend: l time steps, c channels.

- DNA: ``encode_bases("ACGTN")`` -> LongTensor (l,) with A,C,G,T -> 0..3 and N (and every IUPAC
  ambiguity code) -> 4; lowercase (soft-masked repeats) is accepted. ``reverse_complement``
  flips the last axis and swaps A<->T, C<->G.
- Audio: 8-bit mu-law (``mu_law_encode``: float in [-1, 1] -> LongTensor 0..255) or float.
- Sensors: ``Normalizer(mean, std)`` per channel, fitted on the training split.
- ``DnaEncoder`` / ``AudioEncoder`` / ``SensorEncoder``: raw data -> model input, built by
  :meth:`streamssm.serving.ServingSpec.encoder` from a model file's serving spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torchaudio.functional as AF

from streamssm.errors import ConfigError, DataFormatError, ShapeError

__all__ = [
    "DNA_ALPHABET",
    "DNA_VOCAB_SIZE",
    "N_TOKEN",
    "IUPAC_AMBIGUOUS",
    "BASE_LUT",
    "encode_bases",
    "base_codes",
    "decode_bases",
    "reverse_complement",
    "mu_law_encode",
    "mu_law_decode",
    "pcm_to_float",
    "AUDIO_SCALE_LIMIT",
    "check_audio_scale",
    "Normalizer",
    "DnaEncoder",
    "AudioEncoder",
    "SensorEncoder",
]

DNA_ALPHABET = "ACGTN"
DNA_VOCAB_SIZE = len(DNA_ALPHABET)
N_TOKEN = 4
#: IUPAC ambiguity codes other than N; read as N (token 4) unless a strict option refuses them.
IUPAC_AMBIGUOUS = "RYSWKMBDHV"
_INVALID = 255

#: Byte -> token lookup table (read-only); 255 marks bytes that are not bases.
BASE_LUT = np.full(256, _INVALID, dtype=np.uint8)
for _i, _b in enumerate("ACGT"):
    BASE_LUT[ord(_b)] = _i
    BASE_LUT[ord(_b.lower())] = _i
for _b in "N" + IUPAC_AMBIGUOUS:
    BASE_LUT[ord(_b)] = N_TOKEN
    BASE_LUT[ord(_b.lower())] = N_TOKEN
BASE_LUT.setflags(write=False)
_STRICT_LUT = BASE_LUT.copy()  # ambiguity codes other than N marked invalid
for _b in IUPAC_AMBIGUOUS:
    _STRICT_LUT[ord(_b)] = _INVALID
    _STRICT_LUT[ord(_b.lower())] = _INVALID
_STRICT_LUT.setflags(write=False)

_RC_TABLE = torch.tensor([3, 2, 1, 0, 4], dtype=torch.long)
_RC_NP = np.array([3, 2, 1, 0, 4], dtype=np.uint8)


def base_codes(text: str | bytes, ambiguous_as_n: bool = True) -> np.ndarray:
    """Like ``encode_bases`` but returns a numpy uint8 array (l,) (fast path for data loaders)."""
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError as exc:
            raise DataFormatError(
                f"invalid DNA character {text[exc.start]!r} at position {exc.start}: "
                f"expected one of ACGTN (any case) or an IUPAC ambiguity code"
            ) from None
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise DataFormatError(f"encode_bases: expected str or bytes, got {type(text).__name__}")
    codes = (BASE_LUT if ambiguous_as_n else _STRICT_LUT)[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(codes == _INVALID)
    if bad.size:
        pos = int(bad[0])
        allowed = "or an IUPAC ambiguity code" if ambiguous_as_n else "(ambiguity codes are refused)"
        raise DataFormatError(
            f"invalid DNA character {chr(raw[pos])!r} at position {pos}: expected one of ACGTN (any case) {allowed}"
        )
    return codes


def encode_bases(text: str | bytes, ambiguous_as_n: bool = True) -> torch.Tensor:
    """Encode a DNA string into tokens.

    Args:
        text: bases ``ACGT`` (any case) plus ``N`` and IUPAC ambiguity codes (-> N).
        ambiguous_as_n: False refuses the ambiguity codes ``RYSWKMBDHV`` (N stays valid).
    Returns:
        LongTensor (l,) with values in 0..4.
    Raises:
        DataFormatError naming the first invalid character and its 0-based position.
    """
    return torch.from_numpy(base_codes(text, ambiguous_as_n).astype(np.int64))


def decode_bases(tokens: torch.Tensor | Sequence[int]) -> str:
    """Inverse of ``encode_bases`` for a 1-D token sequence (upper case, ambiguity -> ``N``)."""
    t = torch.as_tensor(tokens)
    if t.dim() != 1:
        raise ShapeError(f"decode_bases: expected a 1-D token tensor (l,), got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= DNA_VOCAB_SIZE):
        raise DataFormatError(
            f"decode_bases: tokens must lie in 0..{DNA_VOCAB_SIZE - 1}, got range {int(t.min())}..{int(t.max())}"
        )
    lut = np.frombuffer(DNA_ALPHABET.encode("ascii"), dtype=np.uint8)
    return lut[t.cpu().numpy().astype(np.int64)].tobytes().decode("ascii")


def reverse_complement(tokens: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Reverse complement of token sequences along the last axis: (..., l) -> (..., l).

    Accepts a torch tensor or a numpy array of integer tokens and returns the same kind.
    """
    if isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise ShapeError(f"reverse_complement: expected integer tokens, got dtype {tokens.dtype}")
        return _RC_NP[tokens[..., ::-1]].astype(tokens.dtype)
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ShapeError(f"reverse_complement: expected integer tokens, got dtype {tokens.dtype}")
    table = _RC_TABLE.to(tokens.device)
    return table[tokens.flip(-1).long()].to(tokens.dtype)


def _check_channels(channels: int) -> None:
    if not isinstance(channels, int) or isinstance(channels, bool) or not 2 <= channels <= 65536:
        raise ConfigError(f"quantization channels: expected an integer in 2..65536, got {channels!r}")


def mu_law_encode(wave: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """Mu-law quantize a float waveform.

    Args:
        wave: float tensor of any shape, nominally in [-1, 1]; values outside are clipped
            (as an audio converter would), NaN/inf raise ``DataFormatError``.
        channels: number of quantization levels (256 = 8-bit, SaShiMi-style).
    Returns:
        LongTensor of the same shape with values in 0..channels-1.
    """
    _check_channels(channels)
    if not torch.is_floating_point(wave):
        raise DataFormatError(f"mu_law_encode: expected a float waveform in [-1, 1], got dtype {wave.dtype}")
    if not bool(torch.isfinite(wave).all()):
        raise DataFormatError("mu_law_encode: waveform contains NaN or infinite samples")
    return AF.mu_law_encoding(wave.clamp(-1.0, 1.0), channels)


def mu_law_decode(tokens: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """Inverse of ``mu_law_encode``: LongTensor in 0..channels-1 -> float32 in [-1, 1]."""
    _check_channels(channels)
    if torch.is_floating_point(tokens):
        raise DataFormatError(f"mu_law_decode: expected integer tokens, got dtype {tokens.dtype}")
    return AF.mu_law_decoding(tokens.to(torch.float32), channels)


#: the integer PCM dtypes :func:`pcm_to_float` knows the full scale of
PCM_DTYPES = tuple(np.dtype(d) for d in ("uint8", "int8", "int16", "int32"))


def pcm_to_float(samples: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Integer PCM (int8/int16/int32/uint8) or float samples -> float32 in [-1, 1] (same shape)."""
    arr = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
    if torch.is_floating_point(arr):
        return arr.to(torch.float32)
    scale = {torch.int16: 32768.0, torch.int32: 2147483648.0, torch.int8: 128.0}.get(arr.dtype)
    if arr.dtype == torch.uint8:
        return (arr.to(torch.float32) - 128.0) / 128.0
    if scale is None:
        raise DataFormatError(f"audio samples: unsupported dtype {arr.dtype} (expected float or int PCM)")
    return arr.to(torch.float32) / scale


class Normalizer:
    """Per-channel affine normalization ``(x - mean) / std`` over the last axis.

    ``mean`` and ``std`` have shape (c,); ``apply``/``invert`` accept (..., c) tensors and keep
    their dtype and device.
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        m = torch.as_tensor(mean, dtype=torch.float64).flatten()
        s = torch.as_tensor(std, dtype=torch.float64).flatten()
        if m.shape != s.shape or m.numel() == 0:
            raise ConfigError(
                f"Normalizer: mean and std must be non-empty and of equal length, got {m.numel()} and {s.numel()}"
            )
        if not bool(torch.isfinite(m).all() & torch.isfinite(s).all()):
            raise ConfigError("Normalizer: mean/std contain NaN or infinite values")
        if bool((s <= 0).any()):
            raise ConfigError(f"Normalizer: std must be positive, got {s.tolist()}")
        self.mean = m
        self.std = s

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def fit(cls, values: np.ndarray | torch.Tensor, min_std: float = 1e-6) -> Normalizer:
        """Statistics of (n, c) values (float64 accumulation); a constant channel gets std 1."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ShapeError(f"Normalizer.fit: expected (n, c) values with n > 0, got shape {arr.shape}")
        mean = arr.mean(axis=0)
        std = arr.std(axis=0)
        std = np.where(std < min_std, 1.0, std)
        return cls(mean, std)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.channels,):
            raise ShapeError(f"Normalizer: expected (..., {self.channels}) values, got shape {tuple(x.shape)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(..., c) raw values -> normalized values (float dtype of ``x``, float32 for ints)."""
        x = torch.as_tensor(x)
        self._check(x)
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        return ((x.to(torch.float64) - self.mean.to(x.device)) / self.std.to(x.device)).to(dtype)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """(..., c) normalized values -> raw units."""
        y = torch.as_tensor(y)
        self._check(y)
        dtype = y.dtype if torch.is_floating_point(y) else torch.float32
        return (y.to(torch.float64) * self.std.to(y.device) + self.mean.to(y.device)).to(dtype)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalizer:
        try:
            return cls(d["mean"], d["std"])
        except KeyError as exc:
            raise ConfigError(f"Normalizer.from_dict: missing key {exc.args[0]!r}") from None

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean.tolist()}, std={self.std.tolist()})"


# ----------------------------------------------------------------------------------------------
# serving metadata -> encoders / decoders


def _as_2d_samples(x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """float samples (l,) or (l, c) -> (l, c), checked for channels and finite values."""
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ShapeError(f"{what}: expected samples of shape (l,) or (l, c), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ShapeError(f"{what}: expected {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise DataFormatError(f"{what}: samples contain NaN or infinite values")
    return x


class DnaEncoder:
    """str/bytes of bases -> LongTensor (l,); ``ambiguous_as_n=False`` refuses ``RYSWKMBDHV``."""

    def __init__(self, ambiguous_as_n: bool = True) -> None:
        self.ambiguous_as_n = bool(ambiguous_as_n)

    def __call__(self, raw: str | bytes) -> torch.Tensor:
        return encode_bases(raw, self.ambiguous_as_n)


#: float audio reaching past this is at the wrong scale (16-bit PCM values as floats, as some tools
#: write them): refused, since the mu-law encoding would clip all of it to +-1; overs below it are
#: clipped (mastering overs, resampling ringing)
AUDIO_SCALE_LIMIT = 2.0


def check_audio_scale(peak: float, what: str) -> None:
    """Raise ``DataFormatError`` naming ``what`` when float audio's ``peak`` (largest absolute
    sample) reaches past ``AUDIO_SCALE_LIMIT``."""
    if peak > AUDIO_SCALE_LIMIT:  # mu-law would clip it all to +-1
        raise DataFormatError(f"{what}: its float samples reach {peak:.6g}, far outside [-1, 1]; it looks like PCM at "
                              f"integer scale: rescale it to [-1, 1] (16-bit: multiply by 1/32768, i.e. divide by 32768)")


class AudioEncoder:
    """Audio samples (l,) or (l, c) float in [-1, 1] or int PCM -> model input; float samples
    past ``AUDIO_SCALE_LIMIT`` raise ``DataFormatError``.

    mu-law: LongTensor (l,) (mono, mixed down if needed); float: FloatTensor (l, c). Pass
    ``sample_rate`` when the raw audio was recorded at another rate: it is resampled first.
    """

    def __init__(self, sample_rate: int, encoding: str, channels: int, quantization_channels: int, mono: bool) -> None:
        if encoding not in ("mu_law", "float"):
            raise ConfigError(f"audio metadata: encoding must be 'mu_law' or 'float', got {encoding!r}")
        self.sample_rate = int(sample_rate)
        self.encoding = encoding
        self.channels = int(channels)
        self.quantization_channels = int(quantization_channels)
        self.mono = bool(mono)

    def __call__(self, raw: Any, sample_rate: int | None = None) -> torch.Tensor:
        x = pcm_to_float(raw)
        if x.dim() == 1:
            x = x[:, None]
        if x.dim() != 2:
            raise ShapeError(f"audio input: expected samples of shape (l,) or (l, c), got {tuple(x.shape)}")
        if self.mono and x.shape[1] > 1:
            x = x.mean(dim=1, keepdim=True)  # as the waveform datamodule mixed its training files
        x = _as_2d_samples(x, self.channels, "audio input")
        check_audio_scale(float(x.abs().max()) if x.numel() else 0.0, "audio input")
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            x = AF.resample(x.T.contiguous(), int(sample_rate), self.sample_rate).T.contiguous()
        if self.encoding == "mu_law":
            return mu_law_encode(x[:, 0], self.quantization_channels)
        return x


SensorIntegers = Literal["error", "values", "pcm"]


class SensorEncoder:
    """Sensor rows (l, c) in raw units -> normalized FloatTensor (l, c).

    Float rows are raw units. Integer rows are ambiguous (counts in the training units, or PCM
    scaled to [-1, 1]?) and are refused unless ``integers`` says how to read them: ``"values"``
    takes them at face value (as the sensor datamodule reads integer table columns),
    ``"pcm"`` divides by the dtype's full scale like audio (``pcm_to_float``).
    """

    def __init__(self, normalizer: Normalizer, names: Sequence[str], integers: SensorIntegers = "error") -> None:
        if integers not in ("error", "values", "pcm"):
            raise ConfigError(f"sensor integers: expected 'error', 'values' or 'pcm', got {integers!r}")
        self.normalizer = normalizer
        self.names = list(names)
        self.integers = integers

    def __call__(self, raw: Any) -> torch.Tensor:
        x = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
        what = f"sensor input (channels {self.names})"
        if not torch.is_floating_point(x):
            if self.integers == "error":
                raise DataFormatError(
                    f"{what}: integer samples ({x.dtype}) are ambiguous: give float values in the training "
                    f"units, or say how to read integers (integers='values' as raw units, 'pcm' scaled to [-1, 1])"
                )
            x = x.to(torch.float64) if self.integers == "values" else pcm_to_float(x)  # float64: exact
            return self.normalizer.apply(_as_2d_samples(x, self.normalizer.channels, what)).to(torch.float32)
        return self.normalizer.apply(_as_2d_samples(x, self.normalizer.channels, what))
