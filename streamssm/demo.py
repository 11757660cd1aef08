"""``streamssm demo``: the whole mission on built-in data, in a few minutes on a laptop CPU.

For each task (sensor forecasting, DNA language model, 8-bit mu-law audio language model):

1. generate a small dataset (``streamssm.datamodules.synthetic``) and train a tiny Mamba-2
   model on it with Lightning (progress bar, CSV metrics) -> ``model.ckpt``;
2. start the websocket service on a free loopback port and stream a held-out signal through
   it in small chunks with the Python client;
3. check the streamed outputs against one offline forward pass over the whole signal
   (prints the max difference; a mismatch fails the demo);
4. run zarr batch inference over the same signal and check it against the offline pass too;
5. save plots (training curve; the streamed signal with the model's per-step forecast or
   surprisal) and print a summary table, including how the model compares to a no-model
   baseline on the held-out signal.

Each stage prints one line (``task 2 of 3 (dna): training 300 steps · 41 s elapsed``), so a
slow or shared machine shows where the demo is. This module is the pipeline (library code);
the command's options and printing are in ``streamssm.commands.demo``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssm.errors import ConfigError, StreamSSMError

TASK_NAMES = ("sensor", "dna", "audio")
AUDIO_RATE = 8000


class DemoParityError(StreamSSMError, AssertionError):
    """Streamed or zarr outputs differ from the offline forward beyond tolerance."""


@dataclass(frozen=True)
class Size:
    """How much work one demo task does (``--quick`` for CI)."""

    train_steps: int
    held_out: int  # samples streamed and written to zarr
    chunk: int  # samples per websocket frame
    data_scale: int  # multiplies the generated dataset sizes


FULL = Size(train_steps=300, held_out=3000, chunk=100, data_scale=4)
QUICK = Size(train_steps=20, held_out=400, chunk=50, data_scale=1)
#: every demo task's architecture (``streamssm.models.ArchConfig`` fields) and optimizer settings
ARCH = dict(block="mamba2", d_model=48, n_layers=2, d_state=16, headdim=16, chunk_size=64)
OPTIMIZER = dict(lr=3e-3, warmup_steps=10, weight_decay=0.01)


@dataclass
class Prepared:
    """A task's training data, its task module and a held-out raw signal to stream."""

    datamodule: Any
    module: Any
    held_out: np.ndarray | str  # (t, c) float32 raw values, (t,) audio samples, or a str of bases
    stream_format: str
    zarr_input: np.ndarray  # what the zarr input array holds: (t, c) float32 or (t,) token ids


def _prepare(name: str, data_dir: Path, size: Size) -> Prepared:
    from streamssm.datamodules import FastaDataModule, SensorDataModule, WaveformDataModule
    from streamssm.datamodules import synthetic
    from streamssm.encoding import encode_bases
    from streamssm.models import ArchConfig
    from streamssm.tasks import Forecaster, TokenLM

    steps = size.train_steps
    task_args = dict(arch=ArchConfig(**ARCH), max_steps=steps, **OPTIMIZER)
    if name == "sensor":
        table = synthetic.write_sensor_table(data_dir / "sensors.csv", rows=1500 * size.data_scale, channels=3)
        dm = SensorDataModule(str(table), time_column="timestamp", window=128, stride=32, batch_size=16)
        held = synthetic.make_held_out_signal("sensor", size.held_out, seed=1, channels=3).astype(np.float32)
        return Prepared(dm, Forecaster(**task_args), held, "f32le", held)
    if name == "dna":
        fasta = synthetic.write_fasta(data_dir / "genome.fa", n_chrom=3, length=4000 * size.data_scale)
        dm = FastaDataModule(str(fasta), window=256, val_chroms=["chr3"], samples_per_epoch=16 * steps,
                             eval_windows=16, batch_size=16)
        held = synthetic.make_held_out_signal("dna", size.held_out, seed=1)
        return Prepared(dm, TokenLM(**task_args), held, "text", encode_bases(held).numpy())
    if name == "audio":
        folder = data_dir / "wav"
        synthetic.write_wav_folder(folder, n_files=2 + 2 * size.data_scale, seconds=1.0, sample_rate=AUDIO_RATE)
        dm = WaveformDataModule(str(folder), sample_rate=AUDIO_RATE, encoding="mu_law", crop=512,
                                samples_per_epoch=16 * steps, eval_crops=16, batch_size=16)
        held = synthetic.make_held_out_signal("audio", size.held_out, seed=1, sample_rate=AUDIO_RATE)
        held = np.asarray(held, np.float32)
        return Prepared(dm, TokenLM(**task_args), held, "f32le", held[:, None])
    raise ConfigError(f"unknown demo task {name!r}; choose from {TASK_NAMES}")


