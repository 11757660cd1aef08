"""Datamodules for DNA (FASTA), waveform (audio files), sensor (CSV/Parquet) and zarr data.

Batches are dicts ``{"inputs", "targets"[, "mask"]}``; every training datamodule exposes
``model_io()`` (the ModelConfig fields its data implies) and ``serving_spec()`` (the
:class:`streamssm.serving.ServingSpec` that lets serving encode raw input the same way).
The raw-data encodings themselves live in :mod:`streamssm.encoding` (no Lightning), so the
service and zarr inference never import this package.
"""

from streamssm.datamodules._common import BaseDataModule
from streamssm.datamodules.fasta import FastaDataModule
from streamssm.datamodules.sensor import SensorDataModule
from streamssm.datamodules.waveform import WaveformDataModule
from streamssm.datamodules.zarr import ZarrDataModule

__all__ = ["BaseDataModule", "FastaDataModule", "SensorDataModule", "WaveformDataModule", "ZarrDataModule"]
