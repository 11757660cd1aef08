"""The ``streamssm`` command: one entry point that dispatches to subcommands.

Each command lives in its own module of :mod:`streamssm.commands` exposing
``main(argv: list[str], prog: str) -> int``; this file routes (``COMMANDS``) and holds the
one error path (no command catches errors itself): a :class:`StreamSSMError` or a common OS
error (missing file, connection refused, ...) raised by any command, also when wrapped by
LightningCLI or jsonargparse, prints one line ``streamssm <command>: error: <message>`` and exits 2 (usage or
configuration: :class:`ConfigError`) or 1 (anything else); ``--debug`` anywhere on the command
line shows the traceback instead. A bad option or config file is a ConfigError too
(``streamssm.commands.parsing``). Training subcommands (fit/validate/test/predict) go to
LightningCLI (``streamssm.commands.fit``).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

from streamssm.errors import ConfigError, StreamSSMError

#: name -> (module under streamssm.commands, one-line help); imported only when its command runs.
#: A new command is a module in streamssm/commands/ with ``main(argv, prog) -> int`` and a row here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "train, serve, stream and batch-infer a tiny model on built-in data, with plots"),
    "info": ("info", "a model file's card (config, serving spec, size, fingerprint), or versions, devices and kernel backends"),
    "serve": ("serve", "serve a checkpoint over websockets to many concurrent streams"),
    "stream": ("stream", "stream a WAV/CSV/FASTA file to a running server and save the results"),
    "infer": ("infer", "run a checkpoint over zarr arrays (chunked, resumable, multi-device)"),
    "fit": ("fit", "train a recipe: streamssm fit --config recipes/dna_tiny.yaml"),
    "validate": ("fit", "evaluate a checkpoint on the validation split of a recipe"),
    "test": ("fit", "evaluate a checkpoint on the test split of a recipe"),
    "predict": ("fit", "run a trained model over a recipe's predict data"),
    "export": ("export", "write a training checkpoint for serving: one .safetensors file, a Hugging Face folder or ONNX"),
    "import": ("import_weights", "convert a local pretrained Mamba / Mamba-2 folder to a .safetensors model"),
    "generate": ("generate", "continue a prompt (DNA, audio, sensor series or token ids) with a trained model"),
    "make-data": ("make_data", "write the generated data the tiny recipes train on (runs/data/)"),
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
    lines += ["", "options:", "  --debug  show the traceback of an error instead of one line",
              "", "Run `streamssm <command> --help` for the options of a command."]
    return "\n".join(lines)


def _root_cause(exc: BaseException) -> BaseException:
    """The StreamSSMError or OSError behind ``exc`` (LightningCLI and jsonargparse wrap
    instantiation errors in ValueErrors), else ``exc`` itself."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (StreamSSMError, OSError)):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return exc


def describe_error(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for the errors a user can fix; None for a bug (traceback)."""
    cause = _root_cause(exc)
    if isinstance(cause, StreamSSMError):
        return " ".join(str(cause).split()), 2 if isinstance(cause, ConfigError) else 1
    if isinstance(cause, OSError):
        if cause.errno == errno.EADDRINUSE:
            return f"{cause.strerror or cause}; pick another port with --port", 2
        where = f": {cause.filename}" if cause.filename else ""
        return f"{cause.strerror or cause}{where}", 1
    if type(cause).__name__ == "MisconfigurationException":  # Lightning's refusal of a --trainer.* setting
        return f"Lightning: {' '.join(str(cause).split())}", 2
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
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
    # `import lightning` gives the "lightning" logger its own console handler: print its lines once
    logging.getLogger("lightning").propagate = False
    try:
        module = importlib.import_module(f"streamssm.commands.{COMMANDS[name][0]}")
        return int(module.main(rest, prog=f"streamssm {name}") or 0)
    except KeyboardInterrupt:
        print(f"streamssm {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`streamssm info M | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as exc:
        described = None if debug else describe_error(exc)
        if described is None:
            raise
        message, code = described
        print(f"streamssm {name}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
