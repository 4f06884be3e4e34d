"""The errors of reloop: one base class, so a caller can catch everything reloop raises on bad input.

Each layer subclasses :class:`ReloopError` for its own failures (``ModelConfigError``,
``FeatureJobError``, ``RegistryError``, ...); the CLI turns any of them into one line
and exit code 2.

>>> issubclass(ConfigError, ReloopError) and issubclass(ConfigError, ValueError)
True
"""


class ReloopError(Exception):
    """Base of every error reloop raises for a reason it can name (bad input, bad config, a failed stage)."""


class ConfigError(ReloopError, ValueError):
    """A config file that cannot be read or does not validate; the message names the file and field."""


class DatasetError(ReloopError, ValueError):
    """A data set that cannot be read, or whose columns do not fit the event contract."""
