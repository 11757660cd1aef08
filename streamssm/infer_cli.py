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
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings

from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from streamssm.errors import StreamSSMError

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


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model: .safetensors export or Lightning .ckpt")
    p.add_argument("--input", required=True, help="zarr array or group (all its arrays): in.zarr or in.zarr/path")
    p.add_argument("--output", required=True, help="zarr group to write (one array per input array)")
    p.add_argument("--time-axis", type=int, default=None, help="axis of time steps (default: from dimension_names or layout)")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of channels (continuous inputs)")
    p.add_argument("--series-axis", type=int, default=None, help="axis of series (many recordings of equal length)")
    p.add_argument("--chunk-steps", type=int, default=None,
                   help="time steps per model call, a multiple of the input's zarr time chunk (default: >= 65536)")
    p.add_argument("--batch-series", type=int, default=8, help="series computed together (memory ~ chunk x batch)")
    p.add_argument("--devices", type=int, default=1, help="devices (processes) to spread the series over")
    p.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    p.add_argument("--num-workers", type=int, default=1, help="reader processes (>= 1 reads ahead while computing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output of this command instead of continuing it")
    p.add_argument("--integer-input", choices=("error", "values", "pcm"), default="error",
                   help="integer arrays into a sensor model: refuse (default), read as raw units, or as PCM "
                        "scaled to [-1, 1]")
    p.add_argument("--missing-chunks", choices=("error", "fill"), default="error",
                   help="an input chunk absent from its store: error (default) or read zarr's fill value "
                        "(arrays written with write_empty_chunks=False)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str = "streamssm infer") -> int:
    args = build_parser(prog).parse_args(argv)
    from streamssm.zarr_infer import run_inference

    # Lightning cannot infer batch indices from our per-chunk items; the writer does not need them.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    try:
        result = run_inference(
            args.checkpoint, args.input, args.output,
            devices=args.devices, accelerator=args.accelerator,
            callbacks=[StepsProgress(disable=True if args.no_progress else None)],
            time_axis=args.time_axis, channel_axis=args.channel_axis, series_axis=args.series_axis,
            chunk_steps=args.chunk_steps, batch_series=args.batch_series, num_workers=args.num_workers,
            overwrite=args.overwrite, integer_input=args.integer_input, missing_chunks=args.missing_chunks,
        )
    except StreamSSMError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    arrays = ", ".join(result.arrays)
    if result.status == "interrupted":
        if result.rank == 0:
            print(f"{prog}: stopped by SIGTERM; finished chunks are kept in {result.output}; rerun the same "
                  f"command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
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
