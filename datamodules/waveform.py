"""Audio crops from a folder, glob or list of audio files for sample-level modelling.

Shape legend: b batch, l crop (model input length), c channels.

Files are decoded with soundfile (WAV, FLAC, OGG, MP3, AIFF, ...; not ``torchaudio.load``),
optionally mixed down to mono (with a warning; ``on_multichannel="error"`` refuses instead), brought to ``sample_rate`` (``torchaudio.functional.resample``
or a ``DataFormatError`` when ``on_rate_mismatch="error"``) and kept in memory, already
encoded (1 byte per sample for 8-bit mu-law). Each sample is a crop of ``l + 1`` samples:

- ``encoding="mu_law"`` (SaShiMi-style token LM, vocab ``quantization_channels``):
  ``{"inputs": (l,) long, "targets": (l,) long}`` next-sample tokens;
- ``encoding="float"`` (forecast the next sample): ``{"inputs": (l, c) float,
  "targets": (l, c) float}``.

Training crops are random (seeded, fresh every epoch); val/test crops tile their audio.
Splits are by file (``split_by="file"``, files shuffled by ``seed``) or by time inside every
file (``split_by="time"``: train | val | test).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

from streamssm.datamodules._common import (
    BaseDataModule,
    EpochKeySampler,
    SpanSampler,
    check_fractions,
    check_positive,
    evenly_spaced,
    resolve_files,
    span_too_short,
    split_points,
    tile_starts,
)
from streamssm.audio_io import read_audio
from streamssm.encoding import mu_law_encode
from streamssm.errors import ConfigError, DataFormatError
from streamssm.serving import ServingSpec

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64")


class CropDataset(Dataset):
    """Crops of ``crop + 1`` samples over in-memory encoded audio.

    ``random=True``: key -> a seeded random crop (see ``EpochKeySampler``); else index -> the
    fixed crop ``spans[index] = (file, start)``.
    """

    def __init__(
        self,
        audio: list[np.ndarray],
        crop: int,
        tokens: bool,
        spans: list[tuple[int, int]] | None = None,
        ranges: list[tuple[int, int, int]] | None = None,
        num_samples: int = 0,
        seed: int = 0,
    ) -> None:
        self.audio = audio
        self.crop = crop
        self.tokens = tokens
        self.spans = spans
        self.ranges = ranges
        self.num_samples = num_samples
        self.seed = seed
        self.sampler = SpanSampler([hi - lo for _, lo, hi in ranges], crop + 1) if ranges is not None else None

    def __len__(self) -> int:
        return self.num_samples if self.sampler is not None else len(self.spans or [])

    def locate(self, key: int) -> tuple[int, int]:
        """``(file index, start sample)`` of the crop for ``key``."""
        if self.sampler is None:
            return self.spans[int(key)]  # type: ignore[index]
        i, offset = self.sampler.draw(np.random.default_rng([self.seed, int(key)]))
        file, lo, _ = self.ranges[i]  # type: ignore[index]
        return file, lo + offset

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        file, start = self.locate(key)
        piece = self.audio[file][start : start + self.crop + 1]  # (l+1,) tokens or (l+1, c) floats
        piece = torch.from_numpy(piece.astype(np.int64) if self.tokens else np.ascontiguousarray(piece))
        return {"inputs": piece[:-1], "targets": piece[1:]}


class WaveformDataModule(BaseDataModule):
    """Crops of audio files for a mu-law token LM or next-sample float forecasting.

    Args:
        files: a folder (its audio files), glob pattern, file, or list of them.
        sample_rate: target rate in Hz; None adopts the first file's rate.
        encoding: "mu_law" (tokens, vocab ``quantization_channels``) or "float".
        quantization_channels: mu-law levels (256 = 8-bit).
        mono: mix all channels down to one (required for mu_law).
        on_multichannel: with ``mono``, "mix" multichannel files down (a warning names how
            many) or "error" to refuse them.
        on_rate_mismatch: "resample" files at another rate, or "error".
        crop: model input length l in samples (each sample reads l + 1).
        split_by: "file" (whole files per split) or "time" (every file cut train|val|test).
        val_fraction / test_fraction: share of files (or of each file's duration).
        samples_per_epoch: random training crops per epoch.
        eval_crops: at most this many val/test crops (evenly spread; None = all).
    """

    input_files = {"files": AUDIO_SUFFIXES}

    def __init__(
        self,
        files: str | list[str],
        sample_rate: int | None = 16000,
        encoding: Literal["mu_law", "float"] = "mu_law",
        quantization_channels: int = 256,
        mono: bool = True,
        on_multichannel: Literal["mix", "error"] = "mix",
        on_rate_mismatch: Literal["resample", "error"] = "resample",
        crop: int = 4096,
        split_by: Literal["file", "time"] = "file",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        samples_per_epoch: int = 1024,
        eval_crops: int | None = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        problems = []
        if encoding not in ("mu_law", "float"):
            problems.append(f"encoding must be 'mu_law' or 'float', got {encoding!r}")
        if on_multichannel not in ("mix", "error"):
            problems.append(f"on_multichannel must be 'mix' or 'error', got {on_multichannel!r}")
        if on_rate_mismatch not in ("resample", "error"):
            problems.append(f"on_rate_mismatch must be 'resample' or 'error', got {on_rate_mismatch!r}")
        if split_by not in ("file", "time"):
            problems.append(f"split_by must be 'file' or 'time', got {split_by!r}")
        if encoding == "mu_law" and not mono:
            problems.append("encoding='mu_law' models one channel: set mono=True (or use encoding='float')")
        if not 2 <= quantization_channels <= 65536:
            problems.append(f"quantization_channels must be in 2..65536, got {quantization_channels}")
        if problems:
            raise ConfigError("WaveformDataModule: " + "; ".join(problems))
        if sample_rate is not None:
            check_positive("sample_rate", sample_rate)
        check_positive("crop", crop)
        check_positive("samples_per_epoch", samples_per_epoch)
        if eval_crops is not None:
            check_positive("eval_crops", eval_crops)
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters(logger=False)
        self.files = files
        self.sample_rate = sample_rate
        self.encoding = encoding
        self.quantization_channels = int(quantization_channels)
        self.mono = bool(mono)
        self.on_multichannel = on_multichannel
        self.on_rate_mismatch = on_rate_mismatch
        self.crop = int(crop)
        self.split_by = split_by
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.samples_per_epoch = int(samples_per_epoch)
        self.eval_crops = eval_crops
        self.paths: list[Path] = []
        self.audio: list[np.ndarray] = []
        self.channels = 1
        self.split_ranges: dict[str, list[tuple[int, int, int]]] = {}

    # ------------------------------------------------------------------ metadata
    def _ensure_loaded(self) -> None:
        if not self.audio:
            self._load()

    def model_io(self) -> dict[str, Any]:
        if self.encoding == "mu_law":
            q = self.quantization_channels
            return {"input_kind": "tokens", "vocab_size": q, "head": "lm", "output_dim": q}
        self._ensure_loaded()
        c = self.channels
        return {"input_kind": "continuous", "input_dim": c, "head": "regression", "output_dim": c}

    def serving_spec(self) -> ServingSpec:
        if self.sample_rate is None or self.encoding == "float":
            self._ensure_loaded()  # the rate / channel count come from the files
        return ServingSpec(
            modality="audio", encoding=self.encoding, sample_rate=int(self.sample_rate),  # type: ignore[arg-type]
            channels=self.channels, mono=self.mono, quantization_channels=self.quantization_channels,
            window=self.crop, options=(("crop", self.crop),),
        )

    # ------------------------------------------------------------------ loading
    def _decode(self, path: Path) -> np.ndarray:
        data, rate = read_audio(path)  # (frames, channels)
        if self.mono and data.shape[1] > 1:
            if self.on_multichannel == "error":
                raise DataFormatError(
                    f"audio file {str(path)!r} has {data.shape[1]} channels and the model is mono; mix it down "
                    f"yourself, set on_multichannel='mix', or use mono=False with encoding='float'"
                )
            self._mixed.append((path, data.shape[1]))
            data = data.mean(axis=1, keepdims=True)
        if self.sample_rate is None:
            self.sample_rate = rate
        if rate != self.sample_rate:
            if self.on_rate_mismatch == "error":
                raise DataFormatError(
                    f"audio file {str(path)!r} has sample rate {rate} Hz, expected {self.sample_rate} Hz "
                    f"(set on_rate_mismatch='resample' to convert it)"
                )
            wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (c, frames)
            data = AF.resample(wave, rate, int(self.sample_rate)).T.contiguous().numpy()
            self._resampled.append((path, rate))
        if self.encoding == "mu_law":
            tokens = mu_law_encode(torch.from_numpy(np.ascontiguousarray(data[:, 0])), self.quantization_channels)
            dtype = np.uint8 if self.quantization_channels <= 256 else np.int32
            return tokens.numpy().astype(dtype)  # (frames,)
        return np.ascontiguousarray(data, dtype=np.float32)  # (frames, c)

    def _load(self) -> None:
        self.paths = resolve_files(self.files, "files", AUDIO_SUFFIXES)
        self._mixed: list[tuple[Path, int]] = []
        self._resampled: list[tuple[Path, int]] = []
        audio = [self._decode(p) for p in self.paths]
        if self._resampled:  # one line for all of them (a folder of clips gave one line each)
            rates = ", ".join(f"{r} Hz" for r in sorted({r for _, r in self._resampled}))
            log.info("resampled %d audio file(s) from %s to %d Hz (first: %s)", len(self._resampled), rates,
                     self.sample_rate, self._resampled[0][0])
        if self._mixed:
            path, channels = self._mixed[0]
            log.warning("mixed %d multichannel audio file(s) down to mono (first: %s, %d channels); set "
                        "on_multichannel='error' to refuse them", len(self._mixed), path, channels)
        if self.encoding == "float":
            counts = {a.shape[1] for a in audio}
            if len(counts) > 1:
                detail = ", ".join(f"{p.name}: {a.shape[1]}" for p, a in zip(self.paths, audio, strict=True))
                raise DataFormatError(f"audio files have different channel counts ({detail}); set mono=True")
            self.channels = counts.pop()
        self.audio = audio

    def _split(self) -> dict[str, list[tuple[int, int, int]]]:
        """Per split, ``(file, start, end)`` sample ranges."""
        n = len(self.audio)
        out: dict[str, list[tuple[int, int, int]]] = {"train": [], "val": [], "test": []}
        if self.split_by == "time":
            for i, a in enumerate(self.audio):
                x, y = split_points(len(a), self.val_fraction, self.test_fraction)
                for split, lo, hi in (("train", 0, x), ("val", x, y), ("test", y, len(a))):
                    if hi > lo:
                        out[split].append((i, lo, hi))
            return out
        n_val = max(1, round(n * self.val_fraction)) if self.val_fraction > 0 else 0
        n_test = max(1, round(n * self.test_fraction)) if self.test_fraction > 0 else 0
        if n - n_val - n_test < 1:
            raise ConfigError(
                f"split_by='file': {n} file(s) cannot give {n_val} val + {n_test} test file(s) and keep one "
                f"for training; add files, lower the fractions or use split_by='time'"
            )
        order = np.random.default_rng([self.seed, 7]).permutation(n).tolist()
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            out[split].append((i, 0, len(self.audio[i])))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self._ensure_loaded()
        self.split_ranges = self._split()
        tokens = self.encoding == "mu_law"
        need = self.crop + 1
        try:
            self._datasets["train"] = CropDataset(
                self.audio, self.crop, tokens, ranges=self.split_ranges["train"],
                num_samples=self.samples_per_epoch, seed=self.seed,
            )  # fmt: skip
        except ConfigError:
            longest = max((hi - lo for _, lo, hi in self.split_ranges["train"]), default=0)
            raise ConfigError(
                f"crop={self.crop}: all training audio is shorter than crop + 1 samples (longest {longest}); "
                f"use a smaller crop"
            ) from None
        for split in ("val", "test"):
            spans = [(f, s) for f, lo, hi in self.split_ranges[split] for s in tile_starts(lo, hi, need, need)]
            spans = evenly_spaced(spans, self.eval_crops)
            if spans:
                self._datasets[split] = CropDataset(self.audio, self.crop, tokens, spans=spans)
            elif self.split_ranges[split]:
                longest = max(hi - lo for _, lo, hi in self.split_ranges[split])
                fraction = self.val_fraction if split == "val" else self.test_fraction
                self._split_unusable(split, span_too_short(split, longest, need, "samples", "crop", fraction))

    def train_dataloader(self):  # noqa: ANN201 - DataLoader
        self._dataset("train")
        return self._loader("train", sampler=EpochKeySampler(self.samples_per_epoch, self.seed))

    def predict_dataloader(self):  # noqa: ANN201 - DataLoader
        """The test crops when a test split exists, else the validation crops."""
        self._dataset("train")
        return self._loader("test" if "test" in self._datasets else "val")
