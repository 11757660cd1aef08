"""Batch inference over zarr v3 arrays: chunked in time with carried state, resumable,
distributed over devices with Lightning ``Trainer.predict`` (DESIGN §6).

Shape legend: s series, t time steps, c channels, o model outputs per step, b series in one
group (``batch_series``), l steps in one chunk (``chunk_steps``).

Data flow per rank::

    ZarrDataModule (datamodules/zarr.py): this rank's units -> (array, group, chunk) items,
        read chunk-aligned and encoded in a DataLoader worker (reads overlap compute)
    ZarrPredictor.predict_step: y, state = model(x (b, l[, c]), state of the previous chunk)
    ZarrPredictionWriter (a BasePredictionWriter): in a background thread, writes y into the
        output array, then saves the unit's resume record (state + next chunk) atomically

Output: a zarr group with one float32 array per input array, ``(s, t, o)`` (or ``(t, o)`` for an
input without a series axis), chunks ``(1, input time chunk, o)``, zstd, NaN fill; its attributes
``streamssm`` record the model fingerprint, config, serving spec, input and run settings,
``streamssm_complete`` is set once every unit is done.

Resume: a unit's record ``<output>/<array>/streamssm_resume/group-<g>.safetensors`` holds the
state after its last finished chunk and (metadata) the index of the next chunk. It is written
with an atomic rename only after that chunk's data is fully written, so a killed job restarted
with the same command recomputes at most the chunks after the last record, from the same state,
and writes the same bytes. The final record keeps each series' final state. Every series lives
in its own output chunks and every unit on one rank, so ranks never write the same chunk; the
computation of a unit does not depend on the rank or the number of devices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import zarr
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from zarr.codecs import ZstdCodec

from streamssm.checkpoint import ServingBundle, load_for_serving
from streamssm.encoding import PCM_DTYPES, SensorIntegers
from streamssm.datamodules.zarr import InputArray, MissingChunks, Unit, ZarrDataModule, open_inputs
from streamssm.errors import ConfigError, DataFormatError, ShapeError, StateError
from streamssm.lightning_ui import quiet_lightning
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec
from streamssm.state import LayerState, ModelState, read_state_metadata, state_from_bytes, state_to_bytes

log = logging.getLogger(__name__)

FORMAT = "streamssm-infer-1"
RESUME_DIR = "streamssm_resume"
ROOT_MARK = "streamssm_output"  # root group attribute: this folder was written by streamssm infer
DEFAULT_CHUNK_STEPS = 65536


# ------------------------------------------------------------------------------- raw -> model


class BatchEncoder:
    """Raw samples ``(b, l, c)`` (or token ids ``(b, l)``) -> model input for a checkpoint.

    With a serving spec the training encoding is applied row by row (``ServingSpec.encoder``;
    DNA arrays hold token ids 0..4 already); without, continuous
    models take the values as float32 and token models the integers as ids. Integer arrays
    into a sensor model are refused unless ``integer_input`` says how to read them ("values":
    raw units; "pcm": scaled to [-1, 1]); integer audio is PCM (divided by the dtype's full scale,
    as soundfile reads it).
    """

    def __init__(self, cfg: ModelConfig, spec: ServingSpec | None, integer_input: SensorIntegers = "error") -> None:
        self.cfg = cfg
        self.modality = spec.modality if spec is not None else None
        self.integer_input = integer_input
        self._row = None
        self.sample_rate = spec.sample_rate if self.modality == "audio" else None
        self.channels: int | None = cfg.input_dim if cfg.input_kind == "continuous" else None
        if spec is not None and spec.modality != "dna":
            self._row = spec.encoder(sensor_integers=integer_input)
            self.channels = spec.stream_channels
        # True: a channel axis is required; None: optional (mono audio); False: token ids
        self.has_channels: bool | None = (
            None if self.modality == "audio" and self.channels is None
            else self.modality in ("audio", "sensor") or (self.modality is None and cfg.input_kind == "continuous")
        )

    def check(self, inp: InputArray) -> None:
        """Raise before any work when ``inp`` cannot feed this model (channels, dtype)."""
        if self.channels is not None and inp.n_channels != self.channels:
            raise ShapeError(
                f"input array {inp.store!r}: the model reads {self.channels} channel(s), the array has "
                f"{inp.n_channels} along axis {inp.layout.channel_axis} (shape {inp.shape})"
            )
        if self.sample_rate is not None and inp.sample_rate is not None and inp.sample_rate != self.sample_rate:
            raise ConfigError(
                f"input array {inp.store!r}: sample_rate {inp.sample_rate:g} Hz, the model was trained at "
                f"{self.sample_rate:g} Hz; resample the array first (chunked resampling would not be exact)"
            )
        if self.cfg.input_kind == "tokens" and self._row is None and np.dtype(inp.dtype).kind not in "iu":
            raise DataFormatError(f"input array {inp.store!r}: token models need integer ids, got {inp.dtype}")
        pcm = self.modality == "audio" or self.integer_read(inp) == "pcm"
        if pcm and np.dtype(inp.dtype).kind in "iu" and np.dtype(inp.dtype) not in PCM_DTYPES:
            raise DataFormatError(
                f"input array {inp.store!r}: {inp.dtype} samples cannot be read as PCM (full scale known for "
                f"{', '.join(str(d) for d in PCM_DTYPES)}); convert the array to one of those or to float"
            )
        if self.integer_read(inp) == "error":
            raise ConfigError(
                f"input array {inp.store!r}: {inp.dtype} samples for a sensor model; integers are not scaled "
                f"silently: pass --integer-input values (raw units, as training read integer table columns) "
                f"or --integer-input pcm (divided by the dtype's full scale to [-1, 1])"
            )
        if self.modality == "audio" and self.channels is None and (inp.n_channels or 1) > 1:
            log.warning("input array %s: %d channels mixed down to mono for this mono audio model (as in training)",
                        inp.store, inp.n_channels)

    def integer_read(self, inp: InputArray) -> SensorIntegers | None:
        """How integer samples of ``inp`` are read by a sensor model (None: not applicable)."""
        if self.modality != "sensor" or np.dtype(inp.dtype).kind not in "iu":
            return None
        return self.integer_input

    def __call__(self, raw: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(raw)
        if self._row is not None:
            return torch.stack([self._row(x[i]) for i in range(x.shape[0])])
        if self.cfg.input_kind == "tokens":
            if x.is_floating_point():
                raise DataFormatError(f"token ids must be integers, got {x.dtype}")
            return x.long()
        return x.float()


# --------------------------------------------------------------------------- output + resume


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


@dataclass
class OutputPlan:
    """What the output group holds for one run (shared by every rank)."""

    path: Path
    inputs: list[InputArray]
    bundle_info: dict[str, Any]  # fingerprint, config, serving
    chunk_steps: int
    batch_series: int
    out_dim: int
    integer_input: dict[str, str] = field(default_factory=dict)  # array name -> how integers were read

    def attrs(self, inp: InputArray) -> dict[str, Any]:
        read = {"integer_input": self.integer_input[inp.name]} if inp.name in self.integer_input else {}
        return _jsonable({
            "format": FORMAT,
            **self.bundle_info,
            **read,
            "input": inp.describe(),
            "chunk_steps": self.chunk_steps,
            "batch_series": self.batch_series,
            "output": {"head": self.bundle_info["config"]["head"], "dim": self.out_dim,
                       "dims": self.dims(inp), **self.values},
        })

    @property
    def values(self) -> dict[str, Any]:
        """What the output values are (``values``) and, with a serving spec, one name per
        output column (``names``): forecasts in the data's units, as the service returns them."""
        spec = ServingSpec.from_dict(self.bundle_info["serving"]) if self.bundle_info["serving"] else None
        head = self.bundle_info["config"]["head"]
        if head in ("lm", "classifier"):
            kind = "logits"
        elif spec is not None and spec.modality == "sensor":
            kind = "forecasts in the data's units (de-normalized per channel)"
        else:
            kind = "model outputs"
        return {"values": kind, **({"names": spec.output_names()} if spec is not None else {})}

    def dims(self, inp: InputArray) -> list[str]:
        return (["series"] if inp.layout.series_axis is not None else []) + ["time", "output"]

    def shape(self, inp: InputArray) -> tuple[int, ...]:
        lead = (inp.n_series,) if inp.layout.series_axis is not None else ()
        return (*lead, inp.n_steps, self.out_dim)

    def chunks(self, inp: InputArray) -> tuple[int, ...]:
        lead = (1,) if inp.layout.series_axis is not None else ()
        return (*lead, min(inp.time_chunk, inp.n_steps), self.out_dim)

    def _ours(self) -> list[str]:
        """Entries of the existing output folder, all written by ``streamssm infer``.

        An empty folder has none. Raises ``DataFormatError`` when the path is a file, not a
        zarr group, or holds anything else: such a folder is never written into or removed,
        and the message does not suggest ``--overwrite``.
        """
        leave = "choose another --output; it is left untouched (--overwrite replaces only outputs of streamssm infer)"
        if not self.path.is_dir():
            raise DataFormatError(f"output {str(self.path)!r} exists and is not a folder; {leave}")
        entries = sorted(p.name for p in self.path.iterdir())
        if not entries:
            return []
        try:
            root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for a non-zarr folder
            raise DataFormatError(
                f"output {str(self.path)!r} exists and is not a zarr group ({type(exc).__name__}); {leave}"
            ) from exc
        marked = dict(root.attrs).get(ROOT_MARK) == FORMAT
        ours = {name for name, arr in root.arrays() if dict(arr.attrs).get("streamssm", {}).get("format") == FORMAT}
        foreign = [e for e in entries if e != "zarr.json" and e not in ours]
        if foreign or not (marked or ours):
            shown = foreign[:5] + (["..."] if len(foreign) > 5 else [])
            raise DataFormatError(
                f"output {str(self.path)!r} is a zarr group not written by streamssm infer"
                f"{f' (it holds {shown})' if foreign else ''}; {leave}"
            )
        return entries

    def check_existing(self, overwrite: bool) -> None:
        """Refuse an output that is not ours, one that holds other inputs' outputs of another
        model (a group is one model's outputs; ``overwrite`` touches only this run's arrays), or
        (without ``overwrite``) this run's arrays made by another model or with other settings."""
        if not self.path.exists() or not self._ours():
            return
        root = zarr.open_group(str(self.path), mode="r")
        mine, model = {inp.name for inp in self.inputs}, self.bundle_info["model_fingerprint"]
        others = sorted(name for name, arr in root.arrays() if name not in mine
                        and dict(arr.attrs).get("streamssm", {}).get("model_fingerprint") != model)
        if others:
            raise ConfigError(
                f"output {str(self.path)!r} holds {others[:5]} made by another model; one output group holds one "
                f"model's outputs: use another --output")
        if overwrite:
            return
        for inp in self.inputs:
            if inp.name not in root:
                continue
            have = dict(root[inp.name].attrs).get("streamssm")
            want = self.attrs(inp)
            if have != want:
                diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
                raise ConfigError(
                    f"output array {str(self.path / inp.name)!r} was made by another model or with other "
                    f"settings (differs in {diff}); pass --overwrite to replace it, or use another --output"
                )

    def create(self, overwrite: bool) -> None:
        """Create (or reopen) the output arrays; rank 0 only. ``overwrite`` removes only this
        run's arrays among the entries :meth:`_ours` recognizes (never the folder, other
        inputs' outputs or anything else in it)."""
        if overwrite and self.path.exists():
            mine = {inp.name for inp in self.inputs}
            for name in self._ours():
                if name in mine:
                    shutil.rmtree(self.path / name)
        root = zarr.open_group(str(self.path), mode="a")
        if dict(root.attrs).get(ROOT_MARK) != FORMAT:
            root.attrs[ROOT_MARK] = FORMAT
        for inp in self.inputs:
            if inp.name in root:
                for stale in (self.path / inp.name).rglob("*.partial"):  # left by a killed write
                    stale.unlink()
                continue
            root.create_array(
                inp.name, shape=self.shape(inp), chunks=self.chunks(inp), dtype="float32",
                fill_value=float("nan"), compressors=ZstdCodec(level=3), dimension_names=self.dims(inp),
                attributes={"streamssm": self.attrs(inp)},
            )

    def mark_complete(self, records: ResumeRecords, units: Sequence[Unit]) -> None:
        """Set ``streamssm_complete`` on every array whose units' records are all finished."""
        root = zarr.open_group(str(self.path), mode="r+")
        for a, inp in enumerate(self.inputs):
            arr = root[inp.name]
            if not arr.attrs.get("streamssm_complete") and records.all_done([u for u in units if u.array == a]):
                arr.attrs["streamssm_complete"] = True

    def record_path(self, unit: Unit) -> Path:
        return self.path / self.inputs[unit.array].name / RESUME_DIR / f"group-{unit.group:06d}.safetensors"


