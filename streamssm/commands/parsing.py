"""Option parsing shared by the commands.

- :class:`ArgumentParser`: argparse whose errors raise :class:`~streamssm.errors.ConfigError`
  (``streamssm/cli.py`` prints them as one line, exit 2) instead of printing usage and exiting.
- :func:`config_parser` + :func:`add_fields` + :func:`parse`: a jsonargparse parser taking
  ``--config FILE`` and ``--print_config`` like ``fit``, whose options come from a dataclass's
  fields (type, default and ``metadata["help"]``): declared once, in the dataclass. Option
  names use dashes (``max_streams`` -> ``--max-streams``); config files use the field names.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jsonargparse

from streamssm.errors import ConfigError

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError on a bad command line (one line from ``cli.main``)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message}; see {self.prog} --help")


class _HelpFormatter(jsonargparse.DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (types and defaults) with the description printed as written."""


def config_parser(prog: str, description: str) -> jsonargparse.ArgumentParser:
    """A jsonargparse parser with ``--config FILE`` (YAML, keys as ``--print_config`` writes them)."""
    parser = jsonargparse.ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False,
                                         formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile,
                        help="YAML file of these options (write one with --print_config); later options override it")
    return parser


def option_name(field_name: str) -> str:
    """``max_streams`` -> ``--max-streams``."""
    return "--" + field_name.replace("_", "-")


def add_fields(parser: jsonargparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None) -> None:
    """One option per init field of dataclass ``cls``; a field without default is required.
    ``defaults`` overrides a field's default for this command only."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "type": hints[f.name], "help": f.metadata.get("help", "")}
        if defaults and f.name in defaults:
            kwargs["default"] = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if hints[f.name] is bool:  # --flag alone means true; --flag false also works
            kwargs.update(nargs="?", const=True)
        parser.add_argument(option_name(f.name), **kwargs)


def parse(parser: jsonargparse.ArgumentParser, argv: Sequence[str]) -> jsonargparse.Namespace:
    """Parse ``argv``; a bad option or config file raises ConfigError (``--help`` and
    ``--print_config`` exit 0 as usual)."""
    try:
        return parser.parse_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ConfigError(f"{exc}; see {parser.prog} --help") from exc


def build(cls: type[T], namespace: jsonargparse.Namespace, **overrides: Any) -> T:
    """An instance of dataclass ``cls`` from the parsed fields (``overrides`` replace some)."""
    values = {f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.init}
    return cls(**{**values, **overrides})
