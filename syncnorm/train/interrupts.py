"""Ctrl-C during a run: held while a checkpoint is written, and said as where the run stopped.

:func:`interrupts_deferred` makes a block (the epoch's metrics row and checkpoint) finish before a
SIGINT takes effect; :func:`during_interrupt` recognises an error raised while a Ctrl-C was being
handled (``torch.save`` cut short); :func:`interrupted` is the :class:`Interrupted` error that says
where the run stopped and which checkpoint to continue from.
"""

import contextlib
import signal
import threading

from syncnorm.train.epoch import LoopState
from syncnorm.train.errors import Interrupted


def during_interrupt(error: BaseException) -> bool:
    """True when ``error`` was raised while handling a Ctrl-C (e.g. torch.save cut short)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C during the block takes effect after it (a checkpoint being written is finished first).
    Only the main thread can set a signal handler; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def interrupted(state: LoopState) -> Interrupted:
    """Ctrl-C: where it stopped, the checkpoint to continue from, and how."""
    if state.phase == "training step":
        where = f"at epoch {state.epoch}, step {state.step + 1}"
    elif state.epoch:
        where = f"at epoch {state.epoch} ({state.phase})"
    else:
        where = f"during {state.phase or 'start-up'}"
    last = state.last_checkpoint or "none (no epoch finished)"
    return Interrupted(f"interrupted {where}; last checkpoint {last}; continue with --resume auto")
