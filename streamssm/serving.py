"""The serving contract: what raw data a trained model takes and what its outputs mean.

A :class:`ServingSpec` is produced by the datamodule a model was trained with (its
``serving_spec()``, completed by the task's head and horizon), stored once in every model
file by :mod:`streamssm.checkpoint`, and consumed through its methods by the websocket
service, zarr batch inference, the demo and ``streamssm info``. Nothing else reads serving
fields by string key.

Shape legend: l time steps, c raw input channels, k forecast channels, h horizon,
o = model outputs per step.

- ``encoder()``: raw data -> model input. dna: str/bytes of bases -> LongTensor (l,);
  audio: samples (l,) | (l, c) float in [-1, 1] or int PCM -> LongTensor (l,) (mu-law) or
  FloatTensor (l, c); sensor: rows (l, c) in raw units -> normalized FloatTensor (l, c).
- ``output_decoder()``: model outputs (l, o) -> the units a user sees: forecasts in raw
  units (o = h * k, de-normalized per forecast channel), everything else unchanged
  (log-probabilities, class probabilities).
- ``stream_formats`` / ``stream_channels`` / ``accepted_bases``: what a stream may send.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from streamssm.encoding import (
    DNA_ALPHABET,
    DNA_VOCAB_SIZE,
    IUPAC_AMBIGUOUS,
    AudioEncoder,
    DnaEncoder,
    Normalizer,
    SensorEncoder,
    SensorIntegers,
)
from streamssm.errors import ConfigError
from streamssm.models import ModelConfig

__all__ = ["ServingSpec", "SPEC_VERSION"]

Modality = Literal["dna", "audio", "sensor"]
Encoding = Literal["bases", "mu_law", "float"]
Head = Literal["lm", "regression", "classifier"]

#: version of the dict layout written by :meth:`ServingSpec.to_dict` (legacy dicts have none).
SPEC_VERSION = 2
_ENCODINGS: dict[str, tuple[str, ...]] = {"dna": ("bases",), "audio": ("mu_law", "float"), "sensor": ("float",)}


@dataclass(frozen=True)
class ServingSpec:
    """The typed contract between training and serving (see module docstring).

    Attributes:
        modality: ``dna`` | ``audio`` | ``sensor``.
        encoding: ``bases`` (dna), ``mu_law`` or ``float`` (audio), ``float`` (sensor).
        head: the head the task trained (``lm`` | ``regression`` | ``classifier``), None if unknown.
        task: the training task's class name (``TokenLM``, ``Forecaster``, ...), None if unknown.
        sample_rate: samples per second (audio; sensors when the data had one).
        channels: raw input channels the model reads (before any mono mix-down).
        channel_names: sensor column names, one per channel (empty for other modalities).
        mono: audio only: any channel count is mixed down to one channel.
        alphabet: dna token alphabet, token i is ``alphabet[i]``.
        ambiguous_as_n: dna: IUPAC ambiguity codes are read as N (else refused).
        quantization_channels: mu-law levels (the LM's vocabulary).
        mean, std: sensor normalization statistics per channel (training split).
        targets: forecast channels, a subset of ``channel_names`` (empty: all channels).
        classes: class names of a classifier, index = class id.
        horizon: future steps each forecast position predicts.
        window: the training window in steps (informative).
        options: other data options recorded for the model card (crop, time column, ...).
    """

    modality: Modality
    encoding: Encoding
    head: Head | None = None
    task: str | None = None
    sample_rate: int | None = None
    channels: int = 1
    channel_names: tuple[str, ...] = ()
    mono: bool = True
    alphabet: str = DNA_ALPHABET
    ambiguous_as_n: bool = True
    quantization_channels: int = 256
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    targets: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    horizon: int = 1
    window: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("serving spec: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p: list[str] = []
        if self.modality not in _ENCODINGS:
            return [f"modality must be one of {sorted(_ENCODINGS)}, got {self.modality!r}"]
        if self.encoding not in _ENCODINGS[self.modality]:
            p.append(f"{self.modality} takes encoding {' or '.join(_ENCODINGS[self.modality])}, got {self.encoding!r}")
        if self.head not in (None, "lm", "regression", "classifier"):
            p.append(f"head must be lm, regression or classifier, got {self.head!r}")
        if self.sample_rate is not None and (isinstance(self.sample_rate, bool) or self.sample_rate <= 0):
            p.append(f"sample_rate must be a positive integer, got {self.sample_rate!r}")
        if self.modality == "audio" and self.sample_rate is None:
            p.append("audio needs a sample_rate")
        if not 1 <= self.channels <= 65536:
            p.append(f"channels must be in 1..65536, got {self.channels}")
        if self.modality == "sensor":
            if len(self.channel_names) != self.channels:
                p.append(f"{self.channels} channels but {len(self.channel_names)} channel names")
            if not (len(self.mean) == len(self.std) == self.channels):
                p.append(f"{self.channels} channels but {len(self.mean)} means and {len(self.std)} stds")
            unknown = [t for t in self.targets if t not in self.channel_names]
            if unknown:
                p.append(f"targets {unknown} are not among the channels {list(self.channel_names)}")
        if self.modality == "dna" and self.alphabet != DNA_ALPHABET:
            p.append(f"alphabet {self.alphabet!r} is not supported (the DNA encoder reads {DNA_ALPHABET!r})")
        if self.encoding == "mu_law" and not 2 <= self.quantization_channels <= 65536:
            p.append(f"quantization_channels must be in 2..65536, got {self.quantization_channels}")
        if self.horizon < 1:
            p.append(f"horizon must be >= 1, got {self.horizon}")
        if self.head == "classifier" and not self.classes and self.modality == "sensor":
            p.append("a sensor classifier needs its class names")
        return p

    # ------------------------------------------------------------------ derived facts
    @property
    def stream_formats(self) -> tuple[str, ...]:
        """Stream formats a client may send (protocol ``format`` values)."""
        return {"dna": ("text",), "audio": ("f32le", "s16le"), "sensor": ("f32le",)}[self.modality]

    @property
    def stream_channels(self) -> int | None:
        """Interleaved channels a stream must carry; None: any (mixed down to mono)."""
        if self.modality == "dna":
            return 1
        return None if self.modality == "audio" and self.mono else self.channels

    def stream_start(self) -> dict[str, Any]:
        """The ``start`` settings a client sends: ``format``, ``sample_rate``, ``channels``
        (mono audio: 1 channel; the server mixes down more)."""
        return {"format": self.stream_formats[0], "sample_rate": self.sample_rate, "channels": self.stream_channels or 1}

    @property
    def accepted_bases(self) -> str:
        """Upper-case letters a dna stream may contain (lower case is accepted too)."""
        return self.alphabet + (IUPAC_AMBIGUOUS if self.ambiguous_as_n else "")

    @property
    def forecast_channels(self) -> tuple[str, ...]:
        """Channels a regression head forecasts, in output order (k names)."""
        return self.targets or self.channel_names

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def with_task(self, *, task: str, head: Head, horizon: int = 1, **options: Any) -> ServingSpec:
        """This spec completed by the training task: its class name, head, horizon and task
        options for the model card (e.g. a classifier's ``pool``)."""
        merged = tuple(sorted({**dict(self.options), **options}.items()))
        return dataclasses.replace(self, task=task, head=head, horizon=int(horizon), options=merged)

    def for_model(self, cfg: ModelConfig) -> ServingSpec:
        """This spec checked against a model (:meth:`check_model`), its head filled in from the
        model when the spec does not name one (files written without a task)."""
        self.check_model(cfg)
        return self if self.head is not None else dataclasses.replace(self, head=cfg.head)

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when a model's inputs/outputs disagree with this spec (the encoder's
        tokens or channels, the head, the class count, horizon x forecast channels)."""
        p: list[str] = []
        if self.encoding in ("bases", "mu_law"):
            vocab = DNA_VOCAB_SIZE if self.modality == "dna" else self.quantization_channels
            if cfg.input_kind != "tokens" or cfg.vocab_size != vocab:
                p.append(f"the encoder gives tokens 0..{vocab - 1} but the model reads {cfg.input_kind} input "
                         f"(vocab_size {cfg.vocab_size})")
        else:
            channels = 1 if self.modality == "audio" and self.mono else self.channels
            if cfg.input_kind != "continuous" or cfg.input_dim != channels:
                p.append(f"the encoder gives {channels} channel(s) per step but the model reads {cfg.input_kind} "
                         f"input (input_dim {cfg.input_dim})")
        if self.head is not None and self.head != cfg.head:
            p.append(f"the spec is for a {self.head} head, the model has a {cfg.head} head")
        o = cfg.resolved_output_dim
        if cfg.head == "classifier" and self.classes and o != len(self.classes):
            p.append(f"{len(self.classes)} class names but {o} classifier outputs")
        if cfg.head == "regression" and self.modality != "dna" and self.encoding != "mu_law":
            k = len(self.forecast_channels) if self.modality == "sensor" else cfg.input_dim
            if o != self.horizon * k:
                p.append(f"the model gives {o} outputs per step, but horizon {self.horizon} x {k} forecast "
                         f"channel(s) = {self.horizon * k}")
        if p:
            raise ConfigError("the model does not fit its serving spec: " + "; ".join(p))

    # ------------------------------------------------------------------ conversions
    def encoder(self, sensor_integers: SensorIntegers = "error") -> Callable[..., torch.Tensor]:
        """Raw data -> model input (module docstring); raises DataFormatError/ShapeError.
        ``sensor_integers``: how a sensor model reads integer samples (``SensorEncoder``)."""
        if self.modality == "dna":
            return DnaEncoder(ambiguous_as_n=self.ambiguous_as_n)
        if self.modality == "audio":
            return AudioEncoder(self.sample_rate, self.encoding, self.channels, self.quantization_channels, self.mono)
        return SensorEncoder(Normalizer(self.mean, self.std), self.channel_names, sensor_integers)

    def output_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Model outputs (..., o) -> user units (..., o): forecasts de-normalized per channel
        and horizon step (o = h * k); other heads' outputs are returned unchanged."""
        if self.head != "regression" or self.modality != "sensor":  # float audio is modeled in raw units
            return lambda outputs: outputs
        idx = [self.channel_names.index(name) for name in self.forecast_channels]
        norm = Normalizer([self.mean[i] for i in idx], [self.std[i] for i in idx])
        k, h = len(idx), self.horizon

        def decode(outputs: torch.Tensor) -> torch.Tensor:
            per_step = outputs.reshape(*outputs.shape[:-1], h, k)  # (..., h, k)
            return norm.invert(per_step).reshape(outputs.shape)

        return decode

    def output_names(self) -> list[str]:
        """One name per output column (o): tokens, classes or ``channel@t+j`` forecasts."""
        if self.head == "classifier":
            return list(self.classes)
        if self.head == "lm":
            return list(self.alphabet) if self.modality == "dna" else [str(i) for i in range(self.quantization_channels)]
        names = self.forecast_channels or tuple(f"ch{i}" for i in range(self.channels))
        return [f"{n}@t+{j + 1}" for j in range(self.horizon) for n in names]

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``spec_version`` 2); :meth:`from_dict` reads it back."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["options"] = dict(self.options)
        d["spec_version"] = SPEC_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> ServingSpec:
        """Read :meth:`to_dict` output, or the untyped metadata dict of checkpoints written
        before 2026-12-04 (flat keys plus ``task: {name, head, horizon}``)."""
        if not isinstance(meta, Mapping) or "modality" not in meta:
            raise ConfigError(
                "the model file has no serving spec (a mapping with 'modality' dna|audio|sensor); train it "
                "with a streamssm task or export it with export_safetensors(model, path, spec=ServingSpec(...))"
            )
        if meta.get("spec_version") == SPEC_VERSION:
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(meta) - fields - {"spec_version"})
            if unknown:
                raise ConfigError(f"serving spec: unknown fields {unknown} (written by a newer streamssm?)")
            d = {k: v for k, v in meta.items() if k in fields}
            for key in ("channel_names", "mean", "std", "targets", "classes"):
                d[key] = tuple(d.get(key, ()))
            d["options"] = tuple(sorted(dict(d.get("options", {})).items()))
            return cls(**d)
        return cls._from_legacy(meta)

    @classmethod
    def _from_legacy(cls, meta: Mapping[str, Any]) -> ServingSpec:
        task = meta.get("task") if isinstance(meta.get("task"), Mapping) else {}
        modality = meta["modality"]
        common = {
            "modality": modality, "task": task.get("name"), "head": task.get("head"),
            "horizon": int(task.get("horizon", 1)), "window": meta.get("window"),
        }
        if modality == "dna":
            return cls(encoding="bases", alphabet=meta.get("alphabet", DNA_ALPHABET),
                       options=_options(meta, "mask_n"), **common)
        if modality == "audio":
            if "sample_rate" not in meta or "encoding" not in meta:
                raise ConfigError("audio serving metadata lacks 'sample_rate' or 'encoding'")
            return cls(encoding=meta["encoding"], sample_rate=int(meta["sample_rate"]),
                       channels=int(meta.get("channels", 1)), mono=bool(meta.get("mono", True)),
                       quantization_channels=int(meta.get("quantization_channels", 256)),
                       options=_options(meta, "crop"), **common)
        if modality == "sensor":
            missing = [k for k in ("channels", "mean", "std") if k not in meta]
            if missing:
                raise ConfigError(f"sensor serving metadata lacks {missing}")
            names = tuple(str(c) for c in meta["channels"])
            rate = meta.get("sample_rate")
            head = common.pop("head") or ("classifier" if meta.get("classes") else None)
            return cls(encoding="float", channels=len(names), channel_names=names,
                       sample_rate=None if rate is None else int(rate),
                       mean=tuple(float(v) for v in meta["mean"]), std=tuple(float(v) for v in meta["std"]),
                       targets=tuple(meta.get("targets") or ()), classes=tuple(str(c) for c in meta.get("classes", ())),
                       head=head, options=_options(meta, "time_column"), **common)
        raise ConfigError(f"serving metadata: unknown modality {modality!r} (expected 'dna', 'audio' or 'sensor')")


def _options(meta: Mapping[str, Any], *names: str) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((n, meta[n]) for n in names if meta.get(n) is not None))
