"""Errors a user of revcol can cause; the ``revcol`` command prints these as messages, not tracebacks."""


class RevColError(ValueError):
    """Base class: a bad configuration, input or file, with a message that says what is allowed.

    A ``ValueError``, so code written against plain ``ValueError`` keeps working.
    """


class ConfigError(RevColError):
    """An invalid RevCol configuration: constructor arguments, variant name or model-YAML backbone row."""


class InputError(RevColError):
    """An input tensor RevCol cannot take (shape, channels, spatial size)."""


class CheckpointError(RevColError):
    """A checkpoint file that cannot be read or does not fit the model."""
