"""``streamssm export``: turn a training checkpoint into one ``.safetensors`` file for serving.

    streamssm export --checkpoint runs/dna_tiny/version_0/checkpoints/last.ckpt --output dna.safetensors

The file holds the weights, the ModelConfig and the serving spec (tokenizer, sample
rate, normalization statistics, task); ``streamssm serve`` and ``streamssm infer`` load it
like the checkpoint itself, without unpickling anything.

    streamssm export --checkpoint last.ckpt --format hf --output my-model/ --license apache-2.0

``--format hf`` writes a folder to upload to the Hugging Face Hub as is (config.json,
model.safetensors, README.md model card; see :mod:`streamssm.hf_export`).

    streamssm export --checkpoint last.ckpt --format onnx --output my-model-onnx/ --chunk-length 64

``--format onnx`` writes a folder with the recurrent step and a fixed-length chunk as ONNX
graphs (step.onnx, chunk.onnx), their torch.export programs (.pt2) and streamssm.json (the
state layout, config and serving spec); ONNX Runtime runs them without torch (see
:mod:`streamssm.onnx_export`). Needs the ``export`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import logging
from pathlib import Path

from streamssm.checkpoint import export_safetensors, load_for_serving
from streamssm.commands.parsing import ArgumentParser
from streamssm.errors import ConfigError

log = logging.getLogger(__name__)

#: the ONNX exporter's loggers: INFO for every rewrite and folded constant (~180 lines an export),
#: and torch's notes on optional torchvision ops; the CLI logs at INFO, so only their warnings show
ONNX_EXPORTER_LOGGERS = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.ERROR}


def export_checkpoint(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> tuple[Path, str]:
    """Load ``checkpoint`` (Lightning ``.ckpt`` or ``.safetensors``) and write ``output``.

    Returns ``(output path, model fingerprint)``. Refuses to overwrite unless ``overwrite``.
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output: expected a path ending in .safetensors, got {str(output)!r}")
    if output.exists() and not overwrite:
        raise ConfigError(f"--output: {str(output)!r} exists; pass --overwrite to replace it")
    bundle = load_for_serving(checkpoint, device="cpu")
    export_safetensors(bundle.model, output, spec=bundle.spec, versions=bundle.versions)
    return output, bundle.fingerprint


def main(argv: list[str], prog: str = "streamssm export") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt written by `streamssm fit`")
    parser.add_argument("--output", required=True, help="destination .safetensors file (hf, onnx: a folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--format", choices=("safetensors", "hf", "onnx"), default="safetensors",
                        help="safetensors: one streamssm file; hf: a Hugging Face Hub folder; "
                             "onnx: a folder of step/chunk graphs")
    parser.add_argument("--license", help="hf: the weights' license for the model card (e.g. apache-2.0)")
    parser.add_argument("--chunk-length", type=int, default=64, help="onnx: time steps of the chunk graph")
    parser.add_argument("--chunk-batch", type=int, default=1, help="onnx: streams of the chunk graph (the step's is dynamic)")
    args = parser.parse_args(argv)
    if args.format == "onnx":
        from streamssm.onnx_export import export_onnx

        for name, level in ONNX_EXPORTER_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        done = export_onnx(load_for_serving(args.checkpoint), args.output, args.chunk_length, args.chunk_batch,
                           overwrite=args.overwrite)
        print(f"wrote {done.folder} (step.onnx, chunk.onnx, step.pt2, chunk.pt2, {done.manifest.name})")
        return 0
    if args.format == "hf":
        from streamssm.hf_export import export_hf

        done = export_hf(args.checkpoint, args.output, args.license or "", args.overwrite)
        print(f"wrote {done.folder} ({done.layout} layout: config.json, model.safetensors, README.md)")
        return 0
    path, fingerprint = export_checkpoint(args.checkpoint, args.output, args.overwrite)
    print(f"wrote {path} (model fingerprint {fingerprint})")
    return 0
