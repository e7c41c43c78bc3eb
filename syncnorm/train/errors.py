"""The one exception family for user mistakes (bad config, missing files, bad checkpoint).

``launch/train.py`` and ``launch/eval.py`` catch :class:`ConfigError` and print its message as one
line, then exit with status 2. Anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A mistake the user can fix: the message says what was expected and what was found."""


class DataError(ConfigError):
    """A dataset cannot be built (files missing offline, download failed, too small for the world)."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be used (missing, corrupt, unsafe, or saved from a different model)."""
