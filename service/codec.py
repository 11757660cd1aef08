"""Frames <-> model tensors for one loaded model, from its serving spec.

The model file's :class:`~streamssm.serving.ServingSpec` says what raw data the model was
trained on: ``dna`` models take text streams of bases, ``audio`` models f32le/s16le samples at
their sample rate (mu-law tokens or floats), ``sensor`` models f32le rows in raw units
(normalized by the spec's encoder). Forecasts go back to raw units through the spec's
output decoder (o = h * k outputs per step, de-normalized per horizon step and channel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamssm.checkpoint import ServingBundle
from streamssm.errors import ConfigError, DataFormatError, ProtocolError, ShapeError
from streamssm.serving import ServingSpec

from .protocol import INVALID_DATA, NanPolicy, Start, StreamSpec, decode_bases, decode_samples


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
        return cls(stream_spec(serving), cfg.head, cfg.resolved_output_dim, serving.modality, list(serving.classes),
                   serving.encoder(), serving.output_decoder())

    def chunk_from_frame(self, frame: str | bytes, start: Start, nan_policy: NanPolicy) -> torch.Tensor:
        """A data frame -> model input: tokens (l,) long or values (l, c) float32.

        Raises ProtocolError (1003/1007) for frames that do not fit the stream."""
        if isinstance(frame, str):
            bases = decode_bases(frame, self.spec.alphabet)
            raw: Any = bases
        else:
            raw = decode_samples(frame, start, nan_policy)  # (l, c) float32
        try:
            return self._encode(raw)
        except (DataFormatError, ShapeError) as exc:
            raise ProtocolError(f"frame does not fit this model: {exc}", INVALID_DATA, "bad_samples") from None

    def postprocess(self, outputs: torch.Tensor) -> np.ndarray:
        """Model outputs (l, o) -> float32 numpy in the units the client sees."""
        return self._postprocess(outputs).to(torch.float32).numpy()


def stream_spec(serving: ServingSpec) -> StreamSpec:
    """What a stream to a model with this serving spec may send (formats, rate, channels, bases)."""
    return StreamSpec(formats=serving.stream_formats, sample_rate=serving.sample_rate,
                      channels=serving.stream_channels, alphabet=serving.accepted_bases)