class ResumeRecords:
    """Per-unit resume records: the state after the last finished chunk + its index."""

    def __init__(self, plan: OutputPlan, fingerprint: str) -> None:
        self.plan = plan
        self.fingerprint = fingerprint

    def _next_chunk(self, unit: Unit, source: bytes | Path) -> int:
        """The next chunk named by a record (its bytes, or its file: header only)."""
        path = self.plan.record_path(unit)
        try:
            meta = read_state_metadata(source)
            next_chunk = int(meta["next_chunk"])
        except (StateError, ValueError, KeyError) as exc:
            raise StateError(f"resume record {str(path)!r} is corrupt: {exc!r}") from exc
        if meta.get("fingerprint") != self.fingerprint:
            raise StateError(
                f"resume record {str(path)!r} belongs to model {meta.get('fingerprint')!r}, "
                f"not {self.fingerprint!r}; pass --overwrite"
            )
        if not 0 <= next_chunk <= unit.n_chunks:
            raise StateError(
                f"resume record {str(path)!r} is corrupt: next chunk {next_chunk} is outside 0..{unit.n_chunks}; "
                f"pass --overwrite"
            )
        return next_chunk

    def start_chunk(self, unit: Unit) -> int:
        """First chunk of ``unit`` still to compute (0 without a record; reads the header only)."""
        path = self.plan.record_path(unit)
        return self._next_chunk(unit, path) if path.exists() else 0

    def load_state(self, unit: Unit, chunk: int, device: torch.device) -> ModelState:
        """The state after chunk ``chunk - 1`` of ``unit`` (its record must say ``chunk`` is next)."""
        path = self.plan.record_path(unit)
        data = path.read_bytes() if path.exists() else None
        have = None if data is None else self._next_chunk(unit, data)
        if have != chunk:
            raise StateError(
                f"unit {unit.key}: chunk {chunk} needs the state after chunk {chunk - 1}, but the resume "
                f"record says {'nothing' if have is None else f'next chunk {have}'}"
            )
        try:
            return state_from_bytes(data, device)
        except StateError as exc:
            raise StateError(f"resume record {str(path)!r} is corrupt: {exc}") from exc

    def all_done(self, units: Sequence[Unit]) -> bool:
        return all(self.start_chunk(u) == u.n_chunks for u in units)

    def save(self, unit: Unit, next_chunk: int, state: ModelState) -> None:
        path = self.plan.record_path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = state_to_bytes(state, {"fingerprint": self.fingerprint, "next_chunk": str(next_chunk),
                                      "n_chunks": str(unit.n_chunks), "series": f"{unit.s0}:{unit.s1}"})
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- Lightning parts


