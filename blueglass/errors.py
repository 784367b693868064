"""User-facing errors.

Anything a researcher can cause by a bad parameter, a wrong path or a missing prerequisite raises a
:class:`BlueGlassError`. The CLI prints its message as one line and exits with status 2; library callers
get an ordinary exception.
"""


class BlueGlassError(Exception):
    """An error caused by user input (params, paths, missing prerequisites)."""


class ConfigError(BlueGlassError):
    """A ``params.yaml`` value is unknown, of the wrong type or out of range."""


class DatasetError(BlueGlassError):
    """A dataset folder is missing or malformed."""


class ModelError(BlueGlassError):
    """A model folder is missing, malformed or of an unsupported architecture."""
