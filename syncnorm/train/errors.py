"""The exceptions of the training machinery: user mistakes (:class:`ConfigError`) and failures of a
started run (:class:`TrainingError`).

``launch/train.py`` and ``launch/eval.py`` catch :class:`ConfigError` and print its message as one
line, then exit with status 2; ``launch/train.py`` prints a :class:`TrainingError` as one line and exits
with status 1. Anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A mistake the user can fix: the message says what was expected and what was found."""


class DataError(ConfigError):
    """A dataset cannot be built (files missing offline, download failed, too small for the world)."""


class UnreadableImageError(DataError):
    """An image file of ``data.name=imagefolder`` cannot be decoded; the message names the file.

    Raised by whichever rank (or ``DataLoader`` worker) reads it, so every rank says its own."""

    every_rank = True

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception comes back to the rank rebuilt from its traceback's text
        # ("Caught UnreadableImageError in DataLoader worker process 0. Original Traceback ..."): keep
        # the one line it was raised with, the traceback's last.
        if "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class CheckpointError(ConfigError):
    """A checkpoint cannot be used (missing, corrupt, unsafe, or saved from a different model)."""


class TrainingError(RuntimeError):
    """A started run cannot go on; the message is one line saying where, why and what to do.

    ``launch/train.py`` prints it as one line and exits with status 1."""


class NonFiniteLossError(TrainingError):
    """``train.nan_policy=stop`` met a NaN/inf loss (on any rank: all ranks raise it together)."""


class CollectiveError(TrainingError):
    """A collective timed out or lost a peer: another rank crashed, was killed, or is stuck."""


class UnsupportedOperationError(TrainingError):
    """The backend or this torch version lacks an operation the run needs (every rank raises it alike)."""


class Interrupted(TrainingError):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to continue (exit status 130)."""
