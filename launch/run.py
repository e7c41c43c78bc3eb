"""torchrun with a short ending: on a failure, the first failed rank's one line and its exit status.

    python launch/run.py --nproc_per_node=2 launch/train.py --config configs/lenet.yaml

Takes torchrun's options (it runs ``torch.distributed.run.main``). Plain torchrun ends a failed run
with its own ``ChildFailedError`` traceback and exit status 1, whatever failed; this ends with one
``error:`` line and the failed rank's status (2 a mistake to fix, 1 a failed run, 130 Ctrl-C).
The machinery lives in ``syncnorm.train.elastic``.
"""

import os
import sys

try:
    import syncnorm.train  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from syncnorm.train.elastic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
