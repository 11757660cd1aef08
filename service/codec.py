"""Frames <-> model tensors for one loaded model, from its serving spec.

The model file's :class:`~streamssm.serving.ServingSpec` says what raw data the model was
trained on: ``dna`` models take text streams of bases, ``audio`` models f32le/s16le/mulaw8
samples (mu-law tokens or floats; any channel count mixed down by the mean when the model is
mono; any sample rate, resampled by the stream's :class:`~streamssm.service.resample.StreamResampler`
after the mix-down), ``sensor`` models f32le rows in raw units at their rate (normalized by
the spec's encoder). Forecasts go back to raw units through the spec's
output decoder (o = h * k outputs per step, de-normalized per horizon step and channel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamssm.checkpoint import ServingBundle
from streamssm.encoding import N_TOKEN
from streamssm.errors import ConfigError, DataFormatError, ProtocolError, ShapeError
from streamssm.serving import ServingSpec

from .protocol import (
    CODE_DTYPES,
    INVALID_DATA,
    NanPolicy,
    Start,
    StreamSpec,
    check_frame,
    decode_bases,
    decode_samples,
)
from .resample import StreamResampler


@dataclass
class ModelCodec:
    """What one checkpoint accepts (``spec``) and how frames become model chunks."""

    spec: StreamSpec
    head: str
    output_dim: int
    modality: str
    classes: list[str]
    _encode: Callable[..., torch.Tensor]
    _postprocess: Callable[[torch.Tensor], torch.Tensor]
    #: the input token whose scores the summary's average leaves out, as training did (a DNA model
    #: trained with mask_n: N), else None
    unscored_token: int | None = None
    #: format -> model input of every sample code (see _code_table)
    _code_tables: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_bundle(cls, bundle: ServingBundle) -> ModelCodec:
        serving = bundle.spec
        if serving is None:
            raise ConfigError(
                "the model file has no serving spec (what raw data it reads); train it with a streamssm "
                "task, or export it with export_safetensors(model, path, spec=ServingSpec(...))"
            )
        cfg = bundle.config
        serving = serving.for_model(cfg)  # load_for_serving did this too; a hand-built bundle may not have
        unscored = N_TOKEN if serving.modality == "dna" and serving.option("mask_n", False) else None
        return cls(stream_spec(serving), cfg.head, cfg.resolved_output_dim, serving.modality, list(serving.classes),
                   serving.encoder(), serving.output_decoder(), unscored)

    def downmix(self, start: Start) -> str | None:
        """How the stream's channels become the model's: ``"mean"`` (a mono model, more than one
        channel sent), else None."""
        return "mean" if self.spec.channels is None and self.modality == "audio" and start.channels > 1 else None

    def resampler(self, start: Start) -> StreamResampler | None:
        """A stream's resampler when its rate differs from the model's (after the mix-down), else None."""
        if start.format == "text" or not self.spec.resample or start.sample_rate in (None, self.spec.sample_rate):
            return None  # (a sensor model without a rate takes the client's as information)
        assert self.spec.sample_rate is not None and start.sample_rate is not None  # parse_start checked
        return StreamResampler(start.sample_rate, self.spec.sample_rate, 1 if self.downmix(start) else start.channels)

    def chunk_from_frame(self, frame: str | bytes, start: Start, nan_policy: NanPolicy,
                         resampler: StreamResampler | None = None) -> torch.Tensor | None:
        """A data frame -> model input: tokens (l,) long or values (l, c) float32; None when the
        stream's ``resampler`` holds back all of the frame's samples (they come with a later one).

        Raises ProtocolError (1003/1007) for frames that do not fit the stream."""
        if isinstance(frame, str):
            return self.encode(decode_bases(frame, self.spec.alphabet))
        if self.modality == "audio" and start.format in CODE_DTYPES and start.channels == 1 and resampler is None:
            check_frame(frame, start)  # one lookup per sample: the event loop's cheapest path
            return torch.from_numpy(self._code_table(start)[np.frombuffer(frame, CODE_DTYPES[start.format])])
        x = decode_samples(frame, start, nan_policy)  # (l, c) float32
        if self.downmix(start):
            x = torch.from_numpy(x).mean(dim=1, keepdim=True).numpy()  # (l, 1), as AudioEncoder mixes
        if resampler is not None:
            x = resampler(x)
            if not len(x):
                return None
        return self.encode(x)

    def _code_table(self, start: Start) -> np.ndarray:
        """The model input of every code of a mono s16le / mulaw8 sample, indexed by the code read
        as an unsigned integer: (65536,) / (256,) tokens, or (codes, 1) float values. Computed once
        per format by ``decode_samples`` + ``encode`` themselves, so a lookup equals them exactly
        (the audio encoder maps each mono sample on its own)."""
        table = self._code_tables.get(start.format)
        if table is None:
            dtype = CODE_DTYPES[start.format]
            codes = np.arange(1 << (8 * dtype.itemsize), dtype=np.int64).astype(dtype)
            table = self.encode(decode_samples(codes.tobytes(), start)).numpy()
            self._code_tables[start.format] = table
        return table

    def encode(self, raw: Any) -> torch.Tensor:
        """Bases (str) or samples (l, c) float32 at the model's rate -> model input."""
        try:
            return self._encode(raw)
        except (DataFormatError, ShapeError) as exc:
            raise ProtocolError(f"frame does not fit this model: {exc}", INVALID_DATA, "bad_samples") from None

    def postprocess(self, outputs: torch.Tensor) -> np.ndarray:
        """Model outputs (l, o) -> float32 numpy in the units the client sees."""
        return self._postprocess(outputs).to(torch.float32).numpy()


def stream_spec(serving: ServingSpec) -> StreamSpec:
    """What a stream to a model with this serving spec may send (formats, rate, channels, bases)."""
    audio = serving.modality == "audio"  # audio also takes G.711 mu-law bytes, and any rate (resampled)
    return StreamSpec(formats=serving.stream_formats + (("mulaw8",) if audio else ()), sample_rate=serving.sample_rate,
                      channels=serving.stream_channels, alphabet=serving.accepted_bases, resample=audio)
