"""Datamodules for DNA (FASTA), waveform (audio files), sensor (CSV/Parquet) and zarr data.

Batches are dicts ``{"inputs", "targets"[, "mask"]}``; every datamodule exposes
``model_io()`` (the ModelConfig fields its data implies) and ``serving_metadata()`` (what
serving needs to encode raw input the same way, see ``encoding.encoder_from_metadata``).

The Lightning datamodules are imported lazily so that ``streamssm.datamodules.encoding``
(used by the service and zarr inference) does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "FastaDataModule": "streamssm.datamodules.fasta",
    "WaveformDataModule": "streamssm.datamodules.waveform",
    "SensorDataModule": "streamssm.datamodules.sensor",
    "ZarrDataModule": "streamssm.datamodules.zarr",
    "BaseDataModule": "streamssm.datamodules._common",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamssm.datamodules' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
