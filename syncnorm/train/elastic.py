"""A failing run under torchrun: our one line in torchrun's report, and ``launch/run.py``, torchrun with
a short ending and an exit status that says what happened.

torchrun (``torch.distributed.run``) starts each worker with ``TORCHELASTIC_ERROR_FILE`` set. A worker
that fails writes a JSON error record there (what torch's ``@record`` decorator writes for an
uncaught exception, ``ErrorHandler.record_exception``); when the workers fail, torchrun raises
``ChildFailedError`` and shows the first failure's record as its "Root Cause". The launcher writes its
one line there (:func:`record_failure`), so that report shows the line instead of "To enable
traceback see ...", also when torchrun stopped rank 0 before it could print it.

Plain torchrun still ends with its own traceback of ``ChildFailedError`` and exits with status 1 for
any failure: torch has no switch for either (``@record`` only copies the error file for a scheduler).
``launch/run.py`` (:func:`main`) is torchrun itself (same options, ``torch.distributed.run``) that
catches ``ChildFailedError`` and ``SignalException``: it ends with the first failed rank's one line and exits with that
rank's status (2 a mistake to fix, 1 a failed run; 128 + N for signal N, 130 for Ctrl-C).
"""

import json
import os
import sys
import time
from typing import Optional, Sequence

# Set by launch/run.py for its workers: the wrapper says the failure line, so the workers do not.
PARENT_SAYS_FAILURE = "SYNCNORM_PARENT_SAYS_FAILURE"


def record_failure(line: str) -> None:
    """Write ``line`` as this worker's error record for torchrun (nothing outside torchrun).

    The record has the layout torch's ``ErrorHandler.record_exception`` writes, with our line where
    it puts the traceback: torchrun prints that field as the failure's "traceback"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": f"error: {line}",
                                                           "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # torchrun then reports the exit status alone


def parent_says_failure() -> bool:
    """True in a worker of ``launch/run.py``, which prints the failure line itself."""
    return os.environ.get(PARENT_SAYS_FAILURE) == "1"


def _failure_line(rank: int, failure) -> str:
    """The line for torchrun's first failure (a ``ProcessFailure``)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("extraInfo", {}).get("py_callstack") or message.get("message") or ""
    message = str(message).strip()
    if message.startswith("error: ") and "\n" not in message:  # our record: the line itself
        return message[len("error: "):]
    if failure.exitcode < 0:
        return (f"rank {rank} was killed by {failure.signal_name()} (pid {failure.pid}); torchrun stopped the "
                f"other ranks; see the ranks' logs/rank{{N}}.log in the run's output_dir")
    last = message.splitlines()[-1] if message and "To enable traceback" not in message else ""
    return (f"rank {rank} exited with status {failure.exitcode}" + (f" ({last})" if last else "")
            + "; its traceback or message is above")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``launch/run.py [torchrun options] SCRIPT [args]``: torchrun; on a failure, one ``error:`` line
    (the first failed rank's) instead of torchrun's traceback, and that rank's exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ[PARENT_SAYS_FAILURE] = "1"  # the workers inherit it
    try:
        # torchrun.main without its @record: that copies the failed worker's error file to the launcher's
        # own (for a scheduler) and, with none set (a shell), logs an error line saying so.
        torchrun.run(torchrun.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"error: {_failure_line(rank, failure)}", file=sys.stderr, flush=True)
        if failure.exitcode < 0:
            return 128 - failure.exitcode
        return failure.exitcode or 1
    except SignalException as error:  # Ctrl-C or a kill reached torchrun; the workers said where they were
        return 128 + int(error.sigval)
    return 0
