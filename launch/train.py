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


if __name__ == "__main__":
    sys.exit(main())
