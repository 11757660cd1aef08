"""Frames <-> model tensors for one loaded checkpoint, from its serving metadata.

The checkpoint's serving metadata (``ServingBundle.serving``) says what raw data the model was
trained on (``streamssm.encoding``): ``dna`` models take text streams of bases,
``audio`` models f32le/s16le samples at their sample rate (mu-law tokens or floats), ``sensor``
models f32le rows in raw units (normalized here). Regression outputs go back to raw units: a
forecaster's o = h * k outputs per step are read as h horizon steps of k forecast channels, each
de-normalized per channel (float audio is modeled in raw units and passes unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamssm.checkpoint import ServingBundle
from streamssm.encoding import DNA_VOCAB_SIZE, decoder_from_metadata, encoder_from_metadata
from streamssm.errors import ConfigError, DataFormatError, ProtocolError, ShapeError
from streamssm.models import ModelConfig

from .protocol import INVALID_DATA, IUPAC_ALPHABET, NanPolicy, Start, StreamSpec, decode_bases, decode_samples


@dataclass
class ModelCodec:
    """What one checkpoint accepts (``spec``) and how frames become model chunks."""

    spec: StreamSpec
    head: str
    output_dim: int
    modality: str
    classes: list[str]
    _encode: Callable[..., torch.Tensor]
    _postprocess: Callable[[torch.Tensor], torch.Tensor] | None

    @classmethod
    def from_bundle(cls, bundle: ServingBundle) -> ModelCodec:
        meta: dict[str, Any] = dict(bundle.serving or {})
        cfg = bundle.config
        if "modality" not in meta:
            raise ConfigError(
                "checkpoint has no serving metadata ('modality' dna|audio|sensor); export it with "
                "export_safetensors(model, path, serving={...}) or train it with a streamssm task"
            )
        encode = encoder_from_metadata(meta)
        modality = meta["modality"]
        spec = stream_spec(meta)
        _check_model_fits(cfg, meta)
        post = None
        if cfg.head == "regression" and (modality == "sensor" or meta.get("encoding") == "float"):
            post = _forecast_decoder(meta, cfg.resolved_output_dim)
        return cls(spec, cfg.head, cfg.resolved_output_dim, modality, [str(c) for c in meta.get("classes", [])],
                   encode, post)

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
        if self._postprocess is not None:
            outputs = self._postprocess(outputs)
        return outputs.to(torch.float32).numpy()


def stream_spec(meta: Mapping[str, Any]) -> StreamSpec:
    """What a stream to a model with serving metadata ``meta`` may send (formats, rate, channels)."""
    modality = meta.get("modality")
    if modality == "dna":
        return StreamSpec(formats=("text",), alphabet=IUPAC_ALPHABET)
    if modality == "audio":
        mono = bool(meta.get("mono", True))
        return StreamSpec(formats=("f32le", "s16le"), sample_rate=int(meta["sample_rate"]),
                          channels=None if mono else int(meta.get("channels", 1)))
    if modality == "sensor":
        rate = meta.get("sample_rate")
        return StreamSpec(formats=("f32le",), sample_rate=None if rate is None else int(rate),
                          channels=len(meta["channels"]))
    raise ConfigError(f"serving metadata: unknown modality {modality!r} (expected 'dna', 'audio' or 'sensor')")


def stream_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``start`` settings a client sends to this model: ``format``, ``sample_rate``, ``channels``
    (mono audio: 1 channel; the server also mixes down more)."""
    spec = stream_spec(meta)
    return {"format": spec.formats[0], "sample_rate": spec.sample_rate, "channels": spec.channels or 1}


def _check_model_fits(cfg: ModelConfig, meta: Mapping[str, Any]) -> None:
    """Raise ConfigError at load time when the model's inputs/outputs disagree with its serving
    metadata (the encoder's tokens or channels, the classes), instead of failing every chunk."""
    modality, problems = meta["modality"], []
    if modality == "dna" or meta.get("encoding") == "mu_law":
        vocab = DNA_VOCAB_SIZE if modality == "dna" else int(meta.get("quantization_channels", 256))
        if cfg.input_kind != "tokens" or cfg.vocab_size != vocab:
            problems.append(f"the encoder gives tokens 0..{vocab - 1} but the model reads "
                            f"{cfg.input_kind} input (vocab_size {cfg.vocab_size})")
    else:
        channels = len(meta["channels"]) if modality == "sensor" else int(meta.get("channels", 1))
        if cfg.input_kind != "continuous" or cfg.input_dim != channels:
            problems.append(f"the encoder gives {channels} channel(s) per step but the model reads "
                            f"{cfg.input_kind} input (input_dim {cfg.input_dim})")
    classes = meta.get("classes") or []
    if cfg.head == "classifier" and classes and cfg.resolved_output_dim != len(classes):
        problems.append(f"{len(classes)} class names but {cfg.resolved_output_dim} classifier outputs")
    if problems:
        raise ConfigError("the model does not fit its serving metadata: " + "; ".join(problems))


def _forecast_decoder(meta: Mapping[str, Any], output_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Regression outputs (..., o) -> raw units (..., o), o = horizon h x forecast channels k.

    Raises ConfigError at load time when o does not split into the metadata's h x k."""
    task = meta.get("task") if isinstance(meta.get("task"), Mapping) else {}
    horizon = int(task.get("horizon", 1))
    if meta["modality"] == "sensor":
        k = len(meta.get("targets") or meta["channels"])
    else:  # float audio: one forecast per modeled channel
        k = int(meta.get("channels", 1))
    if output_dim != horizon * k:
        raise ConfigError(
            f"serving metadata: the model gives {output_dim} outputs per step, but horizon {horizon} x "
            f"{k} forecast channel(s) = {horizon * k}"
        )
    invert = decoder_from_metadata(meta)  # (..., k) -> (..., k)

    def decode(outputs: torch.Tensor) -> torch.Tensor:
        per_step = outputs.reshape(*outputs.shape[:-1], horizon, k)  # (..., h, k)
        return invert(per_step).reshape(outputs.shape)

    return decode
