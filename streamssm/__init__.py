"""streamssm: streaming signal modeling with state-space models (Mamba, Mamba-2)."""

from streamssm.errors import (
    ConfigError,
    DataFormatError,
    ProtocolError,
    ShapeError,
    StateError,
    StreamSSMError,
)
from streamssm.state import LayerState, ModelState

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
