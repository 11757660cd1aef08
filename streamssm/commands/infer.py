"""``streamssm infer``: run a checkpoint over zarr v3 arrays and write the outputs as zarr.

Examples::

    streamssm infer --checkpoint model.safetensors --input rec.zarr --output pred.zarr
    streamssm infer --checkpoint last.ckpt --input store.zarr/audio --output out.zarr \\
        --time-axis 1 --channel-axis 2 --series-axis 0 --batch-series 16 --devices 4

Rerunning the same command after an interruption (SIGTERM stops after the current chunk,
exit status 143) continues where it stopped (the result is byte-identical to an uninterrupted
run); rerunning a finished job says so and computes nothing. An output made by another model or
with other settings is refused unless ``--overwrite``, which replaces only an output written by
this command (never another folder). An input chunk missing from its store is an error unless
``--missing-chunks fill``; integer arrays into a sensor model need ``--integer-input``. With
several devices only rank 0 reports, with the total of all ranks.

The options are the fields of :class:`InferConfig`; ``--print_config`` writes them as YAML for
``--config FILE`` (later options override the file).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonargparse
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from streamssm.commands.parsing import add_fields, build, config_parser, parse

log = logging.getLogger(__name__)


class StepsProgress(Callback):
    """A tqdm bar on rank 0 counting series steps (steps/s and ETA of this rank's share)."""

    def __init__(self, disable: bool | None = None) -> None:
        self.disable = disable
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            total = getattr(trainer.datamodule, "planned_steps", None)
            self.bar = tqdm(total=total, unit="step", unit_scale=True, dynamic_ncols=True,
                            desc="infer", disable=self.disable, file=sys.stderr)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.bar is not None:
            x = batch["x"]
            self.bar.update(int(x.shape[0]) * int(x.shape[1]))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _required(help: str) -> Any:
    return field(metadata={"help": help})


@dataclass
class InferConfig:
    """The ``streamssm infer`` options (``time_axis`` -> ``--time-axis``; the keys of ``--config``)."""

    checkpoint: str = _required("model: .safetensors export or Lightning .ckpt")
    input: str = _required("zarr array or group (all its arrays): in.zarr or in.zarr/path")
    output: str = _required("zarr group to write (one array per input array)")
    time_axis: int | None = _option(None, "axis of time steps (null: from dimension_names or layout)")
    channel_axis: int | None = _option(None, "axis of channels (continuous inputs)")
    series_axis: int | None = _option(None, "axis of series (many recordings of equal length)")
    chunk_steps: int | None = _option(None, "time steps per model call, a multiple of the input's zarr time chunk "
                                            "(null: >= 65536)")
    batch_series: int = _option(8, "series computed together (memory ~ chunk x batch)")
    devices: int = _option(1, "devices (processes) to spread the series over")
    accelerator: str = _option("auto", "auto | cpu | gpu")
    num_workers: int = _option(1, "reader processes (>= 1 reads ahead while computing)")
    overwrite: bool = _option(False, "replace an existing output of this command instead of continuing it")
    integer_input: Literal["error", "values", "pcm"] = _option(
        "error", "integer arrays into a sensor model: refuse, read as raw units, or as PCM scaled to [-1, 1]")
    missing_chunks: Literal["error", "fill"] = _option(
        "error", "an input chunk absent from its store: error, or read zarr's fill value "
                 "(arrays written with write_empty_chunks=False)")
    no_progress: bool = _option(False, "no progress bar")


def build_parser(prog: str) -> jsonargparse.ArgumentParser:
    parser = config_parser(prog, __doc__)
    add_fields(parser, InferConfig)
    return parser


def main(argv: list[str], prog: str = "streamssm infer") -> int:
    cfg = build(InferConfig, parse(build_parser(prog), argv))
    from streamssm.zarr_infer import run_inference

    # Lightning cannot infer batch indices from our per-chunk items; the writer does not need them.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    options = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("checkpoint", "input", "output", "devices", "accelerator", "no_progress")}
    result = run_inference(cfg.checkpoint, cfg.input, cfg.output, devices=cfg.devices, accelerator=cfg.accelerator,
                           callbacks=[StepsProgress(disable=True if cfg.no_progress else None)], **options)
    arrays = ", ".join(result.arrays)
    if result.status in ("interrupted", "cancelled"):  # SIGTERM / Ctrl-C (Lightning exited 1 without a word)
        by = signal.SIGTERM if result.status == "interrupted" else signal.SIGINT
        if result.rank == 0:
            print(f"{prog}: stopped by {by.name}; finished chunks are kept in {result.output}; rerun the same "
                  f"command to resume", file=sys.stderr)
        return 128 + by
    if result.rank != 0:  # DDP: rank 0 reports for everyone
        return 0
    if result.status == "complete":
        log.info("%s (%s) is already complete: nothing to do (--overwrite recomputes it)", result.output, arrays)
        return 0
    rate = result.steps / result.seconds if result.seconds > 0 else float("nan")
    devices = f" on {result.world_size} devices" if result.world_size > 1 else ""
    log.info("wrote %s (%s): %d series steps in %.1f s (%.0f steps/s)%s", result.output, arrays, result.steps,
             result.seconds, rate, devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
