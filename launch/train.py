"""Train a small CNN with synced BatchNorm under DDP, from a YAML config.

    torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml
    python launch/train.py --config configs/lenet.yaml --set train.epochs=3 --set model.norm=gn
    torchrun --nproc_per_node=2 launch/train.py --config configs/lenet.yaml --resume auto

The machinery lives in ``syncnorm.train``; this file only turns user errors into one line + exit 2,
and failures of a started run (non-finite loss, a crashed or stuck rank) into one line + exit 1.
"""

import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.errors import ConfigError  # noqa: E402
from syncnorm.train.ui import error_line  # noqa: E402


def main(argv=None) -> int:
    from syncnorm.train.loop import CollectiveError, TrainingError
    from syncnorm.train.loop import main as run

    try:
        return run(argv)
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike: say it once
            error_line(str(error))
        return 2
    except CollectiveError as error:  # each surviving rank has its own view (rank 0 may be the lost one)
        error_line(str(error))
        return 1
    except TrainingError as error:  # all ranks agree (e.g. a non-finite loss): say it once
        if os.environ.get("RANK", "0") == "0":
            error_line(str(error))
        return 1
    except KeyboardInterrupt:
        return 130


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown. With torch 2.14 + gloo a worker sometimes aborts in
    C++ destructors at interpreter exit ("terminate called without an active exception", SIGABRT, no
    Python frame) after all its work is done, and torchrun then reports a finished run as failed
    (seen in 1-2 of 10 two-rank runs, with or without this project's changes). By now the checkpoints
    are fsynced and the process group is destroyed: flush the streams and exit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    exit_now(main())
