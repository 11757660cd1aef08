"""The ``streamssm`` command: one entry point that dispatches to subcommands.

Each subcommand lives in its own module exposing ``main(argv: list[str]) -> int``; this file
only routes. Training subcommands (fit/validate/test/predict) go to LightningCLI.
"""

from __future__ import annotations

import importlib
import logging
import sys

#: name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("streamssm.demo", "train, serve, stream and batch-infer a tiny model on built-in data, with plots"),
    "info": ("streamssm.info", "show versions, devices and which kernel backends run here"),
    "serve": ("streamssm.service.server", "serve a checkpoint over websockets to many concurrent streams"),
    "stream": ("streamssm.service.client", "stream a WAV/CSV/FASTA file to a running server and save the results"),
    "infer": ("streamssm.infer_cli", "run a checkpoint over zarr arrays (chunked, resumable, multi-device)"),
    "fit": ("streamssm.train_cli", "train a recipe: streamssm fit --config recipes/dna_tiny.yaml"),
    "validate": ("streamssm.train_cli", "evaluate a checkpoint on the validation split of a recipe"),
    "test": ("streamssm.train_cli", "evaluate a checkpoint on the test split of a recipe"),
    "predict": ("streamssm.train_cli", "run a trained model over a recipe's predict data"),
    "export": ("streamssm.export", "write a training checkpoint as one .safetensors file for serving"),
    "make-data": ("streamssm.make_data", "write the generated data the tiny recipes train on (runs/data/)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: streamssm <command> [options]",
        "",
        "Streaming signal modeling with state-space models (Mamba, Mamba-2).",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `streamssm <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from streamssm import __version__

        print(f"streamssm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"streamssm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, prog=f"streamssm {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