# ------------------------------------------------------------------------------------ steps


def train(prepared: Prepared, out_dir: Path, size: Size, accelerator: str) -> tuple[Path, Path]:
    """Fit the task; returns (checkpoint path, CSV metrics path)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(out_dir), name="logs", version="")
    trainer = pl.Trainer(
        max_steps=size.train_steps, accelerator=accelerator, devices=1, logger=logger,
        enable_checkpointing=False, log_every_n_steps=max(1, size.train_steps // 30),
        val_check_interval=None, check_val_every_n_epoch=1, limit_val_batches=4, num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    trainer.fit(prepared.module, datamodule=prepared.datamodule)
    ckpt = out_dir / "model.ckpt"
    trainer.save_checkpoint(str(ckpt))
    return ckpt, Path(logger.log_dir) / "metrics.csv"


async def _stream(bundle, held: np.ndarray | str, fmt: str, chunk: int, on_chunk: Callable[[], None]):
    from streamssm.service.client import StreamClient
    from streamssm.service.server import ServeConfig, StreamServer

    async with StreamServer(bundle, ServeConfig(host="127.0.0.1", port=0, max_streams=4)) as server:
        rate = bundle.spec.sample_rate if fmt != "text" else None
        channels = 1 if isinstance(held, str) or np.ndim(held) == 1 else int(np.shape(held)[1])
        async with StreamClient(server.url, format=fmt, sample_rate=rate, channels=channels) as client:
            for start in range(0, len(held), chunk):
                await client.send(held[start:start + chunk])
                on_chunk()
            summary = await client.end()
            return client.outputs(), client.scores(), summary, client.latencies


def offline(bundle, prepared: Prepared) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
    """One parallel forward over the whole held-out signal.

    Returns raw model outputs (t, o), the outputs in the units the service sends, and (token
    models) log p(x_t | x_<t) per step as the service scores them."""
    from streamssm.inference import head_output
    from streamssm.service.codec import ModelCodec

    x = bundle.spec.encoder()(prepared.held_out)
    with torch.no_grad():
        raw = bundle.model(x[None])[0][0].float()  # (t, o)
    sent = head_output(bundle.config.head, raw)
    scores = None
    if bundle.config.head == "lm":
        prior = torch.full((1, sent.shape[1]), -math.log(sent.shape[1]))
        scores = torch.cat([prior, sent[:-1]]).gather(1, x.long()[:, None])[:, 0].numpy()
    return raw, ModelCodec.from_bundle(bundle).postprocess(sent), scores


def max_difference(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Max |expected - actual|; raises DemoParityError beyond ``atol + rtol * |expected|``."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    if expected.shape != actual.shape:
        raise DemoParityError(f"{name}: shapes differ, offline {expected.shape} vs {actual.shape}")
    diff = np.abs(expected - actual)
    if not np.all(diff <= atol + rtol * np.abs(expected)):
        raise DemoParityError(f"{name}: max difference {diff.max():.3g} exceeds tolerance (rtol {rtol}, atol {atol})")
    return float(diff.max())


def zarr_inference(ckpt: Path, data: np.ndarray, out_dir: Path, chunk_steps: int) -> np.ndarray:
    """Write ``data`` as a zarr v3 array chunked in time, run ``streamssm infer`` on it, read back."""
    import zarr

    from streamssm.zarr_infer import run_inference

    src = out_dir / "held_out.zarr"
    arr = zarr.create_array(str(src), shape=data.shape, dtype=data.dtype, overwrite=True,
                            chunks=(chunk_steps, *data.shape[1:]))
    arr[...] = data
    result = run_inference(ckpt, src, out_dir / "outputs.zarr", chunk_steps=chunk_steps, overwrite=True,
                           accelerator="cpu", num_workers=0)
    group = zarr.open_group(str(result.output), mode="r")
    return np.asarray(group[result.arrays[0]][...])


def baseline(name: str, prepared: Prepared, streamed: np.ndarray | None, scores: np.ndarray | None,
             vocab: int) -> tuple[str, float, float]:
    """(metric, model, no-model baseline) on the held-out signal."""
    if name == "sensor":
        signal = prepared.held_out
        model_mse = float(np.mean((streamed[:-1] - signal[1:]) ** 2))
        persistence = float(np.mean((signal[:-1] - signal[1:]) ** 2))  # "next = current"
        return "next-step MSE (vs persistence)", model_mse, persistence
    bits = float(-np.mean(scores) / math.log(2))
    return "bits per step (vs uniform)", bits, math.log2(vocab)


def plots(name: str, prepared: Prepared, streamed: np.ndarray, scores: np.ndarray | None, metrics_csv: Path,
          out_dir: Path) -> list[Path]:
    from streamssm.plots import plot_training_curve
    from streamssm.stream_plots import plot_forecast, plot_surprisal

    task = type(prepared.module).__name__
    pngs = [plot_training_curve(metrics_csv, out_dir / "training_curve.png", title=f"demo {name} · {task}: training")]
    if name == "sensor":
        pngs.append(plot_forecast(prepared.held_out, streamed, out_dir / "stream.png",
                                  title="sensor: held-out signal and the forecast streamed over the websocket"))
    else:
        audio = name == "audio"
        pngs.append(plot_surprisal(-scores / math.log(2), out_dir / "stream.png", signal=prepared.held_out if audio else None,
                                   uniform_bits=math.log2(streamed.shape[1]),
                                   sample_rate=AUDIO_RATE if audio else None, step_unit="sample" if audio else "base",
                                   title=f"{name}: surprisal of the held-out stream, as streamed"))
    return pngs


def run_task(name: str, out_root: Path, size: Size, accelerator: str, progress,
             on_stage: Callable[[str], None] = lambda stage: None) -> dict[str, Any]:
    """The five demo steps for one task; returns its summary row. ``on_stage(description)`` is
    called as each stage starts (the CLI prints it)."""
    from streamssm.checkpoint import load_for_serving

    import lightning.pytorch as pl

    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    on_stage("generating data")
    prepared = _prepare(name, out_dir / "data", size)
    on_stage(f"training {size.train_steps} steps")
    ckpt, metrics_csv = train(prepared, out_dir, size, accelerator)
    bundle = load_for_serving(ckpt, "cpu")

    n_chunks = math.ceil(len(prepared.held_out) / size.chunk)
    on_stage(f"streaming {n_chunks} chunks through the websocket service")
    bar = progress.add_task(f"{name}: streaming {n_chunks} chunks", total=n_chunks)
    streamed, scores, summary, latencies = asyncio.run(
        _stream(bundle, prepared.held_out, prepared.stream_format, size.chunk, lambda: progress.advance(bar)))
    raw, sent, offline_scores = offline(bundle, prepared)
    diff = max_difference(f"{name} streamed outputs", sent, streamed)
    if offline_scores is not None:
        diff = max(diff, max_difference(f"{name} streamed scores", offline_scores, scores))
    on_stage("zarr batch inference")
    zarr_out = zarr_inference(ckpt, prepared.zarr_input, out_dir, chunk_steps=max(64, size.held_out // 4))
    # infer writes logits, forecasts in the data's units (the spec's output decoder)
    zarr_diff = max_difference(f"{name} zarr outputs", bundle.spec.output_decoder()(raw).numpy(), zarr_out)
    metric, model_value, base_value = baseline(name, prepared, streamed, scores, bundle.config.resolved_output_dim)
    on_stage("plots")
    pngs = plots(name, prepared, streamed, scores, metrics_csv, out_dir)
    return {
        "task": name, "checkpoint": ckpt, "metric": metric, "model": model_value, "baseline": base_value,
        "stream_diff": diff, "zarr_diff": zarr_diff, "chunks": n_chunks,
        "p50_ms": 1000 * float(np.median(latencies)) if latencies else float("nan"),
        "seconds": time.perf_counter() - started, "plots": pngs, "summary": summary,
    }
