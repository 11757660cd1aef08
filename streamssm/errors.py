"""One error tree for the whole toolkit.

Every error is also the builtin it resembles, so callers that catch ``ValueError`` keep
working. Messages say what was expected and what came.
"""


class StreamSSMError(Exception):
    """Root of all streamssm errors."""


class ConfigError(StreamSSMError, ValueError):
    """A configuration value (model, recipe, server limit) is invalid."""


class ShapeError(StreamSSMError, ValueError):
    """A tensor has the wrong rank, shape, dtype or device."""


class StateError(StreamSSMError, ValueError):
    """A recurrent state does not match the model, or a stream id is unknown."""


class DataFormatError(StreamSSMError, ValueError):
    """Input data (FASTA, audio, table, zarr array) cannot be read as expected."""


class ProtocolError(StreamSSMError, ValueError):
    """A websocket client broke the streaming protocol.

    ``code`` is the websocket close code to answer with (1003, 1007, 1008, 1009, ...).
    """

    def __init__(self, message: str, code: int = 1008, reason: str = "protocol_error"):
        super().__init__(message)
        self.code = code
        self.reason = reason