class ZarrPredictor(pl.LightningModule):
    """Runs the model over one chunk, continuing the state of the unit's previous chunk."""

    def __init__(self, model: SSMModel, units: Sequence[Unit], records: ResumeRecords) -> None:
        super().__init__()
        self.model = model
        # a rank left without work (all its units finished) has an empty loader: not an error
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.units = {u.key: u for u in units}
        self.records = records
        self._carry: tuple[tuple[int, int], int, ModelState] | None = None  # (unit key, next chunk, state)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        if "error" in batch:  # the chunk could not be read (ZarrChunkDataset)
            raise batch["error"]
        key, k = (int(batch["array"]), int(batch["group"])), int(batch["chunk"])
        if self._carry is not None and self._carry[:2] == (key, k):
            state = self._carry[2]
        elif k == 0:
            state = None
        else:
            state = self.records.load_state(self.units[key], k, self.device)
        y, state = self.model(batch["x"], state)
        self._carry = (key, k + 1, state)
        return {"y": y, "state": state}


class _BackgroundIO:
    """One writer thread, at most ``depth`` jobs queued; errors surface on the next call.

    After a job fails, the jobs queued behind it do not run: a later chunk's resume record must
    never be saved after an earlier chunk's write failed (it would mark that chunk done)."""

    def __init__(self, depth: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-write")
        self.pending: list[Future] = []
        self.depth = depth
        self.failed = False  # set by the writer thread; jobs run one at a time, in order

    def submit(self, fn, *args) -> None:
        self._reap(block=len(self.pending) >= self.depth)
        self.pending.append(self.pool.submit(self._run, fn, *args))

    def _run(self, fn, *args) -> None:
        if self.failed:
            raise StateError("zarr write skipped: an earlier chunk's write failed")
        try:
            fn(*args)
        except BaseException:
            self.failed = True
            raise

    def _reap(self, block: bool) -> None:
        while self.pending and (block or self.pending[0].done()):
            fut = self.pending.pop(0)
            fut.result()
            block = False

    def flush(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.pool.shutdown(wait=True)


class Interrupted(Exception):
    """SIGTERM stopped the run after a finished chunk (its writes are flushed in ``teardown``)."""


class ZarrPredictionWriter(BasePredictionWriter):
    """Writes each chunk's outputs into the zarr output, then the unit's resume record.

    On SIGTERM it stops after the current chunk: the queued writes finish (``teardown``), so
    every record on disk is complete and a rerun resumes there.

    Rank 0 creates or reopens the output in ``setup`` (the others wait at a barrier). An array
    is marked complete by whichever rank sees all its units' records finished (at setup or after
    its own last write): no end barrier, since Lightning skips the predict hooks of a rank left
    without work.
    """

    def __init__(self, plan: OutputPlan, records: ResumeRecords, units: Sequence[Unit], overwrite: bool,
                 decode: Callable[[torch.Tensor], torch.Tensor] = lambda y: y) -> None:
        super().__init__(write_interval="batch")
        self.plan = plan
        self.decode = decode  # model outputs (..., o) -> the units a user sees (ServingSpec.output_decoder)
        self.records = records
        self.units = {u.key: u for u in units}
        self.overwrite = overwrite
        self._arrays: list[zarr.Array] = []
        self._io: _BackgroundIO | None = None
        self.chunks_written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.plan.create(self.overwrite)
        trainer.strategy.barrier("zarr-output-created")
        root = zarr.open_group(str(self.plan.path), mode="r+")
        self._arrays = [root[inp.name] for inp in self.plan.inputs]
        self._io = _BackgroundIO()
        if trainer.is_global_zero:
            self.plan.mark_complete(self.records, list(self.units.values()))

    def _write(self, unit: Unit, chunk: int, t0: int, y: np.ndarray, state: ModelState) -> None:
        arr = self._arrays[unit.array]
        if self.plan.inputs[unit.array].layout.series_axis is None:
            arr[t0 : t0 + y.shape[1]] = y[0]
        else:
            arr[unit.s0 : unit.s1, t0 : t0 + y.shape[1]] = y
        self.records.save(unit, chunk + 1, state)
        self.chunks_written += 1

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        unit = self.units[(int(batch["array"]), int(batch["group"]))]
        y = self.decode(prediction["y"].detach().float().cpu()).numpy()
        state = tuple(LayerState(*(t.detach().cpu() for t in layer)) for layer in prediction["state"])
        if self._io is None:
            raise StateError("ZarrPredictionWriter: write before setup (no output opened)")
        self._io.submit(self._write, unit, int(batch["chunk"]), int(batch["t0"]), y, state)
        if trainer.received_sigterm:  # Lightning's handler only sets the flag; its predict loop never looks
            raise Interrupted(f"stopped by SIGTERM after chunk {int(batch['chunk'])} of unit {unit.key}")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self._io is not None:
            self._io.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._io is not None:
            self._io.flush()
        self.plan.mark_complete(self.records, list(self.units.values()))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._io is not None:
            io, self._io = self._io, None
            io.close()


# ------------------------------------------------------------------------------------- entry


@dataclass
class InferenceResult:
    """What a run did, as seen by one process (``rank``); totals cover every rank.

    ``status``: "done" (this run finished the output), "complete" (it was finished already:
    nothing computed), "interrupted" (SIGTERM) or "cancelled" (Ctrl-C); after either, rerun
    the same command to resume.
    """

    output: Path
    arrays: list[str]
    steps: int  # series steps this run set out to compute, over all ranks
    seconds: float
    chunks: int  # chunks written by this process
    status: str = "done"
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def default_chunk_steps(inputs: Sequence[InputArray]) -> int:
    """The smallest multiple of every input's time chunk that is >= DEFAULT_CHUNK_STEPS (or
    covers the longest input)."""
    base = math.lcm(*(inp.time_chunk for inp in inputs))
    want = min(DEFAULT_CHUNK_STEPS, max(inp.n_steps for inp in inputs))
    return base * max(1, -(-want // base))


def prepare(
    bundle: ServingBundle,
    input: str | Path,
    output: str | Path,
    *,
    time_axis: int | None = None,
    channel_axis: int | None = None,
    series_axis: int | None = None,
    chunk_steps: int | None = None,
    batch_series: int = 8,
    num_workers: int = 1,
    overwrite: bool = False,
    integer_input: SensorIntegers = "error",
    missing_chunks: MissingChunks = "error",
) -> tuple[ZarrDataModule, ZarrPredictor, ZarrPredictionWriter]:
    """Validate everything (nothing is written) and build the datamodule, module and writer.

    ``integer_input``: how a sensor model reads integer arrays ("error", "values", "pcm"; see
    ``BatchEncoder``). ``missing_chunks``: "error" on an input chunk absent from its store, or
    "fill" (zarr's fill value, for arrays written with ``write_empty_chunks=False``).
    """
    encoder = BatchEncoder(bundle.config, bundle.spec, integer_input)
    inputs = open_inputs(input, encoder.has_channels, time_axis, channel_axis, series_axis)
    for inp in inputs:
        encoder.check(inp)
    steps = chunk_steps if chunk_steps is not None else default_chunk_steps(inputs)
    out_path = Path(output).expanduser()
    in_path = Path(input).expanduser().resolve()
    if out_path.resolve() == in_path:
        raise ConfigError(f"--output {str(output)!r} must differ from --input")
    if out_path.resolve().is_relative_to(in_path):
        raise ConfigError(f"--output {str(output)!r} lies inside the input {str(input)!r}; write it elsewhere")
    plan = OutputPlan(
        out_path, inputs,
        {"model_fingerprint": bundle.fingerprint, "config": bundle.config.to_dict(), "serving": bundle.spec.to_dict() if bundle.spec else {}},
        int(steps), int(batch_series), bundle.config.resolved_output_dim,
        {inp.name: read for inp in inputs if (read := encoder.integer_read(inp)) is not None},
    )
    records = ResumeRecords(plan, bundle.fingerprint)
    datamodule = ZarrDataModule(inputs, encoder, plan.chunk_steps, plan.batch_series,
                                start_chunk=records.start_chunk, num_workers=num_workers,
                                missing_chunks=missing_chunks)
    plan.check_existing(overwrite)
    module = ZarrPredictor(bundle.model, datamodule.units, records)
    decode = bundle.spec.output_decoder() if bundle.spec is not None else (lambda y: y)
    writer = ZarrPredictionWriter(plan, records, datamodule.units, overwrite, decode)
    return datamodule, module, writer


def run_inference(
    checkpoint: str | Path,
    input: str | Path,
    output: str | Path,
    *,
    devices: int = 1,
    accelerator: str = "auto",
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> InferenceResult:
    """Run a checkpoint over zarr input(s) and write/continue the zarr output.

    ``options``: ``time_axis``, ``channel_axis``, ``series_axis``, ``chunk_steps``,
    ``batch_series``, ``num_workers``, ``overwrite``, ``integer_input``, ``missing_chunks``
    (see :func:`prepare`). ``devices > 1`` runs Lightning DDP (one process per device, gloo on
    CPU) with the units split over ranks. An output that is complete already is left as it is
    (``status="complete"``, no Trainer started); SIGTERM stops after the current chunk
    (``status="interrupted"``) and a rerun resumes.
    """
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(f"devices: expected an integer >= 1, got {devices!r}")
    bundle = load_for_serving(checkpoint, "cpu")
    datamodule, module, writer = prepare(bundle, input, output, **options)
    names = [inp.name for inp in writer.plan.inputs]
    overwrite = bool(options.get("overwrite"))
    todo = datamodule.remaining_steps(datamodule.units, from_start=overwrite)  # all ranks, from the records
    if todo == 0:
        writer.plan.mark_complete(writer.records, datamodule.units)
        return InferenceResult(writer.plan.path, names, 0, 0.0, 0, status="complete")
    quiet_lightning()
    try:
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, callbacks=[writer, *callbacks],
        )
    except (MisconfigurationException, ModuleNotFoundError, ValueError, RuntimeError) as exc:
        # no such accelerator here, too many devices, an unknown name: Lightning says which
        raise ConfigError(f"--accelerator {accelerator} --devices {devices}: {exc}") from exc
    start = time.perf_counter()
    status = "done"
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    except Interrupted as exc:
        log.info("%s", exc)
        status = "interrupted"
    except SystemExit:  # Ctrl-C: Lightning tears down (the queued writes finish), then exits 1
        if not trainer.interrupted:
            raise
        status = "cancelled"
    seconds = time.perf_counter() - start
    return InferenceResult(writer.plan.path, names, todo, seconds, writer.chunks_written, status=status,
                           rank=trainer.global_rank, world_size=trainer.world_size)
