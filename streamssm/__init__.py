"""streamssm: streaming signal modeling with state-space models (Mamba, Mamba-2)."""

from pathlib import Path as _Path


def _search_the_checkout_root() -> None:
    """In a checkout, the subpackages kernels/, datamodules/ and service/ sit beside this folder,
    not in it (pyproject.toml's package-dir installs them as ``streamssm.kernels``, ...). When
    Python imports this folder instead of an install (``python -m streamssm`` or ``python -m
    pytest`` in the repository root put the current folder first on sys.path, ahead of a
    non-editable install too), the repository root is searched for them as well, so the checkout
    imports as one consistent tree. An installed package (no pyproject.toml beside it) is left alone."""
    root = _Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file() \
            and str(root) not in __path__:
        __path__.append(str(root))


_search_the_checkout_root()

from streamssm.errors import (  # noqa: E402 (after the search path is complete)
    ConfigError,
    DataFormatError,
    ProtocolError,
    ShapeError,
    StateError,
    StreamSSMError,
)
from streamssm.state import LayerState, ModelState  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataFormatError",
    "LayerState",
    "ModelState",
    "ProtocolError",
    "ShapeError",
    "StateError",
    "StreamSSMError",
    "__version__",
]
